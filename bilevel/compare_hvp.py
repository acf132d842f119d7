"""compare-hvp: inverse-HVP approximations inside the implicit hypergradient, against an exact
float64 reference.

:func:`compare_hvp` is a function of a :class:`CompareHvpConfig` that returns rows (plain dicts)
and a dict describing the run; :func:`prepare` builds what every variant shares (the problem at
θ*, the reference, the fixed step α); :func:`write_csv`, :func:`write_json` and :func:`plot` write
the results. The ``bilevel compare-hvp`` command (:mod:`bilevel.cli`) derives its options from the
config's fields and prints the rows; ``experiments/hvp_study.py`` calls the same functions.

JAX, NumPy, optax and :mod:`hvp` are imported inside the functions that compute, not at the top
of this module: the command line reads the configuration (fields, defaults, help) to answer
``bilevel compare-hvp --help``, which must not wait seconds for JAX to load.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from bilevel.config import Choice, Float, Int, Str, Tuple, field, validate

PyTree = Any

# --------------------------------------------------------------------------------------------
# Configuration (no JAX needed)

#: The reference every row is compared with: the one registered solver that is not a row.
REFERENCE = "dense"
#: The rows that are not registered solvers: the unrolled meta-gradient, differentiated
#: forward-over-reverse (MixFlow) or reverse-over-reverse.
UNROLLED = ("unrolled-mixflow", "unrolled-reverse")
#: The baseline every time is divided by (the cheapest hypergradient); always measured.
BASELINE = "identity"
DEFAULT_SOLVERS = ("cg", "minres", "neumann", "nystrom", "lissa", "identity", "unrolled-mixflow")
DEFAULT_BUDGETS = (1, 5, 10, 20, 50)
#: Tikhonov damping of the approximations' Hessian. The digits MLP's Hessian at θ* has
#: eigenvalues in about [1.6e-3, 0.77]; with δ = 1e-4 the exact damped solve is 1.4e-3 (relative)
#: from the undamped per-layer reference, while δ = 1e-3 would put that floor at 1.3e-2, above
#: what CG reaches in 20 HVPs. (The per-parameter hypergradient of the default problem is more
#: sensitive to δ: its floor is 1.5e-2, which CG reaches at 50 HVPs.) hvp_study relies on this
#: default: changing it changes its committed numbers.
DEFAULT_DAMPING = 1e-4
MODES = ("fwd_rev", "rev_rev", "rev_fwd")
DTYPES = ("float32", "float64")
#: Products of power iteration for the fixed λ_max estimate behind α (Neumann, LiSSA, Identity,
#: the unrolled learning rate).
POWER_ITERS = 50
#: The relative residual every solver is asked for: none, so that each spends its whole budget
#: and the table compares them at equal cost. Its status then says why it stopped (the budget ran
#: out, round-off, divergence, ...), never "converged" for a residual that is not zero. Before,
#: Identity, Nyström and LiSSA kept their default ``tol=1`` ("beats x = 0") and reported
#: "converged" at 55-90 % relative residual.
TOL = 0.0
#: ``status`` of an unrolled row: its meta-gradient solves no linear system, so there is no
#: residual to check, only finiteness (a non-finite one is ``NONFINITE``).
NOT_CHECKED = -1

#: Variants of :data:`bilevel.PROBLEMS` problems that compare-hvp also knows: name ->
#: (registry name, constructor options). With one L2 decay per weight and bias the
#: hypergradient has as many entries as the MLP has parameters (1,210), so it shows in which
#: *direction* each approximation errs: with the per-layer decay's 2 hyperparameters every
#: solver's cosine to the reference was 0.985-1.000.
PROBLEM_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "digits_mlp_per_parameter": ("digits_mlp", {"per_parameter": True}),
}
DEFAULT_PROBLEM = "digits_mlp_per_parameter"

#: How a budget becomes a solver's settings, in general; ``--help`` prints this text (it needs no
#: JAX). Each registered solver's own rule is its class's ``budget_rule`` (:func:`budget_rules`),
#: printed under the table and stored in results.json; the unrolled rows' rule is here.
BUDGET_RULES = """\
How a budget becomes each solver's setting, and the HVPs it then reports
(hvp_count = info.hvp_count: every product spent, the final true-residual check
included). A solver of hvp.SOLVERS is hvp.make_solver(name, budget, **options):
its class's budget_rule says how (printed under the table and stored in
results.json), and hvps_at_budget(budget) is the count it then reports. The
options, each given only to the solvers that have that field:
  tol         0, so every solver spends its whole budget; only round-off,
              breakdown or divergence end one early, and it then reports fewer
  alpha       1/lambda_max, the fixed step (neumann, lissa)
  scale       1/lambda_max (identity: x = scale * b)
  rho         --nystrom-rho (nystrom)
  batch_size  --lissa-batch, capped at the number of training examples; the
              minibatch Hessian's products count one each, the check is on the
              full batch (lissa)
  seed        --seed
