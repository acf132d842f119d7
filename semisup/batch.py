"""What one step sees: a labelled batch and two views of an unlabelled one, drawn and augmented
on the device, with FixMatch's pseudo-labels (:class:`Batch`, the input of a weighting)."""

from __future__ import annotations

from typing import NamedTuple

import jax

from semisup import augment, models
from semisup.losses import pseudo_labels
from semisup.protocol import Split


class Batch(NamedTuple):
    """One inner step's batch, as :meth:`semisup.Weighting.scores` receives it.

    Attributes:
      x_labelled, y_labelled: B weakly augmented labelled images and their labels.
      index: the μB unlabelled images' indices in ``data.x_unlabelled``.
      weak, strong: their weak and strong views.
      weak_logits: the classifier's logits of the weak view (stop-gradient).
      pseudo, mask: FixMatch's pseudo-labels and confidence mask (:func:`semisup.pseudo_labels`).
      weak_features: the classifier body's features of the weak view (stop-gradient), from
        which ``weak_logits`` were computed (heads beyond the classifier's read them).
    """

    x_labelled: jax.Array
    y_labelled: jax.Array
    index: jax.Array
    weak: jax.Array
    strong: jax.Array
    weak_logits: jax.Array
    pseudo: jax.Array
    mask: jax.Array
    weak_features: jax.Array


def sample(config, key, data: Split):
    """A weakly augmented labelled batch and a weak/strong view of an unlabelled batch:
    ``(x_l, y_l, index, weak, strong)``."""
    k_l, k_u, k_wl, k_wu, k_s = jax.random.split(key, 5)
    labelled = jax.random.randint(k_l, (config.batch_size,), 0, data.x_labelled.shape[0])
    unlabelled = jax.random.randint(k_u, (config.mu * config.batch_size,), 0,
                                    data.x_unlabelled.shape[0])
    x_l = augment.weak_augment(k_wl, data.x_labelled[labelled], config.flip)
    x_u = data.x_unlabelled[unlabelled]
    weak = augment.weak_augment(k_wu, x_u, config.flip)
    strong = augment.strong_augment(k_s, x_u, flip_images=config.flip)
    return x_l, data.y_labelled[labelled], unlabelled, weak, strong


def draw(config, params, key, data: Split) -> Batch:
    """:func:`sample`, then the classifier ``params``' pseudo-labels of the weak view."""
    x_l, y_l, index, weak, strong = sample(config, key, data)
    feats = jax.lax.stop_gradient(models.features(params["body"], weak, config.widths,
                                                  config.hidden))
    weak_logits = models.head(jax.lax.stop_gradient(params["head"]), feats)
    pseudo, mask = pseudo_labels(weak_logits, config.threshold)
    return Batch(x_l, y_l, index, weak, strong, weak_logits, pseudo, mask, feats)
