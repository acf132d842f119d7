"""Inverse-HVP solvers: one protocol, interchangeable, honest about failure.

``hvp.solve(operator, vector, solver)`` returns ``(x, info)`` with ``x ≈ A⁻¹ b``. Every solver is a
small frozen dataclass whose fields are its hyperparameters, validated when it is constructed.
All of them run under ``jit`` and ``vmap`` (loops are ``lax`` loops), and every one reports its
true residual ``||b − A x||`` (one extra product, counted in ``hvp_count``): a solve that did not
converge, met negative curvature, diverged or produced a non-finite value says so in ``info``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from hvp import checks as _checks
from hvp.operators import LinearOperator
from hvp.spectral import power_iteration

PyTree = Any
Flat = jax.Array


class Status(enum.IntEnum):
    """Why a solve stopped; ``info.status`` holds one of these as an int32."""

    CONVERGED = 0  #: the relative residual is within ``tol`` (or no ``tol`` was asked for)
    MAX_ITERATIONS = 1  #: the budget ran out before ``tol`` was reached
    NEGATIVE_CURVATURE = 2  #: CG met ``pᵀAp <= 0``: the operator is not positive definite
    DIVERGED = 3  #: the residual grew past ``divergence`` times ``||b||`` (Neumann, LiSSA)
    NONFINITE = 4  #: the result or its residual is NaN or infinite
    STAGNATED = 5  #: round-off stopped progress above ``tol`` before the budget ran out
    INACCURATE = 6  #: an approximation (Identity, Nyström, LiSSA) missed ``tol``


class SolveInfo(NamedTuple):
    """Diagnostics of a solve, all arrays, so they survive ``jit`` and ``vmap``.

    Attributes:
      residual_norm: ``||b − A x||₂``, computed from the returned ``x``.
      iterations: iterations the solver ran.
      converged: ``status == Status.CONVERGED``.
      hvp_count: operator products spent, the final residual included.
      status: a :class:`Status` code.
    """

    residual_norm: jax.Array
    iterations: jax.Array
    converged: jax.Array
    hvp_count: jax.Array
    status: jax.Array


def status_message(info: SolveInfo) -> str:
    """A one-line human description of a (concrete, unbatched) ``info``."""
    status = Status(int(info.status))
    return (f"{status.name.lower().replace('_', ' ')} after {int(info.iterations)} iterations "
            f"({int(info.hvp_count)} HVPs), residual norm {float(info.residual_norm):.3e}")


# --------------------------------------------------------------------------------------------
# Validation helpers for the dataclass fields.


def _set(solver: Any, name: str, value: Any) -> None:
    object.__setattr__(solver, name, value)  # frozen: normalise NumPy scalars to Python ones


def check_positive_int(solver: Any, name: str) -> None:
    value = getattr(solver, name)
    if isinstance(value, np.integer):
        _set(solver, name, value := int(value))
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{type(solver).__name__}: {name} must be an integer >= 1, got {value!r}")


def _real(solver: Any, name: str) -> Any:
    value = getattr(solver, name)
    if isinstance(value, np.integer | np.floating):
        _set(solver, name, value := float(value))
    return value


def check_tolerance(solver: Any, name: str = "tol", allow_none: bool = False) -> None:
    value = _real(solver, name)
    if value is None and allow_none:
        return
    if (not isinstance(value, int | float) or isinstance(value, bool)
            or not 0.0 <= value < math.inf):
        raise ValueError(f"{type(solver).__name__}: {name} must be a finite number >= 0, "
                         f"got {value!r}")


def check_positive_or_none(solver: Any, name: str) -> None:
    value = _real(solver, name)
    if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)
                              or not 0.0 < value < math.inf):
        raise ValueError(f"{type(solver).__name__}: {name} must be None or a finite number > 0, "
                         f"got {value!r}")


# --------------------------------------------------------------------------------------------
# The shared ending: true residual, status, info.


def finish(matvec: Callable[[Flat], Flat], b: Flat, x: Flat, iterations: Any, hvps: Any,
           tol: float | None, *, hint: Any = Status.CONVERGED, divergence: float | None = None,
           residual: jax.Array | None = None, start_residual: jax.Array | None = None
           ) -> tuple[Flat, SolveInfo]:
    """Check the returned ``x`` against the operator and build its :class:`SolveInfo`.

    ``residual`` may be passed when the solver already computed ``||b − Ax||`` exactly;
    otherwise it costs one more product, counted here. Divergence is growth past
    ``divergence`` times the larger of ``||b||`` and ``start_residual`` (a warm start's).
    """
    if residual is None:
        residual, hvps = jnp.linalg.norm(b - matvec(x)), hvps + 1
    b_norm = jnp.linalg.norm(b)
    finite = jnp.all(jnp.isfinite(x)) & jnp.isfinite(residual)
    within = jnp.array(True) if tol is None else residual <= tol * b_norm
    reference = b_norm if start_residual is None else jnp.maximum(b_norm, start_residual)
    diverged = jnp.array(False) if divergence is None else ~(residual <= divergence * reference)
    unmet = jnp.where(hint == Status.CONVERGED, Status.MAX_ITERATIONS, hint)
    status = jnp.where(~finite, Status.NONFINITE,
                       jnp.where(diverged, Status.DIVERGED,
                                 jnp.where(within, Status.CONVERGED, unmet))).astype(jnp.int32)
    info = SolveInfo(residual_norm=residual, iterations=jnp.asarray(iterations, jnp.int32),
                     converged=status == Status.CONVERGED,
                     hvp_count=jnp.asarray(hvps, jnp.int32), status=status)
    return x, info


class FlatProblem(NamedTuple):
    """What a solver receives: flat products, right-hand side, preconditioner, start, key."""

    matvec: Callable[[Flat], Flat]
    b: Flat
    precondition: Callable[[Flat], Flat]
    x0: Flat | None
    key: jax.Array
    operator: LinearOperator


def start_point(problem: FlatProblem) -> tuple[Flat, Flat, int]:
    """Initial iterate, residual and the products spent computing it."""
    if problem.x0 is None:
        return jnp.zeros_like(problem.b), problem.b, 0
    return problem.x0, problem.b - problem.matvec(problem.x0), 1


def stopping_threshold(tol: float, b: Flat) -> jax.Array:
    """The residual an iteration stops at: ``tol ||b||``, but never below a few ulps of ``||b||``.

    Iterating past the precision floor does not improve x; in float32 the recurrences then
    underflow (``pᵀAp`` rounds to 0) and the iterate diverges.
    """
    floor = 4 * jnp.finfo(b.dtype).eps
    return jnp.maximum(tol, floor) * jnp.linalg.norm(b)


class AbstractSolver:
    """The protocol every solver implements; :func:`hvp.solve` is its only caller.

    A solver is a frozen dataclass (use :func:`register`) whose fields are its hyperparameters,
    checked in ``__post_init__`` with the ``check_*`` helpers of this module. It implements:

    * ``solve_flat(problem) -> (x, info)``: solve ``A x = b`` on the flat vectors of a
      :class:`FlatProblem` (``matvec``, ``b``, ``precondition``, warm start ``x0`` or None,
      ``key``), under ``jit`` (``lax`` loops only), and end with :func:`finish`, which computes
      the true residual and the :class:`SolveInfo`;
    * ``from_budget(budget, **options)`` (a classmethod): the solver that spends about
      ``budget`` operator products (Krylov solvers leave one of them for the final residual
      check; Neumann, LiSSA and Nyström spend ``budget`` and the check comes on top), with
      ``tol=0`` unless ``options`` say otherwise; :attr:`budget_rule` says how in one line, and
      ``hvps_at_budget(budget)`` returns exactly the ``hvp_count`` it reports when nothing
      stops it early;
    * optionally ``check_operator(operator)``, trace-time checks that need the operator, and
      the class flags ``accepts_preconditioner``, ``accepts_init``, ``symmetric_only`` (False
      for solvers such as GMRES and BiCGStab that take non-symmetric operators),
      ``needs_positive_definite`` (CG, Neumann, LiSSA), ``stationary_iteration`` (Neumann,
      LiSSA: the error shrinks by ``1 − α λ_min`` per product, so an ill-conditioned operator
      needs about κ products) and ``approximation`` (Identity, Nyström, LiSSA: not an exact
      solve however large the budget);
    * optionally ``renamed_fields``, old field name -> new name: :func:`register` makes the
      constructor (and so :func:`make_solver`) accept the old keyword and the instance answer
      the old attribute, each with a ``DeprecationWarning``.

    :class:`IterationBudget` implements ``from_budget`` / ``hvps_at_budget`` for solvers whose
    budget sets ``maxiter``; :class:`KrylovSolver` and :class:`NeumannSeries` add what the
    Krylov solvers, and the Neumann-series solvers, share.
    """

    accepts_preconditioner: ClassVar[bool] = False
    accepts_init: ClassVar[bool] = False
    symmetric_only: ClassVar[bool] = True
    needs_positive_definite: ClassVar[bool] = False
    stationary_iteration: ClassVar[bool] = False
    approximation: ClassVar[bool] = False
    #: The name in :data:`SOLVERS`, set by :func:`register`.
    name: ClassVar[str] = ""
    #: How :meth:`from_budget` turns a budget into settings, one line.
    budget_rule: ClassVar[str] = ""
    #: Old field name -> its new name, still accepted (see :func:`register`).
    renamed_fields: ClassVar[dict[str, str]] = {}

    def solve_flat(self, problem: FlatProblem) -> tuple[Flat, SolveInfo]:  # pragma: no cover
        raise NotImplementedError

    def check_operator(self, operator: LinearOperator) -> None:
        """Trace-time checks that need the operator (sizes, capabilities)."""

    @classmethod
    def from_budget(cls, budget: int, **options: Any) -> AbstractSolver:  # pragma: no cover
        raise NotImplementedError(f"{cls.__name__} does not say how a budget maps to it")

    @classmethod
    def hvps_at_budget(cls, budget: int) -> int:  # pragma: no cover
        raise NotImplementedError


#: Solver name -> class, filled by :func:`register`; :func:`make_solver` builds from it.
SOLVERS: dict[str, type[AbstractSolver]] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make ``cls`` a frozen dataclass and enter it in :data:`SOLVERS`.

    Each of ``cls.renamed_fields`` (old -> new) stays a keyword of the constructor and a
    read-only attribute, both with a ``DeprecationWarning``.
    """
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"hvp.register: name must be a lower-case identifier, got {name!r}")

    def decorate(cls: type) -> type:
        if name in SOLVERS:
            raise ValueError(f"hvp.register: a solver named {name!r} exists ({SOLVERS[name]})")
        cls = dataclasses.dataclass(frozen=True)(cls)
        cls.name = name
        _keep_old_names(cls)
        SOLVERS[name] = cls
        return cls

    return decorate


