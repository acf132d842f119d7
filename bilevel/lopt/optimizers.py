"""Learned optimizers as optax transformations: a per-parameter MLP and STAR.

Both apply one tiny MLP independently to every scalar parameter of the model being trained. Its
inputs are 28 accumulator features normalised per tensor, 11 training-step features and,
optionally, 9 fraction-of-training features:

* the gradient ``g`` and the parameter ``p``;
* momenta ``m_i`` at three timescales (decays 0.9, 0.99, 0.999), the second moment ``v``
  (decay 0.999), ``m_i / √(v + 1e-6)`` and ``1 / √(v + 1e-6)``;
* Adafactor-style factored second moments at three timescales (0.9, 0.99, 0.999): the gradient
  preconditioned by them, the row and column accumulators, their inverse square roots and the
  momenta times the row and column factors (a tensor with fewer than two axes uses its full
  second moment in place of both factors, as RMSProp would);
* ``tanh(t/τ − 1)`` for τ ∈ {1, 3, 10, ..., 1e5}: the step count ``t`` at eleven scales;
* with ``num_steps`` (VeLO style): ``tanh(10(t/num_steps − c))`` for
  c ∈ {0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1}.

Each of the 28 accumulator features is divided by its root mean square over the tensor,
``x · rsqrt(1e-5 + mean(x²))``; the time features are not. Every decay is learned as
``1 − (1 − d₀)·exp(10 δ)`` with ``δ`` a meta-parameter starting at 0.

:func:`mlp_lopt` is ``small_fc_lopt`` (Metz et al. 2022, "Practical tradeoffs between memory,
compute, and performance in learned optimizers", ``AdafacMLPLOpt``): two outputs, direction
``d`` and magnitude ``a``, and the update ``Δθ = −0.001 · d · exp(0.001 a)``.

:func:`star_lopt` is STAR (Harrison, Metz & Sohl-Dickstein 2022, "A closer look at learned
optimization: stability, robustness, and inductive biases", ``MLPNomLOpt``): four outputs
``(d, a_bb, a_nom, a_reg)`` and

``θ ← (1 − λ_wd·exp(η a_reg))·θ − 0.001·d·exp(η a_bb)·(v + 1e-6)^(−1/2) − α_nom·exp(η a_nom)·ĝ``

with ``η = 0.001`` and ``ĝ = mean_i m_i / √(v + 1e-6)`` (an AggMo-Adam nominal direction).
The nominal term makes it a descent method from the start; the inverse-EMA preconditioner
makes the blackbox step scale-free; weight decay on the meta-parameters during meta-training
(:mod:`bilevel.lopt.train`) keeps the blackbox term from overwhelming the nominal one.

Meta-parameters are a dict of arrays (``"network"``: the MLP's weights, ``"momentum_decays"``,
``"rms_decays"``, ``"adafactor_decays"``); :func:`save_meta_params` / :func:`load_meta_params`
write and read them as ``.npz`` files with a JSON metadata record, and :func:`pretrained` loads
the sets meta-trained by this project that ship in ``bilevel/lopt/pretrained/``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

MOMENTUM_DECAYS = (0.9, 0.99, 0.999)
RMS_DECAYS = (0.999,)
ADAFACTOR_DECAYS = (0.9, 0.99, 0.999)
TIMESCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5)
HORIZON_CENTRES = (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1)
NUM_ACCUMULATOR_FEATURES = 28
NUM_INPUTS = NUM_ACCUMULATOR_FEATURES + len(TIMESCALES)  # 39
NUM_INPUTS_WITH_HORIZON = NUM_INPUTS + len(HORIZON_CENTRES)  # 48
#: η: the magnitude heads act through exp(η · output).
EXP_MULT = 0.001
#: The step scale of the blackbox direction.
STEP_MULT = 0.001
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


# --------------------------------------------------------------------------------------------
# State.


class FactoredMoments(NamedTuple):
    """Adafactor-style second moments of one tensor, one slice per decay on the last axis.

    A tensor with at least two axes keeps ``row`` (reduced over its largest axis) and ``col``
    (reduced over its second largest); ``full`` is then an empty placeholder. Otherwise ``full``
    holds the full second moment and ``row``, ``col`` are empty.
    """

    row: jax.Array
    col: jax.Array
    full: jax.Array


class LOptState(NamedTuple):
    """State of :func:`mlp_lopt` and :func:`star_lopt`.

    Attributes:
      iteration: the number of updates made so far (int32).
      momentum: per parameter leaf, shape ``(*leaf.shape, 3)``.
      second_moment: per parameter leaf, shape ``(*leaf.shape, 1)``.
      factored: per parameter leaf, a :class:`FactoredMoments`.
    """

    iteration: jax.Array
    momentum: PyTree
    second_moment: PyTree
    factored: PyTree


def _factored_dims(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """``(d1, d0)``: the second largest and the largest axis, or None below two axes."""
    if len(shape) < 2:
        return None
    order = np.argsort(shape, kind="stable")
    return int(order[-2]), int(order[-1])


def _init_factored(p: jax.Array) -> FactoredMoments:
    k = len(ADAFACTOR_DECAYS)
    dims = _factored_dims(p.shape)
    empty = jnp.zeros((0, k), p.dtype)
    if dims is None:
        return FactoredMoments(empty, empty, jnp.zeros((*p.shape, k), p.dtype))
    d1, d0 = dims
    row_shape = tuple(s for i, s in enumerate(p.shape) if i != d0)
    col_shape = tuple(s for i, s in enumerate(p.shape) if i != d1)
    return FactoredMoments(jnp.zeros((*row_shape, k), p.dtype),
                           jnp.zeros((*col_shape, k), p.dtype), empty)


def _as_vector(p: jax.Array) -> jax.Array:
    # A scalar parameter is treated as a vector of one (per-tensor statistics need an axis).
    return p.reshape(1) if p.ndim == 0 else p


def is_array_wrapper(x: Any) -> bool:
    """Whether ``x`` is an array held in a pytree node of its own, such as flax's
    ``nnx.Variable`` (``nnx.Param``): something ``jnp.asarray`` reads but JAX does not treat as
    a leaf.

    The accumulators treat such a wrapper as one leaf and hold plain arrays. Were the state
    unflattened with the wrapper's node, each parameter's :class:`FactoredMoments` would sit
    *inside* a Variable; ``nnx.Optimizer`` then turns that NamedTuple into an ``nnx.State``
    when it writes the new state back, and the next ``update`` fails on ``_replace``. The
    wrapper's metadata (a sharding of the parameter's axes) does not fit the accumulators'
    extra decay axis anyway.
    """
    return not isinstance(x, jax.Array) and hasattr(type(x), "__jax_array__")


def state_structure(tree: PyTree) -> jax.tree_util.PyTreeDef:
    """The structure of ``tree`` down to its arrays, with :func:`is_array_wrapper` nodes as
    leaves: the structure of each per-parameter field of the state."""
    return jax.tree_util.tree_structure(tree, is_leaf=is_array_wrapper)


def init_state(params: PyTree) -> LOptState:
    """Zero accumulators shaped for ``params`` and ``iteration = 0``."""
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_array_wrapper)
    vectors = [_as_vector(jnp.asarray(p)) for p in leaves]
    momentum = [jnp.zeros((*p.shape, len(MOMENTUM_DECAYS)), p.dtype) for p in vectors]
    second = [jnp.zeros((*p.shape, len(RMS_DECAYS)), p.dtype) for p in vectors]
    factored = [_init_factored(p) for p in vectors]
    unflatten = treedef.unflatten
    return LOptState(jnp.zeros((), jnp.int32), unflatten(momentum), unflatten(second),
                     unflatten(factored))


# --------------------------------------------------------------------------------------------
# Accumulators and features.


def learned_decays(initial: tuple[float, ...], delta: jax.Array) -> jax.Array:
    """``1 − (1 − d₀)·exp(10 δ)``, floored at 0 so that a decay never turns negative."""
    return jnp.maximum(1.0 - (1.0 - jnp.asarray(initial, delta.dtype)) * jnp.exp(10.0 * delta),
                       0.0)


def _update_factored(fac: FactoredMoments, g: jax.Array, decay: jax.Array
                     ) -> tuple[FactoredMoments, jax.Array]:
    """New factored moments and the gradient preconditioned by them, shape ``(*g.shape, 3)``."""
    g2 = jnp.square(g)[..., None] + 1e-30
    dims = _factored_dims(g.shape)
    if dims is None:
        full = decay * fac.full + (1.0 - decay) * g2
        return fac._replace(full=full), g[..., None] * jax.lax.rsqrt(full + 1e-30)
    d1, d0 = dims
    row = decay * fac.row + (1.0 - decay) * jnp.mean(g2, axis=d0)
    col = decay * fac.col + (1.0 - decay) * jnp.mean(g2, axis=d1)
    row_factor, col_factor = _factors(row, col, d1, d0)
    preconditioned = g[..., None] * jnp.expand_dims(row_factor, d0) * jnp.expand_dims(col_factor,
                                                                                      d1)
    return fac._replace(row=row, col=col), preconditioned


def _update_factored_moments(fac: FactoredMoments, g: jax.Array, decay: jax.Array
                             ) -> FactoredMoments:
    """The new factored moments alone (:func:`_update_factored` without the preconditioned
    gradient)."""
    g2 = jnp.square(g)[..., None] + 1e-30
    dims = _factored_dims(g.shape)
    if dims is None:
        return fac._replace(full=decay * fac.full + (1.0 - decay) * g2)
    d1, d0 = dims
    return fac._replace(row=decay * fac.row + (1.0 - decay) * jnp.mean(g2, axis=d0),
                        col=decay * fac.col + (1.0 - decay) * jnp.mean(g2, axis=d1))


def _factors(row: jax.Array, col: jax.Array, d1: int, d0: int) -> tuple[jax.Array, jax.Array]:
    """Adafactor's ``rsqrt(row / mean(row))`` and ``rsqrt(col)`` (Shazeer & Stern 2018)."""
    reduced_d1 = d1 - 1 if d1 > d0 else d1
    row_mean = jnp.mean(row, axis=reduced_d1, keepdims=True)
    safe_rsqrt = lambda x: jax.lax.rsqrt(jnp.maximum(x, 1e-9))  # noqa: E731
    return safe_rsqrt(row / (row_mean + 1e-9)), safe_rsqrt(col)


