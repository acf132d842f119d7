"""The ``bilevel`` command line: argument parsing and printing, nothing else.

``bilevel compare-hvp`` is built in; its engine is :mod:`bilevel.compare_hvp`, whose config
fields declare the options. Other commands are registered, not named here: each entry point of
the group ``bilevel.commands`` (``[project.entry-points."bilevel.commands"]`` in
pyproject.toml) is a module that defines ``HELP``, ``add_arguments(parser)`` and
``run(args, parser) -> exit status``; a nested command such as ``bilevel lopt train`` adds its own
subparsers in ``add_arguments``.

``bilevel --help`` must answer at once, so this module imports no JAX, NumPy or engine at the
top: the functions that run work import them, and only the command being run gets its
arguments added (a plugin whose module fails to load is listed as unavailable).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

from bilevel import __version__
from bilevel.argtypes import out_dir
from bilevel.config import add_arguments, from_args

#: The entry-point group other packages register their commands under.
ENTRY_POINT_GROUP = "bilevel.commands"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (``prog: error: ...``), exit status 2."""
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


class Command(NamedTuple):
    """A subcommand: ``add_arguments(parser)`` then ``run(args, parser) -> exit status``."""
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, argparse.ArgumentParser], int]


# --------------------------------------------------------------------------------------------
# compare-hvp: printing

#: What the table's columns mean; printed under the table and in ``compare-hvp --help``.
LEGEND = """\
HVPs     products spent (info.hvp_count, the final residual check included)
cosine   cosine between the hypergradient and the float64 Dense reference
rel err  ||hypergradient - reference|| / ||reference||
resid    ||b - (H + damping I) x|| / ||b||, the solve's relative residual
         (- for unrolled rows: they solve no linear system)
status   the solver's own (hvp.Status). Every solver runs with tol=0 and spends
         its budget, so none reports converged. max iterations: the budget ran
         out; inaccurate: an approximation (identity, nystrom, lissa) did not
         solve the system; stagnated: round-off stopped it early; diverged,
         nonfinite, negative curvature: failed; not checked: unrolled (only
         finiteness is checked)
x base   median time / the identity hypergradient's median time (the baseline)
ok       usable as a hypergradient: finite, rel err <= 1 (closer to the
         reference than a zero hypergradient) and not diverged
results.csv has every column (also setting, time_ms, compile_s, memory_bytes)."""

#: The table's columns: header, the row's field, how to show it.
_SCREEN = (("solver", "solver", str), ("budget", "budget", lambda b: "-" if b is None else str(b)),
           ("HVPs", "hvp_count", str), ("cosine", "cosine", lambda x: _number(x, ".4f")),
           ("rel err", "rel_error", lambda x: _number(x, ".2e")),
           ("resid", "rel_residual", lambda x: _number(x, ".2e")),
           ("status", "status", lambda s: s.lower().replace("_", " ")),
           ("x base", "time_ratio", lambda x: _number(x, ".1f" if x < 100 else ".0f")),
           ("ok", "stable", lambda ok: "yes" if ok else "NO"))


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)  # NaN -> "-"


def print_table(rows: list[dict], metadata: dict, console) -> None:
    """The rows as a table that fits an 80-column terminal (some columns are only in the CSV),
    the legend, and the run's facts."""
    from rich import box
    from rich.table import Table

    config = metadata["config"]
    table = Table(title=f"compare-hvp: {config['problem']}, {metadata['num_params']} params, "
                        f"{config['dtype']} vs Dense float64", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, padding=0)
    for header, field, _ in _SCREEN:
        if field == "solver":  # never cut a solver's name short
            width = max(len(header), *(len(r["solver"]) for r in rows))
            table.add_column(header, min_width=width, no_wrap=True)
        else:
            table.add_column(header, justify="left" if field == "status" else "right")
    for r in rows:
        table.add_row(*(show(r[field]) for _, field, show in _SCREEN))
    console.print(table)
    console.print()
    console.print(LEGEND, highlight=False)
    rules = metadata.get("budget_rules", {})
    if rules:
        width = max(map(len, rules))
        console.print("\nHow each budget became the solver's settings (the class's budget_rule):",
                      highlight=False)
        for name, rule in rules.items():
            console.print(textwrap.fill(rule, 79, initial_indent=f"{name:<{width}}  ",
                                        subsequent_indent=" " * (width + 2)), highlight=False,
                          markup=False)
    console.print(f"floor: the exact solve with damping {config['damping']:g} is "
                  f"{metadata['damping_floor']:.2e} from the reference\n"
                  f"lambda_max ~ {metadata['lambda_max']:.3g}, alpha = {metadata['alpha']:.3g}; "
                  f"baseline (identity) {metadata['baseline_ms']:.2f} ms", highlight=False)


