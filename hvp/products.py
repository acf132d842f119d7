"""Curvature-vector products: Hessian, Gauss-Newton and mixed (cross) second derivatives.

All products are matrix-free: they cost a small constant number of gradient evaluations and
never materialise a matrix. Three ways to compose forward and reverse mode are offered, since
their speed and memory differ by model and hardware:

* ``fwd_rev`` -- forward-over-reverse, ``jvp(grad f)``: one forward pass through the gradient
  computation; the usual best choice (Pearlmutter 1994).
* ``rev_rev`` -- reverse-over-reverse, ``grad <grad f, v>``: what most libraries do; it stores
  the inner backward pass.
* ``rev_fwd`` -- reverse-over-forward, ``grad jvp(f)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from hvp import checks as _checks

PyTree = Any


def _tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    products = jax.tree_util.tree_map(lambda x, y: jnp.vdot(x, y), a, b)
    return sum(jax.tree_util.tree_leaves(products))


def _check_product_inputs(where: str, fun: Callable, params: PyTree, vector: PyTree,
                          args: tuple, mode: str) -> None:
    _checks.check_mode(where, mode)
    _checks.check_floating(where, "params", params)
    _checks.check_same_structure(where, "vector", vector, "params", params, dtypes=True)
    _checks.check_scalar_output(where, fun, params, *args)


def _hvp_unchecked(fun: Callable, params: PyTree, vector: PyTree, args: tuple,
                   mode: str) -> PyTree:
    def f(p):
        return fun(p, *args)

    if mode == "fwd_rev":
        return jax.jvp(jax.grad(f), (params,), (vector,))[1]
    if mode == "rev_rev":
        return jax.grad(lambda p: _tree_vdot(jax.grad(f)(p), vector))(params)
    return jax.grad(lambda p: jax.jvp(f, (p,), (vector,))[1])(params)


def hvp(fun: Callable, params: PyTree, vector: PyTree, *args: Any,
        mode: str = "fwd_rev") -> PyTree:
    """Hessian-vector product ``∇²_θ fun(θ, *args) · v``.

    Args:
      fun: ``fun(params, *args) -> scalar``.
      params: the point θ, any pytree of floating arrays.
      vector: the direction v, a pytree of the same structure and shapes as ``params``.
      *args: further arguments of ``fun`` (data, hyperparameters); not differentiated.
      mode: ``"fwd_rev"`` (default), ``"rev_rev"`` or ``"rev_fwd"``; all give the same value.

    Returns:
      ``H v`` with the structure of ``params``.

    Reference: Pearlmutter, "Fast exact multiplication by the Hessian", 1994.
    """
    _check_product_inputs("hvp.hvp", fun, params, vector, args, mode)
    return _hvp_unchecked(fun, params, vector, args, mode)


def cross_vp(fun: Callable, params: PyTree, hparams: PyTree, vector: PyTree, *args: Any,
             mode: str = "fwd_rev") -> PyTree:
    """Mixed second-derivative product ``∂_λ <∇_θ fun(θ, λ, *args), v>``.

    This is the second factor of the implicit-function-theorem hypergradient
    ``dL/dλ = ∂_λ L − (∂²_{λθ} f) H⁻¹ ∇_θ L``: with ``v = H⁻¹ ∇_θ L`` it returns ``(∂²_{λθ} f) v``.

    Args:
      fun: ``fun(params, hparams, *args) -> scalar``.
      params: θ, a pytree of floating arrays.
      hparams: λ, a pytree of floating arrays.
      vector: v, a pytree shaped like ``params``.
      *args: further, non-differentiated arguments of ``fun``.
      mode: ``"fwd_rev"`` pushes v forward through ``θ ↦ ∇_λ fun``; ``"rev_rev"`` differentiates
        ``<∇_θ fun, v>`` in reverse; ``"rev_fwd"`` differentiates ``jvp_θ fun · v`` in reverse.

    Returns:
      A pytree shaped like ``hparams``.
    """
    where = "hvp.cross_vp"
    _check_product_inputs(where, lambda p, h, *a: fun(p, h, *a), params, vector,
                          (hparams, *args), mode)
    _checks.check_floating(where, "hparams", hparams)

    def f(p, h):
        return fun(p, h, *args)

    if mode == "fwd_rev":
        return jax.jvp(lambda p: jax.grad(f, argnums=1)(p, hparams), (params,), (vector,))[1]
    if mode == "rev_rev":
        return jax.grad(lambda h: _tree_vdot(jax.grad(f)(params, h), vector))(hparams)
    return jax.grad(lambda h: jax.jvp(lambda p: f(p, h), (params,), (vector,))[1])(hparams)


def hvp_and_cross_vp(fun: Callable, params: PyTree, hparams: PyTree, vector: PyTree,
                     *args: Any) -> tuple[PyTree, PyTree]:
    """``(∇²_θ f · v, ∂²_{λθ} f · v)`` from a single forward-over-reverse pass.

    One JVP of ``θ ↦ (∇_θ f, ∇_λ f)`` along v yields both products; this is the backward step of
    MixFlow-MG (Kemaev et al. 2025), which needs both at every unrolled step.
    """
    where = "hvp.hvp_and_cross_vp"
    _check_product_inputs(where, lambda p, h, *a: fun(p, h, *a), params, vector,
                          (hparams, *args), "fwd_rev")
    _checks.check_floating(where, "hparams", hparams)
    grads = jax.grad(lambda p, h: fun(p, h, *args), argnums=(0, 1))
    return jax.jvp(lambda p: grads(p, hparams), (params,), (vector,))[1]


def _ggn_unchecked(model: Callable, loss: Callable, params: PyTree, vector: PyTree,
                   model_args: tuple, loss_args: tuple) -> PyTree:
    outputs, model_vjp = jax.vjp(lambda p: model(p, *model_args), params)
    jv = jax.jvp(lambda p: model(p, *model_args), (params,), (vector,))[1]
    hjv = jax.jvp(jax.grad(lambda z: loss(z, *loss_args)), (outputs,), (jv,))[1]
    return model_vjp(hjv)[0]


def ggn_vp(model: Callable, loss: Callable, params: PyTree, vector: PyTree,
           model_args: tuple = (), loss_args: tuple = ()) -> PyTree:
    """Generalised Gauss-Newton-vector product ``Jᵀ (∇²_z ℓ) J v`` for ``ℓ(model(θ))``.

    J is the Jacobian of the model outputs z with respect to θ and ``∇²_z ℓ`` the Hessian of the
    loss in the outputs. For a loss convex in its outputs (squared error, cross-entropy) the GGN
    is positive semi-definite everywhere, unlike the Hessian (Schraudolph 2002).

    Args:
      model: ``model(params, *model_args) -> outputs`` (any pytree of arrays).
      loss: ``loss(outputs, *loss_args) -> scalar``.
      params: θ.
      vector: v, shaped like ``params``.
      model_args: non-differentiated arguments of ``model`` (the inputs).
      loss_args: non-differentiated arguments of ``loss`` (the targets).

    Returns:
      ``G v`` with the structure of ``params``.
    """
    where = "hvp.ggn_vp"
    _checks.check_floating(where, "params", params)
    _checks.check_same_structure(where, "vector", vector, "params", params, dtypes=True)
    outputs = jax.eval_shape(lambda p: model(p, *model_args), params)
    _checks.check_scalar_output(where, loss, outputs, *loss_args, name="loss")
    return _ggn_unchecked(model, loss, params, vector, tuple(model_args), tuple(loss_args))
