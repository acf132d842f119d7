"""Meta-training: resume from a checkpoint equals an uninterrupted run, the CLI shell, PES,
configuration errors."""

import argparse
import dataclasses

import jax
import numpy as np
import pytest

from bilevel import lopt
from bilevel.lopt import train

# One quadratic configuration, so that every test reuses one compiled truncation.
TINY = train.MetaTrainConfig(optimizer="star", estimator="mixflow", steps=4, unroll=2,
                             horizon=4, horizon_start=2, slots=1, pool=1, kinds=("quadratic",),
                             weight_decay=0.1, horizon_features=True, seed=3)


def _leaves_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    full = train.meta_train(train.init_meta_train(TINY))
    assert full.step == 4 and len(full.history) == 4
    assert all(np.isfinite(r["meta_loss"]) for r in full.history)

    half = train.meta_train(train.init_meta_train(dataclasses.replace(TINY, steps=2)))
    train.save_checkpoint(tmp_path / "ckpt.pkl", half)
    resumed = train.load_checkpoint(tmp_path / "ckpt.pkl")
    resumed = train.meta_train(resumed._replace(config=TINY))
    _leaves_equal(full.meta, resumed.meta)
    _leaves_equal(full.outer_state, resumed.outer_state)
    assert [r["meta_loss"] for r in full.history] == [r["meta_loss"] for r in resumed.history]
    # Meta-training moved the meta-parameters.
    start = train.init_meta(TINY, train._key(TINY, 0))
    moved = sum(float(np.abs(np.asarray(a) - np.asarray(b)).sum()) for a, b in zip(
        jax.tree_util.tree_leaves(full.meta), jax.tree_util.tree_leaves(start), strict=True))
    assert moved > 0


def _parser():
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    return parser


TINY_ARGS = ["--optimizer", "star", "--steps", "2", "--unroll", "2", "--horizon", "4",
             "--horizon-start", "2", "--slots", "1", "--pool", "1", "--kinds", "quadratic",
             "--horizon-features", "--seed", "3", "--checkpoint-every", "1"]


def test_cli_writes_outputs_and_resumes(tmp_path):
    parser = _parser()
    out = tmp_path / "run"
    assert train.run(parser.parse_args(TINY_ARGS + ["--out", str(out)]), parser) == 0
    for name in ("checkpoint.pkl", "meta_params.npz", "meta_loss.csv", "meta_loss.png",
                 "metadata.json"):
        assert (out / name).is_file(), name
    meta, metadata = lopt.load_meta_params(out / "meta_params.npz")
    assert metadata["outer_steps"] == 2 and metadata["horizon_features"]
    opt = lopt.star_lopt(meta, num_steps=10, **metadata["optimizer_kwargs"])
    assert opt is not None
    more = TINY_ARGS[:]
    more[more.index("--steps") + 1] = "4"
    assert train.run(parser.parse_args(more + ["--out", str(out), "--resume"]), parser) == 0
    state = train.load_checkpoint(out / "checkpoint.pkl")
    full = train.meta_train(train.init_meta_train(TINY))
    _leaves_equal(full.meta, state.meta)


def test_cli_bad_arguments_exit_2(tmp_path, capsys):
    parser = _parser()
    with pytest.raises(SystemExit) as exc:
        train.run(parser.parse_args(TINY_ARGS + ["--out", str(tmp_path), "--resume"]), parser)
    assert exc.value.code == 2
    assert "--resume: no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--steps", "0"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        train.run(parser.parse_args(["--kinds", "cnn", "--out", str(tmp_path)]), parser)
    assert exc.value.code == 2


def test_config_errors():
    with pytest.raises(ValueError, match="MetaTrainConfig: estimator must be one of"):
        train.MetaTrainConfig(estimator="bptt")
    with pytest.raises(ValueError, match="need unroll <= horizon_start <= horizon"):
        train.MetaTrainConfig(unroll=50, horizon_start=20)
    with pytest.raises(ValueError, match="population must be even"):
        train.MetaTrainConfig(population=3)
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
        train.MetaTrainConfig(weight_decay=-0.1)


@pytest.mark.slow
def test_pes_meta_training_runs_and_resets_at_the_horizon():
    config = dataclasses.replace(TINY, estimator="pes", population=4, steps=3)
    state = train.meta_train(train.init_meta_train(config))
    assert all(np.isfinite(r["meta_loss"]) for r in state.history)
    # Horizon 2-4 with unroll 2: the slot has been reset at least once in 3 truncations.
    assert state.slots[0].runs >= 2
