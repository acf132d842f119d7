"""FixMatch with per-image weights on the unlabelled loss: the training loop.

Each inner step draws a batch, weights its unlabelled images by ``config.method``'s
:class:`semisup.Weighting` and takes an SGD step on FixMatch's weighted loss; every
``meta_every`` steps, a weighting with a meta-step (the confidence network) takes one. The
pieces live in their own modules:

=====================  =========================================================================
:mod:`semisup.config`  :class:`Config`, :class:`State`, the two optimisers
semisup.weighting      the :class:`~semisup.Weighting` protocol and the registry
                       :data:`~semisup.WEIGHTINGS` (JAX-free)
semisup.strategies     the built-in weightings (``supervised``, ``fixmatch``, ``oracle``,
                       ``softmax``, ``l2rw``, ``confnet``)
semisup.losses         FixMatch's loss, pseudo-labels, normalisation, the confidence weights
semisup.batch          drawing and augmenting a step's batch
semisup.solvers        the inverse-HVP solvers of a meta-step
semisup.meta           the meta losses, the implicit meta-gradient and meta-step
semisup.influence      the exact unrolled influence of each unlabelled image
=====================  =========================================================================

This module keeps the names those modules took from it (``semisup.fixmatch.Config``,
``meta_gradient``, ...), so that code written against it runs unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from semisup import models
from semisup.batch import Batch, draw, sample
from semisup.config import Config, State, meta_optimizer, optimizer
from semisup.influence import unrolled_influence
from semisup.losses import (
    batch_loss,
    classifier_logits,
    confidence_weights,
    cross_entropy,
    fixmatch_loss,
    normalise,
    pseudo_labels,
    validation_loss,
)
from semisup.meta import (
    ParametricWeighting,
    implicit_meta_step,
    meta_gradient,
    meta_losses,
    meta_set,
    weight_function,
)
from semisup.options import CONF_INPUTS, CURVATURES, META_DATA, META_OPTIMIZERS
from semisup.protocol import Split
from semisup.solvers import (
    REFERENCE,
    SOLVER_SETTINGS,
    SOLVER_TOL,
    SOLVERS,
    make_solver,
    usable_solver,
)
from semisup.strategies import ConfNet
from semisup.weighting import (
    METHODS,
    USES_VALIDATION,
    WEIGHTINGS,
    Weighting,
    register_weighting,
)

__all__ = [
    "CONF_INPUTS", "CURVATURES", "META_DATA", "META_OPTIMIZERS", "METHODS", "REFERENCE",
    "SOLVERS", "SOLVER_SETTINGS", "SOLVER_TOL", "USES_VALIDATION", "WEIGHTINGS", "Batch",
    "Config", "ParametricWeighting", "State", "Weighting", "accuracy", "batch_loss",
    "confidence_scores", "confidence_weights", "cross_entropy", "draw", "fixmatch_loss",
    "implicit_meta_step", "init", "init_seeds", "make_solver", "meta_gradient", "meta_losses",
    "meta_optimizer", "meta_set", "normalise", "optimizer", "period", "predict", "pseudo_labels",
    "register_weighting", "run_periods", "run_seeds", "sample", "unrolled_influence", "unstack",
    "usable_solver", "validation_loss", "weight_function", "weighting_scores",
]

# The private names this module had before the split (experiments and tests call them).
_logits, _sample, _optimizer, _meta_optimizer = classifier_logits, sample, optimizer, meta_optimizer


# --------------------------------------------------------------------------------------------
# Initialisation.


def _raw_key(key: jax.Array) -> jax.Array:
    """The uint32 data of ``key`` (typed or raw), the form the state stores and checkpoints."""
    return jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key


def _weighting_params(config: Config, key, image_shape, num_classes):
    """The weighting's initial parameters; a weighting without any gets an (unused) confidence
    network's, so that every method's :class:`State` has the layout its checkpoints have."""
    params = config.weighting.init_params(config, key, image_shape, num_classes)
    if params is None:
        params = ConfNet().init_params(config, key, image_shape, num_classes)
    return params


def init(config: Config, key: jax.Array, data: Split) -> State:
    """The initial :class:`State` for ``data`` (shapes only are read from it)."""
    key_model, key_conf, key_run = jax.random.split(key, 3)
    image_shape = tuple(data.x_labelled.shape[-3:])
    try:
        num_classes = int(np.max(np.asarray(data.y_labelled))) + 1
    except jax.errors.TracerArrayConversionError:
        raise TypeError("semisup.init: data.y_labelled must be concrete (the class count is "
                        "read from it); call init outside jit/vmap or vmap over the key only"
                        ) from None
    params = models.init_classifier(key_model, image_shape, num_classes, config.widths,
                                    config.hidden)
    heads = config.weighting.init_heads(config, jax.random.fold_in(key_model, 1), num_classes)
    if heads is not None:
        params = {**params, "aux": heads}
    conf = _weighting_params(config, key_conf, image_shape, num_classes)
    n = data.x_unlabelled.shape[-4]
    zeros = jnp.zeros((n,), jnp.float32)
    return State(jnp.zeros((), jnp.int32), params, optimizer(config).init(params), params,
                 conf, meta_optimizer(config).init(conf), _raw_key(key_run),
                 zeros, zeros, zeros, zeros, jnp.zeros((), jnp.int32),
                 jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


# --------------------------------------------------------------------------------------------
# One inner step and one meta-step.


def _accumulate(total, index, values):
    return total.at[index].add(values.astype(total.dtype))


def _inner_step(config: Config, state: State, data: Split) -> tuple[State, jax.Array]:
    weighting = config.weighting
    key, k_batch = jax.random.split(jax.random.wrap_key_data(state.key))
    params = state.params
    if not weighting.uses_unlabelled:
        x_l, y_l, index, _, _ = sample(config, k_batch, data)

        def loss_fn(p):
            return jnp.mean(cross_entropy(classifier_logits(config, p, x_l), y_l))
        scores = mask = weights = jnp.zeros(index.shape, jnp.float32)
    else:
        batch = draw(config, params, k_batch, data)
        index, mask = batch.index, batch.mask
        scores = jax.lax.stop_gradient(weighting.scores(config, state, data, batch))
        weights = weighting.weights(scores, mask)
        if config.weight_norm == "mask":
            weights = normalise(weights, mask)

        def loss_fn(p):
            return weighting.loss(config, p, batch, weights)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer(config).update(grads, state.opt_state, params)
    params = optax.apply_updates(params, updates)
    ema = jax.tree_util.tree_map(lambda e, p: config.ema * e + (1 - config.ema) * p,
                                 state.ema_params, params)
    state = state._replace(
        step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
        key=jax.random.key_data(key), score_sum=_accumulate(state.score_sum, index, scores),
        weight_sum=_accumulate(state.weight_sum, index, weights * mask),
        mask_sum=_accumulate(state.mask_sum, index, mask),
        seen=_accumulate(state.seen, index, jnp.ones_like(mask)))
    return state, loss


def _meta_step(config: Config, state: State, data: Split) -> State:
    """The weighting's meta-step, skipped (the state unchanged) before ``config.meta_start``
    inner steps."""
    meta_step = config.weighting.meta_step
    if not config.meta_start:
        return meta_step(config, state, data)
    return jax.lax.cond(state.step >= config.meta_start,
                        lambda s: meta_step(config, s, data), lambda s: s, state)


# --------------------------------------------------------------------------------------------
# Periods and their drivers.


def period(config: Config, state: State, data: Split) -> tuple[State, jax.Array]:
    """One period: ``meta_every`` inner steps, then the weighting's meta-step if it has one
    (``confnet``).

    Pure; returns the new state and the mean training loss of the inner steps.
    """
    return _period(_inner_step, _meta_step, config, state, data)


def _period(step, meta, config: Config, state: State, data: Split):
    """:func:`period` with the inner step and the meta-step given (jitted, vmapped, ...)."""
    losses = []
    for _ in range(config.meta_every):
        state, loss = step(config, state, data)
        losses.append(loss)
    if config.weighting.meta_step is not None:
        state = meta(config, state, data)
    return state, jnp.mean(jnp.stack(losses), axis=0)


# The drivers below jit one inner step and one meta-step and loop in Python rather than jitting a
# ``lax.scan`` over steps: XLA on the CPU runs convolutions inside a loop body about 40× slower
# than outside one (measured here: 1.6 s against 38 ms for five SGD steps of the default CNN),
# and separate jits keep the compile time independent of ``meta_every``.
_step_jit = jax.jit(_inner_step, static_argnums=0)
_meta_jit = jax.jit(_meta_step, static_argnums=0)
_step_seeds = jax.jit(jax.vmap(_inner_step, in_axes=(None, 0, 0)), static_argnums=0)
_meta_seeds = jax.jit(jax.vmap(_meta_step, in_axes=(None, 0, 0)), static_argnums=0)


def _drive(step, meta, config, state, data, num_periods, callback):
    data = jax.tree_util.tree_map(jnp.asarray, data)
    losses = []
    for _ in range(num_periods):
        state, loss = _period(step, meta, config, state, data)
        losses.append(loss)
        if callback is not None:
            callback(state)
    return state, np.asarray(jnp.stack(losses)) if losses else np.zeros((0,), np.float32)


def run_periods(config: Config, state: State, data: Split, num_periods: int,
                callback=None) -> tuple[State, np.ndarray]:
    """Run ``num_periods`` periods (see :func:`period`) of one run, jitted step by step.

    Args:
      config, state, data: the run.
      num_periods: how many periods to run.
      callback: optional ``callback(state)`` after each period (progress bars, checkpoints).

    Returns:
      The new state and the mean training loss of each period.
    """
    return _drive(_step_jit, _meta_jit, config, state, data, num_periods, callback)


def init_seeds(config: Config, keys: list, data: Split) -> State:
    """Initial states of several runs, stacked along a leading seed axis (one per key).

    ``data`` is the stacked splits (:func:`semisup.protocol.stack_splits`)."""
    first = jax.tree_util.tree_map(lambda a: np.asarray(a)[0], data)
    states = [init(config, key, first) for key in keys]
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *states)


def run_seeds(config: Config, states: State, data: Split, num_periods: int, callback=None
              ) -> tuple[State, np.ndarray]:
    """:func:`run_periods` for stacked runs (every step ``vmap``-ed over the seed axis).

    Returns the new states and the losses ``(num_periods, seeds)``."""
    return _drive(_step_seeds, _meta_seeds, config, states, data, num_periods, callback)


def unstack(states: State, index: int) -> State:
    """The ``index``-th run of stacked states."""
    return jax.tree_util.tree_map(lambda a: a[index], states)


# --------------------------------------------------------------------------------------------
# Evaluation.


@functools.partial(jax.jit, static_argnums=(0,))
def predict(config: Config, params, images: jax.Array) -> jax.Array:
    """Class probabilities of ``images``."""
    return jax.nn.softmax(classifier_logits(config, params, images))


@functools.partial(jax.jit, static_argnums=(0,))
def confidence_scores(config: Config, conf_params, images: jax.Array, params=None) -> jax.Array:
    """The confidence network's logits of ``images`` (no augmentation); ``params``, the
    classifier's, are needed with ``conf_inputs="image+softmax"``."""
    probs = None
    if config.conf_inputs == "image+softmax":
        if params is None:
            raise ValueError("semisup.confidence_scores: params (the classifier's) are needed "
                             "with conf_inputs='image+softmax'")
        probs = jax.nn.softmax(classifier_logits(config, params, images))
    return models.confidence(conf_params, images, config.conf_widths, probs)


@functools.partial(jax.jit, static_argnums=(0,))
def weighting_scores(config: Config, conf_params, params, images: jax.Array) -> jax.Array:
    """The raw scores of ``images`` (no augmentation) under the trainable parameters
    ``conf_params`` of a weighting that has them (:meth:`semisup.Weighting.param_scores`), with
    the classifier ``params``' class probabilities of them."""
    probs = jax.nn.softmax(classifier_logits(config, params, images))
    return config.weighting.param_scores(config, conf_params, images, probs)


def accuracy(config: Config, params, images, labels, batch: int = 1024) -> float:
    """Classification accuracy, evaluated in batches (NaN for an empty set)."""
    if len(images) == 0:
        return float("nan")
    correct = 0
    for start in range(0, len(images), batch):
        probs = predict(config, params, jnp.asarray(images[start:start + batch]))
        correct += int(jnp.sum(jnp.argmax(probs, -1) == jnp.asarray(labels[start:start + batch])))
    return correct / len(images)
