"""``bilevel ssl train`` and ``bilevel ssl eval``: one class-mismatch FixMatch run from the shell.

``train`` writes ``options.json`` and an atomic ``checkpoint.npz`` into ``--out`` every
``--checkpoint-every`` periods and follows the run-folder rule (:data:`RESUME_RULE`): run again
with the same options it resumes, a finished run is left untouched, other options are refused
unless ``--overwrite``. ``eval`` reloads the run and prints (and writes ``metrics.json``) its
metrics.

The training options are derived from :class:`semisup.Config`'s fields
(:func:`bilevel.config.add_arguments`: each field's rule, help and default declared once, in
:mod:`semisup.options`), with this command's own defaults (:data:`TRAIN_DEFAULTS`); ``--model``
sets the fields ``widths`` and ``hidden``, ``--flip`` the field ``flip``. Declaring the options
imports no JAX (the choices come from :mod:`semisup.options`, the methods from the registry
:data:`semisup.WEIGHTINGS`), so ``--help`` answers at once; :func:`run` imports the modules that
do the work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bilevel.argtypes import out_dir
from bilevel.argtypes import positive_int as _positive_int
from bilevel.config import Float, from_args
from bilevel.config import add_arguments as add_config_arguments
from semisup import options as choices
from semisup.options import Config

HELP = "FixMatch with a meta-learned confidence network on a class-mismatch benchmark."

MODELS = choices.MODELS
SOLVER_NAMES = choices.SOLVER_NAMES
#: ``train``'s defaults where they differ from :class:`semisup.Config`'s (a small, quick run
#: of the meta-learned confidence network).
TRAIN_DEFAULTS = {"method": "confnet", "batch_size": 32, "mu": 4, "ema": 0.99, "meta_lr": 3e-3}
#: ``--meta-lr`` is capped on the command line only (SGD's meta-gradient scale may need more:
#: see :class:`semisup.Config`).
_CLI_RULES = {"meta_lr": {"rule": Float(gt=0, le=10)}}
#: The :class:`semisup.Config` fields of each group of ``train``'s options, in help order.
_TRAINING_FIELDS = ("method", "steps", "batch_size", "mu", "threshold", "lambda_u", "lr", "ema")
_META_FIELDS = ("solver", "maxiter", "curvature", "damping", "meta_every", "meta_start",
                "meta_lr", "meta_optimizer", "meta_weight_decay", "conf_inputs", "meta_data",
                "weight_norm")
#: Run options an earlier version did not store, with the value its runs had.
_LATER_OPTIONS = {"meta_optimizer": "adam", "meta_weight_decay": 0.0, "conf_inputs": "image",
                  "meta_data": "validation", "weight_norm": "mask", "meta_start": 0}
#: The options that say which data a run reads (``eval`` rebuilds its split from them).
_DATA_OPTIONS = ("dataset", "data_dir", "ood", "ood_ratio", "design", "labels_per_class",
                 "validation_per_class", "unlabelled", "seed")
#: Arguments that are not options of the run (so not stored in, nor compared with, options.json).
_NOT_RUN_OPTIONS = ("ssl_command", "command", "out", "stop_after", "overwrite")
#: Stored options that may differ on a resumed run.
_FREE_OPTIONS = ("checkpoint_every",)
#: What ``train`` writes into --out.
_RUN_FILES = ("options.json", "checkpoint.npz", "metrics.json")
#: Old name -> name of the options an earlier version stored in options.json (read as new).
_RENAMED_OPTIONS = {"solver_iters": "maxiter"}

RESUME_RULE = """\
Run folders (--out): running the same command again on an --out that holds an unfinished
run resumes it from its last checkpoint (it prints where from) and ends bit-identical to
an uninterrupted run; a finished run is reported and left untouched (exit 0); a run made
with other options is refused with the options that differ (exit 2). --overwrite deletes
the run in --out and starts afresh; nothing is overwritten without it. Ctrl-C saves a
checkpoint first."""

TRAIN_DESCRIPTION = f"""\
Train one FixMatch run on a class-mismatch split; --out receives options.json and
checkpoint.npz.

