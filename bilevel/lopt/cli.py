"""``bilevel lopt``: meta-train learned optimizers (``train``) and evaluate them (``eval``).

The top-level command line (:mod:`bilevel.cli`) finds this group by its module name. The
options are declared in :mod:`bilevel.lopt.options`, which imports no JAX, so ``--help``
answers at once; the module that does the work (:mod:`bilevel.lopt.train`,
:mod:`bilevel.lopt.evaluate`) is imported by :func:`run`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import NamedTuple

from bilevel.lopt import options

HELP = ("learned optimizers: meta-train them (train) and evaluate them against tuned baselines "
        "(eval)")


class Subcommand(NamedTuple):
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    module: str  # defines run(args, parser) -> exit status


SUBCOMMANDS = {
    "train": Subcommand("meta-train a learned optimizer (mlp_lopt, star_lopt or velo_lopt)",
                        options.TRAIN_DESCRIPTION, options.add_train_arguments,
                        "bilevel.lopt.train"),
    "eval": Subcommand("evaluate learned optimizers against LR-tuned Adam, NAdamW and "
                       "SGD-momentum: final losses, speed-ups, performance profile",
                       options.EVAL_DESCRIPTION, options.add_eval_arguments,
                       "bilevel.lopt.evaluate"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` and ``eval`` subparsers (they inherit the parser's one-line errors)."""
    commands = parser.add_subparsers(title="commands", dest="lopt_command", metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.description,
                                  formatter_class=options.HelpFormatter)
        command.add_arguments(sub)
        sub.set_defaults(_lopt_module=command.module, _lopt_parser=sub)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Dispatch to the chosen subcommand; without one, print the group's help (status 2)."""
    if getattr(args, "_lopt_module", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return importlib.import_module(_module(args)).run(args, args._lopt_parser)


def _module(args: argparse.Namespace) -> str:
    """The module that runs the subcommand: VeLO's meta-training has its own trainer."""
    if args._lopt_module == "bilevel.lopt.train" and args.optimizer == "velo":
        return "bilevel.lopt.velo_train"
    return args._lopt_module