def accumulator_features(p: jax.Array, g: jax.Array, m: jax.Array, v: jax.Array,
                         fac: FactoredMoments, fac_g: jax.Array) -> jax.Array:
    """The 28 per-parameter features of one tensor, *before* normalisation, ``(*p.shape, 28)``.

    Args:
      p, g: the parameter tensor and its gradient (at least one axis).
      m: momenta ``(*p.shape, 3)``; v: second moment ``(*p.shape, 1)``; both already updated.
      fac: the updated :class:`FactoredMoments`; fac_g: the gradient preconditioned by them.
    """
    rsqrt_v = jax.lax.rsqrt(v + 1e-6)
    parts = [g[..., None], p[..., None], m, v, m * rsqrt_v, rsqrt_v, fac_g]
    dims = _factored_dims(p.shape)
    if dims is None:
        parts += [fac.full, fac.full, jax.lax.rsqrt(fac.full + 1e-8),
                  jax.lax.rsqrt(fac.full + 1e-8), m * (fac.full + 1e-6) ** -0.5]
    else:
        d1, d0 = dims
        row = jnp.broadcast_to(jnp.expand_dims(fac.row, d0), m.shape)
        col = jnp.broadcast_to(jnp.expand_dims(fac.col, d1), m.shape)
        row_factor, col_factor = _factors(fac.row, fac.col, d1, d0)
        parts += [row, col, jax.lax.rsqrt(row + 1e-8), jax.lax.rsqrt(col + 1e-8),
                  m * jnp.expand_dims(row_factor, d0) * jnp.expand_dims(col_factor, d1)]
    return jnp.concatenate(parts, axis=-1)


