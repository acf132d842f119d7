"""Benchmark: unrolled meta-gradients (reverse vs MixFlow-MG) and implicit hypergradients vs jaxopt.

Part A runs ``bilevel.unrolled_hypergrad`` through T Adam steps of an MLP with an
activation-heavy batch, in ``mode="reverse"`` (plain reverse-over-reverse through ``lax.scan``)
and ``mode="mixflow"`` (Kemaev et al. 2025), each without and with ``checkpoint_every="sqrt"``,
and reports compiled temp memory, wall time and the agreement of the meta-gradients. A
configuration whose compiled temp memory exceeds ``--max-temp-gib`` (or most of the RAM free
now) is compiled and reported but not run.

Part B compares ``bilevel.hypergrad`` (``hvp.CG(maxiter=k, tol=0)``; fwd_rev and rev_rev) with
jaxopt's ``custom_root`` using ``solve_cg`` with the same k iterations, at the same inner
solution, for a few problem sizes: time, compiled memory and the difference of the results.

Usage::

    python experiments/bench_unrolled.py                       # full run (about 20 min, 2 cores)
    python experiments/bench_unrolled.py --smoke --out /tmp/b  # tiny variant (about 30 s)

Writes ``bench_unrolled.md``, ``bench_unrolled.csv`` and ``bench_unrolled.png`` into ``--out``.
Methodology follows DESIGN.md, "Measuring": data are jit arguments, every candidate is compiled
ahead of time and called once as a warm-up, timed calls are interleaved in rounds (random order
per round, ``block_until_ready``), and every time is a ratio to a baseline measured in the same
rounds; memory is ``memory_analysis()`` of the compiled executable.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import functools
import importlib.metadata
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import _common  # noqa: E402  (experiments/ is on sys.path when run as a script)
import jax
import jax.numpy as jnp
import jaxopt
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jaxopt.implicit_diff import custom_root

import bilevel
import hvp

PyTree = Any
MiB = 2**20
GiB = 2**30


# --------------------------------------------------------------------------------------------
# Configuration: the full study and the smoke variant.


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    layer_sizes: tuple[int, ...]  # input, hidden..., classes (Part A, and Part B's MLP)
    batch: int
    steps: tuple[int, ...]  # unroll lengths T
    repeats: int  # timing rounds at the smallest T; ceil(repeats * sqrt(Tmin / T)) at larger T
    inner_lr: float  # Adam learning rate of the unrolled inner loop
    log_l2: float  # initial log-L2 strength per layer (the hyperparameters)
    max_temp_gib: float  # configurations above this compiled temp memory are not run
    cg_iters: int  # Part B: CG iterations k for both libraries
    implicit_train_steps: int  # Part B: Adam steps to the inner solution
    implicit_lr: float
    implicit_log_l2: float
    implicit_damping: float  # Part B: ridge δ in H + δI (MLP Hessians are indefinite)
    implicit_repeats: int
    reference_iters: int  # Part B: CG iterations of the converged reference
    mlp_batch_divisors: tuple[int, ...]  # Part B: MLP sizes at batch // d for each d
    round_budget_s: float  # cap on timed rounds: about this many seconds per T (or per size)
    float64_batch_divisor: int  # Part A's float64 agreement check runs at batch // this


FULL = Config(name="full", layer_sizes=(64, 256, 256, 10), batch=4096, steps=(10, 50, 200),
              repeats=12, inner_lr=1e-3, log_l2=math.log(1e-3), max_temp_gib=12.0, cg_iters=20,
              implicit_train_steps=300, implicit_lr=1e-2, implicit_log_l2=math.log(1e-2),
              implicit_damping=0.1, implicit_repeats=15, reference_iters=200,
              mlp_batch_divisors=(4, 1), round_budget_s=400.0, float64_batch_divisor=16)
SMOKE = Config(name="smoke", layer_sizes=(8, 16, 3), batch=64, steps=(2, 4), repeats=4,
               inner_lr=1e-2, log_l2=math.log(1e-3), max_temp_gib=12.0, cg_iters=3,
               implicit_train_steps=10, implicit_lr=1e-2, implicit_log_l2=math.log(1e-2),
               implicit_damping=1.0, implicit_repeats=3, reference_iters=20,
               mlp_batch_divisors=(1,), round_budget_s=10.0, float64_batch_divisor=4)

SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0"
CHECKPOINTS = (None, "sqrt")
MODES = ("reverse", "mixflow")
BASELINE = ("reverse", None)
TARGET_MEMORY = 10.0  # mixflow needs >= 10x less temp memory than plain reverse
TARGET_SPEEDUP = 1.25  # and >= 1.25x its speed
TARGET_IMPLICIT = 0.8  # bilevel.hypergrad <= 0.8x jaxopt's time at equal accuracy
EQUAL_ACCURACY = 1e-3  # relative difference below which two float32 hypergradients "agree"


def config_name(mode: str, checkpoint: str | None) -> str:
    return f"{mode}" + ("" if checkpoint is None else f"+{checkpoint}")


def rounds_at(cfg: Config, repeats: int, steps: int) -> int:
    """Fewer rounds at larger T, where each call is longer and its timing less noisy."""
    return max(1, math.ceil(repeats * math.sqrt(min(cfg.steps) / steps)))


# --------------------------------------------------------------------------------------------
# Pure core: the model, the losses, the data.


init_mlp = _common.init_mlp


mlp = _common.mlp
cross_entropy = _common.cross_entropy
inner_loss = _common.inner_loss
outer_loss = _common.outer_loss


def make_data(key: jax.Array, teacher: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Gaussian inputs; labels sampled from a random linear teacher's softmax."""
    k_x, k_y = jax.random.split(key)
    x = jax.random.normal(k_x, (n, teacher.shape[0]), jnp.float32)
    logits = 3.0 * x @ teacher / math.sqrt(teacher.shape[0])
    return x, jax.random.categorical(k_y, logits).astype(jnp.int32)


