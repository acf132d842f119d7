"""Matrix-free linear operators over pytrees: Hessians, Gauss-Newton matrices, matrices.

An operator is what the solvers see: ``mv(v)`` on pytrees shaped like ``structure``. Operators are
registered pytrees (the closed-over point and data are leaves, the functions are static), so they
can be passed through ``jit`` and ``vmap`` like arrays.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from hvp import checks as _checks
from hvp.products import _ggn_unchecked, _hvp_unchecked

PyTree = Any

#: Largest number of rows ``dense()`` materialises unless told otherwise (5000² float64 = 200 MB).
DEFAULT_DENSE_LIMIT = 5000


class LinearOperator:
    """A symmetric linear map on pytrees shaped like ``structure``.

    Subclasses define ``structure`` (a pytree of ``jax.ShapeDtypeStruct``) and ``mv``.
    """

    structure: PyTree

    def mv(self, vector: PyTree) -> PyTree:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def size(self) -> int:
        """Number of rows of the operator (the total number of scalar parameters)."""
        return sum(math.prod(s.shape) for s in jax.tree_util.tree_leaves(self.structure))

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.result_type(*jax.tree_util.tree_leaves(self.structure))

    def zeros(self) -> PyTree:
        return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), self.structure)

    def unravel(self, flat: jax.Array) -> PyTree:
        """Map a flat vector of length ``size`` to a pytree shaped like ``structure``."""
        return ravel_pytree(self.zeros())[1](flat)

    def flat_mv(self, flat: jax.Array) -> jax.Array:
        """``mv`` on flat vectors, the form every solver works in."""
        return ravel_pytree(self.mv(self.unravel(flat)))[0].astype(flat.dtype)

    def dense(self, max_size: int = DEFAULT_DENSE_LIMIT) -> jax.Array:
        """Materialise the operator as a ``(size, size)`` matrix with ``size`` products.

        Raises:
          ValueError: if ``size > max_size``; pass a larger ``max_size`` to override.
        """
        n = self.size
        if n > max_size:
            nbytes = n * n * jnp.dtype(self.dtype).itemsize
            raise ValueError(
                f"{type(self).__name__}.dense: the operator has {n} rows, so materialising it "
                f"takes {nbytes / 2**30:.1f} GiB and {n} products; the limit is "
                f"max_size={max_size} (pass a larger max_size to override)"
            )
        eye = jnp.eye(n, dtype=self.dtype)
        columns = jax.lax.map(self.flat_mv, eye, batch_size=min(n, 128))
        return columns.T

    def diagonal(self, key: jax.Array, num_samples: int = 32) -> PyTree:
        """Hutchinson estimate of the diagonal: ``mean_k z_k ⊙ (A z_k)``, z Rademacher.

        Unbiased; its error falls as ``1/sqrt(num_samples)`` (Bekas, Kokiopoulou, Saad 2007).
        """
        if num_samples < 1:
            raise ValueError(f"diagonal: num_samples must be >= 1, got {num_samples}")
        probes = jax.random.rademacher(key, (num_samples, self.size), dtype=self.dtype)
        products = jax.lax.map(self.flat_mv, probes, batch_size=min(num_samples, 16))
        return self.unravel(jnp.mean(probes * products, axis=0))


def _register(cls, data_fields: list[str], meta_fields: list[str]):
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_dataclass(cls, data_fields=data_fields, meta_fields=meta_fields)


def _structure_of(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x),
                                                                 jnp.result_type(x)), tree)


def _add_damping(product: PyTree, vector: PyTree, damping: Any) -> PyTree:
    return jax.tree_util.tree_map(lambda p, v: p + damping * v, product, vector)


def _subsample_args(args: tuple, batch_argnums: tuple[int, ...], key: jax.Array,
                    batch_size: int, where: str) -> tuple:
    sizes = {jnp.shape(leaf)[0] for i in batch_argnums
             for leaf in jax.tree_util.tree_leaves(args[i])}
    if len(sizes) != 1:
        raise ValueError(f"{where}: the arguments in batch_argnums={batch_argnums} must share "
                         f"one leading batch size, found {sorted(sizes)}")
    (n,) = sizes
    if not 1 <= batch_size <= n:
        raise ValueError(f"{where}: batch_size must be in [1, {n}], got {batch_size}")
    index = jax.random.choice(key, n, (batch_size,), replace=False)
    return tuple(jax.tree_util.tree_map(lambda x: x[index], a) if i in batch_argnums else a
                 for i, a in enumerate(args))


class _Curvature(LinearOperator):
    """A damped curvature matrix of a loss at ``params`` on data (the Hessian, the GGN).

    A subclass has the fields ``params``, ``damping`` and ``batch_argnums``, names its tuples
    of data arguments in ``data_fields`` (``batch_argnums`` index them taken as one tuple, in
    that order) and defines ``undamped_mv``.
    """

    builder: ClassVar[str]  #: the function that builds it, for messages
    data_fields: ClassVar[tuple[str, ...]]

    @property
    def structure(self) -> PyTree:
        return _structure_of(self.params)

    def mv(self, vector: PyTree) -> PyTree:
        return _add_damping(self.undamped_mv(vector), vector, self.damping)

    def subsample(self, key: jax.Array, batch_size: int) -> _Curvature:
        """The same operator on a random minibatch of the ``batch_argnums`` arguments."""
        where = f"{type(self).__name__}.subsample"
        if self.batch_argnums is None:
            raise ValueError(f"{where}: build the operator with {self.builder}(..., "
                             f"batch_argnums=(i, ...)) naming the data arguments")
        data = [getattr(self, name) for name in self.data_fields]
        picked = _subsample_args(sum(data, ()), self.batch_argnums, key, batch_size, where)
        ends = itertools.accumulate(len(args) for args in data)
        return dataclasses.replace(self, **{name: picked[end - len(args):end] for name, args, end
                                            in zip(self.data_fields, data, ends, strict=True)})


class HessianOperator(_Curvature):
    """``v ↦ ∇²_θ fun(θ, *args) v + damping · v``; build it with :func:`hessian`."""

    fun: Callable
    params: PyTree
    args: tuple
    damping: Any
    mode: str
    batch_argnums: tuple[int, ...] | None
    builder: ClassVar[str] = "hvp.hessian"
    data_fields: ClassVar[tuple[str, ...]] = ("args",)

    def undamped_mv(self, vector: PyTree) -> PyTree:
        return _hvp_unchecked(self.fun, self.params, vector, self.args, self.mode)


HessianOperator = _register(HessianOperator, ["params", "args", "damping"],
                            ["fun", "mode", "batch_argnums"])


class GGNOperator(_Curvature):
    """``v ↦ Jᵀ ∇²ℓ J v + damping · v``; build it with :func:`ggn`."""

    model: Callable
    loss: Callable
    params: PyTree
    model_args: tuple
    loss_args: tuple
    damping: Any
    batch_argnums: tuple[int, ...] | None
    builder: ClassVar[str] = "hvp.ggn"
    data_fields: ClassVar[tuple[str, ...]] = ("model_args", "loss_args")

    def undamped_mv(self, vector: PyTree) -> PyTree:
        return _ggn_unchecked(self.model, self.loss, self.params, vector, self.model_args,
                              self.loss_args)


GGNOperator = _register(GGNOperator, ["params", "model_args", "loss_args", "damping"],
                        ["model", "loss", "batch_argnums"])


class MatrixOperator(LinearOperator):
    """A square matrix acting on flat vectors; useful for tests and known curvature.

    Symmetric for most solvers; those with ``symmetric_only = False`` (GMRES, BiCGStab, Dense)
    also take a non-symmetric one.
    """

    matrix: jax.Array

    @property
    def structure(self) -> PyTree:
        return jax.ShapeDtypeStruct((self.matrix.shape[0],), self.matrix.dtype)

    def mv(self, vector: jax.Array) -> jax.Array:
        return self.matrix @ vector

    def dense(self, max_size: int = DEFAULT_DENSE_LIMIT) -> jax.Array:
        return self.matrix

    def diagonal(self, key: jax.Array | None = None, num_samples: int = 0) -> jax.Array:
        return jnp.diagonal(self.matrix)


MatrixOperator = _register(MatrixOperator, ["matrix"], [])


class DiagonalOperator(LinearOperator):
    """``v ↦ d ⊙ v`` for a pytree ``d``; the form preconditioners take."""

    diagonal_values: PyTree

    @property
    def structure(self) -> PyTree:
        return _structure_of(self.diagonal_values)

    def mv(self, vector: PyTree) -> PyTree:
        return jax.tree_util.tree_map(jnp.multiply, self.diagonal_values, vector)

    def diagonal(self, key: jax.Array | None = None, num_samples: int = 0) -> PyTree:
        return self.diagonal_values


DiagonalOperator = _register(DiagonalOperator, ["diagonal_values"], [])


def _check_batch_argnums(where: str, batch_argnums: Any, nargs: int) -> tuple[int, ...] | None:
    if batch_argnums is None:
        return None
    argnums = (batch_argnums,) if isinstance(batch_argnums, int) else tuple(batch_argnums)
    if not argnums or any(not 0 <= i < nargs for i in argnums):
        raise ValueError(f"{where}: batch_argnums must index the {nargs} extra arguments, "
                         f"got {batch_argnums!r}")
    return argnums


def hessian(fun: Callable, params: PyTree, *args: Any, mode: str = "fwd_rev",
            damping: Any = 0.0, batch_argnums: int | tuple[int, ...] | None = None
            ) -> HessianOperator:
    """The Hessian of ``fun`` at ``params`` as a matrix-free operator, plus Tikhonov damping.

    Args:
      fun: ``fun(params, *args) -> scalar``.
      params: the point θ.
      *args: further arguments of ``fun``, held fixed.
      mode: product mode, see :func:`hvp.hvp`.
      damping: ``δ >= 0``; the operator is ``∇²f + δI`` (as in iMAML's proximal term).
      batch_argnums: indices into ``args`` of the arguments with a leading batch axis; needed by
        stochastic solvers (LiSSA), which resample a minibatch per term.

    Returns:
      A :class:`HessianOperator` with ``mv``, ``dense``, ``diagonal`` and ``subsample``.
    """
    where = "hvp.hessian"
    _checks.check_mode(where, mode)
    _checks.check_floating(where, "params", params)
    _checks.check_scalar_output(where, fun, params, *args)
    _checks.check_nonnegative(where, "damping", damping)
    argnums = _check_batch_argnums(where, batch_argnums, len(args))
    return HessianOperator(fun, params, tuple(args), damping, mode, argnums)


def ggn(model: Callable, loss: Callable, params: PyTree, model_args: tuple = (),
        loss_args: tuple = (), damping: Any = 0.0,
        batch_argnums: int | tuple[int, ...] | None = None) -> GGNOperator:
    """The generalised Gauss-Newton matrix of ``loss(model(params, *model_args), *loss_args)``.

    Positive semi-definite when the loss is convex in the model outputs, so CG is safe on it even
    far from a minimum where the Hessian is indefinite. See :func:`hvp.ggn_vp`.
    """
    where = "hvp.ggn"
    _checks.check_floating(where, "params", params)
    outputs = jax.eval_shape(lambda p: model(p, *model_args), params)
    _checks.check_scalar_output(where, loss, outputs, *loss_args, name="loss")
    _checks.check_nonnegative(where, "damping", damping)
    argnums = _check_batch_argnums(where, batch_argnums, len(model_args) + len(loss_args))
    return GGNOperator(model, loss, params, tuple(model_args), tuple(loss_args), damping, argnums)


def jacobi_preconditioner(operator: LinearOperator, key: jax.Array, num_samples: int = 32,
                          floor: float = 1e-3) -> DiagonalOperator:
    """Inverse-diagonal (Jacobi) preconditioner from a Hutchinson estimate of the diagonal.

    Returns ``M⁻¹ = diag(1 / max(|d̂|, floor · max|d̂|))``, symmetric positive definite as CG and
    MINRES require even where the Hessian's diagonal is negative or poorly estimated.
    """
    if not 0.0 < floor <= 1.0:
        raise ValueError(f"hvp.jacobi_preconditioner: floor must be in (0, 1], got {floor}")
    estimate = jnp.abs(ravel_pytree(operator.diagonal(key, num_samples))[0])
    clipped = jnp.maximum(estimate, floor * jnp.max(estimate))
    safe = jnp.where(clipped > 0, clipped, 1.0)
    return DiagonalOperator(operator.unravel(1.0 / safe))