def normalise_per_tensor(features: jax.Array) -> jax.Array:
    """``x · rsqrt(1e-5 + mean(x²))`` with the mean over every axis but the feature axis."""
    axes = tuple(range(features.ndim - 1))
    return features * jax.lax.rsqrt(1e-5 + jnp.mean(jnp.square(features), axis=axes,
                                                     keepdims=True))


def time_features(iteration: jax.Array, num_steps: Any | None, dtype) -> jax.Array:
    """``tanh(t/τ − 1)`` for the eleven timescales, then, with ``num_steps``, the nine
    fraction-of-training features ``tanh(10(t/num_steps − c))`` (VeLO, Metz et al. 2022)."""
    t = jnp.asarray(iteration, dtype)
    features = [jnp.tanh(t / jnp.asarray(TIMESCALES, dtype) - 1.0)]
    if num_steps is not None:
        fraction = t / jnp.asarray(num_steps, dtype)
        features.append(jnp.tanh(10.0 * (fraction - jnp.asarray(HORIZON_CENTRES, dtype))))
    return jnp.concatenate(features)


def apply_network(network: dict, inputs: jax.Array) -> jax.Array:
    """The per-parameter MLP: ReLU hidden layers, linear output, on the last axis."""
    layers = len(network) // 2
    x = inputs
    for i in range(layers):
        x = x @ network[f"w{i}"] + network[f"b{i}"]
        if i < layers - 1:
            x = jax.nn.relu(x)
    return x


