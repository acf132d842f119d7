"""Stability by construction (issue 17): velo_lopt's floored parameter scale and trust region,
and STAR's nominal term far past its meta-training horizon.

The shipped meta-parameters are used where the failure was seen with them (velo_lopt on a
bias-free network). Each unroll is one ``lax.scan`` and the told horizons a ``vmap`` over a
traced ``num_steps``, so every case compiles once.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bilevel import lopt
from bilevel.lopt import velo

OFF = {"min_scale": 0.0, "max_relative_step": math.inf, "max_regress": math.inf}  # VeLO's rule
FACTORS = jnp.asarray([0.25, 1.0, 4.0], jnp.float32)


def _unroll(make, loss, params, steps):
    """``steps`` updates; returns the loss before each update, ``(steps,)``, and the params."""
    opt = make()
    state = opt.init(params)

    def body(carry, _):
        params, state = carry
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params, loss=value)
        return (optax.apply_updates(params, updates), state), value

    (params, _), losses = jax.lax.scan(body, (params, state), None, length=steps)
    return losses, params


def _bias_free_mlp():
    """A 64-32-10 ReLU MLP without biases on digits-like data: 512 non-negative inputs (pixel
    intensities) labelled by a random linear teacher."""
    kx, kt, k1, k2 = jax.random.split(jax.random.key(0), 4)
    x = jax.random.uniform(kx, (512, 64), jnp.float32)
    y = jnp.argmax((x - 0.5) @ jax.random.normal(kt, (64, 10), jnp.float32), axis=1)
    params = {"w0": jax.random.normal(k1, (64, 32), jnp.float32) / 8.0,
              "w1": jax.random.normal(k2, (32, 10), jnp.float32) / math.sqrt(32.0)}

    def loss(p):
        logits = jax.nn.relu(x @ p["w0"]) @ p["w1"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return params, loss


def test_velo_on_a_bias_free_mlp_descends_at_every_told_horizon():
    """VeLO's rule goes NaN on a bias-free MLP (its steps are ~20% of the tensor's RMS and
    compound); with the trust region the loss falls and stays finite for 200 steps told
    50, 200 or 800."""
    params, loss = _bias_free_mlp()
    steps = 200
    meta, _ = lopt.pretrained("velo_lopt")

    @jax.jit
    def run(factors):
        return jax.vmap(lambda f: _unroll(lambda: velo.velo_lopt(meta, f * steps), loss,
                                          params, steps)[0])(factors)

    losses = np.asarray(run(FACTORS), np.float64)
    assert np.isfinite(losses).all()
    assert (losses.max(axis=1) <= 1.5 * losses[:, 0]).all()
    # told 4x too long, it is still early in its schedule: slower, but descending
    assert (losses[:, -1] < 0.8 * losses[:, 0]).all(), losses[:, -1]

    old, _ = jax.jit(lambda: _unroll(lambda: velo.velo_lopt(meta, steps, **OFF), loss, params,
                                     steps))()
    old = np.asarray(old, np.float64)
    assert not (np.isfinite(old).all() and old.max() <= 1.5 * old[0])  # the failure it fixes


def _zero_tensor_problem():
    target = {"w": jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(3, 4),
              "v": jnp.linspace(0.5, 1.5, 5, dtype=jnp.float32)}
    params = {"w": jnp.zeros((3, 4), jnp.float32), "v": jnp.ones((5,), jnp.float32)}

    def loss(p):
        return sum(0.5 * jnp.sum(jnp.square(p[k] - target[k])) for k in p)

    return params, loss


def test_velo_moves_a_zero_initialised_tensor():
    """A zero tensor's step is scaled by the floor, not by its RMS of 0: under VeLO's rule it
    starts from steps of ~3e-7 (its RMS floor is √1e-9) and is still below 2e-3 after 200
    steps; the floored one trains it, without divergence, at every told horizon."""
    params, loss = _zero_tensor_problem()
    meta, _ = lopt.pretrained("velo_lopt")
    steps = 200

    @jax.jit
    def run(factors):
        return jax.vmap(lambda f: _unroll(lambda: velo.velo_lopt(meta, f * steps), loss,
                                          params, steps))(factors)

    losses, final = run(FACTORS)
    losses = np.asarray(losses, np.float64)
    assert np.isfinite(losses).all() and (losses.max(axis=1) <= 1.5 * losses[:, 0]).all()
    assert (losses[:, -1] < 0.5 * losses[:, 0]).all(), losses[:, -1]
    moved = np.sqrt(np.mean(np.square(np.asarray(final["w"])), axis=(1, 2)))
    assert (moved > 0.1).all(), moved

    _, frozen = jax.jit(lambda: _unroll(lambda: velo.velo_lopt(meta, steps, **OFF), loss,
                                        params, steps))()
    assert float(jnp.sqrt(jnp.mean(jnp.square(frozen["w"])))) < 2e-3  # measured 9e-4


def _big_step_meta():
    """The shipped meta-parameters with the step multiplier raised e^5 ≈ 148-fold: steps of
    about a whole RMS, the regime in which VeLO's rule blows tensors up."""
    meta, _ = lopt.pretrained("velo_lopt")
    meta = jax.tree_util.tree_map(lambda x: x, meta)
    meta["step_size"]["b"] = meta["step_size"]["b"] + 5.0
    return meta


