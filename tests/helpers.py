"""One registry of solvers and problems, so a new solver is tested everywhere at once.

Adding a solver: add it to ``SOLVERS`` with the problem kinds it must solve exactly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from conftest import random_indefinite, random_spd
from jax.flatten_util import ravel_pytree

import hvp

#: A pytree of mixed shapes with 12 entries in all.
TEMPLATE = {"w": jnp.zeros((2, 3)), "b": jnp.zeros((4,)), "c": (jnp.zeros((2,)),)}
SIZE = 12


@dataclasses.dataclass(frozen=True)
class Problem:
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


PROBLEMS = {
    "spd": Problem("spd", random_spd(0, SIZE, condition=10.0)),
    "ill": Problem("ill", random_spd(1, SIZE, condition=1e4)),
    "indefinite": Problem("indefinite", random_indefinite(2, SIZE)),
}

#: name -> (solver configured to solve exactly, the problem kinds it must solve, relative error
#: allowed against a float64 dense solve). Nyström at full rank is exact up to its damping ρ and
#: the ε/ρ round-off of projecting onto the complement of the sketch.
SOLVERS = {
    "cg": (hvp.CG(maxiter=100, tol=1e-11), {"spd", "ill"}, 1e-10),
    "minres": (hvp.MINRES(maxiter=100, tol=1e-11), {"spd", "ill", "indefinite"}, 1e-10),
    "gmres": (hvp.GMRES(maxiter=100, restart=12, tol=1e-11), {"spd", "ill", "indefinite"},
              1e-10),
    "neumann": (hvp.Neumann(maxiter=2000, tol=1e-11), {"spd"}, 1e-10),
    "nystrom": (hvp.Nystrom(rank=SIZE, rho=1e-8), {"spd", "ill", "indefinite"}, 1e-6),
    "nystrom-gaussian": (hvp.Nystrom(rank=SIZE, rho=1e-8, sketch="gaussian"),
                         {"spd", "ill", "indefinite"}, 1e-6),
    "dense": (hvp.Dense(), {"spd", "ill", "indefinite"}, 1e-10),
}

CASES = [(s, p) for s, (_, kinds, _) in SOLVERS.items() for p in sorted(kinds)]


def flat(tree):
    return ravel_pytree(tree)[0]


def relative_error(x, reference):
    return float(jnp.linalg.norm(flat(x) - flat(reference)) / jnp.linalg.norm(flat(reference)))
