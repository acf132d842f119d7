"""Our stochastic bilevel methods against benchopt's benchmark_bilevel, side by side (issue 19).

For each problem (quadratics, datacleaning, logreg; see :mod:`bilevel.bench_bilevel`), every
method -- ours (SOBA, SABA, MASOBA, StocBiO, AmIGO, F2SA, and a full-batch implicit-CG baseline)
and the benchmark's own solvers of the same algorithms, with its published best parameters -- runs
in this one process under the same wall-clock budget, over several seeds. Writes, per problem,
under experiments/results/stochastic/: ``<problem>_runs.jsonl`` (every run's curve, appended as it
finishes: a killed study resumes), ``<problem>.md`` (the table, with the machine),
``<problem>_summary.csv``, ``<problem>_curves.csv`` and ``<problem>.png`` (median curves, quartiles
shaded). The benchmark is exported from the project's git mirror at the pinned commit into
``--benchmark-dir`` when that folder lacks it; without benchopt (``pip install 'bilevel[bench]'``)
only ours run.

    python experiments/bench_bilevel.py --smoke                  # < 1 minute
    python experiments/bench_bilevel.py --problems quadratics --time 30 --seeds 5
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

from bilevel import bench_bilevel as bench
from bilevel.argtypes import out_dir, positive_float, positive_int

OUT = Path(__file__).parent / "results" / "stochastic"
SMOKE_METHODS = "soba,saba,implicit-cg,benchopt-soba,benchopt-saba"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", default=",".join(bench.PROBLEMS),
                        help="comma list of " + ", ".join(bench.PROBLEMS))
    parser.add_argument("--methods", default="all", help="as bilevel bench-bilevel --methods")
    parser.add_argument("--time", type=positive_float, default=30.0, help="seconds per run")
    parser.add_argument("--seeds", type=positive_int, default=5)
    parser.add_argument("--out", type=out_dir, default=OUT)
    parser.add_argument("--benchmark-dir", type=Path,
                        default=bench.DEFAULT_BENCHMARK_DIR.expanduser())
    parser.add_argument("--mirror", type=Path, default=bench.BENCHMARK_MIRROR,
                        help="git directory the benchmark is exported from")
    parser.add_argument("--smoke", action="store_true",
                        help=f"quadratics only, small sizes, {SMOKE_METHODS}, 1 seed, 1 s")
    args = parser.parse_args(argv)
    problems = [p for p in args.problems.split(",") if p]
    if unknown := set(problems) - set(bench.PROBLEMS):
        parser.error(f"unknown problems {sorted(unknown)}")
    methods = bench.parse_methods(SMOKE_METHODS if args.smoke else args.methods)
    if args.smoke:
        problems, args.seeds, args.time = ["quadratics"], 1, 1.0
    has_benchopt = importlib.util.find_spec("benchopt") is not None
    if not has_benchopt:
        print(f"benchopt is not installed ({bench.EXTRA}): running ours only", file=sys.stderr)
        methods = tuple(m for m in methods if bench.METHODS[m].side == "ours")
    try:  # the generator and the configs serve ours too, so export even for ours alone
        folder = bench.export_benchmark(args.benchmark_dir, args.mirror)
    except bench.BenchError as error:
        print(f"{error}: running ours only, on the fallback generator", file=sys.stderr)
        folder, methods = None, tuple(m for m in methods if bench.METHODS[m].side == "ours")

    from bilevel import bench_bilevel_engine as engine

    benchmark = bench.Benchmark(folder, solvers=has_benchopt) if folder else None
    for problem_name in problems:
        config = bench.StudyConfig(problem=problem_name, methods=methods, budget=args.time,
                                   seeds=args.seeds, smoke=args.smoke)
        start = time.perf_counter()

        def progress(message: str, start=start, name=problem_name) -> None:
            print(f"[{time.perf_counter() - start:7.1f} s] {name}: {message}", flush=True)

        runs, problem, info = engine.run_study(config, args.out, progress, bench=benchmark)
        rows, summary, paths = engine.write_outputs(config, args.out, runs, problem, info)
        print(engine.markdown_table(rows, summary, problem.metric))
        print("wrote", ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
