"""Pieces the experiment scripts share: where they ran (CPU, library commit) and the MLP."""

from __future__ import annotations

import math
import platform
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp

from bilevel._argtypes import positive_int  # noqa: F401  (the benchmarks' argparse type)

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
