"""The bilevel training loop: it trains, it clips, it warm-starts, it skips non-finite steps, it
compiles once, and a killed and resumed run ends bit-identical to an uninterrupted one.

Float64 (tests/conftest.py). The problem is ridge regression with a log-L2 hyperparameter,
written here so that the trainer is tested on its own. Configurations are module-level objects:
runs whose losses and step-relevant config are the same objects share one compiled step, which
keeps the file's run time to a few compiles.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_bit_identical, norm_metric

import bilevel
import bilevel.checkpoint
import hvp
from bilevel.trainer import (
    CHECKPOINT_NAME,
    ESMethod,
    ImplicitMethod,
    TrainerConfig,
    UnrolledMethod,
    train,
    train_problem,
)


def ridge_inner(params, log_l2, x, y):
    """½ mean (Xθ − y)² + ½ e^λ ||θ||²."""
    return 0.5 * jnp.mean((x @ params - y) ** 2) + 0.5 * jnp.exp(log_l2) * jnp.sum(params**2)


def ridge_outer(params, log_l2, x, y):
    del log_l2
    return jnp.mean((x @ params - y) ** 2)


def ridge_data(seed=0, n=40, dim=8, noise=1.0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(dim)
    x, x_val = rng.standard_normal((n, dim)), rng.standard_normal((n, dim))
    y, y_val = x @ w + noise * rng.standard_normal(n), x_val @ w + noise * rng.standard_normal(n)
    return tuple(jnp.asarray(a) for a in (x, y)), tuple(jnp.asarray(a) for a in (x_val, y_val))


INNER_ARGS, OUTER_ARGS = ridge_data()
PARAMS0 = jnp.zeros(8)
HPARAMS0 = jnp.asarray(1.0)  # strong regularisation: the validation loss wants less

SGD = optax.sgd(0.2)
ADAM_IN, ADAM_OUT = optax.adam(0.05), optax.adam(0.2)
CG_TOL = ImplicitMethod(hvp.CG(maxiter=100, tol=1e-8))
CG_WARM = ImplicitMethod(hvp.CG(maxiter=100, tol=1e-8), warm_start=True)

IMPLICIT = TrainerConfig(outer_steps=15, inner_steps=20, inner_optimizer=SGD,
                         outer_optimizer=ADAM_OUT, method=ImplicitMethod(hvp.CG(maxiter=20)))
UNROLLED = dataclasses.replace(IMPLICIT, inner_steps=10, method=UnrolledMethod(steps=10))
RESUMABLE = TrainerConfig(outer_steps=6, inner_steps=3, inner_optimizer=ADAM_IN,
                          outer_optimizer=ADAM_OUT, method=CG_WARM, checkpoint_every=2)
RESUMABLE_ES = dataclasses.replace(RESUMABLE, method=ESMethod(population=4, sigma=0.01, steps=3))


def run(config, checkpoint_dir=None, **kwargs):
    return train(ridge_inner, ridge_outer, PARAMS0, HPARAMS0, config, INNER_ARGS, OUTER_ARGS,
                 checkpoint_dir=checkpoint_dir, progress=False, **kwargs)


# --------------------------------------------------------------------------------------------
# It trains.


@pytest.mark.parametrize("config", [IMPLICIT, UNROLLED], ids=["implicit_cg", "unrolled"])
def test_outer_loss_decreases_on_ridge(config):
    result = run(config)
    losses = result.series("outer_loss")
    assert len(result.history) == config.outer_steps
    assert losses[-1] < 0.9 * losses[0], losses
    assert float(result.hparams) < float(HPARAMS0)  # less regularisation, as the data want
    assert result.skipped_steps == 0
    assert all(row["finite"] and not row["skipped"] for row in result.history)
    assert np.all(result.series("wall_time") > 0)
    if isinstance(config.method, ImplicitMethod):
        assert {"residual_norm", "iterations", "hvp_count", "converged"} <= set(result.history[0])
    else:
        assert "residual_norm" not in result.history[0]


def test_train_problem_takes_any_problem_like_object():
    problem = types.SimpleNamespace(inner_loss=ridge_inner, outer_loss=ridge_outer,
                                    params=PARAMS0, hparams=HPARAMS0, inner_args=INNER_ARGS,
                                    outer_args=OUTER_ARGS)
    a = train_problem(problem, IMPLICIT, progress=True, metrics=norm_metric)  # not a TTY here
    b = run(IMPLICIT, metrics=norm_metric)
    assert_bit_identical(a, b)
    assert "param_norm" in a.history[-1]
    with pytest.raises(TypeError, match="lacks \\['outer_args'\\]"):
        train_problem(types.SimpleNamespace(**{k: v for k, v in vars(problem).items()
                                               if k != "outer_args"}), IMPLICIT)


def test_es_follows_the_unrolled_trajectory():
    # ESMethod estimates the gradient of the meta-loss UnrolledMethod differentiates, and
    # advances θ the same
    # way, so the first outer loss (before any λ update) is the same number.
    es = run(dataclasses.replace(RESUMABLE_ES, checkpoint_every=None))
    unrolled = run(dataclasses.replace(RESUMABLE_ES, method=UnrolledMethod(steps=3)))
    assert {"es_loss", "es_loss_std"} <= set(es.history[0])
    assert all(row["finite"] for row in es.history)
    np.testing.assert_allclose(es.history[0]["outer_loss"], unrolled.history[0]["outer_loss"],
                               rtol=1e-12)
    assert es.series("outer_loss")[-1] < es.series("outer_loss")[0]


# --------------------------------------------------------------------------------------------
# Remedies: clipping, warm starts, skipping non-finite steps.


def test_hypergradient_clipping_bounds_the_step():
    clip = 1e-3
    config = dataclasses.replace(IMPLICIT, outer_steps=5, outer_optimizer=optax.sgd(1.0),
                                 hypergrad_clip=clip)
    hparams = [float(HPARAMS0)]
    result = run(config, metrics=lambda p, h: {"hparam": float(h)})
    hparams += list(result.series("hparam"))
    steps = np.abs(np.diff(hparams))
    assert np.all(result.series("hypergrad_norm") > clip)  # the clip was active ...
    assert all(result.series("clipped"))
    np.testing.assert_allclose(steps, clip, rtol=1e-12)  # ... and SGD(1) moved by exactly it


def test_warm_start_reduces_cg_iterations():
    # Start at the inner solution and take small outer steps, so that consecutive solves are
    # close: the previous inverse HVP then starts CG near the answer.
    dim, n, log_l2 = 20, 40, 0.0
    (x, y), outer_args = ridge_data(seed=2, n=n, dim=dim)
    params0 = jnp.linalg.solve(x.T @ x / n + np.exp(log_l2) * jnp.eye(dim), x.T @ y / n)
    base = dataclasses.replace(IMPLICIT, outer_steps=8, inner_steps=20,
                               outer_optimizer=optax.sgd(0.002), inner_optimizer=optax.sgd(0.3))
    cold, warm = (train(ridge_inner, ridge_outer, params0, jnp.asarray(log_l2),
                        dataclasses.replace(base, method=method), (x, y), outer_args,
                        progress=False) for method in (CG_TOL, CG_WARM))
    cold_iterations = cold.series("iterations")[1:].sum()  # step 1 starts from 0 in both
    warm_iterations = warm.series("iterations")[1:].sum()
    assert warm.series("converged").all() and cold.series("converged").all()
    assert warm_iterations < 0.85 * cold_iterations, (warm_iterations, cold_iterations)
    assert warm.series("hvp_count")[1:].sum() < cold.series("hvp_count")[1:].sum()
    # Both solve to tol = 1e-8, so the trajectories agree closely.
    np.testing.assert_allclose(warm.hparams, cold.hparams, rtol=1e-8)


def nan_gradient_outer(params, log_l2, x, y, threshold=2.5):
    """Pushes λ up; its gradient is NaN (0 · ∞) once λ > threshold, while the value stays finite."""
    kink = 0.0 * jnp.sqrt(jnp.maximum(threshold - log_l2, 0.0))
    return ridge_outer(params, log_l2, x, y) - 10.0 * log_l2 + kink


def test_non_finite_hypergradient_is_skipped_and_recorded():
    config = dataclasses.replace(IMPLICIT, outer_steps=8, outer_optimizer=optax.sgd(0.1))
    with pytest.warns(RuntimeWarning, match="skipped"):
        result = train(ridge_inner, nan_gradient_outer, PARAMS0, 0.0, config, INNER_ARGS,
                       OUTER_ARGS, progress=False, metrics=lambda p, h: {"hparam": float(h)})
    skipped = result.series("skipped")
    first = int(np.argmax(skipped))
    assert 0 < first < config.outer_steps and skipped[first:].all() and not skipped[:first].any()
    assert result.skipped_steps == config.outer_steps - first
    assert not result.series("finite")[first:].any()
    assert np.isnan(result.series("hypergrad_norm")[first:]).all()
    # λ stopped where it was when the gradient broke, and nothing non-finite leaked in.
    hparams = result.series("hparam")
    assert float(result.hparams) == hparams[first - 1] == hparams[-1] > 2.5
    assert np.all(np.isfinite(result.params))


# --------------------------------------------------------------------------------------------
# Compilation.


def compiles_of_outer_step(caplog):
    return sum("_outer_step" in record.getMessage() and "Compiling" in record.getMessage()
               for record in caplog.records)


def test_one_compile_for_all_outer_steps_and_for_new_data(caplog):
    config = dataclasses.replace(IMPLICIT, outer_steps=4, outer_optimizer=optax.adam(0.1))
    other_inner, other_outer = ridge_data(seed=1)
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        first = run(config)
        second = train(ridge_inner, ridge_outer, PARAMS0, HPARAMS0, config, other_inner,
                       other_outer, progress=False)
    # Data are arguments, not constants: new data of the same shapes reuse the compiled step.
    assert compiles_of_outer_step(caplog) == 1
    assert first.compile_time > 0
    assert float(first.hparams) != float(second.hparams)


# --------------------------------------------------------------------------------------------
# Checkpoints.


@pytest.mark.parametrize("config", [RESUMABLE, RESUMABLE_ES], ids=["implicit_warm", "es"])
def test_killed_and_resumed_run_is_bit_identical(tmp_path, config):
    whole = run(config, tmp_path / "whole", metrics=norm_metric)
    assert sorted(os.listdir(tmp_path / "whole")) == [CHECKPOINT_NAME]  # no temp files left

    # Stopped after 3 of 6 steps (checkpoints at 2 and at the end, 3), then restarted.
    run(dataclasses.replace(config, outer_steps=3), tmp_path / "halves", metrics=norm_metric)
    resumed = run(config, tmp_path / "halves", metrics=norm_metric)
    assert resumed.resumed_from == 3
    assert_bit_identical(whole, resumed)

    # Killed by an exception in step 5, after the checkpoint of step 4.
    def dies_at_step_5(params, hparams, calls=[]):  # noqa: B006 (a call counter)
        calls.append(None)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")
        return norm_metric(params, hparams)

    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path / "killed", metrics=dies_at_step_5)
    assert sorted(os.listdir(tmp_path / "killed")) == [CHECKPOINT_NAME]
    restarted = run(config, tmp_path / "killed", metrics=norm_metric)
    assert restarted.resumed_from == 4
    assert_bit_identical(whole, restarted)

    # A finished run restarts as a no-op; one asked for fewer steps than it ran refuses.
    again = run(config, tmp_path / "whole", metrics=norm_metric)
    assert again.resumed_from == config.outer_steps and again.compile_time == 0.0
    assert_bit_identical(whole, again)
    with pytest.raises(ValueError, match="past outer_steps=2"):
        run(dataclasses.replace(config, outer_steps=2), tmp_path / "whole")


def test_failed_checkpoint_write_leaves_old_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    config = dataclasses.replace(RESUMABLE, outer_steps=2)
    run(config, tmp_path)
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()

    def savez_dies_halfway(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", savez_dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        run(dataclasses.replace(config, outer_steps=4), tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CHECKPOINT_NAME]
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before


def test_mismatched_checkpoint_is_refused(tmp_path):
    run(dataclasses.replace(RESUMABLE, outer_steps=2), tmp_path)
    with pytest.raises(ValueError, match=r"does not match.*\.params.*float64\(8,\).*\(9,\)"):
        train(ridge_inner, ridge_outer, jnp.zeros(9), HPARAMS0, RESUMABLE,
              ridge_data(dim=9)[0], ridge_data(dim=9)[1], checkpoint_dir=tmp_path,
              progress=False)
    with pytest.raises(ValueError,
                       match="written by method ImplicitMethod, this run uses UnrolledMethod"):
        run(dataclasses.replace(RESUMABLE, method=UnrolledMethod(steps=2)), tmp_path)
    with pytest.raises(ValueError, match="does not match.*method_state"):
        run(dataclasses.replace(RESUMABLE, method=CG_TOL), tmp_path)  # no warm-start vector


def test_checkpoint_of_bilevel_0_1_still_resumes_bit_identical(tmp_path):
    """0.1.0 wrote the state's leaves with a JSON description (format 1, no pickle)."""
    whole = run(RESUMABLE, tmp_path / "whole")
    run(dataclasses.replace(RESUMABLE, outer_steps=3), tmp_path / "half")
    state, metadata = bilevel.checkpoint.load(tmp_path / "half" / CHECKPOINT_NAME)
    leaves = jax.tree_util.tree_leaves(state)
    host = [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                       else x) for x in leaves]
    meta = {"format": 1, "method": "ImplicitMethod", "paths": [], "shapes": [], "dtypes": []}
    np.savez(tmp_path / "half" / CHECKPOINT_NAME, meta=np.array(json.dumps(meta)),
             history=np.array(json.dumps(metadata["history"])),
             **{f"leaf_{i:05d}": array for i, array in enumerate(host)})
    resumed = run(RESUMABLE, tmp_path / "half")
    assert resumed.resumed_from == 3
    assert_bit_identical(whole, resumed)
    assert "format" not in bilevel.checkpoint.read_metadata(tmp_path / "half" / CHECKPOINT_NAME)
    with pytest.raises(ValueError, match="written by method ImplicitMethod, this run uses "
                                         "ESMethod"):
        np.savez(tmp_path / "half" / CHECKPOINT_NAME, meta=np.array(json.dumps(meta)),
                 history=np.array("[]"),
                 **{f"leaf_{i:05d}": array for i, array in enumerate(host)})
        run(dataclasses.replace(RESUMABLE, method=ESMethod(population=4, sigma=0.01, steps=3)),
            tmp_path / "half")


