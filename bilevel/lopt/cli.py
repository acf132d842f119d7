"""``bilevel lopt``: meta-train learned optimizers (``train``) and evaluate them (``eval``).

The top-level command line (:mod:`bilevel.cli`) finds this group by its module name; each
subcommand's options and work live beside the code they drive
(:mod:`bilevel.lopt.train`, :mod:`bilevel.lopt.evaluate`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

HELP = ("learned optimizers: meta-train them (train) and evaluate them against tuned baselines "
        "(eval)")

#: Subcommand → (module, help line). A module missing from this checkout is left out.
SUBCOMMANDS = {
    "train": ("bilevel.lopt.train",
              "meta-train a learned optimizer (mlp_lopt, star_lopt or velo_lopt)"),
    "eval": ("bilevel.lopt.evaluate", "evaluate learned optimizers against LR-tuned Adam, "
             "NAdamW and SGD-momentum: final losses, speed-ups, performance profile"),
}


def _modules() -> dict:
    found = {}
    for name, (module_name, _) in SUBCOMMANDS.items():
        try:
            found[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and module_name.startswith(error.name):
                continue
            raise
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` and ``eval`` subparsers (they inherit the parser's one-line errors)."""
    commands = parser.add_subparsers(title="commands", dest="lopt_command", metavar="COMMAND")
    for name, module in _modules().items():
        help_line = SUBCOMMANDS[name][1]
        sub = commands.add_parser(name, help=help_line, description=help_line)
        module.add_arguments(sub)
        sub.set_defaults(_lopt_run=module.run, _lopt_parser=sub)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Dispatch to the chosen subcommand; without one, print the group's help (status 2)."""
    if getattr(args, "_lopt_run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return args._lopt_run(args, args._lopt_parser)