class Problem(NamedTuple):
    params0: PyTree
    hparams: PyTree
    x: jax.Array
    y: jax.Array
    x_val: jax.Array
    y_val: jax.Array


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def make_problem(key: jax.Array, sizes: tuple[int, ...], batch: int, log_l2: float) -> Problem:
    """Everything random from one key, in one compiled call."""
    k_init, k_teacher, k_train, k_val = jax.random.split(key, 4)
    teacher = jax.random.normal(k_teacher, (sizes[0], sizes[-1]), jnp.float32)
    params0 = init_mlp(k_init, sizes)
    hparams = {name: jnp.asarray(log_l2, jnp.float32) for name in params0}
    return Problem(params0, hparams, *make_data(k_train, teacher, batch),
                   *make_data(k_val, teacher, batch))


def count_params(params: PyTree) -> int:
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))


def max_relative_difference(a: PyTree, b: PyTree) -> float:
    """``max_i |a_i − b_i| / |b_i|`` over every entry of the hparams pytree (on the host)."""
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))
                            / np.abs(np.asarray(y, np.float64)))) for x, y in pairs)


# --------------------------------------------------------------------------------------------
# Measurement helpers.


Compiled = _common.Compiled
compile_call = _common.compile_call


def available_memory_bytes() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return math.inf


