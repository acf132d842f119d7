"""On-device data augmentation for FixMatch: weak (flip + translate) and strong (RandAugment +
Cutout), pure functions of an explicit PRNG key that run under ``jit`` and ``vmap``.

Images are float arrays ``(..., H, W, C)`` in ``[0, 1]``. Batched functions take one key for the
batch and split it per image, so the same key always gives the same augmentation.

Reference: Sohn et al. 2020, "FixMatch" (weak = flip + up to 12.5 % translation with reflection
padding; strong = RandAugment with two random operations at random magnitudes, then Cutout);
Cubuk et al. 2020, "RandAugment".
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy import ndimage

#: grey value used to fill pixels an affine operation or Cutout leaves empty (FixMatch uses 128).
FILL = 0.5


def _check_images(where: str, images: jax.Array, batched: bool) -> None:
    want = 4 if batched else 3
    if images.ndim != want:
        shape = "(N, H, W, C)" if batched else "(H, W, C)"
        raise ValueError(f"{where}: images must have shape {shape}, got shape {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"{where}: images must be floating point in [0, 1], got {images.dtype}")


# --------------------------------------------------------------------------------------------
# Weak augmentation.


def flip(image: jax.Array, do_flip: jax.Array) -> jax.Array:
    """Mirror ``image`` (H, W, C) left-right where ``do_flip`` is true."""
    return jnp.where(do_flip, image[:, ::-1, :], image)


def translate(image: jax.Array, dy: jax.Array, dx: jax.Array, pad: int) -> jax.Array:
    """Shift ``image`` (H, W, C) by ``(dy, dx)`` whole pixels, ``|dy|, |dx| <= pad``.

    The content moves down by ``dy`` and right by ``dx``; the uncovered border is filled by
    reflection, as FixMatch's pad-and-random-crop does.
    """
    height, width, _ = image.shape
    padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    return jax.lax.dynamic_slice(padded, (pad - dy, pad - dx, 0),
                                 (height, width, image.shape[2]))


def max_shift(size: int, fraction: float = 0.125) -> int:
    """Largest translation in pixels for a side of ``size``: ``round(fraction · size)``, >= 1."""
    return max(1, int(round(fraction * size)))


def weak_augment(key: jax.Array, images: jax.Array, flip_images: bool = True,
                 fraction: float = 0.125) -> jax.Array:
    """FixMatch's weak augmentation of a batch: random left-right flip, random translation.

    Args:
      key: PRNG key for the batch.
      images: ``(N, H, W, C)`` in ``[0, 1]``.
      flip_images: flip with probability 1/2 (turn off for digits, where mirroring changes
        the class).
      fraction: largest translation as a fraction of the side (12.5 % in the paper).

    Returns:
      Augmented images, same shape and dtype.
    """
    _check_images("semisup.weak_augment", images, batched=True)
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"semisup.weak_augment: fraction must be in [0, 0.5), got {fraction}")
    pad_y, pad_x = max_shift(images.shape[1], fraction), max_shift(images.shape[2], fraction)
    pad = max(pad_y, pad_x)
    if pad >= min(images.shape[1], images.shape[2]):
        raise ValueError(f"semisup.weak_augment: images of shape {images.shape[1:3]} are too "
                         f"small to translate by {pad} pixels")

    def one(k, image):
        k_flip, k_y, k_x = jax.random.split(k, 3)
        image = flip(image, flip_images & jax.random.bernoulli(k_flip))
        dy = jax.random.randint(k_y, (), -pad_y, pad_y + 1)
        dx = jax.random.randint(k_x, (), -pad_x, pad_x + 1)
        return translate(image, dy, dx, pad)

    return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)


# --------------------------------------------------------------------------------------------
# RandAugment operations: op(image, magnitude in [0, 1], sign in {-1, +1}) -> image.


def _grey(image):
    return jnp.mean(image, axis=-1, keepdims=True)


def _blend(a, b, factor):
    """PIL's ImageEnhance: ``b + factor · (a − b)``, clipped to [0, 1]."""
    return jnp.clip(b + factor * (a - b), 0.0, 1.0)


def _factor(magnitude, sign):
    return 1.0 + 0.9 * magnitude * sign  # enhancement factor in [0.1, 1.9]


def _identity(image, magnitude, sign):
    return image


