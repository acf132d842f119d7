"""Curvature products against jax.hessian and dense Jacobians, in every mode, under transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import hvp

MODES = ["fwd_rev", "rev_rev", "rev_fwd"]


def _mlp_loss(params, x, y):
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    logits = hidden @ params["w2"]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.sum(y * logits, axis=-1))


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.standard_normal((3, 4))) * 0.5, "b1": jnp.zeros(4),
              "w2": jnp.asarray(rng.standard_normal((4, 2))) * 0.5}
    x = jnp.asarray(rng.standard_normal((8, 3)))
    y = jax.nn.one_hot(jnp.asarray(rng.integers(0, 2, 8)), 2)
    vector = jax.tree_util.tree_map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)
    return params, x, y, vector


def _dense_hessian(fun, params, *args):
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda f: fun(unravel(f), *args))(flat)


@pytest.mark.parametrize("mode", MODES)
def test_hvp_matches_jax_hessian(problem, mode):
    params, x, y, vector = problem
    product = hvp.hvp(_mlp_loss, params, vector, x, y, mode=mode)
    expected = _dense_hessian(_mlp_loss, params, x, y) @ ravel_pytree(vector)[0]
    np.testing.assert_allclose(ravel_pytree(product)[0], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_hvp_float32_within_float32_tolerance(problem, mode):
    params, x, y, vector = jax.tree_util.tree_map(lambda t: t.astype(jnp.float32), problem)
    product = hvp.hvp(_mlp_loss, params, vector, x, y, mode=mode)
    assert ravel_pytree(product)[0].dtype == jnp.float32
    expected = _dense_hessian(_mlp_loss, *jax.tree_util.tree_map(
        lambda t: t.astype(jnp.float64), (params, x, y))) @ ravel_pytree(problem[3])[0]
    np.testing.assert_allclose(ravel_pytree(product)[0], expected, rtol=1e-4, atol=1e-5)


def _with_hparams(params, hparams, x, y):
    # hparams: a per-layer L2 strength and a temperature, so the cross term is non-trivial.
    penalty = hparams["l2"][0] * jnp.sum(params["w1"] ** 2) + hparams["l2"][1] * jnp.sum(
        params["w2"] ** 2)
    return _mlp_loss(jax.tree_util.tree_map(lambda p: p * hparams["temp"], params), x, y) + penalty


@pytest.fixture(scope="module")
def hparams():
    return {"l2": jnp.array([0.1, 0.3]), "temp": jnp.array(1.2)}


@pytest.mark.parametrize("mode", MODES)
def test_cross_vp_matches_dense_mixed_jacobian(problem, hparams, mode):
    params, x, y, vector = problem
    product = hvp.cross_vp(_with_hparams, params, hparams, vector, x, y, mode=mode)
    flat_p, unravel_p = ravel_pytree(params)
    flat_h, unravel_h = ravel_pytree(hparams)

    def grad_params(fp, fh):
        return ravel_pytree(jax.grad(_with_hparams)(unravel_p(fp), unravel_h(fh), x, y))[0]

    mixed = jax.jacfwd(grad_params, argnums=1)(flat_p, flat_h)  # (n_params, n_hparams)
    expected = mixed.T @ ravel_pytree(vector)[0]
    np.testing.assert_allclose(ravel_pytree(product)[0], expected, rtol=1e-10, atol=1e-12)
    assert jax.tree_util.tree_structure(product) == jax.tree_util.tree_structure(hparams)


def test_hvp_and_cross_vp_is_both_products_at_once(problem, hparams):
    params, x, y, vector = problem
    h, c = hvp.hvp_and_cross_vp(_with_hparams, params, hparams, vector, x, y)
    h_ref = hvp.hvp(lambda p, *a: _with_hparams(p, hparams, *a), params, vector, x, y)
    c_ref = hvp.cross_vp(_with_hparams, params, hparams, vector, x, y)
    for got, ref in ((h, h_ref), (c, c_ref)):
        np.testing.assert_allclose(ravel_pytree(got)[0], ravel_pytree(ref)[0], rtol=1e-12)


def _model(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def _cross_entropy(logits, y):
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.sum(y * logits, axis=-1))


def test_ggn_vp_matches_dense_gauss_newton_and_is_psd(problem):
    params, x, y, vector = problem
    product = hvp.ggn_vp(_model, _cross_entropy, params, vector, (x,), (y,))
    flat, unravel = ravel_pytree(params)
    jacobian = jax.jacfwd(lambda f: _model(unravel(f), x).ravel())(flat)  # (outputs, n)
    loss_hessian = jax.hessian(lambda z: _cross_entropy(z.reshape(8, 2), y))(
        _model(params, x).ravel())
    gauss_newton = jacobian.T @ loss_hessian @ jacobian
    np.testing.assert_allclose(ravel_pytree(product)[0], gauss_newton @ ravel_pytree(vector)[0],
                               rtol=1e-10, atol=1e-12)
    operator = hvp.ggn(_model, _cross_entropy, params, (x,), (y,))
    np.testing.assert_allclose(operator.dense(), gauss_newton, rtol=1e-10, atol=1e-12)
    assert float(jnp.min(jnp.linalg.eigvalsh(gauss_newton))) > -1e-12
    # The Hessian at the same point is indefinite: the GGN is the PSD part of it.
    assert float(jnp.min(jnp.linalg.eigvalsh(_dense_hessian(_mlp_loss, params, x, y)))) < 0


def test_hessian_operator_dense_and_damping(problem):
    params, x, y, vector = problem
    operator = hvp.hessian(_mlp_loss, params, x, y, damping=0.5)
    expected = _dense_hessian(_mlp_loss, params, x, y) + 0.5 * jnp.eye(operator.size)
    np.testing.assert_allclose(operator.dense(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ravel_pytree(operator.mv(vector))[0],
                               expected @ ravel_pytree(vector)[0], rtol=1e-10, atol=1e-12)


def test_hutchinson_diagonal_is_exact_on_a_diagonal_operator_and_unbiased_otherwise(problem):
    diagonal = jnp.arange(1.0, 7.0)
    exact = hvp.hessian(lambda w: 0.5 * jnp.sum(diagonal * w**2), jnp.zeros(6))
    np.testing.assert_allclose(exact.diagonal(jax.random.key(0), num_samples=1), diagonal)
    params, x, y, _ = problem
    operator = hvp.hessian(_mlp_loss, params, x, y)
    estimate = ravel_pytree(operator.diagonal(jax.random.key(1), num_samples=4000))[0]
    dense = operator.dense()
    # Error of the mean of 4000 Rademacher probes: off-diagonal row norm / sqrt(4000), 5 sigma.
    off = jnp.sqrt(jnp.sum(dense**2, axis=1) - jnp.diagonal(dense) ** 2)
    assert bool(jnp.all(jnp.abs(estimate - jnp.diagonal(dense)) < 5 * off / jnp.sqrt(4000.0)
                        + 1e-12))


@pytest.mark.parametrize("mode", MODES)
def test_hvp_under_jit_vmap_and_grad(problem, mode):
    params, x, y, vector = problem

    @jax.jit
    def product(params, vector, x, y):
        return hvp.hvp(_mlp_loss, params, vector, x, y, mode=mode)

    eager = hvp.hvp(_mlp_loss, params, vector, x, y, mode=mode)
    np.testing.assert_allclose(ravel_pytree(product(params, vector, x, y))[0],
                               ravel_pytree(eager)[0], rtol=1e-12)
    product(params, jax.tree_util.tree_map(lambda t: 2 * t, vector), x, y)
    assert product._cache_size() == 1  # new values, same shapes: no recompilation

    vectors = jax.tree_util.tree_map(lambda t: jnp.stack([t, -2 * t, t**2]), vector)
    batched = jax.vmap(lambda v: hvp.hvp(_mlp_loss, params, v, x, y, mode=mode))(vectors)
    dense = _dense_hessian(_mlp_loss, params, x, y)
    for i in range(3):
        v_i = ravel_pytree(jax.tree_util.tree_map(lambda t, i=i: t[i], vectors))[0]
        got = ravel_pytree(jax.tree_util.tree_map(lambda t, i=i: t[i], batched))[0]
        np.testing.assert_allclose(got, dense @ v_i, rtol=1e-10, atol=1e-12)

    # grad of vᵀHv with respect to the data x: against the same quantity from jax.hessian.
    def quadratic_form(x_):
        return jnp.vdot(ravel_pytree(hvp.hvp(_mlp_loss, params, vector, x_, y, mode=mode))[0],
                        ravel_pytree(vector)[0])

    def reference_form(x_):
        v = ravel_pytree(vector)[0]
        return v @ _dense_hessian(_mlp_loss, params, x_, y) @ v

    np.testing.assert_allclose(jax.grad(quadratic_form)(x), jax.grad(reference_form)(x),
                               rtol=1e-9, atol=1e-12)


def test_operators_are_pytrees_that_cross_jit(problem):
    params, x, y, vector = problem
    operator = hvp.hessian(_mlp_loss, params, x, y, damping=0.1)
    leaves, treedef = jax.tree_util.tree_flatten(operator)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    solve = jax.jit(lambda op, b: hvp.solve(op, b, hvp.CG(maxiter=50, tol=1e-10)))
    x_jit, info = solve(rebuilt, vector)
    x_eager, _ = hvp.solve(operator, vector, hvp.CG(maxiter=50, tol=1e-10))
    np.testing.assert_allclose(ravel_pytree(x_jit)[0], ravel_pytree(x_eager)[0], rtol=1e-9)
