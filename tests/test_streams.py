"""Data streams for bilevel.train (bilevel.streams): Minibatches drawn in the jitted step, and
host iterators of batches.

Float64 (tests/conftest.py). The trainer's problem is bilevel.ridge (a log-L2 hyperparameter,
with a closed form); its configurations are module-level objects of one family, so that each
kind of data compiles the outer step once (five outer steps in all, with SABA's): 19 s on one
core.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
from conftest import assert_bit_identical, norm_metric

import bilevel
import bilevel.checkpoint
import hvp
from bilevel import Minibatches
from bilevel.stochastic import SABA, SOBA
from bilevel.trainer import CHECKPOINT_NAME, ImplicitMethod, TrainerConfig, train

# --------------------------------------------------------------------------------------------
# The sampler alone.

KEY = jax.random.key(0)
N = 40
SAMPLES = (jnp.arange(N, dtype=jnp.float64), jnp.arange(N, dtype=jnp.float64)[:, None] * 2.0)


@jax.jit
def draws(data, key, steps):
    return jax.vmap(lambda t: data.indices(key, t))(steps)


def indices(data, steps, key=KEY):
    """Draws ``steps`` one by one (``Minibatches.indices``), under one jit."""
    return np.asarray(draws(data, key, jnp.asarray(list(steps))))


def test_same_key_same_batches_other_step_or_key_other_batches():
    data = Minibatches(SAMPLES, 8)
    first = indices(data, range(12))
    np.testing.assert_array_equal(first, indices(data, range(12)))
    # Eagerly, one draw at a time: the same numbers.
    np.testing.assert_array_equal(np.stack([data.indices(KEY, t) for t in (0, 11)]),
                                  first[[0, 11]])
    assert len({tuple(row) for row in first}) == 12  # every draw differs
    assert not np.array_equal(indices(data, range(12), jax.random.key(1)), first)
    # batch() takes the rows of every array at indices().
    x, doubled = jax.jit(data.batch)(KEY, 3)
    np.testing.assert_array_equal(x, first[3])
    np.testing.assert_array_equal(doubled[:, 0], 2.0 * first[3])


def test_epochs_cover_every_sample_once():
    data = Minibatches(SAMPLES, 8)  # 5 draws per epoch
    epochs = indices(data, range(15)).reshape(3, 40)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(N))
    assert not np.array_equal(epochs[0], epochs[1])  # a new order each epoch
    # 40 = 5 * 7 + 5: 5 draws per epoch, each sample at most once; the 5 left out change.
    data = Minibatches(SAMPLES, 7)
    assert data.batches_per_epoch == 5
    epochs = indices(data, range(10)).reshape(2, 35)
    assert [len(set(epoch)) for epoch in epochs] == [35, 35]
    assert set(range(N)) - set(epochs[0]) != set(range(N)) - set(epochs[1])


def test_draws_over_a_range_equal_the_single_draws():
    """The trainer draws a step's batches together; they are the draws one by one, across an
    epoch's end."""
    for data in (Minibatches(SAMPLES, 7), Minibatches(SAMPLES, 7, replace=True)):
        rows = jax.jit(data.indices_range, static_argnums=2)(KEY, 3, 6)
        np.testing.assert_array_equal(rows, indices(data, range(3, 9)))


def test_epoch_orders_are_uniform_enough():
    """Which sample comes first in an epoch, over 4000 epochs of 8 samples: each is expected
    500 times, standard deviation 21; the bounds are 5 deviations."""
    data = Minibatches((jnp.zeros(8),), 8)
    first = indices(data, range(4000))[:, 0]
    counts = np.bincount(np.asarray(first), minlength=8)
    assert np.all(np.abs(counts - 500) < 105), counts


def test_replace_draws_independent_batches_with_replacement():
    data = Minibatches(SAMPLES, 60, replace=True)  # larger than the data: allowed with replace
    rows = indices(data, range(4))
    assert rows.shape == (4, 60) and rows.min() >= 0 and rows.max() < N
    assert len(set(rows[0])) < 60  # repeats
    np.testing.assert_array_equal(rows, indices(data, range(4)))


