"""What a run carries between steps (:class:`State`) and the two optimisers its settings
(:class:`Config`, declared in the JAX-free :mod:`semisup.options` and kept here under its old
name ``semisup.config.Config``) define."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from semisup.options import Config

__all__ = ["Config", "State", "meta_optimizer", "optimizer"]


class State(NamedTuple):
    """Everything a run carries between steps (arrays only, so it checkpoints and vmaps).

    ``conf_params`` and ``meta_opt_state`` are the weighting's trainable parameters (the
    confidence network's for ``confnet``) and their meta-optimiser's state; every method's
    state has them, so that all states share one layout. ``score_sum``/``weight_sum``/
    ``mask_sum``/``seen`` accumulate, per unlabelled image, the method's raw score (before
    normalisation and mask), the weight it actually received (normalised and masked), how often
    it passed the mask and how often it was drawn.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    conf_params: Any
    meta_opt_state: Any
    key: jax.Array
    score_sum: jax.Array
    weight_sum: jax.Array
    mask_sum: jax.Array
    seen: jax.Array
    hvp_count: jax.Array
    meta_steps: jax.Array
    meta_failures: jax.Array


def optimizer(config: Config) -> optax.GradientTransformation:
    """The classifier's optimiser: SGD-Nesterov on the loss plus weight decay, with the learning
    rate ``lr · cos(7πk / 16K)``."""
    def schedule(step):
        return config.lr * jnp.cos(7.0 * jnp.pi * step / (16.0 * config.steps))

    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(schedule, momentum=config.momentum, nesterov=True))


def meta_optimizer(config: Config) -> optax.GradientTransformation:
    """The weighting's meta-optimiser (``meta_optimizer``, ``meta_lr``,
    ``meta_weight_decay``)."""
    if config.meta_optimizer == "sgd":
        return optax.chain(optax.add_decayed_weights(config.meta_weight_decay),
                           optax.sgd(config.meta_lr))
    if config.meta_weight_decay:
        return optax.adamw(config.meta_lr, weight_decay=config.meta_weight_decay)
    return optax.adam(config.meta_lr)
