"""Checkpoints of a training :class:`~semisup.fixmatch.State`: :mod:`bilevel.checkpoint` files
(one atomic ``.npz``, checked against a template on load, no pickle) marked as semisup's.

bilevel 0.1.0's semisup wrote bare ``.npz`` files of the state's leaves; :func:`load` still
reads those, checking them against the template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bilevel import checkpoint

_WRITER = "semisup"


def save(path: str | Path, state: Any) -> None:
    """Write ``state`` to ``path`` atomically (:func:`bilevel.checkpoint.save`): a run killed
    while saving leaves the previous checkpoint intact."""
    checkpoint.save(path, state, {"writer": _WRITER})


def load(path: str | Path, template: Any) -> Any:
    """Read a checkpoint written by :func:`save` into the structure of ``template``.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: the file is not a checkpoint of semisup (truncated, another format, another
        program's), or it does not match the template (another configuration wrote it); the
        message says which leaf differs or why the file is not one.
    """
    try:
        try:
            writer = checkpoint.read_metadata(path).get("writer")
        except checkpoint.NoHeaderError:
            return checkpoint.load_legacy(path, like=template)[0]
        if writer != _WRITER:
            raise checkpoint.CheckpointError(path, f"it was written by {writer!r}")
        return checkpoint.load(path, like=template)[0]
    except checkpoint.MismatchError as error:
        raise ValueError(f"semisup.checkpoint.load: {path} does not match this configuration "
                         f"({error.reason})") from None
    except checkpoint.CheckpointError as error:
        raise ValueError(f"semisup.checkpoint.load: {path} is not a checkpoint written by "
                         f"semisup.checkpoint.save ({error.reason})") from None