A solver whose hvp_count does not depend on the budget (identity) gets one row.
The unrolled rows (unrolled-*) take budget SGD steps (learning rate alpha) from
theta* on the inner loss + damping/2 ||theta - theta*||^2; hvp_count = budget,
the HVP-equivalents of the backward pass (the forward pass adds budget
gradients); no residual check.
alpha = 1/lambda_max, from one 50-step power iteration on H + damping*I at
theta*, counted in no row. From a fixed point, budget unrolled steps equal the
budget-term Neumann series. --mode does not apply to unrolled-* (mixflow is
forward-over-reverse, reverse is reverse-over-reverse)."""


class ConfigError(ValueError):
    """A bad setting found before any measuring starts (the shell prints it as a usage error)."""


def problem_names() -> list[str]:
    """The problems compare-hvp can build: :data:`bilevel.PROBLEMS` and :data:`PROBLEM_VARIANTS`
    (imports the problems, and with them JAX)."""
    from bilevel.problems import PROBLEMS

    return sorted([*PROBLEMS, *PROBLEM_VARIANTS])


def solver_names() -> list[str]:
    """The names ``--solvers`` accepts, in table order: every solver in :data:`hvp.SOLVERS` but
    :data:`REFERENCE`, in registration order, then :data:`UNROLLED` (imports :mod:`hvp`, and with
    it JAX)."""
    import hvp

    return [*(name for name in hvp.SOLVERS if name != REFERENCE), *UNROLLED]


def unknown_solver_message(name: str) -> str:
    """What a name not in :func:`solver_names` is told, the names it may choose from included."""
    why = " (it is the reference every row is compared with)" if name == REFERENCE else ""
    return f"unknown solver {name!r}{why}; choose from {', '.join(solver_names())}"


@dataclasses.dataclass(frozen=True)
class CompareHvpConfig:
    """Settings of :func:`compare_hvp`, checked when constructed (the problem's and solvers'
    names, which need JAX, by :func:`check_config`); each field's help says what it means, and
    ``bilevel compare-hvp`` has one option per field."""

    problem: str = field(
        DEFAULT_PROBLEM, rule=Str("name"), metavar="NAME",
        help="bilevel problem: a name from bilevel.PROBLEMS, or digits_mlp_per_parameter (the "
             "digits MLP with one L2 decay per weight and bias, 1,210 hyperparameters)")
    solvers: tuple[str, ...] = field(
        DEFAULT_SOLVERS, rule=Tuple(Str("name"), nonempty=True, unique=True), metavar="LIST",
        help=f"comma list of solvers: any name in hvp.SOLVERS except {REFERENCE} (the "
             f"reference), or {', '.join(UNROLLED)}")
    budgets: tuple[int, ...] = field(
        DEFAULT_BUDGETS, rule=Tuple(Int(min=1), nonempty=True), metavar="LIST",
        help="HVP budgets, a comma list of integers >= 1; how each becomes a solver's knob is "
             "below")
    damping: float = field(
        DEFAULT_DAMPING, rule=Float(ge=0),
        help="Tikhonov damping of the approximations' Hessian (H + damping*I); the reference "
             "is undamped and the exact damped solve's error is reported as the floor")
    mode: str = field("fwd_rev", rule=Choice(MODES), help="HVP product mode")
    seed: int = field(0, rule=Int(min=0), help="seed of the data and of the randomised solvers")
    repeats: int = field(
        3, rule=Int(min=1),
        help="timed calls per variant after one warm-up call; the median is reported")
    dtype: str = field(
        "float32", rule=Choice(DTYPES),
        help="dtype the approximations run in; the reference is always float64")
    lissa_batch: int = field(
        32, rule=Int(min=1),
        help="LiSSA's minibatch size (capped at the number of training examples)")
    nystrom_rho: float | None = field(
        None, rule=Float(gt=0, none=True), shown="lambda_max/10",
        help="Nystrom's rho, the inverse scale of the directions the sketch misses (with "
             "lambda_max/100 the digits MLP's hypergradient came out ~10 times too large)")
    jobs: int = field(
        rule=Int(min=1), default_factory=lambda: os.cpu_count() or 1,
        shown="the CPU count, %(default)s",
        help="threads compiling the programs at once; timing always runs one at a time")

    def __post_init__(self):
        validate(self, "compare_hvp.CompareHvpConfig")


def check_config(config: CompareHvpConfig) -> None:
    """Raise :class:`ConfigError` for a problem or solver name that is not registered (the
    other fields were checked when the config was made; the names need JAX)."""
    if config.problem not in problem_names():
        raise ConfigError(f"unknown problem {config.problem!r}; known problems: "
                          f"{', '.join(problem_names())}")
    unknown = [name for name in config.solvers if name not in solver_names()]
    if unknown:
        raise ConfigError(unknown_solver_message(unknown[0]))


def check_problem(config: CompareHvpConfig, problem) -> None:
    """Raise :class:`ConfigError` for what the built ``problem`` cannot serve (before its inner
    solve): the dense reference needs a small enough problem, and every solver variant must pass
    its own ``check_operator`` on the problem's Hessian (LiSSA needs per-example data to draw
    minibatches from, Nyström a rank, the budget, <= the problem's size)."""
    import jax

    import hvp

    num_params = sum(x.size for x in jax.tree_util.tree_leaves(problem.params))
    if num_params > hvp.DEFAULT_DENSE_LIMIT:
        raise ConfigError(f"problem {config.problem!r} has {num_params} parameters, too many "
                          f"for the dense float64 reference (at most {hvp.DEFAULT_DENSE_LIMIT})")
    for name, budget in plan(config):
        if name not in UNROLLED:  # built from the budget: alpha and rho need θ*, found later
            solver = hvp.make_solver(name, budget or 1, **_fields_of(hvp.SOLVERS[name],
                                                                     {"tol": TOL}))
            needs_minibatches(solver, problem, f"{label(name, budget)} on {config.problem!r}")


