"""``bilevel bench-bilevel`` and its engine (bilevel.bench_bilevel, bilevel.bench_bilevel_engine).

Float64 (tests/conftest.py). The command line's refusals are one ``error:`` line and exit status
2, before JAX loads; the problems' losses are checked against closed forms (the quadratic's θ*(λ),
λ* and value function) and finite differences (the logistic value function's implicit gradient);
our methods reach the optimum of a tiny quadratic under a wall-clock budget; and, where benchopt
and the benchmark folder are present (else skipped, saying which is missing), the adapter drives
one of the benchmark's own solvers for a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel import bench_bilevel as bench
from bilevel import bench_bilevel_engine as engine
from bilevel import cli

ROOT = Path(__file__).resolve().parents[1]
FOLDER = bench.DEFAULT_BENCHMARK_DIR.expanduser()


def _benchmark_or_skip() -> bench.Benchmark:
    if importlib.util.find_spec("benchopt") is None:
        pytest.skip(f"benchopt is not installed ({bench.EXTRA})")
    if not (FOLDER / "solvers" / "soba.py").is_file():
        if not bench.BENCHMARK_MIRROR.exists():
            pytest.skip(f"no benchmark folder at {FOLDER} and no mirror to export it from")
        bench.export_benchmark(FOLDER)
    return bench.Benchmark(FOLDER)


# --------------------------------------------------------------------------------------------
# The command line: refusals are one line, exit status 2.


def _fails(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv, fragment", [
    (["--methods", "soba,nope"], "unknown method 'nope'"),
    (["--time", "0"], "--time: must be"),
    (["--seeds", "-1"], "--seeds: must be"),
    (["--problem", "mnist"], "invalid choice: 'mnist'"),
])
def test_bad_arguments(capsys, tmp_path, argv, fragment):
    err = _fails(capsys, ["bench-bilevel", *argv, "--out", str(tmp_path)])
    assert fragment in err and err.startswith("bilevel bench-bilevel: error:")


def test_out_that_is_a_file(capsys, tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    assert "is an existing file" in _fails(capsys, ["bench-bilevel", "--out", str(path)])


def test_missing_benchmark_folder_names_it(capsys, tmp_path):
    if importlib.util.find_spec("benchopt") is None:
        pytest.skip("benchopt absent: the extra is named first (tested below)")
    err = _fails(capsys, ["bench-bilevel", "--methods", "benchopt-soba", "--out", str(tmp_path),
                          "--benchmark-dir", str(tmp_path / "nowhere")])
    assert "nowhere" in err and "no benchmark_bilevel" in err


def test_missing_extra_names_it(capsys, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "benchopt" else real(name, *a))
    err = _fails(capsys, ["bench-bilevel", "--methods", "soba,benchopt-saba", "--out",
                          str(tmp_path)])
    assert "pip install 'bilevel[bench]'" in err


def test_refusals_come_before_jax_loads(tmp_path):
    code = ("import sys\nfrom bilevel.cli import main\ntry:\n"
            f"    main(['bench-bilevel', '--methods', 'benchopt-soba', '--out', {str(tmp_path)!r},"
            f" '--benchmark-dir', {str(tmp_path / 'none')!r}])\n"
            "except SystemExit as e:\n    print(e.code, 'jax' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.split() == ["2", "False"], result.stderr


def test_method_groups():
    assert bench.parse_methods("ours") == bench.OURS
    assert bench.parse_methods("soba,benchmark,soba")[0] == "soba"
    assert set(bench.parse_methods("all")) == set(bench.METHODS)


# --------------------------------------------------------------------------------------------
# The problems against closed forms and finite differences.


def _tiny_quadratic(seed=0):
    sizes = {"n_inner": 48, "n_outer": 40, "dim_inner": 5, "dim_outer": 3}
    return engine.build_quadratics(sizes, None, seed=seed)


def test_quadratic_closed_form():
    problem = _tiny_quadratic()
    p, q, big_q, _, lam_star = engine.quadratic_solution(problem.inner_args, problem.outer_args)
    lam = jnp.asarray(np.random.default_rng(1).standard_normal(3))
    theta_star = jnp.asarray(p) @ lam + jnp.asarray(q)
    # θ*(λ) zeroes the inner gradient (the loss is a mean over the per-sample matrices)
    grad = jax.jit(jax.grad(problem.inner_loss))(theta_star, lam, *problem.inner_args)
    assert float(jnp.linalg.norm(grad)) < 1e-10

    @jax.jit
    def value(lam):  # h(λ) = F(θ*(λ), λ), θ* from a dense solve of the mean Hessian
        hess = jnp.mean(problem.inner_args[0], axis=0)
        rhs = jnp.mean(problem.inner_args[2], axis=0).T @ lam + jnp.mean(problem.inner_args[3], 0)
        return problem.outer_loss(-jnp.linalg.solve(hess, rhs), lam, *problem.outer_args)

    assert float(jnp.linalg.norm(jax.jit(jax.grad(value))(jnp.asarray(lam_star)))) < 1e-10
    np.testing.assert_allclose(jax.jit(jax.hessian(value))(lam), big_q, rtol=1e-10, atol=1e-12)
    assert problem.score(None, lam_star) == pytest.approx(0.0, abs=1e-12)
    assert problem.score(None, lam) == pytest.approx(float(value(lam)) - problem.info["h_star"],
                                                     rel=1e-10)


def test_logreg_value_gradient_against_finite_differences():
    rng = np.random.default_rng(0)
    x, xv = rng.standard_normal((60, 4)), rng.standard_normal((50, 4))
    y, yv = np.sign(rng.standard_normal(60)), np.sign(rng.standard_normal(50))
    lam = rng.standard_normal(4)
    theta, _ = engine.logreg_theta_star(lam, x, y)
    assert np.linalg.norm(jax.grad(engine.logreg_inner)(jnp.asarray(theta), jnp.asarray(lam),
                                                        jnp.asarray(x), jnp.asarray(y))) < 1e-12
    value, grad = engine.logreg_value_and_grad(lam, (x, y), (xv, yv))
    eps = 1e-6
    numeric = [(engine.logreg_value_and_grad(lam + eps * e, (x, y), (xv, yv))[0]
                - engine.logreg_value_and_grad(lam - eps * e, (x, y), (xv, yv))[0]) / (2 * eps)
               for e in np.eye(4)]
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-10)


def test_datacleaning_losses_are_the_weighted_cross_entropy():
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((7, 4)), rng.integers(0, 10, 7)
    y, theta = np.eye(10)[labels], rng.standard_normal(40)
    lam, index = rng.standard_normal(20), np.arange(3, 10)
    logits = x @ theta.reshape(4, 10)
    ce = np.log(np.exp(logits).sum(1)) - logits[np.arange(7), labels]
    weights = 1 / (1 + np.exp(-lam[index]))
    expected = np.mean(weights * ce) + engine.DATACLEANING_REG * np.sum(theta**2)
    assert float(engine.datacleaning_inner(theta, lam, x, y, index)) == pytest.approx(expected,
                                                                                      rel=1e-12)
    assert float(engine.datacleaning_outer(theta, lam, x, y)) == pytest.approx(ce.mean(),
                                                                               rel=1e-12)


# --------------------------------------------------------------------------------------------
# Runs.

PARAMS = {"step_size": 0.2, "outer_ratio": 1.0, "batch_size": 8, "eval_freq": 32}


@pytest.mark.parametrize("name", ["saba", "saba-sample", "implicit-cg"])
def test_our_methods_reach_the_optimum_of_a_tiny_quadratic(name):
    problem = _tiny_quadratic()
    points = engine.run_ours(problem, name, PARAMS, seed=1, budget=1.5)
    steps = [p[0] for p in points]
    assert steps == sorted(steps) and points[0][0] == 0
    assert points[-1][1] >= 1.5 and points[0][2] > 1e-2  # ran its budget, from far away
    # SABA converges exactly; implicit-cg's constant-step Adam on θ and λ ends in a small ball
    # (measured 7e-7 after 1.5 s, from 1.9).
    assert points[-1][2] < (1e-5 if name == "implicit-cg" else 1e-8), points[-1]


def test_the_table_says_the_load_each_methods_runs_ended_at():
    runs = [{"method": "soba", "load_average": 7.5}, {"method": "soba", "load_average": 1.25},
            {"method": "benchopt-soba"}]
    assert engine._loads(runs) == ("Load average (1 min) at the end of each method's runs: "
                                   "soba 1.25–7.5; benchopt-soba not recorded.")


def test_summary_targets_and_pairs():
    def run(method, seed, finals):
        return {"method": method, "seed": seed, "points": [[0, 0.0, 1.0], *finals]}

    runs = [run("soba", 1, [[10, 1.0, 0.1], [20, 2.0, 0.01]]),
            run("soba", 2, [[10, 1.0, 0.2], [20, 2.0, 0.02]]),
            run("benchopt-soba", 1, [[10, 0.5, 0.05], [40, 2.0, 0.03]]),
            run("benchopt-soba", 2, [[10, 0.5, 0.04], [40, 2.0, 0.04]])]
    rows, summary = engine.summarize(runs, "suboptimality")
    assert summary["target_method"] == "benchopt-soba"
    assert summary["target"] == pytest.approx(0.035)
    soba = next(r for r in rows if r["method"] == "soba")
    assert soba["time_to_target"] == 2.0 and soba["final_median"] == pytest.approx(0.015)
    pair = summary["pairs"]["soba"]  # to 0.04, the worst final of any run of either
    assert pair["target"] == 0.04 and pair["ours"] == (20, 2.0) and pair["theirs"] == (25, 1.25)
    assert engine.first_reach(runs[0]["points"], 0.5, "test_accuracy") == (0, 0.0)
    assert engine.first_reach(runs[0]["points"], 1e-9, "suboptimality") == (math.inf, math.inf)


def test_best_params_from_the_benchmark_configs():
    benchmark = _benchmark_or_skip()
    params, source = benchmark.best_params("datacleaning", "AmIGO")  # "AmIGOAmIGO" in the file
    assert source == "datacleaning0_5_021424_best_params.yml" and params["step_size"] == 0.001
    params, source = benchmark.best_params("datacleaning", "SOBA")  # only in the older file
    assert source == "datacleaning0_5_best_params.yml" and params["outer_ratio"] == 1e-4
    assert benchmark.best_params("logreg", "F2SA")[1] == "class defaults"


def test_adapter_drives_a_benchmark_solver():
    benchmark = _benchmark_or_skip()
    problem = _tiny_quadratic()
    params, _ = benchmark.best_params("quadratics", "SABA")
    points = engine.run_theirs(problem, benchmark, "SABA", {**params, "batch_size": 8}, seed=1,
                               budget=0.5)
    assert points[0][0] == 0 and points[-1][0] > 0 and points[-1][1] >= 0.5
    assert points[-1][0] % params["eval_freq"] == 0  # steps counted in its eval_freq epochs
    assert points[-1][2] < 0.1 * points[0][2]
