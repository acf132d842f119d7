"""Atomic checkpoints of a training :class:`~semisup.fixmatch.State` (``.npz`` of its leaves)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np


def save(path: str | Path, state: Any) -> None:
    """Write ``state``'s leaves to ``path`` atomically: a temporary file, then ``os.replace``,
    so a run killed while saving leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    leaves = jax.tree_util.tree_leaves(state)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as f:
        np.savez(f, **{f"leaf_{i:05d}": np.asarray(leaf) for i, leaf in enumerate(leaves)})
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _read_leaves(path: Path) -> list[np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return [archive[f"leaf_{i:05d}"] for i in range(len(archive.files))]
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 -- whatever broke it, it is not a checkpoint
        raise ValueError(f"semisup.checkpoint.load: {path} is not a checkpoint written by "
                         f"semisup.checkpoint.save ({type(error).__name__})") from None


def load(path: str | Path, template: Any) -> Any:
    """Read a checkpoint written by :func:`save` into the structure of ``template``.

    Raises:
      ValueError: the file is not a checkpoint (truncated, another format), or it does not match
        the template (another configuration wrote it).
    """
    leaves, treedef = jax.tree_util.tree_flatten(template)
    stored = _read_leaves(Path(path))
    if len(stored) != len(leaves) or any(a.shape != np.shape(b) for a, b in zip(stored, leaves,
                                                                             strict=True)):
        raise ValueError(f"semisup.checkpoint.load: {path} does not match this configuration "
                         f"({len(stored)} arrays stored, {len(leaves)} expected)")
    return jax.tree_util.tree_unflatten(
        treedef, [jax.numpy.asarray(a, dtype=np.asarray(b).dtype) for a, b in zip(stored, leaves,
                                                                               strict=True)])