def needs_minibatches(solver, problem, where: str) -> bool:
    """Whether ``solver`` needs the Hessian that draws minibatches of ``problem``'s per-example
    data (LiSSA does): its ``check_operator`` refuses the full-batch Hessian and accepts that
    one. Raises :class:`ConfigError`, with the solver's reason, when it accepts neither."""
    import hvp

    arguments = (problem.inner_loss, problem.params, problem.hparams, *problem.inner_args)
    try:
        solver.check_operator(hvp.hessian(*arguments))
        return False
    except ValueError as error:
        reason = str(error)
    if not problem.batch_argnums:
        raise ConfigError(f"{where}: {reason}; the problem has no per-example data to draw "
                          f"minibatches from (its batch_argnums is empty)")
    try:
        solver.check_operator(hvp.hessian(*arguments, batch_argnums=problem.batch_argnums))
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from None
    return True


def _budget_free(name: str) -> bool:
    """Whether a registered solver's ``hvp_count`` is the same at every budget (Identity's): it
    gets one row, with budget None."""
    import hvp

    if name in UNROLLED:
        return False
    counts = {hvp.SOLVERS[name].hvps_at_budget(b) for b in (1, 2, 3, 10, 100, 1000)}
    return len(counts) == 1


def plan(config: CompareHvpConfig) -> list[tuple[str, int | None]]:
    """The (solver, budget) variants to measure, in :func:`solver_names` order; a budget-free
    solver (Identity) has one, with budget None."""
    variants = []
    for name in solver_names():
        if name in config.solvers:
            budgets = [None] if _budget_free(name) else sorted(set(config.budgets))
            variants += [(name, b) for b in budgets]
    return variants