def test_trust_region_bounds_every_step():
    """RMS(Δ) ≤ c·max(RMS(θ), floor) for every tensor at every step, with equality where the
    raw step is larger; the same run without the bound takes steps far above it."""
    params = {"w": jax.random.normal(jax.random.key(1), (8, 6), jnp.float32),
              "b": jnp.zeros((6,), jnp.float32), "s": jnp.asarray(0.5, jnp.float32)}
    loss = lambda p: sum(jnp.sum(jnp.sin(x) ** 2 + 0.1 * x ** 2)  # noqa: E731
                         for x in jax.tree_util.tree_leaves(p))
    meta, c, floor = _big_step_meta(), 0.05, 0.02

    def ratios(**kwargs):
        opt = velo.velo_lopt(meta, 100, **kwargs)

        def body(carry, _):
            params, state = carry
            value, grads = jax.value_and_grad(loss)(params)
            updates, state = opt.update(grads, state, params, loss=value)
            scale = jax.tree_util.tree_map(
                lambda p: jnp.maximum(jnp.sqrt(jnp.mean(p ** 2) + 1e-9), floor), params)
            ratio = jax.tree_util.tree_map(lambda u, s: jnp.sqrt(jnp.mean(u ** 2)) / s,
                                           updates, scale)
            return (optax.apply_updates(params, updates), state), ratio

        return jax.lax.scan(body, (params, opt.init(params)), None, length=40)[1]

    bounded = jax.jit(lambda: ratios(min_scale=floor, max_relative_step=c))()
    free = jax.jit(lambda: ratios(min_scale=floor, max_relative_step=math.inf))()
    for name in params:
        r = np.asarray(bounded[name], np.float64)
        assert (r <= c * (1 + 1e-5)).all(), (name, r.max())
        np.testing.assert_allclose(r[:3], c, rtol=1e-5)  # the first steps hit the bound
        assert np.nanmax(np.asarray(free[name])[:3]) > 5 * c  # then it goes NaN


def test_safeguards_change_nothing_where_they_do_not_bind():
    """Untrained steps are ~1% of RMS(θ) and every tensor's RMS is above the floor: the
    defaults give VeLO's trajectory bit for bit."""
    meta = velo.init_velo_lopt(jax.random.key(0), lstm_width=4, bank_size=3)
    params = {"w": jax.random.normal(jax.random.key(2), (5, 4), jnp.float32),
              "b": jnp.full((4,), 0.3, jnp.float32), "s": jnp.asarray(0.7, jnp.float32)}
    loss = lambda p: sum(jnp.sum(jnp.sin(x) ** 2 + 0.1 * x ** 2)  # noqa: E731
                         for x in jax.tree_util.tree_leaves(p))
    new = jax.jit(lambda: _unroll(lambda: velo.velo_lopt(meta, 30), loss, params, 30))()
    old = jax.jit(lambda: _unroll(lambda: velo.velo_lopt(meta, 30, **OFF), loss, params, 30))()
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old), strict=True):
        np.testing.assert_array_equal(a, b)


