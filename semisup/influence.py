"""The exact, unrolled influence of each unlabelled image on a loss after a whole FixMatch run
(:func:`unrolled_influence`): what the one-step (``l2rw``) and implicit (``confnet``)
meta-gradients approximate."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel
from semisup.batch import sample
from semisup.config import Config, State, optimizer
from semisup.losses import batch_loss, classifier_logits, pseudo_labels, validation_loss
from semisup.protocol import Split


def _batch_keys(key: jax.Array, steps: int) -> jax.Array:
    """The batch keys (raw) of the next ``steps`` inner steps from the state key ``key``, drawn
    as :func:`semisup.fixmatch.period`'s inner steps draw them."""
    def split(key, _):
        key, k_batch = jax.random.split(key)
        return key, jax.random.key_data(k_batch)

    return jax.lax.scan(split, jax.random.wrap_key_data(key), None, length=steps)[1]


def _table_loss(config: Config, params, weights, x_l, y_l, index, weak, strong):
    """FixMatch's loss on one batch with image ``i``'s unlabelled term scaled by ``weights[i]``."""
    pseudo, mask = pseudo_labels(classifier_logits(config, jax.lax.stop_gradient(params), weak),
                                 config.threshold)
    return batch_loss(config, params, x_l, y_l, strong, pseudo, mask, weights[index])


@functools.partial(jax.jit, static_argnames=("config", "steps", "truncate", "mode",
                                             "checkpoint_every"))
def _unrolled_scan(config, params, key, data, x_eval, y_eval, steps, truncate, mode,
                   checkpoint_every):
    # Every step's batch is drawn up front (memory: `steps` batches), so that the augmentations
    # stay out of the differentiated steps.
    batches = jax.vmap(lambda k: sample(config, jax.random.wrap_key_data(k), data))(
        _batch_keys(key, steps))
    weights = jnp.ones((data.x_unlabelled.shape[0],), jnp.result_type(float))
    return bilevel.unrolled_hypergrad(
        functools.partial(_table_loss, config),
        lambda p, _, x, y: validation_loss(config, p, x, y), params, weights,
        optimizer(config), steps, outer_args=(x_eval, y_eval), per_step_args=batches,
        mode=mode, checkpoint_every=checkpoint_every, truncate=truncate)


def _table_step(config: Config, carry, weights, k_batch, data):
    """One optimizer step of :func:`_table_loss` on the batch of ``k_batch``, and its loss."""
    params, opt_state = carry
    batch = jax.lax.stop_gradient(sample(config, jax.random.wrap_key_data(k_batch), data))
    loss, grads = jax.value_and_grad(_table_loss, argnums=1)(config, params, weights, *batch)
    updates, opt_state = optimizer(config).update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss


@functools.partial(jax.jit, static_argnums=0)
def _table_step_vjp(config: Config, carry, weights, k_batch, data, cotangent):
    """The cotangents of ``(carry, weights)`` from the cotangent of the step's output carry."""
    _, vjp = jax.vjp(lambda c, w: _table_step(config, c, w, k_batch, data)[0], carry, weights)
    return vjp(cotangent)


_table_step_jit = jax.jit(_table_step, static_argnums=0)
_eval_value_and_grad = jax.jit(jax.value_and_grad(validation_loss, argnums=1), static_argnums=0)


def _unrolled_python(config, params, key, data, x_eval, y_eval, steps, truncate):
    """:func:`_unrolled_scan` with plain reverse mode driven step by step from Python: every
    step's carry is stored (``steps`` copies of the parameters and optimizer state), then one
    jitted VJP per step runs backwards."""
    keys = _batch_keys(key, steps)
    weights = jnp.ones((data.x_unlabelled.shape[0],), jnp.result_type(float))
    carries, losses = [(params, optimizer(config).init(params))], []
    for t in range(steps):
        carry, loss = _table_step_jit(config, carries[-1], weights, keys[t], data)
        carries.append(carry)
        losses.append(loss)
    final = carries[-1][0]
    value, params_ct = _eval_value_and_grad(config, final, x_eval, y_eval)
    cotangent = (params_ct, jax.tree_util.tree_map(
        lambda x: jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.inexact) else
        np.zeros(x.shape, jax.dtypes.float0), carries[-1][1]))
    grad = jnp.zeros_like(weights)
    for t in reversed(range(steps - (truncate or steps), steps)):
        cotangent, weights_ct = _table_step_vjp(config, carries[t], weights, keys[t], data,
                                                cotangent)
        grad = grad + weights_ct
    finite = jnp.all(jnp.isfinite(grad)) & jnp.isfinite(value)
    return grad, bilevel.UnrolledInfo(converged=finite, finite=finite, outer_loss=value,
                                      inner_losses=jnp.stack(losses), params=final,
                                      opt_state=carries[-1][1])


