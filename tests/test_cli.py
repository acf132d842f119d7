"""The ``bilevel`` command line: one real end-to-end run, usage errors, help, speed.

The end-to-end run is a subprocess (``python -m bilevel``) on the ridge problem, whose 10
parameters keep every compile small; usage errors and help run ``main`` in-process, which is
faster, plus subprocesses where what matters is what a user sees: stderr, the wall time of
``--help``, and which modules a bad command line loaded before it was refused.
"""

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

import hvp
from bilevel import cli, compare_hvp
from bilevel.config import from_args

ROOT = Path(__file__).resolve().parents[1]
EXPECTED_COLUMNS = ["solver", "budget", "setting", "hvp_count", "cosine", "rel_error",
                    "rel_residual", "status", "stable", "time_ms", "time_ratio", "compile_s",
                    "memory_bytes", "dtype"]
RIDGE_BUDGETS = (1, 6)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bilevel", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def ridge_run(tmp_path_factory):
    """Every solver at two budgets on ridge, stderr piped (so progress comes as log lines)."""
    out = tmp_path_factory.mktemp("compare-hvp")
    result = _run("compare-hvp", "--problem", "ridge", "--solvers",
                  ",".join(compare_hvp.solver_names()),
                  "--budgets", ",".join(map(str, RIDGE_BUDGETS)), "--repeats", "1",
                  "--out", str(out))
    return result, out


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as file:
        reader = csv.DictReader(file)
        assert reader.fieldnames == EXPECTED_COLUMNS
        return list(reader)