def _programs(config: CompareHvpConfig) -> list[tuple[str, int | None]]:
    """The variants in compiling and timing order: the baseline (Identity) first, always."""
    return [(BASELINE, None), *(v for v in plan(config) if v != (BASELINE, None))]


def num_stages(config: CompareHvpConfig) -> int:
    """How many times :func:`compare_hvp` calls ``on_step`` when it builds the setup itself: once
    for the reference, then once per program compiled and once per program timed."""
    return 1 + 2 * len(_programs(config))


def label(name: str, budget: int | None) -> str:
    """A variant as the progress messages name it: ``"cg budget 5"``, ``"identity"``."""
    return name if budget is None else f"{name} budget {budget}"


def hvp_count_rule(name: str, budget: int) -> int:
    """The ``hvp_count`` a row reports at ``budget`` when no round-off, breakdown or divergence
    ends it early: the solver class's ``hvps_at_budget``, or ``budget`` for an unrolled row."""
    import hvp

    if name in UNROLLED:
        return budget
    if name not in solver_names():
        raise ConfigError(unknown_solver_message(name))
    return hvp.SOLVERS[name].hvps_at_budget(budget)


def budget_rules(names: Sequence[str]) -> dict[str, str]:
    """Each solver's rule from budget to settings and ``hvp_count``: its class's ``budget_rule``,
    or the unrolled rows' (:data:`BUDGET_RULES` has the options they all get)."""
    import hvp

    unrolled = "budget SGD steps of learning rate alpha; hvp_count = budget (no check)"
    return {name: unrolled if name in UNROLLED else hvp.SOLVERS[name].budget_rule
            for name in names}


# --------------------------------------------------------------------------------------------
# The pure core


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


#: The options :func:`solver_setting` gives a registered solver, each only if its class has a
#: field of that name: field -> its value from the setup and the config. :data:`BUDGET_RULES`
#: says the same to the user.
SOLVER_OPTIONS: dict[str, Callable[[Setup, CompareHvpConfig], Any]] = {
    "tol": lambda setup, config: TOL,
    "alpha": lambda setup, config: setup.alpha,  # the fixed step: no power iteration inside
    "scale": lambda setup, config: setup.alpha,  # Identity: x = b / lambda_max
    "rho": lambda setup, config: setup.rho,
    "batch_size": lambda setup, config: _batch_size(setup.problem, config),
    "seed": lambda setup, config: config.seed,
}


def _fields_of(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    """The ``options`` that are fields of the solver class ``cls``."""
    fields = {field.name for field in dataclasses.fields(cls)}
    return {name: value for name, value in options.items() if name in fields}


def solver_setting(name: str, budget: int, setup: Setup, config: CompareHvpConfig
                   ) -> tuple[Any, str]:
    """The solver (or unroll length) for an HVP budget, and its settings as text.

    A registered solver is ``hvp.make_solver(name, budget, **options)`` with the
    :data:`SOLVER_OPTIONS` it has fields for (``tol = TOL``: spend the whole budget; the fixed
    step ``α = 1/λ̂_max``, ...); its class's ``budget_rule`` says how the budget becomes its
    settings. The text lists every field but ``tol``.
    """
    import hvp

    if name in UNROLLED:
        return budget, f"sgd steps={budget} lr={setup.alpha:.3g}"
    if name not in solver_names():
        raise ConfigError(unknown_solver_message(name))
    wanted = _fields_of(hvp.SOLVERS[name], SOLVER_OPTIONS)
    solver = hvp.make_solver(name, budget, **{key: value(setup, config)
                                              for key, value in wanted.items()})
    return solver, " ".join(f"{field.name}={_short(getattr(solver, field.name))}"
                            for field in dataclasses.fields(solver) if field.name != "tol")


def _short(value: Any) -> str:
    return format(value, ".3g") if isinstance(value, float) else str(value)


def _batch_size(problem, config: CompareHvpConfig) -> int:
    """``--lissa-batch``, capped at the number of examples a minibatch is drawn from."""
    if not problem.batch_argnums:
        return config.lissa_batch
    return min(config.lissa_batch, _num_examples(problem))


def _num_examples(problem) -> int:
    """The size of the example axis LiSSA samples along (``problem.batch_argnums``)."""
    import jax

    first = (problem.hparams, *problem.inner_args)[problem.batch_argnums[0]]
    return int(jax.tree_util.tree_leaves(first)[0].shape[0])


def _tree_vector(tree: PyTree):
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_leaves(tree)
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])


