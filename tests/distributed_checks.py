"""Checks of bilevel.distributed on 8 devices; ``tests/test_distributed.py`` runs this file in a
process of its own with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the flag must be
set before JAX starts, so it cannot run inside the main test process).

Each public entry point runs once on one device and once with the batch (or population) split
over 8, both under ``jit`` in float32; the results must agree to ``rtol=RTOL, atol=ATOL`` (the
only difference is the order of the cross-device sums). The compiled sharded program must hold
an all-reduce and must not gather the batch: no all-gather at all in the data-parallel
programs, and no collective whose result has a batch-sized (or larger) axis.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
import hvp
from bilevel import distributed

DEVICES = 8
RTOL, ATOL = 1e-5, 1e-6  # float32: partial sums in another order, nothing else
BATCH, VAL, FEATURES, STEPS = 64, 32, 6, 4


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
    assert jax.device_count() == DEVICES, (
        f"run with XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES}; "
        f"found {jax.device_count()} devices")


@pytest.fixture(scope="module")
def mesh():
    return distributed.data_mesh()


# --------------------------------------------------------------------------------------------
# A logistic regression whose hyperparameters (per-feature L2 weights and a logit offset) touch
# the data, so that the cross product, like every gradient and HVP, sums over the batch.


def logits(params, hparams, x):
    return x @ params["w"] + params["b"] + hparams["offset"]


def inner_loss(params, hparams, x, y):
    data = jnp.mean(optax.sigmoid_binary_cross_entropy(logits(params, hparams, x), y))
    return data + 0.5 * jnp.sum(jnp.exp(hparams["log_l2"]) * params["w"] ** 2)


def outer_loss(params, hparams, x, y):
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits(params, hparams, x), y))


def _data(seed, n):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, FEATURES)).astype(np.float32)
    y = (x[:, 0] - x[:, 1] + 0.5 * rng.standard_normal(n) > 0).astype(np.float32)
    return x, y


PARAMS = {"w": np.linspace(-0.5, 0.5, FEATURES, dtype=np.float32), "b": np.float32(0.1)}
HPARAMS = {"log_l2": np.full(FEATURES, -2.0, np.float32), "offset": np.float32(0.2)}
TRAIN, VALID = _data(0, BATCH), _data(1, VAL)
MINIBATCHES = tuple(np.stack(a) for a in zip(*[_data(2 + t, BATCH) for t in range(STEPS)],
                                             strict=True))  # leaves (STEPS, BATCH, ...)


def _single(tree):
    return jax.device_put(tree, jax.devices()[0])


def _close(actual, expected):
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=RTOL, atol=ATOL)


def _sizes(collective):
    return [d for shape in collective.shapes for d in shape]


def _assert_data_parallel(compiled, batch=BATCH):
    """An all-reduce, no all-gather, and no collective carrying a batch-sized axis."""
    found = distributed.collectives(compiled)
    ops = [c.op for c in found]
    assert "all-reduce" in ops, ops
    assert "all-gather" not in ops, [c for c in found if c.op == "all-gather"]
    assert all(max(_sizes(c), default=0) < batch for c in found), found
    return found


def _run_both(fun, single_args, sharded_args):
    """``fun`` jitted, on one device and on the mesh; returns both outputs and the compiled
    sharded program."""
    jitted = jax.jit(fun)
    expected = jitted(*_single(single_args))
    compiled = jitted.lower(*sharded_args).compile()
    return compiled(*sharded_args), expected, compiled


# --------------------------------------------------------------------------------------------
# Data-parallel curvature products and hypergradients.


def test_hvp(mesh):
    vector = {"w": np.ones(FEATURES, np.float32), "b": np.float32(-1.0)}

    def fun(params, vector, hparams, x, y):
        return hvp.hvp(inner_loss, params, vector, hparams, x, y)

    single = (PARAMS, vector, HPARAMS, *TRAIN)
    sharded = (*distributed.replicate((PARAMS, vector, HPARAMS), mesh),
               *distributed.shard_batch(TRAIN, mesh, name="inner_args"))
    actual, expected, compiled = _run_both(fun, single, sharded)
    _close(actual, expected)
    _assert_data_parallel(compiled)
    assert actual["w"].sharding.is_fully_replicated


def test_solve(mesh):
    gradient = {"w": np.arange(FEATURES, dtype=np.float32) / FEATURES, "b": np.float32(1.0)}

    def fun(params, gradient, hparams, x, y):
        operator = hvp.hessian(inner_loss, params, hparams, x, y, damping=0.1)
        return hvp.solve(operator, gradient, hvp.CG(maxiter=30, tol=1e-6))

    single = (PARAMS, gradient, HPARAMS, *TRAIN)
    sharded = (*distributed.replicate((PARAMS, gradient, HPARAMS), mesh),
               *distributed.shard_batch(TRAIN, mesh))
    (x, info), (x_ref, info_ref), compiled = _run_both(fun, single, sharded)
    assert bool(info.converged) and int(info.iterations) == int(info_ref.iterations)
    _close(x, x_ref)
    _assert_data_parallel(compiled)


def test_hypergrad(mesh):
    # PARAMS is not an inner minimiser: the check here is that sharding changes nothing, so
    # the stationarity check (which would rightly flag it) is off.
    def fun(params, hparams, inner_args, outer_args):
        return bilevel.hypergrad(inner_loss, outer_loss, params, hparams, inner_args,
                                 outer_args, solver=hvp.CG(maxiter=30, tol=1e-6),
                                 stationarity_tol=None)

    single = (PARAMS, HPARAMS, TRAIN, VALID)
    sharded = (*distributed.replicate((PARAMS, HPARAMS), mesh),
               distributed.shard_batch(TRAIN, mesh, name="inner_args"),
               distributed.shard_batch(VALID, mesh, name="outer_args"))
    (grad, info), (grad_ref, info_ref), compiled = _run_both(fun, single, sharded)
    assert bool(info.converged)
    _close((grad, info.outer_loss, info.inverse_hvp),
           (grad_ref, info_ref.outer_loss, info_ref.inverse_hvp))
    found = _assert_data_parallel(compiled, batch=VAL)
    # The CG loop (it stops on a condition, so its trip count is unknown) reduces the HVP, a
    # params-sized vector, on every iteration; outside it, the outer gradient and the cross
    # product are reduced once.
    in_solve = [c for c in found if c.loop_depth == 1 and c.trips is None]
    assert any(FEATURES in _sizes(c) for c in in_solve), found
    assert any(c.loop_depth == 0 for c in found), found


@pytest.mark.parametrize("mode", ["reverse", "mixflow"])
def test_unrolled_hypergrad(mesh, mode):
    optimizer = optax.sgd(0.5)

    def fun(params, hparams, per_step_args, outer_args):
        return bilevel.unrolled_hypergrad(inner_loss, outer_loss, params, hparams, optimizer,
                                          STEPS, outer_args=outer_args,
                                          per_step_args=per_step_args, mode=mode)

    single = (PARAMS, HPARAMS, MINIBATCHES, VALID)
    sharded = (*distributed.replicate((PARAMS, HPARAMS), mesh),
               distributed.shard_batch(MINIBATCHES, mesh, axis=1, name="per_step_args"),
               distributed.shard_batch(VALID, mesh, name="outer_args"))
    (grad, info), (grad_ref, info_ref), compiled = _run_both(fun, single, sharded)
    _close((grad, info.outer_loss, info.inner_losses, info.params),
           (grad_ref, info_ref.outer_loss, info_ref.inner_losses, info_ref.params))
    found = _assert_data_parallel(compiled, batch=VAL)
    # Every step reduces its gradient in the forward scan and its HVP and cross product in the
    # backward one: collectives inside scans of a known STEPS trips.
    assert {c.trips for c in found if c.loop_depth == 1} == {STEPS}, found


def test_per_step_args_stay_sharded_on_the_batch_axis(mesh):
    placed = distributed.shard_batch(MINIBATCHES, mesh, axis=1)
    x = placed[0]
    assert x.sharding.spec == jax.sharding.PartitionSpec(None, "batch")
    assert {s.data.shape for s in x.addressable_shards} == {(STEPS, BATCH // DEVICES, FEATURES)}


def test_global_batch_equals_shard_batch_on_one_process(mesh):
    stitched = distributed.global_batch(TRAIN, mesh, name="inner_args")
    placed = distributed.shard_batch(TRAIN, mesh)
    for a, b in zip(stitched, placed, strict=True):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------------------------
# Bad input.


def test_indivisible_batch_names_the_leaf_and_sizes(mesh):
    _, y = _data(3, 60)
    with pytest.raises(ValueError, match=re.escape(
            "shard_batch: inner_args leaf [1] has batch size 60 on axis 0, not divisible by "
            "the 8 devices")):
        distributed.shard_batch((TRAIN[0], y), mesh, name="inner_args")
    with pytest.raises(ValueError, match=re.escape(
            "global_batch: local_tree leaf [1] has batch size 60 on axis 0, not divisible by "
            "the 8 devices this process holds in the mesh")):
        distributed.global_batch((TRAIN[0], y), mesh)


def test_leaf_without_batch_axis_is_refused(mesh):
    with pytest.raises(ValueError, match=r"leaf \['scale'\] has shape \(\), which has no batch"):
        distributed.shard_batch({"x": TRAIN[0], "scale": np.float32(1.0)}, mesh)
    with pytest.raises(ValueError, match="axis must be an integer >= 0"):
        distributed.shard_batch(TRAIN, mesh, axis=-1)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        distributed.shard_batch(TRAIN, "batch")


def test_indivisible_population_is_refused(mesh):
    with pytest.raises(ValueError, match="population 12 is not divisible by the 8 devices"):
        distributed.sharded_es_hypergrad(lambda h: jnp.sum(h**2), jnp.ones(3), jax.random.key(0),
                                         population=12, mesh=mesh)


def test_data_mesh_over_a_subset(mesh):
    small = distributed.data_mesh(jax.devices()[:4], axis_name="data")
    assert small.shape == {"data": 4} and mesh.shape == {"batch": DEVICES}
    with pytest.raises(ValueError, match="more than once"):
        distributed.data_mesh([jax.devices()[0]] * 2)


# --------------------------------------------------------------------------------------------
# Populations of ES and PES.


def meta_loss(hparams, x, y):
    """Validation loss after a few gradient steps of ridge regression with L2 weight e^h."""
    def step(w, _):
        grad = x.T @ (x @ w - y) / x.shape[0] + jnp.exp(hparams["log_l2"]) * w
        return w - 0.3 * grad, None

    w, _ = jax.lax.scan(step, jnp.zeros(x.shape[1], x.dtype), None, length=5)
    return jnp.mean((x @ w - y) ** 2) + hparams["offset"] ** 2


@pytest.mark.parametrize("antithetic", [True, False])
def test_es_population(mesh, antithetic):
    population = 32

    def sharded(hparams, key, x, y):
        return distributed.sharded_es_hypergrad(meta_loss, hparams, key, population, 0.05,
                                                (x, y), antithetic, mesh=mesh)

    def single(hparams, key, x, y):
        return bilevel.es_hypergrad(meta_loss, hparams, key, population, 0.05, (x, y),
                                    antithetic)

    key = jax.random.key(3)
    args = (HPARAMS, key, *VALID)
    grad_ref, info_ref = jax.jit(single)(*_single(args))
    compiled = jax.jit(sharded).lower(*distributed.replicate(args, mesh)).compile()
    grad, info = compiled(*distributed.replicate(args, mesh))
    _close((grad, info.outer_loss, info.outer_loss_std),
           (grad_ref, info_ref.outer_loss, info_ref.outer_loss_std))
    # Shared directions: only the losses, one number per particle, cross devices.
    found = distributed.collectives(compiled)
    assert [(c.op, c.shapes) for c in found] == [("all-gather", ((population,),))], found


def test_pes_population_and_state_stay_on_their_devices(mesh):
    population, hidden = 16, 5

    def inner_init(key):
        return {"w": 0.1 * jax.random.normal(key, (hidden,), jnp.float32), "t": jnp.int32(0)}

    def unroll(hparams, state, key, x, y):
        def step(w, _):
            grad = x[:, :hidden].T @ (x[:, :hidden] @ w - y) / x.shape[0]
            return w - 0.2 * (grad + jnp.exp(hparams["log_l2"][:hidden]) * w), None

        noise = 0.01 * jax.random.normal(key, (hidden,), jnp.float32)
        w, _ = jax.lax.scan(step, state["w"] + noise, None, length=3)
        loss = jnp.mean((x[:, :hidden] @ w - y) ** 2) + hparams["offset"] ** 2
        return {"w": w, "t": state["t"] + 1}, loss

    hparams = jax.tree_util.tree_map(jnp.asarray, HPARAMS)
    state = bilevel.pes_init(inner_init, hparams, jax.random.key(4), population)
    single = jax.jit(lambda h, s, k, x, y: bilevel.pes_hypergrad(unroll, h, s, k, 0.05, (x, y)))
    sharded = jax.jit(lambda h, s, k, x, y: distributed.sharded_pes_hypergrad(
        unroll, h, s, k, 0.05, (x, y), mesh=mesh))
    state_ref, state_sharded = _single(state), distributed.shard_pes_state(state, mesh)
    hparams_sharded, valid = distributed.replicate((hparams, VALID), mesh)
    for t in range(2):
        key = jax.random.key(10 + t)
        grad_ref, state_ref, info_ref = single(hparams, state_ref, key, *VALID)
        grad, state_sharded, info = sharded(hparams_sharded, state_sharded, key, *valid)
        _close((grad, info.outer_loss, state_sharded), (grad_ref, info_ref.outer_loss, state_ref))
        w = state_sharded.inner_state["w"]
        assert {s.data.shape for s in w.addressable_shards} == {(population // DEVICES, hidden)}
    assert sharded._cache_size() == 1  # the new state comes back placed as the old: no recompile
    args = (hparams_sharded, state_sharded, jax.random.key(0), *valid)
    # The losses (all-gather) and the estimate's partial sums (all-reduce of hparams-sized
    # arrays) cross devices; the particles' states and perturbation sums never do.
    found = distributed.collectives(sharded.lower(*args).compile())
    assert sorted({c.op for c in found}) == ["all-gather", "all-reduce"], found
    assert all(max(_sizes(c), default=0) <= population for c in found), found
    assert all(len(shape) <= 1 for c in found for shape in c.shapes), found


# --------------------------------------------------------------------------------------------
# The checks above can fail: a loss that mixes examples across the batch makes XLA gather it,
# and LiSSA's random minibatches (HessianOperator.subsample) move examples between devices.


def test_a_loss_mixing_the_batch_is_caught(mesh):
    def mixing(params, hparams, x, y):
        return jnp.mean(jnp.sort(x @ params["w"]) * y)  # a sort across all examples

    fun = jax.jit(lambda p, h, x, y: jax.grad(mixing)(p, h, x, y))
    sharded = (*distributed.replicate((PARAMS, HPARAMS), mesh),
               *distributed.shard_batch(TRAIN, mesh))
    with pytest.raises(AssertionError):
        _assert_data_parallel(fun.lower(*sharded).compile())


def test_lissa_subsampling_moves_examples_between_devices(mesh):
    def fun(params, gradient, hparams, x, y):
        operator = hvp.hessian(inner_loss, params, hparams, x, y, batch_argnums=(1, 2),
                               damping=0.1)
        return hvp.solve(operator, gradient, hvp.LiSSA(maxiter=4, batch_size=16))

    sharded = (*distributed.replicate((PARAMS, PARAMS, HPARAMS), mesh),
               *distributed.shard_batch(TRAIN, mesh))
    # XLA gathers each random minibatch by an all-reduce of the rows every device holds.
    found = distributed.collectives(jax.jit(fun).lower(*sharded).compile())
    assert any(shape[-2:] == (16, FEATURES) for c in found for shape in c.shapes), found
