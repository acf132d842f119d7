"""Our stochastic bilevel methods against benchopt's benchmark_bilevel, side by side in one process.

The benchmark (github.com/benchopt/benchmark_bilevel) is an external reference read at run time
from a local folder (``--benchmark-dir``, an export of a pinned commit): its ``Solver`` classes
are imported from there and driven through benchopt's solver API (``get_instance``,
``_set_objective`` with its warm-up, ``run(callback)``), its quadratics come from its own
generator (``benchmark_utils/gen_matrices.py``) and its step sizes from its published
``config/*_best_params.yml``. None of its code lives in this package; without the folder (or
without benchopt, the ``bench`` extra) only our methods run, on our fallback generator and
fallback step sizes.

Both sides see the same losses, written here once: the benchmark's calling convention
``f(inner_var, outer_var, start, batch_size)`` is a ``dynamic_slice`` of the same arrays (closed
over, as its datasets do), ours take the arrays as arguments. Every iterate of both is scored
by the same code: suboptimality of the value function ``h(λ) = F(θ*(λ), λ)`` (quadratics: closed
form; per-feature L2 logistic regression: Newton solves, float64), or test accuracy of θ
(data cleaning). Clocks stop while scoring; compilation is outside them (the benchmark's own
warm-up, and one warm-up chunk of ours).

Problems (``PROBLEMS``): ``quadratics`` (the benchmark's simulated quadratics at the sizes of
``config/quadratics_021424_best_params.yml``), ``datacleaning`` (Fashion-MNIST from Debian's
``dataset-fashion-mnist`` IDX files, 20000 train rows of which half get a random label, 5000
validation rows, the 10000 test rows; multinomial logistic regression with per-example weights
``sigmoid(λ_i)`` and ``0.2 ||θ||²``, the benchmark's model) and ``logreg`` (binary logistic
regression with one L2 weight ``exp(λ_k)`` per feature on synthetic data of ijcnn1's shape,
49990 × 22 train, 91701 validation rows; ijcnn1 itself needs a download).

This module is the front, importing neither JAX nor NumPy (the command line parses and checks
its options before any of them load): the registries, the benchmark folder, the study's config.
The problems, runs, tables and plot are :mod:`bilevel.bench_bilevel_engine`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

#: The benchmark commit this comparison is written against (2025-05-22, "improve documentation").
BENCHMARK_COMMIT = "3ad65dccff5cce27a656630a4f98be52920850b4"
#: Where the project keeps a bare mirror of the benchmark; ``export_benchmark`` reads it.
BENCHMARK_MIRROR = Path("/work/.mirror/benchopt+benchmark_bilevel/repo")
#: Where the CLI and the experiment look for (and export) the benchmark by default.
DEFAULT_BENCHMARK_DIR = Path("~/.cache/bilevel/benchmark_bilevel-" + BENCHMARK_COMMIT[:7])
#: The extra that installs benchopt.
EXTRA = "pip install 'bilevel[bench]'"

PROBLEMS = ("quadratics", "datacleaning", "logreg")
METRICS = {"quadratics": "suboptimality", "datacleaning": "test_accuracy",
           "logreg": "suboptimality"}

#: Each problem's best-parameter files, first match wins (the 021424 runs are the latest).
BEST_PARAMS_FILES = {
    "quadratics": ("quadratics_021424_best_params.yml",),
    "datacleaning": ("datacleaning0_5_021424_best_params.yml", "datacleaning0_5_best_params.yml"),
    "logreg": ("ijcnn1_021424_best_params.yml", "ijcnn1_best_params.yml"),
}

#: Step sizes when the benchmark folder is absent (values of the files above at
#: BENCHMARK_COMMIT; for quadratics' SOBA, which has no entry, SABA's).
FALLBACK_PARAMS = {
    "quadratics": {"SOBA": (0.1, 1.0), "SABA": (0.1, 1.0), "AmIGO": (0.01, 0.1),
                   "StocBiO": (0.1, 1.0), "F2SA": (0.1, 1.0)},
    "datacleaning": {"SOBA": (1.0, 1e-4), "SABA": (0.1, 1e-3), "AmIGO": (0.001, 1e-6),
                     "StocBiO": (0.01, 1e-5), "F2SA": (0.1, 1e-4)},
    "logreg": {"SOBA": (0.03125, 0.01), "SABA": (0.25, 1.0), "AmIGO": (0.125, 0.1),
               "StocBiO": (0.25, 1.0), "F2SA": (0.01, 1.0)},
}


CLI_EPILOG = """\
Ours run as library methods (bilevel.SOBA, ...) in a jitted chunk of outer steps; the
benchmark's solvers (benchopt-*) are imported from --benchmark-dir and driven through
benchopt's solver API, both with the step sizes of the benchmark's config/*_best_params.yml.
Both are scored by the same code, clocks stopped while scoring, compilation excluded. Each
finished run is appended to OUT/<problem>_runs.jsonl, so a killed study resumes; the
tables (Markdown, CSV) and the plot (PNG) are written at the end.

example: bilevel bench-bilevel --problem datacleaning --methods soba,saba,implicit-cg \\
             --time 120"""


class BenchError(Exception):
    """A missing extra, folder or data set: the CLI prints it as one line and exits 2."""


# --------------------------------------------------------------------------------------------
# Methods: ours, and the benchmark's solvers of the same algorithms.


class MethodSpec(NamedTuple):
    side: str  # "ours" or "benchmark"
    solver: str  # the benchmark solver whose (best) parameters set the step sizes


#: Every method of the comparison: ours by their names, the benchmark's as ``benchopt-<name>``.
METHODS = {
    "soba": MethodSpec("ours", "SOBA"), "saba": MethodSpec("ours", "SABA"),
    "saba-sample": MethodSpec("ours", "SABA"),
    "masoba": MethodSpec("ours", "SOBA"), "stocbio": MethodSpec("ours", "StocBiO"),
    "amigo": MethodSpec("ours", "AmIGO"), "f2sa": MethodSpec("ours", "F2SA"),
    "implicit-cg": MethodSpec("ours", "SABA"),
    "benchopt-soba": MethodSpec("benchmark", "SOBA"),
    "benchopt-saba": MethodSpec("benchmark", "SABA"),
    "benchopt-stocbio": MethodSpec("benchmark", "StocBiO"),
    "benchopt-amigo": MethodSpec("benchmark", "AmIGO"),
    "benchopt-f2sa": MethodSpec("benchmark", "F2SA"),
}
OURS = tuple(name for name, spec in METHODS.items() if spec.side == "ours")
THEIRS = tuple(name for name, spec in METHODS.items() if spec.side == "benchmark")


def parse_methods(text: str) -> tuple[str, ...]:
    """``"soba,saba"`` -> ``("soba", "saba")``; ``all``, ``ours``, ``benchmark`` are groups."""
    groups = {"all": tuple(METHODS), "ours": OURS, "benchmark": THEIRS}
    names: list[str] = []
    for word in (w.strip() for w in text.split(",")):
        if word in groups:
            names += groups[word]
        elif word in METHODS:
            names.append(word)
        else:
            raise ValueError(f"unknown method {word!r}; expected a comma list of "
                             f"{', '.join(METHODS)} (or all, ours, benchmark)")
    return tuple(dict.fromkeys(names))


# --------------------------------------------------------------------------------------------
# The benchmark folder: export, checks, solver classes, generator, best parameters.


def export_benchmark(dest: Path, mirror: Path = BENCHMARK_MIRROR,
                     commit: str = BENCHMARK_COMMIT) -> Path:
    """``git archive`` of the benchmark at ``commit`` from a local git directory into ``dest``."""
    dest = Path(dest)
    if (dest / "solvers" / "soba.py").exists():
        return dest
    if not Path(mirror).exists():
        raise BenchError(f"no benchmark folder at {str(dest)!r} and no git mirror at "
                         f"{str(mirror)!r} to export it from")
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(mirror), "archive", commit], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    (dest / "COMMIT").write_text(commit + "\n")
    return dest


def check_benchmark(folder: Path | None, solvers: bool = True) -> Path:
    """The folder, after checking that it holds the benchmark and (for its ``solvers``) that
    benchopt imports."""
    if solvers and importlib.util.find_spec("benchopt") is None:
        raise BenchError(f"the benchopt-* methods need benchopt, the 'bench' extra: {EXTRA}")
    if folder is None:
        raise BenchError("the benchopt-* methods need --benchmark-dir, a folder with "
                         "benchmark_bilevel (git archive of commit " + BENCHMARK_COMMIT[:7] + ")")
    folder = Path(folder).expanduser()
    if not (folder / "solvers" / "soba.py").is_file():
        raise BenchError(f"--benchmark-dir {str(folder)!r} holds no benchmark_bilevel "
                         f"(no solvers/soba.py)")
    return folder


class Benchmark:
    """The benchmark's code, imported from ``folder`` (its root goes on ``sys.path``, as
    benchopt does, for ``benchmark_utils``); ``solvers=False``: only its generator and configs,
    which need no benchopt."""

    def __init__(self, folder: Path, solvers: bool = True):
        self.folder = check_benchmark(folder, solvers)
        if str(self.folder) not in sys.path:
            sys.path.insert(0, str(self.folder))
        commit = self.folder / "COMMIT"
        self.commit = commit.read_text().strip() if commit.exists() else "unknown"
        self._classes: dict[str, type] = {}

    def _module(self, relative: str, name: str):
        spec = importlib.util.spec_from_file_location(name, self.folder / relative)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    def solver_class(self, solver: str) -> type:
        if solver not in self._classes:
            module = self._module(f"solvers/{solver.lower()}.py",
                                  f"benchmark_bilevel_solver_{solver.lower()}")
            self._classes[solver] = module.Solver
        return self._classes[solver]

    def gen_matrices(self) -> Callable:
        from benchmark_utils import gen_matrices  # from self.folder
        function = gen_matrices.gen_matrices
        return getattr(function, "func", function)  # joblib's cache writes to the cwd: skip it

    def best_params(self, problem: str, solver: str) -> tuple[dict, str]:
        """The solver's published best parameters for the problem, and where they came from
        (a config file, or the class defaults when no file names the solver)."""
        for file in BEST_PARAMS_FILES[problem]:
            text = (self.folder / "config" / file).read_text()
            for name, params in _solver_lines(text):
                if name in (solver, solver + solver):  # "AmIGOAmIGO": a typo in one file
                    return params, file
        defaults = {k: v[0] for k, v in self.solver_class(solver).parameters.items()}
        return defaults, "class defaults"


def _solver_lines(text: str):
    """``(name, params)`` of each ``- Name[k=v,...]`` line of a benchopt config."""
    for line in text.splitlines():
        match = re.match(r"^\s*-\s*([A-Za-z0-9_]+)\[(.*)$", line)
        if match:
            body = match.group(2).rstrip().removesuffix("]")
            yield match.group(1), dict(_parse_pair(p) for p in _split_top(body))


def _split_top(body: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in body:
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p.strip() for p in [*parts, current] if p.strip()]


def _parse_pair(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    value = value.strip()
    if value.startswith("["):
        return key.strip(), [_scalar(v) for v in _split_top(value.strip("[]"))]
    return key.strip(), _scalar(value)


def _scalar(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


#: The most outer steps between two clock reads, on both sides. ``eval_freq`` only sets how often
#: benchopt's callback runs (not the algorithm); the published 131072 (ijcnn1) or 512 would leave
#: a 30 s run with one or two points.
MAX_CHUNK = 64


def step_params(problem: str, solver: str, bench: Benchmark | None) -> tuple[dict, str]:
    """The settings both sides use for ``solver``'s algorithm on ``problem``, and their source
    (``eval_freq`` capped at :data:`MAX_CHUNK`)."""
    if bench is not None:
        params, source = bench.best_params(problem, solver)
    else:
        step, ratio = FALLBACK_PARAMS[problem][solver]
        params = {"step_size": step, "outer_ratio": ratio, "batch_size": 64, "n_inner_steps": 10,
                  "n_shia_steps": 10, "eval_freq": 16, "lmbda0": 1.0, "delta_lmbda": 0.1}
        source = "fallback (no benchmark folder)"
    return {**params, "eval_freq": min(int(params.get("eval_freq", 16)), MAX_CHUNK)}, source


# --------------------------------------------------------------------------------------------
# The study: every (method, seed), written as it finishes; the summary tables and the plot.


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    problem: str = "quadratics"
    methods: tuple[str, ...] = tuple(METHODS)
    budget: float = 30.0  # seconds per run
    seeds: int = 5
    smoke: bool = False
    benchmark_dir: str | None = None


def runs_file(out: Path, config: StudyConfig) -> Path:
    return Path(out) / f"{config.problem}{'_smoke' if config.smoke else ''}_runs.jsonl"


def load_runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def planned_runs(config: StudyConfig) -> int:
    return len(config.methods) * config.seeds
