"""The ``bilevel`` command line: a thin shell over the library.

``bilevel compare-hvp`` measures inverse-HVP approximations inside the implicit hypergradient
against an exact float64 reference. The measuring is :func:`compare_hvp`, a function of a
:class:`CompareHvpConfig` that returns rows (plain dicts); argument parsing, the progress bar,
the table and the files live in the shell functions below it.

Subcommands are entries of :data:`COMMANDS` (a name, a help line, a function that adds its
arguments to an ``argparse`` parser and a function that runs it); a nested command such as
``bilevel lopt train`` is an entry whose ``add_arguments`` adds its own subparsers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import importlib
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel
import hvp
from bilevel._argtypes import nonnegative_float as _nonnegative_float
from bilevel._argtypes import positive_float as _positive_float
from bilevel._argtypes import positive_int as _positive_int
from bilevel.problems import PROBLEMS

PyTree = Any

# --------------------------------------------------------------------------------------------
# compare-hvp: configuration

#: Solver names accepted by ``--solvers``, in table order.
SOLVERS = ("cg", "minres", "gmres", "neumann", "nystrom", "lissa", "identity",
           "unrolled-mixflow", "unrolled-reverse")
DEFAULT_SOLVERS = ("cg", "minres", "neumann", "nystrom", "lissa", "identity", "unrolled-mixflow")
DEFAULT_BUDGETS = (1, 5, 10, 20, 50)
#: Tikhonov damping of the approximations' Hessian. The digits MLP's Hessian at θ* has
#: eigenvalues in about [1.6e-3, 0.77]; with δ = 1e-4 the exact damped solve is 1.4e-3 (relative)
#: from the undamped reference, while δ = 1e-3 would put that floor at 1.3e-2, above what CG
#: reaches in 20 HVPs.
DEFAULT_DAMPING = 1e-4
MODES = ("fwd_rev", "rev_rev", "rev_fwd")
DTYPES = ("float32", "float64")
#: Products of power iteration for the fixed λ_max estimate behind α (Neumann, LiSSA, Identity,
#: the unrolled learning rate).
POWER_ITERS = 50


class ConfigError(ValueError):
    """A bad setting found before any measuring starts (the shell prints it as a usage error)."""


@dataclasses.dataclass(frozen=True)
class CompareHvpConfig:
    """Settings of :func:`compare_hvp`; the CLI options map one to one onto these fields.

    Attributes:
      problem: a name from :data:`bilevel.PROBLEMS`.
      solvers: names from :data:`SOLVERS`.
      budgets: HVP budgets (each >= 1); see :func:`solver_setting` for how a budget becomes a
        solver's knob.
      damping: δ >= 0; the approximations solve with ``H + δI``, the reference with ``H``.
      mode: product mode of the HVPs and the cross product.
      seed: seed of the problem's data and of the randomised solvers.
      repeats: timed calls per variant (after one warm-up call); the median is reported.
      dtype: dtype the approximations run in ("float32" or "float64"); the reference is float64.
      lissa_batch: LiSSA's minibatch size (capped at the number of training examples).
      jobs: threads compiling the variants' programs at once (default: the CPU count).
      nystrom_rho: Nyström's ρ; None means ``λ̂_max / 10``. ρ is the inverse scale given to the
        directions the sketch misses; with ρ = λ̂_max/100 the digits MLP's hypergradient came out
        about 10 times too large (relative error ~11 at every rank up to 50).
    """

    problem: str = "digits_mlp"
    solvers: tuple[str, ...] = DEFAULT_SOLVERS
    budgets: tuple[int, ...] = DEFAULT_BUDGETS
    damping: float = DEFAULT_DAMPING
    mode: str = "fwd_rev"
    seed: int = 0
    repeats: int = 3
    dtype: str = "float32"
    lissa_batch: int = 32
    nystrom_rho: float | None = None
    jobs: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)


def check_config(config: CompareHvpConfig) -> None:
    """Raise :class:`ConfigError` for settings that cannot run (before anything is computed)."""
    if config.problem not in PROBLEMS:
        raise ConfigError(f"unknown problem {config.problem!r}; known problems: "
                          f"{', '.join(sorted(PROBLEMS))}")
    unknown = [s for s in config.solvers if s not in SOLVERS]
    if unknown or not config.solvers:
        raise ConfigError(f"unknown solver {unknown[0] if unknown else ''!r}; choose from "
                          f"{', '.join(SOLVERS)}")
    if not config.budgets or any(not isinstance(b, int) or b < 1 for b in config.budgets):
        raise ConfigError(f"budgets must be integers >= 1, got {config.budgets}")
    if not (math.isfinite(config.damping) and config.damping >= 0):
        raise ConfigError(f"damping must be a finite number >= 0, got {config.damping}")
    if config.mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {config.mode!r}")
    if config.dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
    if config.repeats < 1 or config.lissa_batch < 1 or config.jobs < 1:
        raise ConfigError("repeats, lissa_batch and jobs must be >= 1")
    if config.nystrom_rho is not None and not (0 < config.nystrom_rho < math.inf):
        raise ConfigError(f"nystrom_rho must be a finite number > 0, got {config.nystrom_rho}")


def check_problem(config: CompareHvpConfig, problem) -> None:
    """Raise :class:`ConfigError` for solvers the built ``problem`` cannot serve (before its
    inner solve): LiSSA needs per-example data (``problem.batch_argnums``) to subsample."""
    if "lissa" in config.solvers and not problem.batch_argnums:
        raise ConfigError(f"lissa needs per-example data to subsample; problem "
                          f"{config.problem!r} has none (its batch_argnums is empty)")


# --------------------------------------------------------------------------------------------
# compare-hvp: the pure core


class Setup(NamedTuple):
    """What every variant shares: the problem at θ*, the reference and the fixed step α."""
    problem: Any  # BilevelProblem in float64
    arguments: tuple  # (θ*, λ, inner_args, outer_args, δ) in the approximations' dtype
    reference: PyTree  # exact float64 hypergradient (undamped)
    damping_floor: float  # relative error of the exact *damped* hypergradient
    lambda_max: float  # power-iteration estimate on H + δI
    alpha: float  # 1 / lambda_max
    rho: float  # Nyström's ρ
    rhs_norm: float  # ||∇_θ L_out(θ*)||, for relative residuals
    num_params: int


def solver_setting(name: str, budget: int, setup: Setup, config: CompareHvpConfig
                   ) -> tuple[Any, str]:
    """The solver (or unroll length) for an HVP budget, and the knob as text.

    Krylov methods (CG, MINRES, GMRES) spend one product per iteration plus one for the true
    residual, so they get ``maxiter = budget − 1`` (at least 1) and ``tol = 0``: hvp_count =
    budget. Series and sketches get ``budget`` terms / rank / depth and report one more product
    (the residual diagnostic): Neumann and LiSSA with the fixed step ``α = 1/λ̂_max`` (no power
    iterations inside), Nyström with rank = budget. GMRES is split into restart cycles of at most
    20 so that ``cycles · (restart + 1) <= budget``. An unrolled meta-gradient of T steps costs
    T HVP-equivalents in its backward pass (plus T gradients forward), so T = budget.
    """
    iterations = max(budget - 1, 1)
    if name == "cg":
        return hvp.CG(maxiter=iterations, tol=0.0), f"maxiter={iterations}"
    if name == "minres":
        return hvp.MINRES(maxiter=iterations, tol=0.0), f"maxiter={iterations}"
    if name == "gmres":
        cycles = math.ceil(budget / 21)
        restart = max(budget // cycles - 1, 1)
        return (hvp.GMRES(maxiter=restart * cycles, restart=restart, tol=0.0),
                f"restart={restart}x{cycles}")
    if name == "neumann":
        return (hvp.Neumann(maxiter=budget, alpha=setup.alpha, tol=0.0),
                f"terms={budget} alpha={setup.alpha:.3g}")
    if name == "lissa":
        batch = min(config.lissa_batch, _num_examples(setup.problem))
        return (hvp.LiSSA(maxiter=budget, batch_size=batch, alpha=setup.alpha, seed=config.seed),
                f"depth={budget} batch={batch}")
    if name == "nystrom":
        return (hvp.Nystrom(rank=budget, rho=setup.rho, seed=config.seed),
                f"rank={budget} rho={setup.rho:.3g}")
    if name == "identity":
        return hvp.Identity(scale=setup.alpha), f"scale=1/lambda_max={setup.alpha:.3g}"
    if name.startswith("unrolled-"):
        return budget, f"sgd steps={budget} lr={setup.alpha:.3g}"
    raise ConfigError(f"unknown solver {name!r}")


def _num_examples(problem) -> int:
    """The size of the example axis LiSSA samples along (``problem.batch_argnums``)."""
    first = (problem.hparams, *problem.inner_args)[problem.batch_argnums[0]]
    return int(jax.tree_util.tree_leaves(first)[0].shape[0])


def _tree_vector(tree: PyTree):
    leaves = jax.tree_util.tree_leaves(tree)
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])


def _cast(tree: PyTree, dtype) -> PyTree:
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _hypergrad_fn(problem, solver, config: CompareHvpConfig) -> Callable:
    """``f(θ, λ, inner_args, outer_args, δ) -> (grad, hvp_count, residual, status)``."""
    def f(params, hparams, inner_args, outer_args, damping):
        grad, info = bilevel.hypergrad(problem.inner_loss, problem.outer_loss, params, hparams,
                                       inner_args, outer_args, solver=solver, mode=config.mode,
                                       damping=damping)
        return grad, info.hvp_count, info.residual_norm, info.status

    return f


def _lissa_fn(problem, solver, config: CompareHvpConfig) -> Callable:
    """As :func:`_hypergrad_fn`, on a Hessian that can draw minibatches (LiSSA needs one)."""
    batch_argnums = problem.batch_argnums  # the per-example arguments LiSSA subsamples

    def f(params, hparams, inner_args, outer_args, damping):
        def curvature(p, h, *args):
            return hvp.hessian(problem.inner_loss, p, h, *args, mode=config.mode,
                               damping=damping, batch_argnums=batch_argnums)

        grad, info = bilevel.hypergrad(problem.inner_loss, problem.outer_loss, params, hparams,
                                       inner_args, outer_args, solver=solver,
                                       curvature=curvature)
        return grad, info.hvp_count, info.residual_norm, info.status

    return f


def _unrolled_fn(problem, steps: int, alpha: float, mode: str) -> Callable:
    """T steps of SGD (learning rate α) from θ* on ``L_in + δ/2 ‖θ − θ*‖²``, differentiated.

    From a stationary point, T gradient steps give ``dθ_T/dλ = −α Σ_{t<T} (I − αH)ᵗ ∂²_{θλ}L``:
    the T-term Neumann series on the same damped Hessian (Lorraine et al. 2020), so the two
    rows should agree; the proximal term gives the unroll the damping without moving θ*.
    """
    def inner(params, hparams, *args):
        *data, anchor, damping = args
        distance = sum(jnp.sum((p - a) ** 2) for p, a in zip(
            jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(anchor), strict=True))
        return problem.inner_loss(params, hparams, *data) + 0.5 * damping * distance

    def f(params, hparams, inner_args, outer_args, damping):
        grad, info = bilevel.unrolled_hypergrad(
            inner, problem.outer_loss, params, hparams, optax.sgd(alpha), steps=steps,
            inner_args=(*inner_args, params, damping), outer_args=outer_args, mode=mode)
        status = jnp.where(info.finite, hvp.Status.CONVERGED, hvp.Status.NONFINITE)
        return grad, jnp.asarray(steps), jnp.asarray(jnp.nan, damping.dtype), status

    return f


def prepare(config: CompareHvpConfig) -> Setup:
    """Build the problem in float64, solve the inner problem, and compute the reference.

    The reference is ``bilevel.hypergrad`` with ``hvp.Dense()`` and no damping at θ*; the same
    function with the configured damping gives ``damping_floor``, the error that no
    approximation of the damped system can go below. Turns on ``jax_enable_x64``.
    """
    jax.config.update("jax_enable_x64", True)
    problem = bilevel.make_problem(config.problem, jax.random.key(config.seed), dtype=jnp.float64)
    check_problem(config, problem)
    params = jax.jit(problem.solve_inner)(problem.params, problem.hparams, *problem.inner_args)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    if num_params > hvp.DEFAULT_DENSE_LIMIT:
        raise ConfigError(f"problem {config.problem!r} has {num_params} parameters, too many "
                          f"for the dense float64 reference (at most {hvp.DEFAULT_DENSE_LIMIT})")
    bad = [b for b in config.budgets if b > num_params]
    if "nystrom" in config.solvers and bad:
        raise ConfigError(f"nystrom's rank is the budget, which must be <= the problem's "
                          f"{num_params} parameters, got {bad[0]}")
    dense = jax.jit(_hypergrad_fn(problem, hvp.Dense(max_size=num_params),
                                  dataclasses.replace(config, mode="fwd_rev")))
    data = (params, problem.hparams, problem.inner_args, problem.outer_args)
    reference = dense(*data, jnp.float64(0.0))[0]
    damped = dense(*data, jnp.float64(config.damping))[0]
    ref, approx = _tree_vector(reference), _tree_vector(damped)
    floor = float(_norm(approx - ref) / _norm(ref))

    @jax.jit
    def largest_eigenvalue(params, hparams, inner_args, damping):
        operator = hvp.hessian(problem.inner_loss, params, hparams, *inner_args, damping=damping)
        return hvp.power_iteration(operator, POWER_ITERS, jax.random.key(config.seed))[0]

    lambda_max = abs(float(largest_eigenvalue(params, problem.hparams, problem.inner_args,
                                              jnp.float64(config.damping))))
    rhs = jax.grad(problem.outer_loss)(params, problem.hparams, *problem.outer_args)
    dtype = jnp.dtype(config.dtype)
    arguments = (*_cast(data, dtype), jnp.asarray(config.damping, dtype))
    rho = config.nystrom_rho if config.nystrom_rho is not None else lambda_max / 10
    return Setup(problem, arguments, reference, floor, lambda_max, 1.0 / lambda_max, rho,
                 float(_norm(_tree_vector(rhs))), num_params)


def _norm(vector) -> float:
    return float(np.linalg.norm(vector))


class Compiled(NamedTuple):
    executable: Any  # a jax.stages.Compiled
    compile_seconds: float  # wall time of XLA's compile (concurrent with the others')
    memory_bytes: int | None  # compiled temp + output bytes


class Measurement(NamedTuple):
    grad: PyTree
    hvp_count: int
    residual_norm: float
    status: int
    seconds: float  # median wall time of one call
    compile_seconds: float
    memory_bytes: int | None


def compile_all(fns: Sequence[Callable], arguments: tuple, jobs: int,
                on_done: Callable[[], None] = lambda: None) -> list[Compiled]:
    """Trace and lower each ``fn`` here, then compile them in ``jobs`` threads.

    Solver budgets are static (``maxiter``, ``rank`` and the unroll length shape the program),
    so every variant is its own XLA program and compiling dominates the run; XLA compiles
    without the GIL, so threads overlap them. Nothing is timed until all are compiled.
    """
    lowered = [jax.jit(fn).lower(*arguments) for fn in fns]

    def build(lowered_fn) -> Compiled:
        start = time.perf_counter()
        executable = lowered_fn.compile()
        seconds = time.perf_counter() - start
        analysis = executable.memory_analysis()
        memory = None if analysis is None else int(analysis.temp_size_in_bytes
                                                    + analysis.output_size_in_bytes)
        on_done()
        return Compiled(executable, seconds, memory)

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(build, lowered))


def measure(compiled: Compiled, arguments: tuple, repeats: int) -> Measurement:
    """One warm-up call (whose outputs are kept), then the median of ``repeats`` timed calls."""
    grad, hvp_count, residual, status = jax.block_until_ready(compiled.executable(*arguments))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled.executable(*arguments))
        times.append(time.perf_counter() - start)
    return Measurement(grad, int(hvp_count), float(residual), int(status),
                       statistics.median(times), compiled.compile_seconds, compiled.memory_bytes)


def num_stages(config: CompareHvpConfig) -> int:
    """How many times :func:`compare_hvp` calls ``on_step`` when it is given a ``setup``."""
    programs = 1 + sum(1 for name, _ in plan(config) if name != "identity")
    return 1 + 2 * programs


def plan(config: CompareHvpConfig) -> list[tuple[str, int | None]]:
    """The (solver, budget) variants to measure, in order; Identity's budget is None."""
    variants = []
    for name in SOLVERS:
        if name in config.solvers:
            budgets = [None] if name == "identity" else sorted(set(config.budgets))
            variants += [(name, b) for b in budgets]
    return variants


