"""ES meta-training of velo_lopt: the curriculum and buckets, config errors, and a resumed run
that reproduces an uninterrupted one exactly."""

import jax
import numpy as np
import pytest

from bilevel.lopt import velo_train as vt

CONFIG = vt.VeLOTrainConfig(steps=3, population=2, tasks_per_step=1, horizon_start=4,
                            horizon=8, lstm_width=4, bank_size=2, pool=1,
                            kinds=("quadratic",), seed=3)


def test_curriculum_and_buckets():
    config = vt.VeLOTrainConfig(steps=10, horizon_start=10, horizon=100)
    assert [vt.max_horizon(config, s) for s in (0, 5, 9)] == [10, 100, 100]
    assert [vt.bucket(h) for h in (1, 2, 3, 16, 17, 100)] == [1, 2, 4, 16, 32, 128]
    for step in range(10):
        _, horizon, *_ = vt._task_draw(config, step, 0)
        assert 10 <= horizon <= vt.max_horizon(config, step)


@pytest.mark.slow  # 56 s; the MLP/STAR trainer's resume test shares its checkpoint code
def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    full = vt.velo_train(vt.init_velo_train(CONFIG))
    assert len(full.history) == 3 and all(np.isfinite(r["meta_loss"]) for r in full.history)
    first = vt.velo_train_step(vt.init_velo_train(CONFIG))[0]
    vt.save_checkpoint(tmp_path / vt.CHECKPOINT_NAME, first)
    resumed = vt.velo_train(vt.load_checkpoint(tmp_path / vt.CHECKPOINT_NAME))
    for a, b in zip(jax.tree_util.tree_leaves(full.meta), jax.tree_util.tree_leaves(resumed.meta),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert [r["meta_loss"] for r in full.history] == [r["meta_loss"] for r in resumed.history]
    metadata = vt.final_metadata(full)
    assert metadata["optimizer"] == "velo_lopt" and metadata["outer_steps"] == 3


@pytest.mark.parametrize("field,value,match", [
    ("population", 3, "population must be even"),
    ("horizon", 2, "horizon .* must be >= horizon_start"),
    ("sigma", 0.0, "sigma must be a finite number > 0"),
    ("steps", 0, "steps must be an integer >= 1, got 0"),
    ("kinds", ("cnn",), r"kinds must be a non-empty tuple of names from \('mlp', 'logistic', "
              r"'quadratic'\), got \('cnn',\)"),
])
def test_config_errors(field, value, match):
    with pytest.raises(ValueError, match=match):
        vt.VeLOTrainConfig(**{field: value})


@pytest.mark.slow  # 25 s of compiles; the resume logic is covered by the test above (slow too)
def test_cli_trains_resumes_and_refuses_bad_options(tmp_path, capsys):
    from bilevel.cli import main

    base = ["lopt", "train", "--optimizer", "velo", "--population", "2", "--slots", "1",
            "--horizon-start", "4", "--horizon", "8", "--pool", "1", "--kinds", "quadratic",
            "--seed", "3", "--out", str(tmp_path)]
    assert main(base + ["--steps", "1"]) == 0
    assert (tmp_path / "meta_params.npz").is_file() and (tmp_path / "meta_loss.png").is_file()
    assert main(base + ["--steps", "2", "--resume"]) == 0
    meta, metadata = vt.optimizers.load_meta_params(tmp_path / "meta_params.npz")
    assert metadata["outer_steps"] == 2 and metadata["optimizer"] == "velo_lopt"
    with pytest.raises(SystemExit) as exit_info:
        main(base[:-2] + ["--population", "3", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "population must be even" in capsys.readouterr().err


def test_cli_run_folder_rule_for_velo(tmp_path, capsys):
    """A finished velo run is left untouched; other options and the other trainer's folder are
    refused; all before any ES step (nothing here compiles)."""
    import argparse

    from bilevel.lopt import train

    class OneLine(argparse.ArgumentParser):
        def error(self, message):
            self.exit(2, f"{self.prog}: error: {message}\n")

    parser = OneLine(prog="bilevel lopt train")
    train.add_arguments(parser)
    argv = ["--optimizer", "velo", "--steps", "2", "--population", "2", "--slots", "1",
            "--horizon-start", "4", "--horizon", "8", "--pool", "1", "--kinds", "quadratic",
            "--seed", "3", "--out", str(tmp_path)]
    config = vt.config_from_args(parser.parse_args(argv))
    finished = vt.init_velo_train(config)._replace(step=2)
    vt.save_checkpoint(tmp_path / vt.CHECKPOINT_NAME, finished)
    for name in train.OUTPUTS:
        (tmp_path / name).write_text("")
    def run(arguments):  # as bilevel lopt train dispatches
        parsed = parser.parse_args(arguments)
        return (vt.run if parsed.optimizer == "velo" else train.run)(parsed, parser)

    assert run(argv) == 0
    assert "holds a finished run (step 2 of 2); left untouched" in capsys.readouterr().out
    for extra, fragment in ([["--seed", "4"], "--seed 3 there, 4 here"],
                            [["--population", "4"], "--population 2 there, 4 here"],
                            [["--slots", "2"], "--slots 1 there, 2 here"],
                            [["--optimizer", "mlp", "--unroll", "2"],
                             "--optimizer velo there, mlp here"]):
        with pytest.raises(SystemExit) as exit_info:
            run(argv + extra)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert fragment in err and "--overwrite" in err and len(err.splitlines()) == 1, err