class _LogLines:
    """Progress as plain lines on stderr, ``[  12.3 s] compiled cg budget 5 (3/35)``: what a
    log file or a pipe can show."""

    def __init__(self, total: int, start: float, stream=None):
        self.total, self.start, self.done = total, start, 0
        self.stream = stream or sys.stderr
        self.lock = threading.Lock()  # called from the compiling threads too

    def say(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f} s] {message}", file=self.stream,
              flush=True)

    def __call__(self, message: str) -> None:
        with self.lock:
            self.done += 1
            self.say(f"{message} ({self.done}/{self.total})")


@contextlib.contextmanager
def _progress(total: int, start: float, first: str,
              description: str = "inner solve and reference"
              ) -> Iterator[Callable[[str], None]]:
    """An ``on_step(message)`` hook: a rich progress bar when stderr is a terminal, else
    :class:`_LogLines`, whose first line is ``first`` (the work before the first step)."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        lines = _LogLines(total, start)
        lines.say(first)
        yield lines
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda message: bar.update(task, advance=1, description=message)


# --------------------------------------------------------------------------------------------
# compare-hvp: the options (derived from the engine's config) and the run


def _add_compare_hvp_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per field of :class:`bilevel.compare_hvp.CompareHvpConfig`, then ``--out``;
    the epilog says how budgets become solver settings and what the table's columns mean."""
    from bilevel import compare_hvp as engine

    parser.epilog = _compare_hvp_epilog()
    add_arguments(parser, engine.CompareHvpConfig)
    parser.add_argument("--out", type=out_dir, default="bilevel-compare-hvp", metavar="DIR",
                        help="folder for results.csv, results.json and results.png, checked "
                             "before any work (default: %(default)s)")


def _writable_folder(path) -> None:
    """Create ``path`` and check that a file can be written there (before minutes of work)."""
    import tempfile

    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
        pass


