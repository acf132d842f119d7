"""Meta-training: resume from a checkpoint equals an uninterrupted run, the CLI shell, PES,
configuration errors."""

import argparse
import dataclasses

import jax
import numpy as np
import pytest

import bilevel.checkpoint
from bilevel import lopt
from bilevel.lopt import train

# One quadratic configuration, so that every test reuses one compiled truncation.
TINY = train.MetaTrainConfig(optimizer="star", estimator="mixflow", steps=4, unroll=2,
                             horizon=4, horizon_start=2, slots=1, pool=1, kinds=("quadratic",),
                             weight_decay=0.1, horizon_features=True, seed=3)


def _leaves_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow  # 62 s of compiles; trainer and SSL resume stay in the default run
def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    full = train.meta_train(train.init_meta_train(TINY))
    assert full.step == 4 and len(full.history) == 4
    assert all(np.isfinite(r["meta_loss"]) for r in full.history)

    half = train.meta_train(train.init_meta_train(dataclasses.replace(TINY, steps=2)))
    train.save_checkpoint(tmp_path / "ckpt.npz", half)
    resumed = train.load_checkpoint(tmp_path / "ckpt.npz")
    resumed = train.meta_train(resumed._replace(config=TINY))
    _leaves_equal(full.meta, resumed.meta)
    _leaves_equal(full.outer_state, resumed.outer_state)
    assert [r["meta_loss"] for r in full.history] == [r["meta_loss"] for r in resumed.history]
    # Meta-training moved the meta-parameters.
    start = train.init_meta(TINY, train._key(TINY, 0))
    moved = sum(float(np.abs(np.asarray(a) - np.asarray(b)).sum()) for a, b in zip(
        jax.tree_util.tree_leaves(full.meta), jax.tree_util.tree_leaves(start), strict=True))
    assert moved > 0


@pytest.mark.parametrize("estimator", ["mixflow", "pes"])
def test_checkpoint_rebuilds_every_class_of_the_state(tmp_path, estimator):
    """Slots hold FamilyMembers, LOptStates and (PES) PESStates, the outer state optax's classes:
    all come back as themselves, so the resumed run's pytrees are the ones it was compiled on."""
    config = dataclasses.replace(TINY, estimator=estimator, population=2)
    state = train.init_meta_train(config)
    train.save_checkpoint(tmp_path / "c.npz", state)
    loaded = train.load_checkpoint(tmp_path / "c.npz")
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(state)
    assert loaded.config == config and type(loaded.slots[0].member) is type(state.slots[0].member)
    _leaves_equal(state, loaded)
    assert bilevel.checkpoint.read_metadata(tmp_path / "c.npz") == {
        "writer": "bilevel lopt train", "optimizer": "star", "step": 0}


