"""The built-in weightings (:class:`semisup.Weighting`), registered under the names
:data:`semisup.weighting.BUILTIN` lists:

=============  ==================================================================================
supervised     no unlabelled loss
fixmatch       ``w = 1``
oracle         ``w = 1[ID]`` (the upper bound: OOD images removed)
softmax        ``w ∝ max p_weak`` (confidence weighting)
l2rw           ``w ∝ max(0, ∇_θ ℓ_i · ∇_θ L_val)``: one-step look-ahead (Ren et al. 2018, L2RW;
               Guo et al. 2020, DS3L), recomputed on every batch
confnet        ``w ∝ 2·sigmoid(z_i − z̄)``, ``z = c_φ(x_weak[, p_weak])``: a small CNN (optionally
               also reading the classifier's weak-view probabilities) trained every K steps by
               the implicit hypergradient of the meta loss (:mod:`semisup.meta`)
=============  ==================================================================================
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from semisup import models
from semisup.losses import classifier_logits, confidence_weights, cross_entropy, validation_loss
from semisup.meta import ParametricWeighting, meta_set
from semisup.weighting import Weighting, register_weighting


@register_weighting("supervised")
class Supervised(Weighting):
    """No unlabelled loss: the labelled cross-entropy alone."""

    uses_unlabelled = False


@register_weighting("fixmatch")
class FixMatch(Weighting):
    """Every image that passes the mask gets weight 1 (Sohn et al. 2020)."""

    constant_scores = True

    def scores(self, config, state, data, batch):
        return jnp.ones_like(batch.mask)


@register_weighting("oracle")
class Oracle(Weighting):
    """``1[ID]``: OOD images removed, which no real method can do (the upper bound)."""

    def scores(self, config, state, data, batch):
        return 1.0 - data.unlabelled_ood[batch.index].astype(batch.mask.dtype)


@register_weighting("softmax")
class Softmax(Weighting):
    """The classifier's confidence ``max p_weak``."""

    def scores(self, config, state, data, batch):
        return jnp.max(jax.nn.softmax(batch.weak_logits), axis=-1)


@register_weighting("l2rw")
class L2RW(Weighting):
    """One-step look-ahead (Ren et al. 2018; Guo et al. 2020): ``max(0, ∇_θ ℓ_i · ∇_θ L_meta)``.

    The derivative of the meta loss after one step of size 1 on ``Σ ε_i ℓ_i`` is
    ``−∇ℓ_i · ∇L_meta``; one JVP of the per-image losses along ``∇L_meta`` gives all of them.
    """

    uses_validation = True

    def scores(self, config, state, data, batch):
        val_grad = jax.grad(functools.partial(validation_loss, config))(
            state.params, *meta_set(config, data))

        def per_image(params):
            return batch.mask * cross_entropy(classifier_logits(config, params, batch.strong),
                                              batch.pseudo)

        _, alignment = jax.jvp(per_image, (state.params,), (val_grad,))
        return jnp.maximum(alignment, 0.0)


@register_weighting("confnet")
class ConfNet(ParametricWeighting):
    """The confidence network ``c_φ`` (:class:`semisup.models.ConfidenceNet`): its logits are
    the scores, ``2·sigmoid(z − z̄)`` the weights (:func:`semisup.confidence_weights`); it
    starts at weight 1 for every image (plain FixMatch)."""

    def init_params(self, config, key, image_shape, num_classes):
        with_probs = config.conf_inputs == "image+softmax"
        return models.init_confidence(key, image_shape, config.conf_widths,
                                      num_classes if with_probs else None)

    def param_scores(self, config, params, images, probs):
        with_probs = config.conf_inputs == "image+softmax"
        return models.confidence(params, images, config.conf_widths,
                                 probs if with_probs else None)

    def weights(self, scores, mask):
        return confidence_weights(scores, mask)
