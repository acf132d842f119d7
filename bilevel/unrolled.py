"""Unrolled meta-gradients through optax inner loops, with MixFlow-MG mixed-mode differentiation.

The inner loop ``θ_{t+1} = θ_t + U(∇_θ L_in(θ_t, λ), s_t, θ_t)`` runs ``steps`` optax updates; the
meta-gradient is ``d L_out(θ_T, λ) / dλ`` by reverse-mode through the loop.

``mode="reverse"`` differentiates the loop as written: reverse-over-reverse, so the backward pass
stores the inner backward pass's intermediates (activations) for every step.

``mode="mixflow"`` (Kemaev et al. 2025, "Scalable meta-learning via mixed-mode
differentiation") gives the inner value-and-gradient a custom VJP that saves only its inputs; its
backward pass is one forward-over-reverse JVP of ``(∇_θ L, ∇_λ L)`` along the incoming cotangent,
which by the symmetry of second derivatives yields both the Hessian-vector product (the
cotangent for θ) and the mixed product (the cotangent for λ). Trajectory checkpointing
(``checkpoint_every``) composes with it to bound the stored trajectory as well.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel import _common
from hvp import checks as _checks

PyTree = Any
MODES = ("mixflow", "reverse")

#: ``info.converged`` calls an unroll diverged when its last inner loss exceeds the first by
#: more than this many times the first's magnitude: ``L_{T-1} − L_0 > DIVERGENCE · |L_0|``.
DIVERGENCE = 100.0


class UnrolledInfo(NamedTuple):
    """Diagnostics of an unrolled meta-gradient (all arrays).

    Attributes:
      converged: the result can be trusted: it is ``finite``, every inner loss is finite, and
        the inner loop did not blow up: the last inner loss exceeds the first by at most
        :data:`DIVERGENCE` (100) times the first's magnitude. An inner learning rate that is too
        large makes the inner loss grow geometrically, which this catches while the numbers are
        still finite. (An unrolled gradient has no solve, so this is all "converged" can mean.)
      finite: the meta-gradient and the outer loss are finite.
      outer_loss: ``L_out(θ_T, λ)``.
      inner_losses: ``L_in(θ_t, λ)`` at each of the ``steps`` steps, shape ``(steps,)``.
      params: θ_T, the final inner parameters (to warm-start the next unroll).
      opt_state: the inner optimizer's final state; with ``params``, pass it as ``params0`` and
        ``opt_state`` to continue the inner run in the next truncation without re-running it.
    """

    converged: jax.Array
    finite: jax.Array
    outer_loss: jax.Array
    inner_losses: jax.Array
    params: PyTree
    opt_state: PyTree


def _mixflow_value_and_grad(inner_loss: Callable) -> Callable:
    """``(params, hparams, args) -> (L, ∇_θ L)`` whose VJP is one forward-over-reverse JVP."""

    @jax.custom_vjp
    def value_and_grad(params, hparams, args):
        return jax.value_and_grad(inner_loss)(params, hparams, *args)

    def fwd(params, hparams, args):
        return value_and_grad(params, hparams, args), (params, hparams, args)

    def bwd(residuals, cotangent):
        params, hparams, args = residuals
        value_cotangent, grad_cotangent = cotangent
        grads = jax.grad(lambda p, h: inner_loss(p, h, *args), argnums=(0, 1))
        # One JVP gives the primal gradients and (H c, ∂²_{λθ}L c) for the cotangent c.
        (grad_p, grad_h), (hessian_c, cross_c) = jax.jvp(
            lambda p: grads(p, hparams), (params,), (grad_cotangent,))
        # Cotangents take their primal's dtype: value_cotangent has the loss's, which may be
        # wider (a float64 loss of float32 meta-parameters).
        params_ct = jax.tree_util.tree_map(
            lambda g, h, p: (value_cotangent * g + h).astype(jnp.result_type(p)),
            grad_p, hessian_c, params)
        hparams_ct = jax.tree_util.tree_map(
            lambda g, c, h: (value_cotangent * g + c).astype(jnp.result_type(h)),
            grad_h, cross_c, hparams)
        # The data are not differentiated by unrolled_hypergrad.
        return params_ct, hparams_ct, _common.zeros_cotangent(args)

    value_and_grad.defvjp(fwd, bwd)
    return value_and_grad


def _plain_value_and_grad(inner_loss: Callable) -> Callable:
    def value_and_grad(params, hparams, args):
        return jax.value_and_grad(inner_loss)(params, hparams, *args)

    return value_and_grad


def resolve_optimizer(where: str, optimizer: Any, hparams: PyTree):
    """``optimizer`` if it is an optax transformation, else ``optimizer(hparams)``, checked."""
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    if callable(optimizer):
        transformation = optimizer(hparams)
        if not isinstance(transformation, optax.GradientTransformation):
            raise TypeError(f"{where}: optimizer(hparams) must return an optax "
                            f"GradientTransformation, got {type(transformation).__name__}")
        return transformation
    raise TypeError(f"{where}: optimizer must be an optax GradientTransformation or a function "
                    f"hparams -> GradientTransformation, got {type(optimizer).__name__}")


def _make_step(value_and_grad: Callable, transformation, hparams: PyTree, inner_args: tuple,
               has_per_step: bool) -> Callable:
    extra_args = isinstance(transformation, optax.GradientTransformationExtraArgs)

    def step(carry, step_args):
        params, opt_state = carry
        args = inner_args + tuple(step_args) if has_per_step else inner_args
        value, grads = value_and_grad(params, hparams, args)
        if extra_args:
            updates, opt_state = transformation.update(grads, opt_state, params, loss=value)
        else:
            updates, opt_state = transformation.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    return step


def inner_steps(inner_loss: Callable, transformation: Any, carry: tuple, hparams: PyTree,
                inner_args: tuple, steps: int) -> tuple[tuple, jax.Array]:
    """``steps`` optax steps on ``inner_loss(·, hparams, *inner_args)`` from
    ``carry = (params, opt_state)``, not set up for differentiation; returns the final
    ``(params, opt_state)`` and the loss before each step. What trainer methods call to move
    the inner problem."""
    step = _make_step(_plain_value_and_grad(inner_loss), transformation, hparams,
                      tuple(inner_args), has_per_step=False)
    return jax.lax.scan(step, carry, None, length=steps)


def _scan(step: Callable, carry, xs, length: int, checkpoint_every: int | None):
    """``lax.scan`` over ``length`` steps; with ``checkpoint_every=k`` only every k-th state is
    stored and each chunk of k steps is recomputed in the backward pass."""
    if length == 0:
        return carry, jnp.zeros((0,))
    if checkpoint_every is None or checkpoint_every >= length:
        return jax.lax.scan(step, carry, xs, length=length)
    k = checkpoint_every
    chunks, remainder = divmod(length, k)

    @jax.checkpoint
    def chunk(carry, chunk_xs):
        return jax.lax.scan(step, carry, chunk_xs, length=k)

    head = jax.tree_util.tree_map(lambda x: x[: chunks * k].reshape(chunks, k, *x.shape[1:]), xs)
    carry, values = jax.lax.scan(chunk, carry, head, length=chunks)
    values = values.reshape(chunks * k)
    if remainder:
        tail = jax.tree_util.tree_map(lambda x: x[chunks * k:], xs)
        carry, rest = jax.checkpoint(
            lambda c, t: jax.lax.scan(step, c, t, length=remainder))(carry, tail)
        values = jnp.concatenate([values, rest])
    return carry, values


def _check_int(where: str, name: str, value: Any, low: int, high: int) -> int:
    """``value`` as a Python int in ``[low, high]``; NumPy integers are accepted."""
    if (not isinstance(value, int | np.integer) or isinstance(value, bool)
            or not low <= value <= high):
        raise ValueError(f"{where}: {name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def _check_per_step_args(where: str, per_step_args: tuple, steps: int) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(per_step_args):
        shape = jnp.shape(leaf)
        if not shape or shape[0] != steps:
            found = shape[0] if shape else "no leading axis (a scalar)"
            raise ValueError(f"{where}: per_step_args leaf {jax.tree_util.keystr(path)} has "
                             f"leading axis {found}, expected steps={steps}")


def _resolve_checkpointing(where: str, checkpoint_every: Any, steps: int) -> int | None:
    if checkpoint_every is None:
        return None
    if checkpoint_every == "sqrt":
        return max(1, math.isqrt(steps - 1) + 1)
    return _check_int(where, "checkpoint_every", checkpoint_every, 1, steps)


def unrolled_hypergrad(inner_loss: Callable, outer_loss: Callable, params0: PyTree,
                       hparams: PyTree, optimizer: Any, steps: int, inner_args: tuple = (),
                       outer_args: tuple = (), per_step_args: tuple | None = None,
                       mode: str = "mixflow", checkpoint_every: int | str | None = None,
                       truncate: int | None = None, on_failure: str = "warn",
                       opt_state: PyTree | None = None) -> tuple[PyTree, UnrolledInfo]:
    """Meta-gradient of ``outer_loss(θ_T, λ)`` through ``steps`` optax updates of ``inner_loss``.

    Args:
      inner_loss: ``inner_loss(params, hparams, *inner_args, *step_args) -> scalar``.
      outer_loss: ``outer_loss(params, hparams, *outer_args) -> scalar``, evaluated at θ_T.
      params0: θ_0 (not differentiated).
      hparams: λ, any pytree of floating arrays.
      optimizer: an optax ``GradientTransformation``, or a function ``hparams -> transformation``
        so that λ may live in the update rule (a learning rate, a learned optimizer's weights).
        A ``GradientTransformationExtraArgs`` also receives ``loss=`` (the inner loss value).
      steps: number of inner steps T >= 1.
      inner_args: data used at every step.
      outer_args: data of the outer loss.
      per_step_args: a tuple of pytrees whose leaves have a leading axis of length ``steps``;
        slice t is appended to ``inner_args`` at step t (minibatches).
      mode: ``"mixflow"`` (default: forward-over-reverse backward steps, storing only each step's
        inputs) or ``"reverse"`` (plain autodiff through ``lax.scan``). Both give the same
        gradient up to round-off.
      checkpoint_every: ``None``, an integer k (store every k-th state, recompute the rest in the
        backward pass), or ``"sqrt"`` (k = ⌈√T⌉ for the T differentiated steps, memory growing
        as √T).
      truncate: backpropagate through the last ``truncate`` steps only (the earlier steps run
        without gradient); ``None`` means through all steps.
      opt_state: the inner optimizer's state at θ_0 (not differentiated); ``None`` means
        ``optimizer.init(params0)``. Pass the previous call's ``info.params`` and
        ``info.opt_state`` to unroll truncations of one long inner run.
      on_failure: when the result cannot be trusted (``info.converged`` is False: something is
        not finite, or the inner loss blew up): ``"warn"`` (default, one
        :class:`hvp.SolveWarning` line attributed to the caller), ``"raise"``
        (:class:`hvp.SolveError`) or ``"ignore"`` (``info`` alone says so).

    Returns:
      ``(grad, info)``: the meta-gradient shaped like ``hparams`` and an :class:`UnrolledInfo`.
    """
    where = "bilevel.unrolled_hypergrad"
    _common.check_on_failure(where, on_failure)
    if mode not in MODES:
        raise ValueError(f"{where}: mode must be one of {MODES}, got {mode!r}")
    steps = _check_int(where, "steps", steps, 1, 2**31 - 1)
    inner_args, outer_args = tuple(inner_args), tuple(outer_args)
    has_per_step = per_step_args is not None
    per_step_args = tuple(per_step_args) if has_per_step else ()
    if has_per_step:
        _check_per_step_args(where, per_step_args, steps)
    first_step_args = inner_args + tuple(jax.tree_util.tree_map(lambda x: x[0], per_step_args))
    _common.check_losses(where, inner_loss, outer_loss, params0, hparams, first_step_args,
                         outer_args)
    if truncate is not None:
        truncate = _check_int(where, "truncate", truncate, 1, steps)
    live_steps = steps if truncate is None else truncate
    # Only the differentiated steps are checkpointed, so "sqrt" refers to their number.
    chunk = _resolve_checkpointing(where, checkpoint_every, live_steps)
    value_and_grad = (_mixflow_value_and_grad if mode == "mixflow" else _plain_value_and_grad)(
        inner_loss)
    xs = per_step_args if has_per_step else None

    def run(h, carry, xs_segment, length, segment_chunk):
        transformation = resolve_optimizer(where, optimizer, h)
        step = _make_step(value_and_grad, transformation, h, inner_args, has_per_step)
        return _scan(step, carry, xs_segment, length, segment_chunk)

    def split(xs_all, start, stop):
        if xs_all is None:
            return None
        return jax.tree_util.tree_map(lambda x: x[start:stop], xs_all)

    if opt_state is not None:
        expected = jax.eval_shape(lambda h: resolve_optimizer(where, optimizer, h).init(params0),
                                  hparams)
        _checks.check_same_structure(where, "opt_state", opt_state, "optimizer.init(params0)",
                                     expected)
        opt_state = jax.lax.stop_gradient(opt_state)

    def meta_objective(h):
        start = (resolve_optimizer(where, optimizer, h).init(params0) if opt_state is None
                 else opt_state)
        carry = (params0, start)
        frozen_steps = steps - live_steps
        losses = []
        if frozen_steps:
            # The truncated head sees λ through stop_gradient: no residuals are stored for it.
            carry, head = run(jax.lax.stop_gradient(h), carry, split(xs, 0, frozen_steps),
                              frozen_steps, None)
            carry = jax.lax.stop_gradient(carry)
            losses.append(head)
        carry, tail = run(h, carry, split(xs, frozen_steps, steps), live_steps, chunk)
        losses.append(tail)
        value = outer_loss(carry[0], h, *outer_args)
        return value, (jnp.concatenate(losses), carry)

    (value, (losses, (params_final, state_final))), grad = jax.value_and_grad(
        meta_objective, has_aux=True)(hparams)
    finite = _common.tree_all_finite(grad) & jnp.isfinite(value)
    converged = finite & _inner_loss_held(losses)
    info = UnrolledInfo(converged=converged, finite=finite, outer_loss=value,
                        inner_losses=losses, params=params_final, opt_state=state_final)
    _common.report_failure(where, ~converged, _describe_failure,
                           (finite, value, losses[0], losses[-1]), on_failure)
    return grad, info


def _inner_loss_held(losses: jax.Array) -> jax.Array:
    """Every inner loss is finite and the last exceeds the first by at most
    ``DIVERGENCE · |L_0|``: from the losses the unroll computed anyway, no extra pass."""
    first, last = losses[0], losses[-1]
    return jnp.all(jnp.isfinite(losses)) & (last - first <= DIVERGENCE * jnp.abs(first))


def _describe_failure(finite, value, first, last) -> str:
    if not finite:
        return (f"the meta-gradient or the outer loss ({float(value):.3e}) is not finite: the "
                f"inner loop may have diverged")
    return (f"the inner loop diverged: the inner loss went from {float(first):.3e} to "
            f"{float(last):.3e} (more than {DIVERGENCE:g} times its start); lower the inner "
            f"learning rate")