def _autocontrast(image, magnitude, sign):
    low = jnp.min(image, axis=(0, 1), keepdims=True)
    high = jnp.max(image, axis=(0, 1), keepdims=True)
    scale = jnp.where(high > low, 1.0 / jnp.maximum(high - low, 1e-6), 1.0)
    return jnp.where(high > low, (image - low) * scale, image)


def _equalize(image, magnitude, sign):
    height, width, channels = image.shape
    flat = image.reshape(height * width, channels)
    # The empirical CDF of each channel: a pixel's rank among the channel's pixels.
    order = jnp.argsort(flat, axis=0)
    positions = jnp.broadcast_to(jnp.arange(height * width)[:, None], flat.shape)
    ranks = jnp.zeros(flat.shape, image.dtype).at[order, jnp.arange(channels)].set(
        positions.astype(image.dtype))
    return (ranks / max(height * width - 1, 1)).reshape(image.shape)


def _brightness(image, magnitude, sign):
    return _blend(image, jnp.zeros_like(image), _factor(magnitude, sign))


def _contrast(image, magnitude, sign):
    mean = jnp.mean(_grey(image))
    return _blend(image, jnp.full_like(image, mean), _factor(magnitude, sign))


def _color(image, magnitude, sign):
    return _blend(image, jnp.broadcast_to(_grey(image), image.shape), _factor(magnitude, sign))


def _sharpness(image, magnitude, sign):
    kernel = jnp.array([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], image.dtype) / 13.0
    padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    height, width, _ = image.shape
    blurred = sum(kernel[i, j] * padded[i:i + height, j:j + width]
                  for i in range(3) for j in range(3))
    return _blend(image, blurred, _factor(magnitude, sign))


def _posterize(image, magnitude, sign):
    bits = jnp.round(8.0 - 4.0 * magnitude)  # 8 bits (no change) down to 4 bits
    levels = 2.0 ** bits
    return jnp.floor(image * (levels - 1) + 0.5) / (levels - 1)


def _solarize(image, magnitude, sign):
    threshold = 1.0 - magnitude
    return jnp.where(image >= threshold, 1.0 - image, image)


def _affine(image, matrix):
    """Resample ``image`` at ``matrix @ (y − c, x − c) + c`` (bilinear, FILL outside)."""
    height, width, channels = image.shape
    centre = jnp.array([(height - 1) / 2, (width - 1) / 2], image.dtype)
    grid = jnp.stack(jnp.meshgrid(jnp.arange(height, dtype=image.dtype),
                                  jnp.arange(width, dtype=image.dtype), indexing="ij"))
    source = jnp.einsum("ij,jhw->ihw", matrix, grid - centre[:, None, None])
    source = source + centre[:, None, None]
    channel_maps = [ndimage.map_coordinates(image[..., c], [source[0], source[1]], order=1,
                                            mode="constant", cval=FILL) for c in range(channels)]
    return jnp.stack(channel_maps, axis=-1)


def _rotate(image, magnitude, sign):
    angle = sign * magnitude * math.radians(30.0)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return _affine(image, jnp.array([[cos, -sin], [sin, cos]]).astype(image.dtype))


def _shear_x(image, magnitude, sign):
    shear = sign * magnitude * 0.3
    return _affine(image, jnp.array([[1.0, 0.0], [shear, 1.0]]).astype(image.dtype))


def _shear_y(image, magnitude, sign):
    shear = sign * magnitude * 0.3
    return _affine(image, jnp.array([[1.0, shear], [0.0, 1.0]]).astype(image.dtype))


def _shift(image, offset):
    height, width, _ = image.shape
    grid_y, grid_x = jnp.meshgrid(jnp.arange(height, dtype=image.dtype),
                                  jnp.arange(width, dtype=image.dtype), indexing="ij")
    return jnp.stack([ndimage.map_coordinates(image[..., c], [grid_y - offset[0],
                                                              grid_x - offset[1]],
                                              order=1, mode="constant", cval=FILL)
                      for c in range(image.shape[2])], axis=-1)


def _translate_x(image, magnitude, sign):
    return _shift(image, jnp.array([0.0, sign * magnitude * 0.3 * image.shape[1]], image.dtype))


def _translate_y(image, magnitude, sign):
    return _shift(image, jnp.array([sign * magnitude * 0.3 * image.shape[0], 0.0], image.dtype))


