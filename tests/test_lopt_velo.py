"""velo_lopt: the loss buffer against a NumPy transcription of its recurrences, the untrained
optimizer against a hand-assembled step, jit/dtype/shape behaviour, meta-gradients against
finite differences, and its errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bilevel.lopt import velo
from bilevel.lopt.optimizers import (
    _update_factored,
    accumulator_features,
    init_state,
    normalise_per_tensor,
)


def _params(dtype=jnp.float32):
    key = jax.random.key(1)
    k1, k2 = jax.random.split(key)
    return {"w": jax.random.normal(k1, (6, 4), dtype), "b": jnp.full((4,), 0.3, dtype),
            "s": jnp.asarray(0.7, dtype), "c": jax.random.normal(k2, (2, 3, 2), dtype)}


def _loss(p):
    return sum(jnp.sum(jnp.sin(x) ** 2 + 0.1 * x ** 2) for x in jax.tree_util.tree_leaves(p))


def test_loss_buffer_matches_numpy_recurrence():
    num_steps = 200.0
    decays = np.exp(-1.0 / np.exp(np.linspace(np.log(10.0), np.log(num_steps), 10)))
    np.testing.assert_allclose(velo._loss_decays(num_steps, jnp.float64), decays, rtol=1e-12)
    losses = 3.0 * np.exp(-np.arange(30) / 10.0) + 0.05 * np.cos(np.arange(30))
    losses[12] = 100.0  # a spike, clipped to twice the largest EMA
    means, running_min = np.zeros(10), np.full(10, 1e30)
    j_means, j_min = jnp.zeros(10), jnp.full(10, 1e30)
    for t, loss in enumerate(losses):
        corrected = means / (1 - decays ** (t + 1))
        clipped = loss if t == 0 else min(loss, 2 * abs(corrected.max()))
        means = decays * means + (1 - decays) * clipped
        running_min = np.minimum(running_min, means / (1 - decays ** (t + 1)))
        j_means, j_min = velo.update_loss_buffer(j_means, j_min, jnp.asarray(t), jnp.asarray(loss),
                                                 jnp.asarray(decays))
        np.testing.assert_allclose(j_means, means, rtol=1e-12)
        np.testing.assert_allclose(j_min, running_min, rtol=1e-12)
    corrected = means / (1 - decays ** 30)
    expected = np.clip((corrected[:-1] - running_min[:-1])
                       / np.maximum(corrected[1:] - running_min[:-1], 1e-8) - 1, -1, 1)
    got = velo.loss_features(j_means, j_min, jnp.asarray(30), jnp.asarray(decays))
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert np.all(velo.loss_features(j_means, j_min, jnp.asarray(2), jnp.asarray(decays)) == 0)


@pytest.mark.slow  # 23 s of compiles
def test_untrained_step_is_the_mean_bank_mlp_scaled_by_rms():
    """At initialisation the controls mix the bank's mean with step multiplier 10; the first
    update of a matrix is -0.001·d·exp(0.001·a)·RMS(p)·10 with (d, a) from that MLP."""
    meta = velo.init_velo_lopt(jax.random.key(0), lstm_width=8, bank_size=5, dtype=jnp.float64)
    params = _params(jnp.float64)
    grads = jax.grad(_loss)(params)
    opt = velo.velo_lopt(meta, num_steps=50)
    updates, state = jax.jit(opt.update)(grads, opt.init(params), params, loss=_loss(params))

    p, g = params["w"], grads["w"]
    acc = init_state(params)
    m = g[..., None] * jnp.asarray([0.1, 0.01, 0.001])
    v = 0.001 * g[..., None] ** 2
    fac = acc.factored["w"]
    fac, fac_g = _update_factored(fac, g, jnp.asarray([0.9, 0.99, 0.999]))
    base = accumulator_features(p, g, m, v, fac, fac_g)
    extra = jnp.stack([jnp.clip(g, -0.1, 0.1), g / jnp.sqrt(v[..., 0] + 1e-6)], -1)
    x = normalise_per_tensor(jnp.concatenate([base, extra], -1))
    mean_bank = jax.tree_util.tree_map(lambda w: w.mean(0), meta["bank"])
    h = jax.nn.relu(x @ mean_bank["w0"] + mean_bank["b0"])
    h = jax.nn.relu(h @ mean_bank["w1"] + mean_bank["b1"])
    out = h @ mean_bank["w2"] + mean_bank["b2"]
    expected = -0.01 * out[..., 0] * jnp.exp(0.001 * out[..., 1]) * jnp.sqrt(
        jnp.mean(p ** 2) + 1e-9)
    np.testing.assert_allclose(updates["w"], expected, rtol=1e-10, atol=1e-15)
    assert int(state.accumulators.iteration) == 1
    assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(params)
    for u, q in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(params),
                    strict=True):
        assert u.shape == q.shape and u.dtype == q.dtype


@pytest.fixture(scope="module")
def small_meta():
    return velo.init_velo_lopt(jax.random.key(3), lstm_width=4, bank_size=3, dtype=jnp.float64)


@functools.partial(jax.jit, static_argnums=3)
def _unroll(meta, params, num_steps, steps=4):
    opt = velo.velo_lopt(meta, num_steps)
    state = opt.init(params)
    for _ in range(steps):
        value, grads = jax.value_and_grad(_loss)(params)
        updates, state = opt.update(grads, state, params, loss=value)
        params = optax.apply_updates(params, updates)
    return _loss(params)


def test_meta_gradient_matches_finite_differences(small_meta):
    """The loss after 2 steps, differentiated in all meta-parameters (the loss features are
    still zero then: later they have kinks, clips and minima that finite differences cross)."""
    params = {"w": _params(jnp.float64)["w"][:3, :2], "s": jnp.asarray(0.7)}
    meta = jax.tree_util.tree_map(lambda x: x, small_meta)
    # a random (not zero) control head, so the gradient reaches the LSTM too
    meta["controls"]["w"] = 0.01 * jax.random.normal(jax.random.key(5), meta["controls"]["w"].shape,
                                                     jnp.float64)
    grad = jax.jit(jax.grad(_unroll), static_argnums=3)(meta, params, 20.0, 2)
    flat, unravel = jax.flatten_util.ravel_pytree(meta)
    direction = jax.random.normal(jax.random.key(7), flat.shape, jnp.float64)
    eps = 1e-5
    fd = (_unroll(unravel(flat + eps * direction), params, 20.0, 2)
          - _unroll(unravel(flat - eps * direction), params, 20.0, 2)) / (2 * eps)
    analytic = jnp.dot(jax.flatten_util.ravel_pytree(grad)[0], direction)
    np.testing.assert_allclose(analytic, fd, rtol=1e-7)
    assert float(jnp.linalg.norm(jax.flatten_util.ravel_pytree(grad["lstm"])[0])) > 0


def test_jit_traced_horizon_no_recompile_and_float32():
    meta = velo.init_velo_lopt(jax.random.key(0), lstm_width=4, bank_size=3)
    params = _params()

    @jax.jit
    def run(meta, params, num_steps):
        opt = velo.velo_lopt(meta, num_steps)
        state = opt.init(params)
        value, grads = jax.value_and_grad(_loss)(params)
        updates, state = opt.update(grads, state, params, loss=value)
        return updates, state

    updates, state = run(meta, params, 100.0)
    with jax.log_compiles():
        run(meta, params, 400.0)  # a different horizon is data, not a new program
    assert all(u.dtype == jnp.float32 for u in jax.tree_util.tree_leaves(updates))
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves((updates, state)))
    assert run._cache_size() == 1


def test_horizon_changes_the_step(small_meta):
    params = _params(jnp.float64)
    meta = jax.tree_util.tree_map(lambda x: x, small_meta)
    meta["step_size"]["w"] = 0.1 * jnp.ones_like(meta["step_size"]["w"])
    assert float(_unroll(meta, params, 5.0)) != pytest.approx(float(_unroll(meta, params, 500.0)),
                                                              rel=1e-12)


def test_errors(small_meta):
    params = _params()
    opt = velo.velo_lopt(small_meta, 10)
    with pytest.raises(ValueError, match="needs the minibatch loss"):
        opt.update(params, opt.init(params), params)
    with pytest.raises(ValueError, match="needs params"):
        opt.update(params, opt.init(params), loss=1.0)
    with pytest.raises(ValueError, match="num_steps .* is required"):
        velo.velo_lopt(small_meta, None)
    with pytest.raises(ValueError, match="num_steps must be > 0"):
        velo.velo_lopt(small_meta, 0)
    with pytest.raises(ValueError, match="init_velo_lopt"):
        velo.velo_lopt({"network": {}}, 10)
    with pytest.raises(ValueError, match="bank_size must be a positive int"):
        velo.init_velo_lopt(jax.random.key(0), bank_size=0)


def test_untrained_optimizer_descends_like_normalised_adam():
    """The nominal start: on a quadratic the first step points along -g (m/√v = sign-like g)."""
    meta = velo.init_velo_lopt(jax.random.key(0), lstm_width=4, bank_size=3)
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
    quadratic = lambda p: 0.5 * jnp.sum(p["w"] ** 2)  # noqa: E731
    opt = velo.velo_lopt(meta, 100)
    state = opt.init(params)
    losses = []
    for _ in range(20):
        value, grads = jax.value_and_grad(quadratic)(params)
        updates, state = jax.jit(opt.update)(grads, state, params, loss=value)
        params = optax.apply_updates(params, updates)
        losses.append(float(value))
    assert losses[-1] < 0.9 * losses[0]
    assert np.all(np.diff(losses) < 0)
