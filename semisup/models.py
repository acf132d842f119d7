"""The classifier and the confidence network (Flax), as pure ``apply`` functions over pytrees.

The classifier is split into a convolutional *body* and a linear *head* so that the implicit
hypergradient can take its curvature over the head alone (the body's features held fixed).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class Body(nn.Module):
    """Conv-ReLU-Conv-ReLU-AvgPool blocks, then a ReLU dense layer: the classifier's features."""

    widths: Sequence[int] = (16, 32)
    hidden: int = 64

    @nn.compact
    def __call__(self, x):
        for width in self.widths:
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            if min(x.shape[-3:-1]) >= 2:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[:-3] + (-1,))
        return nn.relu(nn.Dense(self.hidden)(x))


class ConfidenceNet(nn.Module):
    """A small CNN mapping an image to a logit ``z`` (the weight is ``2·sigmoid`` of it, centred
    over the batch: :func:`semisup.fixmatch.confidence_weights`).

    With ``probs`` (the classifier's class probabilities of the same image, ``(N, C)``), the
    pooled image features are joined with ``probs`` and ``probs`` sorted in decreasing order
    and pass one ReLU layer of ``hidden`` units first. The last layer starts at zero, so every
    logit starts at exactly 0 (weight 1: plain FixMatch).
    """

    widths: Sequence[int] = (8, 16)
    hidden: int = 16

    @nn.compact
    def __call__(self, x, probs=None):
        for width in self.widths:
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            if min(x.shape[-3:-1]) >= 2:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(-3, -2))
        if probs is not None:
            x = jnp.concatenate([x, probs, -jnp.sort(-probs, axis=-1)], axis=-1)
            x = nn.relu(nn.Dense(self.hidden)(x))
        z = nn.Dense(1, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)(x)
        return z[..., 0]


def init_classifier(key: jax.Array, image_shape: tuple[int, int, int], num_classes: int,
                    widths: Sequence[int] = (16, 32), hidden: int = 64) -> dict:
    """Parameters ``{"body": ..., "head": {"kernel", "bias"}}`` of the classifier."""
    key_body, key_head = jax.random.split(key)
    body = Body(tuple(widths), hidden).init(key_body, jnp.zeros((1, *image_shape)))["params"]
    kernel = nn.initializers.lecun_normal()(key_head, (hidden, num_classes))
    return {"body": body, "head": {"kernel": kernel, "bias": jnp.zeros((num_classes,))}}


def features(body_params: dict, images: jax.Array, widths: Sequence[int] = (16, 32),
             hidden: int = 64) -> jax.Array:
    """The body's features ``(N, hidden)``."""
    return Body(tuple(widths), hidden).apply({"params": body_params}, images)


def head(head_params: dict, feats: jax.Array) -> jax.Array:
    """Logits of the linear head."""
    return feats @ head_params["kernel"] + head_params["bias"]


def logits(params: dict, images: jax.Array, widths: Sequence[int] = (16, 32),
           hidden: int = 64) -> jax.Array:
    """Classifier logits ``(N, num_classes)``."""
    return head(params["head"], features(params["body"], images, widths, hidden))


def init_open_heads(key: jax.Array, hidden: int, num_classes: int) -> dict:
    """Parameters of IOMatch's two extra heads on the classifier's features (Li et al. 2023): a
    ReLU projection ``hidden → hidden → hidden``, then ``num_classes`` one-vs-all binary
    classifiers (``2·num_classes`` logits, no bias) and a ``num_classes + 1``-way open-set
    classifier (the last class: outlier). Xavier-normal kernels, zero biases, as IOMatch's."""
    keys = jax.random.split(key, 4)
    lecun, xavier = nn.initializers.lecun_normal(), nn.initializers.xavier_normal()
    return {"proj1": {"kernel": lecun(keys[0], (hidden, hidden)), "bias": jnp.zeros((hidden,))},
            "proj2": {"kernel": lecun(keys[1], (hidden, hidden)), "bias": jnp.zeros((hidden,))},
            "binary": {"kernel": xavier(keys[2], (hidden, 2 * num_classes))},
            "open": {"kernel": xavier(keys[3], (hidden, num_classes + 1)),
                     "bias": jnp.zeros((num_classes + 1,))}}


def open_heads(heads: dict, feats: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The one-vs-all logits ``(N, 2, K)`` (axis 1: outlier, inlier) and the open-set logits
    ``(N, K + 1)`` of the extra heads :func:`init_open_heads` on the body's features."""
    proj = nn.relu(feats @ heads["proj1"]["kernel"] + heads["proj1"]["bias"])
    proj = proj @ heads["proj2"]["kernel"] + heads["proj2"]["bias"]
    binary = proj @ heads["binary"]["kernel"]
    binary = binary.reshape(binary.shape[:-1] + (2, binary.shape[-1] // 2))
    return binary, proj @ heads["open"]["kernel"] + heads["open"]["bias"]


def init_confidence(key: jax.Array, image_shape: tuple[int, int, int],
                    widths: Sequence[int] = (8, 16), num_classes: int | None = None) -> dict:
    """Parameters of the :class:`ConfidenceNet`; ``num_classes`` adds the class-probability
    input (``None``: the image alone)."""
    net = ConfidenceNet(tuple(widths))
    probs = None if num_classes is None else jnp.full((1, num_classes), 1.0 / num_classes)
    return net.init(key, jnp.zeros((1, *image_shape)), probs)["params"]


def confidence(conf_params: dict, images: jax.Array, widths: Sequence[int] = (8, 16),
               probs: jax.Array | None = None) -> jax.Array:
    """Raw logits ``(N,)`` of the confidence network (``probs``: see :class:`ConfidenceNet`)."""
    return ConfidenceNet(tuple(widths)).apply({"params": conf_params}, images, probs)