def _variant_fn(name: str, budget: int | None, setup: Setup, config: CompareHvpConfig):
    solver, setting = solver_setting(name, budget or 1, setup, config)
    if name.startswith("unrolled-"):
        mode = name.removeprefix("unrolled-")
        return _unrolled_fn(setup.problem, solver, setup.alpha, mode), setting
    if name == "lissa":
        return _lissa_fn(setup.problem, solver, config), setting
    return _hypergrad_fn(setup.problem, solver, config), setting


def _row(name: str, budget: int | None, setting: str, m: Measurement, setup: Setup,
         config: CompareHvpConfig, baseline_seconds: float) -> dict:


    ref, grad = _tree_vector(setup.reference), _tree_vector(m.grad)
    finite = bool(np.all(np.isfinite(grad)))
    error = _norm(grad - ref) / _norm(ref) if finite else math.inf
    denominator = _norm(grad) * _norm(ref)
    cosine = float(grad @ ref / denominator) if finite and denominator > 0 else math.nan
    status = hvp.Status(m.status).name
    stable = finite and error <= 1.0 and status not in ("DIVERGED", "NONFINITE")
    return {
        "solver": name, "budget": budget, "setting": setting, "hvp_count": m.hvp_count,
        "cosine": cosine, "rel_error": error, "rel_residual": m.residual_norm / setup.rhs_norm,
        "status": status, "stable": stable, "time_ms": 1e3 * m.seconds,
        "time_ratio": m.seconds / baseline_seconds, "compile_s": m.compile_seconds,
        "memory_bytes": m.memory_bytes, "dtype": config.dtype,
    }


