"""Argument checks and failure reporting, public for libraries built on :mod:`hvp`.

Every check runs on shapes and dtypes only (``jax.eval_shape``), so a bad call fails while
tracing with a message naming the function, the argument, what was found and what was expected.
:func:`report_failure` is how every solve and hypergradient honours ``on_failure``: a
:class:`SolveWarning` attributed to the user's calling line, or a :class:`SolveError`.
:func:`accepts_renamed` and :func:`renamed_attribute` keep a renamed argument or attribute
working under its old name, with a ``DeprecationWarning`` attributed the same way.
"""

from __future__ import annotations

import collections
import functools
import inspect
import math
import sys
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("fwd_rev", "rev_rev", "rev_fwd")


def leaf_paths(tree: Any) -> list[str]:
    """Each leaf's path as ``jax.tree_util.keystr`` writes it (``<root>`` for a bare leaf)."""
    return [jax.tree_util.keystr(path) or "<root>" for path, _ in
            jax.tree_util.tree_flatten_with_path(tree)[0]]


def describe_structure(tree: Any) -> str:
    """The leaf paths of ``tree`` as ``{['a'], ['b']}``, for messages."""
    paths = leaf_paths(tree)
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
            f"{where}: {name} has structure {describe_structure(tree)}, {ref_name} has "
            f"{describe_structure(ref)}"
        )
    for path, leaf, ref_leaf in zip(leaf_paths(tree), jax.tree_util.tree_leaves(tree),
                                    jax.tree_util.tree_leaves(ref), strict=True):
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
    """Raise unless ``value`` is a real scalar (possibly traced) that is >= 0 where known."""
    real_scalar(where, name, value, minimum=0.0)


# --------------------------------------------------------------------------------------------
# Failure reporting: one vocabulary and one exception type for every solve and hypergradient.

#: What a function does when its solve fails: warn (the default), raise :class:`SolveError`,
#: or leave it to ``info`` alone.
ON_FAILURE = ("warn", "raise", "ignore")

#: Top-level packages whose frames are skipped when a warning is attributed to user code.
_LIBRARY_PACKAGES = frozenset({"hvp", "bilevel", "semisup", "jax", "jaxlib", "flax", "functools",
                               "contextlib", "equinox", "optax"})


class SolveError(RuntimeError, FloatingPointError):
    """A solve or hypergradient failed and ``on_failure="raise"`` was asked for.

    Its message names the function that was called and carries the solve's status, iterations
    and residual. It subclasses ``RuntimeError`` and ``FloatingPointError``, the types raised
    before it existed, so older ``except`` clauses still catch it.
    """


class SolveWarning(RuntimeWarning):
    """A solve or hypergradient failed and ``on_failure="warn"`` (the default) was in force."""


def check_on_failure(where: str, on_failure: Any) -> None:
    if on_failure not in ON_FAILURE:
        raise ValueError(f"{where}: on_failure must be one of {ON_FAILURE}, got {on_failure!r}")


def _user_frame() -> Any:
    """The innermost stack frame that belongs to neither this library nor JAX."""
    frame = sys._getframe(1)
    while frame is not None:
        package = str(frame.f_globals.get("__name__", "")).partition(".")[0]
        if package not in _LIBRARY_PACKAGES:
            return frame
        frame = frame.f_back
    return sys._getframe(1)


class _Location(NamedTuple):
    filename: str
    lineno: int
    module: str
    registry: dict


def user_location() -> _Location:
    """Where the user's code called into the library: warnings are attributed to this line.

    Captured when a function is called (eagerly) or traced (under ``jit``), so a warning raised
    later from a callback still points at the user's call, not at JAX or this library.
    """
    frame = _user_frame()
    registry = frame.f_globals.setdefault("__warningregistry__", {})
    return _Location(frame.f_code.co_filename, frame.f_lineno,
                     str(frame.f_globals.get("__name__", "<unknown>")), registry)


#: The last few errors raised from callbacks, so :func:`surface_errors` can re-raise them as
#: themselves when JAX wraps them in a ``JaxRuntimeError``.
_RAISED: collections.deque = collections.deque(maxlen=32)


def _first_failure(failed: np.ndarray, values: tuple) -> tuple[tuple, int, int]:
    """Values of the first failed element of a (possibly ``vmap``-batched) report."""
    failed = np.asarray(failed)
    flat = np.ravel(failed)
    count, first = int(flat.sum()), int(np.argmax(flat))
    picked = []
    for value in values:
        value = np.asarray(value)
        picked.append(np.ravel(np.broadcast_to(value, failed.shape))[first]
                      if failed.ndim else value)
    return tuple(picked), count, flat.size


def _act(where: str, describe: Callable[..., str], on_failure: str, location: _Location,
         failed: Any, *values: Any) -> None:
    failed = np.asarray(failed)
    if not failed.any():
        return
    picked, count, total = _first_failure(failed, values)
    message = f"{where}: {describe(*picked)}"
    if total > 1:
        message += f" ({count} of {total} batched calls failed; the first is shown)"
    if on_failure == "raise":
        error = SolveError(message)
        _RAISED.append(error)
        raise error
    warnings.warn_explicit(message, SolveWarning, location.filename, location.lineno,
                           module=location.module, registry=location.registry)