{RESUME_RULE}"""

EVAL_DESCRIPTION = """\
Print the metrics of the run in --out (a folder `bilevel ssl train` wrote) and save them
to --out/metrics.json."""


def run_folder(text: str) -> Path:
    """An argparse type: a folder ``bilevel ssl train`` wrote, which eval may write into."""
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no folder {text!r} (expected the --out of "
                                         f"bilevel ssl train)")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file; expected the folder "
                                         f"bilevel ssl train wrote")
    if not (path / "options.json").is_file():
        raise argparse.ArgumentTypeError(f"{text!r} holds no run (no options.json); train one "
                                         f"first")
    if not os.access(path, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"folder {text!r} is not writable (eval writes "
                                         f"metrics.json there)")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` and ``eval`` subcommands to ``parser``."""
    sub = parser.add_subparsers(title="subcommands", dest="ssl_command", metavar="SUBCOMMAND")
    train = sub.add_parser("train", help="train one run (a rerun resumes it)",
                           description=TRAIN_DESCRIPTION, formatter_class=choices.HelpFormatter)
    _add_train_arguments(train)
    train.set_defaults(_ssl_parser=train)
    evaluate = sub.add_parser("eval", help="evaluate a trained run",
                              description=EVAL_DESCRIPTION,
                              formatter_class=choices.HelpFormatter)
    evaluate.add_argument("--out", required=True, type=run_folder,
                          help="the folder `train` wrote")
    evaluate.add_argument("--data-dir", default=None,
                          help="override the data folder recorded by train (default: the "
                               "recorded one)")
    evaluate.set_defaults(_ssl_parser=evaluate)


def _add_train_arguments(train: argparse.ArgumentParser) -> None:
    train.add_argument("--out", required=True, type=out_dir,
                       help="run folder for options, checkpoint, metrics")
    train.add_argument("--overwrite", action="store_true",
                       help="delete the run in --out and start afresh")
    _add_data_arguments(train.add_argument_group("data"))
    _add_training_arguments(train.add_argument_group("training"))
    _add_meta_arguments(train.add_argument_group("confidence network"))
    train.add_argument("--checkpoint-every", type=_positive_int, default=20,
                       help="periods (of --meta-every steps) between checkpoints")
    train.add_argument("--stop-after", type=_positive_int, default=None,
                       help="stop (checkpointed) after this many periods in this invocation "
                            "(default: run to --steps)")


def _add_data_arguments(data) -> None:
    data.add_argument("--dataset", default="digits", choices=choices.DATASETS,
                      help="in-distribution dataset")
    data.add_argument("--data-dir", default=None,
                      help="folder with the standard data files (default: none; digits and "
                           "mnist5k need none, nor does fashion_mnist where Debian's "
                           "dataset-fashion-mnist package is installed: "
                           "bilevel.datasets.SYSTEM_FOLDERS)")
    data.add_argument("--ood", default="near",
                      help="near, far, or a dataset name (cifar100, svhn, ...) read from "
                           "--data-dir")
    data.add_argument("--ood-ratio", type=Float(ge=0, le=10), default=1.0,
                      help="OOD per ID unlabelled image (add) or OOD share (swap)")
    data.add_argument("--design", choices=choices.DESIGNS, default="add",
                      help="add OOD images to the ID pool, or swap them in at a fixed size")
    _add_counts(data, (
        ("--labels-per-class", 4, "labelled training images per ID class"),
        ("--validation-per-class", 10, "labelled validation images per ID class"),
        ("--unlabelled", 300, "ID unlabelled images (add) or the pool size (swap)")))
    data.add_argument("--seed", type=int, default=0, help="seed of the split and the run")


def _add_training_arguments(run) -> None:
    """The :class:`semisup.Config` options of :data:`_TRAINING_FIELDS`, then ``--model`` and
    ``--flip`` (which set the fields ``widths``/``hidden`` and ``flip``)."""
    _add_config_options(run, _TRAINING_FIELDS)
    run.add_argument("--model", choices=tuple(MODELS), default="mlp", help="the classifier")
    run.add_argument("--flip", choices=("auto", "yes", "no"), default="auto",
                     help="flip in the augmentations (auto: only for CIFAR-10)")


def _add_counts(group, counts) -> None:
    """Options that are counts (integers >= 1), each ``(flag, default, help)``."""
    for flag, default, text in counts:
        group.add_argument(flag, type=_positive_int, default=default, help=text)