# --------------------------------------------------------------------------------------------
# Meta-parameters.


def _init_meta(key: jax.Array, hidden: tuple[int, ...], outputs: int, horizon_features: bool,
               dtype, where: str, zero_output: bool = False) -> dict:
    hidden = tuple(hidden)
    if not hidden or any(not isinstance(h, int) or isinstance(h, bool) or h < 1 for h in hidden):
        raise ValueError(f"{where}: hidden must be a non-empty tuple of positive ints, "
                         f"got {hidden!r}")
    sizes = (NUM_INPUTS_WITH_HORIZON if horizon_features else NUM_INPUTS, *hidden, outputs)
    keys = jax.random.split(key, len(sizes) - 1)
    network = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        std = 1.0 / np.sqrt(fan_in)
        network[f"w{i}"] = (std * jax.random.truncated_normal(keys[i], -2.0, 2.0,
                                                              (fan_in, fan_out))).astype(dtype)
        network[f"b{i}"] = jnp.zeros((fan_out,), dtype)
    if zero_output:
        last = len(sizes) - 2
        network[f"w{last}"] = jnp.zeros_like(network[f"w{last}"])
    return {"network": network,
            "momentum_decays": jnp.zeros((len(MOMENTUM_DECAYS),), dtype),
            "rms_decays": jnp.zeros((len(RMS_DECAYS),), dtype),
            "adafactor_decays": jnp.zeros((len(ADAFACTOR_DECAYS),), dtype)}


def init_mlp_lopt(key: jax.Array, hidden: tuple[int, ...] = (4, 4),
                  horizon_features: bool = False, dtype=jnp.float32) -> dict:
    """Meta-parameters of :func:`mlp_lopt` (197 with the defaults, 206 with horizon features).

    Args:
      key: PRNG key for the MLP's weights (truncated normal, std ``1/√fan_in``; zero biases).
      hidden: widths of the hidden layers.
      horizon_features: add the nine fraction-of-training inputs; the optimizer then needs
        ``num_steps``.
      dtype: floating dtype of the meta-parameters.

    Returns:
      ``{"network": {"w0", "b0", ...}, "momentum_decays", "rms_decays", "adafactor_decays"}``.
    """
    return _init_meta(key, hidden, 2, horizon_features, dtype, "lopt.init_mlp_lopt")


def init_star_lopt(key: jax.Array, hidden: tuple[int, ...] = (4, 4),
                   horizon_features: bool = False, dtype=jnp.float32) -> dict:
    """Meta-parameters of :func:`star_lopt`: the same network with four output heads
    ``(d, a_bb, a_nom, a_reg)`` (207 meta-parameters with the defaults).

    The output layer starts at zero, so an untrained STAR *is* its nominal term (AggMo-Adam
    with step ``nominal_step``) and meta-training learns the blackbox correction. With the
    random output layer of the reference code, the preconditioned blackbox step
    ``0.001·d/√(v + 1e-6)`` is of order ``d`` in the first steps (``v`` starts at 0): over 200
    steps the untrained optimizer took the digits MLP's loss from 2.3 to 30 and the noisy
    quadratic's from 4.8 to 11. The hidden layers' meta-gradients are zero only until the
    output layer moves.

    Args: as :func:`init_mlp_lopt`.
    """
    return _init_meta(key, hidden, 4, horizon_features, dtype, "lopt.init_star_lopt",
                      zero_output=True)


