"""The names ``bilevel ssl``'s options choose from, and its help formatter, importable without
JAX (``bilevel ssl --help`` reads them; :mod:`semisup.fixmatch` imports JAX and flax).

The tuples equal :mod:`semisup.fixmatch`'s and :mod:`semisup.protocol`'s of the same names
(a test checks it). ``--solver`` has no such tuple: its names are :data:`hvp.SOLVERS`' (see
:data:`semisup.fixmatch.SOLVERS`), which needs JAX, so the command checks it after parsing.
"""

from __future__ import annotations

import argparse
import copy

METHODS = ("supervised", "fixmatch", "oracle", "softmax", "l2rw", "confnet")
CURVATURES = ("last", "all")
CONF_INPUTS = ("image", "image+softmax")
META_OPTIMIZERS = ("adam", "sgd")
META_DATA = ("validation", "labelled")
DESIGNS = ("add", "swap")
#: ``--dataset``: the in-distribution sets ``bilevel ssl train`` accepts.
DATASETS = ("digits", "mnist5k", "mnist", "fashion_mnist", "cifar10")
#: ``--model`` -> (convolution widths, hidden width) of :class:`semisup.models.Body`.
MODELS = {"mlp": ((), 64), "cnn": ((16, 32), 64)}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default unless it already says it; descriptions keep
    their paragraphs."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" in text or "(default:" in text or action.required
                or action.default is argparse.SUPPRESS):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)".strip()
        return text

    def _expand_help(self, action: argparse.Action) -> str:
        if isinstance(action.default, tuple):
            action = copy.copy(action)
            action.default = ",".join(map(str, action.default))
        return super()._expand_help(action)
