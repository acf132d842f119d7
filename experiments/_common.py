"""Pieces the experiment scripts share: where they ran (CPU, library commit) and the MLP."""

from __future__ import annotations

import math
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel.argtypes import positive_int  # noqa: F401  (the benchmarks' argparse type)

ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit(*paths: str) -> tuple[str, bool] | None:
    """``(short commit, whether any of paths has uncommitted changes)``, or None outside git."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", *paths],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit, bool(dirty)


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> dict[str, dict[str, jax.Array]]:
    """LeCun-normal weights, zero biases; a dict of layers ``{"layer0": {"w", "b"}, ...}``."""
    keys = jax.random.split(key, len(sizes) - 1)
    return {f"layer{i}": {"w": jax.random.normal(k, (m, n), jnp.float32) / math.sqrt(m),
                          "b": jnp.zeros((n,), jnp.float32)}
            for i, (k, m, n) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))}


# The benchmarks' bilevel problem: an MLP with one log-L2 strength per layer.


def mlp(params: dict, x: jax.Array) -> jax.Array:
    """GELU MLP; with two layer sizes it is multinomial logistic regression."""
    layers = [params[f"layer{i}"] for i in range(len(params))]
    for layer in layers[:-1]:
        x = jax.nn.gelu(x @ layer["w"] + layer["b"])
    return x @ layers[-1]["w"] + layers[-1]["b"]


def cross_entropy(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(mlp(params, x), y).mean()


def inner_loss(params: dict, hparams: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """Training cross-entropy plus ``Σ_l exp(λ_l) ||W_l||² / 2`` (a log-L2 strength per layer)."""
    penalty = sum(jnp.exp(hparams[name]) * jnp.sum(params[name]["w"] ** 2) for name in params)
    return cross_entropy(params, x, y) + penalty / 2


def outer_loss(params: dict, hparams: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """Validation cross-entropy; λ acts only through the inner solution."""
    del hparams
    return cross_entropy(params, x, y)


class Compiled(NamedTuple):
    """A program compiled ahead of time: a no-argument call, XLA's temp and output bytes."""
    call: Callable[[], Any]
    temp_bytes: int
    output_bytes: int
    compile_s: float


def compile_call(fun: Callable, args: tuple) -> Compiled:
    """``jit(fun)`` compiled ahead of time for ``args`` (passed as arguments, never closed over)."""
    start = time.perf_counter()
    compiled = jax.jit(fun).lower(*args).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return Compiled(lambda: compiled(*args), int(memory.temp_size_in_bytes),
                    int(memory.output_size_in_bytes), seconds)


def timed_rounds(calls: dict[str, Callable[[], Any]], rounds: int, rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
    """Per-call wall times (after ``block_until_ready``) over ``rounds`` rounds, each calling
    every candidate once in a fresh random order, so drifts in machine load hit all alike.
    Warm up the calls first."""
    names = list(calls)
    times = {name: np.empty(rounds) for name in names}
    for r in range(rounds):
        for i in rng.permutation(len(names)):
            start = time.perf_counter()
            jax.block_until_ready(calls[names[i]]())
            times[names[i]][r] = time.perf_counter() - start
    return times