@pytest.mark.parametrize("content, reason", [
    (b"not a checkpoint", "it is not an .npz file"),
    (b"\x80\x04K\x01.", "it is a Python pickle, which bilevel never loads"),
])
def test_a_file_that_is_not_a_checkpoint_is_refused_saying_why(tmp_path, content, reason):
    (tmp_path / CHECKPOINT_NAME).write_bytes(content)
    with pytest.raises(ValueError) as info:
        run(RESUMABLE, tmp_path)
    message = str(info.value)
    assert message.startswith(f"bilevel.train: {tmp_path / CHECKPOINT_NAME} is not a checkpoint "
                              f"of bilevel.train ({reason}")
    assert "delete it to start afresh" in message
    bilevel.checkpoint.save(tmp_path / CHECKPOINT_NAME, {"a": np.zeros(1)}, {"writer": "semisup"})
    with pytest.raises(ValueError, match=r"not a checkpoint of bilevel.train \(it was written by "
                                         r"'semisup'\)"):
        run(RESUMABLE, tmp_path)


# --------------------------------------------------------------------------------------------
# Configuration errors name the field.


BAD = [
    (lambda: dataclasses.replace(IMPLICIT, outer_steps=0), "outer_steps"),
    (lambda: dataclasses.replace(IMPLICIT, inner_steps=-1), "inner_steps"),
    (lambda: dataclasses.replace(IMPLICIT, inner_steps=2.5), "inner_steps"),
    (lambda: dataclasses.replace(IMPLICIT, inner_optimizer="sgd"), "inner_optimizer"),
    (lambda: dataclasses.replace(IMPLICIT, outer_optimizer=optax.sgd), "outer_optimizer"),
    (lambda: dataclasses.replace(IMPLICIT, method=hvp.CG()), "method"),
    (lambda: dataclasses.replace(IMPLICIT, hypergrad_clip=0.0), "hypergrad_clip"),
    (lambda: dataclasses.replace(IMPLICIT, hypergrad_clip=float("inf")), "hypergrad_clip"),
    (lambda: dataclasses.replace(IMPLICIT, checkpoint_every=0), "checkpoint_every"),
    (lambda: dataclasses.replace(IMPLICIT, seed=-1), "seed"),
    (lambda: ImplicitMethod(solver="cg"), "solver"),
    (lambda: ImplicitMethod(mode="forward"), "mode"),
    (lambda: ImplicitMethod(damping=-1.0), "damping"),
    (lambda: ImplicitMethod(warm_start=1), "warm_start"),
    (lambda: ImplicitMethod(hvp.Nystrom(rank=4), warm_start=True), "warm_start"),
    (lambda: ImplicitMethod(curvature=lambda *a: None, damping=0.1), "damping"),
    (lambda: UnrolledMethod(steps=0), "steps"),
    (lambda: UnrolledMethod(steps=5, mode="forward"), "mode"),
    (lambda: UnrolledMethod(steps=5, truncate=6), "truncate"),
    (lambda: UnrolledMethod(steps=5, checkpoint_every=0), "checkpoint_every"),
    (lambda: ESMethod(population=3, steps=5), "population"),
    (lambda: ESMethod(sigma=0.0, steps=5), "sigma"),
    (lambda: ESMethod(steps=0), "steps"),
]