def _cast(tree: PyTree, dtype) -> PyTree:
    import jax
    import jax.numpy as jnp

    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _norm(vector) -> float:
    import numpy as np

    return float(np.linalg.norm(vector))


def _hypergrad_fn(problem, solver, config: CompareHvpConfig) -> Callable:
    """``f(θ, λ, inner_args, outer_args, δ) -> (grad, hvp_count, residual, status)``."""
    import bilevel

    def f(params, hparams, inner_args, outer_args, damping):
        # Approximations that miss tol are the point of the table, not a failure to warn about;
        # θ* is solve_inner's, so the stationarity check would only add a gradient to each time.
        grad, info = bilevel.hypergrad(problem.inner_loss, problem.outer_loss, params, hparams,
                                       inner_args, outer_args, solver=solver, mode=config.mode,
                                       damping=damping, on_failure="ignore",
                                       stationarity_tol=None)
        return grad, info.hvp_count, info.residual_norm, info.status

    return f


def _minibatch_fn(problem, solver, config: CompareHvpConfig) -> Callable:
    """As :func:`_hypergrad_fn`, on a Hessian that can draw minibatches (LiSSA needs one)."""
    import bilevel
    import hvp

    batch_argnums = problem.batch_argnums  # the per-example arguments the solver subsamples

    def f(params, hparams, inner_args, outer_args, damping):
        def curvature(p, h, *args):
            return hvp.hessian(problem.inner_loss, p, h, *args, mode=config.mode,
                               damping=damping, batch_argnums=batch_argnums)

        grad, info = bilevel.hypergrad(problem.inner_loss, problem.outer_loss, params, hparams,
                                       inner_args, outer_args, solver=solver,
                                       mode=config.mode, curvature=curvature,
                                       on_failure="ignore",
                                       stationarity_tol=None)
        return grad, info.hvp_count, info.residual_norm, info.status

    return f


def _unrolled_fn(problem, steps: int, alpha: float, mode: str) -> Callable:
    """T steps of SGD (learning rate α) from θ* on ``L_in + δ/2 ‖θ − θ*‖²``, differentiated.

    From a stationary point, T gradient steps give ``dθ_T/dλ = −α Σ_{t<T} (I − αH)ᵗ ∂²_{θλ}L``:
    the T-term Neumann series on the same damped Hessian (Lorraine et al. 2020), so the two
    rows should agree; the proximal term gives the unroll the damping without moving θ*. There
    is no residual: the status is :data:`NOT_CHECKED`, or ``NONFINITE``.
    """
    import jax
    import jax.numpy as jnp
    import optax

    import bilevel
    import hvp

    def inner(params, hparams, *args):
        *data, anchor, damping = args
        distance = sum(jnp.sum((p - a) ** 2) for p, a in zip(
            jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(anchor), strict=True))
        return problem.inner_loss(params, hparams, *data) + 0.5 * damping * distance

    def f(params, hparams, inner_args, outer_args, damping):
        grad, info = bilevel.unrolled_hypergrad(
            inner, problem.outer_loss, params, hparams, optax.sgd(alpha), steps=steps,
            inner_args=(*inner_args, params, damping), outer_args=outer_args, mode=mode,
            on_failure="ignore")
        status = jnp.where(info.finite, NOT_CHECKED, hvp.Status.NONFINITE)
        return grad, jnp.asarray(steps), jnp.asarray(jnp.nan, damping.dtype), status

    return f


def make_problem(name: str, seed: int, dtype: Any):
    """Build problem ``name`` (a :data:`bilevel.PROBLEMS` name or a :data:`PROBLEM_VARIANTS`
    one) from ``jax.random.key(seed)``."""
    import jax

    import bilevel

    registered, options = PROBLEM_VARIANTS.get(name, (name, {}))
    return bilevel.make_problem(registered, jax.random.key(seed), dtype=dtype, **options)


