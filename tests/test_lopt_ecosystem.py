"""The learned optimizers in the JAX ecosystem, each against the bare optimizer:
``lopt.pretrained_optimizer`` (one call for the three shipped optimizers) and its errors,
``lopt.TrainState``, ``flax.nnx.Optimizer`` under ``nnx.jit``, and optax's ``chain``,
``MultiSteps`` and ``multi_transform`` with frozen leaves.

Tiny float32 parameters and one shared jitted run (a compilation per optimizer and
composition; the suite is compile-bound): float32 tolerance 1e-5 relative against the bare
optimizer's run on the same inputs. Two transformations that must be the same optimizer are
compared without compiling either: same jaxpr, same constants."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

from bilevel import lopt

NAMES = ("mlp_lopt", "star_lopt", "velo_lopt")
HORIZON = 50
STEPS = 4
RTOL = 1e-5


def _params() -> dict:
    """A matrix and a vector, named as in :class:`_TinyModel` so that its ``nnx`` state has the
    same structure (and reuses the same compiled run)."""
    kernel = jnp.asarray(np.linspace(-1.0, 1.0, 12).reshape(3, 4), jnp.float32)
    return {"kernel": kernel, "bias": jnp.full((4,), 0.3, jnp.float32)}


def _inputs(n: int = STEPS, seed: int = 0) -> tuple[dict, jax.Array]:
    """``n`` different gradients (stacked on a leading axis) and minibatch losses."""
    rng = np.random.default_rng(seed)
    grads = {k: jnp.asarray(rng.standard_normal((n, *np.shape(v))), jnp.float32)
             for k, v in _params().items()}
    return grads, jnp.asarray(2.0 - 0.3 * np.arange(n), jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _run(tx, params, grads, losses):
    """Updates of ``tx`` from ``tx.init(params)``, one per leading slice of ``grads`` and
    ``losses``, each applied to the parameters it reads next; ``(final params, updates)``."""
    def body(carry, inputs):
        params, state = carry
        g, loss = inputs
        updates, state = tx.update(g, state, params, loss=loss)
        return (optax.apply_updates(params, updates), state), updates

    (params, _), updates = jax.lax.scan(body, (params, tx.init(params)), (grads, losses))
    return params, updates


def _close(actual, expected, rtol=RTOL, atol=1e-7):
    jax.tree_util.tree_map(lambda a, e: np.testing.assert_allclose(a, e, rtol=rtol, atol=atol),
                           actual, expected)


def _same_computation(tx, other) -> None:
    """The two transformations trace to the same update with the same constants (the
    meta-parameters): equal without compiling either."""
    params = _params()

    def jaxpr(t):
        return jax.make_jaxpr(lambda g, p: t.update(g, t.init(p), p, loss=1.0))(params, params)

    a, b = jaxpr(tx), jaxpr(other)
    assert str(a) == str(b)
    assert len(a.consts) == len(b.consts)
    for x, y in zip(a.consts, b.consts, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def optimizers() -> dict:
    return {name: lopt.pretrained_optimizer(name, num_steps=HORIZON) for name in NAMES}


@pytest.fixture(scope="module")
def bare(optimizers) -> dict:
    """Each bare optimizer's run on :func:`_inputs`."""
    return {name: _run(tx, _params(), *_inputs()) for name, tx in optimizers.items()}


# --------------------------------------------------------------------------------------------
# One constructor.


def _by_hand(name: str, num_steps, safeguards=None, **overrides):
    """The rule as meta-trained (``safeguards=None``: velo_lopt's defaults are its safeguards)
    or wrapped in ``lopt.safeguarded(**safeguards)``."""
    meta, metadata = lopt.pretrained(name)  # the existing two-value call keeps working
    build = {"mlp_lopt": lopt.mlp_lopt, "star_lopt": lopt.star_lopt,
             "velo_lopt": lopt.velo_lopt}[name]
    rule = build(meta, num_steps, **{**metadata["optimizer_kwargs"], **overrides})
    return rule if safeguards is None else lopt.safeguarded(rule, **safeguards)