def _check_meta(where: str, meta: Any, outputs: int, num_steps: Any) -> None:
    expected = {"network", "momentum_decays", "rms_decays", "adafactor_decays"}
    if not isinstance(meta, dict) or set(meta) != expected:
        found = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{where}: meta must be a dict with keys {sorted(expected)}, "
                         f"got {found}")
    network = meta["network"]
    layers = len(network) // 2
    names = {f"{p}{i}" for i in range(layers) for p in "wb"}
    if not isinstance(network, dict) or layers < 2 or set(network) != names:
        raise ValueError(f"{where}: meta['network'] must hold w0, b0, ..., w{{L}}, b{{L}} "
                         f"(L >= 1), got {sorted(network)}")
    out = np.shape(network[f"w{layers - 1}"])[-1]
    if out != outputs:
        raise ValueError(f"{where}: the network has {out} outputs, expected {outputs} "
                         f"(meta-parameters of the other optimizer?)")
    inputs = np.shape(network["w0"])[0]
    if inputs not in (NUM_INPUTS, NUM_INPUTS_WITH_HORIZON):
        raise ValueError(f"{where}: the network takes {inputs} inputs, expected {NUM_INPUTS} "
                         f"or {NUM_INPUTS_WITH_HORIZON} (with horizon features)")
    if inputs == NUM_INPUTS_WITH_HORIZON and num_steps is None:
        raise ValueError(f"{where}: these meta-parameters use fraction-of-training features; "
                         f"pass num_steps (the training horizon)")
    if inputs == NUM_INPUTS and num_steps is not None:
        raise ValueError(f"{where}: these meta-parameters have no fraction-of-training inputs; "
                         f"num_steps must be None, got {num_steps!r}")
    if num_steps is not None:
        try:
            value = float(num_steps)
        except (TypeError, jax.errors.ConcretizationTypeError):
            return  # traced: checked by the caller
        if not value > 0:
            raise ValueError(f"{where}: num_steps must be > 0, got {num_steps!r}")


def _feature_terms(p: jax.Array, g: jax.Array, ms: list, v: jax.Array, fac: FactoredMoments
                   ) -> tuple[list, list]:
    """The 28 accumulator features of one tensor, each shaped like ``p`` (feature-major).

    Returns ``(features, mean_squares)``: feature ``k`` as an array that broadcasts to
    ``p.shape`` (row and column statistics stay unbroadcast) and ``mean(x_k²)`` over the tensor,
    the quantity :func:`normalise_per_tensor` divides by. The order is that of
    :func:`accumulator_features`.
    """
    rsqrt_v = jax.lax.rsqrt(v + 1e-6)
    k = len(ADAFACTOR_DECAYS)
    dims = _factored_dims(p.shape)
    if dims is None:
        fulls = [fac.full[..., i] for i in range(k)]
        fac_g = [g * jax.lax.rsqrt(f + 1e-30) for f in fulls]
        rows = cols = fulls
        inv_rows = inv_cols = [jax.lax.rsqrt(f + 1e-8) for f in fulls]
        m_fac = [m * (f + 1e-6) ** -0.5 for m, f in zip(ms, fulls, strict=True)]
    else:
        d1, d0 = dims
        rows, cols, fac_g, m_fac = [], [], [], []
        for i in range(k):
            row_factor, col_factor = _factors(fac.row[..., i], fac.col[..., i], d1, d0)
            both = jnp.expand_dims(row_factor, d0) * jnp.expand_dims(col_factor, d1)
            fac_g.append(g * both)
            m_fac.append(ms[i] * both)
            rows.append(jnp.expand_dims(fac.row[..., i], d0))
            cols.append(jnp.expand_dims(fac.col[..., i], d1))
        inv_rows = [jax.lax.rsqrt(r + 1e-8) for r in rows]
        inv_cols = [jax.lax.rsqrt(c + 1e-8) for c in cols]
    features = [g, p, *ms, v, *[m * rsqrt_v for m in ms], rsqrt_v, *fac_g, *rows, *cols,
                *inv_rows, *inv_cols, *m_fac]
    # A row (column) statistic is constant along the reduced axis: the mean of its square over
    # the tensor is the mean over the statistic itself. The full-size features share one pass.
    # The squares are written from the accumulators (m²/(v + 1e-6) rather than (m·rsqrt)²), so
    # that the products feed only the network and XLA fuses them there instead of writing them
    # out for the reduction as well.
    squares = [jnp.square(x) for x in features]
    inv_v = 1.0 / (v + 1e-6)
    for i, m in enumerate(ms):
        squares[6 + i] = jnp.square(m) * inv_v
    squares[9] = inv_v
    if dims is not None:
        for i in range(k):
            row_factor, col_factor = _factors(fac.row[..., i], fac.col[..., i], d1, d0)
            both2 = (jnp.expand_dims(jnp.square(row_factor), d0)
                     * jnp.expand_dims(jnp.square(col_factor), d1))
            squares[10 + i] = jnp.square(g) * both2
            squares[25 + i] = jnp.square(ms[i]) * both2
    full = [i for i, x in enumerate(squares) if jnp.shape(x) == p.shape]
    mean_squares = [jnp.mean(x) for x in squares]
    for i, total in zip(full, _sums(*[squares[i] for i in full]), strict=True):
        mean_squares[i] = total / p.size
    return features, mean_squares