def unrolled_influence(config: Config, state: State, data: Split, x_eval, y_eval,
                       steps: int | None = None, truncate: int | None = None,
                       mode: str = "mixflow", checkpoint_every: int | str | None = "sqrt",
                       loop: str = "scan"):
    """The exact derivative of a loss after a whole FixMatch run with respect to each unlabelled
    image's weight.

    The run is FixMatch from ``state`` for ``steps`` inner steps (default ``config.steps``)
    with image ``i``'s unlabelled loss scaled by ``w_i``; at ``w = 1`` it is the run
    :func:`semisup.run_periods` makes with ``method="fixmatch"``, step for step (same batches,
    augmentations, pseudo-labels and learning-rate schedule). Returned is ``dL/dw`` at
    ``w = 1``, where ``L`` is the mean cross-entropy of ``(x_eval, y_eval)`` under the final
    (not the EMA) classifier, differentiated through every step (by
    :func:`bilevel.unrolled_hypergrad`, or see ``loop``). The pseudo-labels and the mask are
    piecewise constant in ``w`` and carry no derivative. ``−dL/dw_i > 0`` means that more weight
    on image ``i`` would have lowered ``L``; images never drawn or never masked get 0.

    Through a long run the derivative can explode: the product of the steps' Jacobians grows
    exponentially wherever training is locally unstable (a CNN over 2000 steps of
    SGD-Nesterov: ``|dL/dw|`` from 1e1 to overflow, by seed, against 1e-4 for an MLP).
    ``info.finite`` flags overflow; ``truncate`` gives the derivative through the last steps
    only, which stays finite.

    This is what the one-step (``l2rw``) and implicit (``confnet``) meta-gradients
    approximate. With ``(x_eval, y_eval)`` the test set it is the influence on the quantity
    the weighting is meant to improve.

    Args:
      config: the run's settings; ``method`` and the meta-step fields are not read.
      state: a state fresh from :func:`init` (the optimizer's schedule starts at step 0).
      data: the split (one run, not stacked).
      x_eval, y_eval: the images and integer labels of ``L``.
      steps: inner steps of the run.
      truncate: differentiate through the last ``truncate`` steps only.
      mode, checkpoint_every: as in :func:`bilevel.unrolled_hypergrad`. The batches of all
        ``steps`` are drawn before the run, so memory grows with ``steps × (1 + 2μ)B`` images
        besides what the mode stores.
      loop: ``"scan"`` (one jitted ``lax.scan``, through :func:`bilevel.unrolled_hypergrad`) or
        ``"python"`` (a jitted step and a jitted VJP per step, driven from Python, in plain
        reverse mode; ``mode`` and ``checkpoint_every`` are not read). XLA on the CPU runs
        convolutions inside a loop body tens of times slower than outside one (see the
        drivers of :mod:`semisup.fixmatch`), so ``"python"`` is the one to use there for a
        CNN; it stores every step's parameters and optimizer state.

    Returns:
      ``(grad, info)``: ``grad`` of shape ``(num_unlabelled,)`` and a
      :class:`bilevel.UnrolledInfo` (``info.params`` is the final classifier).
    """
    where = "semisup.unrolled_influence"
    steps = config.steps if steps is None else steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"{where}: steps must be an integer >= 1, got {steps!r}")
    try:
        step = int(state.step)
    except jax.errors.ConcretizationTypeError:
        step = 0  # traced: the caller vouches for a fresh state
    if step != 0:
        raise ValueError(f"{where}: state must be fresh from semisup.init (step 0), got a state "
                         f"at step {step}; use truncate= to differentiate a later window")
    x_eval, y_eval = jnp.asarray(x_eval), jnp.asarray(y_eval)
    image_shape = tuple(data.x_unlabelled.shape[-3:])
    if x_eval.ndim != 4 or tuple(x_eval.shape[1:]) != image_shape:
        raise ValueError(f"{where}: x_eval must have shape (n, *{image_shape}), got "
                         f"{tuple(x_eval.shape)}")
    if y_eval.shape != x_eval.shape[:1] or not jnp.issubdtype(y_eval.dtype, jnp.integer):
        raise ValueError(f"{where}: y_eval must be integer labels of shape ({x_eval.shape[0]},), "
                         f"got {y_eval.dtype} {tuple(y_eval.shape)}")
    if loop not in ("scan", "python"):
        raise ValueError(f"{where}: loop must be 'scan' or 'python', got {loop!r}")
    if truncate is not None and (not isinstance(truncate, int) or isinstance(truncate, bool)
                                 or not 1 <= truncate <= steps):
        raise ValueError(f"{where}: truncate must be None or an integer in [1, steps={steps}], "
                         f"got {truncate!r}")
    data = jax.tree_util.tree_map(jnp.asarray, data)
    if loop == "python":
        return _unrolled_python(config, state.params, state.key, data, x_eval, y_eval, steps,
                                truncate)
    return _unrolled_scan(config, state.params, state.key, data, x_eval, y_eval, steps,
                          truncate, mode, checkpoint_every)