class _OneLineParser(argparse.ArgumentParser):
    """As ``bilevel``'s own parser: a usage error is one ``prog: error: ...`` line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser():
    parser = _OneLineParser(prog="bilevel lopt train")
    train.add_arguments(parser)
    return parser


TINY_ARGS = ["--optimizer", "star", "--steps", "2", "--unroll", "2", "--horizon", "4",
             "--horizon-start", "2", "--slots", "1", "--pool", "1", "--kinds", "quadratic",
             "--horizon-features", "--seed", "3", "--checkpoint-every", "1"]


def test_cli_writes_outputs_and_resumes(tmp_path):
    parser = _parser()
    out = tmp_path / "run"
    assert train.run(parser.parse_args(TINY_ARGS + ["--out", str(out)]), parser) == 0
    for name in ("checkpoint.npz", "meta_params.npz", "meta_loss.csv", "meta_loss.png",
                 "metadata.json"):
        assert (out / name).is_file(), name
    meta, metadata = lopt.load_meta_params(out / "meta_params.npz")
    assert metadata["outer_steps"] == 2 and metadata["horizon_features"]
    opt = lopt.star_lopt(meta, num_steps=10, **metadata["optimizer_kwargs"])
    assert opt is not None
    more = TINY_ARGS[:]
    more[more.index("--steps") + 1] = "4"
    assert train.run(parser.parse_args(more + ["--out", str(out), "--resume"]), parser) == 0
    state = train.load_checkpoint(out / "checkpoint.npz")
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


# --------------------------------------------------------------------------------------------
# The run-folder rule of `bilevel lopt train` (the same command resumes, a finished run is left
# alone, other options are refused, --overwrite starts afresh).

FULL_ARGS = [a if a != "2" or i != TINY_ARGS.index("--steps") + 1 else "4"
             for i, a in enumerate(TINY_ARGS)]


def _run_cli(argv):
    from bilevel.lopt import velo_train  # bilevel lopt train dispatches velo there

    parser = _parser()
    args = parser.parse_args(argv)
    return (velo_train.run if args.optimizer == "velo" else train.run)(args, parser)


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        _run_cli(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def _snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_rerun_after_ctrl_c_resumes_and_ends_as_an_uninterrupted_run(tmp_path, monkeypatch,
                                                                      capsys):
    out = tmp_path / "run"
    argv = FULL_ARGS + ["--checkpoint-every", "10", "--out", str(out)]
    real_step = train.meta_train_step

    def interrupted_step(state):
        if state.step == 3:
            raise KeyboardInterrupt
        return real_step(state)

    monkeypatch.setattr(train, "meta_train_step", interrupted_step)
    assert _run_cli(argv) == 130
    assert "interrupted at step 3 of 4" in capsys.readouterr().err
    assert train.load_checkpoint(out / "checkpoint.npz").step == 3  # saved on Ctrl-C
    monkeypatch.setattr(train, "meta_train_step", real_step)
    assert _run_cli(argv) == 0
    assert f"resuming from step 3 of 4 ({out / 'checkpoint.npz'})" in capsys.readouterr().out
    resumed = train.load_checkpoint(out / "checkpoint.npz")
    full = train.meta_train(train.init_meta_train(TINY))
    _leaves_equal(full.meta, resumed.meta)
    _leaves_equal(full.outer_state, resumed.outer_state)
    assert [r["meta_loss"] for r in full.history] == [r["meta_loss"] for r in resumed.history]


def test_finished_run_is_left_untouched_and_other_options_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run_cli(TINY_ARGS + ["--out", str(out)]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert _run_cli(TINY_ARGS + ["--out", str(out)]) == 0
    assert "holds a finished run (step 2 of 2); left untouched" in capsys.readouterr().out
    assert _snapshot(out) == before
    err = _usage_error(capsys, TINY_ARGS + ["--seed", "4", "--learning-rate", "0.01",
                                            "--out", str(out)])
    assert "--seed 3 there, 4 here" in err and "--learning-rate 0.003 there, 0.01 here" in err
    assert "--overwrite" in err
    err = _usage_error(capsys, TINY_ARGS + ["--steps", "1", "--out", str(out)])
    assert "--steps 2 there (at step 2), 1 here" in err
    err = _usage_error(capsys, TINY_ARGS + ["--optimizer", "velo", "--out", str(out)])
    assert "--optimizer star there, velo here" in err
    assert _snapshot(out) == before
    # --overwrite starts afresh (here: a one-step run in place of the two-step one).
    assert _run_cli(TINY_ARGS + ["--steps", "1", "--overwrite", "--out", str(out)]) == 0
    assert "--overwrite: removed checkpoint.npz" in capsys.readouterr().out
    assert train.load_checkpoint(out / "checkpoint.npz").step == 1
    assert lopt.load_meta_params(out / "meta_params.npz")[1]["outer_steps"] == 1


def test_folders_that_are_not_this_run_are_refused(tmp_path, capsys):
    outputs_only = tmp_path / "outputs"
    outputs_only.mkdir()
    (outputs_only / "meta_params.npz").write_bytes(b"")
    err = _usage_error(capsys, TINY_ARGS + ["--out", str(outputs_only)])
    assert "meta_params.npz" in err and "no checkpoint" in err and "--overwrite" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "checkpoint.npz").write_text("not a checkpoint")
    err = _usage_error(capsys, TINY_ARGS + ["--out", str(broken)])
    assert "is not a meta-training checkpoint (it is not an .npz file" in err
    assert "--overwrite" in err
    err = _usage_error(capsys, TINY_ARGS + ["--resume", "--overwrite", "--out", str(broken)])
    assert "--resume and --overwrite contradict" in err
    assert (broken / "checkpoint.npz").read_text() == "not a checkpoint"
    # Another program's checkpoint (bilevel.train's format, another writer) is not a run either.
    other = tmp_path / "other"
    bilevel.checkpoint.save(other / "checkpoint.npz", {"a": np.zeros(2)}, {"writer": "else"})
    err = _usage_error(capsys, TINY_ARGS + ["--out", str(other)])
    assert "is not a meta-training checkpoint (it was written by 'else')" in err


@pytest.mark.parametrize("name", train.PICKLED_CHECKPOINT_NAMES)
def test_a_pickled_checkpoint_of_bilevel_0_1_is_refused_never_unpickled(tmp_path, capsys,
                                                                        monkeypatch, name):
    import pickle

    out = tmp_path / "old"
    out.mkdir()
    (out / name).write_bytes(pickle.dumps({"step": 1}))
    monkeypatch.setattr(pickle, "load", None)  # unpickling would fail loudly
    monkeypatch.setattr(pickle, "loads", None)
    for extra in ([], ["--resume"], ["--optimizer", "velo", "--population", "2"]):
        err = _usage_error(capsys, TINY_ARGS + extra + ["--out", str(out)])
        assert err == (f"bilevel lopt train: error: --out: {out / name} was written by an older "
                       f"bilevel (pickle); rerun with --overwrite, or use bilevel<=0.1.0 to "
                       f"finish it\n"), err
    # --overwrite removes it with the rest of the run and starts afresh.
    assert _run_cli(TINY_ARGS + ["--steps", "1", "--overwrite", "--out", str(out)]) == 0
    assert f"--overwrite: removed {name}" in capsys.readouterr().out
    assert not (out / name).exists() and train.load_checkpoint(out / "checkpoint.npz").step == 1


@pytest.mark.parametrize("make_out, fragment", [
    (lambda tmp: tmp / "file", "is an existing file"),
    (lambda tmp: tmp / "file" / "run", "is a file"),
])
def test_out_is_checked_before_any_work(tmp_path, capsys, monkeypatch, make_out, fragment):
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(train, "init_meta_train", None)  # any work would fail loudly
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(TINY_ARGS + ["--out", str(make_out(tmp_path))])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --out" in err and fragment in err


def test_out_in_a_read_only_folder_is_refused(tmp_path, capsys, monkeypatch):
    import os
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access
    # As root, chmod does not stop writes; make the folder look read-only to os.access.
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(
        str(read_only)) else real_access(p, mode))
    for out in (read_only, read_only / "run"):
        with pytest.raises(SystemExit) as exc:
            _parser().parse_args(TINY_ARGS + ["--out", str(out)])
        assert exc.value.code == 2
        assert "argument --out" in capsys.readouterr().err


def test_a_task_pool_without_its_data_is_one_error_line(tmp_path, capsys, monkeypatch):
    import sys
    # Both: a submodule already imported by an earlier test would be found first.
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # as after a plain `pip install -e .`
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    argv = TINY_ARGS + ["--kinds", "logistic", "--pool", "2", "--out", str(tmp_path / "r")]
    err = _usage_error(capsys, argv)
    assert "needs mlxtend" in err and "--kinds" in err
    assert not (tmp_path / "r").exists()


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(tmp_path, capsys,
                                                                    monkeypatch):
    import sys
    out = tmp_path / "run"
    assert _run_cli(TINY_ARGS + ["--out", str(out)]) == 0
    before = _snapshot(out)
    # Both: a submodule already imported by an earlier test would be found first.
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    err = _usage_error(capsys, TINY_ARGS + ["--kinds", "logistic", "--pool", "2", "--overwrite",
                                            "--out", str(out)])
    assert "needs mlxtend" in err
    assert _snapshot(out) == before