def _add_meta_arguments(meta) -> None:
    """The :class:`semisup.Config` options of :data:`_META_FIELDS`; ``--maxiter`` is also
    ``--solver-iters``, its old name."""
    _add_config_options(meta, _META_FIELDS)


def _add_config_options(group, fields) -> None:
    add_config_arguments(group, Config, only=fields,
                         defaults={k: v for k, v in TRAIN_DEFAULTS.items() if k in fields},
                         changes={k: v for k, v in _CLI_RULES.items() if k in fields})


def _config(options: dict):
    """The :class:`semisup.Config` of the run options ``options`` (a parsed command line, or an
    options.json; options added later default to what earlier runs had).

    Raises:
      ValueError: the solver is not one semisup can use, or a field breaks its rule.
      KeyError: ``options`` lacks a run option.
    """
    from semisup import solvers
    if options["solver"] not in solvers.SOLVERS:  # checked here: the names need JAX
        raise ValueError(f"argument --solver: unknown solver {options['solver']!r}; choose from "
                         f"{', '.join(solvers.SOLVERS)} ({SOLVER_NAMES})")
    options = {**_LATER_OPTIONS, **options}
    missing = [name for name in _TRAINING_FIELDS + _META_FIELDS if name not in options]
    if missing:
        raise KeyError(missing[0])
    widths, hidden = MODELS[options["model"]]
    flip = {"yes": True, "no": False, "auto": options["dataset"] == "cifar10"}[options["flip"]]
    return from_args(Config, argparse.Namespace(**options), widths=widths, hidden=hidden,
                     flip=flip)


def _split(options: dict, config):
    from bilevel import datasets
    from semisup import protocol
    dataset = datasets.load(options["dataset"], options["data_dir"])
    ood, other = options["ood"], None
    if ood not in ("near", "far"):
        other, ood = datasets.load(ood, options["data_dir"]), "other"
    split = protocol.make_split(
        dataset, labelled_per_class=options["labels_per_class"],
        validation_per_class=options["validation_per_class"], num_unlabelled=options["unlabelled"],
        ood_ratio=options["ood_ratio"], ood=ood, design=options["design"], ood_dataset=other,
        seed=options["seed"])
    # Equal label budgets: a method with no use for the validation set trains on it.
    return split if config.uses_validation else protocol.merge_validation(split)


