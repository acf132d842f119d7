"""Spectral estimates of curvature operators: power iteration and Lanczos.

Implicit hypergradients assume a positive-definite Hessian at the inner optimum. Away from it, or
at a saddle, the Hessian is indefinite and CG, Neumann and Nyström misbehave; a Lanczos estimate
of the most negative eigenvalue tells a user when that is the case.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hvp import checks as _checks
from hvp.operators import LinearOperator


class Spectrum(NamedTuple):
    """Extreme eigenvalue estimates of a symmetric operator.

    Attributes:
      lambda_min: the smallest Ritz value (the most negative eigenvalue, if any is negative).
      lambda_max: the largest Ritz value.
      ritz_values: all Ritz values of the Lanczos tridiagonal, ascending.
      error_bounds: ``|β_k s_k|`` per Ritz value: each lies within this distance of an eigenvalue.
      hvp_count: operator products spent.
    """

    lambda_min: jax.Array
    lambda_max: jax.Array
    ritz_values: jax.Array
    error_bounds: jax.Array
    hvp_count: jax.Array


def _random_unit(key: jax.Array, n: int, dtype) -> jax.Array:
    v = jax.random.normal(key, (n,), dtype=dtype)
    return v / jnp.linalg.norm(v)


def _check_maxiter(where: str, maxiter: int) -> None:
    if isinstance(maxiter, bool) or not isinstance(maxiter, int | np.integer) or maxiter < 1:
        raise ValueError(f"{where}: maxiter must be an integer >= 1, got {maxiter!r}")


@_checks.accepts_renamed("hvp.power_iteration", num_iters="maxiter")
def power_iteration(operator: LinearOperator, maxiter: int = 20,
                    key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Estimate the eigenvalue of largest magnitude by power iteration.

    Args:
      operator: a :class:`hvp.LinearOperator` (symmetric).
      maxiter: number of products (>= 1); ``num_iters=`` is its deprecated name.
      key: PRNG key for the start vector; ``None`` means ``jax.random.key(0)``.

    Returns:
      ``(eigenvalue, vector)``: the Rayleigh quotient (with its sign) and the flat unit vector.
    """
    _check_maxiter("hvp.power_iteration", maxiter)
    key = jax.random.key(0) if key is None else key
    v = _random_unit(key, operator.size, operator.dtype)

    def step(_, carry):
        v, _ = carry
        av = operator.flat_mv(v)
        rayleigh = jnp.vdot(v, av)
        norm = jnp.linalg.norm(av)
        return jnp.where(norm > 0, av / jnp.where(norm > 0, norm, 1.0), v), rayleigh

    v, rayleigh = jax.lax.fori_loop(0, maxiter, step, (v, jnp.zeros((), v.dtype)))
    return rayleigh, v


@_checks.accepts_renamed("hvp.lanczos", num_iters="maxiter")
def lanczos(operator: LinearOperator, maxiter: int, key: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Lanczos tridiagonalisation with full reorthogonalisation.

    Args:
      operator: a symmetric :class:`hvp.LinearOperator` of size n.
      maxiter: Krylov dimension k (products spent, clipped to n); ``num_iters=`` is its
        deprecated name.
      key: PRNG key for the start vector; ``None`` means ``jax.random.key(0)``.

    Returns:
      ``(alphas, betas, basis)``: the diagonal (k,), off-diagonal (k,) (``betas[j]`` couples
      ``j`` and ``j+1``; the last is the residual norm) and the orthonormal basis (k, n). After an
      invariant subspace is found (``beta ≈ 0``) the remaining entries are zero.
    """
    _check_maxiter("hvp.lanczos", maxiter)
    n = operator.size
    k = min(maxiter, n)
    dtype = operator.dtype
    key = jax.random.key(0) if key is None else key
    basis = jnp.zeros((k, n), dtype).at[0].set(_random_unit(key, n, dtype))
    tiny = jnp.finfo(dtype).eps ** 0.75

    def step(j, carry):
        basis, alphas, betas, alive = carry
        v = basis[j]
        w = operator.flat_mv(v)
        alpha = jnp.vdot(v, w)
        # Twice-iterated classical Gram-Schmidt against the whole basis keeps it orthogonal in
        # finite precision; rows not yet filled are zero and drop out.
        w = w - basis.T @ (basis @ w)
        w = w - basis.T @ (basis @ w)
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(jnp.abs(alpha), jnp.max(jnp.abs(betas)))
        alive_next = alive & (beta > tiny * jnp.maximum(scale, 1.0))
        alpha = jnp.where(alive, alpha, 0.0)
        beta = jnp.where(alive_next, beta, 0.0)
        v_next = jnp.where(alive_next, w / jnp.where(beta > 0, beta, 1.0), 0.0)
        basis = jax.lax.cond(j + 1 < k, lambda b: b.at[j + 1].set(v_next), lambda b: b, basis)
        return basis, alphas.at[j].set(alpha), betas.at[j].set(beta), alive_next

    zeros = jnp.zeros((k,), dtype)
    init = (basis, zeros, zeros, jnp.array(True))
    basis, alphas, betas, _ = jax.lax.fori_loop(0, k, step, init)
    return alphas, betas, basis


@_checks.accepts_renamed("hvp.extreme_eigenvalues", num_iters="maxiter")
def extreme_eigenvalues(operator: LinearOperator, maxiter: int = 30,
                        key: jax.Array | None = None) -> Spectrum:
    """Lanczos estimates of the smallest and largest eigenvalues of a symmetric operator.

    Extreme Ritz values converge first, typically within a few dozen products; a negative
    ``lambda_min`` means the curvature is indefinite (not a minimum, or not yet converged).

    Args:
      operator: a symmetric :class:`hvp.LinearOperator`.
      maxiter: Krylov dimension (products spent), clipped to the operator size;
        ``num_iters=`` is its deprecated name.
      key: PRNG key for the start vector; ``None`` means ``jax.random.key(0)``.

    Returns:
      A :class:`Spectrum`.

    Reference: Lanczos 1950; Golub & Van Loan, Matrix Computations, ch. 10.
    """
    alphas, betas, _ = lanczos(operator, maxiter, key)
    k = alphas.shape[0]
    # Rows past an invariant subspace are padded with alpha_0, which lies inside the spectrum of
    # the leading block, so the extreme Ritz values are unchanged.
    alive = jnp.concatenate([jnp.array([True]), betas[:-1] != 0])
    alive = jnp.cumprod(alive.astype(jnp.int32)).astype(bool)
    diag = jnp.where(alive, alphas, alphas[0])
    off = jnp.where(alive[1:], betas[:-1], 0.0)
    tridiagonal = jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1)
    ritz, vectors = jnp.linalg.eigh(tridiagonal)
    bounds = jnp.abs(betas[jnp.sum(alive) - 1] * vectors[jnp.sum(alive) - 1, :])
    return Spectrum(ritz[0], ritz[-1], ritz, bounds, jnp.asarray(k, jnp.int32))