def compare_hvp(config: CompareHvpConfig, setup: Setup | None = None,
                on_step: Callable[[str], None] | None = None) -> tuple[list[dict], dict]:
    """Measure every (solver, budget) variant of ``config`` against the dense reference.

    Args:
      config: the settings (checked with :func:`check_config`).
      setup: a :func:`prepare` result to reuse; built here when None.
      on_step: called with a label at each of :func:`num_stages` stages (a progress bar's
        hook): the reference (only when ``setup`` is None), each compile as it finishes, and
        each variant's timing.

    Returns:
      ``(rows, metadata)``: one dict per variant (see :func:`_row` for the fields) and a dict
      describing the run (reference, λ̂_max, damping floor, baseline time, machine, versions).
    """
    check_config(config)
    on_step = on_step or (lambda label: None)
    if setup is None:
        on_step("reference (float64)")
        setup = prepare(config)
    # The baseline every time is divided by: Identity, i.e. one outer gradient, one cross product
    # and the one residual product: the cheapest hypergradient there is. It doubles as the
    # identity row.
    variants = [v for v in plan(config) if v[0] != "identity"]
    built = [_variant_fn("identity", None, setup, config)]
    built += [_variant_fn(name, budget, setup, config) for name, budget in variants]
    on_step(f"compiling {len(built)} programs")
    compiled = compile_all([fn for fn, _ in built], setup.arguments, config.jobs,
                           lambda: on_step(f"compiling {len(built)} programs"))
    on_step("timing baseline (identity)")
    baseline = measure(compiled[0], setup.arguments, config.repeats)
    measured = {("identity", None): (baseline, built[0][1])}
    for (name, budget), program, (_, setting) in zip(variants, compiled[1:], built[1:],
                                                     strict=True):
        on_step(f"timing {name} {budget}")
        measured[name, budget] = measure(program, setup.arguments, config.repeats), setting
    rows = [_row(name, budget, measured[name, budget][1], measured[name, budget][0], setup,
                 config, baseline.seconds) for name, budget in plan(config)]
    metadata = {
        "config": dataclasses.asdict(config), "num_params": setup.num_params,
        "reference": "bilevel.hypergrad with hvp.Dense(), float64, no damping, at θ* from "
                     "problem.solve_inner",
        "reference_grad": _tree_vector(setup.reference).tolist(),
        "damping_floor": setup.damping_floor, "lambda_max": setup.lambda_max,
        "alpha": setup.alpha, "nystrom_rho": setup.rho,
        "baseline": "identity hypergradient (outer gradient + cross product + 1 HVP)",
        "baseline_ms": 1e3 * baseline.seconds,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "device": str(jax.devices()[0]),
                    "python": platform.python_version(), "jax": jax.__version__},
    }
    return rows, metadata


