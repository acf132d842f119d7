"""Trace-time validation shared by the public functions.

Every check runs on shapes and dtypes only (``jax.eval_shape``), so a bad call fails while
tracing with a message naming the function, the argument, what was found and what was expected.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("fwd_rev", "rev_rev", "rev_fwd")


def _paths(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(path) or "<root>" for path, _ in
            jax.tree_util.tree_flatten_with_path(tree)[0]]


def _describe(tree: Any) -> str:
    paths = _paths(tree)
    return "{" + ", ".join(paths) + "}"


def check_mode(where: str, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"{where}: mode must be one of {MODES}, got {mode!r}")


def check_floating(where: str, name: str, tree: Any) -> None:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if not leaves:
        raise ValueError(f"{where}: {name} is an empty pytree; expected at least one array")
    for path, leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            key = jax.tree_util.keystr(path) or "<root>"
            raise TypeError(
                f"{where}: {name} leaf {key} has dtype {dtype}; expected a floating-point dtype"
            )


def check_same_structure(where: str, name: str, tree: Any, ref_name: str, ref: Any,
                         dtypes: bool = False) -> None:
    """Raise unless ``tree`` has the structure and leaf shapes (and, if asked, dtypes) of ``ref``.
    """
    if jax.tree_util.tree_structure(tree) != jax.tree_util.tree_structure(ref):
        raise ValueError(
            f"{where}: {name} has structure {_describe(tree)}, {ref_name} has {_describe(ref)}"
        )
    for path, leaf, ref_leaf in zip(
        _paths(tree), jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(ref), strict=True
    ):
        if np.shape(leaf) != np.shape(ref_leaf):
            raise ValueError(
                f"{where}: {name} leaf {path} has shape {np.shape(leaf)}, "
                f"{ref_name} leaf has shape {np.shape(ref_leaf)}"
            )
        if dtypes and jnp.result_type(leaf) != jnp.result_type(ref_leaf):
            raise TypeError(
                f"{where}: {name} leaf {path} has dtype {jnp.result_type(leaf)}, "
                f"{ref_name} leaf has dtype {jnp.result_type(ref_leaf)}; cast one to match"
            )


def check_scalar_output(where: str, fun: Any, *args: Any, name: str = "fun") -> None:
    """Raise unless ``fun(*args)`` returns a real floating scalar (checked abstractly)."""
    out = jax.eval_shape(fun, *args)
    leaves = jax.tree_util.tree_leaves(out)
    if len(leaves) != 1 or jax.tree_util.tree_structure(out).num_nodes != 1:
        raise TypeError(f"{where}: {name} must return a scalar array, got a pytree {out}")
    if out.shape != ():
        raise TypeError(f"{where}: {name} must return a scalar, got an array of shape {out.shape}")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"{where}: {name} must return a floating-point scalar, got {out.dtype}")


def concrete_value(x: Any) -> float | None:
    """The Python value of ``x`` if it is known at trace time, else None."""
    try:
        return float(x)
    except (jax.errors.ConcretizationTypeError, TypeError):
        return None


def check_nonnegative(where: str, name: str, value: Any) -> None:
    concrete = concrete_value(value)
    if concrete is not None and not concrete >= 0.0:
        raise ValueError(f"{where}: {name} must be >= 0, got {concrete}")
