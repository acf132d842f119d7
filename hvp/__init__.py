"""hvp: curvature products, linear operators and inverse-HVP solvers for JAX pytrees.

The public API is what this module exports; everything else may change.
"""

from hvp import checks
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
    AbstractSolver,
    Dense,
    Identity,
    LiSSA,
    Neumann,
    Nystrom,
    SolveInfo,
    Status,
    solve,
    status_message,
)
from hvp.spectral import Spectrum, extreme_eigenvalues, lanczos, power_iteration

__all__ = [
    "CG",
    "ON_FAILURE",
    "SolveError",
    "SolveWarning",
    "checks",
    "jit",
    "surface_errors",
    "DEFAULT_DENSE_LIMIT",
    "GMRES",
    "MINRES",
    "AbstractSolver",
    "Dense",
    "DiagonalOperator",
    "GGNOperator",
    "HessianOperator",
    "Identity",
    "LiSSA",
    "LinearOperator",
    "MatrixOperator",
    "Neumann",
    "Nystrom",
    "SolveInfo",
    "Spectrum",
    "Status",
    "cross_vp",
    "extreme_eigenvalues",
    "ggn",
    "ggn_vp",
    "hessian",
    "hvp",
    "hvp_and_cross_vp",
    "jacobi_preconditioner",
    "lanczos",
    "power_iteration",
    "solve",
    "status_message",
]
