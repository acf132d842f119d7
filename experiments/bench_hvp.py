"""Benchmark: cost of curvature products and inverse-HVP solver accuracy per HVP on an MLP.

Part A times one gradient (the baseline) against the Hessian-vector product in each of the
library's modes (``fwd_rev``, ``rev_rev``, ``rev_fwd``) and against a hand-written
``jax.jvp(jax.grad(f))``, and reports compiled memory. Part B runs every inverse-HVP solver at a
range of budgets on the damped Hessian of a partly trained MLP and records the relative residual
``||b - A x|| / ||b||`` against the number of HVPs spent.

Usage::

    python experiments/bench_hvp.py                 # full run (a few minutes on 2 CPU cores)
    python experiments/bench_hvp.py --smoke --out /tmp/bench   # tiny variant (CI)

Writes ``bench_hvp.md``, ``bench_hvp.csv`` and ``bench_hvp.png`` into ``--out``.
Methodology follows DESIGN.md, "Measuring": data are passed to jitted functions as arguments,
times are medians after a warm-up with ``block_until_ready``, candidates are interleaved in
rounds (random order per round) and every time is a ratio to the gradient measured in the same
run; memory is ``temp + output`` bytes of ``jit(f).lower(*args).compile().memory_analysis()``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import functools
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import _common  # noqa: E402  (experiments/ is on sys.path when run as a script)
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import hvp

PyTree = Any


# --------------------------------------------------------------------------------------------
# Configuration: the full study and the smoke variant CI runs.


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    layer_sizes: tuple[int, ...]  # input, hidden..., classes
    batch: int
    train_steps: int  # Adam steps from init before Part B (so the point is not random)
    learning_rate: float
    repeats: int  # timing rounds in Part A
    warmup: int
    budgets: tuple[int, ...]  # maxiter (rank for Nystrom) in Part B
    damping: float
    lissa_batch: int
    lanczos_iters: int
    gmres_restart: int  # GMRES(restart=min(budget, gmres_restart))


FULL = Config(name="full", layer_sizes=(512, 512, 64, 10), batch=256, train_steps=100,
              learning_rate=3e-4, repeats=400, warmup=5, budgets=(1, 2, 5, 10, 20, 50, 100),
              damping=1e-2, lissa_batch=32, lanczos_iters=30, gmres_restart=25)
SMOKE = Config(name="smoke", layer_sizes=(16, 16, 8, 3), batch=32, train_steps=10,
               learning_rate=1e-2, repeats=5, warmup=1, budgets=(3,), damping=1e-2,
               lissa_batch=8, lanczos_iters=8, gmres_restart=25)

SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0"

PRODUCT_MODES = ("fwd_rev", "rev_rev", "rev_fwd")
HAND_WRITTEN = "jvp(grad) by hand"
GRADIENT = "gradient"
TARGET_VS_GRADIENT = 2.5  # fwd_rev <= 2.5x one gradient
TARGET_VS_HAND = 0.05  # the library's fwd_rev within 5% of the hand-written product


# --------------------------------------------------------------------------------------------
# Pure core: the model, the data, the loss.


init_mlp = _common.init_mlp


def mlp(params: PyTree, x: jax.Array) -> jax.Array:
    layers = [params[f"layer{i}"] for i in range(len(params))]
    for layer in layers[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ layers[-1]["w"] + layers[-1]["b"]


def loss(params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy."""
    return optax.softmax_cross_entropy_with_integer_labels(mlp(params, x), y).mean()


