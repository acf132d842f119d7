"""Unrolled meta-gradients: MixFlow equals reverse equals a plain Python loop, in every variant."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel

STEPS = 20
SHORT = 8  # the variants below re-check the same machinery on shorter unrolls (compile time)


def _model(params, x):
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return hidden @ params["w2"]


def _cross_entropy(params, x, y):
    logits = _model(params, x)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.sum(y * logits, axis=-1))


def inner_loss(params, hparams, x, y):
    l2 = sum(jnp.sum(w**2) for w in jax.tree_util.tree_leaves(params))
    return _cross_entropy(params, x, y) + jnp.exp(hparams["log_l2"]) * l2


def outer_loss(params, hparams, x, y):
    return _cross_entropy(params, x, y)


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.standard_normal((4, 8))) * 0.5, "b1": jnp.zeros(8),
              "w2": jnp.asarray(rng.standard_normal((8, 3))) * 0.5}
    x = jnp.asarray(rng.standard_normal((16, 4)))
    y = jax.nn.one_hot(jnp.asarray(rng.integers(0, 3, 16)), 3)
    xv = jnp.asarray(rng.standard_normal((16, 4)))
    yv = jax.nn.one_hot(jnp.asarray(rng.integers(0, 3, 16)), 3)
    xs = jnp.asarray(rng.standard_normal((STEPS, 8, 4)))
    ys = jax.nn.one_hot(jnp.asarray(rng.integers(0, 3, (STEPS, 8))), 3)
    hparams = {"log_l2": jnp.array(-3.0), "log_lr": jnp.array(-3.0)}
    return dict(params=params, data=(x, y), val=(xv, yv), per_step=(xs, ys), hparams=hparams)


def _python_loop(setup, optimizer, steps=STEPS, per_step=False, truncate=None):
    """jax.grad through a plain Python loop: the independent reference."""

    def meta(hparams):
        transformation = optimizer(hparams) if callable(optimizer) else optimizer
        params = setup["params"]
        state = transformation.init(params)
        for t in range(steps):
            h = hparams if truncate is None or t >= steps - truncate else \
                jax.lax.stop_gradient(hparams)
            tr = optimizer(h) if callable(optimizer) else optimizer
            args = (setup["per_step"][0][t], setup["per_step"][1][t]) if per_step else \
                setup["data"]
            value, grads = jax.value_and_grad(inner_loss)(params, h, *args)
            if isinstance(tr, optax.GradientTransformationExtraArgs):
                updates, state = tr.update(grads, state, params, loss=value)
            else:
                updates, state = tr.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            if truncate is not None and t == steps - truncate - 1:
                params, state = jax.lax.stop_gradient((params, state))
        return outer_loss(params, hparams, *setup["val"])

    return jax.jit(jax.grad(meta))(setup["hparams"])


@pytest.fixture(scope="module")
def adam_reference(setup):
    return _python_loop(setup, optax.adam(1e-2))


def _assert_tree_close(a, b, rtol):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-14)


def _unrolled(setup, optimizer, **kwargs):
    kwargs.setdefault("inner_args", setup["data"])
    return bilevel.unrolled_hypergrad(inner_loss, outer_loss, setup["params"], setup["hparams"],
                                      optimizer, kwargs.pop("steps", STEPS),
                                      outer_args=setup["val"], **kwargs)


def test_mixflow_equals_reverse_equals_python_loop_through_adam(setup, adam_reference):
    reference = adam_reference
    assert abs(float(reference["log_l2"])) > 1e-4  # a non-trivial meta-gradient
    for mode in ("reverse", "mixflow"):
        grad, info = _unrolled(setup, optax.adam(1e-2), mode=mode)
        _assert_tree_close(grad, reference, rtol=1e-10)
        assert bool(info.finite) and info.inner_losses.shape == (STEPS,)


@pytest.mark.parametrize("checkpoint_every", [7, "sqrt"])  # 7: two chunks and a remainder
@pytest.mark.parametrize("mode", ["reverse", "mixflow"])
def test_trajectory_checkpointing_does_not_change_the_gradient(setup, adam_reference, mode,
                                                               checkpoint_every):
    grad, _ = _unrolled(setup, optax.adam(1e-2), mode=mode, checkpoint_every=checkpoint_every)
    _assert_tree_close(grad, adam_reference, rtol=1e-10)


def _sgd_with_learned_rate(hparams):
    return optax.sgd(jnp.exp(hparams["log_lr"]), momentum=0.9)


@pytest.mark.parametrize("mode", ["reverse", "mixflow"])
def test_hparams_in_the_update_rule_and_per_step_minibatches(setup, mode):
    reference = _python_loop(setup, _sgd_with_learned_rate, steps=SHORT, per_step=True)
    assert abs(float(reference["log_lr"])) > 1e-6
    per_step = jax.tree_util.tree_map(lambda x: x[:SHORT], setup["per_step"])
    grad, _ = _unrolled(setup, _sgd_with_learned_rate, mode=mode, inner_args=(),
                        per_step_args=per_step, checkpoint_every=3, steps=SHORT)
    _assert_tree_close(grad, reference, rtol=1e-10)


@pytest.mark.parametrize("mode", ["reverse", "mixflow"])
def test_truncation_backpropagates_through_the_last_steps_only(setup, mode):
    reference = _python_loop(setup, _sgd_with_learned_rate, steps=SHORT, truncate=3)
    full = _python_loop(setup, _sgd_with_learned_rate, steps=SHORT)
    grad, _ = _unrolled(setup, _sgd_with_learned_rate, mode=mode, truncate=3, steps=SHORT)
    _assert_tree_close(grad, reference, rtol=1e-10)
    assert not np.allclose(grad["log_lr"], full["log_lr"])


def _loss_scaled_sgd(hparams):
    """An update that reads the loss value (like a learned optimizer): Δ = −lr·(1 + L)·g."""

    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None, *, loss):
        scale = -jnp.exp(hparams["log_lr"]) * (1.0 + loss)
        return jax.tree_util.tree_map(lambda g: scale * g, updates), state

    return optax.GradientTransformationExtraArgs(init, update)


@pytest.mark.parametrize("mode", ["reverse", "mixflow"])
def test_extra_args_optimizers_receive_the_loss_and_its_gradient_flows(setup, mode):
    reference = _python_loop(setup, _loss_scaled_sgd, steps=SHORT)
    grad, _ = _unrolled(setup, _loss_scaled_sgd, mode=mode, steps=SHORT)
    _assert_tree_close(grad, reference, rtol=1e-10)


def test_jit_without_recompilation_and_vmap_over_hparams(setup):
    @jax.jit
    def meta_gradient(hparams, params, x, y, xv, yv):
        return bilevel.unrolled_hypergrad(inner_loss, outer_loss, params, hparams,
                                          optax.adam(1e-2), STEPS, (x, y), (xv, yv))[0]

    args = (setup["params"], *setup["data"], *setup["val"])
    first = meta_gradient(setup["hparams"], *args)
    meta_gradient({k: v + 0.1 for k, v in setup["hparams"].items()}, *args)
    assert meta_gradient._cache_size() == 1
    batch = {k: jnp.stack([v, v + 0.5]) for k, v in setup["hparams"].items()}
    batched = jax.vmap(meta_gradient, in_axes=(0,) + (None,) * 5)(batch, *args)
    np.testing.assert_allclose(batched["log_l2"][0], first["log_l2"], rtol=1e-10)


def _peak_temp_bytes(setup, mode, batch):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((batch, 4)), jnp.float32)
    y = jax.nn.one_hot(jnp.asarray(rng.integers(0, 3, batch)), 3, dtype=jnp.float32)
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), setup["params"])
    hparams = {"log_l2": jnp.array(-3.0, jnp.float32)}

    def meta_gradient(params, hparams, x, y):
        return bilevel.unrolled_hypergrad(inner_loss, outer_loss, params, hparams,
                                          optax.adam(1e-2), 10, (x, y), (x, y), mode=mode)[0]

    compiled = jax.jit(meta_gradient).lower(params, hparams, x, y).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_mixflow_stores_less_than_reverse(setup):
    # XLA's compiled memory is deterministic: MixFlow keeps each step's inputs, not the inner
    # backward pass's activations, so its temp memory is a fraction of reverse mode's.
    reverse = _peak_temp_bytes(setup, "reverse", 2048)
    mixflow = _peak_temp_bytes(setup, "mixflow", 2048)
    assert mixflow * 3 < reverse


def test_sqrt_checkpointing_applies_to_the_truncated_window():
    # "sqrt" must chunk the `truncate` differentiated steps, not all `steps`: with steps=400 and
    # truncate=16 a chunk of ⌈√400⌉ = 20 would cover the whole window and store every step.
    x = jnp.ones((256, 16), jnp.float32)
    params0 = jnp.full((16, 16), 0.01, jnp.float32)

    def inner(p, h, x):
        return jnp.mean(jnp.tanh(x @ p) ** 2) + jnp.exp(h) * jnp.sum(p**2)

    def temp_bytes(steps, truncate, checkpoint_every):
        def f(p0, h, x):
            return bilevel.unrolled_hypergrad(inner, inner, p0, h, optax.sgd(0.1), steps, (x,),
                                              (x,), mode="reverse", truncate=truncate,
                                              checkpoint_every=checkpoint_every)[0]

        lowered = jax.jit(f).lower(params0, jnp.array(-3.0, jnp.float32), x)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(400, 16, "sqrt") == temp_bytes(400, 16, 4)
    assert temp_bytes(400, 16, "sqrt") < temp_bytes(400, 16, None)


def test_non_finite_meta_gradient_is_flagged_and_can_raise(setup):
    diverging = optax.sgd(1e200)  # overflows to inf within a few steps
    grad, info = _unrolled(setup, diverging)
    assert not bool(info.finite) and not bool(info.converged)
    with pytest.raises(FloatingPointError, match="not finite: the inner loop may have diverged"):
        _unrolled(setup, diverging, on_failure="raise")


def test_bad_inputs_raise_clear_errors(setup):
    where = "bilevel.unrolled_hypergrad"
    with pytest.raises(ValueError, match=f"{where}: steps must be an integer in \\[1"):
        _unrolled(setup, optax.sgd(0.1), steps=0)
    with pytest.raises(ValueError, match=f"{where}: per_step_args leaf .* has leading axis 20, "
                                         "expected steps=10"):
        _unrolled(setup, optax.sgd(0.1), steps=10, inner_args=(),
                  per_step_args=setup["per_step"])
    with pytest.raises(ValueError, match=f"{where}: mode must be one of"):
        _unrolled(setup, optax.sgd(0.1), mode="forward")
    with pytest.raises(ValueError, match=f"{where}: checkpoint_every must be an integer"):
        _unrolled(setup, optax.sgd(0.1), checkpoint_every=0)
    with pytest.raises(ValueError, match=f"{where}: truncate must be an integer in \\[1, 20\\]"):
        _unrolled(setup, optax.sgd(0.1), truncate=21)
    with pytest.raises(TypeError, match=f"{where}: optimizer must be an optax"):
        _unrolled(setup, "adam")
    with pytest.raises(TypeError, match=f"{where}: hparams leaf .* dtype int"):
        bilevel.unrolled_hypergrad(inner_loss, outer_loss, setup["params"],
                                   {"log_l2": jnp.array(1)}, optax.sgd(0.1), 3, setup["data"],
                                   setup["val"])
    with pytest.raises(TypeError, match=f"{where}: inner_loss must return a scalar"):
        bilevel.unrolled_hypergrad(lambda p, h, x, y: x, outer_loss, setup["params"],
                                   setup["hparams"], optax.sgd(0.1), 3, setup["data"],
                                   setup["val"])


def test_mixflow_float32_hparams_with_a_float64_loss():
    """A float64 loss of float32 meta-parameters: MixFlow's cotangents keep the primals' dtypes
    and agree with reverse mode."""
    def inner(p, h, x):
        return jnp.sum((p - x.astype(jnp.float64)) ** 2 * jnp.exp(h.astype(jnp.float64)))

    def outer(p, h):
        return jnp.sum(p.astype(jnp.float64) ** 2)

    params, hparams, x = jnp.ones(3, jnp.float32), jnp.zeros(3, jnp.float32), jnp.arange(3.0)
    grads = {mode: bilevel.unrolled_hypergrad(inner, outer, params, hparams, optax.sgd(0.1),
                                              steps=3, inner_args=(x,), mode=mode)[0]
             for mode in ("mixflow", "reverse")}
    assert grads["mixflow"].dtype == jnp.float32
    np.testing.assert_allclose(grads["mixflow"], grads["reverse"], rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Truncations of one long inner run: the optimizer state goes in and the final state comes out.


def _quadratic_losses():
    def inner(p, h):
        return 0.5 * jnp.sum((p - h) ** 2) + 0.1 * jnp.sum(p**4)

    def outer(p, h):
        return jnp.sum((p - 1.0) ** 2)

    return inner, outer


@pytest.mark.parametrize("mode", ["mixflow", "reverse"])
def test_two_truncations_carrying_the_state_equal_one_run(mode):
    inner, outer = _quadratic_losses()
    params0, hparams = jnp.array([0.3, -0.2, 0.5]), jnp.array([0.7, 0.1, -0.4])
    optimizer = optax.adam(0.05)
    _, whole = bilevel.unrolled_hypergrad(inner, outer, params0, hparams, optimizer, steps=8,
                                          mode=mode)
    _, first = bilevel.unrolled_hypergrad(inner, outer, params0, hparams, optimizer, steps=5,
                                          mode=mode)
    _, second = bilevel.unrolled_hypergrad(inner, outer, first.params, hparams, optimizer,
                                           steps=3, mode=mode, opt_state=first.opt_state)
    np.testing.assert_allclose(second.params, whole.params, rtol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(second.opt_state),
                    jax.tree_util.tree_leaves(whole.opt_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_allclose(jnp.concatenate([first.inner_losses, second.inner_losses]),
                               whole.inner_losses, rtol=1e-12)


def test_the_given_state_is_used_and_not_differentiated():
    inner, outer = _quadratic_losses()
    params0, hparams = jnp.array([0.3, -0.2, 0.5]), jnp.array([0.7, 0.1, -0.4])
    optimizer = optax.sgd(0.1, momentum=0.9)
    momentum = optimizer.init(params0)
    pushed = jax.tree_util.tree_map(lambda x: x + 0.5, momentum)
    grad_fresh, fresh = bilevel.unrolled_hypergrad(inner, outer, params0, hparams, optimizer,
                                                   steps=4)
    grad_pushed, moved = bilevel.unrolled_hypergrad(inner, outer, params0, hparams, optimizer,
                                                    steps=4, opt_state=pushed)
    assert not np.allclose(fresh.params, moved.params)

    # Against central differences of the same truncation with the state held fixed.
    def meta_loss(h):
        _, info = bilevel.unrolled_hypergrad(inner, outer, params0, h, optimizer, steps=4,
                                             opt_state=pushed, on_failure="ignore")
        return info.outer_loss

    direction = jnp.array([0.3, -0.5, 0.2])
    eps = 1e-6
    numeric = (meta_loss(hparams + eps * direction) - meta_loss(hparams - eps * direction)) / (
        2 * eps)
    np.testing.assert_allclose(grad_pushed @ direction, numeric, rtol=1e-7)
    assert not np.allclose(grad_pushed, grad_fresh)


def test_an_opt_state_of_the_wrong_structure_is_named():
    inner, outer = _quadratic_losses()
    with pytest.raises(ValueError, match=r"bilevel\.unrolled_hypergrad: opt_state has structure"):
        bilevel.unrolled_hypergrad(inner, outer, jnp.zeros(3), jnp.zeros(3), optax.adam(0.1),
                                   steps=2, opt_state=optax.sgd(0.1, momentum=0.9).init(
                                       jnp.zeros(3)))