def _shipped_by_hand(name: str, num_steps, **overrides):
    """What ``pretrained_optimizer`` makes by default: velo_lopt with its built-in safeguards,
    the others wrapped in the same ones."""
    return _by_hand(name, num_steps, None if name == "velo_lopt" else {}, **overrides)


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_optimizer_is_the_optimizer_built_by_hand(name, optimizers):
    horizon = None if name == "mlp_lopt" else HORIZON  # the shipped mlp_lopt reads no horizon
    _same_computation(optimizers[name], _shipped_by_hand(name, horizon))


@pytest.mark.parametrize("name", NAMES)
def test_without_safeguards_it_is_the_meta_trained_rule(name):
    """``safeguards=False``: the bare rule (velo_lopt: VeLO's, min_scale=0, no trust region or
    guard); safeguard settings reach every optimizer the same way."""
    horizon = None if name == "mlp_lopt" else HORIZON
    bare = lopt.pretrained_optimizer(name, HORIZON, safeguards=False)
    off = {"min_scale": 0.0, "max_relative_step": math.inf, "max_regress": math.inf}
    _same_computation(bare, _by_hand(name, horizon, **off) if name == "velo_lopt"
                      else _by_hand(name, horizon))
    settings = {"max_relative_step": 0.1, "guard_rate": 0.2}
    tuned = lopt.pretrained_optimizer(name, HORIZON, **settings)
    _same_computation(tuned, _by_hand(name, horizon, **settings) if name == "velo_lopt"
                      else _by_hand(name, horizon, settings))


def test_the_horizon_is_accepted_by_every_optimizer_and_needed_where_read(optimizers):
    _same_computation(lopt.pretrained_optimizer("mlp_lopt"), optimizers["mlp_lopt"])
    for name in ("star_lopt", "velo_lopt"):
        with pytest.raises(ValueError, match=rf"pretrained_optimizer\('{name}'\).*num_steps="):
            lopt.pretrained_optimizer(name)


def test_overrides_replace_the_recorded_keyword_arguments():
    overridden = lopt.pretrained_optimizer("star_lopt", HORIZON, nominal_step=2e-3,
                                           weight_decay=0.5)
    _same_computation(overridden, _shipped_by_hand("star_lopt", HORIZON, nominal_step=2e-3,
                                                   weight_decay=0.5))


def test_a_traced_horizon(optimizers):
    # a horizon chosen inside jit passes the checks and is read as data, not a constant
    def first_update(num_steps, params):
        opt = lopt.pretrained_optimizer("velo_lopt", num_steps=num_steps)
        return opt.update(params, opt.init(params), params, loss=1.0)[0]

    jaxpr = jax.make_jaxpr(first_update)(jnp.asarray(HORIZON, jnp.float32), _params()).jaxpr
    num_steps = jaxpr.invars[0]
    assert any(num_steps in eqn.invars for eqn in jaxpr.eqns)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"name": "adam"}, ValueError, r"named 'adam'; available: \['mlp_lopt', 'star_lopt', "
                                   r"'velo_lopt'\]"),
    ({"name": "velo_lopt", "num_steps": 0}, ValueError, "num_steps .* > 0, got 0"),
    ({"name": "velo_lopt", "num_steps": -5.0}, ValueError, "num_steps .* > 0, got -5.0"),
    ({"name": "mlp_lopt", "num_steps": float("inf")}, ValueError, "num_steps .* got inf"),
    ({"name": "star_lopt", "num_steps": True}, ValueError, "num_steps .* got True"),
    ({"name": "star_lopt", "num_steps": "1000"}, ValueError, "num_steps .* got '1000'"),
    ({"name": "velo_lopt", "num_steps": np.ones(2)}, ValueError, "num_steps .* scalar"),
    ({"name": "mlp_lopt", "num_steps": 10, "nominal_step": 1e-3}, TypeError,
     r"mlp_lopt takes no keyword argument 'nominal_step'; it accepts \['num_steps', "
     r"'safeguards', 'min_scale', 'max_relative_step', 'max_regress', 'guard_rate'\]"),
    ({"name": "velo_lopt", "num_steps": 10, "lr": 1e-3}, TypeError, "argument 'lr'"),
    ({"name": "star_lopt", "num_steps": 10, "weight_decay": -1.0}, ValueError,
     "weight_decay must be a finite number >= 0"),
    ({"name": "mlp_lopt", "num_steps": 10, "max_relative_step": 0.0}, ValueError,
     r"pretrained_optimizer\('mlp_lopt'\): max_relative_step must be a number > 0"),
    ({"name": "velo_lopt", "num_steps": 10, "guard_rate": 1.5}, ValueError,
     "guard_rate must be a number in"),
    ({"name": "star_lopt", "num_steps": 10, "safeguards": False, "max_regress": 1.0},
     ValueError, "max_regress sets a safeguard, which safeguards=False switches off"),
    ({"name": "mlp_lopt", "num_steps": 10, "safeguards": "no"}, ValueError,
     "safeguards must be True or False, got 'no'"),
])
def test_pretrained_optimizer_errors_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        lopt.pretrained_optimizer(**kwargs)