def make_data(key: jax.Array, teacher: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Gaussian inputs; labels sampled from a random linear teacher's softmax (learnable, noisy)."""
    k_x, k_y = jax.random.split(key)
    x = jax.random.normal(k_x, (n, teacher.shape[0]), jnp.float32)
    logits = 3.0 * x @ teacher / math.sqrt(teacher.shape[0])
    return x, jax.random.categorical(k_y, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(3, 4))
def train(params: PyTree, x: jax.Array, y: jax.Array, steps: int, lr: float) -> PyTree:
    """Full-batch Adam, so that Part B's point is a partly trained network, not a random one."""
    optimizer = optax.adam(lr)

    def step(_, state):
        params, opt_state = state
        updates, opt_state = optimizer.update(jax.grad(loss)(params, x, y), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.lax.fori_loop(0, steps, step, (params, optimizer.init(params)))[0]


class Problem(NamedTuple):
    params0: PyTree  # initial parameters (Part A's point)
    v: PyTree  # a random unit direction for the products
    x: jax.Array
    y: jax.Array
    x_val: jax.Array  # validation batch: b is the gradient of the loss on it
    y_val: jax.Array
    solve_key: jax.Array  # for the randomised solvers (Nystrom, LiSSA, power iteration)


@functools.partial(jax.jit, static_argnums=(1, 2))
def make_problem(key: jax.Array, sizes: tuple[int, ...], batch: int) -> Problem:
    """Everything random, from one key, in one compiled call (eager ops would each compile)."""
    k_init, k_teacher, k_train, k_val, k_v, k_solve = jax.random.split(key, 6)
    teacher = jax.random.normal(k_teacher, (sizes[0], sizes[-1]), jnp.float32)
    params0 = init_mlp(k_init, sizes)
    flat, unravel = ravel_pytree(params0)
    direction = jax.random.normal(k_v, flat.shape, flat.dtype)
    return Problem(params0, unravel(direction / jnp.linalg.norm(direction)),
                   *make_data(k_train, teacher, batch), *make_data(k_val, teacher, batch),
                   k_solve)


def tree_norm(tree: PyTree) -> float:
    """Euclidean norm of a pytree, on the host (in float64)."""
    return math.sqrt(sum(np.sum(np.square(np.asarray(leaf, np.float64)))
                         for leaf in jax.tree_util.tree_leaves(tree)))


def count_params(params: PyTree) -> int:
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))


# --------------------------------------------------------------------------------------------
# Part A: product cost.


def product_candidates() -> dict[str, tuple[Callable, bool]]:
    """name -> (function, takes the vector v); every function gets the data as arguments."""
    candidates = {GRADIENT: (lambda p, x, y: jax.grad(loss)(p, x, y), False)}
    for mode in PRODUCT_MODES:
        candidates[f"hvp.hvp {mode}"] = (
            lambda p, v, x, y, mode=mode: hvp.hvp(loss, p, v, x, y, mode=mode), True)
    candidates[HAND_WRITTEN] = (
        lambda p, v, x, y: jax.jvp(jax.grad(lambda q: loss(q, x, y)), (p,), (v,))[1], True)
    return candidates


def optimized_hlo(compiled: Any) -> str:
    """The optimised HLO without debug information (source locations, names of the module)."""
    debug_sections = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
    blocks = [block for block in compiled.as_text().split("\n\n")
              if block.split("\n", 1)[0].strip() not in debug_sections]
    text = re.sub(r",? ?metadata=\{[^}]*\}", "", "\n\n".join(blocks))
    return re.sub(r"HloModule \S+", "HloModule m", text)


def compile_with_stats(fun: Callable, args: tuple) -> tuple[Callable, dict[str, Any]]:
    """``jit(fun)`` compiled for ``args``, with its memory (temp + output bytes), XLA FLOPs and
    optimised HLO."""
    compiled = jax.jit(fun).lower(*args).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    return compiled, {"memory_bytes": memory.temp_size_in_bytes + memory.output_size_in_bytes,
                      "flops": flops, "hlo": optimized_hlo(compiled)}