def _keep_old_names(cls: type) -> None:
    where = f"hvp.{cls.__name__}"
    if cls.renamed_fields:
        cls.__init__ = _checks.accepts_renamed(where, **cls.renamed_fields)(cls.__init__)
    for old, new in cls.renamed_fields.items():
        setattr(cls, old, _checks.renamed_attribute(where, old, new))


def make_solver(name: str, budget: int | None = None, **options: Any) -> AbstractSolver:
    """A solver by its :data:`SOLVERS` name: ``cls.from_budget(budget, **options)`` with a
    budget, else ``cls(**options)``.

    Options a solver does not have are refused, naming the solver and its fields.
    """
    where = "hvp.make_solver"
    if name not in SOLVERS:
        raise ValueError(f"{where}: unknown solver {name!r}; choose from {tuple(SOLVERS)}")
    cls = SOLVERS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields - set(cls.renamed_fields))
    if unknown:
        raise TypeError(f"{where}: {cls.__name__} has no option {', '.join(unknown)}; its "
                        f"fields are {', '.join(sorted(fields)) or 'none'}")
    if budget is None:
        return cls(**options)
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget < 1:
        raise ValueError(f"{where}: budget must be an integer >= 1 or None, got {budget!r}")
    return cls.from_budget(int(budget), **options)


