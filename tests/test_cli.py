"""The ``bilevel`` command line: one real end-to-end run, usage errors, help.

The end-to-end run is a subprocess (``python -m bilevel``) on the ridge problem, whose 10
parameters keep every compile small; usage errors and help run ``main`` in-process, which is
faster, plus one subprocess to check what a user really sees on stderr.
"""

import csv
import dataclasses
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from bilevel import cli

ROOT = Path(__file__).resolve().parents[1]
EXPECTED_COLUMNS = ["solver", "budget", "setting", "hvp_count", "cosine", "rel_error",
                    "rel_residual", "status", "stable", "time_ms", "time_ratio", "compile_s",
                    "memory_bytes", "dtype"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bilevel", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def ridge_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare-hvp")
    result = _run("compare-hvp", "--problem", "ridge", "--solvers", "cg,identity,neumann,lissa",
                  "--budgets", "1,3,6", "--repeats", "1", "--out", str(out))
    return result, out


def test_end_to_end_exit_status_and_files(ridge_run):
    result, out = ridge_run
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "compare-hvp on ridge" in result.stdout  # the table was printed
    for name in ("results.csv", "results.json", "results.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_end_to_end_csv_rows(ridge_run):
    _, out = ridge_run
    with open(out / "results.csv", newline="") as file:
        reader = csv.DictReader(file)
        assert reader.fieldnames == EXPECTED_COLUMNS
        rows = list(reader)
    # cg, neumann and lissa at each of 3 budgets; identity is budget-independent: one row.
    assert [(r["solver"], r["budget"]) for r in rows] == [
        ("cg", "1"), ("cg", "3"), ("cg", "6"), ("neumann", "1"), ("neumann", "3"),
        ("neumann", "6"), ("lissa", "1"), ("lissa", "3"), ("lissa", "6"), ("identity", "")]
    # LiSSA samples minibatches of 32 of ridge's 50 examples along problem.batch_argnums.
    assert {r["setting"] for r in rows if r["solver"] == "lissa"} == {
        f"depth={b} batch=32" for b in (1, 3, 6)}
    cg = {int(r["budget"]): r for r in rows if r["solver"] == "cg"}
    # 5 CG iterations solve the 10-dim ridge system almost exactly (the damping floor is 1e-4);
    # the scalar hypergradient's error need not fall at every budget, its residual does here.
    assert float(cg[6]["rel_error"]) < 1e-2 < float(cg[1]["rel_error"])
    assert (float(cg[1]["rel_residual"]) > float(cg[3]["rel_residual"])
            > float(cg[6]["rel_residual"]))
    assert [int(cg[b]["hvp_count"]) for b in (1, 3, 6)] == [2, 3, 6]  # maxiter = budget − 1
    assert all(r["stable"] == "True" and r["dtype"] == "float32" for r in rows)
    assert all(float(r["time_ms"]) > 0 and int(r["memory_bytes"]) > 0 for r in rows)


def test_end_to_end_json(ridge_run):
    _, out = ridge_run
    data = json.loads((out / "results.json").read_text())
    assert len(data["rows"]) == 10
    assert data["config"]["problem"] == "ridge"
    assert "Dense" in data["reference"] and data["lambda_max"] > 0
    assert 0 <= data["damping_floor"] < 1e-2


def _usage_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("bilevel compare-hvp: error: "), err
    return err


@pytest.mark.parametrize("argv, fragment", [
    (["--solvers", "cg,bogus"], "unknown solver 'bogus'"),
    (["--solvers", ""], "unknown solver"),
    (["--problem", "nope"], "invalid choice"),
    (["--budgets", "1,x"], "comma-separated list of integers"),
    (["--budgets", "1,,5"], "comma-separated list of integers"),
    (["--budgets", "0,5"], "budgets must be >= 1"),
    (["--damping=-1"], "must be a finite number >= 0"),
    (["--damping", "nan"], "must be a finite number >= 0"),
    (["--mode", "fwd_fwd"], "invalid choice"),
    (["--repeats", "0"], "must be >= 1"),
    (["--problem", "imaml", "--solvers", "lissa"], "lissa needs per-example data"),
])
def test_bad_arguments(capsys, tmp_path, argv, fragment):
    err = _usage_error(capsys, ["compare-hvp", "--out", str(tmp_path), *argv])
    assert fragment in err


def test_unwritable_out(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = _usage_error(capsys, ["compare-hvp", "--problem", "ridge", "--out",
                                str(blocker / "results")])
    assert "is not a writable folder" in err


def test_nystrom_rank_above_the_problem_size(capsys, tmp_path):
    err = _usage_error(capsys, ["compare-hvp", "--problem", "ridge", "--solvers", "nystrom",
                                "--budgets", "5,20", "--out", str(tmp_path)])
    assert "must be <= the problem's 10 parameters, got 20" in err


def test_usage_error_in_a_real_process(tmp_path):
    result = _run("compare-hvp", "--solvers", "cg,nope", "--out", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("bilevel compare-hvp: error: ")
    assert "unknown solver 'nope'" in result.stderr


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "compare-hvp" in capsys.readouterr().out


def test_no_subcommand_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "compare-hvp" in capsys.readouterr().err


def test_console_script_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["bilevel"].partition(":")
    assert (module, name) == ("bilevel.cli", "main")


def test_budgets_map_to_solver_knobs():
    setup = cli.Setup(None, (), None, 0.0, 2.0, 0.5, 0.2, 1.0, 100)
    config = cli.CompareHvpConfig()
    assert cli.solver_setting("cg", 10, setup, config)[0].maxiter == 9
    assert cli.solver_setting("cg", 1, setup, config)[0].maxiter == 1
    gmres = cli.solver_setting("gmres", 50, setup, config)[0]
    cycles = gmres.maxiter // gmres.restart
    assert cycles * (gmres.restart + 1) <= 50 and gmres.restart <= 20
    assert cli.solver_setting("nystrom", 7, setup, config)[0].rank == 7
    assert cli.solver_setting("neumann", 7, setup, config)[0].alpha == 0.5
    assert cli.solver_setting("unrolled-mixflow", 7, setup, config)[0] == 7
    config = dataclasses.replace(config, solvers=("identity", "cg"), budgets=(5, 1, 5))
    assert cli.plan(config) == [("cg", 1), ("cg", 5), ("identity", None)]