def test_build_optimizer_reads_a_saved_file(tmp_path, optimizers):
    meta, metadata = lopt.pretrained("velo_lopt")
    path = lopt.save_meta_params(tmp_path / "velo.npz", meta, metadata)
    loaded = lopt.build_optimizer(*lopt.load_meta_params(path), num_steps=HORIZON)
    _same_computation(loaded, optimizers["velo_lopt"])
    with pytest.raises(ValueError, match=r"metadata\['optimizer'\] must name one of"):
        lopt.build_optimizer(meta, {}, num_steps=HORIZON)


# --------------------------------------------------------------------------------------------
# optax combinators.


@pytest.mark.parametrize("name", NAMES)
def test_multisteps_of_a_chain(name, optimizers):
    # Gradient accumulation over k = 2 minibatches, then a clip that binds, then the learned
    # update (chain inside MultiSteps keeps the loss; see bilevel.lopt.ecosystem): zero updates
    # at odd steps; at even steps the bare optimizer's update of the clipped mean of the last
    # two gradients, with the last minibatch's loss.
    tx = optimizers[name]
    clip = optax.clip_by_global_norm(0.5)
    grads, losses = _inputs()
    _, updates = _run(optax.MultiSteps(optax.chain(clip, tx), 2), _params(), grads, losses)
    means = jax.tree_util.tree_map(lambda g: g.reshape(2, 2, *g.shape[1:]).mean(axis=1), grads)
    clipped = jax.vmap(lambda g: clip.update(g, optax.EmptyState())[0])(means)
    assert not np.allclose(clipped["kernel"], means["kernel"])  # the clip binds
    # the bare run's compilation takes STEPS inputs; its last two are padding here
    padded = jax.tree_util.tree_map(lambda c: jnp.concatenate([c, c]), clipped)
    _, expected = _run(tx, _params(), padded, jnp.concatenate([losses[1::2], losses[1::2]]))
    _close(jax.tree_util.tree_map(lambda u: u[1::2], updates),
           jax.tree_util.tree_map(lambda u: u[:2], expected))
    for u in jax.tree_util.tree_leaves(updates):
        np.testing.assert_array_equal(u[0::2], 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_multi_transform_with_frozen_leaves(name, optimizers):
    tx = optimizers[name]
    labels = {"kernel": "learned", "bias": "frozen"}
    partitioned = optax.multi_transform({"learned": tx, "frozen": optax.set_to_zero()}, labels)
    grads, losses = _inputs()
    final, updates = _run(partitioned, _params(), grads, losses)
    np.testing.assert_array_equal(final["bias"], _params()["bias"])
    np.testing.assert_array_equal(updates["bias"], 0.0)
    # the learned optimizer sees only its leaves (VeLO's controller too) and the loss
    expected, _ = _run(tx, {"kernel": _params()["kernel"]}, {"kernel": grads["kernel"]}, losses)
    _close(final["kernel"], expected["kernel"])


@pytest.mark.parametrize("name", NAMES)
def test_every_leaf_frozen(name, optimizers):
    partitioned = optax.multi_transform(
        {"learned": optimizers[name], "frozen": optax.set_to_zero()},
        {"kernel": "frozen", "bias": "frozen"})
    final, updates = _run(partitioned, _params(), *_inputs())
    _close(final, _params(), rtol=0, atol=0)
    assert all(np.all(u == 0) for u in jax.tree_util.tree_leaves(updates))


# --------------------------------------------------------------------------------------------
# flax: TrainState and nnx.Optimizer.


def test_train_state_passes_the_loss(optimizers, bare):
    tx = optimizers["velo_lopt"]  # the optimizer that fails without the loss
    grads, losses = jax.tree_util.tree_map(lambda x: x[0], _inputs())
    state = lopt.TrainState.create(apply_fn=None, params=_params(), tx=tx)
    new = jax.jit(lambda s, g, loss: s.apply_gradients(grads=g, loss=loss))(state, grads,
                                                                           losses)
    expected = jax.tree_util.tree_map(lambda u: u[0], bare["velo_lopt"][1])
    _close(new.params, optax.apply_updates(_params(), expected))
    assert int(new.step) == 1 and new.tx is tx
    assert int(new.opt_state.accumulators.iteration) == 1


def test_train_state_with_a_plain_optax_optimizer_is_flax_train_state():
    grads, _ = jax.tree_util.tree_map(lambda x: x[0], _inputs())
    tx = optax.sgd(0.1, momentum=0.9)
    ours = lopt.TrainState.create(apply_fn=None, params=_params(), tx=tx)
    ours = ours.apply_gradients(grads=grads, loss=1.0).apply_gradients(grads=grads, loss=0.5)
    theirs = train_state.TrainState.create(apply_fn=None, params=_params(), tx=tx)
    theirs = theirs.apply_gradients(grads=grads).apply_gradients(grads=grads)
    _close(ours.params, theirs.params, rtol=0, atol=0)


def test_train_state_fields_are_replaced_and_other_keywords_reach_the_optimizer():
    class Noted(lopt.TrainState):
        note: jax.Array = None

    def update(updates, state, params=None, *, scale=1.0, **extra_args):
        assert extra_args == {"loss": 2.0}
        return jax.tree_util.tree_map(lambda u: -scale * u, updates), state

    tx = optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)
    grads = jax.tree_util.tree_map(jnp.ones_like, _params())
    state = Noted.create(apply_fn=None, params=_params(), tx=tx, note=jnp.zeros(()))
    new = state.apply_gradients(grads=grads, loss=2.0, scale=0.5, note=jnp.ones(()))
    _close(new.params, jax.tree_util.tree_map(lambda p: p - 0.5, _params()))
    assert float(new.note) == 1.0 and new.tx is tx and isinstance(new, Noted)


