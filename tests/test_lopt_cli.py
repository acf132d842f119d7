"""``bilevel lopt eval`` end to end (a subprocess on a tiny run) and its usage errors."""

import csv
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from bilevel import cli, lopt
from bilevel.lopt import evaluate

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bilevel", "lopt", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lopt_eval")
    meta = folder / "star.npz"
    lopt.save_meta_params(meta, lopt.init_star_lopt(jax.random.key(0)), {})
    out = folder / "out"
    # mlp_lopt (when shipped) runs with the default, shipped meta-parameters
    learned = "mlp_lopt,star_lopt" if "mlp_lopt" in lopt.available_pretrained() else "star_lopt"
    result = _run("eval", "--tasks", "quadratic", "--optimizers", f"{learned},adam,sgdm",
                  "--meta-params", f"star_lopt={meta}", "--steps", "20", "--evals", "4",
                  "--seeds", "2", "--lrs", "0.01,0.1,1", "--out", str(out))
    return result, out


def test_end_to_end_files_and_columns(eval_run):
    result, out = eval_run
    assert result.returncode == 0, result.stderr
    with (out / "eval.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == evaluate.CSV_COLUMNS
    names = [r["optimizer"] for r in rows]
    assert names[-3:] == ["star_lopt", "adam", "sgdm"]
    assert names[:-3] == (["mlp_lopt"] if "mlp_lopt" in lopt.available_pretrained() else [])
    assert all(r["task"] == "quadratic" and r["steps"] == "20" and r["seeds"] == "2"
               for r in rows)
    star, adam = rows[-3], rows[-2]
    assert star["learning_rate"] == "" and float(adam["learning_rate"]) in (0.01, 0.1, 1.0)
    assert star["speedup"] != "" and adam["speedup"] == ""  # vs tuned Adam
    assert all(r["diverged_seeds"] == "0" for r in rows)
    assert min(float(r["vs_best"]) for r in rows) == pytest.approx(1.0)
    assert (out / "eval.md").is_file() and (out / "profile.png").stat().st_size > 0
    assert "speed-up vs tuned Adam" in result.stdout


@pytest.mark.parametrize("argv, fragment", [
    (["eval", "--optimizers", "lion"], "unknown optimizer 'lion'"),
    (["eval", "--tasks", "nope"], "unknown task 'nope'"),
    (["eval", "--lrs", "0.1,-1"], "learning rates must be finite and > 0"),
    (["eval", "--seeds", "0"], "must be >= 1"),
    (["eval", "--tasks", "mlp_mnist"], "pass --data-dir"),
    (["eval", "--optimizers", "adam", "--meta-params", "x.npz", "--tasks", "quadratic"],
     "bare PATH needs exactly one learned optimizer"),
    (["eval", "--optimizers", "star_lopt", "--meta-params", "/nonexistent.npz",
      "--tasks", "quadratic"], "no file"),
    (["eval", "--meta-params", "sgd=x.npz"], "unknown learned optimizer 'sgd'"),
])
def test_bad_arguments_one_line_exit_2(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["lopt", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1, err


def test_usage_error_in_a_real_process():
    result = _run("eval", "--steps", "many")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("bilevel lopt eval: error:")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_group_without_subcommand_prints_help(capsys):
    assert cli.main(["lopt"]) == 2
    assert "eval" in capsys.readouterr().err


def test_eval_interval():
    assert evaluate.eval_interval(500, 20) == 25
    assert evaluate.eval_interval(7, 3) == 7
    assert evaluate.eval_interval(20, 50) == 1