def time_interleaved(calls: dict[str, Callable[[], Any]], rounds: int, budget_s: float,
                     rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One warm-up call each (its outputs are returned), then rounds that call every candidate
    once in a fresh random order; per-call wall times. At most ``rounds`` rounds, fewer (but at
    least one) where the warm-up round says they would take more than ``budget_s``."""
    start = time.perf_counter()
    outputs = {name: jax.block_until_ready(call()) for name, call in calls.items()}
    rounds = min(rounds, max(1, int(budget_s // (time.perf_counter() - start))))
    return outputs, _common.timed_rounds(calls, rounds, rng)


def paired_ratio(num: np.ndarray, den: np.ndarray) -> float:
    """Median of the per-round ratios ``num / den`` (both timed in the same rounds)."""
    return float(np.median(num / den))


# --------------------------------------------------------------------------------------------
# Part A: unrolled meta-gradients.


def unrolled_function(cfg: Config, mode: str, checkpoint: str | None, steps: int) -> Callable:
    def meta_gradient(params0, hparams, x, y, x_val, y_val):
        grad, info = bilevel.unrolled_hypergrad(
            inner_loss, outer_loss, params0, hparams, optimizer=optax.adam(cfg.inner_lr),
            steps=steps, inner_args=(x, y), outer_args=(x_val, y_val), mode=mode,
            checkpoint_every=checkpoint, on_failure="ignore")
        return grad, info.outer_loss

    return meta_gradient


def size_text(n_bytes: float) -> str:
    if n_bytes >= GiB:
        return f"{n_bytes / GiB:.1f} GiB"
    return f"{n_bytes / MiB:,.0f} MiB" if n_bytes >= 100 * MiB else f"{n_bytes / MiB:.3g} MiB"


def skip_reason(temp_bytes: int, limit_bytes: float) -> str | None:
    if temp_bytes > limit_bytes:
        return f"temp {size_text(temp_bytes)} > limit {size_text(limit_bytes)}"
    free = available_memory_bytes()
    if temp_bytes > 0.8 * free:
        return f"temp {size_text(temp_bytes)} > 80% of the {size_text(free)} free now"
    return None


def measure_unrolled_at(cfg: Config, problem: Problem, steps: int, rounds: int,
                        limit_bytes: float, rng: np.random.Generator) -> list[dict[str, Any]]:
    rows, calls = {}, {}
    for mode in MODES:
        for checkpoint in CHECKPOINTS:
            name = config_name(mode, checkpoint)
            compiled = compile_call(unrolled_function(cfg, mode, checkpoint, steps), problem)
            reason = skip_reason(compiled.temp_bytes, limit_bytes)
            rows[name] = dict(part="A", steps=steps, config=name, mode=mode,
                              checkpoint=checkpoint or "none", temp_bytes=compiled.temp_bytes,
                              output_bytes=compiled.output_bytes, compile_s=compiled.compile_s,
                              executed=reason is None, skip_reason=reason or "", rounds=0)
            print(f"  T={steps:>4} {name:>15}: compiled in {compiled.compile_s:5.1f} s, temp "
                  f"{compiled.temp_bytes / MiB:9.1f} MiB" + (f"  NOT RUN ({reason})" if reason
                                                             else ""), flush=True)
            if reason is None:
                calls[name] = compiled.call
    start = time.perf_counter()
    outputs, times = time_interleaved(calls, rounds, cfg.round_budget_s, rng)
    rounds = len(next(iter(times.values())))
    print(f"  T={steps:>4}: warm-up + {rounds} round(s) in {time.perf_counter() - start:.0f} s",
          flush=True)
    return finish_unrolled_rows(rows, outputs, times, rounds)


def finish_unrolled_rows(rows: dict[str, dict], outputs: dict[str, Any],
                         times: dict[str, np.ndarray], rounds: int) -> list[dict[str, Any]]:
    """Ratios against plain reverse (or, where it did not run, reverse+sqrt for time and
    gradients) and the agreement of every meta-gradient with that reference."""
    baseline = config_name(*BASELINE)
    time_reference = baseline if baseline in times else config_name("reverse", "sqrt")
    for name, row in rows.items():
        row["memory_ratio_vs_reverse"] = rows[baseline]["temp_bytes"] / row["temp_bytes"]
        if name not in times:
            continue
        grad, outer = outputs[name]
        row.update(rounds=rounds, median_s=float(np.median(times[name])),
                   min_s=float(np.min(times[name])), outer_loss=float(outer),
                   time_reference=time_reference)
        if time_reference in times:
            row["speedup_vs_reference"] = paired_ratio(times[time_reference], times[name])
            row["grad_rel_diff_vs_reference"] = max_relative_difference(
                grad, outputs[time_reference][0])
    return list(rows.values())


def float64_agreement(cfg: Config, steps: int, batch: int, seed: int,
                      limit_bytes: float) -> dict[str, Any]:
    """mixflow vs reverse (no checkpointing) in float64 on a smaller batch: separates a bug
    from float32 round-off in the differences of Part A's table."""
    with jax.enable_x64(True):
        problem = jax.tree_util.tree_map(
            lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
            make_problem(jax.random.key(seed), cfg.layer_sizes, batch, cfg.log_l2))
        grads = {}
        for mode in MODES:
            compiled = compile_call(unrolled_function(cfg, mode, None, steps), problem)
            reason = skip_reason(compiled.temp_bytes, limit_bytes)
            if reason is not None:
                return dict(part="A64", steps=steps, batch=batch, rel_diff=math.nan,
                            note=f"{mode}: {reason}")
            grads[mode] = jax.block_until_ready(compiled.call())[0]
        difference = max_relative_difference(grads["mixflow"], grads["reverse"])
    print(f"  T={steps:>4} float64, batch {batch}: mixflow vs reverse max rel. diff "
          f"{difference:.1e}", flush=True)
    return dict(part="A64", steps=steps, batch=batch, rel_diff=difference, note="")


def measure_unrolled(cfg: Config, problem: Problem, repeats: int, limit_bytes: float, seed: int,
                     rng: np.random.Generator) -> tuple[list[dict[str, Any]], list[dict]]:
    rows, checks = [], []
    for steps in cfg.steps:
        rows += measure_unrolled_at(cfg, problem, steps, rounds_at(cfg, repeats, steps),
                                    limit_bytes, rng)
        small_batch = max(1, cfg.batch // cfg.float64_batch_divisor)
        checks.append(float64_agreement(cfg, steps, small_batch, seed, limit_bytes))
    return rows, checks


# --------------------------------------------------------------------------------------------
# Part B: implicit hypergradients against jaxopt.


@functools.partial(jax.jit, static_argnums=(4, 5))
def train_inner(params: PyTree, hparams: PyTree, x: jax.Array, y: jax.Array, steps: int,
                lr: float) -> PyTree:
    """Full-batch Adam on the inner loss: the (approximate) inner solution both methods use."""
    optimizer = optax.adam(lr)

    def step(_, state):
        params, opt_state = state
        grads = jax.grad(inner_loss)(params, hparams, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.lax.fori_loop(0, steps, step, (params, optimizer.init(params)))[0]


def ours_function(solver: hvp.AbstractSolver, mode: str, damping: float) -> Callable:
    """``bilevel.hypergrad``; returns ``(grad, info)`` (the info costs no extra product).

    The same work as jaxopt's ``custom_root``: no stationarity check (one more gradient) and no
    failure report (the budgets here run CG with ``tol=0`` on purpose).
    """
    def hypergradient(params, hparams, x, y, x_val, y_val):
        return bilevel.hypergrad(inner_loss, outer_loss, params, hparams, (x, y), (x_val, y_val),
                                 solver=solver, mode=mode, damping=damping, on_failure="ignore",
                                 stationarity_tol=None)

    return hypergradient


def jaxopt_function(cg_iters: int, damping: float) -> Callable:
    """jaxopt's implicit differentiation of a "solver" that returns the given solution.

    ``custom_root`` differentiates the optimality function ``∇_θ L_in`` with ``jax.vjp``
    (reverse-over-reverse), linearised once per backward pass; ``solve_cg`` runs exactly
    ``cg_iters`` iterations with ``tol=0`` and returns no convergence information.
    """
    def optimality(params, hparams, x, y):
        return jax.grad(inner_loss)(params, hparams, x, y)

    solve = functools.partial(jaxopt.linear_solve.solve_cg, maxiter=cg_iters, tol=0.0,
                              ridge=damping or None)

    @custom_root(optimality, solve=solve)
    def at_solution(params, hparams, x, y):
        return params

    def hypergradient(params, hparams, x, y, x_val, y_val):
        grad = jax.grad(lambda h: outer_loss(at_solution(params, h, x, y), h, x_val, y_val))(
            hparams)
        return grad, None

    return hypergradient


def implicit_sizes(cfg: Config, batch: int) -> list[tuple[str, tuple[int, ...], int, float]]:
    """(name, layer sizes, batch, least damping): logistic regression (convex; undamped) and
    the Part-A MLP at a few batch sizes (damped, its Hessian being indefinite)."""
    logistic = (cfg.layer_sizes[0], cfg.layer_sizes[-1])
    return [("logreg", logistic, batch, 0.0)] + [
        ("MLP", cfg.layer_sizes, max(1, batch // d), cfg.implicit_damping)
        for d in cfg.mlp_batch_divisors]


def choose_damping(floor: float, lambda_min: float) -> float:
    """``floor``, or ``2|λ_min|`` rounded up to 0.05 where ``H + floor·I`` is not safely positive
    definite; CG (both libraries') assumes a positive-definite operator. Lanczos' ``λ_min`` is an
    upper bound of the true one, hence the margin; ours reports negative curvature if it fails."""
    if floor == 0.0 or lambda_min + floor >= floor / 2:
        return floor
    return round(math.ceil(2 * abs(lambda_min) / 0.05) * 0.05, 2)


def implicit_candidates(cfg: Config, damping: float) -> dict[str, Callable]:
    solver = hvp.CG(maxiter=cfg.cg_iters, tol=0.0)
    return {"jaxopt custom_root": jaxopt_function(cfg.cg_iters, damping),
            "bilevel fwd_rev": ours_function(solver, "fwd_rev", damping),
            "bilevel rev_rev": ours_function(solver, "rev_rev", damping)}


def measure_implicit_size(cfg: Config, key: jax.Array, label: str, sizes: tuple[int, ...],
                          batch: int, least_damping: float, rng: np.random.Generator
                          ) -> list[dict[str, Any]]:
    problem = make_problem(key, sizes, batch, cfg.implicit_log_l2)
    params = train_inner(problem.params0, problem.hparams, problem.x, problem.y,
                         cfg.implicit_train_steps, cfg.implicit_lr)
    args = (params, *problem[1:])
    operator = hvp.hessian(inner_loss, params, problem.hparams, problem.x, problem.y)
    spectrum = jax.jit(lambda op: hvp.extreme_eigenvalues(op, maxiter=30))(operator)
    damping = choose_damping(least_damping, float(spectrum.lambda_min))
    compiled = {name: compile_call(fun, args)
                for name, fun in implicit_candidates(cfg, damping).items()}
    baseline = next(iter(compiled))
    outputs, times = time_interleaved({n: c.call for n, c in compiled.items()},
                                      cfg.implicit_repeats, cfg.round_budget_s / 2, rng)
    reference_solver = hvp.CG(maxiter=cfg.reference_iters, tol=1e-6)
    reference, reference_info = jax.jit(ours_function(reference_solver, "fwd_rev", damping))(
        *args)
    our_info = outputs["bilevel fwd_rev"][1]
    b_norm = float(jnp.linalg.norm(ravel_pytree(
        jax.grad(outer_loss)(params, problem.hparams, problem.x_val, problem.y_val))[0]))
    common = dict(part="B", problem=f"{label} {'-'.join(map(str, sizes))}", batch=batch,
                  n_params=count_params(params), damping=damping, cg_iters=cfg.cg_iters,
                  rounds=len(times[baseline]), lambda_min=float(spectrum.lambda_min),
                  lambda_max=float(spectrum.lambda_max),
                  our_rel_residual=float(our_info.residual_norm) / b_norm,
                  our_status=hvp.Status(int(our_info.status)).name,
                  reference_status=hvp.Status(int(reference_info.status)).name)
    rows = []
    for name, c in compiled.items():
        rows.append(dict(common, method=name, median_s=float(np.median(times[name])),
                         time_ratio_vs_jaxopt=paired_ratio(times[name], times[baseline]),
                         temp_bytes=c.temp_bytes, output_bytes=c.output_bytes,
                         memory_ratio_vs_jaxopt=c.temp_bytes / compiled[baseline].temp_bytes,
                         rel_diff_vs_jaxopt=max_relative_difference(outputs[name][0],
                                                                    outputs[baseline][0]),
                         rel_error_vs_reference=max_relative_difference(outputs[name][0],
                                                                        reference)))
    print(f"  {common['problem']} batch {batch}: λ ∈ [{common['lambda_min']:.3g}, "
          f"{common['lambda_max']:.3g}], ours {common['our_status'].lower()} at rel. residual "
          f"{common['our_rel_residual']:.2e}; "
          + ", ".join(f"{r['method']} {r['median_s'] * 1e3:.0f} ms "
                      f"({r['time_ratio_vs_jaxopt']:.2f}x)" for r in rows), flush=True)
    return rows


def measure_implicit(cfg: Config, batch: int, seed: int,
                     rng: np.random.Generator) -> list[dict[str, Any]]:
    rows = []
    for i, (label, sizes, size_batch, least_damping) in enumerate(implicit_sizes(cfg, batch)):
        key = jax.random.fold_in(jax.random.key(seed), 1000 + i)
        rows += measure_implicit_size(cfg, key, label, sizes, size_batch, least_damping, rng)
    return rows


# --------------------------------------------------------------------------------------------
# Summaries (numbers from the measurement).


def growth(rows: list[dict[str, Any]], name: str) -> tuple[float, float, int, int]:
    """Temp-memory growth factor from the smallest to the largest T, and the exponent b of a
    least-squares fit ``temp ∝ T^b``."""
    points = sorted((r["steps"], r["temp_bytes"]) for r in rows if r["config"] == name)
    steps, temps = np.array(points, dtype=float).T
    slope = float(np.polyfit(np.log(steps), np.log(temps), 1)[0]) if len(steps) > 1 else math.nan
    return float(temps[-1] / temps[0]), slope, int(steps[0]), int(steps[-1])


def largest_baseline_run(rows: list[dict[str, Any]]) -> int | None:
    runs = [r["steps"] for r in rows if r["config"] == config_name(*BASELINE) and r["executed"]]
    return max(runs) if runs else None


def unrolled_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per mixflow configuration at the largest T where plain reverse ran."""
    steps = largest_baseline_run(rows)
    checks = []
    for r in rows:
        if r["steps"] != steps or r["mode"] != "mixflow" or not r["executed"]:
            continue
        checks.append(dict(config=r["config"], steps=steps,
                           memory=r["memory_ratio_vs_reverse"],
                           speedup=r.get("speedup_vs_reference", math.nan),
                           memory_ok=r["memory_ratio_vs_reverse"] >= TARGET_MEMORY,
                           speed_ok=r.get("speedup_vs_reference", 0.0) >= TARGET_SPEEDUP))
    return checks


def growth_checks(cfg: Config, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for mode in MODES:
        for checkpoint in CHECKPOINTS:
            name = config_name(mode, checkpoint)
            factor, slope, low, high = growth(rows, name)
            out.append(dict(config=name, factor=factor, slope=slope, low=low, high=high,
                            linear=high / low, sublinear=slope < 0.9))
    return out


def implicit_checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r["method"] != "bilevel fwd_rev":
            continue
        equal = r["rel_diff_vs_jaxopt"] <= EQUAL_ACCURACY
        out.append(dict(problem=r["problem"], batch=r["batch"],
                        ratio=r["time_ratio_vs_jaxopt"], rel_diff=r["rel_diff_vs_jaxopt"],
                        equal=equal, ok=equal and r["time_ratio_vs_jaxopt"] <= TARGET_IMPLICIT))
    return out


def verdict(ok: bool) -> str:
    return "**pass**" if ok else "**FAIL**"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: Any, spec: str, missing: str = "—") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def unrolled_table(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        reference = r.get("time_reference", "")
        speed = fmt(r.get("speedup_vs_reference"), ".2f")
        if speed != "—" and reference != config_name(*BASELINE):
            speed += f" (vs {reference})"
        body.append([str(r["steps"]), r["config"], f"{r['temp_bytes'] / MiB:,.1f}",
                     f"{(r['temp_bytes'] + r['output_bytes']) / MiB:,.1f}",
                     f"{r['memory_ratio_vs_reverse']:.1f}",
                     fmt(r.get("median_s"), ".2f") if r["executed"]
                     else f"not run: {r['skip_reason']}",
                     str(r["rounds"]) if r["executed"] else "0", speed,
                     fmt(r.get("grad_rel_diff_vs_reference"), ".1e"),
                     f"{r['compile_s']:.1f}"])
    return markdown_table(["T", "configuration", "temp MiB", "temp+out MiB",
                           "memory: reverse / this", "median s", "rounds",
                           "speed-up vs reverse", "max rel. diff of meta-grad vs reference",
                           "compile s"], body)


def targets_table(checks: list[dict[str, Any]], grow: list[dict[str, Any]]) -> str:
    body = []
    for c in checks:
        body.append([f"{c['config']} ≥ {TARGET_MEMORY:g}× less temp memory than reverse "
                     f"(T={c['steps']})", f"{c['memory']:.1f}×", verdict(c["memory_ok"])])
        body.append([f"{c['config']} ≥ {TARGET_SPEEDUP}× faster than reverse (T={c['steps']})",
                     f"{c['speedup']:.2f}×", verdict(c["speed_ok"])])
    for g in grow:
        if g["config"].endswith("+sqrt"):
            body.append([f"{g['config']}: temp memory sub-linear in T "
                         f"(T={g['low']}→{g['high']})",
                         f"×{g['factor']:.2f} (linear would be ×{g['linear']:.0f}); "
                         f"fit T^{g['slope']:.2f}", verdict(g["sublinear"])])
    return markdown_table(["target", "measured", "verdict"], body)


def float64_table(rows: list[dict[str, Any]], checks: list[dict[str, Any]]) -> str:
    float32 = {r["steps"]: r.get("grad_rel_diff_vs_reference") for r in rows
               if r["config"] == "mixflow"}
    return markdown_table(
        ["T", "float32, batch as above: mixflow vs reference", "float64 batch",
         "float64: mixflow vs reverse"],
        [[str(c["steps"]), fmt(float32.get(c["steps"]), ".1e"), str(c["batch"]),
          fmt(c["rel_diff"], ".1e", missing=f"not run ({c['note']})")] for c in checks])


def growth_table(grow: list[dict[str, Any]]) -> str:
    return markdown_table(["configuration", "temp growth", "fitted exponent b (temp ∝ T^b)"],
                          [[g["config"], f"×{g['factor']:.2f} from T={g['low']} to "
                            f"T={g['high']} (T ×{g['linear']:.0f})", f"{g['slope']:.2f}"]
                           for g in grow])


def implicit_table(rows: list[dict[str, Any]]) -> str:
    body = [[r["problem"], str(r["batch"]), f"{r['n_params']:,}", r["method"],
             f"{r['median_s'] * 1e3:.1f}", f"{r['time_ratio_vs_jaxopt']:.2f}",
             f"{r['temp_bytes'] / MiB:.2f}", f"{r['memory_ratio_vs_jaxopt']:.2f}",
             f"{r['rel_diff_vs_jaxopt']:.1e}", f"{r['rel_error_vs_reference']:.1e}"]
            for r in rows]
    return markdown_table(["problem", "batch", "params", "method", "median ms",
                           "time / jaxopt", "temp MiB", "memory / jaxopt",
                           "max rel. diff vs jaxopt", "max rel. error vs converged CG"], body)


def implicit_problem_table(rows: list[dict[str, Any]]) -> str:
    seen = {}
    for r in rows:
        seen.setdefault((r["problem"], r["batch"]), r)
    return markdown_table(
        ["problem", "batch", "λ_min, λ_max of H (Lanczos, 30 steps)", "damping δ",
         "CG k", "ours: ‖b−Hv‖/‖b‖ after k", "ours: status", "reference status"],
        [[r["problem"], str(r["batch"]), f"{r['lambda_min']:.3g}, {r['lambda_max']:.3g}",
          f"{r['damping']:g}", str(r["cg_iters"]),
          f"{r['our_rel_residual']:.2e}", r["our_status"].lower(),
          r["reference_status"].lower()] for r in seen.values()])


def implicit_targets_table(checks: list[dict[str, Any]]) -> str:
    return markdown_table(["target", "measured", "verdict"], [
        [f"bilevel fwd_rev ≤ {TARGET_IMPLICIT}× jaxopt's time at equal accuracy "
         f"({c['problem']}, batch {c['batch']})",
         f"{c['ratio']:.2f}× (rel. diff {c['rel_diff']:.1e}"
         + ("" if c["equal"] else f", above {EQUAL_ACCURACY:g}") + ")", verdict(c["ok"])]
        for c in checks])


def summary(cfg: Config, rows: list[dict[str, Any]], float64: list[dict[str, Any]],
            implicit: list[dict[str, Any]]) -> str:
    by = {(r["steps"], r["config"]): r for r in rows}
    parts = []
    steps, largest = largest_baseline_run(rows), max(cfg.steps)
    if steps is not None:
        base, mix = by[(steps, "reverse")], by[(steps, "mixflow")]
        parts.append(
            f"At T={steps}, the largest unroll plain reverse ran, MixFlow-MG compiles to "
            f"{size_text(mix['temp_bytes'])} of temp memory against reverse's "
            f"{size_text(base['temp_bytes'])} ({mix['memory_ratio_vs_reverse']:.1f}× less; "
            f"target {TARGET_MEMORY:g}×) and runs {mix.get('speedup_vs_reference', math.nan):.2f}"
            f"× as fast ({mix['median_s']:.3g} s vs {base['median_s']:.3g} s per meta-gradient, "
            f"median of {mix['rounds']} round(s); target {TARGET_SPEEDUP}×).")
    for r in rows:
        if not r["executed"]:
            mixflow = by[(r["steps"], "mixflow")]
            parts.append(f"{r['config']} at T={r['steps']} was compiled but not run "
                         f"({r['skip_reason']}); that is "
                         f"{r['temp_bytes'] / mixflow['temp_bytes']:.0f}× mixflow's temp memory.")
    if steps != largest:
        for name in ("mixflow", "mixflow+sqrt", "reverse+sqrt"):
            r = by.get((largest, name))
            if r is not None and r["executed"]:
                speed = ("" if name == r["time_reference"] else
                         f" ({r.get('speedup_vs_reference', math.nan):.2f}× the speed of "
                         f"{r['time_reference']})")
                parts.append(f"At T={largest}, {name} takes {r['median_s']:.3g} s{speed} and "
                             f"{size_text(r['temp_bytes'])} "
                             f"({r['memory_ratio_vs_reverse']:.0f}× less than plain reverse's "
                             f"compiled {size_text(by[(largest, 'reverse')]['temp_bytes'])}).")
    grow = {g["config"]: g for g in growth_checks(cfg, rows)}
    parts.append(f"Temp memory from T={min(cfg.steps)} to T={largest} "
                 f"(T ×{largest / min(cfg.steps):.0f}): "
                 + ", ".join(f"{n} ×{g['factor']:.1f} (≈T^{g['slope']:.2f})"
                             for n, g in grow.items()) + ".")
    diffs = [r["grad_rel_diff_vs_reference"] for r in rows
             if "grad_rel_diff_vs_reference" in r and r["config"] != r.get("time_reference")]
    if diffs:
        parts.append(f"In float32 every meta-gradient that ran agrees with reverse's to a max "
                     f"relative difference of {max(diffs):.1e}")
        exact = [c["rel_diff"] for c in float64 if not math.isnan(c["rel_diff"])]
        parts[-1] += ("." if not exact else
                      f"; in float64 (batch {float64[0]['batch']}) mixflow and reverse agree to "
                      f"{max(exact):.1e}, so the float32 differences are "
                      + ("round-off." if max(exact) < 1e-8 else "NOT only round-off."))
    for c in implicit_checks(implicit):
        parts.append(f"Implicit, {c['problem']} (batch {c['batch']}): bilevel.hypergrad "
                     f"(fwd_rev) takes {c['ratio']:.2f}× jaxopt's time "
                     f"({'meets' if c['ok'] else 'misses'} the {TARGET_IMPLICIT}× target), "
                     f"results differing by {c['rel_diff']:.1e}"
                     + ("" if c["equal"] else f" (not equal accuracy: above {EQUAL_ACCURACY:g})")
                     + ".")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# Thin shell: machine description, report, CSV, plot.


def library_version() -> str:
    found = _common.git_commit("bilevel", "hvp")
    if found is None:
        return "unknown (not a git checkout)"
    commit, dirty = found
    return commit + (" with uncommitted changes in bilevel/ or hvp/" if dirty else " (clean)")


def machine(load_before: tuple[float, ...]) -> dict[str, str]:
    device = jax.devices()[0]
    return {"platform": platform.platform(), "CPU": _common.cpu_model(),
            "cores": str(os.cpu_count()),
            "Python": platform.python_version(),
            "JAX": f"{jax.__version__} (jaxlib {jax.lib.__version__}), optax "
                   f"{optax.__version__}, jaxopt {importlib.metadata.version('jaxopt')}",
            "backend device": f"{jax.default_backend()}: {device.device_kind} "
                              f"(x{jax.device_count()})",
            "library at commit": library_version(),
            "load average (1 min) before / after":
                f"{load_before[0]:.2f} / {os.getloadavg()[0]:.2f}",
            "date (UTC)": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")}


CSV_FIELDS = ["part", "steps", "rel_diff", "note", "config", "mode", "checkpoint", "executed",
              "skip_reason",
              "temp_bytes", "output_bytes", "compile_s", "rounds", "median_s", "min_s",
              "memory_ratio_vs_reverse", "time_reference", "speedup_vs_reference",
              "grad_rel_diff_vs_reference", "outer_loss", "problem", "batch", "n_params",
              "damping", "cg_iters", "method", "time_ratio_vs_jaxopt", "memory_ratio_vs_jaxopt",
              "rel_diff_vs_jaxopt", "rel_error_vs_reference", "our_rel_residual", "our_status",
              "lambda_min", "lambda_max"]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot(path: Path, rows: list[dict[str, Any]], implicit: list[dict[str, Any]],
         title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (memory, wall, ratios) = plt.subplots(1, 3, figsize=(16, 4.8))
    styles = {"reverse": ("tab:red", "o"), "reverse+sqrt": ("tab:orange", "s"),
              "mixflow": ("tab:blue", "o"), "mixflow+sqrt": ("tab:cyan", "s")}
    for name, (color, marker) in styles.items():
        mine = sorted((r for r in rows if r["config"] == name), key=lambda r: r["steps"])
        steps = [r["steps"] for r in mine]
        memory.plot(steps, [r["temp_bytes"] / MiB for r in mine], color=color, marker=marker,
                    label=name)
        for r in mine:
            if not r["executed"]:
                memory.scatter([r["steps"]], [r["temp_bytes"] / MiB], s=160, facecolors="none",
                               edgecolors="k", zorder=3)
                memory.annotate("compiled, not run", (r["steps"], r["temp_bytes"] / MiB),
                                fontsize=7, xytext=(-90, 4), textcoords="offset points")
        ran = [r for r in mine if r["executed"]]
        wall.plot([r["steps"] for r in ran], [r["median_s"] for r in ran], color=color,
                  marker=marker, label=name)
    for axis, label in ((memory, "compiled temp memory (MiB)"), (wall, "median s per meta-grad")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        all_steps = sorted({r["steps"] for r in rows})
        axis.set_xticks(all_steps, [str(t) for t in all_steps])
        axis.set_xlabel("unrolled steps T")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    memory.set_title("Part A: memory vs T")
    wall.set_title("Part A: time vs T")
    labels = [f"{r['problem'].split()[0]}\nb={r['batch']}\n{r['method'].replace('bilevel ', '')}"
              for r in implicit if r["method"] != "jaxopt custom_root"]
    ours = [r for r in implicit if r["method"] != "jaxopt custom_root"]
    positions = np.arange(len(ours))
    ratios.bar(positions - 0.2, [r["time_ratio_vs_jaxopt"] for r in ours], 0.4, label="time")
    ratios.bar(positions + 0.2, [r["memory_ratio_vs_jaxopt"] for r in ours], 0.4,
               label="temp memory")
    ratios.axhline(1.0, color="0.3", lw=1)
    ratios.axhline(TARGET_IMPLICIT, color="tab:red", ls="--", lw=1,
                   label=f"time target ≤ {TARGET_IMPLICIT}×")
    ratios.set_xticks(positions, labels, fontsize=6)
    ratios.set_ylabel("bilevel.hypergrad / jaxopt custom_root")
    ratios.set_title(f"Part B: implicit, CG k={implicit[0]['cg_iters'] if implicit else '?'}")
    ratios.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(cfg: Config, args: argparse.Namespace, n_params: int, info: dict[str, str],
           rows: list[dict[str, Any]], float64: list[dict[str, Any]],
           implicit: list[dict[str, Any]], seconds: float) -> str:
    command = "python experiments/bench_unrolled.py " + " ".join(sys.argv[1:])
    smoke_note = ("\n\n**Smoke variant**: tiny sizes compiled with "
                  f"`XLA_FLAGS={SMOKE_XLA_FLAGS}` to check the pipeline; its numbers say nothing "
                  "about the library." if cfg is SMOKE else "")
    sizes = " → ".join(map(str, cfg.layer_sizes))
    grow = growth_checks(cfg, rows)
    rounds = ", ".join(f"T={t}: {rounds_at(cfg, args.repeats, t)}" for t in cfg.steps)
    return f"""# Unrolled (reverse vs MixFlow-MG) and implicit (vs jaxopt) gradients ({cfg.name})

Generated by `{command.strip()}` (seed {args.seed}) in {seconds:.0f} s. Numbers are from this
run; rerun the command to refresh them. Timings on a shared machine are noisy (see the load
average below); ratios are taken between candidates timed in the same rounds.{smoke_note}

## Machine

{markdown_table(["", ""], [[k, v] for k, v in info.items()])}

## A. Unrolled meta-gradients

`bilevel.unrolled_hypergrad(inner_loss, outer_loss, params0, hparams,
optimizer=optax.adam({cfg.inner_lr:g}), steps=T, inner_args=(x, y), outer_args=(x_val, y_val),
mode=..., checkpoint_every=...)` on a GELU MLP {sizes} ({n_params:,} float32 parameters),
full batch of {args.batch} synthetic examples (labels from a random linear teacher).
Inner loss: cross-entropy + Σ_l exp(λ_l)‖W_l‖²/2, one log-L2 strength λ_l per layer
(λ_l = {cfg.log_l2:.2f}); outer loss: cross-entropy on a second batch of {args.batch}.
Each configuration is jitted with all data as arguments and compiled ahead of time; memory is
the compiled executable's `temp_size_in_bytes` (and `+ output_size_in_bytes`). A configuration
whose temp memory exceeds {args.max_temp_gib:g} GiB (or 80% of the RAM free at that moment)
is compiled and reported but not run. Time: one warm-up call each (whose meta-gradients are
compared), then interleaved rounds in random order (at most {rounds}; fewer where the
warm-up round says the rounds would take more than about {cfg.round_budget_s:g} s; the
"rounds" column gives the number run). "speed-up" is the median over rounds of
time(reverse) / time(this), measured in the same rounds; where plain reverse did not run it
is against reverse+sqrt (named). "max rel. diff" is max_i |g_i − g_ref,i| / |g_ref,i| over
the {len(cfg.layer_sizes) - 1} hyperparameters, the reference being plain reverse (or
reverse+sqrt where plain reverse did not run). `"sqrt"` checkpointing stores every ⌈√T⌉-th
state and recomputes the segments in the backward pass.

{unrolled_table(rows)}

Agreement of the meta-gradients, float32 (above) against float64 (a fresh problem with batch
{max(1, args.batch // cfg.float64_batch_divisor)}, same seed and sizes; mixflow and reverse
without checkpointing, each compiled and run once):

{float64_table(rows, float64)}

Memory growth with T:

{growth_table(grow)}

{targets_table(unrolled_targets(rows), grow)}

## B. Implicit hypergradients: `bilevel.hypergrad` vs jaxopt `custom_root`

At an inner solution from {cfg.implicit_train_steps} full-batch Adam steps (learning rate
{cfg.implicit_lr:g}, λ_l = {cfg.implicit_log_l2:.2f}) both compute d L_out / dλ at the same
point with k = {cfg.cg_iters} CG iterations and `tol=0`: ours is
`bilevel.hypergrad(..., solver=hvp.CG(maxiter={cfg.cg_iters}, tol=0.0), mode=..., damping=δ)`;
jaxopt's is `jax.grad` through a `@custom_root(∇_θ L_in, solve=partial(solve_cg,
maxiter={cfg.cg_iters}, tol=0, ridge=δ))` solver that returns the given solution.
jaxopt differentiates the optimality function (the inner gradient) with `jax.vjp`, i.e.
reverse-over-reverse, linearised once per backward pass, and its `solve_cg` returns no
convergence information; ours reports a residual and status (below). Both spend k + 1 products
(jax's CG evaluates A·x0 once; ours evaluates the final residual). "logreg" is multinomial
logistic regression (convex; its unregularised bias leaves H singular along the softmax shift,
which CG tolerates); the MLP's Hessian is indefinite, so both solve with H + δI, δ being
{cfg.implicit_damping:g} or, where Lanczos finds λ_min(H) < −{cfg.implicit_damping / 2:g}, 2|λ_min|
rounded up to 0.05 (CG in both libraries assumes a positive-definite operator). "max rel.
error vs converged CG" compares with ours at CG(maxiter={cfg.reference_iters}, tol=1e-6).
Interleaved rounds after one warm-up: at most {cfg.implicit_repeats} (fewer where they would take
more than about {cfg.round_budget_s / 2:g} s; here {", ".join(str(r["rounds"]) for r in
implicit[::3])}); ratios are medians of per-round ratios.

{implicit_problem_table(implicit)}

{implicit_table(implicit)}

{implicit_targets_table(implicit_checks(implicit))}

## What this shows

{summary(cfg, rows, float64, implicit)}

![memory and time vs T; implicit ratios](bench_unrolled.png)
"""


# --------------------------------------------------------------------------------------------
# main


positive_int = _common.positive_int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results"),
                        help="folder for bench_unrolled.{md,csv,png} (default: "
                             "experiments/results)")
    parser.add_argument("--steps", type=positive_int, nargs="+", default=None,
                        help=f"unroll lengths T (default {' '.join(map(str, FULL.steps))})")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help=f"examples per batch (default {FULL.batch})")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help=f"timing rounds at the smallest T; ceil(repeats·√(Tmin/T)) at larger "
                             f"T (default {FULL.repeats})")
    parser.add_argument("--max-temp-gib", type=float, default=None,
                        help=f"do not run configurations above this compiled temp memory "
                             f"(default {FULL.max_temp_gib:g})")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed for data and init")
    parser.add_argument("--skip-implicit", action="store_true", help="run Part A only")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (about 30 s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    start, load_before = time.perf_counter(), os.getloadavg()
    args = parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    if args.smoke:
        # Takes effect only if no JAX backend has started yet in this process (the CLI case).
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + SMOKE_XLA_FLAGS).strip()
    cfg = dataclasses.replace(cfg, steps=tuple(sorted(set(args.steps or cfg.steps))),
                              batch=args.batch or cfg.batch)
    args.batch, args.repeats = cfg.batch, args.repeats or cfg.repeats
    args.max_temp_gib = cfg.max_temp_gib if args.max_temp_gib is None else args.max_temp_gib
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)

    problem = make_problem(jax.random.key(args.seed), cfg.layer_sizes, cfg.batch, cfg.log_l2)
    n_params = count_params(problem.params0)
    print(f"bench_unrolled ({cfg.name}): MLP {cfg.layer_sizes}, {n_params:,} parameters, batch "
          f"{cfg.batch}, T in {cfg.steps}, {jax.default_backend()} backend", flush=True)
    print("Part A: unrolled meta-gradients", flush=True)
    rows, float64 = measure_unrolled(cfg, problem, args.repeats, args.max_temp_gib * GiB,
                                     args.seed, rng)
    print("\n" + unrolled_table(rows) + "\n\n" + float64_table(rows, float64) + "\n\n"
          + growth_table(growth_checks(cfg, rows)) + "\n\n"
          + targets_table(unrolled_targets(rows), growth_checks(cfg, rows)) + "\n", flush=True)
    implicit = []
    if not args.skip_implicit:
        print(f"Part B: implicit hypergradients vs jaxopt (CG k={cfg.cg_iters})", flush=True)
        implicit = measure_implicit(cfg, cfg.batch, args.seed, rng)
        print("\n" + implicit_problem_table(implicit) + "\n\n" + implicit_table(implicit)
              + "\n\n" + implicit_targets_table(implicit_checks(implicit)) + "\n", flush=True)
    text = summary(cfg, rows, float64, implicit)
    print("What this shows: " + text + "\n", flush=True)
    info = machine(load_before)
    seconds = time.perf_counter() - start
    title = (f"bench_unrolled ({cfg.name}): MLP {n_params:,} params, batch {cfg.batch}, "
             f"{info['CPU']} x{info['cores']}, JAX {jax.__version__}")
    plot(args.out / "bench_unrolled.png", rows, implicit, title)
    write_csv(args.out / "bench_unrolled.csv", rows + float64 + implicit)
    (args.out / "bench_unrolled.md").write_text(
        report(cfg, args, n_params, info, rows, float64, implicit, seconds))
    print(f"wrote {args.out}/bench_unrolled.md, .csv, .png in {time.perf_counter() - start:.1f} s",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
