"""``bilevel ssl train`` and ``bilevel ssl eval``: one class-mismatch FixMatch run from the shell.

``train`` writes ``options.json`` and an atomic ``checkpoint.npz`` into ``--out`` every
``--checkpoint-every`` periods and resumes from them when run again with the same options;
``eval`` reloads the run and prints (and writes ``metrics.json``) its metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bilevel._argtypes import positive_int as _positive_int

HELP = "FixMatch with a meta-learned confidence network on a class-mismatch benchmark."

MODELS = {"mlp": ((), 64), "cnn": ((16, 32), 64)}
_DATA_OPTIONS = ("dataset", "data_dir", "ood", "ood_ratio", "design", "labels_per_class",
                 "validation_per_class", "unlabelled", "seed")




def _float_in(low: float, high: float, closed_low: bool = True):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not ((low <= value if closed_low else low < value) and value <= high):
            raise argparse.ArgumentTypeError(f"expected a number in {'[' if closed_low else '('}"
                                             f"{low}, {high}], got {text!r}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` and ``eval`` subcommands to ``parser``."""
    from semisup import fixmatch, protocol
    sub = parser.add_subparsers(title="subcommands", dest="ssl_command", metavar="SUBCOMMAND")
    train = sub.add_parser("train", help="train one run (resumes from --out if it holds one)",
                           description="Train one FixMatch run on a class-mismatch split.")
    train.add_argument("--out", required=True, help="folder for options, checkpoint, metrics")
    data = train.add_argument_group("data")
    data.add_argument("--dataset", default="digits",
                      choices=("digits", "mnist5k", "mnist", "fashion_mnist", "cifar10"))
    data.add_argument("--data-dir", default=None, help="folder with the standard data files")
    data.add_argument("--ood", default="near",
                      help="near, far, or a dataset name (cifar100, svhn, ...) read from "
                           "--data-dir")
    data.add_argument("--ood-ratio", type=_float_in(0.0, 10.0), default=1.0,
                      help="OOD per ID unlabelled image (add) or OOD share (swap)")
    data.add_argument("--design", choices=protocol.DESIGNS, default="add")
    data.add_argument("--labels-per-class", type=_positive_int, default=4)
    data.add_argument("--validation-per-class", type=_positive_int, default=10)
    data.add_argument("--unlabelled", type=_positive_int, default=300,
                      help="ID unlabelled images (add) or the pool size (swap)")
    data.add_argument("--seed", type=int, default=0)
    run = train.add_argument_group("training")
    run.add_argument("--method", choices=fixmatch.METHODS, default="confnet")
    run.add_argument("--model", choices=tuple(MODELS), default="mlp")
    run.add_argument("--steps", type=_positive_int, default=1000)
    run.add_argument("--batch-size", type=_positive_int, default=32)
    run.add_argument("--mu", type=_positive_int, default=4)
    run.add_argument("--threshold", type=_float_in(0.0, 1.0, closed_low=False), default=0.95)
    run.add_argument("--lambda-u", type=_float_in(0.0, 1e3), default=1.0)
    run.add_argument("--lr", type=_float_in(0.0, 10.0, closed_low=False), default=0.03)
    run.add_argument("--ema", type=_float_in(0.0, 0.9999999), default=0.99)
    run.add_argument("--flip", choices=("auto", "yes", "no"), default="auto",
                     help="flip in the augmentations (auto: only for CIFAR-10)")
    meta = train.add_argument_group("confidence network")
    meta.add_argument("--solver", choices=fixmatch.SOLVERS, default="cg")
    meta.add_argument("--solver-iters", type=_positive_int, default=10)
    meta.add_argument("--curvature", choices=fixmatch.CURVATURES, default="last")
    meta.add_argument("--damping", type=_float_in(0.0, 1e3), default=0.0)
    meta.add_argument("--meta-every", type=_positive_int, default=5)
    meta.add_argument("--meta-lr", type=_float_in(0.0, 10.0, closed_low=False), default=3e-3)
    meta.add_argument("--meta-optimizer", choices=fixmatch.META_OPTIMIZERS, default="adam",
                      help="the confidence network's optimizer (sgd steps by the raw "
                           "meta-gradient times --meta-lr)")
    meta.add_argument("--meta-weight-decay", type=_float_in(0.0, 1e6), default=0.0,
                      help="decoupled weight decay on the confidence network (pulls the weights "
                           "towards 1)")
    meta.add_argument("--conf-inputs", choices=fixmatch.CONF_INPUTS, default="image",
                      help="what the confidence network reads: the weak view, or also the "
                           "classifier's class probabilities of it")
    meta.add_argument("--meta-data", choices=fixmatch.META_DATA, default="validation",
                      help="the meta loss's data: the held-out validation set, or the labelled "
                           "training set (DS3L; the validation labels then join training)")
    train.add_argument("--checkpoint-every", type=_positive_int, default=20,
                       help="periods (of --meta-every steps) between checkpoints")
    train.add_argument("--stop-after", type=_positive_int, default=None,
                       help="stop (checkpointed) after this many periods in this invocation")
    evaluate = sub.add_parser("eval", help="evaluate a trained run",
                              description="Print and save the metrics of a run in --out.")
    evaluate.add_argument("--out", required=True, help="the folder `train` wrote")
    evaluate.add_argument("--data-dir", default=None,
                          help="override the data folder recorded by train")


