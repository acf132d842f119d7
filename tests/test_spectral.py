"""Lanczos and power iteration against numpy's dense eigenvalues."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import random_indefinite, random_spd

import hvp


def test_full_lanczos_recovers_the_extreme_eigenvalues_of_an_indefinite_matrix():
    matrix = random_indefinite(0, 12)
    eigenvalues = np.linalg.eigvalsh(np.asarray(matrix))
    spectrum = hvp.extreme_eigenvalues(hvp.MatrixOperator(matrix), maxiter=12)
    np.testing.assert_allclose([spectrum.lambda_min, spectrum.lambda_max],
                               [eigenvalues[0], eigenvalues[-1]], rtol=1e-10)
    assert float(spectrum.lambda_min) < 0  # indefinite curvature is visible
    np.testing.assert_allclose(spectrum.ritz_values, eigenvalues, rtol=1e-8, atol=1e-10)


def test_partial_lanczos_extremes_lie_within_their_error_bounds():
    matrix = random_indefinite(1, 200)
    eigenvalues = np.linalg.eigvalsh(np.asarray(matrix))
    spectrum = hvp.extreme_eigenvalues(hvp.MatrixOperator(matrix), maxiter=40,
                                       key=jax.random.key(2))
    assert int(spectrum.hvp_count) == 40
    # Ritz values lie inside the spectrum and within their bound of a true eigenvalue.
    assert eigenvalues[0] - 1e-10 <= float(spectrum.lambda_min)
    assert float(spectrum.lambda_max) <= eigenvalues[-1] + 1e-10
    for ritz, bound in ((spectrum.lambda_min, spectrum.error_bounds[0]),
                        (spectrum.lambda_max, spectrum.error_bounds[-1])):
        assert np.min(np.abs(eigenvalues - float(ritz))) <= float(bound) + 1e-10
    np.testing.assert_allclose(spectrum.lambda_max, eigenvalues[-1], rtol=1e-3)


def test_lanczos_past_an_invariant_subspace_adds_no_spurious_values():
    # Three distinct eigenvalues: the Krylov space is exhausted after 3 steps.
    matrix = jnp.diag(jnp.array([-2.0, -2.0, 1.0, 1.0, 1.0, 5.0]))
    spectrum = hvp.extreme_eigenvalues(hvp.MatrixOperator(matrix), maxiter=6)
    np.testing.assert_allclose([spectrum.lambda_min, spectrum.lambda_max], [-2.0, 5.0],
                               rtol=1e-12)
    assert bool(jnp.all((spectrum.ritz_values >= -2 - 1e-12) & (spectrum.ritz_values <= 5 + 1e-12)))


def test_lanczos_basis_is_orthonormal():
    matrix = random_spd(2, 30, condition=1e3)
    alphas, betas, basis = hvp.lanczos(hvp.MatrixOperator(matrix), 15)
    np.testing.assert_allclose(basis @ basis.T, np.eye(15), atol=1e-12)
    tridiagonal = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    np.testing.assert_allclose(basis @ matrix @ basis.T, tridiagonal, atol=1e-9)


def test_power_iteration_finds_the_largest_eigenvalue_of_an_spd_hessian():
    matrix = random_spd(3, 10, condition=100.0)
    operator = hvp.hessian(lambda w: 0.5 * w @ matrix @ w, jnp.zeros(10))
    estimate, vector = hvp.power_iteration(operator, maxiter=200)
    np.testing.assert_allclose(estimate, 100.0, rtol=1e-8)
    np.testing.assert_allclose(jnp.linalg.norm(vector), 1.0, rtol=1e-12)


def test_spectral_tools_run_under_jit_on_pytree_operators():
    matrix = random_spd(4, 6, condition=50.0)

    @jax.jit
    def extremes(scale):
        params = {"a": jnp.zeros(2), "b": jnp.zeros((2, 2))}

        def loss(p):
            flat = jnp.concatenate([p["a"], p["b"].ravel()])
            return 0.5 * scale * flat @ matrix @ flat

        return hvp.extreme_eigenvalues(hvp.hessian(loss, params), maxiter=6)

    spectrum = extremes(2.0)
    np.testing.assert_allclose([spectrum.lambda_min, spectrum.lambda_max], [2.0, 100.0],
                               rtol=1e-10)
