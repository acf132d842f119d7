"""Implicit hypergradients: the implicit function theorem with any :mod:`hvp` solver.

At an inner minimiser θ*(λ) of ``inner_loss``, the total derivative of ``outer_loss`` is

    dL_out/dλ = ∂_λ L_out − (∂²_{λθ} L_in) H⁻¹ ∇_θ L_out,     H = ∇²_θ L_in,

one inverse-HVP solve ``v = H⁻¹ ∇_θ L_out`` and one cross product ``∇_λ <∇_θ L_in, v>``
(Bengio 2000; Pedregosa 2016; Lorraine, Vicol & Duvenaud 2020).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import hvp
from bilevel import _common
from hvp import checks as _checks

PyTree = Any


class HypergradInfo(NamedTuple):
    """Diagnostics of an implicit hypergradient (all arrays).

    Attributes:
      converged: the hypergradient can be trusted: the inverse-HVP solve converged, ``params``
        is stationary and everything is finite.
      finite: every input (``params``, ``hparams``, the floating leaves of ``inner_args`` and
        ``outer_args``) and every output (the hypergradient, ``inverse_hvp``, the outer loss)
        is finite.
      residual_norm: ``||∇_θ L_out − H v||`` of the solve.
      iterations: solver iterations.
      hvp_count: Hessian-vector products spent by the solve.
      status: the solve's :class:`hvp.Status` code.
      outer_loss: ``L_out(θ, λ)``.
      inverse_hvp: ``v ≈ H⁻¹ ∇_θ L_out``; pass it as ``init=`` next time to warm-start the solve.
      inner_grad_norm: ``||∇_θ L_in(θ, λ)||₂``, how far ``params`` is from stationary (NaN when
        ``stationarity_tol=None`` skipped the check).
      stationary: ``inner_grad_norm <= stationarity_tol · ||∇_θ L_out(θ, λ)||₂``.
    """

    converged: jax.Array
    finite: jax.Array
    residual_norm: jax.Array
    iterations: jax.Array
    hvp_count: jax.Array
    status: jax.Array
    outer_loss: jax.Array
    inverse_hvp: PyTree
    inner_grad_norm: jax.Array
    stationary: jax.Array


#: Default of ``hypergrad``'s ``stationarity_tol``: the inner gradient may be at most 1 % of the
#: outer gradient. At the canonical problems' inner solutions the ratio is 1e-8 to 1e-6 (float32);
#: at their starting points it is 0.14 to 6.
STATIONARITY_TOL = 1e-2


def _describe_hypergrad(status, iterations, hvps, residual, finite, stationary,
                        inner_grad_norm, outer_grad_norm, tol) -> str:
    parts = []
    if not bool(finite):
        parts.append("an input or the result is not finite (NaN or inf)")
    if bool(finite) and not bool(stationary):
        ratio = float(inner_grad_norm) / float(outer_grad_norm) if outer_grad_norm else np.inf
        parts.append(f"params is not a stationary point of inner_loss: ||∇_θ inner_loss|| = "
                     f"{float(inner_grad_norm):.3e} is {ratio:.3g} × ||∇_θ outer_loss|| "
                     f"(stationarity_tol={float(tol):.3g}), so the implicit function theorem "
                     f"does not hold there; solve the inner problem further")
    if int(status) != hvp.Status.CONVERGED:
        parts.append("the solve failed: " + hvp.status_message(
            hvp.SolveInfo(residual, iterations, status == 0, hvps, status)))
    return "; ".join(parts) or "the solve failed"


def _describe_solve(status, iterations, hvps, residual, finite) -> str:
    solve = hvp.status_message(hvp.SolveInfo(residual, iterations, status == 0, hvps, status))
    verdict = "the hypergradient is not finite" if not bool(finite) else "the solve failed"
    return f"{verdict}: {solve}"


def _check_options(where: str, solver: Any, mode: Any, damping: Any, curvature: Any,
                   on_failure: Any, stationarity_tol: Any) -> None:
    """Every option of :func:`hypergrad`, named in the error as the argument of ``where``."""
    _checks.check_on_failure(where, on_failure)
    _checks.check_mode(where, mode)
    if not isinstance(solver, hvp.AbstractSolver):
        raise TypeError(f"{where}: solver must be an hvp solver such as hvp.CG(), got "
                        f"{type(solver).__name__}")
    _checks.check_nonnegative(where, "damping", damping)
    if curvature is not None and not callable(curvature):
        raise TypeError(f"{where}: curvature must be None or a callable returning an "
                        f"hvp.LinearOperator, got {type(curvature).__name__}")
    damping_value = _checks.concrete_value(damping)
    if curvature is not None and damping_value is not None and damping_value != 0.0:
        raise ValueError(f"{where}: damping applies to the default Hessian; with curvature= "
                         f"add the damping to the operator you build")
    if stationarity_tol is not None:
        _checks.real_scalar(where, "stationarity_tol", stationarity_tol, minimum=0.0)


def hypergrad(inner_loss: Callable, outer_loss: Callable, params: PyTree, hparams: PyTree,
              inner_args: tuple = (), outer_args: tuple = (),
              solver: hvp.AbstractSolver = hvp.CG(maxiter=20), mode: str = "fwd_rev",
              damping: Any = 0.0, *, curvature: Callable | None = None,
              preconditioner: hvp.LinearOperator | None = None, init: PyTree | None = None,
              key: jax.Array | None = None, on_failure: str = "warn",
              stationarity_tol: float | None = STATIONARITY_TOL
              ) -> tuple[PyTree, HypergradInfo]:
    """Implicit hypergradient ``dL_out/dλ`` at an (approximate) inner minimiser ``params``.

    Meant to be called under ``jax.jit``: eagerly, every call traces and compiles the solver
    loop again.

    Args:
      inner_loss: ``inner_loss(params, hparams, *inner_args) -> scalar``.
      outer_loss: ``outer_loss(params, hparams, *outer_args) -> scalar``.
      params: θ, an (approximate) minimiser of ``inner_loss`` for these ``hparams``.
      hparams: λ, any pytree of floating arrays.
      inner_args, outer_args: data of the two losses (not differentiated).
      solver: any :mod:`hvp` solver for ``v = H⁻¹ ∇_θ L_out``.
      mode: product mode for the HVPs and the cross product (see :func:`hvp.hvp`).
      damping: Tikhonov damping δ: the solve uses ``H + δI``.
      curvature: optional ``curvature(params, hparams, *inner_args) -> hvp.LinearOperator``
        used instead of the Hessian (e.g. a Gauss-Newton operator from :func:`hvp.ggn`).
      preconditioner, init, key: passed to :func:`hvp.solve` (``init`` warm-starts the solve,
        e.g. with the previous ``info.inverse_hvp``).
      on_failure: when the result is not to be trusted (the solve failed, ``params`` is not
        stationary, or an input or output is not finite): ``"warn"`` (default: one
        :class:`hvp.SolveWarning` line with the reason, the status, iterations and residual,
        attributed to the line that called ``hypergrad``), ``"raise"`` (:class:`hvp.SolveError`;
        under ``jit`` it surfaces as itself through :func:`hvp.jit`) or ``"ignore"``.
      stationarity_tol: the implicit function theorem holds at a stationary point of the inner
        loss. ``params`` counts as stationary when ``||∇_θ L_in|| <= stationarity_tol ·
        ||∇_θ L_out||``: the inner gradient measured against the outer gradient that the solve
        inverts (the Newton step still left to the inner problem, ``H⁻¹∇_θ L_in``, against the
        adjoint ``v = H⁻¹∇_θ L_out``). ``None`` skips the check and its one extra gradient.

    Returns:
      ``(grad, info)``: the total derivative, shaped like ``hparams`` (the direct term
      ``∂_λ L_out`` included), and a :class:`HypergradInfo`.
    """
    where = "bilevel.hypergrad"
    _check_options(where, solver, mode, damping, curvature, on_failure, stationarity_tol)
    inner_args, outer_args = tuple(inner_args), tuple(outer_args)
    _common.check_losses(where, inner_loss, outer_loss, params, hparams, inner_args, outer_args)
    value, (grad_params, grad_hparams) = jax.value_and_grad(outer_loss, argnums=(0, 1))(
        params, hparams, *outer_args)
    if curvature is None:
        operator = hvp.hessian(inner_loss, params, hparams, *inner_args, mode=mode,
                               damping=damping)
    else:
        operator = curvature(params, hparams, *inner_args)
    inverse_hvp, solve = hvp.solve(operator, grad_params, solver, preconditioner=preconditioner,
                                   init=init, key=key, on_failure="ignore")
    cross = hvp.cross_vp(inner_loss, params, hparams, inverse_hvp, *inner_args, mode=mode)
    grad = jax.tree_util.tree_map(lambda d, c: d - c.astype(d.dtype), grad_hparams, cross)
    outer_grad_norm = _common.tree_norm(grad_params)
    if stationarity_tol is None:
        inner_grad_norm = jnp.full((), jnp.nan, outer_grad_norm.dtype)
        stationary = jnp.array(True)
    else:
        inner_grad_norm = _common.tree_norm(jax.grad(inner_loss)(params, hparams, *inner_args))
        stationary = inner_grad_norm <= stationarity_tol * outer_grad_norm
    finite = (_common.inputs_finite(params, hparams, inner_args, outer_args)
              & _common.tree_all_finite((grad, inverse_hvp, value)))
    info = HypergradInfo(converged=solve.converged & finite & stationary, finite=finite,
                         residual_norm=solve.residual_norm, iterations=solve.iterations,
                         hvp_count=solve.hvp_count, status=solve.status, outer_loss=value,
                         inverse_hvp=inverse_hvp, inner_grad_norm=inner_grad_norm,
                         stationary=stationary)
    tol = jnp.asarray(jnp.nan if stationarity_tol is None else stationarity_tol)
    _checks.report_failure(where, ~info.converged, _describe_hypergrad,
                           (solve.status, solve.iterations, solve.hvp_count, solve.residual_norm,
                            finite, stationary, inner_grad_norm, outer_grad_norm, tol),
                           on_failure)
    return grad, info


# --------------------------------------------------------------------------------------------
# The decorator.


def _split_differentiable(tree: PyTree) -> tuple[list, Callable[[list], PyTree]]:
    """The floating leaves of ``tree`` and a function rebuilding ``tree`` from new ones."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    index = [i for i, leaf in enumerate(leaves) if _common.is_differentiable(leaf)]

    def rebuild(floating: list) -> PyTree:
        merged = list(leaves)
        for i, leaf in zip(index, floating, strict=True):
            merged[i] = leaf
        return jax.tree_util.tree_unflatten(treedef, merged)

    return [leaves[i] for i in index], rebuild