def _run_compare_hvp(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rich.console import Console

    from bilevel import compare_hvp as engine

    config = from_args(engine.CompareHvpConfig, args, parser=parser)
    try:  # first, before JAX loads: out_dir's checks cannot foresee every refusal (e.g. /proc)
        _writable_folder(args.out)
    except OSError as error:
        parser.error(f"argument --out: {str(args.out)!r} is not a writable folder: "
                     f"{error.strerror or error}")
    try:
        engine.check_config(config)
        problem = engine.build_problem(config)  # and check it against the solvers
    except engine.ConfigError as error:
        parser.error(str(error))
    start = time.perf_counter()
    first = (f"compare-hvp on {config.problem}, {len(engine.plan(config))} variants: inner "
             f"solve and float64 reference")
    with _progress(engine.num_stages(config), start, first) as on_step:
        setup = engine.prepare(config, problem)
        on_step(engine.reference_message(setup))
        rows, metadata = engine.compare_hvp(config, setup, on_step)
    metadata["wall_seconds"] = time.perf_counter() - start
    engine.write_csv(rows, args.out / "results.csv")
    engine.write_json(rows, metadata, args.out / "results.json")
    engine.plot(rows, metadata, args.out / "results.png")
    print_table(rows, metadata, Console())
    print(f"wrote {args.out}/results.csv, results.json, results.png "
          f"in {metadata['wall_seconds']:.1f} s")
    return 0


def _compare_hvp_epilog() -> str:
    from bilevel.compare_hvp import BUDGET_RULES

    return ("The reference is bilevel.hypergrad with hvp.Dense() in float64, undamped, at\n"
            "theta* from problem.solve_inner; the approximations solve (H + damping I) in\n"
            f"--dtype.\n\n{BUDGET_RULES}\n\nThe table's columns (times are medians after a "
            f"warm-up):\n{LEGEND}")


# --------------------------------------------------------------------------------------------
# bench-bilevel: the options and the run (the engine is bilevel.bench_bilevel_engine)


def _add_bench_bilevel_arguments(parser: argparse.ArgumentParser) -> None:
    """The study's options; names and groups come from :mod:`bilevel.bench_bilevel` (no JAX)."""
    from bilevel import bench_bilevel as bench
    from bilevel.argtypes import positive_float, positive_int

    def methods(text: str) -> tuple[str, ...]:
        try:
            return bench.parse_methods(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parser.epilog = bench.CLI_EPILOG
    parser.add_argument("--problem", choices=bench.PROBLEMS, default="quadratics",
                        help="quadratics (suboptimality), datacleaning (test accuracy) or logreg "
                             "(suboptimality) (default: %(default)s)")
    parser.add_argument("--methods", type=methods, default=tuple(bench.METHODS), metavar="LIST",
                        help="comma list of " + ", ".join(bench.METHODS) + "; or all, ours, "
                             "benchmark (default: all)")
    parser.add_argument("--time", type=positive_float, default=60.0, metavar="SECONDS",
                        help="wall-clock budget of each run (default: %(default)s)")
    parser.add_argument("--seeds", type=positive_int, default=5,
                        help="seeds per method, 1..N (default: %(default)s)")
    parser.add_argument("--out", type=out_dir, default="bilevel-bench-bilevel", metavar="DIR",
                        help="folder for the runs (JSON lines, resumed), tables and plot, checked "
                             "before any work (default: %(default)s)")
    parser.add_argument("--benchmark-dir", default=str(bench.DEFAULT_BENCHMARK_DIR), metavar="DIR",
                        help="benchmark_bilevel at commit " + bench.BENCHMARK_COMMIT[:7] +
                             " (for the benchopt-* methods) (default: %(default)s)")
    parser.add_argument("--export-from", default=None, metavar="GITDIR",
                        help="a git clone or mirror of benchmark_bilevel: export the pinned commit "
                             "into --benchmark-dir when it lacks it")
    parser.add_argument("--smoke", action="store_true",
                        help="small problem sizes, for a check that everything runs")


def _run_bench_bilevel(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pathlib import Path

    from bilevel import bench_bilevel as bench

    try:  # before JAX loads
        _writable_folder(args.out)
    except OSError as error:
        parser.error(f"argument --out: {str(args.out)!r} is not a writable folder: "
                     f"{error.strerror or error}")
    config = bench.StudyConfig(problem=args.problem, methods=args.methods, budget=args.time,
                               seeds=args.seeds, smoke=args.smoke,
                               benchmark_dir=args.benchmark_dir)
    needs_benchmark = any(bench.METHODS[m].side == "benchmark" for m in config.methods)
    try:
        if needs_benchmark and args.export_from:
            bench.export_benchmark(Path(args.benchmark_dir).expanduser(), Path(args.export_from))
        folder = bench.check_benchmark(Path(args.benchmark_dir)) if needs_benchmark else None
    except (bench.BenchError, OSError) as error:
        parser.error(str(error))
    from bilevel import bench_bilevel_engine as engine

    start = time.perf_counter()
    first = (f"bench-bilevel on {config.problem}: {len(config.methods)} methods x {config.seeds} "
             f"seeds x {config.budget:g} s")
    try:
        with _progress(bench.planned_runs(config), start, first,
                       "problem, then the first run") as on_run:
            runs, problem, info = engine.run_study(
                config, args.out, on_run,
                bench=bench.Benchmark(folder) if folder is not None else None)
    except bench.BenchError as error:
        parser.error(str(error))
    rows, summary, paths = engine.write_outputs(config, args.out, runs, problem, info)
    print(engine.markdown_table(rows, summary, problem.metric))  # Markdown: never wrapped
    print(f"wrote {', '.join(str(p) for p in paths)} in {time.perf_counter() - start:.1f} s")
    return 0


BUILTIN: dict[str, Command] = {
    "compare-hvp": Command(
        "compare inverse-HVP approximations inside the implicit hypergradient against a dense "
        "float64 reference", _add_compare_hvp_arguments, _run_compare_hvp),
    "bench-bilevel": Command(
        "our stochastic bilevel methods against benchopt's benchmark_bilevel solvers, side by "
        "side under one wall-clock budget", _add_bench_bilevel_arguments, _run_bench_bilevel),
}


# --------------------------------------------------------------------------------------------
# Registered commands


def _unavailable(name: str, where: str, reason: str) -> Command:
    """A plugin that failed to load: listed, and running it is a usage error saying why."""
    def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
        parser.error(f"command {name!r} ({where}) could not be loaded: {reason}")

    return Command(f"(unavailable: {reason})", lambda parser: None, run)


def _load(point) -> Command:
    try:
        module = point.load()
        return Command(module.HELP, module.add_arguments, module.run)
    except Exception as error:  # any failure: `bilevel --help` must still answer
        return _unavailable(point.name, point.value, f"{type(error).__name__}: {error}")


def registered_commands() -> dict[str, Command]:
    """The commands of the entry-point group :data:`ENTRY_POINT_GROUP`, by name (a name listed
    twice, e.g. by an editable install's two metadata folders, counts once)."""
    from importlib.metadata import entry_points

    commands: dict[str, Command] = {}
    for point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda p: p.name):
        if point.name not in commands and point.name not in BUILTIN:
            commands[point.name] = _load(point)
    return commands


# --------------------------------------------------------------------------------------------
# The parser and the entry point


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``bilevel`` parser. Only ``command`` (when it names one) gets its arguments added, so
    that ``bilevel --help`` loads no command's options."""
    parser = _Parser(prog="bilevel", description="Command line of the bilevel library.")
    parser.add_argument("--version", action="version", version=f"bilevel {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for name, entry in {**BUILTIN, **registered_commands()}.items():
        # Raw: the epilogs hold tables (compare-hvp's budget rules and legend).
        sub = commands.add_parser(name, help=entry.help, description=textwrap.fill(entry.help, 79),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == command:
            entry.add_arguments(sub)
        sub.set_defaults(_run=entry.run, _parser=sub)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv``: its first word that is not an option (the top level
    has only ``--help`` and ``--version``, which take no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bilevel`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return args._run(args, args._parser)
