"""The registry of solvers and problems the solver tests run over, drawn from ``hvp.SOLVERS``.

A solver registered in :mod:`hvp` is tested here with no edit: every solver that is not an
approximation is configured by its own ``from_budget`` to solve exactly, and its class flags say
which problems it must solve (``needs_positive_definite``, ``symmetric_only``,
``stationary_iteration``). Approximations that are exact in a special setting (Nyström at full
rank) are added by hand.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from conftest import random_indefinite, random_spd
from jax.flatten_util import ravel_pytree

import hvp

#: A pytree of mixed shapes with 12 entries in all.
TEMPLATE = {"w": jnp.zeros((2, 3)), "b": jnp.zeros((4,)), "c": (jnp.zeros((2,)),)}
SIZE = 12


@dataclasses.dataclass(frozen=True)
class Problem:
    """A Hessian of ``0.5 xᵀ M x`` over the pytree :data:`TEMPLATE` (symmetric ``M``)."""

    name: str
    matrix: jax.Array

    def loss(self, params):
        x = ravel_pytree(params)[0]
        return 0.5 * x @ self.matrix.astype(x.dtype) @ x

    def operator(self, dtype=jnp.float64):
        params = jax.tree_util.tree_map(lambda t: t.astype(dtype), TEMPLATE)
        return hvp.hessian(self.loss, params)

    def rhs(self, seed=1, dtype=jnp.float64):
        flat = jax.random.normal(jax.random.key(seed), (SIZE,), dtype)
        return ravel_pytree(jax.tree_util.tree_map(lambda t: t.astype(dtype), TEMPLATE))[1](flat)

    def reference(self, b):
        return jnp.linalg.solve(self.matrix, ravel_pytree(b)[0])


@dataclasses.dataclass(frozen=True)
class MatrixProblem(Problem):
    """A non-symmetric ``M`` as a :class:`hvp.MatrixOperator` on flat vectors."""

    def operator(self, dtype=jnp.float64):
        return hvp.MatrixOperator(self.matrix.astype(dtype))

    def rhs(self, seed=1, dtype=jnp.float64):
        return jax.random.normal(jax.random.key(seed), (SIZE,), dtype)


def random_nonsymmetric(seed: int, n: int) -> jax.Array:
    """Well-conditioned and far from symmetric: a shifted random matrix."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(4.0 * np.eye(n) + rng.standard_normal((n, n)), jnp.float64)


PROBLEMS = {
    "spd": Problem("spd", random_spd(0, SIZE, condition=10.0)),
    "ill": Problem("ill", random_spd(1, SIZE, condition=1e4)),
    "indefinite": Problem("indefinite", random_indefinite(2, SIZE)),
    "nonsymmetric": MatrixProblem("nonsymmetric", random_nonsymmetric(3, SIZE)),
}


def problem_kinds(cls: type[hvp.AbstractSolver]) -> set[str]:
    """The problems a registered solver must solve exactly, from its class flags."""
    kinds = {"spd"}
    if not cls.stationary_iteration:
        kinds.add("ill")
    if not cls.needs_positive_definite:
        kinds.add("indefinite")
    if not cls.symmetric_only:
        kinds.add("nonsymmetric")
    return kinds


def exact_solver(cls: type[hvp.AbstractSolver]) -> hvp.AbstractSolver:
    """The solver at a budget large enough to solve the test problems to round-off."""
    budget = 4000 if cls.stationary_iteration else 8 * SIZE + 1
    return cls.from_budget(budget, tol=1e-11)


#: name -> (solver configured to solve exactly, the problem kinds it must solve, relative error
#: allowed against a float64 dense solve). Nyström at full rank is exact up to its damping ρ and
#: the ε/ρ round-off of projecting onto the complement of the sketch.
SOLVERS = {
    name: (exact_solver(cls), problem_kinds(cls), 1e-10)
    for name, cls in hvp.SOLVERS.items() if not cls.approximation
} | {
    "nystrom": (hvp.Nystrom(rank=SIZE, rho=1e-8), {"spd", "ill", "indefinite"}, 1e-6),
    "nystrom-gaussian": (hvp.Nystrom(rank=SIZE, rho=1e-8, sketch="gaussian"),
                         {"spd", "ill", "indefinite"}, 1e-6),
}

#: Registered approximations: run at a budget, they must report honestly, not solve exactly.
APPROXIMATIONS = sorted(name for name, cls in hvp.SOLVERS.items() if cls.approximation)

CASES = [(s, p) for s, (_, kinds, _) in SOLVERS.items() for p in sorted(kinds)]


def flat(tree):
    return ravel_pytree(tree)[0]


def relative_error(x, reference):
    return float(jnp.linalg.norm(flat(x) - flat(reference)) / jnp.linalg.norm(flat(reference)))
