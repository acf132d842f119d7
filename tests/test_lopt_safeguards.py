"""The safeguards of the learned optimizers (issue 17), :func:`bilevel.lopt.safeguarded`: exact
identity when off or not binding, a trust region that bounds any step, a divergence guard that
bounds how far a run can climb, checkpointable state, and recovery where the raw rule diverges.

Most cases wrap a cheap optax transformation (the wrapper is generic), so they compile in a
second or two; the learned optimizers themselves are compiled only in the recovery test.
Tolerances: float32 rtol 1e-5 on stated bounds; "bit for bit" is array equality.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel.checkpoint
from bilevel import lopt
from bilevel.lopt import safeguards

OFF = {"max_relative_step": math.inf, "max_regress": math.inf}


def _params() -> dict:
    """A matrix (RMS ~1), a zero vector (its scale is the floor) and a scalar."""
    return {"w": jax.random.normal(jax.random.key(1), (6, 4), jnp.float32),
            "b": jnp.zeros((4,), jnp.float32), "s": jnp.asarray(0.5, jnp.float32)}


def _loss(p):
    return sum(jnp.sum(jnp.sin(x) ** 2 + 0.1 * x ** 2) for x in jax.tree_util.tree_leaves(p))


def _unroll(opt, params, steps, reported=None):
    """``steps`` updates on :func:`_loss`; the optimizer is told ``reported[t]`` as the loss
    when given, the true loss otherwise. Returns ``(losses, updates, states)`` per step."""
    def body(carry, told):
        params, state = carry
        value, grads = jax.value_and_grad(_loss)(params)
        updates, state = opt.update(grads, state, params,
                                    loss=value if reported is None else told)
        return (optax.apply_updates(params, updates), state), (value, updates, state)

    opt = optax.with_extra_args_support(opt)
    xs = jnp.zeros((steps,)) if reported is None else reported
    return jax.lax.scan(body, (params, opt.init(params)), xs)[1]


def _ascent(scale: float) -> optax.GradientTransformation:
    """A rule that climbs: ``+scale·g``, a constructed worst case."""
    return optax.scale(scale)


def _assert_identical(a, b) -> None:
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_off_is_the_inner_rule_bit_for_bit():
    """With the trust region and the guard off the updates are the inner optimizer's, bit for
    bit, on a run where the defaults would bind (the check below that they do)."""
    inner = optax.adam(0.3)  # steps of ~0.3 per element: far outside a 3% trust region
    run = jax.jit(lambda opt: _unroll(opt, _params(), 30)[1], static_argnums=0)
    bare = run(inner)
    _assert_identical(run(lopt.safeguarded(inner, **OFF)), bare)
    on = run(lopt.safeguarded(inner))
    assert not np.array_equal(on["w"], bare["w"])


def test_defaults_change_nothing_where_they_do_not_bind():
    """Small steps on a falling loss: the defaults return the inner updates bit for bit (the
    trust region's factor and ρ are exactly 1)."""
    inner = optax.sgd(1e-4)
    run = jax.jit(lambda opt: _unroll(opt, _params(), 30), static_argnums=0)
    losses, bare, _ = run(inner)
    assert (np.diff(np.asarray(losses)) < 0).all()
    _, guarded, states = run(lopt.safeguarded(inner))
    _assert_identical(guarded, bare)
    assert (np.asarray(states.step_factor) == 1.0).all()


def test_trust_region_bounds_a_huge_update():
    """An inner update of −1e6·g: every tensor's step (the zero one's included) comes back with
    RMS exactly ``c·max(RMS(θ), floor)`` and the inner step's direction, at every step."""
    c, floor = 0.05, 0.02
    params = _params()
    opt = lopt.safeguarded(optax.scale(-1e6), min_scale=floor, max_relative_step=c,
                           max_regress=math.inf)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.tree_util.tree_map(lambda p: jnp.cos(jnp.arange(p.size) + 1.0).reshape(
            p.shape).astype(p.dtype), params)
        updates, state = opt.update(grads, state, params, loss=_loss(params))
        return updates, grads, state

    for _ in range(5):
        updates, grads, state = step(params, state)
        for name, p in params.items():
            u, g = np.asarray(updates[name], np.float64), np.asarray(grads[name], np.float64)
            scale = max(np.sqrt(np.mean(np.square(p)) + 1e-9), floor)
            np.testing.assert_allclose(np.sqrt(np.mean(u ** 2)), c * scale, rtol=1e-5)
            np.testing.assert_allclose(u / np.linalg.norm(u), -g / np.linalg.norm(g),
                                       rtol=1e-4, atol=1e-6)
        params = optax.apply_updates(params, updates)


def test_guard_bounds_the_climb_of_a_rule_that_ascends():
    """A rule that climbs the loss (``+0.05·g``) and no trust region: the raw run more than
    doubles its loss in 200 steps; guarded, once the smoothed loss passes the threshold the
    steps shrink geometrically, so the loss stays within 1.5x its start and ends frozen."""
    run = jax.jit(lambda opt: _unroll(opt, _params(), 200), static_argnums=0)
    raw = np.asarray(run(_ascent(0.05))[0], np.float64)
    assert raw.max() > 2.0 * raw[0]
    losses, updates, states = run(lopt.safeguarded(_ascent(0.05), max_relative_step=math.inf))
    losses = np.asarray(losses, np.float64)
    assert np.isfinite(losses).all() and losses.max() <= 1.5 * losses[0], losses.max() / losses[0]
    factor = np.asarray(states.step_factor)
    assert factor[-1] < 1e-6 and (np.diff(factor[factor < 1.0]) <= 0).all()
    assert float(jnp.abs(updates["w"][-1]).max()) < 1e-6


def test_guard_factor():
    f32 = jnp.float32
    # Before any progress the threshold is 0.25·0.4 = 10% of the first loss above the minimum:
    # a noisy flat start (smoothed 1.05, minimum 0.98) does not trip it.
    assert float(safeguards.guard_step_factor(f32(1.0), f32(1.05), f32(0.98), f32(1.0), 0.25,
                                              0.5)) == 1.0
    # Given back more than a quarter of the progress 1 → 0.2: shrink by the rate.
    shrunk = safeguards.guard_step_factor(f32(1.0), f32(0.41), f32(0.2), f32(1.0), 0.25, 0.5)
    np.testing.assert_allclose(shrunk, 0.5, rtol=1e-6)
    # Back below: regrow ten times more slowly, to exactly 1.
    regrown = safeguards.guard_step_factor(f32(0.5), f32(0.39), f32(0.2), f32(1.0), 0.25, 0.5)
    np.testing.assert_allclose(regrown, 0.5 * 1.05, rtol=1e-6)
    assert float(safeguards.guard_step_factor(f32(0.99), f32(0.3), f32(0.2), f32(1.0), 0.25,
                                              0.5)) == 1.0


def test_guard_scales_every_step_by_its_factor():
    """Reported losses fall, jump back up for 15 steps, fall again, at fixed parameters and
    gradients. ρ is exactly 1 while the loss falls, halves a step once the 10-step EMA passes
    the threshold, regrows by 5% a step to exactly 1, and every update is ρ times the update
    without the guard."""
    reported = jnp.asarray([1.0] + [0.2] * 20 + [0.9] * 15 + [0.2] * 350, jnp.float32)
    params = _params()
    grads = jax.grad(_loss)(params)

    def run(opt):
        def body(state, loss):
            updates, state = opt.update(grads, state, params, loss=loss)
            return state, (updates, state.step_factor)

        return jax.lax.scan(body, opt.init(params), reported)[1]

    (guarded, factor), (free, _) = jax.jit(lambda: (
        run(lopt.safeguarded(optax.sgd(1e-4))),
        run(lopt.safeguarded(optax.sgd(1e-4), max_regress=math.inf))))()
    factor = np.asarray(factor, np.float64)
    assert (factor[:22] == 1.0).all() and factor[-1] == 1.0 and factor.min() < 0.01
    ratios = factor[1:] / factor[:-1]
    moving = ratios != 1.0
    assert np.all(np.isclose(ratios[moving], 0.5) | np.isclose(ratios[moving], 1.05)
                  | (factor[1:][moving] == 1.0))
    assert np.isclose(ratios, 0.5).sum() > 10 and np.isclose(ratios, 1.05).sum() > 10
    for name, p in params.items():
        shape = (-1,) + (1,) * p.ndim
        np.testing.assert_allclose(guarded[name], factor.reshape(shape) * free[name],
                                   rtol=1e-6, atol=1e-30)


def test_state_is_checkpointable_and_the_wrapper_jits_and_vmaps(tmp_path):
    """Saved mid-run and loaded on a fresh state, the run continues bit for bit; the update
    vmaps over a batch of parameters."""
    opt = lopt.safeguarded(optax.adam(0.3))
    params = _params()
    step = jax.jit(lambda p, s: opt.update(jax.grad(_loss)(p), s, p, loss=_loss(p)))
    state = opt.init(params)
    for _ in range(3):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    bilevel.checkpoint.save(tmp_path / "s.npz", state)
    loaded, _ = bilevel.checkpoint.load(tmp_path / "s.npz", like=opt.init(params))
    assert isinstance(loaded, lopt.SafeguardState) and int(loaded.iteration) == 3
    _assert_identical(step(params, loaded), step(params, state))
    batch = jax.tree_util.tree_map(lambda x: jnp.stack([x, 2 * x]), params)
    batched, _ = jax.vmap(step)(batch, jax.vmap(opt.init)(batch))
    one, _ = step(params, opt.init(params))
    jax.tree_util.tree_map(lambda b, u: np.testing.assert_allclose(b[0], u, rtol=1e-5),
                           batched, one)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"min_scale": -1.0}, "safeguarded: min_scale must be a finite number >= 0"),
    ({"max_relative_step": 0.0}, "safeguarded: max_relative_step must be a number > 0"),
    ({"max_regress": -0.5}, "safeguarded: max_regress must be a number >= 0"),
    ({"guard_rate": 1.0}, "safeguarded: guard_rate must be a number in"),
    ({"guard_rate": True}, "safeguarded: guard_rate must be a number in"),
])
def test_safeguard_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lopt.safeguarded(optax.sgd(0.1), **kwargs)