def build_problem(config: CompareHvpConfig):
    """The problem of ``config`` in float64, checked by :func:`check_problem` (cheap: no inner
    solve yet). Turns on ``jax_enable_x64``."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    problem = make_problem(config.problem, config.seed, jnp.float64)
    check_problem(config, problem)
    return problem


def prepare(config: CompareHvpConfig, problem=None) -> Setup:
    """Solve the inner problem of ``problem`` (default: :func:`build_problem`) and compute the
    reference.

    The reference is ``bilevel.hypergrad`` with ``hvp.Dense()`` and no damping at θ*; the same
    function with the configured damping gives ``damping_floor``, the error that no
    approximation of the damped system can go below. Turns on ``jax_enable_x64``.
    """
    import jax
    import jax.numpy as jnp

    import hvp

    jax.config.update("jax_enable_x64", True)
    if problem is None:
        problem = build_problem(config)
    params = jax.jit(problem.solve_inner)(problem.params, problem.hparams, *problem.inner_args)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
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
                on_done: Callable[[int], None] = lambda index: None) -> list[Compiled]:
    """Trace and lower each ``fn`` here, then compile them in ``jobs`` threads.

    Solver budgets are static (``maxiter``, ``rank`` and the unroll length shape the program),
    so every variant is its own XLA program and compiling dominates the run; XLA compiles
    without the GIL, so threads overlap them. Nothing is timed until all are compiled.
    ``on_done(i)`` is called (from a compiling thread) when ``fns[i]`` is compiled.
    """
    import jax

    lowered = [jax.jit(fn).lower(*arguments) for fn in fns]

    def build(index: int) -> Compiled:
        start = time.perf_counter()
        executable = lowered[index].compile()
        seconds = time.perf_counter() - start
        analysis = executable.memory_analysis()
        memory = None if analysis is None else int(analysis.temp_size_in_bytes
                                                    + analysis.output_size_in_bytes)
        on_done(index)
        return Compiled(executable, seconds, memory)

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(build, range(len(lowered))))


def measure(compiled: Compiled, arguments: tuple, repeats: int) -> Measurement:
    """One warm-up call (whose outputs are kept), then the median of ``repeats`` timed calls."""
    import jax

    grad, hvp_count, residual, status = jax.block_until_ready(compiled.executable(*arguments))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled.executable(*arguments))
        times.append(time.perf_counter() - start)
    return Measurement(grad, int(hvp_count), float(residual), int(status),
                       statistics.median(times), compiled.compile_seconds, compiled.memory_bytes)


def _variant_fn(name: str, budget: int | None, setup: Setup, config: CompareHvpConfig):
    solver, setting = solver_setting(name, budget or 1, setup, config)
    if name in UNROLLED:
        mode = name.removeprefix("unrolled-")
        return _unrolled_fn(setup.problem, solver, setup.alpha, mode), setting
    if needs_minibatches(solver, setup.problem, label(name, budget)):
        return _minibatch_fn(setup.problem, solver, config), setting
    return _hypergrad_fn(setup.problem, solver, config), setting


def status_name(code: int) -> str:
    """A row's ``status``: the :class:`hvp.Status` name, or ``"NOT_CHECKED"`` (unrolled)."""
    import hvp

    return "NOT_CHECKED" if code == NOT_CHECKED else hvp.Status(code).name


def _row(name: str, budget: int | None, setting: str, m: Measurement, setup: Setup,
         config: CompareHvpConfig, baseline_seconds: float) -> dict:
    import numpy as np

    ref, grad = _tree_vector(setup.reference), _tree_vector(m.grad)
    finite = bool(np.all(np.isfinite(grad)))
    error = _norm(grad - ref) / _norm(ref) if finite else math.inf
    denominator = _norm(grad) * _norm(ref)
    cosine = float(grad @ ref / denominator) if finite and denominator > 0 else math.nan
    status = status_name(m.status)
    stable = finite and error <= 1.0 and status not in ("DIVERGED", "NONFINITE")
    return {
        "solver": name, "budget": budget, "setting": setting, "hvp_count": m.hvp_count,
        "cosine": cosine, "rel_error": error, "rel_residual": m.residual_norm / setup.rhs_norm,
        "status": status, "stable": stable, "time_ms": 1e3 * m.seconds,
        "time_ratio": m.seconds / baseline_seconds, "compile_s": m.compile_seconds,
        "memory_bytes": m.memory_bytes, "dtype": config.dtype,
    }


