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
iomatch        IOMatch (Li et al. 2023), a non-meta comparator: one-vs-all and (K+1)-way open-set
               heads on the classifier's features; ``w = 1[p(outlier) < ½]`` on FixMatch's loss
               and the open-set head trained on every image with outliers as class K+1
=============  ==================================================================================
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from semisup import models
from semisup.losses import (
    classifier_logits,
    confidence_weights,
    cross_entropy,
    fixmatch_loss,
    validation_loss,
)
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


#: IOMatch's open-set pseudo-label threshold (its ``q_cutoff``).
OPEN_THRESHOLD = 0.5


def one_vs_all_loss(binary_logits: jax.Array, labels: jax.Array) -> jax.Array:
    """OpenMatch's one-vs-all loss of labelled images (Saito et al. 2021), which IOMatch trains
    its binary heads with: ``−log p_inlier(y)`` plus the hardest ``−log p_outlier(k)``,
    ``k ≠ y``, averaged over the batch. ``binary_logits``: ``(N, 2, K)``, axis 1 (outlier,
    inlier)."""
    log_probs = jax.nn.log_softmax(binary_logits, axis=-2)
    own = jax.nn.one_hot(labels, binary_logits.shape[-1], dtype=log_probs.dtype)
    positive = -jnp.sum(own * log_probs[..., 1, :], axis=-1)
    negative = jnp.max(-(1.0 - own) * log_probs[..., 0, :], axis=-1)
    return jnp.mean(positive + negative)


def open_set_targets(heads, weak_features: jax.Array, weak_logits: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    """IOMatch's targets from the weak view (stop-gradient): each image's outlier probability
    ``Σ_k p_k · o_k^out`` and its open-set target ``q = (p_k · o_k^in)_k ⊕ Σ_k p_k · o_k^out``
    over K + 1 classes, where ``p`` is the classifier's class distribution and ``o_k`` the k-th
    one-vs-all head's."""
    binary, _ = models.open_heads(jax.lax.stop_gradient(heads), weak_features)
    o = jax.nn.softmax(binary, axis=-2)
    p = jax.nn.softmax(jax.lax.stop_gradient(weak_logits), axis=-1)
    outlier = jnp.sum(p * o[..., 0, :], axis=-1)
    return outlier, jnp.concatenate([p * o[..., 1, :], outlier[..., None]], axis=-1)


@register_weighting("iomatch")
class IOMatch(Weighting):
    """IOMatch (Li et al., ICCV 2023): outliers used, not only filtered, as class K + 1.

    The classifier gains a projection, K one-vs-all binary heads and a (K+1)-way open-set head
    (:func:`semisup.models.init_open_heads`, parameters ``params["aux"]``). Per step, with
    ``p`` the classifier's distribution of the weak view and ``o_k`` the binary heads':

    * labelled: cross-entropy plus the one-vs-all loss (:func:`one_vs_all_loss`);
    * FixMatch's unlabelled loss, weighted by ``1[Σ_k p_k o_k^out < ½]`` (the images the binary
      heads call inliers) times the confidence mask; the score is ``1 − Σ_k p_k o_k^out``;
    * the open-set head's soft cross-entropy on the strong view against the targets
      :func:`open_set_targets`, on the images whose largest target is at least ½.

    Prediction uses the closed-set classifier. IOMatch's defaults (``τ_q = ½``, both extra loss
    weights 1) are used; its distribution alignment and first-epoch pause of the open-set loss
    are not (FixMatch here has neither). Its weights are a filter, not a reweighting: it is
    IOMatch with ``Config.weight_norm="none"`` (the default ``"mask"`` raises the kept images'
    weight as it does the oracle's).
    """

    def init_heads(self, config, key, num_classes):
        return models.init_open_heads(key, config.hidden, num_classes)

    def scores(self, config, state, data, batch):
        outlier, _ = open_set_targets(state.params["aux"], batch.weak_features,
                                      batch.weak_logits)
        return 1.0 - outlier

    def weights(self, scores, mask):
        return (scores > 0.5).astype(scores.dtype)

    def loss(self, config, params, batch, weights):
        n = len(batch.x_labelled)
        feats = models.features(params["body"], jnp.concatenate([batch.x_labelled, batch.strong]),
                                config.widths, config.hidden)
        logits = models.head(params["head"], feats)
        binary, open_logits = models.open_heads(params["aux"], feats)
        closed, _ = fixmatch_loss(logits[:n], batch.y_labelled, logits[n:], batch.pseudo,
                                  batch.mask, weights, config.lambda_u)
        _, target = open_set_targets(params["aux"], batch.weak_features, batch.weak_logits)
        keep = (jnp.max(target, axis=-1) >= OPEN_THRESHOLD).astype(target.dtype)
        open_ce = -jnp.sum(target * jax.nn.log_softmax(open_logits[n:], axis=-1), axis=-1)
        return (closed + one_vs_all_loss(binary[:n], batch.y_labelled)
                + jnp.mean(keep * open_ce))