#: The RandAugment pool of FixMatch (the "fixmatch_augment_pool"), in a fixed order.
OPERATIONS = {
    "identity": _identity, "autocontrast": _autocontrast, "equalize": _equalize,
    "brightness": _brightness, "contrast": _contrast, "color": _color,
    "sharpness": _sharpness, "posterize": _posterize, "solarize": _solarize,
    "rotate": _rotate, "shear_x": _shear_x, "shear_y": _shear_y,
    "translate_x": _translate_x, "translate_y": _translate_y,
}


def apply_operation(name: str, image: jax.Array, magnitude: float, sign: float = 1.0
                    ) -> jax.Array:
    """Apply one named RandAugment operation to ``image`` (H, W, C) at ``magnitude`` in [0, 1]."""
    if name not in OPERATIONS:
        raise ValueError(f"semisup.apply_operation: unknown operation {name!r}; choose from "
                         f"{', '.join(OPERATIONS)}")
    _check_images("semisup.apply_operation", image, batched=False)
    return jnp.clip(OPERATIONS[name](image, jnp.asarray(magnitude, image.dtype),
                                     jnp.asarray(sign, image.dtype)), 0.0, 1.0)


def cutout(image: jax.Array, centre_y: jax.Array, centre_x: jax.Array, size: int) -> jax.Array:
    """Fill a ``size``-by-``size`` square centred at ``(centre_y, centre_x)`` with FILL."""
    height, width, _ = image.shape
    ys = jnp.arange(height)[:, None, None]
    xs = jnp.arange(width)[None, :, None]
    start_y, start_x = centre_y - size // 2, centre_x - size // 2
    inside = (ys >= start_y) & (ys < start_y + size) & (xs >= start_x) & (xs < start_x + size)
    return jnp.where(inside, jnp.asarray(FILL, image.dtype), image)


def strong_augment(key: jax.Array, images: jax.Array, num_ops: int = 2,
                   cutout_fraction: float = 0.5, flip_images: bool = True,
                   fraction: float = 0.125) -> jax.Array:
    """FixMatch's strong augmentation of a batch: weak, then RandAugment, then Cutout.

    Each image gets ``num_ops`` operations drawn uniformly from :data:`OPERATIONS`, each at a
    magnitude drawn uniformly from [0, 1] with a random sign, then a Cutout square of side
    ``cutout_fraction · min(H, W)`` at a uniformly random centre.

    Args:
      key: PRNG key for the batch.
      images: ``(N, H, W, C)`` in ``[0, 1]``.
      num_ops: RandAugment's N.
      cutout_fraction: Cutout's side relative to the image (0 turns Cutout off).
      flip_images, fraction: the weak augmentation applied first (as in FixMatch's code).

    Returns:
      Augmented images in [0, 1], same shape and dtype.
    """
    _check_images("semisup.strong_augment", images, batched=True)
    if not isinstance(num_ops, int) or num_ops < 0:
        raise ValueError(f"semisup.strong_augment: num_ops must be an integer >= 0, got "
                         f"{num_ops!r}")
    if not 0.0 <= cutout_fraction <= 1.0:
        raise ValueError(f"semisup.strong_augment: cutout_fraction must be in [0, 1], got "
                         f"{cutout_fraction}")
    key_weak, key_strong = jax.random.split(key)
    images = weak_augment(key_weak, images, flip_images, fraction)
    branches = [lambda im, m, s, op=op: jnp.clip(op(im, m, s), 0.0, 1.0)
                for op in OPERATIONS.values()]
    height, width = images.shape[1:3]
    size = int(round(cutout_fraction * min(height, width)))

    def one(k, image):
        k_ops, k_mag, k_sign, k_y, k_x = jax.random.split(k, 5)
        ops = jax.random.randint(k_ops, (num_ops,), 0, len(branches))
        magnitudes = jax.random.uniform(k_mag, (num_ops,), image.dtype)
        signs = jnp.where(jax.random.bernoulli(k_sign, shape=(num_ops,)), 1.0, -1.0)
        for i in range(num_ops):
            image = jax.lax.switch(ops[i], branches, image, magnitudes[i],
                                   signs[i].astype(image.dtype))
        if size > 0:
            image = cutout(image, jax.random.randint(k_y, (), 0, height),
                           jax.random.randint(k_x, (), 0, width), size)
        return image

    return jax.vmap(one)(jax.random.split(key_strong, images.shape[0]), images)