@jax.custom_jvp
def _sums(*xs: jax.Array) -> tuple[jax.Array, ...]:
    """The sums of several same-shaped arrays in one variadic reduction: a single pass over
    memory where separate reductions (XLA does not merge them on the CPU) take one pass each,
    which dominated the update's time."""
    axes = tuple(range(xs[0].ndim))
    zeros = tuple(jnp.zeros((), x.dtype) for x in xs)
    return tuple(jax.lax.reduce(tuple(xs), zeros,
                                lambda a, b: tuple(u + v for u, v in zip(a, b, strict=True)),
                                axes))


@_sums.defjvp
def _sums_jvp(primals, tangents):
    # The generic variadic reduce has no differentiation rule; the sum is linear.
    return _sums(*primals), tuple(jnp.sum(dx) for dx in tangents)


def _network_outputs(meta: dict, p: jax.Array, g: jax.Array, ms: list, v: jax.Array,
                     fac: FactoredMoments, clock: jax.Array) -> list:
    """The MLP's outputs at every parameter of one tensor, one array shaped like ``p`` per head.

    Equal to ``apply_network(network, [normalise_per_tensor(accumulator_features(...)),
    clock])`` but computed feature-major: each layer is an explicit sum over its (few) inputs of
    ``x_k · w[k, j]``, the per-tensor normaliser of feature ``k`` (a scalar) is folded into row
    ``k`` of the first weight matrix, and the time features (per-tensor constants) into the first
    bias. No ``(*p.shape, 39)`` feature matrix is ever built; XLA fuses the sums into a few
    passes over the tensor.
    """
    network = meta["network"]
    layers = len(network) // 2
    features, mean_squares = _feature_terms(p, g, ms, v, fac)
    w0 = network["w0"]
    n = NUM_ACCUMULATOR_FEATURES
    scale = [jax.lax.rsqrt(1e-5 + s) for s in mean_squares]
    w_scaled = jnp.stack(scale).astype(jnp.result_type(p.dtype, w0.dtype))[:, None] * w0[:n]
    bias = network["b0"] + clock.astype(p.dtype) @ w0[n:]
    x = []
    for j in range(w0.shape[1]):
        acc = bias[j]
        for f in range(n):
            acc = acc + features[f] * w_scaled[f, j]
        x.append(jnp.broadcast_to(acc, p.shape))
    for i in range(1, layers):
        x = [jax.nn.relu(h) for h in x]
        w, b = network[f"w{i}"], network[f"b{i}"]
        x = [sum((h * w[f, j] for f, h in enumerate(x)), b[j]) for j in range(w.shape[1])]
    return x