def reference_message(setup: Setup) -> str:
    """What :func:`compare_hvp` reports when the reference stage ends."""
    return f"reference ready: {setup.num_params} parameters, lambda_max {setup.lambda_max:.3g}"


def compare_hvp(config: CompareHvpConfig, setup: Setup | None = None,
                on_step: Callable[[str], None] | None = None) -> tuple[list[dict], dict]:
    """Measure every (solver, budget) variant of ``config`` against the dense reference.

    Args:
      config: the settings (checked with :func:`check_config`).
      setup: a :func:`prepare` result to reuse; built here when None.
      on_step: called with a message as each of :func:`num_stages` stages ends (a progress
        hook): the reference (only when ``setup`` is None), each compile (from the compiling
        threads), each variant's timing.

    Returns:
      ``(rows, metadata)``: one dict per variant (see :func:`_row` for the fields) and a dict
      describing the run (reference, λ̂_max, damping floor, baseline time, machine, versions).
    """
    import jax

    check_config(config)
    on_step = on_step or (lambda message: None)
    if setup is None:
        setup = prepare(config)
        on_step(reference_message(setup))
    # The baseline every time is divided by: Identity, i.e. one outer gradient, one cross product
    # and the one residual product: the cheapest hypergradient there is. It doubles as the
    # identity row.
    programs = _programs(config)
    built = [_variant_fn(name, budget, setup, config) for name, budget in programs]
    compiled = compile_all([fn for fn, _ in built], setup.arguments, config.jobs,
                           lambda i: on_step(f"compiled {label(*programs[i])}"))
    measured = {}
    for (name, budget), program, (_, setting) in zip(programs, compiled, built, strict=True):
        measured[name, budget] = measure(program, setup.arguments, config.repeats), setting
        on_step(f"timed {label(name, budget)}: "
                f"{1e3 * measured[name, budget][0].seconds:.2f} ms")
    baseline = measured[BASELINE, None][0]
    rows = [_row(name, budget, measured[name, budget][1], measured[name, budget][0], setup,
                 config, baseline.seconds) for name, budget in plan(config)]
    metadata = {
        "config": dataclasses.asdict(config), "num_params": setup.num_params,
        "reference": "bilevel.hypergrad with hvp.Dense(), float64, no damping, at θ* from "
                     "problem.solve_inner",
        "reference_grad": _tree_vector(setup.reference).tolist(),
        "damping_floor": setup.damping_floor, "lambda_max": setup.lambda_max,
        "alpha": setup.alpha, "nystrom_rho": setup.rho,
        "budget_rules": budget_rules(list(dict.fromkeys(name for name, _ in plan(config)))),
        "baseline": "identity hypergradient (outer gradient + cross product + 1 HVP)",
        "baseline_ms": 1e3 * baseline.seconds,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "device": str(jax.devices()[0]),
                    "python": platform.python_version(), "jax": jax.__version__},
    }
    return rows, metadata


# --------------------------------------------------------------------------------------------
# Files

#: The columns of results.csv, in order (every field of a row).
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
    for ax, axis_label in zip(axes, ("HVP count (info.hvp_count)", "median wall time (ms)"),
                              strict=True):
        if floor > 0:
            ax.axhline(floor, color="grey", linestyle=":", label="damping floor")
        ax.set(xscale="log", yscale="log", xlabel=axis_label,
               ylabel="relative error vs Dense (f64)")
        ax.grid(True, which="both", alpha=0.3)
    config = metadata["config"]
    fig.suptitle(f"{config['problem']}: hypergradient error, {config['dtype']}, "
                 f"damping {config['damping']:g}, mode {config['mode']}")
    axes[1].legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
