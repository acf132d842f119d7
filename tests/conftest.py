"""Shared fixtures: float64 on for numerical references, a PRNG key, small test problems."""

import os

# The suite is compile-bound (small shapes, many jitted functions): XLA's cheapest CPU backend
# passes cut its time by about a quarter (tests/test_unrolled.py: 82 s -> 61 s on 2 cores).
# Results stay float64-exact to the tolerances the tests state. Set before JAX is imported;
# subprocesses the tests start inherit it.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true").strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def key():
    return jax.random.key(0)


def random_spd(seed: int, n: int, condition: float = 10.0, dtype=jnp.float64) -> jax.Array:
    """A random symmetric positive-definite matrix with the given condition number."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eigenvalues = np.geomspace(1.0, condition, n)
    return jnp.asarray((q * eigenvalues) @ q.T, dtype)


def random_indefinite(seed: int, n: int, dtype=jnp.float64) -> jax.Array:
    """A random symmetric indefinite matrix with eigenvalues in ±[0.5, 5], well away from 0."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    magnitudes = np.geomspace(0.5, 5.0, n)
    signs = np.where(np.arange(n) % 3 == 0, -1.0, 1.0)
    return jnp.asarray((q * (signs * magnitudes)) @ q.T, dtype)


# --------------------------------------------------------------------------------------------
# Trainer results (tests/test_trainer.py, tests/test_streams.py).


def without_wall_time(history):
    """A trainer history without its wall times, the one field two equal runs differ in."""
    return [{k: v for k, v in row.items() if k != "wall_time"} for row in history]


def assert_bit_identical(a, b):
    """Two ``bilevel.TrainResult`` with the same params, hparams and history, bit for bit."""
    for x, y in zip(jax.tree_util.tree_leaves((a.params, a.hparams)),
                    jax.tree_util.tree_leaves((b.params, b.hparams)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # NaN-free histories, so == compares every float exactly.
    assert without_wall_time(a.history) == without_wall_time(b.history)


def norm_metric(params, hparams):
    return {"param_norm": float(jnp.linalg.norm(params))}


# --------------------------------------------------------------------------------------------
# semisup: the small split and configuration its tests share (one compile per method).


@pytest.fixture(scope="module")
def digits_split():
    """A class-mismatch split of digits: 2 labelled and 2 validation images per ID class, 30
    unlabelled images plus as many OOD."""
    import semisup
    from bilevel import datasets

    return semisup.make_split(datasets.load("digits"), labelled_per_class=2,
                              validation_per_class=2, num_unlabelled=30, ood_ratio=1.0, seed=0)


def tiny_ssl_config(method, **kw):
    """The configuration `bilevel ssl train` builds from test_semisup's TRAIN, so that the semisup
    tests share their jits: 4 steps, an MLP, a meta-step every 2 steps."""
    from semisup import fixmatch

    return fixmatch.Config(method=method, steps=4, batch_size=4, mu=2, widths=(), hidden=64,
                           flip=False, meta_every=2, maxiter=3, ema=0.99, meta_lr=3e-3, **kw)
