"""``bilevel ssl train`` / ``eval`` from the shell: --out is checked before any work, the
run-folder rule (resume, finished, refused, --overwrite, Ctrl-C), help text and choices."""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import semisup
from bilevel.cli import main
from bilevel.config import flag as config_flag
from semisup import checkpoint, fixmatch, options, protocol, weighting
from semisup import cli as ssl_cli

ROOT = Path(__file__).resolve().parents[1]
# A tiny run (plain FixMatch: the cheapest compile); 2 periods of 2 steps.
TRAIN = ["--method", "fixmatch", "--labels-per-class", "2", "--validation-per-class", "2",
         "--unlabelled", "30", "--steps", "4", "--batch-size", "4", "--mu", "2",
         "--meta-every", "2", "--threshold", "0.2"]


def _error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------------------------
# --out


@pytest.mark.parametrize("command, out, fragment", [
    ("train", "file", "is an existing file"),
    ("train", "file/run", "is a file"),
    ("eval", "file", "is a file"),
    ("eval", "missing", "no folder"),
    ("eval", "empty", "holds no run (no options.json)"),
])
def test_out_is_one_error_line_naming_it(tmp_path, capsys, command, out, fragment):
    (tmp_path / "file").write_text("")
    (tmp_path / "empty").mkdir()
    err = _error_line(capsys, ["ssl", command, "--out", str(tmp_path / out)])
    assert f"bilevel ssl {command}: error: argument --out:" in err and fragment in err


def test_read_only_out_is_refused(tmp_path, capsys, monkeypatch):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    (read_only / "options.json").write_text("{}")
    real_access = os.access
    # As root, chmod does not stop writes; make the folder look read-only to os.access.
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(
        str(read_only)) else real_access(p, mode))
    for argv in (["train", "--out", str(read_only)], ["train", "--out", str(read_only / "x")],
                 ["eval", "--out", str(read_only)]):
        err = _error_line(capsys, ["ssl", *argv])
        assert "argument --out" in err and "writable" in err


def test_out_file_in_a_real_process_no_traceback(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = subprocess.run([sys.executable, "-m", "bilevel", "ssl", "train", "--out",
                             str(blocker)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("bilevel ssl train: error: argument --out:"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# The run-folder rule.


@pytest.mark.slow  # 32 s; semisup's checkpoint resume is checked in test_semisup
def test_ctrl_c_then_rerun_resumes_bit_identical(tmp_path, capsys, monkeypatch):
    out, straight = tmp_path / "run", tmp_path / "straight"
    real = fixmatch.run_periods

    def one_period_then_ctrl_c(config, state, data, num_periods, callback=None):
        real(config, state, data, 1, callback)
        raise KeyboardInterrupt

    monkeypatch.setattr(fixmatch, "run_periods", one_period_then_ctrl_c)
    assert main(["ssl", "train", "--out", str(out), *TRAIN]) == 130
    assert "interrupted at step 2 of 4" in capsys.readouterr().err
    monkeypatch.setattr(fixmatch, "run_periods", real)
    assert main(["ssl", "train", "--out", str(out), *TRAIN]) == 0
    assert f"resuming from step 2 of 4 ({out / 'checkpoint.npz'})" in capsys.readouterr().out
    assert main(["ssl", "train", "--out", str(straight), *TRAIN]) == 0
    with np.load(out / "checkpoint.npz") as a, np.load(straight / "checkpoint.npz") as b:
        assert a.files == b.files
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])


def test_finished_run_untouched_other_options_refused_overwrite_afresh(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["ssl", "train", "--out", str(out), *TRAIN]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["ssl", "train", "--out", str(out), *TRAIN]) == 0
    assert "holds a finished run (step 4 of 4); left untouched" in capsys.readouterr().out
    assert _snapshot(out) == before
    err = _error_line(capsys, ["ssl", "train", "--out", str(out), *TRAIN, "--seed", "3",
                               "--lr", "0.1"])
    assert err.startswith("bilevel ssl train: error: --out ")  # names the subcommand
    assert "--seed 0 there, 3 here" in err and "--lr 0.03 there, 0.1 here" in err
    assert "--overwrite" in err
    assert _snapshot(out) == before
    # --checkpoint-every is not part of the run: still the same, finished run.
    assert main(["ssl", "train", "--out", str(out), *TRAIN, "--checkpoint-every", "7"]) == 0
    assert _snapshot(out) == before
    assert main(["ssl", "train", "--out", str(out), *TRAIN, "--seed", "3", "--overwrite",
                 "--stop-after", "1"]) == 0
    assert "--overwrite: removed options.json, checkpoint.npz" in capsys.readouterr().out
    assert json.loads((out / "options.json").read_text())["seed"] == 3
    with np.load(out / "checkpoint.npz") as stored:
        assert int(stored["leaf_00000"]) == 2  # State.step: a fresh run, one period in


def test_folders_that_are_not_this_run_are_refused(tmp_path, capsys):
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "checkpoint.npz").write_bytes(b"")
    err = _error_line(capsys, ["ssl", "train", "--out", str(orphan), *TRAIN])
    assert "checkpoint.npz but no options.json" in err and "--overwrite" in err
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "options.json").write_text("{not json")
    for command in (["train", *TRAIN], ["eval"]):
        err = _error_line(capsys, ["ssl", command[0], "--out", str(garbled), *command[1:]])
        assert err.startswith(f"bilevel ssl {command[0]}: error: --out: ")
        assert "is not the options.json of bilevel ssl train" in err
        assert ("--overwrite" in err) == (command[0] == "train")