# --------------------------------------------------------------------------------------------
# compare-hvp: the shell (output)

COLUMNS = ("solver", "budget", "setting", "hvp_count", "cosine", "rel_error", "rel_residual",
           "status", "stable", "time_ms", "time_ratio", "compile_s", "memory_bytes", "dtype")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if row[k] is None else row[k]) for k in COLUMNS} for row in rows)


def write_json(rows: list[dict], metadata: dict, path: Path) -> None:
    path.write_text(json.dumps(_json_safe({**metadata, "rows": rows}), indent=2,
                               ensure_ascii=False, allow_nan=False) + "\n")


def plot(rows: list[dict], metadata: dict, path: Path) -> None:
    """Relative error against HVP count and against wall time, a line per solver, log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    names = list(dict.fromkeys(row["solver"] for row in rows))
    for name in names:
        mine = [r for r in rows if r["solver"] == name and math.isfinite(r["rel_error"])]
        if not mine:
            continue
        style = dict(marker="o", label=name, linestyle="-" if len(mine) > 1 else "none")
        axes[0].plot([r["hvp_count"] for r in mine], [r["rel_error"] for r in mine], **style)
        axes[1].plot([r["time_ms"] for r in mine], [r["rel_error"] for r in mine], **style)
    floor = metadata["damping_floor"]
    for ax, label in zip(axes, ("HVP count (info.hvp_count)", "median wall time (ms)"),
                         strict=True):
        if floor > 0:
            ax.axhline(floor, color="grey", linestyle=":", label="damping floor")
        ax.set(xscale="log", yscale="log", xlabel=label, ylabel="relative error vs Dense (f64)")
        ax.grid(True, which="both", alpha=0.3)
    config = metadata["config"]
    fig.suptitle(f"{config['problem']}: hypergradient error, {config['dtype']}, "
                 f"damping {config['damping']:g}, mode {config['mode']}")
    axes[1].legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows: list[dict], metadata: dict, console) -> None:
    from rich.table import Table

    config = metadata["config"]
    table = Table(title=f"compare-hvp on {config['problem']} ({metadata['num_params']} params): "
                        f"approximations in {config['dtype']}, reference Dense float64")
    for header in ("solver", "budget", "HVPs", "cosine", "rel err", "rel resid", "status",
                   "time ms", "x base", "MiB", "ok"):
        table.add_column(header, justify="left" if header in ("solver", "status") else "right")
    for r in rows:
        memory = "" if r["memory_bytes"] is None else f"{r['memory_bytes'] / 2**20:.2f}"
        table.add_row(r["solver"], "-" if r["budget"] is None else str(r["budget"]),
                      str(r["hvp_count"]), f"{r['cosine']:.6f}", f"{r['rel_error']:.2e}",
                      f"{r['rel_residual']:.2e}", r["status"].lower(), f"{r['time_ms']:.2f}",
                      f"{r['time_ratio']:.1f}", memory, "yes" if r["stable"] else "NO")
    console.print(table)
    console.print(f"damping {config['damping']:g}: the exact damped solve is "
                  f"{metadata['damping_floor']:.2e} from the reference (the floor); "
                  f"lambda_max ~ {metadata['lambda_max']:.3g}, "
                  f"alpha = {metadata['alpha']:.3g}; baseline (identity) "
                  f"{metadata['baseline_ms']:.2f} ms; x base = time / baseline")


# --------------------------------------------------------------------------------------------
# The argument parser and the subcommand registry


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (``prog: error: ...``), exit status 2."""
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _comma_list(text: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    unknown = [item for item in items if item not in SOLVERS]
    if unknown or not items:
        raise argparse.ArgumentTypeError(
            f"unknown solver {unknown[0] if unknown else text!r}; choose from {', '.join(SOLVERS)}")
    return tuple(dict.fromkeys(items))


def _budget_list(text: str) -> tuple[int, ...]:
    try:
        budgets = tuple(int(item) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"budgets must be a comma-separated list of integers, e.g. 1,5,10; got {text!r}"
        ) from None
    if any(b < 1 for b in budgets):
        raise argparse.ArgumentTypeError(f"budgets must be >= 1, got {text!r}")
    return budgets








def _add_compare_hvp_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = CompareHvpConfig()
    parser.add_argument("--problem", default=defaults.problem, choices=sorted(PROBLEMS),
                        help="bilevel problem from bilevel.PROBLEMS (default: %(default)s)")
    parser.add_argument("--solvers", type=_comma_list, default=defaults.solvers,
                        metavar="LIST", help=f"comma list from {', '.join(SOLVERS)} "
                        f"(default: {','.join(defaults.solvers)})")
    parser.add_argument("--budgets", type=_budget_list, default=defaults.budgets, metavar="LIST",
                        help="HVP budgets, comma list of integers >= 1 (default: "
                        f"{','.join(map(str, defaults.budgets))})")
    parser.add_argument("--damping", type=_nonnegative_float, default=defaults.damping,
                        help="Tikhonov damping δ of the approximations' Hessian (the reference "
                        "is undamped; the damped exact solve's error is reported as the floor). "
                        "Default %(default)g: below the digits MLP's smallest eigenvalue (~1.6e-3)")
    parser.add_argument("--mode", choices=MODES, default=defaults.mode,
                        help="HVP product mode (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, default=defaults.dtype,
                        help="dtype of the approximations; the reference is always float64 "
                        "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the data and the randomised solvers (default: %(default)s)")
    parser.add_argument("--repeats", type=_positive_int, default=defaults.repeats,
                        help="timed calls per variant after a warm-up; the median is reported "
                        "(default: %(default)s)")
    parser.add_argument("--lissa-batch", type=_positive_int, default=defaults.lissa_batch,
                        help="LiSSA minibatch size (default: %(default)s)")
    parser.add_argument("--nystrom-rho", type=_positive_float, default=None,
                        help="Nyström's rho (default: lambda_max / 10)")
    parser.add_argument("--jobs", type=_positive_int, default=defaults.jobs,
                        help="threads compiling the programs at once (default: CPU count, "
                        "%(default)s); timing always runs one program at a time")
    parser.add_argument("--out", type=Path, default=Path("bilevel-compare-hvp"),
                        help="folder for results.csv, results.json and results.png "
                        "(default: %(default)s)")


def _writable_folder(path: Path) -> None:
    """Create ``path`` and check that a file can be written there (before hours of work)."""
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
        pass


def _run_compare_hvp(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    config = CompareHvpConfig(
        problem=args.problem, solvers=args.solvers, budgets=args.budgets, damping=args.damping,
        mode=args.mode, seed=args.seed, repeats=args.repeats, dtype=args.dtype,
        lissa_batch=args.lissa_batch, nystrom_rho=args.nystrom_rho, jobs=args.jobs)
    try:
        check_config(config)
        _writable_folder(args.out)
    except ConfigError as error:
        parser.error(str(error))
    except OSError as error:
        parser.error(f"--out {str(args.out)!r} is not a writable folder: "
                     f"{error.strerror or error}")
    start = time.perf_counter()
    stderr = Console(stderr=True)
    progress = Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=stderr, transient=True,
                        disable=not stderr.is_terminal)
    total = 1 + num_stages(config)
    with progress:
        task = progress.add_task("reference (float64)", total=total)
        stages = itertools.count()

        def on_step(label: str) -> None:  # also called from the compiling threads
            progress.update(task, completed=min(next(stages), total), description=label)

        on_step("reference (float64)")
        try:
            setup = prepare(config)
        except ConfigError as error:
            parser.error(str(error))
        rows, metadata = compare_hvp(config, setup, on_step)
        progress.update(task, completed=total)
    metadata["wall_seconds"] = time.perf_counter() - start
    write_csv(rows, args.out / "results.csv")
    write_json(rows, metadata, args.out / "results.json")
    plot(rows, metadata, args.out / "results.png")
    stdout = Console()
    print_table(rows, metadata, stdout if stdout.is_terminal else Console(width=150))
    print(f"wrote {args.out}/results.csv, results.json, results.png "
          f"in {metadata['wall_seconds']:.1f} s")
    return 0


class Command(NamedTuple):
    """A subcommand: ``add_arguments(parser)`` then ``run(args, parser) -> exit status``."""
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, argparse.ArgumentParser], int]


