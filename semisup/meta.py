"""The meta-step: a weighting's trainable parameters φ (the confidence network's) follow the
implicit hypergradient (:func:`bilevel.hypergrad`) of a labelled meta loss, whose inner problem
is FixMatch's weighted loss.

The meta loss (``Config.meta_data``) is the cross-entropy on a held-out labelled validation set,
or, as in DS3L (Guo et al. 2020), on the labelled training set itself, which spends no labels on
the meta-objective. :class:`ParametricWeighting` gives this meta-step to any weighting that
scores images with parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import bilevel
from semisup import models
from semisup.batch import draw
from semisup.config import Config, State, meta_optimizer
from semisup.losses import (
    classifier_logits,
    cross_entropy,
    fixmatch_loss,
    normalise,
    sum_squares,
    validation_loss,
)
from semisup.protocol import Split
from semisup.solvers import make_solver
from semisup.weighting import WEIGHTINGS, Weighting


def meta_set(config: Config, data: Split) -> tuple[jax.Array, jax.Array]:
    """The images and labels of the meta loss (see ``Config.meta_data``)."""
    if config.meta_data == "labelled":
        return data.x_labelled, data.y_labelled
    return data.x_validation, data.y_validation


def weight_function(weighting: Weighting, config: Config) -> Callable[..., jax.Array]:
    """``(φ, weak, weak_probs, mask) -> weights``: the weights (normalised as
    ``config.weight_norm`` says) of a weighting with trainable parameters φ, as a differentiable
    function of φ."""
    def weights(phi, weak, probs, mask):
        raw = weighting.weights(weighting.param_scores(config, phi, weak, probs), mask)
        return normalise(raw, mask) if config.weight_norm == "mask" else raw

    return weights


def meta_losses(config: Config, weighting=None):
    """``(inner_loss, outer_loss, split)`` of the confidence network's bilevel problem.

    The inner loss is the weighted FixMatch loss (plus the weight decay the optimizer applies) as
    a function of the curvature parameters θ and the confidence network φ; the outer loss is the
    meta set's cross-entropy. With ``curvature="last"`` θ is the head, and the body's features of
    every batch are inputs (computed once, held fixed); with ``"all"`` θ is the whole classifier.
    ``split(params, batch) -> (θ, inner_args, outer_args)`` with ``batch = (x_l, y_l, weak,
    weak_probs, strong, pseudo, mask, x_meta, y_meta)``; ``weak_probs`` (the classifier's
    probabilities of the weak view, held fixed like the pseudo-labels) is read only with
    ``conf_inputs="image+softmax"``.

    ``weighting(φ, weak, weak_probs, mask) -> weights`` replaces the confidence network (see
    :func:`weight_function`): with ``lambda w, *_: w`` the hyperparameters are the per-image
    weights themselves, and the hypergradient is each image's influence on the meta loss.
    """
    if weighting is None:
        weighting = weight_function(WEIGHTINGS["confnet"](), config)

    def weighted(theta_logits, phi, y_l, weak, probs, pseudo, mask, lab_logits):
        weights = weighting(phi, weak, probs, mask)
        return fixmatch_loss(lab_logits, y_l, theta_logits, pseudo, mask, weights,
                             config.lambda_u)[0]

    if config.curvature == "last":
        def inner(theta, phi, f_l, y_l, weak, probs, f_s, pseudo, mask):
            loss = weighted(models.head(theta, f_s), phi, y_l, weak, probs, pseudo, mask,
                            models.head(theta, f_l))
            return loss + 0.5 * config.weight_decay * sum_squares(theta)

        def outer(theta, phi, f_v, y_v):
            return jnp.mean(cross_entropy(models.head(theta, f_v), y_v))

        def split(params, batch):
            x_l, y_l, weak, probs, strong, pseudo, mask, x_v, y_v = batch
            feats = functools.partial(models.features, params["body"], widths=config.widths,
                                      hidden=config.hidden)
            return (params["head"], (feats(x_l), y_l, weak, probs, feats(strong), pseudo, mask),
                    (feats(x_v), y_v))
    else:
        def inner(theta, phi, x_l, y_l, weak, probs, strong, pseudo, mask):
            loss = weighted(classifier_logits(config, theta, strong), phi, y_l, weak, probs,
                            pseudo, mask, classifier_logits(config, theta, x_l))
            return loss + 0.5 * config.weight_decay * sum_squares(theta)

        def outer(theta, phi, x_v, y_v):
            return validation_loss(config, theta, x_v, y_v)

        def split(params, batch):
            x_l, y_l, weak, probs, strong, pseudo, mask, x_v, y_v = batch
            return params, (x_l, y_l, weak, probs, strong, pseudo, mask), (x_v, y_v)
    return inner, outer, split


def meta_gradient(config: Config, params, conf_params, batch, key=None, weighting=None):
    """The implicit hypergradient of the meta loss with respect to the confidence network (or
    the parameters of ``weighting``, a :func:`weight_function`).

    ``batch = (x_l, y_l, weak, weak_probs, strong, pseudo, mask, x_meta, y_meta)`` (see
    :func:`meta_losses`). Returns ``(grad, info)`` from :func:`bilevel.hypergrad`.
    """
    inner, outer, split = meta_losses(config, weighting)
    theta, inner_args, outer_args = split(params, batch)
    return bilevel.hypergrad(inner, outer, theta, conf_params, inner_args, outer_args,
                             solver=make_solver(config.solver, config.maxiter, config.damping),
                             damping=config.damping, key=key, on_failure="ignore",
                             stationarity_tol=None)


def meta_batch(config: Config, params, key, data: Split):
    """A fresh batch in :func:`meta_losses`' layout, and the unlabelled images' indices."""
    b = draw(config, params, key, data)
    return (b.x_labelled, b.y_labelled, b.weak, jax.nn.softmax(b.weak_logits), b.strong,
            b.pseudo, b.mask, *meta_set(config, data)), b.index


def implicit_meta_step(weighting: Weighting, config: Config, state: State, data: Split
                       ) -> State:
    """One meta-step of ``weighting``'s parameters ``state.conf_params`` on a fresh batch: the
    :func:`meta_gradient` through the meta-optimiser; a non-finite gradient is skipped and
    counted in ``state.meta_failures``."""
    key, k_batch, k_solve = jax.random.split(jax.random.wrap_key_data(state.key), 3)
    batch, _ = meta_batch(config, state.params, k_batch, data)
    grad, info = meta_gradient(config, state.params, state.conf_params, batch, k_solve,
                               weight_function(weighting, config))
    ok = info.finite
    grad = jax.tree_util.tree_map(lambda g: jnp.where(ok, g, 0.0), grad)
    updates, meta_opt_state = meta_optimizer(config).update(grad, state.meta_opt_state,
                                                            state.conf_params)
    return state._replace(conf_params=optax.apply_updates(state.conf_params, updates),
                          meta_opt_state=meta_opt_state, key=jax.random.key_data(key),
                          hvp_count=state.hvp_count + info.hvp_count,
                          meta_steps=state.meta_steps + 1,
                          meta_failures=state.meta_failures + (~ok).astype(jnp.int32))


class ParametricWeighting(Weighting):
    """A weighting that scores images with trainable parameters φ, trained by the confidence
    network's meta-step (:func:`implicit_meta_step`) on the meta set.

    A subclass writes :meth:`~semisup.Weighting.init_params` and
    :meth:`~semisup.Weighting.param_scores` (and :meth:`~semisup.Weighting.weights` if its
    scores are not weights yet); the scores of a batch are those of its weak view.
    """

    uses_validation = True
    meta_step = implicit_meta_step

    def scores(self, config: Config, state: State, data: Split, batch) -> jax.Array:
        return self.param_scores(config, state.conf_params, batch.weak,
                                 jax.nn.softmax(batch.weak_logits))