def test_a_checkpoint_that_is_not_one_is_one_error_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["ssl", "train", "--out", str(out), *TRAIN, "--stop-after", "1"]) == 0
    (out / "checkpoint.npz").write_bytes(os.urandom(64))
    for command in (["train", *TRAIN], ["eval"]):
        err = _error_line(capsys, ["ssl", command[0], "--out", str(out), *command[1:]])
        assert "is not a checkpoint written by semisup.checkpoint.save" in err
        assert ("--overwrite" in err) == (command[0] == "train")


def test_checkpoint_load_names_the_file_for_any_bad_file(tmp_path):
    template = {"a": jax.numpy.zeros(3)}
    for name, content in (("text.npz", b"hello"), ("random.npz", os.urandom(256)),
                          ("empty.npz", b"")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match="is not a checkpoint"):
            checkpoint.load(tmp_path / name, template)
    np.savez(tmp_path / "other.npz", leaf_00000=np.zeros(4))
    with pytest.raises(ValueError, match="does not match this configuration"):
        checkpoint.load(tmp_path / "other.npz", template)


# --------------------------------------------------------------------------------------------
# Help and declarations.


def _parsers() -> dict:
    parser = argparse.ArgumentParser(prog="bilevel ssl")
    ssl_cli.add_arguments(parser)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(subparsers.choices)


@pytest.mark.parametrize("command", ["train", "eval"])
def test_every_option_has_help_with_its_default(command):
    sub = _parsers()[command]
    formatter = sub._get_formatter()
    for action in sub._actions:
        if action.dest == "help":
            continue
        text = formatter._expand_help(action)
        assert action.help and ("default" in text or action.required), action.option_strings


def test_help_states_the_run_folder_rule():
    text = _parsers()["train"].format_help()
    for phrase in ("resumes it", "left", "untouched", "--overwrite", "refused"):
        assert phrase in text


def test_choices_are_declared_once():
    """The library's names are the light modules' objects, not copies; --method offers the
    registry's names."""
    for name in ("CURVATURES", "CONF_INPUTS", "META_OPTIMIZERS", "META_DATA"):
        assert getattr(fixmatch, name) is getattr(options, name), name
    assert protocol.DESIGNS is options.DESIGNS
    assert semisup.METHODS is weighting.METHODS and semisup.WEIGHTINGS is weighting.WEIGHTINGS
    method = next(a for a in _parsers()["train"]._actions if a.dest == "method")
    assert tuple(method.choices) == tuple(semisup.WEIGHTINGS) == tuple(semisup.METHODS)
    assert set(semisup.WEIGHTINGS) >= {"supervised", "fixmatch", "oracle", "softmax", "l2rw",
                                       "confnet"}


def test_training_options_are_derived_from_config():
    """Every semisup.Config field that has an option is a train option with the field's rule
    and train's default; the others are not (widths and hidden are set by --model, flip by
    --flip, which takes auto/yes/no); the defaults make the Config of TRAIN_DEFAULTS."""
    train = _parsers()["train"]
    actions = {a.dest: a for a in train._actions}
    for f in dataclasses.fields(semisup.Config):
        option = config_flag(semisup.Config, f.name)
        if option is None:
            assert f.name not in actions or f.name == "flip", f.name
            continue
        assert option in actions[f.name].option_strings
        assert actions[f.name].default == ssl_cli.TRAIN_DEFAULTS.get(f.name, f.default), f.name
    config = ssl_cli._config(ssl_cli.run_options(train.parse_args(["--out", "run"])))
    assert config == semisup.Config(**ssl_cli.TRAIN_DEFAULTS, widths=(), hidden=64, flip=False)