def test_end_to_end_exit_status_and_files(ridge_run):
    result, out = ridge_run
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "compare-hvp: ridge" in result.stdout  # the table was printed
    for name in ("results.csv", "results.json", "results.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_end_to_end_csv_rows(ridge_run):
    _, out = ridge_run
    rows = _rows(out)
    # every solver at each budget; identity is budget-independent: one row.
    assert [(r["solver"], r["budget"]) for r in rows] == [
        (name, "" if name == "identity" else str(b)) for name in compare_hvp.solver_names()
        for b in ((None,) if name == "identity" else RIDGE_BUDGETS)]
    # LiSSA samples minibatches of 32 of ridge's 50 examples along problem.batch_argnums.
    lissa = [r["setting"].split() for r in rows if r["solver"] == "lissa"]
    assert [(s[0], s[1]) for s in lissa] == [(f"maxiter={b}", "batch_size=32")
                                             for b in RIDGE_BUDGETS]
    cg = {int(r["budget"]): r for r in rows if r["solver"] == "cg"}
    # 5 CG iterations solve the 10-dim ridge system almost exactly (the damping floor is 1e-4).
    assert float(cg[6]["rel_error"]) < 1e-2 < float(cg[1]["rel_error"])
    assert float(cg[1]["rel_residual"]) > float(cg[6]["rel_residual"])
    # ok (stable) = finite, relative error <= 1 and not diverged; Nyström with rho =
    # lambda_max/10 misses ridge's hypergradient by a factor of ~3, so it is not ok there.
    assert all(r["stable"] == str(float(r["rel_error"]) <= 1 and r["status"] != "DIVERGED")
               for r in rows)
    assert all(r["stable"] == "True" for r in rows if r["solver"] != "nystrom")
    assert all(r["dtype"] == "float32" for r in rows)
    assert all(float(r["time_ms"]) > 0 and int(r["memory_bytes"]) > 0 for r in rows)


def test_hvp_count_follows_the_documented_rule(ridge_run):
    """``hvp_count`` at each budget is what ``--help`` (compare_hvp.BUDGET_RULES) says."""
    _, out = ridge_run
    found = {(r["solver"], int(r["budget"] or 1)): int(r["hvp_count"]) for r in _rows(out)}
    expected = {key: compare_hvp.hvp_count_rule(*key) for key in found}
    assert found == expected
    # The rule in numbers, as the help text states it.
    assert [compare_hvp.hvp_count_rule("cg", b) for b in (1, 2, 6, 50)] == [2, 2, 6, 50]
    assert [compare_hvp.hvp_count_rule("gmres", b) for b in (1, 6, 21, 22, 50)] == [
        2, 6, 21, 22, 48]
    assert [compare_hvp.hvp_count_rule(n, 6) for n in ("neumann", "lissa", "nystrom")] == [7] * 3
    assert compare_hvp.hvp_count_rule("identity", 50) == 1
    assert compare_hvp.hvp_count_rule("unrolled-reverse", 6) == 6
    assert [compare_hvp.hvp_count_rule("bicgstab", b) for b in (1, 6, 21)] == [3, 5, 21]


def test_status_words_are_honest(ridge_run):
    """No row that missed its tolerance (tol=0: all of them) says converged; the unrolled rows,
    which solve no system, say so instead of claiming a status."""
    _, out = ridge_run
    status = {(r["solver"], r["budget"]): r["status"] for r in _rows(out)}
    assert "CONVERGED" not in status.values()
    assert status["identity", ""] == "INACCURATE"
    for budget in RIDGE_BUDGETS:
        assert status["lissa", str(budget)] in ("INACCURATE", "DIVERGED")
        assert status["nystrom", str(budget)] in ("INACCURATE", "DIVERGED")
        assert status["cg", str(budget)] in ("MAX_ITERATIONS", "STAGNATED")
        assert status["unrolled-mixflow", str(budget)] == "NOT_CHECKED"


def test_progress_lines_when_stderr_is_not_a_terminal(ridge_run):
    result, _ = ridge_run
    config = compare_hvp.CompareHvpConfig(problem="ridge",
                                          solvers=tuple(compare_hvp.solver_names()),
                                          budgets=RIDGE_BUDGETS)
    total = compare_hvp.num_stages(config)
    lines = result.stderr.splitlines()
    pattern = re.compile(r"^\[ *\d+\.\d s\] (.+) \((\d+)/(\d+)\)$")
    steps = [m for m in map(pattern.match, lines) if m]
    assert len(steps) == total and steps[-1].group(2, 3) == (str(total), str(total)), lines
    messages = [m.group(1) for m in steps]
    assert "compiled cg budget 6" in messages and "compiled identity" in messages
    assert any(m.startswith("timed unrolled-reverse budget 1: ") for m in messages)
    assert messages[0].startswith("reference ready")
    assert lines[0].startswith("[   0.0 s] compare-hvp on ridge")  # said before the first step


def test_end_to_end_json(ridge_run):
    _, out = ridge_run
    data = json.loads((out / "results.json").read_text())
    budgeted = len(compare_hvp.solver_names()) - 1  # identity has one row
    assert len(data["rows"]) == 1 + budgeted * len(RIDGE_BUDGETS)
    assert data["budget_rules"]["bicgstab"] == hvp.BiCGStab.budget_rule
    assert data["config"]["problem"] == "ridge"
    assert "Dense" in data["reference"] and data["lambda_max"] > 0
    assert 0 <= data["damping_floor"] < 1e-2


# --------------------------------------------------------------------------------------------
# The table on screen


def _fake_rows() -> list[dict]:
    """Rows with the widest values each column can hold."""
    statuses = ("MAX_ITERATIONS", "NEGATIVE_CURVATURE", "INACCURATE", "STAGNATED", "DIVERGED",
                "NONFINITE", "NOT_CHECKED")
    rows = []
    for i, name in enumerate(compare_hvp.solver_names()):
        rows.append({
            "solver": name, "budget": None if name == "identity" else 500,
            "setting": "restart=20x25 and more text", "hvp_count": 1001, "cosine": -0.123456,
            "rel_error": 1.23e+10, "rel_residual": math.nan if "unrolled" in name else 9.9e-05,
            "status": statuses[i % len(statuses)], "stable": i % 2 == 0, "time_ms": 12345.678,
            "time_ratio": 12345.6, "compile_s": 123.4, "memory_bytes": 123456789,
            "dtype": "float32"})
    return rows


def test_table_fits_80_columns_without_cutting_cells():
    from rich.console import Console

    metadata = {"config": dataclasses.asdict(compare_hvp.CompareHvpConfig(jobs=2)),
                "num_params": 1210, "damping_floor": 1.44e-3, "lambda_max": 0.769,
                "alpha": 1.3, "baseline_ms": 0.86}
    buffer = io.StringIO()
    cli.print_table(_fake_rows(), metadata, Console(file=buffer, width=80))
    text = buffer.getvalue()
    assert max(map(len, text.splitlines())) <= 80, text
    assert "…" not in text, text  # rich's ellipsis: a cut cell
    for name in compare_hvp.solver_names():
        assert name in text
    assert "1.23e+10" in text and "-0.1235" in text
    assert "not checked" in text and "max iterations" in text
    assert "ok       usable as a hypergradient" in text  # the legend explains the ok column


# --------------------------------------------------------------------------------------------
# Usage errors


def _usage_error(capsys, argv: list[str], prog: str = "bilevel compare-hvp") -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"{prog}: error: "), err
    return err