def test_minibatches_is_a_pytree_with_static_settings():
    data = Minibatches(SAMPLES, 8)
    leaves, tree = jax.tree_util.tree_flatten(data)
    assert len(leaves) == 2
    rebuilt = jax.tree_util.tree_unflatten(tree, leaves)
    assert (rebuilt.batch_size, rebuilt.replace, rebuilt.num_samples) == (8, False, N)
    assert repr(data) == "Minibatches(<40 samples>, batch_size=8, replace=False)"
    with pytest.raises(AttributeError, match="immutable"):
        data.batch_size = 4


# --------------------------------------------------------------------------------------------
# The trainer's problem: bilevel.ridge, whose closed form gives λ*.

RIDGE = bilevel.ridge(jax.random.key(0), n_train=256, n_val=64, dim=10, noise=1.0,
                      dtype=jnp.float64)
INNER_ARGS, OUTER_ARGS = RIDGE.inner_args, RIDGE.outer_args
INNER_BATCH, OUTER_BATCH = 64, 32

STEPS = 150
# One config family (outer_steps, checkpoint_every and seed are not part of the compiled step):
# each kind of data compiles once for the whole file.
CONFIG = TrainerConfig(outer_steps=STEPS, inner_steps=10, inner_optimizer=optax.sgd(0.2),
                       outer_optimizer=optax.adam(optax.exponential_decay(0.1, STEPS, 0.02)),
                       method=ImplicitMethod(hvp.CG(maxiter=20, tol=1e-10)))
RESUMABLE = dataclasses.replace(CONFIG, outer_steps=6, checkpoint_every=2)
DRAWS = CONFIG.inner_steps + 1  # inner batches per outer step


def run(inner_args, outer_args, config=RESUMABLE, checkpoint_dir=None, **kwargs):
    return train(RIDGE.inner_loss, RIDGE.outer_loss, RIDGE.params, RIDGE.hparams, config,
                 inner_args, outer_args, checkpoint_dir=checkpoint_dir, progress=False, **kwargs)


def host_batches(arrays, batch_size, seed):
    """A zero-argument function returning a fresh iterator: shuffled epochs, forever."""
    def batches():
        rng = np.random.default_rng(seed)
        n = len(arrays[0])
        while True:
            order = rng.permutation(n)
            for start in range(0, n - batch_size + 1, batch_size):
                yield tuple(np.asarray(a)[order[start:start + batch_size]] for a in arrays)
    return batches


STREAMS = {
    "minibatches": lambda: (Minibatches(INNER_ARGS, INNER_BATCH),
                            Minibatches(OUTER_ARGS, OUTER_BATCH)),
    "iterator": lambda: (host_batches(INNER_ARGS, INNER_BATCH, 1),
                         host_batches(OUTER_ARGS, OUTER_BATCH, 2)),
}


# --------------------------------------------------------------------------------------------
# Full batch stays the default.