@pytest.mark.parametrize("argv, message", [
    (["--threshold", "1"], "argument --threshold: must be a number in (0, 1), got '1'"),
    (["--lambda-u", "2e3"], "argument --lambda-u: must be a number in [0, 1000], got '2e3'"),
    (["--meta-lr", "11"], "argument --meta-lr: must be a number in (0, 10], got '11'"),
    (["--maxiter", "0"], "argument --maxiter/--solver-iters: must be an integer >= 1, got '0'"),
    (["--solver-iters", "0"],
     "argument --maxiter/--solver-iters: must be an integer >= 1, got '0'"),
    (["--steps", "7"], "semisup.Config: steps (7) must be a multiple of meta_every (5)"),
])
def test_a_bad_training_option_is_one_error_line_saying_its_rule(tmp_path, capsys, argv,
                                                                 message):
    out = tmp_path / "run"
    err = _error_line(capsys, ["ssl", "train", "--out", str(out), *argv])
    assert err.strip() == f"bilevel ssl train: error: {message}"
    assert not out.exists()


def test_maxiter_option_and_its_old_name():
    train = _parsers()["train"]
    for flag in ("--maxiter", "--solver-iters"):
        args = train.parse_args(["--out", "run", flag, "7"])
        assert ssl_cli._config(ssl_cli.run_options(args)).maxiter == 7
        assert "solver_iters" not in ssl_cli.run_options(args)


def test_a_run_whose_options_say_solver_iters_resumes_and_evaluates(tmp_path, capsys):
    """options.json of an earlier version stored --solver-iters as solver_iters."""
    out, straight = tmp_path / "run", tmp_path / "straight"
    assert main(["ssl", "train", "--out", str(out), *TRAIN, "--stop-after", "1"]) == 0
    stored = json.loads((out / "options.json").read_text())
    stored["solver_iters"] = stored.pop("maxiter")
    (out / "options.json").write_text(json.dumps(stored))
    capsys.readouterr()
    assert main(["ssl", "train", "--out", str(out), *TRAIN]) == 0
    assert "resuming from step 2 of 4" in capsys.readouterr().out
    assert main(["ssl", "train", "--out", str(straight), *TRAIN]) == 0
    with np.load(out / "checkpoint.npz") as a, np.load(straight / "checkpoint.npz") as b:
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])
    stored = json.loads((out / "options.json").read_text())  # rewritten by the resumed run
    assert stored["maxiter"] == 10 and "solver_iters" not in stored
    stored["solver_iters"] = stored.pop("maxiter")  # and eval reads an old one
    (out / "options.json").write_text(json.dumps(stored))
    assert main(["ssl", "eval", "--out", str(out)]) == 0


def test_every_usable_registered_solver_is_accepted_by_train():
    """--solver is not a hand list: every solver semisup can use (hvp.SOLVERS but dense and
    lissa, BiCGStab included) parses and builds a Config."""
    assert "bicgstab" in fixmatch.SOLVERS
    for name in fixmatch.SOLVERS:
        args = _parsers()["train"].parse_args(["--out", "run", "--solver", name])
        assert ssl_cli._config(ssl_cli.run_options(args)).solver == name


@pytest.mark.parametrize("name", ["bogus", "dense", "lissa"])
def test_an_unusable_solver_is_one_error_line_before_any_work(tmp_path, capsys, name):
    out = tmp_path / "run"
    err = _error_line(capsys, ["ssl", "train", "--out", str(out), *TRAIN, "--solver", name])
    assert err.startswith(f"bilevel ssl train: error: argument --solver: unknown solver "
                          f"{name!r}; choose from cg, ")
    assert "bicgstab" in err
    assert not out.exists()


def test_declaring_the_options_imports_no_jax():
    code = ("import argparse, sys\n"
            "import semisup.cli\n"
            "p = argparse.ArgumentParser(prog='bilevel ssl')\n"
            "semisup.cli.add_arguments(p)\n"
            "for command in ('train', 'eval'):\n"
            "    try:\n"
            "        p.parse_args([command, '--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print(sorted(m for m in ('jax', 'flax', 'optax', 'scipy', 'semisup.fixmatch',\n"
            "                         'semisup.strategies')\n"
            "             if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["ssl", "train", "--out", str(out), *TRAIN, "--stop-after", "1"]) == 0
    before = _snapshot(out)
    err = _error_line(capsys, ["ssl", "train", "--out", str(out), *TRAIN, "--overwrite",
                               "--dataset", "cifar10", "--data-dir", str(tmp_path / "none")])
    assert "cifar10" in err
    assert _snapshot(out) == before