def _config(options: dict):
    from semisup import fixmatch
    widths, hidden = MODELS[options["model"]]
    flip = {"yes": True, "no": False, "auto": options["dataset"] == "cifar10"}[options["flip"]]
    return fixmatch.Config(
        method=options["method"], steps=options["steps"], batch_size=options["batch_size"],
        mu=options["mu"], lambda_u=options["lambda_u"], threshold=options["threshold"],
        lr=options["lr"], ema=options["ema"], flip=flip, widths=widths, hidden=hidden,
        solver=options["solver"], solver_iters=options["solver_iters"],
        curvature=options["curvature"], damping=options["damping"],
        meta_every=options["meta_every"], meta_lr=options["meta_lr"],
        meta_optimizer=options.get("meta_optimizer", "adam"),
        meta_weight_decay=options.get("meta_weight_decay", 0.0),
        conf_inputs=options.get("conf_inputs", "image"),
        meta_data=options.get("meta_data", "validation"))


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
    out = Path(args.out)
    try:
        if args.ssl_command == "train":
            options = {k: v for k, v in vars(args).items()
                       if not k.startswith("_") and k not in ("ssl_command", "command", "out",
                                                              "stop_after")}
            config = _config(options)
            split = _split(options, config)
            return _train(parser, out, options, config, split, args.stop_after)
        options_path = out / "options.json"
        if not options_path.exists():
            return _fail(parser, f"{out} holds no run (no options.json); train one first")
        options = json.loads(options_path.read_text())
        if args.data_dir is not None:
            options["data_dir"] = args.data_dir
        config = _config(options)
        return _evaluate(out, options, config, _split(options, config))
    except (ValueError, FileNotFoundError, ImportError) as error:
        return _fail(parser, str(error))


def _train(parser, out: Path, options: dict, config, split, stop_after) -> int:
    import jax
    from rich.progress import Progress

    from semisup import checkpoint, fixmatch
    out.mkdir(parents=True, exist_ok=True)
    options_path, checkpoint_path = out / "options.json", out / "checkpoint.npz"
    if options_path.exists():
        stored = json.loads(options_path.read_text())
        changed = sorted(k for k in set(stored) | set(options)
                         if k != "checkpoint_every" and stored.get(k) != options.get(k))
        if changed:
            return _fail(parser, f"{out} holds a run with other options ({', '.join(changed)}); "
                                 f"use another --out")
    options_path.write_text(json.dumps(options, indent=2))
    state = fixmatch.init(config, jax.random.key(options["seed"]), split)
    if checkpoint_path.exists():
        state = checkpoint.load(checkpoint_path, state)
    done = int(state.step) // config.meta_every
    todo = config.periods - done
    if stop_after is not None:
        todo = min(todo, stop_after)
    with Progress() as progress:
        task = progress.add_task(f"{config.method} {options['dataset']}", total=config.periods,
                                 completed=done)
        count = [0]

        def after_period(new_state):
            count[0] += 1
            progress.advance(task)
            if count[0] % options["checkpoint_every"] == 0 or count[0] == todo:
                checkpoint.save(checkpoint_path, new_state)

        state, losses = fixmatch.run_periods(config, state, split, todo, after_period)
    if todo == 0:
        checkpoint.save(checkpoint_path, state)
    print(f"trained to step {int(state.step)} of {config.steps}"
          + (f"; last loss {float(losses[-1]):.4f}" if len(losses) else "")
          + f"; checkpoint {checkpoint_path}")
    return 0


def _evaluate(out: Path, options: dict, config, split) -> int:
    import jax

    from semisup import checkpoint, fixmatch, metrics
    checkpoint_path = out / "checkpoint.npz"
    if not checkpoint_path.exists():
        raise FileNotFoundError(f"{out} holds no checkpoint.npz; train first")
    state = checkpoint.load(checkpoint_path, fixmatch.init(config, jax.random.key(0), split))
    result = {"step": int(state.step), "steps": config.steps,
              **metrics.evaluate(config, state, split)}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float)
              else f"{key:<{width}}  {value}")
    return 0
