"""Helpers shared by the hypergradient modules: validation, failure handling, pytree splits."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from hvp import checks as _checks

PyTree = Any
ON_FAILURE = _checks.ON_FAILURE
check_on_failure = _checks.check_on_failure
report_failure = _checks.report_failure


def check_hparams(where: str, hparams: PyTree) -> None:
    _checks.check_floating(where, "hparams", hparams)


def check_signature(where: str, fun: Callable, name: str, args_name: str,
                    args: tuple) -> None:
    """Raise, naming ``args_name``, unless ``fun(params, hparams, *args)`` fits ``fun``'s signature.

    Without this a loss that forgot an argument fails deep inside tracing with a bare
    ``TypeError: <lambda>() takes 3 positional arguments but 4 were given``.
    """
    if not callable(fun):
        raise TypeError(f"{where}: {name} must be callable, got {type(fun).__name__}")
    try:
        signature = inspect.signature(fun)
    except (TypeError, ValueError):  # builtins and some C callables: nothing to check
        return
    try:
        signature.bind(None, None, *args)
    except TypeError as error:
        raise TypeError(
            f"{where}: {name} is called as {name}(params, hparams, *{args_name}) with "
            f"{len(args)} {args_name} (2 + {len(args)} positional arguments), but its signature "
            f"is {name}{signature}: {error}. Make {args_name} match the arguments {name} takes "
            f"after params and hparams") from None


def check_losses(where: str, inner_loss: Callable | None, outer_loss: Callable | None,
                 params: PyTree, hparams: PyTree, inner_args: tuple, outer_args: tuple) -> None:
    _checks.check_floating(where, "params", params)
    check_hparams(where, hparams)
    if inner_loss is not None:
        check_signature(where, inner_loss, "inner_loss", "inner_args", inner_args)
        _checks.check_scalar_output(where, inner_loss, params, hparams, *inner_args,
                                    name="inner_loss")
    if outer_loss is not None:
        check_signature(where, outer_loss, "outer_loss", "outer_args", outer_args)
        _checks.check_scalar_output(where, outer_loss, params, hparams, *outer_args,
                                    name="outer_loss")


def inputs_finite(*trees: PyTree) -> jax.Array:
    """Whether every floating leaf of ``trees`` is finite (integer leaves are skipped)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(trees)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def tree_all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def tree_norm(tree: PyTree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.abs(x) ** 2) for x in jax.tree_util.tree_leaves(tree)))


def is_differentiable(leaf: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def zeros_cotangent(tree: PyTree) -> PyTree:
    """Zero cotangents for a pytree, ``None`` for non-differentiable (integer) leaves."""
    return jax.tree_util.tree_map(
        lambda x: jnp.zeros_like(x) if is_differentiable(x) else None, tree)