def _learned_optimizer(where: str, meta: dict, num_steps: Any, outputs: int,
                       leaf_update) -> optax.GradientTransformationExtraArgs:
    _check_meta(where, meta, outputs, num_steps)

    def init(params):
        return init_state(params)

    def update(grads, state, params=None, **extra_args):
        del extra_args  # the loss value is accepted (ExtraArgs) but not a feature
        if params is None:
            raise ValueError(f"{where}: update needs params (the current parameters)")
        mom_decay = learned_decays(MOMENTUM_DECAYS, meta["momentum_decays"])
        rms_decay = learned_decays(RMS_DECAYS, meta["rms_decays"])
        fac_decay = learned_decays(ADAFACTOR_DECAYS, meta["adafactor_decays"])
        g_leaves, treedef = jax.tree_util.tree_flatten(grads)
        p_leaves = treedef.flatten_up_to(params)
        state_def = state_structure(grads)
        m_leaves = state_def.flatten_up_to(state.momentum)
        v_leaves = state_def.flatten_up_to(state.second_moment)
        f_leaves = state_def.flatten_up_to(state.factored)
        clock = time_features(state.iteration, num_steps, meta["momentum_decays"].dtype)
        results = []
        for p, g, m, v, fac in zip(p_leaves, g_leaves, m_leaves, v_leaves, f_leaves,
                                   strict=True):
            shape = jnp.shape(p)
            p, g = _as_vector(p), _as_vector(g)
            # Decays in the parameter's dtype, so that the state keeps its dtype.
            beta_m, beta_v, beta_f = (d.astype(g.dtype) for d in (mom_decay, rms_decay,
                                                                  fac_decay))
            # Feature-major: one array shaped like p per momentum, feature and head (a trailing
            # feature axis would make every elementwise pass strided and build a (N, 39) matrix).
            ms = [beta_m[i] * m[..., i] + (1.0 - beta_m[i]) * g
                  for i in range(len(MOMENTUM_DECAYS))]
            v = beta_v[0] * v[..., 0] + (1.0 - beta_v[0]) * jnp.square(g)
            fac = _update_factored_moments(fac, g, beta_f)
            out = _network_outputs(meta, p, g, ms, v, fac, clock)
            step = leaf_update(out, p, ms, v).astype(p.dtype).reshape(shape)
            results.append((step, jnp.stack(ms, axis=-1), v[..., None], fac))
        # No leaves at all when every parameter is frozen (optax.multi_transform, masked).
        steps, ms, vs, facs = list(zip(*results, strict=True)) or [()] * 4
        return treedef.unflatten(steps), LOptState(state.iteration + 1, state_def.unflatten(ms),
                                                   state_def.unflatten(vs),
                                                   state_def.unflatten(facs))

    return optax.GradientTransformationExtraArgs(init, update)


def mlp_lopt(meta: dict, num_steps: Any | None = None) -> optax.GradientTransformationExtraArgs:
    """``small_fc_lopt``: the per-parameter MLP optimizer (Metz et al. 2022).

    The update is ``Δθ = −STEP_MULT · d · exp(EXP_MULT · a)`` with the network's two outputs
    ``(d, a)`` at each parameter.

    Args:
      meta: meta-parameters from :func:`init_mlp_lopt`, :func:`load_meta_params` or
        :func:`pretrained`.
      num_steps: the training horizon, needed (and only accepted) when ``meta`` was made with
        ``horizon_features=True``; a number or a traced scalar.

    Returns:
      an ``optax.GradientTransformationExtraArgs``; ``update(grads, state, params, loss=...)``
      needs ``params``.
    """

    def leaf_update(out, p, ms, v):
        return -STEP_MULT * out[0] * jnp.exp(EXP_MULT * out[1])

    return _learned_optimizer("lopt.mlp_lopt", meta, num_steps, 2, leaf_update)


def star_lopt(meta: dict, num_steps: Any | None = None, nominal_step: float = 1e-3,
              weight_decay: float = 0.0) -> optax.GradientTransformationExtraArgs:
    """STAR: the MLP optimizer with a nominal AggMo-Adam term (Harrison et al. 2022).

    ``Δθ = −λ_wd·exp(η a_reg)·θ − STEP_MULT·d·exp(η a_bb)/√(v + 1e-6) − α_nom·exp(η a_nom)·ĝ``
    with ``ĝ = mean_i m_i/√(v + 1e-6)`` over the three momenta and ``η = EXP_MULT``.

    Args:
      meta: meta-parameters from :func:`init_star_lopt`, :func:`load_meta_params` or
        :func:`pretrained`.
      num_steps: the training horizon (see :func:`mlp_lopt`).
      nominal_step: α_nom, the nominal term's step size (>= 0).
      weight_decay: λ_wd, the inner weight decay that the ``a_reg`` head scales (>= 0).

    Returns:
      an ``optax.GradientTransformationExtraArgs``.
    """
    where = "lopt.star_lopt"
    for name, value in (("nominal_step", nominal_step), ("weight_decay", weight_decay)):
        if not isinstance(value, int | float) or not 0.0 <= value < np.inf:
            raise ValueError(f"{where}: {name} must be a finite number >= 0, got {value!r}")

    def leaf_update(out, p, ms, v):
        rsqrt_v = jax.lax.rsqrt(v + 1e-6)
        nominal = sum(ms[1:], ms[0]) * rsqrt_v / len(ms)
        blackbox = STEP_MULT * out[0] * jnp.exp(EXP_MULT * out[1]) * rsqrt_v
        return (-weight_decay * jnp.exp(EXP_MULT * out[3]) * p - blackbox
                - nominal_step * jnp.exp(EXP_MULT * out[2]) * nominal)

    return _learned_optimizer(where, meta, num_steps, 4, leaf_update)