@pytest.mark.parametrize(("make", "field"), BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_bad_configuration_names_the_field(make, field):
    with pytest.raises((ValueError, TypeError), match=rf"\b{field}\b"):
        make()


def test_es_requires_steps():
    with pytest.raises(TypeError, match="steps"):
        ESMethod()


def test_warm_start_drops_vectors_from_failed_solves():
    # An indefinite inner Hessian: CG meets negative curvature at every outer step. Reusing its
    # vector as the next start made the vector grow without bound; it is now dropped.
    diagonal = jnp.array([1.0, 0.5, 0.2, -0.01])

    def inner(theta, lam):
        return 0.5 * jnp.sum(diagonal * theta**2) - jnp.sum(lam * theta)

    def outer(theta, lam):
        return 0.5 * jnp.sum(theta**2)

    config = TrainerConfig(outer_steps=8, inner_steps=0, inner_optimizer=optax.sgd(0.0),
                           outer_optimizer=optax.sgd(0.0),
                           method=ImplicitMethod(solver=hvp.CG(maxiter=10, tol=1e-10),
                                                 warm_start=True))
    result = train(inner, outer, jnp.ones(4), jnp.ones(4), config, progress=False)
    statuses = {int(row["status"]) for row in result.history}
    assert statuses == {int(hvp.Status.NEGATIVE_CURVATURE)}
    norms = result.series("hypergrad_norm")
    np.testing.assert_allclose(norms, norms[0], rtol=1e-6)  # every solve starts afresh


# --------------------------------------------------------------------------------------------
# The public method protocol: a method written without private names.


def test_a_user_method_written_against_the_public_protocol_trains():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class OneStepMethod(bilevel.AbstractMethod):
        """The one-step (T1-T2) approximation: H⁻¹ ≈ lr · I, as a user would write it."""

        lr: float = 0.5

        def hypergrad(self, problem, params, hparams, state, key):
            grad, info = bilevel.hypergrad(problem.inner_loss, problem.outer_loss, params,
                                           hparams, problem.inner_args, problem.outer_args,
                                           solver=hvp.Identity(scale=self.lr, tol=None),
                                           on_failure="ignore", stationarity_tol=None)
            return grad, params, state, {"outer_loss": info.outer_loss, "finite": info.finite}

    problem = bilevel.ridge(jax.random.key(0), dtype=jnp.float64)
    params = problem.solve_inner(problem.params, problem.hparams, *problem.inner_args)
    config = bilevel.TrainerConfig(outer_steps=5, inner_steps=5, inner_optimizer=optax.sgd(0.1),
                                   outer_optimizer=optax.sgd(0.1), method=OneStepMethod())
    result = bilevel.train(problem.inner_loss, problem.outer_loss, params, problem.hparams,
                           config, problem.inner_args, problem.outer_args, progress=False)
    losses = [row["outer_loss"] for row in result.history]
    assert len(losses) == 5 and all(np.isfinite(losses))
    assert losses[-1] < losses[0]