@pytest.mark.parametrize("argv, fragment", [
    (["--solvers", "cg,bogus"], "unknown solver 'bogus'"),
    (["--solvers", ""], "argument --solvers: must be a non-empty comma-separated list of names, "
                        "got ''"),
    (["--solvers", "cg,dense"], "unknown solver 'dense' (it is the reference"),
    (["--problem", "nope"], "unknown problem 'nope'"),
    (["--budgets", "1,x"], "comma-separated list of integers"),
    (["--budgets", "1,,5"], "comma-separated list of integers"),
    (["--budgets", "0,5"], "argument --budgets: must be a non-empty comma-separated list of "
                           "integers >= 1, got '0,5'"),
    (["--damping=-1"], "must be a finite number >= 0"),
    (["--damping", "nan"], "must be a finite number >= 0"),
    (["--mode", "fwd_fwd"], "invalid choice"),
    (["--dtype", "float16"], "invalid choice"),
    (["--seed", "x"], "argument --seed: must be an integer >= 0, got 'x'"),
    (["--seed", "-1"], "argument --seed: must be an integer >= 0, got '-1'"),
    (["--jobs", "0"], "argument --jobs: must be an integer >= 1, got '0'"),
    (["--repeats", "0"], "argument --repeats: must be an integer >= 1, got '0'"),
    (["--problem", "imaml", "--solvers", "lissa"], "the problem has no per-example data"),
])
def test_bad_arguments(capsys, tmp_path, argv, fragment):
    err = _usage_error(capsys, ["compare-hvp", "--out", str(tmp_path), *argv])
    assert fragment in err


@pytest.mark.parametrize("argv, fragment", [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["--verbose"], "unrecognized arguments: --verbose"),
])
def test_bad_top_level_arguments(capsys, argv, fragment):
    assert fragment in _usage_error(capsys, argv, prog="bilevel")


def test_nystrom_rank_above_the_problem_size(capsys, tmp_path):
    err = _usage_error(capsys, ["compare-hvp", "--problem", "ridge", "--solvers", "nystrom",
                                "--budgets", "5,20", "--out", str(tmp_path)])
    assert "nystrom budget 20 on 'ridge': hvp.Nystrom: rank=20 exceeds the problem size 10" in err