class IterationBudget(AbstractSolver):
    """``from_budget`` / ``hvps_at_budget`` for a solver whose budget sets ``maxiter``.

    Each iteration spends ``products_per_iteration`` products; a Krylov solver
    (``check_in_budget``) leaves one product of the budget for the final residual check, a
    series spends the whole budget and the check comes on top. At least one iteration runs.
    """

    products_per_iteration: ClassVar[int] = 1
    check_in_budget: ClassVar[bool] = True

    @classmethod
    def maxiter_at_budget(cls, budget: int) -> int:
        spendable = budget - 1 if cls.check_in_budget else budget
        return max(spendable // cls.products_per_iteration, 1)

    @classmethod
    def from_budget(cls, budget: int, **options: Any) -> AbstractSolver:
        return cls(**{"maxiter": cls.maxiter_at_budget(budget), "tol": 0.0, **options})

    @classmethod
    def hvps_at_budget(cls, budget: int) -> int:
        return cls.products_per_iteration * cls.maxiter_at_budget(budget) + 1


@dataclasses.dataclass(frozen=True)
class KrylovSolver(IterationBudget):
    """The fields and flags CG, MINRES, GMRES and BiCGStab share; subclasses add their own."""

    maxiter: int = 100
    tol: float = 1e-6
    accepts_preconditioner: ClassVar[bool] = True
    accepts_init: ClassVar[bool] = True

    def __post_init__(self):
        check_positive_int(self, "maxiter")
        check_tolerance(self)


# --------------------------------------------------------------------------------------------
# Krylov solvers.


#: Restarts from the true residual that CG and MINRES make when their recursive residual
#: estimate has met ``tol`` but the true residual has not (round-off drift).
_REFINEMENTS = 3


def _refined(iterate: Callable, problem: FlatProblem, maxiter: int, tol: float
             ) -> tuple[Flat, SolveInfo]:
    """Run a Krylov ``iterate(x, r, budget) -> (x, iterations, hint)`` to ``tol`` on the true
    residual: after each run the residual is recomputed and, if the estimate drifted, the method
    restarts from the current iterate (residual replacement), at most ``_REFINEMENTS`` times.
    """
    mv, b = problem.matvec, problem.b
    x, r, spent = start_point(problem)
    threshold = stopping_threshold(tol, b)

    def cond(state):
        k, _, r, hint, runs = state
        going = (k < maxiter) & (hint == Status.CONVERGED) & (runs <= _REFINEMENTS)
        return going & (jnp.linalg.norm(r) > threshold)

    def body(state):
        k, x, r, _, runs = state
        x, iterations, hint = iterate(x, r, maxiter - k)
        return k + iterations, x, b - mv(x), hint, runs + 1

    init = (jnp.array(0), x, r, jnp.asarray(Status.CONVERGED, jnp.int32), jnp.array(0))
    k, x, r, hint, runs = jax.lax.while_loop(cond, body, init)
    drifted = (k < maxiter) & (hint == Status.CONVERGED)
    hint = jnp.where(drifted, Status.STAGNATED, hint)
    return finish(mv, b, x, k, k + runs + spent, tol, hint=hint, residual=jnp.linalg.norm(r))


@register("cg")
class CG(KrylovSolver):
    """Preconditioned conjugate gradients, for symmetric positive-definite operators.

    Stops when the true residual ``||b − Ax|| <= tol ||b||``, after ``maxiter`` iterations, or on
    meeting non-positive curvature ``pᵀAp <= 0`` (reported as ``Status.NEGATIVE_CURVATURE``; the
    iterate before it is returned). Reference: Hestenes & Stiefel 1952.
    """

    needs_positive_definite: ClassVar[bool] = True
    budget_rule: ClassVar[str] = "maxiter = max(budget-1, 1); hvp_count = maxiter + 1 (the check)"

    def solve_flat(self, problem: FlatProblem) -> tuple[Flat, SolveInfo]:
        # One loop, one product per iteration: either a CG step (A p) or a check of the true
        # residual (A x). A check follows every apparent convergence, negative curvature and the
        # end of the budget; if the recursive residual drifted, CG restarts from the true one
        # (at most _REFINEMENTS times). A single call site of the operator keeps the compiled
        # program as small as a hand-written CG's.
        mv, precondition, b = problem.matvec, problem.precondition, problem.b
        threshold = stopping_threshold(self.tol, b)
        start = jnp.zeros_like(b) if problem.x0 is None else problem.x0
        z = precondition(b)
        check_first = (problem.x0 is not None) | (jnp.linalg.norm(b) <= threshold)
        converged_code = jnp.asarray(Status.CONVERGED, jnp.int32)
        state = dict(k=jnp.array(0), hvps=jnp.array(0), runs=jnp.array(0), x=start, r=b, p=z,
                     rz=jnp.vdot(b, z), check=check_first, stop=jnp.array(False),
                     hint=converged_code, residual=jnp.linalg.norm(b))

        def body(s):
            product = mv(jnp.where(s["check"], s["x"], s["p"]))
            # The check: the true residual of x, and a restart from it if CG should go on.
            r_true = b - product
            r_norm = jnp.linalg.norm(r_true)
            settled = ((r_norm <= threshold) | (s["k"] >= self.maxiter)
                       | (s["hint"] != Status.CONVERGED) | (s["runs"] >= _REFINEMENTS))
            z_true = precondition(r_true)
            # The step: one CG iteration with A p.
            curvature = jnp.vdot(s["p"], product)
            negative = ~(curvature > 0)
            alpha = jnp.where(negative, 0.0, s["rz"] / jnp.where(negative, 1.0, curvature))
            x_step = s["x"] + alpha * s["p"]
            r_step = s["r"] - alpha * product
            z_step = precondition(r_step)
            rz_step = jnp.vdot(r_step, z_step)
            p_step = z_step + rz_step / jnp.where(s["rz"] == 0, 1.0, s["rz"]) * s["p"]
            k_step = s["k"] + 1
            check_next = (jnp.linalg.norm(r_step) <= threshold) | negative | (
                k_step >= self.maxiter)
            checked = s["check"]
            pick = functools.partial(jnp.where, checked)
            return dict(
                k=pick(s["k"], k_step), hvps=s["hvps"] + 1,
                runs=pick(s["runs"] + 1, s["runs"]),
                x=pick(s["x"], x_step), r=pick(r_true, r_step), p=pick(z_true, p_step),
                rz=pick(jnp.vdot(r_true, z_true), rz_step),
                check=pick(jnp.array(False), check_next), stop=checked & settled,
                hint=pick(s["hint"], jnp.where(negative, Status.NEGATIVE_CURVATURE,
                                               s["hint"]).astype(jnp.int32)),
                residual=pick(r_norm, s["residual"]))

        s = jax.lax.while_loop(lambda s: ~s["stop"], body, state)
        drifted = (s["k"] < self.maxiter) & (s["hint"] == Status.CONVERGED)
        hint = jnp.where(drifted, Status.STAGNATED, s["hint"])
        return finish(mv, b, s["x"], s["k"], s["hvps"], self.tol, hint=hint,
                       residual=s["residual"])


@register("minres")
class MINRES(KrylovSolver):
    """Minimum-residual method for symmetric, possibly indefinite, operators.

    Hessians away from a minimum are indefinite; MINRES minimises ``||b − A x||`` over the Krylov
    space and needs no definiteness (a preconditioner, if given, must be positive definite).
    Reference: Paige & Saunders 1975; the recurrences follow SciPy's ``minres``.
    """

    budget_rule: ClassVar[str] = "maxiter = max(budget-1, 1); hvp_count = maxiter + 1 (the check)"

    def _iterate(self, mv, precondition, b_norm, x, r1, budget):
        dtype = r1.dtype
        eps = jnp.finfo(dtype).eps
        y = precondition(r1)
        beta1 = jnp.sqrt(jnp.maximum(jnp.vdot(r1, y), 0.0))
        zero = jnp.zeros((), dtype)
        zeros = jnp.zeros_like(r1)

        def cond(s):
            floor = 4 * eps
            going = s["phibar"] > jnp.maximum(self.tol, floor) * b_norm
            return (s["k"] < budget) & going & (s["beta"] > 0)

        def body(s):
            beta = s["beta"]
            v = s["y"] / beta
            y = mv(v)
            y = jnp.where(s["k"] >= 1, y - (beta / jnp.where(s["oldb"] > 0, s["oldb"], 1.0))
                          * s["r1"], y)
            alpha = jnp.vdot(v, y)
            y = y - (alpha / beta) * s["r2"]
            r1, r2 = s["r2"], y
            y = precondition(r2)
            oldb = beta
            beta = jnp.sqrt(jnp.maximum(jnp.vdot(r2, y), 0.0))
            beta = jnp.where(beta > 10 * eps * beta1, beta, 0.0)
            oldeps = s["epsln"]
            delta = s["cs"] * s["dbar"] + s["sn"] * alpha
            gbar = s["sn"] * s["dbar"] - s["cs"] * alpha
            epsln = s["sn"] * beta
            dbar = -s["cs"] * beta
            gamma = jnp.maximum(jnp.hypot(gbar, beta), eps)
            cs, sn = gbar / gamma, beta / gamma
            phi = cs * s["phibar"]
            w = (v - oldeps * s["w1"] - delta * s["w2"]) / gamma
            return dict(s, k=s["k"] + 1, x=s["x"] + phi * w, y=y, r1=r1, r2=r2, w1=s["w2"],
                        w2=w, beta=beta, oldb=oldb, dbar=dbar, epsln=epsln, cs=cs, sn=sn,
                        phibar=sn * s["phibar"])

        state = dict(k=jnp.array(0), x=x, y=y, r1=r1, r2=r1, w1=zeros, w2=zeros, beta=beta1,
                     oldb=zero, dbar=zero, epsln=zero, cs=-jnp.ones((), dtype), sn=zero,
                     phibar=beta1)
        s = jax.lax.while_loop(cond, body, state)
        return s["x"], s["k"], jnp.asarray(Status.CONVERGED, jnp.int32)

    def solve_flat(self, problem: FlatProblem) -> tuple[Flat, SolveInfo]:
        # phibar estimates the residual in the preconditioner's norm; compare it with ||b|| in
        # the same norm so that tol is relative in both.
        b_norm = jnp.sqrt(jnp.maximum(jnp.vdot(problem.b, problem.precondition(problem.b)), 0.0))
        mv, precondition = problem.matvec, problem.precondition

        def iterate(x, r, budget):
            return self._iterate(mv, precondition, b_norm, x, r, budget)

        return _refined(iterate, problem, self.maxiter, self.tol)


@register("gmres")
class GMRES(KrylovSolver):
    """Restarted GMRES(m) with right preconditioning, for general (also non-symmetric) operators.

    Each cycle builds an m-dimensional Krylov basis (``restart`` products), solves the small
    least-squares problem and recomputes the true residual; ``maxiter`` counts Krylov products and
    is rounded up to whole cycles. Reference: Saad & Schultz 1986.
    """

    restart: int = 20

    symmetric_only: ClassVar[bool] = False
    budget_rule: ClassVar[str] = ("cycles = ceil(budget/21), restart = max(budget//cycles - 1, 1); "
                                  "hvp_count = cycles * (restart + 1)")

    @classmethod
    def _cycles(cls, budget: int) -> tuple[int, int]:
        """``(cycles, restart)`` with ``cycles · (restart + 1) <= budget`` and restart <= 20."""
        cycles = math.ceil(budget / 21)
        return cycles, max(budget // cycles - 1, 1)

    @classmethod
    def from_budget(cls, budget: int, **options: Any) -> GMRES:
        cycles, restart = cls._cycles(budget)
        return cls(**{"maxiter": restart * cycles, "restart": restart, "tol": 0.0, **options})

    @classmethod
    def hvps_at_budget(cls, budget: int) -> int:
        cycles, restart = cls._cycles(budget)
        return cycles * (restart + 1)

    def __post_init__(self):
        super().__post_init__()
        check_positive_int(self, "restart")

    def _cycle(self, mv, precondition, x, r):
        m = self.restart
        beta = jnp.linalg.norm(r)
        basis = jnp.zeros((m + 1, r.shape[0]), r.dtype).at[0].set(r / jnp.where(beta > 0, beta, 1))
        hessenberg = jnp.zeros((m + 1, m), r.dtype)

        def arnoldi(j, carry):
            basis, hessenberg = carry
            w = mv(precondition(basis[j]))
            h = basis @ w
            w = w - basis.T @ h
            correction = basis @ w  # second Gram-Schmidt pass: orthogonality in finite precision
            w, h = w - basis.T @ correction, h + correction
            norm = jnp.linalg.norm(w)
            h = h.at[j + 1].set(norm)
            nxt = w / jnp.where(norm > 0, norm, 1.0)
            return basis.at[j + 1].set(nxt), hessenberg.at[:, j].set(h)

        basis, hessenberg = jax.lax.fori_loop(0, m, arnoldi, (basis, hessenberg))
        rhs = jnp.zeros((m + 1,), r.dtype).at[0].set(beta)
        coefficients = jnp.linalg.lstsq(hessenberg, rhs)[0]
        return x + precondition(basis[:m].T @ coefficients)

    def solve_flat(self, problem: FlatProblem) -> tuple[Flat, SolveInfo]:
        mv, b, precondition = problem.matvec, problem.b, problem.precondition
        x, r, spent = start_point(problem)
        threshold = stopping_threshold(self.tol, b)

        def cond(state):
            k, _, r = state
            return (k < self.maxiter) & (jnp.linalg.norm(r) > threshold)

        def body(state):
            # The residual recomputed after each cycle is exact: it is both the stopping test and
            # the next cycle's start, and the one reported.
            k, x, r = state
            x = self._cycle(mv, precondition, x, r)
            return k + self.restart, x, b - mv(x)

        k, x, r = jax.lax.while_loop(cond, body, (jnp.array(0), x, r))
        cycles = k // self.restart
        hint = jnp.where(k < self.maxiter, Status.STAGNATED, Status.CONVERGED)
        return finish(mv, b, x, k, k + cycles + spent, self.tol, hint=hint,
                       residual=jnp.linalg.norm(r))


# --------------------------------------------------------------------------------------------
# Series and approximations.


class _FlatOperator(LinearOperator):
    def __init__(self, matvec, n, dtype):
        self._matvec, self.structure = matvec, jax.ShapeDtypeStruct((n,), dtype)

    def mv(self, vector):
        return self._matvec(vector)


class NeumannSeries(IterationBudget):
    """What the Neumann-series solvers (Neumann, LiSSA) share: a step ``α`` from power
    iteration, divergence checks, and a budget of ``maxiter`` terms with the check on top.

    A subclass declares the fields ``maxiter``, ``alpha``, ``power_maxiter`` and
    ``divergence`` (in its own order) and checks its other fields after ``super()``'s.
    """

    needs_positive_definite: ClassVar[bool] = True
    stationary_iteration: ClassVar[bool] = True
    check_in_budget: ClassVar[bool] = False
    renamed_fields: ClassVar[dict[str, str]] = {"power_iters": "power_maxiter"}

    def __post_init__(self):
        check_positive_int(self, "maxiter")
        check_positive_int(self, "power_maxiter")
        check_positive_or_none(self, "alpha")
        check_positive_or_none(self, "divergence")

    def step_size(self, problem: FlatProblem) -> tuple[jax.Array, int]:
        """The step ``α`` and the products spent choosing it.

        With ``alpha=None``, ``α = 1 / |λ̂|`` from power iteration on the preconditioned
        operator: a power-iteration estimate approaches ``λ_max`` from below, so ``α`` stays
        under ``2/λ_max`` as long as the estimate exceeds ``λ_max / 2``.
        """
        if self.alpha is not None:
            return jnp.asarray(self.alpha, problem.b.dtype), 0
        preconditioned = _FlatOperator(lambda v: problem.matvec(problem.precondition(v)),
                                       problem.b.shape[0], problem.b.dtype)
        estimate, _ = power_iteration(preconditioned, self.power_maxiter,
                                      jax.random.fold_in(problem.key, 1))
        estimate = jnp.abs(estimate)
        return jnp.where(estimate > 0, 1.0 / estimate, jnp.nan), self.power_maxiter


@register("neumann")
class Neumann(NeumannSeries):
    """Truncated Neumann series ``H⁻¹b ≈ α Σ_{j<K} (I − αH)^j b`` (Lorraine et al. 2020).

    Run as Richardson iteration ``x ← x + αP(b − Ax)``, which is the same series; ``maxiter`` K is
    the number of terms (products). Converges for ``0 < α < 2/λ_max`` on SPD operators, slowly
    when the condition number is large; on indefinite operators it diverges, which is reported.

    Fields:
      maxiter: series terms K.
      alpha: step α; ``None`` picks ``1/|λ̂|`` from ``power_maxiter`` steps of power iteration.
      tol: relative residual counted as converged (the loop also stops there).
      power_maxiter: power-iteration products spent estimating ``λ_max`` when ``alpha`` is
        None (``power_iters`` is its deprecated name).
      divergence: stop, reporting ``DIVERGED``, once ``||r||`` exceeds ``divergence`` times the
        starting residual (``||b||``, or a warm start's if larger). On an SPD operator with a
        convergent step the residual never grows, so the default 1 flags any growth.
    """

    maxiter: int = 50
    alpha: float | None = None
    tol: float = 1e-6
    power_maxiter: int = 20
    divergence: float = 1.0
    accepts_preconditioner: ClassVar[bool] = True
    accepts_init: ClassVar[bool] = True
    budget_rule: ClassVar[str] = ("maxiter = budget terms; hvp_count = budget + 1 (the check), "
                                  "plus power_maxiter when alpha is None")

    def __post_init__(self):
        super().__post_init__()
        check_tolerance(self)

    def solve_flat(self, problem: FlatProblem) -> tuple[Flat, SolveInfo]:
        mv, b, precondition = problem.matvec, problem.b, problem.precondition
        alpha, spent_alpha = self.step_size(problem)
        x, r, spent = start_point(problem)
        # Divergence is growth past the start: ||b|| from zero, or a warm start's own residual.
        start_residual = jnp.linalg.norm(r)
        limit = self.divergence * jnp.maximum(jnp.linalg.norm(b), start_residual)
        threshold = stopping_threshold(self.tol, b)

        def cond(state):
            k, _, r = state
            r_norm = jnp.linalg.norm(r)
            going = (r_norm > threshold) & (r_norm <= limit)
            return (k < self.maxiter) & going & jnp.isfinite(r_norm)

        def body(state):
            k, x, r = state
            step = alpha * precondition(r)
            return k + 1, x + step, r - mv(step)

        k, x, _ = jax.lax.while_loop(cond, body, (jnp.array(0), x, r))
        hint = jnp.where(k < self.maxiter, Status.STAGNATED, Status.CONVERGED)
        return finish(mv, b, x, k, k + spent + spent_alpha, self.tol, hint=hint,
                       divergence=self.divergence, start_residual=start_residual)


@register("lissa")
class LiSSA(NeumannSeries):
    """LiSSA: the Neumann series with a fresh minibatch Hessian per term (Agarwal et al. 2017).

    ``v_0 = b``, ``v_j = b + (I − α H_j) v_{j−1}``, ``x = α v_K``, where ``H_j`` is the operator on
    a random minibatch of ``batch_size`` examples; ``num_samples`` independent chains are averaged.
    The operator must be built with ``batch_argnums`` (``hvp.hessian(..., batch_argnums=...)``).

    Fields:
      maxiter: depth K (minibatch products per chain).
      batch_size: examples per minibatch Hessian.
      num_samples: independent chains, averaged (run with ``vmap``).
      alpha: step (``1/scale`` in the paper); ``None`` means ``1/|λ̂|`` of the full operator.
      tol: relative residual below which the estimate counts as converged; the default 1 asks
        only that it beats ``x = 0``, else ``Status.INACCURATE``; ``None`` checks finiteness only.
      power_maxiter: products for the ``λ_max`` estimate when ``alpha`` is None
        (``power_iters`` is its deprecated name).
      divergence: the series is reported ``DIVERGED`` once ``||r|| > divergence · ||b||``.
      seed: seed of the default key; pass ``key=`` to :func:`solve` to override.
    """

    maxiter: int = 100
    batch_size: int = 32
    num_samples: int = 1
    alpha: float | None = None
    tol: float | None = 1.0
    power_maxiter: int = 20
    divergence: float = 1.0
    seed: int = 0

    approximation: ClassVar[bool] = True
    budget_rule: ClassVar[str] = ("maxiter = budget minibatch products; hvp_count = budget + 1 "
                                  "(the check), plus power_maxiter when alpha is None")

    def __post_init__(self):
        super().__post_init__()
        check_positive_int(self, "batch_size")
        check_positive_int(self, "num_samples")
        check_tolerance(self, allow_none=True)

    def check_operator(self, operator: LinearOperator) -> None:
        if getattr(operator, "batch_argnums", None) is None:
            raise ValueError("hvp.LiSSA: the operator must be built with batch_argnums, e.g. "
                             "hvp.hessian(loss, params, x, y, batch_argnums=(0, 1)), so that LiSSA "
                             "can draw a minibatch Hessian per term")

    def solve_flat(self, problem: FlatProblem) -> tuple[Flat, SolveInfo]:
        operator, b = problem.operator, problem.b
        alpha, spent_alpha = self.step_size(problem)

        def chain(key):
            def step(v, key_j):
                minibatch = operator.subsample(key_j, self.batch_size)
                return b + v - alpha * minibatch.flat_mv(v).astype(b.dtype), None

            v, _ = jax.lax.scan(step, b, jax.random.split(key, self.maxiter))
            return alpha * v

        keys = jax.random.split(problem.key, self.num_samples)
        x = jnp.mean(jax.vmap(chain)(keys), axis=0)
        return finish(problem.matvec, b, x, self.maxiter,
                       self.maxiter * self.num_samples + spent_alpha, self.tol,
                       hint=Status.INACCURATE, divergence=self.divergence)


@register("nystrom")
class Nystrom(AbstractSolver):
    """Nyström low-rank inverse: ``(C W⁺ Cᵀ + ρI)⁻¹ b``.

    ``C = AΩ`` from one batch of ``rank`` products and ``W = ΩᵀAΩ``. With ``sketch="columns"`` Ω
    selects ``rank`` random coordinates (Hataya & Yamada 2023); with ``sketch="gaussian"`` Ω is a
    Gaussian test matrix (randomised Nyström, Gittens & Mahoney 2016). The approximation is
    diagonalised as ``U Λ Uᵀ`` and inverted as ``U (Λ+ρ)⁻¹ Uᵀ b + (b − U Uᵀ b)/ρ``, which equals
    the Woodbury form without its cancellation. No iterations; ``rho`` regularises the directions
    the sketch does not see (and must exceed ``−λ`` of any negative Ritz value).

    Fields:
      rank: sketch size k (at most the operator size).
      rho: damping ρ > 0 added to the low-rank approximation.
      sketch: ``"columns"`` or ``"gaussian"``.
      tol: relative residual below which the estimate counts as converged; the default 1 asks
        only that it beats ``x = 0``, else ``Status.INACCURATE``; ``None`` checks finiteness only.
      seed: seed of the default key; pass ``key=`` to :func:`solve` to override.
    """

    rank: int = 10
    rho: float = 1e-2
    sketch: str = "columns"
    tol: float | None = 1.0
    seed: int = 0

    approximation: ClassVar[bool] = True
    budget_rule: ClassVar[str] = "rank = budget (one batch of products); hvp_count = budget + 1"

    @classmethod
    def from_budget(cls, budget: int, **options: Any) -> Nystrom:
        return cls(**{"rank": budget, "tol": 0.0, **options})

    @classmethod
    def hvps_at_budget(cls, budget: int) -> int:
        return budget + 1

    def __post_init__(self):
        check_positive_int(self, "rank")
        check_positive_or_none(self, "rho")
        if self.rho is None:
            raise ValueError("Nystrom: rho must be a finite number > 0, got None")
        if self.sketch not in ("columns", "gaussian"):
            raise ValueError(f"Nystrom: sketch must be 'columns' or 'gaussian', "
                             f"got {self.sketch!r}")
        check_tolerance(self, allow_none=True)

    def check_operator(self, operator: LinearOperator) -> None:
        if self.rank > operator.size:
            raise ValueError(f"hvp.Nystrom: rank={self.rank} exceeds the problem size "
                             f"{operator.size}")

    def solve_flat(self, problem: FlatProblem) -> tuple[Flat, SolveInfo]:
        b = problem.b
        n, k = b.shape[0], self.rank
        if self.sketch == "columns":
            index = jax.random.choice(problem.key, n, (k,), replace=False)
            omega = jnp.zeros((k, n), b.dtype).at[jnp.arange(k), index].set(1.0)
        else:
            omega = jax.random.normal(problem.key, (k, n), b.dtype)
        sketch = jax.vmap(problem.matvec)(omega).T  # C = AΩ, (n, k): one batch of k products
        core = omega @ sketch  # W = ΩᵀAΩ, (k, k)
        # A Householder QR of the tall sketch: the Gram-matrix shortcut (eigh of CᵀC) is faster on
        # a CPU but squares C's condition number, which the 1/ρ below then amplifies.
        q, r = jnp.linalg.qr(sketch)
        # C W⁺ Cᵀ = Q (R W⁺ Rᵀ) Qᵀ = U Λ Uᵀ; inverting in this eigenbasis avoids the
        # cancellation of the textbook Woodbury form when ρ is small.
        inner = r @ jnp.linalg.pinv((core + core.T) / 2, hermitian=True) @ r.T
        eigenvalues, eigenvectors = jnp.linalg.eigh((inner + inner.T) / 2)
        basis = q @ eigenvectors
        coefficients = basis.T @ b
        outside = (b - basis @ coefficients) / self.rho  # the part of b the sketch does not see
        x = basis @ (coefficients / (eigenvalues + self.rho)) + outside
        return finish(problem.matvec, b, x, 1, k, self.tol, hint=Status.INACCURATE)


@register("identity")
class Identity(AbstractSolver):
    """``H⁻¹ ≈ scale · I`` (times the preconditioner, if given): the one-step look-ahead.

    The T1-T2 / DARTS first-order approximation (Luketina et al. 2016; Liu et al. 2019). Costs no
    products but the residual check. The default ``tol=1`` asks only that ``x`` beats ``x = 0``
    (else ``Status.INACCURATE``); ``None`` checks finiteness only.
    """

    scale: float = 1.0
    tol: float | None = 1.0
    accepts_preconditioner: ClassVar[bool] = True

    approximation: ClassVar[bool] = True
    budget_rule: ClassVar[str] = "x = scale * b whatever the budget; hvp_count = 1 (the check)"

    @classmethod
    def from_budget(cls, budget: int, **options: Any) -> Identity:
        return cls(**{"tol": 0.0, **options})

    @classmethod
    def hvps_at_budget(cls, budget: int) -> int:
        return 1

    def __post_init__(self):
        check_positive_or_none(self, "scale")
        if self.scale is None:
            raise ValueError("Identity: scale must be a finite number > 0, got None")
        check_tolerance(self, allow_none=True)

    def solve_flat(self, problem: FlatProblem) -> tuple[Flat, SolveInfo]:
        x = self.scale * problem.precondition(problem.b)
        return finish(problem.matvec, problem.b, x, 0, 0, self.tol, hint=Status.INACCURATE)


@register("dense")
class Dense(AbstractSolver):
    """Exact solve on the materialised operator (``size`` products, then LU): the reference.

    Refuses operators with more than ``max_size`` rows. Singular operators give a non-finite
    result, which is reported.
    """

    max_size: int = 5000
    tol: float | None = None

    symmetric_only: ClassVar[bool] = False
    budget_rule: ClassVar[str] = "the whole matrix whatever the budget; hvp_count = n"

    @classmethod
    def from_budget(cls, budget: int, **options: Any) -> Dense:
        return cls(**options)

    @classmethod
    def hvps_at_budget(cls, budget: int) -> int:
        raise ValueError("hvp.Dense spends one product per row of the operator, not a budget")

    def __post_init__(self):
        check_positive_int(self, "max_size")
        check_tolerance(self, allow_none=True)

    def check_operator(self, operator: LinearOperator) -> None:
        if operator.size > self.max_size:
            raise ValueError(f"hvp.Dense: the operator has {operator.size} rows, more than "
                             f"max_size={self.max_size}; use an iterative solver or raise "
                             f"max_size")

    def solve_flat(self, problem: FlatProblem) -> tuple[Flat, SolveInfo]:
        matrix = problem.operator.dense(self.max_size).astype(problem.b.dtype)
        x = jnp.linalg.solve(matrix, problem.b)
        residual = jnp.linalg.norm(problem.b - matrix @ x)
        return finish(problem.matvec, problem.b, x, 1, problem.b.shape[0], self.tol,
                       residual=residual)


# --------------------------------------------------------------------------------------------
# The entry point.


def _describe_solve(status, iterations, hvps, residual) -> str:
    return "the solve failed: " + status_message(
        SolveInfo(residual, iterations, status == Status.CONVERGED, hvps, status))


def solve(operator: LinearOperator, vector: PyTree, solver: AbstractSolver, *,
          preconditioner: LinearOperator | None = None, init: PyTree | None = None,
          key: jax.Array | None = None, on_failure: str = "warn") -> tuple[PyTree, SolveInfo]:
    """Solve ``A x = b`` for a symmetric operator with any solver: ``x ≈ A⁻¹ b``.

    Args:
      operator: a :class:`hvp.LinearOperator` (from :func:`hvp.hessian`, :func:`hvp.ggn`, ...).
      vector: b, a pytree shaped like ``operator.structure``.
      solver: a solver instance (``hvp.CG()``, ``hvp.Neumann(maxiter=10)``, ...).
      preconditioner: ``M⁻¹`` as an operator (e.g. :func:`hvp.jacobi_preconditioner`), for the
        solvers that accept one.
      init: a starting guess (warm start), for the iterative solvers that accept one.
      key: PRNG key for randomised solvers (Nyström, LiSSA, Neumann's power iteration); ``None``
        means ``jax.random.key(solver.seed)`` (or 0), so results are reproducible.
      on_failure: what to do when the solve did not converge: ``"warn"`` (default: one
        :class:`hvp.SolveWarning` line with the status, iterations and residual, attributed to
        the line that called ``hvp.solve``), ``"raise"`` (:class:`hvp.SolveError`; under
        ``jit`` it surfaces as itself through :func:`hvp.jit`) or ``"ignore"`` (``info``
        alone says so).

    Returns:
      ``(x, info)``: x shaped like ``vector``, and a :class:`SolveInfo`.
    """
    where = "hvp.solve"
    if not isinstance(operator, LinearOperator):
        raise TypeError(f"{where}: operator must be an hvp.LinearOperator (from hvp.hessian, "
                        f"hvp.ggn, ...), got {type(operator).__name__}")
    if not isinstance(solver, AbstractSolver):
        raise TypeError(f"{where}: solver must be an hvp solver such as hvp.CG(), got "
                        f"{type(solver).__name__}")
    _checks.check_on_failure(where, on_failure)
    _checks.check_floating(where, "vector", vector)
    _checks.check_same_structure(where, "vector", vector, "operator.structure",
                                 operator.structure)
    name = type(solver).__name__
    if preconditioner is not None and not solver.accepts_preconditioner:
        raise ValueError(f"{where}: {name} does not take a preconditioner")
    if init is not None and not solver.accepts_init:
        raise ValueError(f"{where}: {name} does not take init (a warm start)")
    solver.check_operator(operator)

    # Solve in the operator's dtypes; hand x back in the vector's own dtypes.
    as_operator = jax.tree_util.tree_map(lambda v, s: v.astype(s.dtype), vector,
                                         operator.structure)
    b = ravel_pytree(as_operator)[0]
    dtype = b.dtype
    if init is not None:
        _checks.check_same_structure(where, "init", init, "vector", vector)
        x0 = ravel_pytree(jax.tree_util.tree_map(lambda v, s: v.astype(s.dtype), init,
                                                 operator.structure))[0]
    else:
        x0 = None
    precondition = (lambda v: v) if preconditioner is None else preconditioner.flat_mv
    if key is None:
        key = jax.random.key(getattr(solver, "seed", 0))
    problem = FlatProblem(lambda v: operator.flat_mv(v).astype(dtype), b,
                       lambda v: precondition(v).astype(dtype), x0, key, operator)
    x, info = solver.solve_flat(problem)
    _checks.report_failure(where, ~info.converged, _describe_solve,
                           (info.status, info.iterations, info.hvp_count, info.residual_norm),
                           on_failure)
    solution = jax.tree_util.tree_map(lambda x_, v: x_.astype(jnp.result_type(v)),
                                      operator.unravel(x), vector)
    return solution, info