def test_floor_changes_only_the_tensor_below_it():
    """One update: the floor scales the zero tensor's step and leaves the others' untouched (the
    step rule does not feed back into the optimizer's state)."""
    meta, _ = lopt.pretrained("velo_lopt")
    params = {"w": jax.random.normal(jax.random.key(3), (6, 4), jnp.float32) / 3.0,
              "b": jnp.zeros((4,), jnp.float32)}
    grads = {"w": jnp.ones((6, 4), jnp.float32), "b": jnp.linspace(-1.0, 1.0, 4)}

    def update(**kwargs):
        opt = velo.velo_lopt(meta, 100, **kwargs)
        return opt.update(grads, opt.init(params), params, loss=1.0)

    (new, new_state), (old, old_state) = jax.jit(update)(), jax.jit(
        lambda: update(min_scale=0.0))()
    np.testing.assert_array_equal(new["w"], old["w"])
    for a, b in zip(jax.tree_util.tree_leaves(new_state), jax.tree_util.tree_leaves(old_state),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    ratio = float(jnp.linalg.norm(new["b"]) / jnp.linalg.norm(old["b"]))
    np.testing.assert_allclose(ratio, velo.MIN_SCALE / math.sqrt(1e-9), rtol=1e-4)


def test_guard_factor_is_exactly_one_until_the_loss_regresses():
    ones = velo.guard_step_factor(jnp.float32(1.0), jnp.float32(0.59), jnp.float32(0.2),
                                  jnp.float32(1.0), 0.5, 0.1)
    assert float(ones) == 1.0
    shrunk = velo.guard_step_factor(jnp.float32(1.0), jnp.float32(0.61), jnp.float32(0.2),
                                    jnp.float32(1.0), 0.5, 0.1)
    np.testing.assert_allclose(shrunk, 0.9, rtol=1e-6)
    regrown = velo.guard_step_factor(jnp.float32(0.95), jnp.float32(0.3), jnp.float32(0.2),
                                     jnp.float32(1.0), 0.5, 0.1)
    np.testing.assert_allclose(regrown, 0.95 * 1.01, rtol=1e-6)  # a tenth of the rate a step
    assert float(velo.guard_step_factor(jnp.float32(0.995), jnp.float32(0.3), jnp.float32(0.2),
                                         jnp.float32(1.0), 0.5, 0.1)) == 1.0


def test_guard_scales_the_steps_while_the_reported_loss_has_regressed():
    """Reported losses 1 (start), 0.2 for 20 steps, 0.9 for 30, then 0.2 for 300, at fixed
    parameters and gradients, with max_regress=0.5, guard_rate=0.1: ρ stays exactly 1 while the
    loss falls, shrinks by 10% a step once the 10-step EMA has given back half the progress
    (above 0.6), and regrows (by 1% a step) to exactly 1; every update is ρ times the unguarded
    one."""
    meta, _ = lopt.pretrained("velo_lopt")
    params = {"w": jax.random.normal(jax.random.key(5), (6, 4), jnp.float32) / 3.0,
              "b": jnp.full((4,), 0.2, jnp.float32)}
    grads = {"w": jnp.linspace(-1.0, 1.0, 24, dtype=jnp.float32).reshape(6, 4),
             "b": jnp.linspace(-1.0, 1.0, 4, dtype=jnp.float32)}
    reported = jnp.asarray([1.0] + [0.2] * 20 + [0.9] * 30 + [0.2] * 300, jnp.float32)

    def run(**kwargs):
        opt = velo.velo_lopt(meta, 200, **kwargs)

        def body(state, loss):
            updates, state = opt.update(grads, state, params, loss=loss)
            return state, (updates, state.step_factor)

        return jax.lax.scan(body, opt.init(params), reported)[1]

    (guarded, factor), (free, _) = jax.jit(lambda: (run(max_regress=0.5, guard_rate=0.1),
                                                    run(max_regress=math.inf)))()
    factor = np.asarray(factor, np.float64)
    assert (factor[:22] == 1.0).all() and factor[-1] == 1.0
    assert factor.min() < 0.5 and (np.diff(factor[21:51]) <= 0).all()
    for name in params:
        np.testing.assert_allclose(guarded[name], factor[:, None, None][..., :1].reshape(
            (-1,) + (1,) * params[name].ndim) * free[name], rtol=1e-6, atol=1e-12)


def test_safeguard_arguments_are_checked():
    meta = velo.init_velo_lopt(jax.random.key(0), lstm_width=4, bank_size=3)
    with pytest.raises(ValueError, match="min_scale must be a finite number >= 0"):
        velo.velo_lopt(meta, 10, min_scale=-1.0)
    with pytest.raises(ValueError, match="max_relative_step must be a number > 0"):
        velo.velo_lopt(meta, 10, max_relative_step=0.0)
    with pytest.raises(ValueError, match="max_regress must be a number >= 0"):
        velo.velo_lopt(meta, 10, max_regress=-0.5)
    with pytest.raises(ValueError, match="guard_rate must be a number in"):
        velo.velo_lopt(meta, 10, guard_rate=1.0)


def _noisy_quadratic(dim=20):
    curvature = jnp.asarray(np.geomspace(0.01, 1.0, dim), jnp.float32)
    return {"x": jax.random.normal(jax.random.key(4), (dim,), jnp.float32)}, \
        (lambda p: 0.5 * jnp.sum(curvature * jnp.square(p["x"])))


def test_star_nominal_term_alone_converges_at_ten_times_the_meta_horizon():
    """STAR's learned heads zeroed (its initialisation) leave the nominal AggMo-Adam term: told
    the meta-training horizon H = 200 and run for 10 H, it converges on a quadratic; the shipped
    STAR over the same 10 H, its fraction-of-training inputs saturated at t/H up to 10, stays
    bounded and ends below half its start."""
    params, loss = _noisy_quadratic()
    _, metadata = lopt.pretrained("star_lopt")
    horizon = metadata["config"]["horizon"]
    steps = 10 * horizon
    nominal = lopt.init_star_lopt(jax.random.key(0), horizon_features=True)
    assert all(float(jnp.abs(nominal["network"][k]).max()) == 0.0 for k in ("w2", "b2"))

    @jax.jit
    def run(meta):
        return _unroll(lambda: lopt.star_lopt(meta, num_steps=horizon), loss, params, steps)[0]

    alone = np.asarray(run(nominal), np.float64)
    assert np.isfinite(alone).all() and alone.max() <= alone[0] * (1 + 1e-6)
    assert alone[-1] < 0.05 * alone[0], alone[-1] / alone[0]  # measured 0.028
    shipped = np.asarray(run(lopt.pretrained("star_lopt")[0]), np.float64)
    assert np.isfinite(shipped).all() and shipped.max() <= 1.5 * shipped[0]
    assert shipped[-1] < 0.5 * shipped[0], shipped[-1] / shipped[0]