class _TinyModel(nnx.Module):
    def __init__(self):
        params = _params()
        self.kernel = nnx.Param(params["kernel"])
        self.bias = nnx.Param(params["bias"])

    def __call__(self, x):
        return jnp.tanh(x @ self.kernel + self.bias)


X = jnp.asarray(np.linspace(-1.0, 1.0, 15).reshape(5, 3), jnp.float32)


def _model_loss(model):
    return jnp.mean((model(X) - 0.5) ** 2)


@nnx.jit
def _nnx_step(model, optimizer):
    loss, grads = nnx.value_and_grad(_model_loss)(model)
    optimizer.update(model, grads, loss=loss)
    return loss, grads


@pytest.mark.parametrize("name", NAMES)
def test_nnx_optimizer_under_nnx_jit(name, optimizers):
    # Before the state held plain arrays, each parameter's FactoredMoments sat inside an
    # nnx.Param; nnx.Optimizer wrote the new one back as an nnx.State and the second update
    # failed on FactoredMoments._replace.
    tx = optimizers[name]
    model = _TinyModel()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    losses, grads = [], []
    for _ in range(STEPS):
        loss, g = _nnx_step(model, optimizer)
        losses.append(loss)
        grads.append(nnx.to_pure_dict(g))
    # the same updates from optax on the gradients and losses nnx saw
    grads = jax.tree_util.tree_map(lambda *g: jnp.stack(g), *grads)
    expected, _ = _run(tx, _params(), grads, jnp.stack(losses))
    _close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), expected)
    accumulators = nnx.as_pure(optimizer.opt_state)
    accumulators = getattr(accumulators, "inner", accumulators)  # SafeguardState
    accumulators = getattr(accumulators, "accumulators", accumulators)  # VeLOState
    assert isinstance(accumulators.factored["kernel"], lopt.optimizers.FactoredMoments)
    assert int(accumulators.iteration) == STEPS and int(optimizer.step[...]) == STEPS