def time_interleaved(calls: dict[str, Callable[[], Any]], rounds: int, warmup: int,
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-call wall times; each round calls every candidate once, in a fresh random order."""
    for _ in range(warmup):
        for call in calls.values():
            jax.block_until_ready(call())
    return _common.timed_rounds(calls, rounds, rng)


def paired_ratio(num: np.ndarray, den: np.ndarray, rng: np.random.Generator,
                 resamples: int = 2000) -> tuple[float, float, float]:
    """Median of per-round ratios and a bootstrap 95% interval of that median."""
    ratios = num / den
    boot = np.median(rng.choice(ratios, (resamples, ratios.size)), axis=1)
    return float(np.median(ratios)), *map(float, np.percentile(boot, [2.5, 97.5]))


def measure_products(cfg: Config, params: PyTree, v: PyTree, x: jax.Array, y: jax.Array,
                     repeats: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    calls, stats = {}, {}
    for name, (fun, takes_v) in product_candidates().items():
        args = (params, v, x, y) if takes_v else (params, x, y)
        compiled, stats[name] = compile_with_stats(fun, args)
        calls[name] = lambda compiled=compiled, args=args: compiled(*args)
    times = time_interleaved(calls, repeats, cfg.warmup, rng)
    rows = []
    hand_hlo = stats[HAND_WRITTEN]["hlo"]
    for name in calls:
        stats[name]["same_hlo_as_hand"] = stats[name].pop("hlo") == hand_hlo
        ratio, low, high = paired_ratio(times[name], times[GRADIENT], rng)
        hand, hand_low, hand_high = paired_ratio(times[name], times[HAND_WRITTEN], rng)
        quartiles = np.percentile(times[name], [25, 75]) * 1e3
        rows.append(dict(part="A", name=name, median_ms=float(np.median(times[name]) * 1e3),
                         iqr_ms=f"{quartiles[0]:.2f}-{quartiles[1]:.2f}",
                         ratio_to_gradient=ratio, ratio_ci=(low, high), ratio_to_hand=hand,
                         ratio_to_hand_ci=(hand_low, hand_high), **stats[name]))
    return rows


# --------------------------------------------------------------------------------------------
# Part B: solver residual against HVP count.


def solver_grid(cfg: Config, lambda_max: float) -> list[tuple[str, int, hvp.AbstractSolver]]:
    """(family, budget, solver); tol=0 makes the iterative solvers spend their whole budget."""
    grid = []
    for m in cfg.budgets:
        grid += [("CG", m, hvp.CG(maxiter=m, tol=0.0)),
                 ("MINRES", m, hvp.MINRES(maxiter=m, tol=0.0)),
                 ("GMRES", m, hvp.GMRES(maxiter=m, restart=min(m, cfg.gmres_restart), tol=0.0)),
                 ("Neumann", m, hvp.Neumann(maxiter=m, alpha=None, tol=0.0)),
                 ("Nystrom", m, hvp.Nystrom(rank=m, rho=cfg.damping)),
                 ("LiSSA", m, hvp.LiSSA(maxiter=m, batch_size=cfg.lissa_batch))]
    grid += [("Identity(1)", 0, hvp.Identity(scale=1.0)),
             ("Identity(1/λmax)", 0, hvp.Identity(scale=1.0 / lambda_max))]
    return grid


def run_solver(solver: hvp.AbstractSolver, operator: hvp.LinearOperator, b: PyTree,
               key: jax.Array) -> tuple[PyTree, hvp.SolveInfo, float]:
    """Compile, then time one call; the operator (point and data) is a jit argument."""
    compiled = jax.jit(lambda op, b, key: hvp.solve(op, b, solver, key=key,
                                                    on_failure="ignore")).lower(
        operator, b, key).compile()
    start = time.perf_counter()
    x, info = jax.block_until_ready(compiled(operator, b, key))
    return x, info, time.perf_counter() - start


def measure_solvers(cfg: Config, operator: hvp.HessianOperator, b: PyTree, lambda_max: float,
                    key: jax.Array) -> list[dict[str, Any]]:
    b_norm = tree_norm(b)
    residual = jax.jit(lambda op, x, b: jnp.linalg.norm(ravel_pytree(
        jax.tree_util.tree_map(jnp.subtract, b, op.mv(x)))[0]))
    rows = []
    for family, budget, solver in solver_grid(cfg, lambda_max):
        x, info, seconds = run_solver(solver, operator, b, key)
        reported = float(info.residual_norm) / b_norm
        recomputed = float(residual(operator, x, b)) / b_norm
        rows.append(dict(part="B", name=family, budget=budget, hvp_count=int(info.hvp_count),
                         iterations=int(info.iterations), rel_residual=reported,
                         rel_residual_recomputed=recomputed,
                         status=hvp.Status(int(info.status)).name, time_s=seconds))
        print(f"  {family:>16} budget {budget:>3}: {int(info.hvp_count):>4} HVPs, "
              f"rel. residual {reported:.3e}, {rows[-1]['status']}, {seconds:.2f} s", flush=True)
    return rows


def spectra(cfg: Config, operators: dict[str, hvp.LinearOperator]) -> dict[str, hvp.Spectrum]:
    lanczos = jax.jit(lambda op: hvp.extreme_eigenvalues(op, maxiter=cfg.lanczos_iters))
    return {name: jax.device_get(lanczos(op)) for name, op in operators.items()}


# --------------------------------------------------------------------------------------------
# Thin shell: machine description, tables, report, plot.


def library_version() -> str:
    """The commit the ``hvp`` package was imported from, and whether it has local changes."""
    found = _common.git_commit("hvp")
    if found is None:
        return "unknown (not a git checkout)"
    commit, dirty = found
    return commit + (" with uncommitted changes in hvp/" if dirty else " (hvp/ clean)")


def machine(load_before: tuple[float, ...], library: str) -> dict[str, str]:
    device = jax.devices()[0]
    load_after = os.getloadavg()
    return {"platform": platform.platform(), "CPU": _common.cpu_model(),
            "cores": str(os.cpu_count()), "Python": platform.python_version(),
            "JAX": f"{jax.__version__} (jaxlib {jax.lib.__version__})",
            "backend device": f"{jax.default_backend()}: {device.device_kind} "
                              f"(x{jax.device_count()})",
            "hvp at commit": library,
            "load average (1 min) before / after": f"{load_before[0]:.2f} / {load_after[0]:.2f}",
            "date (UTC)": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "**pass**" if ok else "**FAIL**"


def product_table(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        low, high = r["ratio_ci"]
        hand_low, hand_high = r["ratio_to_hand_ci"]
        body.append([r["name"], f"{r['median_ms']:.2f}", r["iqr_ms"],
                     f"{r['ratio_to_gradient']:.2f} [{low:.2f}, {high:.2f}]",
                     f"{r['ratio_to_hand']:.3f} [{hand_low:.3f}, {hand_high:.3f}]",
                     f"{r['flops'] / 1e6:.1f}", f"{r['memory_bytes'] / 2**20:.2f}",
                     "yes" if r["same_hlo_as_hand"] else "no"])
    return markdown_table(["candidate", "median ms", "IQR ms", "× gradient [95% CI]",
                           "× hand-written [95% CI]", "MFLOP (XLA)", "temp+out MiB",
                           "HLO = hand-written"], body)


def product_targets(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    by_name = {r["name"]: r for r in rows}
    fwd = by_name["hvp.hvp fwd_rev"]
    vs_grad, vs_hand = fwd["ratio_to_gradient"], fwd["ratio_to_hand"]
    hand_low, hand_high = fwd["ratio_to_hand_ci"]
    checks = {"vs_grad_ok": vs_grad <= TARGET_VS_GRADIENT,
              "vs_hand_ok": abs(vs_hand - 1.0) <= TARGET_VS_HAND,
              "vs_hand_ci_ok": hand_low >= 1 - TARGET_VS_HAND and hand_high <= 1 + TARGET_VS_HAND}
    table = markdown_table(["target", "measured", "verdict"], [
        [f"hvp.hvp fwd_rev ≤ {TARGET_VS_GRADIENT}× one gradient", f"{vs_grad:.2f}×",
         verdict(checks["vs_grad_ok"])],
        [f"hvp.hvp fwd_rev within {TARGET_VS_HAND:.0%} of hand-written jvp(grad)",
         f"{vs_hand:.3f}× (95% CI {hand_low:.3f}-{hand_high:.3f})",
         verdict(checks["vs_hand_ok"]) + ("" if checks["vs_hand_ci_ok"] else
                                          " (CI not inside ±5%)")],
    ])
    return table, checks


def spectrum_table(cfg: Config, spectrum: dict[str, hvp.Spectrum]) -> str:
    body = [[name, f"{float(s.lambda_min):.4g}", f"{float(s.lambda_max):.4g}",
             f"{float(s.error_bounds[0]):.2g}", f"{float(s.error_bounds[-1]):.2g}",
             str(int(s.hvp_count))] for name, s in spectrum.items()]
    return markdown_table(["operator", "λ_min (Lanczos)", "λ_max (Lanczos)", "bound on λ_min",
                           "bound on λ_max", "HVPs"], body)


def solver_table(rows: list[dict[str, Any]]) -> str:
    body = [[r["name"], str(r["budget"]), str(r["hvp_count"]), str(r["iterations"]),
             f"{r['rel_residual']:.3e}", f"{r['rel_residual_recomputed']:.3e}", r["status"],
             f"{r['time_s']:.3f}"] for r in rows]
    return markdown_table(["solver", "budget", "HVPs (info)", "iterations",
                           "‖b−Ax‖/‖b‖ (info)", "recomputed", "status", "wall s"], body)


def residual_mismatches(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Solves whose reported residual disagrees with one recomputed here (beyond float32 noise)."""
    return [r for r in rows if not abs(r["rel_residual"] - r["rel_residual_recomputed"])
            <= 0.01 * r["rel_residual_recomputed"] + 1e-5]


def best_by_family(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    best = {}
    for r in rows:
        incumbent = best.get(r["name"])
        if math.isfinite(r["rel_residual"]) and (
                incumbent is None or r["rel_residual"] < incumbent["rel_residual"]):
            best[r["name"]] = r
    return best


def products_summary(n_params: int, products: list[dict[str, Any]],
                     checks: dict[str, Any]) -> str:
    by_name = {r["name"]: r for r in products}
    fwd, hand = by_name["hvp.hvp fwd_rev"], by_name[HAND_WRITTEN]
    low, high = fwd["ratio_to_hand_ci"]
    memory = ", ".join(f"{by_name['hvp.hvp ' + m]['memory_bytes'] / 2**20:.1f} MiB ({m})"
                       for m in PRODUCT_MODES)
    same = ("compiles to the same optimised HLO as" if fwd["same_hlo_as_hand"] else
            "compiles to a different optimised HLO from")
    return (
        f"On this {n_params:,}-parameter MLP one forward-over-reverse HVP (`hvp.hvp`, fwd_rev) "
        f"costs {fwd['ratio_to_gradient']:.2f}× a gradient "
        f"({'within' if checks['vs_grad_ok'] else 'above'} the {TARGET_VS_GRADIENT}× target); "
        f"rev_rev costs "
        f"{by_name['hvp.hvp rev_rev']['ratio_to_gradient']:.2f}× and rev_fwd "
        f"{by_name['hvp.hvp rev_fwd']['ratio_to_gradient']:.2f}×. Compiled temp+output memory is "
        f"{memory}, against {by_name[GRADIENT]['memory_bytes'] / 2**20:.1f} MiB for the gradient. "
        f"The library's fwd_rev {same} the hand-written `jax.jvp(jax.grad(f))` "
        f"({fwd['flops'] / 1e6:.1f} vs {hand['flops'] / 1e6:.1f} MFLOP) and runs at "
        f"{fwd['ratio_to_hand']:.3f}× its time (95% CI {low:.3f}-{high:.3f}), "
        + ("within the 5% target: its input checks run at trace time and cost nothing per call."
           if checks["vs_hand_ok"] else "outside the 5% target.")
        + ("" if checks["vs_hand_ci_ok"] or not checks["vs_hand_ok"] else
           " The interval is not entirely inside ±5%: timing noise on a shared 2-core machine.")
    )


def spectrum_summary(cfg: Config, spectrum: dict[str, hvp.Spectrum]) -> str:
    undamped, damped = spectrum["Hessian"], spectrum[f"Hessian + {cfg.damping:g}·I"]
    lam_min, lam_max = float(undamped.lambda_min), float(undamped.lambda_max)
    damped_min, damped_max = float(damped.lambda_min), float(damped.lambda_max)
    after = ("indefinite even after damping, so CG's and Neumann's assumptions fail"
             if damped_min < 0 else
             f"positive definite after damping (condition number ≈ {damped_max / damped_min:.3g})")
    return (f"After {cfg.train_steps} Adam steps the Hessian is "
            f"{'indefinite' if lam_min < 0 else 'positive semi-definite as far as Lanczos sees'} "
            f"(Lanczos: λ_min ≈ {lam_min:.3g}, λ_max ≈ {lam_max:.3g}); with damping "
            f"{cfg.damping:g} the operator's λ_min ≈ {damped_min:.3g}: {after}.")


def solvers_summary(cfg: Config, solves: list[dict[str, Any]]) -> str:
    largest = max(cfg.budgets)
    at_largest = {r["name"]: r for r in solves if r["budget"] == largest}
    ranked = sorted(at_largest.values(), key=lambda r: r["rel_residual"]
                    if math.isfinite(r["rel_residual"]) else math.inf)
    best = best_by_family(solves)
    parts = [
        f"At budget {largest} the lowest relative residuals are "
        + ", ".join(f"{r['name']} {r['rel_residual']:.2e} ({r['status'].lower()}, "
                    f"{r['hvp_count']} HVPs)" for r in ranked[:3])
        + f"; the highest is {ranked[-1]['name']} at {ranked[-1]['rel_residual']:.2e} "
        f"({ranked[-1]['status'].lower()})."]
    for family, last in at_largest.items():
        top = best.get(family)
        if top is not None and last["rel_residual"] > 10 * top["rel_residual"]:
            parts.append(f"{family} gets worse with more budget: its best residual, "
                         f"{top['rel_residual']:.2e} at {top['hvp_count']} HVPs, becomes "
                         f"{last['rel_residual']:.2e} at {last['hvp_count']} "
                         f"({last['status'].lower()}).")
    statuses = {family: sorted({r["status"].lower() for r in solves if r["name"] == family})
                for family in ("CG", "Neumann", "LiSSA") if family in at_largest}
    parts.append("Statuses seen: " + "; ".join(f"{family} {', '.join(found)}"
                                               for family, found in statuses.items())
                 + f". LiSSA's products each use {cfg.lissa_batch} of {cfg.batch} examples, so "
                 "its HVP count overstates its cost. The Identity look-ahead leaves "
                 + ", ".join(f"{r['rel_residual']:.2e} ({r['name']})" for r in solves
                             if r["name"].startswith("Identity")) + ".")
    worse_than_zero = [r for r in at_largest.values() if r["rel_residual"] > 1
                       and r["status"] in ("CONVERGED", "MAX_ITERATIONS")]
    if worse_than_zero:
        parts.append("Worse than x = 0 yet not flagged as a failure: " + ", ".join(
            f"{r['name']} ({r['rel_residual']:.3g}·‖b‖, status {r['status'].lower()})"
            for r in worse_than_zero) + " — solvers without a tol report only finiteness, and "
            "the series solvers flag DIVERGED only past divergence·‖b‖ (default 1e4).")
    mismatches = residual_mismatches(solves)
    parts.append("Every reported residual agrees with one recomputed here from the returned x."
                 if not mismatches else
                 f"{len(mismatches)} reported residual(s) disagree with the recomputed one: "
                 + ", ".join(f"{r['name']}@{r['budget']}" for r in mismatches) + ".")
    return " ".join(parts)


def write_csv(path: Path, products: list[dict[str, Any]], solves: list[dict[str, Any]]) -> None:
    fields = ["part", "name", "median_ms", "ratio_to_gradient", "ratio_to_hand", "flops",
              "memory_bytes", "budget", "hvp_count", "iterations", "rel_residual",
              "rel_residual_recomputed", "status", "time_s"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(products + solves)


def plot(path: Path, products: list[dict[str, Any]], solves: list[dict[str, Any]],
         title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    names = [r["name"].replace("hvp.hvp ", "") for r in products]
    ratios = [r["ratio_to_gradient"] for r in products]
    errors = np.array([[r["ratio_to_gradient"] - r["ratio_ci"][0],
                        r["ratio_ci"][1] - r["ratio_to_gradient"]] for r in products]).T
    left.bar(names, ratios, yerr=errors, capsize=3,
             color=["0.6"] + ["tab:blue"] * len(PRODUCT_MODES) + ["tab:orange"])
    left.axhline(TARGET_VS_GRADIENT, color="tab:red", ls="--", lw=1,
                 label=f"target fwd_rev ≤ {TARGET_VS_GRADIENT}×")
    for i, ratio in enumerate(ratios):
        left.text(i, ratio, f"{ratio:.2f}", ha="center", va="bottom", fontsize=8)
    left.set_ylabel("median time / one gradient")
    left.set_title("Part A: product cost")
    left.tick_params(axis="x", labelrotation=20)
    left.legend(fontsize=8)

    for family in dict.fromkeys(r["name"] for r in solves):
        rows = [r for r in solves if r["name"] == family and math.isfinite(r["rel_residual"])]
        counts = [r["hvp_count"] for r in rows]
        residuals = [max(r["rel_residual"], 1e-12) for r in rows]
        if family.startswith("Identity"):
            right.scatter(counts, residuals, marker="*", s=80, label=family, zorder=3)
        else:
            right.plot(counts, residuals, marker="o", ms=3,
                       ls="--" if family == "LiSSA" else "-",
                       label=family + (" (minibatch HVPs)" if family == "LiSSA" else ""))
    failed = [r for r in solves if r["status"] not in ("CONVERGED", "MAX_ITERATIONS")]
    if failed:
        right.scatter([r["hvp_count"] for r in failed],
                      [max(r["rel_residual"], 1e-12) for r in failed], marker="x", s=60,
                      color="black", zorder=4, label="stopped: " + ", ".join(
                          sorted({r["status"].lower().replace("_", " ") for r in failed})))
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("HVPs (info.hvp_count, residual check included)")
    right.set_ylabel("‖b − Ax‖ / ‖b‖")
    right.set_title("Part B: solver residual vs HVP count")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(cfg: Config, args: argparse.Namespace, n_params: int, info: dict[str, str],
           sections: dict[str, str], summary_text: str, seconds: float) -> str:
    command = "python experiments/bench_hvp.py " + " ".join(sys.argv[1:])
    machine_table = markdown_table(["", ""], [[k, v] for k, v in info.items()])
    smoke_note = ("\n\n**Smoke variant**: a tiny model compiled with "
                  f"`XLA_FLAGS={SMOKE_XLA_FLAGS}` to check the pipeline quickly; its timings and "
                  "residuals say nothing about the library." if cfg is SMOKE else "")
    sizes = " → ".join(map(str, cfg.layer_sizes))
    return f"""# HVP products and inverse-HVP solvers on an MLP ({cfg.name})

Generated by `{command.strip()}` (seed {args.seed}, {args.repeats} timing rounds) in
{seconds:.0f} s. Numbers are from this run; rerun the command to refresh them.{smoke_note}

## Machine

{machine_table}

## Problem

MLP {sizes} with tanh, {n_params:,} float32 parameters in a dict of layers; mean softmax
cross-entropy on a synthetic batch of {cfg.batch} Gaussian inputs whose labels are sampled from
a random linear teacher (explicit PRNG key from `--seed`). Part A uses the initial parameters
and a random unit direction v; Part B uses the point after {cfg.train_steps} full-batch Adam
steps (learning rate {cfg.learning_rate:g}).

## A. Product cost

Median wall time per call over {args.repeats} rounds after {cfg.warmup} warm-up rounds; each
round calls every candidate once in a random order (drift and background load hit all of them
alike). Ratios are medians of the per-round ratios, with a bootstrap 95% interval. Every
candidate is jitted with the parameters, v and the data passed as arguments. Memory is
`temp_size_in_bytes + output_size_in_bytes` of the compiled executable.

{sections['products']}

{sections['targets']}

## B. Solver residual against HVP count

Operator `hvp.hessian(loss, params, x, y, damping={cfg.damping:g}, batch_argnums=(0, 1))` at
the trained point; right-hand side b = gradient of the loss on a second synthetic (validation)
batch. An MLP's Hessian is in general indefinite (see the Lanczos estimates below for this
point); where the damped operator is too, CG's assumption of positive definiteness does not hold
and Neumann's series diverges. Damping shifts the spectrum by {cfg.damping:g}.
CG, MINRES, GMRES and Neumann run with `tol=0`, so they spend their whole budget unless they
stop on a breakdown; GMRES uses `restart=min(budget, {cfg.gmres_restart})`; Neumann and LiSSA
pick α from power iteration (its products are counted); Nyström uses `rho={cfg.damping:g}` and
the budget as its rank; LiSSA draws minibatches of {cfg.lissa_batch} of {cfg.batch} examples,
so its HVPs are each about {cfg.lissa_batch / cfg.batch:.2g} of a full one. "recomputed" is
‖b − A x‖/‖b‖ evaluated here from the returned x, as a check on `info`. Wall time is one call
after compilation.

No dense reference: the operator has {n_params:,} rows, so materialising it would take
{n_params:,} HVPs and {n_params**2 * 4 / 2**30:,.0f} GiB in float32
({n_params**2 * 8 / 2**30:,.0f} GiB in float64); `hvp.Dense` refuses operators above
{hvp.DEFAULT_DENSE_LIMIT} rows.

{sections['spectrum']}

{sections['solvers']}

## What this shows

{summary_text}

![product cost and solver residuals](bench_hvp.png)
"""


# --------------------------------------------------------------------------------------------
# main


positive_int = _common.positive_int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results"),
                        help="folder for bench_hvp.{md,csv,png} (default: experiments/results)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed for data, init and v")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help=f"timing rounds in Part A (default {FULL.repeats}, "
                             f"smoke {SMOKE.repeats})")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny MLP, few repeats, tiny budgets (about 20 s; used by a test)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    start, load_before, library = time.perf_counter(), os.getloadavg(), library_version()
    args = parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    if args.smoke:
        # Compile fast: the smoke run checks the pipeline, its timings mean nothing. Takes effect
        # only if no JAX backend has started yet in this process (the CLI case).
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + SMOKE_XLA_FLAGS).strip()
    args.repeats = args.repeats or cfg.repeats
    args.out.mkdir(parents=True, exist_ok=True)

    problem = make_problem(jax.random.key(args.seed), cfg.layer_sizes, cfg.batch)
    params0, v, x, y, x_val, y_val, solve_key = problem
    n_params = count_params(params0)
    print(f"bench_hvp ({cfg.name}): MLP {cfg.layer_sizes}, {n_params:,} parameters, "
          f"batch {cfg.batch}, {jax.default_backend()} backend", flush=True)

    print(f"Part A: {len(product_candidates())} candidates x {args.repeats} rounds", flush=True)
    products = measure_products(cfg, params0, v, x, y, args.repeats, args.seed)
    sections = {"products": product_table(products)}
    sections["targets"], checks = product_targets(products)
    print(sections["products"] + "\n\n" + sections["targets"] + "\n", flush=True)

    print(f"Part B: {cfg.train_steps} Adam steps, then solves", flush=True)
    params = train(params0, x, y, cfg.train_steps, cfg.learning_rate)
    jit_loss = jax.jit(loss)
    print(f"  train loss {float(jit_loss(params0, x, y)):.4f} -> "
          f"{float(jit_loss(params, x, y)):.4f}, validation loss "
          f"{float(jit_loss(params, x_val, y_val)):.4f}", flush=True)
    b = jax.jit(jax.grad(loss))(params, x_val, y_val)
    operator = hvp.hessian(loss, params, x, y, damping=cfg.damping, batch_argnums=(0, 1))
    spectrum = spectra(cfg, {"Hessian": hvp.hessian(loss, params, x, y),
                             f"Hessian + {cfg.damping:g}·I": operator})
    sections["spectrum"] = spectrum_table(cfg, spectrum)
    print(sections["spectrum"] + "\n", flush=True)
    print(f"  no dense reference: {n_params:,} rows ({n_params**2 * 4 / 2**30:,.0f} GiB in "
          f"float32, {n_params:,} HVPs to materialise)", flush=True)
    lambda_max = float(spectrum[f"Hessian + {cfg.damping:g}·I"].lambda_max)
    solves = measure_solvers(cfg, operator, b, lambda_max, solve_key)
    sections["solvers"] = solver_table(solves)
    print("\n" + sections["solvers"] + "\n", flush=True)

    summary_text = "\n\n".join([products_summary(n_params, products, checks),
                                spectrum_summary(cfg, spectrum), solvers_summary(cfg, solves)])
    print("What this shows: " + summary_text + "\n", flush=True)
    info = machine(load_before, library)
    seconds = time.perf_counter() - start
    title = (f"bench_hvp ({cfg.name}): MLP {n_params:,} params, batch {cfg.batch}, "
             f"{info['CPU']} x{info['cores']}, JAX {jax.__version__}")
    plot(args.out / "bench_hvp.png", products, solves, title)
    write_csv(args.out / "bench_hvp.csv", products, solves)
    (args.out / "bench_hvp.md").write_text(
        report(cfg, args, n_params, info, sections, summary_text, seconds))
    print(f"wrote {args.out}/bench_hvp.md, .csv, .png in {time.perf_counter() - start:.1f} s",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
