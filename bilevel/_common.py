"""Helpers shared by the hypergradient modules: validation, failure handling, pytree splits."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from hvp import _checks

PyTree = Any
ON_FAILURE = ("ignore", "warn", "raise")


def check_on_failure(where: str, on_failure: str) -> None:
    if on_failure not in ON_FAILURE:
        raise ValueError(f"{where}: on_failure must be one of {ON_FAILURE}, got {on_failure!r}")


def check_hparams(where: str, hparams: PyTree) -> None:
    _checks.check_floating(where, "hparams", hparams)


def check_losses(where: str, inner_loss: Callable | None, outer_loss: Callable | None,
                 params: PyTree, hparams: PyTree, inner_args: tuple, outer_args: tuple) -> None:
    _checks.check_floating(where, "params", params)
    check_hparams(where, hparams)
    if inner_loss is not None:
        _checks.check_scalar_output(where, inner_loss, params, hparams, *inner_args,
                                    name="inner_loss")
    if outer_loss is not None:
        _checks.check_scalar_output(where, outer_loss, params, hparams, *outer_args,
                                    name="outer_loss")


def tree_all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def tree_norm(tree: PyTree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.abs(x) ** 2) for x in jax.tree_util.tree_leaves(tree)))


def report_failure(where: str, failed: jax.Array, describe: Callable[..., str],
                   values: tuple, on_failure: str) -> None:
    """Warn or raise when ``failed``; works eagerly and, through a callback, under ``jit``.

    ``describe(*values)`` builds the message from concrete values on the host.
    """
    if on_failure == "ignore":
        return

    def act(failed, *values):
        if bool(jnp.any(failed)):
            message = f"{where}: {describe(*values)}"
            if on_failure == "raise":
                raise FloatingPointError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    try:
        concrete = bool(jnp.any(failed))
    except jax.errors.ConcretizationTypeError:
        jax.debug.callback(act, failed, *values)
        return
    if concrete:
        act(failed, *values)


def is_differentiable(leaf: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def zeros_cotangent(tree: PyTree) -> PyTree:
    """Zero cotangents for a pytree, ``None`` for non-differentiable (integer) leaves."""
    return jax.tree_util.tree_map(
        lambda x: jnp.zeros_like(x) if is_differentiable(x) else None, tree)