COMMANDS: dict[str, Command] = {
    "compare-hvp": Command(
        "compare inverse-HVP approximations inside the implicit hypergradient against a dense "
        "float64 reference", _add_compare_hvp_arguments, _run_compare_hvp),
}

_EPILOG_COMPARE_HVP = """\
reference: bilevel.hypergrad with hvp.Dense(), float64, no damping, at theta* from
problem.solve_inner; the approximations solve (H + damping I) in --dtype.

budgets -> solver knobs: CG/MINRES/GMRES maxiter = budget-1 with tol=0 (hvp_count = budget,
the residual check included; GMRES in restart cycles of at most 20); Neumann terms, LiSSA depth
and Nystrom rank = budget (hvp_count = budget+1, the last product being the residual
diagnostic); Neumann, LiSSA and Identity (one row, scale alpha) use the fixed step
alpha = 1/lambda_max from one 50-step power iteration at theta* (no power iterations inside the
solve); Nystrom's rho defaults to lambda_max/10. unrolled-* run budget SGD steps (lr alpha) from
theta* on the inner loss plus damping/2 ||theta - theta*||^2, costing ~budget HVP-equivalents in
the backward pass (from a fixed point this equals the budget-term Neumann series); --mode does
not apply to them (mixflow is forward-over-reverse, reverse is reverse-over-reverse).

Times are medians after a warm-up (x base = time / the identity hypergradient's), memory is the
compiled temp+output bytes. ok = finite, relative error <= 1 and not DIVERGED/NONFINITE."""


# Command groups that live beside the code they drive: each module defines ``HELP``,
# ``add_arguments(parser)`` and ``run(args, parser) -> exit status``.
_EXTENSIONS: dict[str, str] = {"lopt": "bilevel.lopt.cli", "ssl": "semisup.cli"}


def _extension_commands() -> dict[str, Command]:
    commands = {}
    for name, module_name in _EXTENSIONS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and module_name.startswith(error.name):
                continue  # that part of the library is not installed in this checkout
            raise
        commands[name] = Command(module.HELP, module.add_arguments, module.run)
    return commands


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bilevel", description="Command line of the bilevel library.")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for name, command in {**COMMANDS, **_extension_commands()}.items():
        sub = commands.add_parser(
            name, help=command.help, description=command.help,
            epilog=_EPILOG_COMPARE_HVP if name == "compare-hvp" else None,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(sub)
        sub.set_defaults(_run=command.run, _parser=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bilevel`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return args._run(args, args._parser)