def _fail(parser, message: str) -> int:
    parser.exit(2, f"{parser.prog}: error: {message}\n")
    return 2


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``bilevel ssl train`` or ``bilevel ssl eval``; returns the exit status."""
    if getattr(args, "ssl_command", None) is None:
        parser.print_help(sys.stderr)
        return 2
    parser = getattr(args, "_ssl_parser", parser)  # errors name the subcommand
    try:
        if args.ssl_command == "train":
            return _run_train(args, parser)
        return _run_eval(args, parser)
    except (ValueError, OSError, ImportError) as error:
        return _fail(parser, str(error))


# --------------------------------------------------------------------------------------------
# train: the run-folder rule, then the training loop.


def run_options(args: argparse.Namespace) -> dict:
    """The options that define the run (what options.json stores)."""
    return {k: v for k, v in vars(args).items()
            if not k.startswith("_") and k not in _NOT_RUN_OPTIONS}


def changed_options(stored: dict, requested: dict) -> list[str]:
    """``"--seed 0 there, 3 here"`` for each run option that differs."""
    return [f"--{k.replace('_', '-')} {stored.get(k)} there, {requested.get(k)} here"
            for k in sorted(set(stored) | set(requested))
            if k not in _FREE_OPTIONS and stored.get(k) != requested.get(k)]


def _read_options(path: Path) -> dict:
    try:
        stored = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        stored = None
    if not isinstance(stored, dict):
        raise ValueError(f"--out: {path} is not the options.json of bilevel ssl train")
    return {_RENAMED_OPTIONS.get(k, k): v for k, v in stored.items()}


def _remove_run(out: Path) -> list[str]:
    removed = []
    for name in _RUN_FILES + ("checkpoint.npz.tmp",):
        if (out / name).is_file():
            (out / name).unlink()
            removed.append(name)
    return removed


def check_run_folder(out: Path, options: dict) -> bool:
    """Whether ``out`` holds a run of these ``options`` to resume (``False``: none, start afresh).

    Raises:
      ValueError: ``out`` holds another run, or files of a run without its options.json.
    """
    refuse = "; use --overwrite to start afresh, or another --out"
    if not (out / "options.json").exists():
        found = [name for name in _RUN_FILES if (out / name).exists()]
        if found:
            raise ValueError(f"--out {out} holds {', '.join(found)} but no options.json{refuse}")
        return False
    try:
        stored = _read_options(out / "options.json")
    except ValueError as error:
        raise ValueError(f"{error}{refuse}") from None
    changed = changed_options(stored, options)
    if changed:
        raise ValueError(f"--out {out} holds a run with other options ({'; '.join(changed)})"
                         f"{refuse}")
    return True


def _run_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import jax

    from semisup import checkpoint, fixmatch
    out: Path = args.out
    options = run_options(args)
    config = _config(options)
    if not args.overwrite:
        check_run_folder(out, options)
    split = _split(options, config)
    if args.overwrite:  # the old run goes only once the new one can start
        removed = _remove_run(out)
        if removed:
            print(f"--overwrite: removed {', '.join(removed)} from {out}; starting afresh")
    state = fixmatch.init(config, jax.random.key(options["seed"]), split)
    checkpoint_path = out / "checkpoint.npz"
    if checkpoint_path.exists():
        try:
            state = checkpoint.load(checkpoint_path, state)
        except ValueError as error:
            raise ValueError(f"--out: {error}; use --overwrite to start afresh, or another "
                             f"--out") from None
        step = int(state.step)
        if step >= config.steps:
            print(f"{out} holds a finished run (step {step} of {config.steps}); left "
                  f"untouched (--overwrite trains it afresh)")
            return 0
        print(f"resuming from step {step} of {config.steps} ({checkpoint_path})")
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "options.json", json.dumps(options, indent=2))
    return _train(out, options, config, split, state, args.stop_after)


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _train(out: Path, options: dict, config, split, state, stop_after) -> int:
    from rich.progress import Progress

    from semisup import checkpoint, fixmatch
    checkpoint_path = out / "checkpoint.npz"
    done = int(state.step) // config.meta_every
    todo = config.periods - done
    if stop_after is not None:
        todo = min(todo, stop_after)
    count, last = [0], [state]

    def after_period(new_state):
        count[0] += 1
        last[0] = new_state
        progress.advance(task)
        if count[0] % options["checkpoint_every"] == 0 or count[0] == todo:
            checkpoint.save(checkpoint_path, new_state)

    try:
        with Progress() as progress:
            task = progress.add_task(f"{config.method} {options['dataset']}",
                                     total=config.periods, completed=done)
            state, losses = fixmatch.run_periods(config, state, split, todo, after_period)
    except KeyboardInterrupt:
        checkpoint.save(checkpoint_path, last[0])
        print(f"interrupted at step {int(last[0].step)} of {config.steps}; saved "
              f"{checkpoint_path}; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"trained to step {int(state.step)} of {config.steps}"
          + (f"; last loss {float(losses[-1]):.4f}" if len(losses) else "")
          + f"; checkpoint {checkpoint_path}")
    return 0


# --------------------------------------------------------------------------------------------
# eval


def _run_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    out: Path = args.out
    options = _read_options(out / "options.json")
    if args.data_dir is not None:
        options["data_dir"] = args.data_dir
    try:
        config = _config(options)
        split = _split(options, config)
    except KeyError as error:
        raise ValueError(f"--out: {out / 'options.json'} lacks the option {error}; is it from "
                         f"bilevel ssl train?") from None
    return _evaluate(out, options, config, split)


def _evaluate(out: Path, options: dict, config, split) -> int:
    import jax

    from semisup import checkpoint, fixmatch, metrics
    checkpoint_path = out / "checkpoint.npz"
    if not checkpoint_path.exists():
        raise FileNotFoundError(f"--out {out} holds no checkpoint.npz; train first")
    state = checkpoint.load(checkpoint_path, fixmatch.init(config, jax.random.key(0), split))
    result = {"step": int(state.step), "steps": config.steps,
              **metrics.evaluate(config, state, split)}
    _write_atomic(out / "metrics.json", json.dumps(result, indent=2))
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float)
              else f"{key:<{width}}  {value}")
    return 0