def report_failure(where: str, failed: Any, describe: Callable[..., str], values: tuple,
                   on_failure: str) -> None:
    """Warn or raise when ``failed`` holds, eagerly or, through a callback, under ``jit``.

    Args:
      where: the public function the user called, which starts the message.
      failed: a boolean array (batched under ``vmap``).
      describe: ``describe(*values) -> str``, called on the host with concrete scalars of the
        first failed element.
      values: arrays passed to ``describe``.
      on_failure: one of :data:`ON_FAILURE`.

    The warning is attributed to the user's line that called ``where``; under ``jit`` the
    callback runs only on failure (inside ``lax.cond``), so a successful solve costs no host
    round trip. Under ``jit`` a raised :class:`SolveError` reaches the caller wrapped in JAX's
    ``JaxRuntimeError``, unless the call goes through :func:`hvp.jit` or
    :func:`surface_errors`, which re-raise it as itself.
    """
    if on_failure == "ignore":
        return
    act = functools.partial(_act, where, describe, on_failure, user_location())
    try:
        concrete = np.asarray(failed)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        concrete = None
    if concrete is not None:
        act(concrete, *values)
        return
    jax.lax.cond(jnp.any(failed), lambda: jax.debug.callback(act, failed, *values),
                 lambda: None)


def _original_error(error: BaseException) -> SolveError | None:
    text = str(error)
    for raised in reversed(_RAISED):
        if str(raised) in text:
            return raised
    return None


def surface_errors(fun: Callable) -> Callable:
    """Wrap ``fun`` so a :class:`SolveError` raised inside a compiled call surfaces as itself.

    JAX reports an exception raised by a host callback as ``jax.errors.JaxRuntimeError`` whose
    text contains the original. Calls made through the wrapper re-raise the original
    :class:`SolveError` (message and type) instead; every other error passes unchanged.
    """

    @functools.wraps(fun)
    def wrapper(*args, **kwargs):
        try:
            return fun(*args, **kwargs)
        except jax.errors.JaxRuntimeError as error:
            original = _original_error(error)
            if original is None:
                raise
            raise original.with_traceback(None) from None

    return wrapper


class _Jitted:
    """``jax.jit(fun)`` whose calls re-raise a failed solve's :class:`SolveError` as itself."""

    def __init__(self, jitted: Callable):
        self._jitted = jitted
        self._call = surface_errors(jitted)
        functools.update_wrapper(self, jitted)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # lower, trace, eval_shape, ...
        return getattr(self._jitted, name)


def jit(fun: Callable | None = None, **jit_kwargs: Any) -> Any:
    """``jax.jit`` that lets ``on_failure="raise"`` surface as :class:`SolveError`.

    Under a plain ``jax.jit`` an exception raised from inside the compiled computation reaches
    the caller as ``jax.errors.JaxRuntimeError`` (its text carries the original message); this
    wrapper re-raises the original instead. Usable as ``hvp.jit(f, static_argnums=...)`` or as a
    decorator, with or without arguments.
    """
    if fun is None:
        return functools.partial(jit, **jit_kwargs)
    return _Jitted(jax.jit(fun, **jit_kwargs))


# --------------------------------------------------------------------------------------------
# Scalars given as arguments: Python or NumPy numbers, checked where they enter.


def real_scalar(where: str, name: str, value: Any, minimum: float | None = None) -> Any:
    """Check a real scalar argument that may also be a (traced) 0-d array.

    Python and NumPy numbers and 0-d real arrays are accepted; strings, bools, complex numbers,
    ``None`` and arrays with more than one element are refused. A concrete value must be finite
    and at least ``minimum``. Returns ``value`` unchanged.
    """
    if isinstance(value, bool | str | bytes) or value is None:
        raise TypeError(f"{where}: {name} must be a real number, got {value!r} "
                        f"({type(value).__name__})")
    try:
        dtype, shape = jnp.result_type(value), np.shape(value)
    except TypeError:
        raise TypeError(f"{where}: {name} must be a real number, got {value!r} "
                        f"({type(value).__name__})") from None
    if shape != () or not (jnp.issubdtype(dtype, jnp.floating)
                           or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{where}: {name} must be a real scalar, got {dtype} of shape {shape}")
    concrete = concrete_value(value)
    if concrete is not None and not math.isfinite(concrete):
        raise ValueError(f"{where}: {name} must be finite, got {concrete}")
    if concrete is not None and minimum is not None and not concrete >= minimum:
        raise ValueError(f"{where}: {name} must be >= {minimum:g}, got {concrete}")
    return value


# --------------------------------------------------------------------------------------------
# Renamed arguments and attributes: old names keep working, with a DeprecationWarning.


def warn_deprecated(message: str) -> None:
    """A ``DeprecationWarning`` attributed to the user's line that called into the library."""
    location = user_location()
    warnings.warn_explicit(message, DeprecationWarning, location.filename, location.lineno,
                           module=location.module, registry=location.registry)


def accepts_renamed(where: str, **renames: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fun`` still accepts the old keyword of each ``old=new`` rename.

    An old keyword is passed on under its new name with a ``DeprecationWarning``; giving the old
    and the new name together (by keyword or position) is a ``TypeError``. The signature shown
    (``inspect.signature``) is ``fun``'s own, with the new names only.
    """

    def decorate(fun: Callable) -> Callable:
        position = {new: list(inspect.signature(fun).parameters).index(new)
                    for new in renames.values()}

        @functools.wraps(fun)
        def wrapper(*args, **kwargs):
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs or len(args) > position[new]:
                    raise TypeError(f"{where}: got both {old}= (its old name) and {new}=; "
                                    f"pass {new}= only")
                warn_deprecated(f"{where}: {old}= is deprecated, use {new}=")
                kwargs[new] = kwargs.pop(old)
            return fun(*args, **kwargs)

        return wrapper

    return decorate


def renamed_attribute(where: str, old: str, new: str) -> property:
    """A read-only property ``old`` that returns ``self.new`` with a ``DeprecationWarning``."""

    def read(self):
        warn_deprecated(f"{where}.{old} is deprecated, use .{new}")
        return getattr(self, new)

    return property(read, doc=f"Deprecated: the old name of ``{new}``.")
