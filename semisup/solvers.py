"""The inverse-HVP solvers a meta-step can use (``Config.solver``), read from :data:`hvp.SOLVERS`,
and how ``Config.maxiter`` sets them (:func:`make_solver`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

import hvp
from semisup.weighting import NameView

#: The solver a meta-step never uses: the exact reference materialises the Hessian each time.
REFERENCE = "dense"
#: The relative residual the meta-step's iterative solvers stop at.
SOLVER_TOL = 1e-6
#: The settings of the solvers the committed results used, kept so that they reproduce:
#: name -> its options from ``(maxiter, damping)``. Every other solver of :data:`SOLVERS` is
#: ``hvp.make_solver(name, maxiter + 1, tol=SOLVER_TOL)``: the products of ``maxiter`` CG
#: iterations plus the residual check (its class's ``budget_rule`` says how).
SOLVER_SETTINGS: dict[str, Callable[[int, float], dict[str, Any]]] = {
    "identity": lambda iters, damping: {"tol": None},
    "neumann": lambda iters, damping: {"maxiter": iters, "tol": SOLVER_TOL},
    "cg": lambda iters, damping: {"maxiter": iters, "tol": SOLVER_TOL},
    "nystrom": lambda iters, damping: {"rank": iters, "rho": max(damping, 1e-3)},
}


def _probe_loss(params):
    return jnp.sum(params ** 2)


def usable_solver(name: str) -> bool:
    """Whether the solver ``name`` of :data:`hvp.SOLVERS` can make a meta-step: it is not the
    reference, it can be built from a budget, and its ``check_operator`` accepts the operator a
    meta-step hands it, the full-batch Hessian of :func:`bilevel.hypergrad`. That Hessian has no
    ``batch_argnums``: its labelled and unlabelled arguments have different batch sizes, so it
    cannot draw one minibatch of them. LiSSA, which needs one, is refused on that ground."""
    if name == REFERENCE or name not in hvp.SOLVERS:
        return False
    operator = hvp.hessian(_probe_loss, np.zeros(2, np.float32))  # abstract: nothing computed
    try:
        hvp.make_solver(name, 1).check_operator(operator)
    except (ValueError, TypeError):
        return False
    return True


#: The solvers a meta-step can use (``Config.solver``): the registered ones :func:`usable_solver`
#: accepts, in registration order; a live view of :data:`hvp.SOLVERS`.
SOLVERS = NameView(lambda: tuple(name for name in hvp.SOLVERS if usable_solver(name)),
                   usable_solver)


def make_solver(name: str, iters: int, damping: float = 0.0) -> hvp.AbstractSolver:
    """The inverse-HVP approximation ``name`` (of :data:`SOLVERS`) with ``iters`` iterations
    (``Config.maxiter``).

    The solvers of :data:`SOLVER_SETTINGS` get their settings from there (Neumann terms, CG
    iterations, Nyström rank ``iters`` with ``rho = max(damping, 1e-3)``); any other is
    ``hvp.make_solver(name, iters + 1, tol=SOLVER_TOL)``, the budget of ``iters`` CG iterations.
    """
    if name not in SOLVERS:
        raise ValueError(f"semisup.make_solver: unknown solver {name!r}; choose from "
                         f"{tuple(SOLVERS)}")
    if name in SOLVER_SETTINGS:
        return hvp.make_solver(name, **SOLVER_SETTINGS[name](iters, damping))
    has_tol = "tol" in {field.name for field in dataclasses.fields(hvp.SOLVERS[name])}
    return hvp.make_solver(name, iters + 1, **({"tol": SOLVER_TOL} if has_tol else {}))