def num_meta_params(meta: PyTree) -> int:
    """The number of scalars in a meta-parameter pytree."""
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(meta)))


# --------------------------------------------------------------------------------------------
# Files.


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for name, value in tree.items():
        if not isinstance(name, str) or "/" in name or name.startswith("__"):
            raise ValueError(f"lopt.save_meta_params: key {name!r} must be a string without '/' "
                             f"that does not start with '__'")
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}/"))
        else:
            flat[f"{prefix}{name}"] = np.asarray(value)
    return flat


def save_meta_params(path: str | os.PathLike, meta: dict, metadata: dict | None = None
                     ) -> Path:
    """Write meta-parameters (a nested dict of arrays) and a JSON-able metadata dict to ``.npz``.

    The file is written to a temporary name and moved into place, so a reader never sees a
    partial file.

    Returns:
      the path written.
    """
    if not isinstance(meta, dict):
        raise TypeError(f"lopt.save_meta_params: meta must be a dict of arrays, "
                        f"got {type(meta).__name__}")
    flat = _flatten(meta)
    try:
        flat["__metadata__"] = np.asarray(json.dumps(metadata or {}, sort_keys=True))
    except TypeError as error:
        raise TypeError(f"lopt.save_meta_params: metadata must be JSON-serialisable: {error}"
                        ) from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **flat)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide shared files from others
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_meta_params(path: str | os.PathLike) -> tuple[dict, dict]:
    """Read a file written by :func:`save_meta_params`.

    Returns:
      ``(meta, metadata)``: the nested dict of ``jax.Array`` and the metadata dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"lopt.load_meta_params: no file {str(path)!r}")
    meta: dict = {}
    with np.load(path, allow_pickle=False) as data:
        metadata = json.loads(str(data["__metadata__"])) if "__metadata__" in data else {}
        for name in data.files:
            if name == "__metadata__":
                continue
            *folders, leaf = name.split("/")
            node = meta
            for folder in folders:
                node = node.setdefault(folder, {})
            node[leaf] = jnp.asarray(data[name])
    return meta, metadata


def available_pretrained() -> tuple[str, ...]:
    """Names of the meta-parameter sets that ship with the package."""
    return tuple(sorted(p.stem for p in PRETRAINED_DIR.glob("*.npz")))


def pretrained(name: str) -> tuple[dict, dict]:
    """The shipped meta-parameters ``bilevel/lopt/pretrained/<name>.npz`` and their metadata.

    The metadata records how they were meta-trained (optimizer, estimator, tasks, steps, time,
    machine, final meta-loss) and the keyword arguments the optimizer needs
    (``metadata["optimizer_kwargs"]``, e.g. ``num_steps`` use and STAR's ``nominal_step``).
    """
    names = available_pretrained()
    if name not in names:
        raise ValueError(f"lopt.pretrained: no shipped meta-parameters named {name!r}; "
                         f"available: {list(names)}")
    return load_meta_params(PRETRAINED_DIR / f"{name}.npz")


class Learned(NamedTuple):
    """How the meta-trainer (``lopt train``) and ``lopt eval`` make a learned optimizer by name.

    Attributes:
      init: ``init(key, hidden=, horizon_features=, dtype=) -> meta``.
      build: ``build(meta, num_steps, **kwargs) -> optax transformation``.
      kwargs: :class:`~bilevel.lopt.options.MetaTrainConfig` fields passed to ``build`` by
        keyword (recorded in the meta-parameters' ``metadata["optimizer_kwargs"]``).
      meta_weight_decay: the meta-optimizer's default weight decay (STAR's 0.1).
    """

    init: Any
    build: Any
    kwargs: tuple[str, ...] = ()
    meta_weight_decay: float = 0.0


#: ``lopt train --optimizer`` name -> :class:`Learned`; ``lopt eval`` knows each as
#: ``<name>_lopt``. A new learned optimizer adds its entry here and its name to
#: :data:`bilevel.lopt.options.OPTIMIZERS` (which ``--help`` reads without JAX; a test checks
#: the two agree).
LEARNED_OPTIMIZERS = {
    "mlp": Learned(init_mlp_lopt, mlp_lopt),
    "star": Learned(init_star_lopt, star_lopt, kwargs=("nominal_step",), meta_weight_decay=0.1),
}
