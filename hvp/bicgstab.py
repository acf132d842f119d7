"""BiCGStab: Krylov solves of non-symmetric systems in two products per iteration.

Written against the public solver protocol (:class:`hvp.AbstractSolver`, here through
:class:`hvp.solvers.KrylovSolver`, which holds the fields, checks and budget rule the Krylov
solvers share) only: it is what a new solver looks like, and registering it puts it in
:data:`hvp.SOLVERS` and, from there, in every entry point that lists solvers.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from hvp.solvers import (
    Flat,
    FlatProblem,
    KrylovSolver,
    SolveInfo,
    Status,
    finish,
    register,
    start_point,
    stopping_threshold,
)


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    return numerator / jnp.where(denominator == 0, 1.0, denominator)


@register("bicgstab")
class BiCGStab(KrylovSolver):
    """Right-preconditioned BiCGStab, for any square operator (van der Vorst 1992).

    For operators that are not exactly symmetric, where CG and MINRES assume what is not so:
    reverse-over-forward products with round-off, a non-symmetric preconditioner, or a
    non-symmetric Jacobian in a fixed-point hypergradient. Each iteration costs two products.
    A breakdown (``⟨r̂, r⟩ = 0``, ``⟨r̂, A p⟩ = 0`` or ``ω = 0`` before ``tol`` is met) stops the
    iteration, and the true residual decides the status (``STAGNATED`` if it missed ``tol``).
    """

    symmetric_only: ClassVar[bool] = False
    products_per_iteration: ClassVar[int] = 2
    budget_rule: ClassVar[str] = ("maxiter = max((budget-1)//2, 1) (two products each); "
                                  "hvp_count = 2 * maxiter + 1")

    def solve_flat(self, problem: FlatProblem) -> tuple[Flat, SolveInfo]:
        mv, precondition, b = problem.matvec, problem.precondition, problem.b
        x, r, spent = start_point(problem)
        threshold = stopping_threshold(self.tol, b)
        one, zero = jnp.ones((), b.dtype), jnp.zeros_like(b)
        state = dict(k=jnp.array(0), x=x, r=r, r_hat=r, p=zero, v=zero, rho=one, alpha=one,
                     omega=one, broke=jnp.array(False))

        def going(s):
            return (s["k"] < self.maxiter) & ~s["broke"] & (jnp.linalg.norm(s["r"]) > threshold)

        def body(s):
            rho = jnp.vdot(s["r_hat"], s["r"])
            beta = _safe_divide(rho, s["rho"]) * _safe_divide(s["alpha"], s["omega"])
            p = s["r"] + beta * (s["p"] - s["omega"] * s["v"])
            y = precondition(p)
            v = mv(y)
            r_hat_v = jnp.vdot(s["r_hat"], v)
            alpha = _safe_divide(rho, r_hat_v)
            h = s["x"] + alpha * y
            residual = s["r"] - alpha * v
            z = precondition(residual)
            t = mv(z)
            omega = _safe_divide(jnp.vdot(t, residual), jnp.vdot(t, t))
            r = residual - omega * t
            solved = jnp.linalg.norm(r) <= threshold
            broke = ((rho == 0) | (r_hat_v == 0) | (omega == 0)) & ~solved
            return dict(k=s["k"] + 1, x=h + omega * z, r=r, r_hat=s["r_hat"], p=p, v=v,
                        rho=rho, alpha=alpha, omega=omega, broke=broke)

        s = jax.lax.while_loop(going, body, state)
        stopped_early = s["k"] < self.maxiter
        hint = jnp.where(stopped_early, Status.STAGNATED, Status.CONVERGED)
        return finish(mv, b, s["x"], s["k"], 2 * s["k"] + spent, self.tol, hint=hint)
