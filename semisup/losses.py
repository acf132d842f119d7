"""FixMatch's loss and its pieces (Sohn et al. 2020, eq. 4, with per-image weights)::

    L = CE(labelled) + λ_u · (1/μB) Σ_i w_i · 1[max p_weak,i ≥ τ] · CE(argmax p_weak,i, p_strong,i)

Pseudo-labels are hard and stop-gradient. By default (``Config.weight_norm="mask"``) every
weighting is normalised to mean 1 over the images that pass the confidence mask
(:func:`normalise`), so the total unlabelled weight is FixMatch's and a method only moves it
between images; with weights 1 the loss is exactly FixMatch's. With ``weight_norm="none"`` the
raw weights are used as they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from semisup import models


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example cross-entropy ``−log softmax(logits)[label]``."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1)[..., 0]


def pseudo_labels(weak_logits: jax.Array, threshold: float) -> tuple[jax.Array, jax.Array]:
    """FixMatch's hard pseudo-labels ``argmax p`` and mask ``1[max p ≥ τ]`` (stop-gradient)."""
    probs = jax.nn.softmax(jax.lax.stop_gradient(weak_logits))
    return jnp.argmax(probs, axis=-1), (jnp.max(probs, axis=-1) >= threshold).astype(probs.dtype)


def normalise(weights: jax.Array, mask: jax.Array) -> jax.Array:
    """Scale ``weights`` to mean 1 over the images that pass ``mask`` (zeros stay zeros)."""
    total = jnp.sum(weights * mask)
    return weights * jnp.sum(mask) / jnp.where(total > 0, total, 1.0)


def confidence_weights(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """The confidence network's raw weights ``2·sigmoid(z − z̄)``, in (0, 2).

    ``z̄`` is the mean logit over the images that pass ``mask`` (0 if none does), so a common
    shift of the logits leaves the weights unchanged and every weight is 1 when the logits are
    equal. Normalise with :func:`normalise`.

    The centring matters: the normalisation makes the loss blind to a common scale of the
    weights; without the centring, that flat direction is where an adaptive meta-optimiser walks
    on noise until the sigmoid saturates and the meta-gradient vanishes (measured: every weight
    at the bound 2 after 200 meta-steps). Centred, a common shift of the logits changes nothing
    and gets an exactly zero gradient.
    """
    count = jnp.sum(mask)
    centre = jnp.sum(logits * mask) / jnp.where(count > 0, count, 1.0)
    return 2.0 * jax.nn.sigmoid(logits - centre)


def fixmatch_loss(labelled_logits: jax.Array, labels: jax.Array, strong_logits: jax.Array,
                  pseudo: jax.Array, mask: jax.Array, weights: jax.Array, lambda_u: float
                  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """``CE(labelled) + λ_u · mean_{μB}(w · mask · CE(pseudo, strong))`` and its two parts."""
    supervised = jnp.mean(cross_entropy(labelled_logits, labels))
    unlabelled = jnp.mean(weights * mask * cross_entropy(strong_logits, pseudo))
    return supervised + lambda_u * unlabelled, (supervised, unlabelled)


def sum_squares(tree) -> jax.Array:
    """``Σ leaf²`` over a pytree (the weight decay's penalty, times 2)."""
    return sum(jnp.sum(leaf ** 2) for leaf in jax.tree_util.tree_leaves(tree))


def classifier_logits(config, params, images: jax.Array) -> jax.Array:
    """The classifier's logits of ``images`` (its architecture: ``config.widths, hidden``)."""
    return models.logits(params, images, config.widths, config.hidden)


def validation_loss(config, params, x_val, y_val) -> jax.Array:
    """Mean cross-entropy of the classifier on the validation set (the outer loss)."""
    return jnp.mean(cross_entropy(classifier_logits(config, params, x_val), y_val))


def batch_loss(config, params, x_l, y_l, strong, pseudo, mask, weights) -> jax.Array:
    """FixMatch's weighted loss of the classifier on one batch (labelled and strong views in
    one forward pass)."""
    out = classifier_logits(config, params, jnp.concatenate([x_l, strong]))
    return fixmatch_loss(out[:len(x_l)], y_l, out[len(x_l):], pseudo, mask, weights,
                         config.lambda_u)[0]