def test_wrapper_errors_name_the_argument():
    with pytest.raises(TypeError, match="safeguarded: inner must be an optax"):
        lopt.safeguarded(lambda g: g)
    opt = lopt.safeguarded(optax.sgd(0.1))
    params = _params()
    with pytest.raises(ValueError, match="update needs the minibatch loss"):
        opt.update(params, opt.init(params), params)
    with pytest.raises(ValueError, match="update needs params"):
        opt.update(params, opt.init(params), loss=1.0)


def _boosted(name: str, log_boost: float) -> tuple[dict, dict]:
    """The shipped meta-parameters with every step-magnitude head raised by ``log_boost``
    (``exp(η a)`` with ``η = 0.001``): steps ``e^log_boost`` times the shipped ones."""
    meta, metadata = lopt.pretrained(name)
    meta = jax.tree_util.tree_map(lambda x: x, meta)
    network = meta["network"]
    last = f"b{len(network) // 2 - 1}"
    heads = jnp.asarray([1] if name == "mlp_lopt" else [1, 2])  # mlp: a; STAR: a_bb, a_nom
    network[last] = network[last].at[heads].add(log_boost / 1e-3)
    return meta, metadata


@pytest.mark.parametrize("name", ["mlp_lopt", "star_lopt"])  # ~6 s each: two compilations
def test_recovers_where_the_raw_rule_diverges(name):
    """A 8-8-3 ReLU MLP, full batch, 100 steps, with the shipped rule's steps raised e^5-fold:
    raw, the loss climbs above 1.5x its start (measured 4.8x for mlp_lopt, 351x for STAR);
    safeguarded, it never rises and ends below a fifth of its start (measured 0.10, 0.003)."""
    kx, kt, k0, k1 = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (64, 8), jnp.float32)
    y = jnp.argmax(x @ jax.random.normal(kt, (8, 3), jnp.float32), axis=1)
    params = {"w0": jax.random.normal(k0, (8, 8), jnp.float32) / math.sqrt(8.0),
              "w1": jax.random.normal(k1, (8, 3), jnp.float32) / math.sqrt(8.0)}

    def loss(p):
        logits = jax.nn.relu(x @ p["w0"]) @ p["w1"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    meta, metadata = _boosted(name, 5.0)

    def run(safeguarded):
        opt = lopt.build_optimizer(meta, metadata, num_steps=100, safeguards=safeguarded)

        def body(carry, _):
            p, s = carry
            value, grads = jax.value_and_grad(loss)(p)
            updates, s = opt.update(grads, s, p, loss=value)
            return (optax.apply_updates(p, updates), s), value

        return jax.lax.scan(body, (params, opt.init(params)), None, length=100)[1]

    raw = np.asarray(jax.jit(lambda: run(False))(), np.float64)
    assert not (np.isfinite(raw).all() and raw.max() <= 1.5 * raw[0]), raw.max() / raw[0]
    guarded = np.asarray(jax.jit(lambda: run(True))(), np.float64)
    assert np.isfinite(guarded).all() and guarded.max() <= guarded[0] * (1 + 1e-6)
    assert guarded[-1] < 0.2 * guarded[0], guarded[-1] / guarded[0]