def _scatter_cotangents(tree: PyTree, floating_cotangents: list) -> PyTree:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    it = iter(floating_cotangents)
    out = [next(it) if _common.is_differentiable(leaf) else None for leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attach_implicit_gradient(loss, config, solution, hparams, args, consts):
    return solution


def _attach_fwd(loss, config, solution, hparams, args, consts):
    return solution, (solution, hparams, args, consts)


def _attach_bwd(loss, config, residuals, cotangent):
    solver, mode, damping, on_failure = config
    solution, hparams, args, consts = residuals
    others = (hparams, args, consts)
    floating, rebuild = _split_differentiable(others)

    def inner(params, *floating_leaves):
        h, a, c = rebuild(list(floating_leaves))
        return loss(params, h, *a, *c)

    operator = hvp.hessian(inner, solution, *floating, mode=mode, damping=damping)
    v, info = hvp.solve(operator, cotangent, solver, on_failure="ignore")
    cross = hvp.cross_vp(lambda p, fl: inner(p, *fl), solution, floating, v, mode=mode)
    report_values = (info.status, info.iterations, info.hvp_count, info.residual_norm,
                     _common.tree_all_finite(v))
    failed = ~info.converged | ~_common.tree_all_finite(v)
    _common.report_failure("bilevel.implicit", failed, _describe_solve, report_values,
                           on_failure)
    negated = [-c for c in cross]
    hparams_ct, args_ct, consts_ct = _scatter_cotangents(others, negated)
    return _common.zeros_cotangent(solution), hparams_ct, args_ct, consts_ct


_attach_implicit_gradient.defvjp(_attach_fwd, _attach_bwd)


def implicit(inner_loss: Callable, solver: hvp.AbstractSolver = hvp.CG(maxiter=20),
             mode: str = "fwd_rev", damping: float = 0.0, on_failure: str = "warn"
             ) -> Callable[[Callable], Callable]:
    """Make any inner solver differentiable with respect to its hyperparameters by the IFT.

    The decorated ``solve_inner(init_params, hparams, *inner_args) -> params`` may be anything
    that returns an (approximate) minimiser of ``inner_loss`` -- a loop of optax steps, a
    ``lax.while_loop``, a jaxopt solver; it is never differentiated through. Gradients with
    respect to ``hparams``, to the floating leaves of ``inner_args``, and to arrays that
    ``inner_loss`` closes over come from ``dθ*/dz = −H⁻¹ ∂²_{θz} L_in``, one inverse-HVP solve
    per backward pass. Composes with ``jax.grad``, ``jit`` and ``vmap``.

    Args:
      inner_loss: ``inner_loss(params, hparams, *inner_args) -> scalar``.
      solver: :mod:`hvp` solver for the backward solve.
      mode: product mode (see :func:`hvp.hvp`).
      damping: Tikhonov damping of the Hessian in the backward solve.
      on_failure: what to do when the backward solve fails: ``"warn"`` (default; the gradient
        itself carries no flag), ``"raise"`` or ``"ignore"``.

    Example::

        @bilevel.implicit(inner_loss, solver=hvp.CG(maxiter=50))
        def solve_inner(init_params, hparams, x, y):
            ...  # e.g. 500 optax steps in lax.fori_loop
            return params
    """
    where = "bilevel.implicit"
    _checks.check_mode(where, mode)
    _checks.check_nonnegative(where, "damping", damping)
    _common.check_on_failure(where, on_failure)
    if not isinstance(solver, hvp.AbstractSolver):
        raise TypeError(f"{where}: solver must be an hvp solver such as hvp.CG(), got "
                        f"{type(solver).__name__}")
    config = (solver, mode, float(damping), on_failure)

    def decorator(solve_inner: Callable) -> Callable:
        @functools.wraps(solve_inner)
        def wrapper(init_params, hparams, *inner_args):
            _common.check_hparams(where, hparams)
            stopped = jax.lax.stop_gradient((init_params, hparams, inner_args))
            solution = solve_inner(*stopped[:2], *stopped[2])
            _checks.check_scalar_output(where, inner_loss, solution, hparams, *inner_args,
                                        name="inner_loss")
            # Arrays the loss closes over become explicit inputs, so that they get cotangents
            # instead of breaking the custom VJP.
            loss, consts = jax.closure_convert(inner_loss, solution, hparams, *inner_args)
            return _attach_implicit_gradient(loss, config, solution, hparams,
                                             tuple(inner_args), tuple(consts))

        return wrapper

    return decorator
