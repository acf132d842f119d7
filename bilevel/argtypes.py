"""argparse types shared by the command lines (public: semisup and the experiments use them): a
bad value becomes one ``error:`` line. The number types are :mod:`bilevel.config` rules, so an
option and a config field say a rule the same way."""

from __future__ import annotations

import argparse
import copy

from bilevel.config import Float, Int

#: An integer >= 1 (a count): ``must be an integer >= 1, got '0'``.
positive_int = Int(min=1)
#: An integer >= 0 (a seed).
nonnegative_int = Int(min=0)
#: A finite number >= 0.
nonnegative_float = Float(ge=0)
#: A finite number > 0.
positive_float = Float(gt=0)


def out_dir(text: str):
    """A folder the command may write into: an existing writable folder, or a new one whose
    nearest existing ancestor is a writable folder. Checked before any work starts."""
    import os
    from pathlib import Path

    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is an existing file; expected a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"folder {text!r} is not writable")
        return path
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {text!r}: {str(ancestor)!r} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot create {text!r}: {str(ancestor)!r} is not "
                                         f"writable")
    return path


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                            argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (tuples written as the comma lists the options
    take), unless the help already says it; descriptions keep their paragraphs."""

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
            action.default = ",".join(f"{v:g}" if isinstance(v, float) else str(v)
                                      for v in action.default)
        return super()._expand_help(action)
