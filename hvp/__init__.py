"""hvp: curvature products, linear operators and inverse-HVP solvers for JAX pytrees.

The public API is what this module exports; everything else may change. Solvers are listed by
name in :data:`SOLVERS` (``make_solver(name, budget)`` builds one); a new solver is a module
that registers itself (see :class:`AbstractSolver` for the protocol, :mod:`hvp.bicgstab` for an
example) and one import line below.
"""

# ruff: noqa: F401  (__all__ is computed: it lists every registered solver)
from hvp import checks
from hvp.bicgstab import BiCGStab
from hvp.checks import ON_FAILURE, SolveError, SolveWarning, jit, surface_errors
from hvp.operators import (
    DEFAULT_DENSE_LIMIT,
    DiagonalOperator,
    GGNOperator,
    HessianOperator,
    LinearOperator,
    MatrixOperator,
    ggn,
    hessian,
    jacobi_preconditioner,
)
from hvp.products import cross_vp, ggn_vp, hvp, hvp_and_cross_vp
from hvp.solvers import (
    CG,
    GMRES,
    MINRES,
    SOLVERS,
    AbstractSolver,
    Dense,
    FlatProblem,
    Identity,
    LiSSA,
    Neumann,
    Nystrom,
    SolveInfo,
    Status,
    make_solver,
    register,
    solve,
    status_message,
)
from hvp.spectral import Spectrum, extreme_eigenvalues, lanczos, power_iteration

__all__ = sorted({
    "AbstractSolver",
    "DEFAULT_DENSE_LIMIT",
    "DiagonalOperator",
    "FlatProblem",
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    "MatrixOperator",
    "ON_FAILURE",
    "SOLVERS",
    "SolveError",
    "SolveInfo",
    "SolveWarning",
    "Spectrum",
    "Status",
    "checks",
    "cross_vp",
    "extreme_eigenvalues",
    "ggn",
    "ggn_vp",
    "hessian",
    "hvp",
    "hvp_and_cross_vp",
    "jacobi_preconditioner",
    "jit",
    "lanczos",
    "make_solver",
    "power_iteration",
    "register",
    "solve",
    "status_message",
    "surface_errors",
    # Every registered solver class, so a new one needs no line here.
    *(solver.__name__ for solver in SOLVERS.values()),
})