def test_usage_error_in_a_real_process(tmp_path):
    result = _run("compare-hvp", "--solvers", "cg,nope", "--out", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("bilevel compare-hvp: error: ")
    assert "unknown solver 'nope'" in result.stderr


#: Runs ``main`` on its arguments, then says whether JAX was loaded on the way.
_MAIN_THEN_REPORT = """\
import sys
from bilevel.cli import main
try:
    sys.exit(main(sys.argv[1:]))
finally:
    print("jax loaded" if "jax" in sys.modules else "jax not loaded")
"""


def _bad_out(tmp_path: Path, kind: str) -> Path:
    if kind == "existing file":
        path = tmp_path / "a-file"
        path.write_text("")
        return path
    if kind == "folder under a file":
        (tmp_path / "a-file").write_text("")
        return tmp_path / "a-file" / "results"
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        pytest.skip("this user (root?) may write into a read-only folder")
    return folder


@pytest.mark.parametrize("kind", ["existing file", "read-only folder", "folder under a file"])
def test_bad_out_is_refused_before_any_work(tmp_path, kind):
    out = _bad_out(tmp_path, kind)
    result = subprocess.run([sys.executable, "-c", _MAIN_THEN_REPORT, "compare-hvp", "--out",
                             str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("bilevel compare-hvp: error: argument --out: ")
    assert result.stdout.strip() == "jax not loaded"  # refused before anything was computed


# --------------------------------------------------------------------------------------------
# Help, version, speed


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "compare-hvp" in out and "--version" in out


def test_no_subcommand_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "compare-hvp" in capsys.readouterr().err


def test_version(capsys):
    import bilevel

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"bilevel {bilevel.__version__}\n"


def _compare_hvp_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser("compare-hvp")
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["compare-hvp"]


def test_every_compare_hvp_option_states_its_default():
    sub = _compare_hvp_parser()
    options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    names = {a.dest for a in options}
    assert {f.name for f in dataclasses.fields(compare_hvp.CompareHvpConfig)} | {"out"} == names
    text = sub.format_help()
    for action in options:
        assert "(default: " in (action.help or ""), action.option_strings
    assert "(default: digits_mlp_per_parameter)" in text
    assert "(default: 1,5,10,20,50)" in " ".join(text.split())
    assert "ok       usable as a hypergradient" in text  # the legend is in the epilog
    assert "hvps_at_budget(budget)" in text and "unrolled-*" in text  # and the budget rules


def test_config_defaults_round_trip_through_the_parser(tmp_path):
    """The options are derived from the config's fields: parsing no option gives its defaults."""
    args = cli.build_parser("compare-hvp").parse_args(["compare-hvp", "--out", str(tmp_path)])
    fields = dataclasses.fields(compare_hvp.CompareHvpConfig)
    parsed = compare_hvp.CompareHvpConfig(**{f.name: getattr(args, f.name) for f in fields})
    assert parsed == compare_hvp.CompareHvpConfig()
    args = cli.build_parser("compare-hvp").parse_args(
        ["compare-hvp", "--out", str(tmp_path), "--solvers", "cg,cg,identity", "--budgets", "3,7",
         "--nystrom-rho", "0.5", "--jobs", "1"])
    assert from_args(compare_hvp.CompareHvpConfig, args) == compare_hvp.CompareHvpConfig(
        solvers=("cg", "identity"), budgets=(3, 7), nystrom_rho=0.5, jobs=1)


@pytest.mark.parametrize("field, value, rule", [
    ("budgets", (1, 0), "a non-empty tuple of integers >= 1"),
    ("solvers", (), "a non-empty tuple of names"),
    ("damping", float("nan"), "a finite number >= 0"),
    ("mode", "fwd_fwd", "one of ('fwd_rev', 'rev_rev', 'rev_fwd')"),
    ("nystrom_rho", 0.0, "None or a finite number > 0"),
    ("jobs", True, "an integer >= 1"),
])
def test_the_config_checks_its_fields_as_the_options_do(field, value, rule):
    with pytest.raises(ValueError) as error:
        compare_hvp.CompareHvpConfig(**{field: value})
    where = "compare_hvp.CompareHvpConfig"
    assert str(error.value) == f"{where}: {field} must be {rule}, got {value!r}"


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("bilevel")
    return [str(script)] if script.exists() else [sys.executable, "-m", "bilevel"]


@pytest.mark.parametrize("argv", [["--help"], ["compare-hvp", "--help"]])
def test_help_is_fast(argv):
    """``bilevel --help`` loads no JAX: under 1.5 s of wall time (the best of two tries)."""
    best = math.inf
    for _ in range(2):
        start = time.perf_counter()
        result = subprocess.run([*_console_script(), *argv], cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
        best = min(best, time.perf_counter() - start)
        assert result.returncode == 0, result.stderr
    assert best < 1.5, f"bilevel {' '.join(argv)} took {best:.2f} s"


def test_importing_the_cli_loads_no_jax():
    code = ("import sys, bilevel.cli\n"
            "from bilevel.cli import _add_compare_hvp_arguments, _Parser\n"
            "_add_compare_hvp_arguments(_Parser(prog='x'))\n"
            "print(sorted(m for m in ('jax', 'numpy', 'optax', 'hvp', 'scipy', 'flax')"
            " if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------
# The engine and the registry of commands


def test_the_engine_lives_outside_the_cli():
    for name in ("CompareHvpConfig", "check_config", "solver_setting", "prepare", "compile_all",
                 "measure", "compare_hvp", "write_csv", "write_json", "plot"):
        assert hasattr(compare_hvp, name) and not hasattr(cli, name), name
    study = (ROOT / "experiments" / "hvp_study.py").read_text()
    assert "from bilevel import compare_hvp" in study and "from bilevel import cli" not in study


def test_the_cli_names_no_application():
    assert "semisup" not in (ROOT / "bilevel" / "cli.py").read_text()


def test_console_script_and_commands_are_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    module, _, name = project["scripts"]["bilevel"].partition(":")
    assert (module, name) == ("bilevel.cli", "main")
    assert project["entry-points"][cli.ENTRY_POINT_GROUP] == {"lopt": "bilevel.lopt.cli",
                                                             "ssl": "semisup.cli"}


def test_installed_commands_are_discovered():
    assert {"lopt", "ssl"} <= set(cli.registered_commands())


def _entry_points(*pairs: tuple[str, str]):
    from importlib.metadata import EntryPoint

    points = [EntryPoint(name, value, cli.ENTRY_POINT_GROUP) for name, value in pairs]
    return lambda group: [p for p in points if p.group == group]


def test_a_broken_plugin_does_not_break_help(monkeypatch, capsys):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points", _entry_points(
        ("missing", "no_such_module_for_bilevel_tests"), ("incomplete", "json")))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "missing (unavailable: ModuleNotFoundError" in out
    assert "incomplete (unavailable: AttributeError" in out
    assert "compare-hvp" in out
    err = _usage_error(capsys, ["missing"], prog="bilevel missing")
    assert "could not be loaded: ModuleNotFoundError" in err


def test_a_registered_plugin_runs(monkeypatch, capsys):
    import importlib.metadata
    import types

    plugin = types.ModuleType("fake_bilevel_plugin")
    plugin.HELP = "a command registered by a test"
    plugin.add_arguments = lambda parser: parser.add_argument("--times", type=int, default=1)
    plugin.run = lambda args, parser: print("ran " * args.times) or 0
    monkeypatch.setitem(sys.modules, "fake_bilevel_plugin", plugin)
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        _entry_points(("fake", "fake_bilevel_plugin")))
    assert cli.main(["fake", "--times", "2"]) == 0
    assert capsys.readouterr().out == "ran ran \n"


def test_default_problem_has_many_hyperparameters():
    """With 2 hyperparameters every solver's cosine was 0.985-1.000; the default has one per
    parameter of the digits MLP."""
    import jax
    import jax.numpy as jnp

    config = compare_hvp.CompareHvpConfig()
    problem = compare_hvp.make_problem(config.problem, config.seed, jnp.float32)
    count = sum(x.size for x in jax.tree_util.tree_leaves(problem.hparams))
    assert count == sum(x.size for x in jax.tree_util.tree_leaves(problem.params)) == 1210


def _fake_setup(problem=None) -> compare_hvp.Setup:
    """A Setup with lambda_max 2 (alpha 0.5) and rho 0.2, for building solvers without a run."""
    import types

    problem = problem or types.SimpleNamespace(batch_argnums=())
    return compare_hvp.Setup(problem, (), None, 0.0, 2.0, 0.5, 0.2, 1.0, 100)


def test_budgets_map_to_solver_knobs():
    setup, config = _fake_setup(), compare_hvp.CompareHvpConfig()
    setting = compare_hvp.solver_setting
    assert setting("cg", 10, setup, config)[0].maxiter == 9
    assert setting("cg", 1, setup, config)[0].maxiter == 1
    gmres = setting("gmres", 50, setup, config)[0]
    cycles = gmres.maxiter // gmres.restart
    assert cycles * (gmres.restart + 1) <= 50 and gmres.restart <= 20
    assert setting("nystrom", 7, setup, config)[0].rank == 7
    assert setting("neumann", 7, setup, config)[0].alpha == 0.5
    assert setting("identity", 7, setup, config)[0].scale == 0.5
    assert setting("unrolled-mixflow", 7, setup, config)[0] == 7
    assert setting("neumann", 7, setup, config)[1] == (
        "maxiter=7 alpha=0.5 power_maxiter=20 divergence=1")
    config = dataclasses.replace(config, solvers=("identity", "cg"), budgets=(5, 1, 5))
    assert compare_hvp.plan(config) == [("cg", 1), ("cg", 5), ("identity", None)]


@pytest.mark.parametrize("name", sorted(set(hvp.SOLVERS) - {"dense"}))
def test_every_registered_solver_is_a_row(name):
    """Every solver in hvp.SOLVERS but the reference is a compare-hvp row: accepted by the
    check, built by hvp.make_solver from the budget, with tol=0 (every solver spends its whole
    budget, so its status never claims more than was reached) and the options it has fields
    for, and its hvp_count rule is its class's."""
    setup, config = _fake_setup(), compare_hvp.CompareHvpConfig(problem="ridge", solvers=(name,))
    compare_hvp.check_config(config)
    solver, text = compare_hvp.solver_setting(name, 7, setup, config)
    cls = hvp.SOLVERS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    options = {"tol": 0.0, "alpha": 0.5, "scale": 0.5, "rho": 0.2, "batch_size": 32, "seed": 0}
    assert solver == hvp.make_solver(name, 7, **{k: v for k, v in options.items() if k in fields})
    assert solver.tol == 0.0 and "tol=" not in text
    assert compare_hvp.hvp_count_rule(name, 7) == cls.hvps_at_budget(7)
    assert compare_hvp.budget_rules([name]) == {name: cls.budget_rule}


def test_the_reference_and_unknown_names_are_refused():
    for name, fragment in (("dense", "it is the reference"), ("bogus", "unknown solver")):
        config = compare_hvp.CompareHvpConfig(problem="ridge", solvers=("cg", name))
        with pytest.raises(compare_hvp.ConfigError, match=fragment) as error:
            compare_hvp.check_config(config)
        assert "bicgstab" in str(error.value)  # the message lists the registered names


@pytest.fixture
def throwaway_solver():
    """A solver registered for one test (CG under another name), removed afterwards."""
    name = "throwaway_cg"

    try:
        @hvp.register(name)
        class ThrowawayCG(hvp.CG):
            pass

        yield name, ThrowawayCG
    finally:
        hvp.SOLVERS.pop(name, None)


def test_a_newly_registered_solver_is_compared_with_no_other_edit(throwaway_solver, capsys,
                                                                   tmp_path):
    """Registering a solver is all it takes: --solvers accepts it, and it runs, with the same
    numbers as the solver it copies."""
    name, cls = throwaway_solver
    assert name in compare_hvp.solver_names()
    config = compare_hvp.CompareHvpConfig(problem="ridge", solvers=(name, "cg"), budgets=(3,),
                                          repeats=1, jobs=1)
    compare_hvp.check_config(config)
    rows, metadata = compare_hvp.compare_hvp(config)
    found = {r["solver"]: r for r in rows}
    assert found[name]["hvp_count"] == cls.hvps_at_budget(3) == found["cg"]["hvp_count"]
    assert found[name]["rel_error"] == found["cg"]["rel_error"]
    assert metadata["budget_rules"][name] == cls.budget_rule
    hvp.SOLVERS.pop(name)
    err = _usage_error(capsys, ["compare-hvp", "--out", str(tmp_path), "--solvers", name])
    assert f"unknown solver {name!r}" in err