def test_full_batch_default_is_unchanged(tmp_path):
    """Plain tuples (or lists) are the whole data at every step; an iterator repeating them
    runs another program (one-step scans) to the same numbers, to float64 round-off."""
    full = run(INNER_ARGS, OUTER_ARGS)
    assert_bit_identical(run(list(INNER_ARGS), list(OUTER_ARGS), checkpoint_dir=tmp_path), full)
    assert bilevel.checkpoint.read_metadata(tmp_path / CHECKPOINT_NAME)["data"] == {
        "inner_args": {"kind": "arrays"}, "outer_args": {"kind": "arrays"}}

    def repeat(arrays):
        return lambda: iter(lambda: arrays, None)  # the same batch, forever

    repeated = run(repeat(INNER_ARGS), repeat(OUTER_ARGS))
    np.testing.assert_allclose(repeated.hparams, full.hparams, rtol=1e-12)
    np.testing.assert_allclose(repeated.params, full.params, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# ImplicitMethod on minibatches of the closed-form ridge problem.


def ridge_value(log_l2):
    params = RIDGE.solve_inner(RIDGE.params, jnp.asarray(log_l2), *RIDGE.inner_args)
    return float(RIDGE.outer_loss(params, log_l2, *RIDGE.outer_args))


def test_implicit_on_minibatches_gets_close_to_the_full_batch_answer():
    """λ* = -2.575 (a bounded scalar minimisation of the closed form); λ starts at -2.0.

    150 outer Adam steps (learning rate 0.1 decaying to 0.002) after 10 SGD steps each: the full
    batch ends 0.002 from λ*. Inner minibatches of 64 of the 256 rows and outer ones of 32 of 64
    make the hypergradient noisy and biased (E[H_B⁻¹] ≠ H⁻¹, θ in SGD's noise ball), and the
    outer loss is flat around λ* (1e-4 of it is 0.1 away): over seeds 0-7 the minibatch runs
    ended 0.006-0.088 from λ* with validation losses within 3e-4 (relative) of the optimum.
    The bounds below are about twice those, for seeds 0-3.
    """
    optimum = scipy.optimize.minimize_scalar(ridge_value, bounds=(-8.0, 4.0), method="bounded",
                                             options={"xatol": 1e-10}).x
    full = float(run(INNER_ARGS, OUTER_ARGS, config=CONFIG).hparams)
    assert abs(full - optimum) < 0.01
    ends = np.array([float(run(*STREAMS["minibatches"](),
                               config=dataclasses.replace(CONFIG, seed=seed)).hparams)
                     for seed in range(4)])
    assert len(set(ends)) == 4  # the draws follow the seed
    assert np.all(np.abs(ends - full) < 0.2), (ends, full)
    assert np.mean(np.abs(ends - optimum)) < 0.08
    value = ridge_value(optimum)
    assert all(ridge_value(end) - value < 1e-3 * value for end in ends)
    # Host batches of the same sizes: another stream, as close.
    host = float(run(*STREAMS["iterator"](), config=CONFIG).hparams)
    assert abs(host - full) < 0.2


def compiles_of_outer_step(caplog):
    return sum("_outer_step" in record.getMessage() and "Compiling" in record.getMessage()
               for record in caplog.records)


def test_minibatches_of_new_data_reuse_the_compiled_step(caplog):
    other = bilevel.ridge(jax.random.key(1), n_train=256, n_val=64, dim=10, dtype=jnp.float64)
    config = dataclasses.replace(RESUMABLE, outer_steps=2, checkpoint_every=None)
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        first = run(*STREAMS["minibatches"](), config=config)
        second = run(Minibatches(other.inner_args, INNER_BATCH),
                     Minibatches(other.outer_args, OUTER_BATCH), config=config)
    assert compiles_of_outer_step(caplog) <= 1  # 0 when an earlier test compiled it
    assert float(first.hparams) != float(second.hparams)


# --------------------------------------------------------------------------------------------
# Kill and resume: the stream continues exactly.


@pytest.mark.parametrize("kind", STREAMS)
def test_killed_and_resumed_run_is_bit_identical(kind, tmp_path):
    whole = run(*STREAMS[kind](), checkpoint_dir=tmp_path / "whole", metrics=norm_metric)

    # Stopped after 3 of 6 steps, then restarted.
    run(*STREAMS[kind](), config=dataclasses.replace(RESUMABLE, outer_steps=3),
        checkpoint_dir=tmp_path / "halves", metrics=norm_metric)
    resumed = run(*STREAMS[kind](), checkpoint_dir=tmp_path / "halves", metrics=norm_metric)
    assert resumed.resumed_from == 3
    assert_bit_identical(whole, resumed)

    # Killed by an exception in step 5, after the checkpoint of step 4.
    def dies_at_step_5(params, hparams, calls=[]):  # noqa: B006 (a call counter)
        calls.append(None)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")
        return norm_metric(params, hparams)

    with pytest.raises(KeyboardInterrupt):
        run(*STREAMS[kind](), checkpoint_dir=tmp_path / "killed", metrics=dies_at_step_5)
    data = bilevel.checkpoint.read_metadata(tmp_path / "killed" / CHECKPOINT_NAME)["data"]
    if kind == "iterator":  # the batches the 4 saved steps consumed
        assert data == {"inner_args": {"kind": "iterator", "consumed": 4 * DRAWS},
                        "outer_args": {"kind": "iterator", "consumed": 4}}
    else:
        assert data["inner_args"] == {"kind": "Minibatches", "samples": 256,
                                      "batch_size": INNER_BATCH, "replace": False}
    restarted = run(*STREAMS[kind](), checkpoint_dir=tmp_path / "killed", metrics=norm_metric)
    assert restarted.resumed_from == 4
    assert_bit_identical(whole, restarted)


def test_a_bare_iterator_trains_but_cannot_resume(tmp_path):
    inner, outer = STREAMS["iterator"]()
    config = dataclasses.replace(RESUMABLE, outer_steps=2)
    first = run(inner(), outer(), config=config, checkpoint_dir=tmp_path)
    assert_bit_identical(first, run(inner, outer, config=config))  # as the function's run
    with pytest.raises(ValueError, match=r"bilevel\.train: inner_args is an iterator, which "
                                         r"cannot be rewound to resume the checkpoint at outer "
                                         r"step 2 \(22 batches consumed\); pass a zero-argument "
                                         r"function"):
        run(inner(), outer, checkpoint_dir=tmp_path)


def test_a_checkpoint_of_other_data_is_refused(tmp_path):
    run(INNER_ARGS, OUTER_ARGS, config=dataclasses.replace(RESUMABLE, outer_steps=2),
        checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"does not match this run: its inner_args were a tuple "
                                         r"of arrays, this run's are Minibatches\(batch_size=64, "
                                         r"replace=False\) of 256 samples"):
        run(Minibatches(INNER_ARGS, INNER_BATCH), OUTER_ARGS, checkpoint_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# Methods that draw their own minibatches.

STOCHASTIC = bilevel.ridge(jax.random.key(3), n_train=32, n_val=40, dim=4, per_feature=True,
                           dtype=jnp.float64)
STOCHASTIC_INNER, STOCHASTIC_OUTER = STOCHASTIC.inner_args, STOCHASTIC.outer_args
SABA_CONFIG = TrainerConfig(outer_steps=8, inner_steps=0, inner_optimizer=optax.identity(),
                            outer_optimizer=optax.sgd(1.0),
                            method=SABA(inner_step_size=0.1, inner_batch_size=16,
                                        outer_batch_size=8))


def run_stochastic(inner_args, outer_args, method):
    return train(STOCHASTIC.inner_loss, STOCHASTIC.outer_loss, STOCHASTIC.params,
                 STOCHASTIC.hparams, dataclasses.replace(SABA_CONFIG, method=method), inner_args,
                 outer_args, progress=False)


def test_a_stochastic_method_takes_the_streams_arrays_and_batch_size():
    """SABA draws its own batches (its SAGA memories are indexed by sample): a Minibatches
    gives it the arrays and the batch size, and the run is the one on the arrays."""
    on_arrays = run_stochastic(STOCHASTIC_INNER, STOCHASTIC_OUTER, SABA_CONFIG.method)
    streams = (Minibatches(STOCHASTIC_INNER, 16), Minibatches(STOCHASTIC_OUTER, 8))
    assert_bit_identical(run_stochastic(*streams, SABA(inner_step_size=0.1)), on_arrays)
    # The same batch size on both is no conflict; a plain tuple keeps the method's.
    assert_bit_identical(run_stochastic(streams[0], STOCHASTIC_OUTER, SABA_CONFIG.method),
                         on_arrays)
    assert all(row["finite"] for row in on_arrays.history)


@pytest.mark.parametrize("inner_args, method, error, message", [
    (lambda: Minibatches(STOCHASTIC_INNER, 16), SOBA(inner_batch_size=8), ValueError,
     r"bilevel\.train: inner_args is Minibatches\(batch_size=16\), but the method SOBA has "
     r"inner_batch_size=8; set the batch size in one place"),
    (lambda: Minibatches(STOCHASTIC_INNER, 16, replace=True), SABA(), ValueError,
     r"bilevel\.train: inner_args is Minibatches\(replace=True\), but SABA draws its own "
     r"minibatches, without replacement"),
    (lambda: host_batches(STOCHASTIC_INNER, 16, 0), SABA(), TypeError,
     r"bilevel\.train: inner_args is an iterator of batches, but SABA draws its own minibatches "
     r"from per-sample arrays; pass bilevel\.Minibatches"),
])
def test_a_stochastic_method_refuses_what_it_cannot_draw_from(inner_args, method, error,
                                                              message):
    with pytest.raises(error, match=message):
        run_stochastic(inner_args(), STOCHASTIC_OUTER, method)


# --------------------------------------------------------------------------------------------
# Errors at the entry name the argument.

X, Y = INNER_ARGS


@pytest.mark.parametrize("make, error, message", [
    (lambda: Minibatches((X, Y), 257), ValueError,
     r"bilevel\.Minibatches: batch_size=257 is larger than the 256 samples of arrays"),
    (lambda: Minibatches((X, Y[:5]), 4), ValueError,
     r"bilevel\.Minibatches: arrays holds arrays with leading axes of sizes \[5, 256\]"),
    (lambda: Minibatches(X, 4), TypeError, r"bilevel\.Minibatches: arrays must be a tuple"),
    (lambda: Minibatches((), 4), ValueError, r"bilevel\.Minibatches: arrays holds no arrays"),
    (lambda: Minibatches((jnp.float64(1.0),), 1), ValueError, r"needs a leading sample axis"),
    (lambda: Minibatches((X, Y), 0), ValueError,
     r"bilevel\.Minibatches: batch_size must be an integer >= 1, got 0"),
    (lambda: Minibatches((X, Y), 4.0), ValueError, r"batch_size must be an integer >= 1"),
    (lambda: Minibatches((X, Y), 4, replace=1), ValueError,
     r"bilevel\.Minibatches: replace must be True or False"),
])
def test_bad_minibatches_are_refused_naming_the_argument(make, error, message):
    with pytest.raises(error, match=message):
        make()


def shapes_change_at_batch_3():
    yield INNER_ARGS
    yield INNER_ARGS
    yield tuple(a[:7] for a in INNER_ARGS)


@pytest.mark.parametrize("inner_args, outer_args, error, message", [
    (X, OUTER_ARGS, TypeError,
     r"bilevel\.train: inner_args must be a tuple of arrays, a bilevel\.Minibatches, an iterator "
     r"of batches or a zero-argument function returning one, got ArrayImpl"),
    (lambda: iter([X]), OUTER_ARGS, TypeError,
     r"bilevel\.train: inner_args yielded a ArrayImpl as batch 1; each batch must be a tuple"),
    (shapes_change_at_batch_3, OUTER_ARGS, ValueError,
     r"bilevel\.train: inner_args yielded batch 3 whose leaf 0 has shape \(7, 10\) and dtype "
     r"float64, but the first batch's has shape \(256, 10\)"),
    (lambda: iter([INNER_ARGS, INNER_ARGS[:1]]), OUTER_ARGS, ValueError,
     r"bilevel\.train: inner_args yielded batch 2 with structure"),
    (lambda: 3, OUTER_ARGS, TypeError,
     r"bilevel\.train: inner_args\(\) must return an iterator \(or iterable\) of batches, got "
     r"int"),
    (lambda: iter([]), OUTER_ARGS, ValueError,
     r"bilevel\.train: inner_args ran out after 0 batches, before the first batch"),
    (Minibatches((X,), 4), OUTER_ARGS, TypeError,
     r"bilevel\.train: inner_loss is called as inner_loss\(params, hparams, \*inner_args\) with "
     r"1 inner_args"),
])
def test_bad_data_are_refused_naming_the_argument(inner_args, outer_args, error, message):
    with pytest.raises(error, match=message):
        run(inner_args, outer_args)


def test_an_iterator_that_runs_out_says_how_many_batches_it_gave():
    short = host_batches(INNER_ARGS, INNER_BATCH, 1)
    with pytest.raises(ValueError, match=r"bilevel\.train: inner_args ran out after 25 batches, "
                                         r"before outer step 3 \(11 per outer step"):
        run(lambda: (batch for _, batch in zip(range(25), short(), strict=False)),
            STREAMS["iterator"]()[1])


def test_the_package_exports_minibatches():
    assert bilevel.Minibatches is Minibatches and "Minibatches" in bilevel.__all__
    assert "streams" in dir(bilevel) and bilevel.streams.Minibatches is Minibatches
    assert os.path.basename(bilevel.streams.__file__) == "streams.py"
