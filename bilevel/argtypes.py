"""argparse types shared by the command lines (public: semisup and the experiments use them): a
bad value becomes one ``error:`` line."""

from __future__ import annotations

import argparse
import copy
import math


def _parse(text: str, cast: type, what: str):
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _integer_at_least(text: str, minimum: int) -> int:
    value = _parse(text, int, "an integer")
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text!r}")
    return value


def _finite_number(text: str, strictly_positive: bool) -> float:
    value = _parse(text, float, "a number")
    if not (math.isfinite(value) and (value > 0 if strictly_positive else value >= 0)):
        bound = "> 0" if strictly_positive else ">= 0"
        raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _integer_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (a seed)."""
    return _integer_at_least(text, 0)


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    return _finite_number(text, strictly_positive=False)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _finite_number(text, strictly_positive=True)


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
