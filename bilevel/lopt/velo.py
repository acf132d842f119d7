"""A VeLO-style hierarchical learned optimizer (Metz et al. 2022, "VeLO: Training Versatile
Learned Optimizers by Scaling Up", ``HyperV2`` in learned_optimization).

Two levels. Once per step and per parameter *tensor*, a small LSTM reads the tensor's summary
features and emits (a) mixing coefficients ``c`` over a bank of ``K`` per-parameter MLPs and
(b) a step multiplier ``s = exp(linear(h))`` (positive; VeLO's is linear). The tensor's own
MLP is the mixture ``(100/K) Σ_k c_k W_k`` of the
bank; it is applied to every scalar of the tensor, reading the same 28 accumulator features as
:func:`bilevel.lopt.mlp_lopt` plus the clipped gradient and ``g/√(v+1e-6)`` (30 inputs, each
normalised per tensor), and outputs a direction ``d`` and magnitude ``a``:

``Δθ = −0.001 · d · exp(0.001 a) · max(RMS(θ), min_scale) · s``, then, if its RMS exceeds
``max_relative_step · max(RMS(θ), min_scale)``, scaled down to that bound, and multiplied by a
divergence guard's factor ``ρ ≤ 1``.

VeLO scales the step by the tensor's RMS alone, which has two failure modes that are not the
meta-parameters' fault: a tensor whose RMS is zero (a zero-initialised bias) or tiny never moves,
and a tensor the step points along grows geometrically (a step of a fixed fraction of RMS(θ)
compounds), which is how the shipped optimizer diverged or went NaN. The floor ``min_scale``
and the trust region ``max_relative_step`` address the two per step; the guard (``max_regress``,
``guard_rate``) stops a run whose smoothed loss gives back a quarter of its progress, since no
per-step bound stops compounding over thousands of steps (:func:`velo_lopt`). Where none of
them binds the step is VeLO's, to the last bit. The three are :mod:`bilevel.lopt.safeguards`'
functions and defaults, which :func:`~bilevel.lopt.safeguards.safeguarded` applies to the
other learned optimizers.

Per-tensor LSTM inputs (28): the fraction of training done ``x = t/num_steps`` as
``tanh(10(x − c))`` for c ∈ {0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1}; nine loss features
(bias-corrected loss EMAs with half-lives log-spaced from 10 to ``num_steps``, placed in the
range between their running minimum and the next slower EMA, minus 1, clipped to [−1, 1]); the
log-variance of the three momenta, the log-mean and log-variance of the second moment (all
after scaling by the tensor's RMS); and a one-hot of the tensor's rank (0 to 4). Before the
LSTM the tensors see each other through a mixing layer, ``Linear(x) + max_tensors(relu(
Linear(x)))``, as in VeLO.

The optimizer needs the training horizon ``num_steps`` (VeLO's critical hidden
hyperparameter) and the minibatch ``loss`` at every ``update``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel.lopt.optimizers import (
    ADAFACTOR_DECAYS,
    EXP_MULT,
    HORIZON_CENTRES,
    MOMENTUM_DECAYS,
    NUM_ACCUMULATOR_FEATURES,
    RMS_DECAYS,
    STEP_MULT,
    LOptState,
    _as_vector,
    _update_factored,
    accumulator_features,
    apply_network,
    init_state,
    learned_decays,
    normalise_per_tensor,
    state_structure,
)
from bilevel.lopt.safeguards import (  # noqa: F401  (re-exported: velo.trust_region, ...)
    GUARD_RATE,
    MAX_REGRESS,
    MAX_RELATIVE_STEP,
    MIN_SCALE,
    check_safeguards,
    guard_step_factor,
    parameter_scale,
    trust_region,
    update_loss_buffer,
)

PyTree = Any

#: Per-parameter MLP inputs: the 28 accumulator features, clip(g, ±0.1) and g/√(v+1e-6).
NUM_PARAM_INPUTS = NUM_ACCUMULATOR_FEATURES + 2
NUM_LOSS_EMAS = 10
MAX_RANK = 4
#: Per-tensor controller inputs: 9 fraction + 9 loss + 3 var(m) + mean(v) + var(v) + 5 rank.
NUM_TENSOR_INPUTS = len(HORIZON_CENTRES) + (NUM_LOSS_EMAS - 1) + len(MOMENTUM_DECAYS) + 2 + (
    MAX_RANK + 1)
GRADIENT_CLIP = 1000.0


class VeLOState(NamedTuple):
    """State of :func:`velo_lopt`.

    Attributes:
      accumulators: momenta, second moments and factored moments (a :class:`LOptState`).
      hidden, cell: the LSTM state, one row per parameter tensor, ``(num_tensors, width)``.
      loss_means: the loss EMAs (not bias-corrected), ``(10,)``.
      loss_min: the running minimum of the bias-corrected EMAs, ``(10,)``.
      initial_loss: the first loss seen (the divergence guard's reference; as the EMAs see
        it), ``()``.
      step_factor: the divergence guard's factor ``ρ`` in ``(0, 1]`` on every step, ``()``.
    """

    accumulators: LOptState
    hidden: jax.Array
    cell: jax.Array
    loss_means: jax.Array
    loss_min: jax.Array
    initial_loss: jax.Array
    step_factor: jax.Array


def _linear(key: jax.Array, fan_in: int, fan_out: int, dtype, scale: float = 1.0) -> dict:
    w = scale / np.sqrt(fan_in) * jax.random.truncated_normal(key, -2.0, 2.0, (fan_in, fan_out))
    return {"w": w.astype(dtype), "b": jnp.zeros((fan_out,), dtype)}


def _apply_linear(layer: dict, x: jax.Array) -> jax.Array:
    return x @ layer["w"] + layer["b"]


#: Index of ``m/√(v+1e-6)`` for the fastest momentum (0.9) among the per-parameter inputs.
NOMINAL_FEATURE = 6
#: The untrained optimizer's step multiplier: steps of 1% of the tensor's RMS.
INITIAL_STEP_MULT = 10.0
#: Scale of each bank member's random deviation from the nominal network.
BANK_NOISE = 0.1


def _nominal_bank(key: jax.Array, bank_size: int, hidden: tuple[int, ...], dtype) -> dict:
    """Bank members = the nominal network + ``BANK_NOISE``·(random network, std 1/√fan_in).

    The nominal network outputs ``d = x_6`` (the normalised ``m/√(v+1e-6)``, an Adam direction
    with momentum 0.9) and ``a = 0``: its first layer holds ``relu(x_6)`` and ``relu(−x_6)``,
    the hidden layers pass them on and the output layer takes their difference.
    """
    sizes = (NUM_PARAM_INPUTS, *hidden, 2)
    bank = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        k = jax.random.fold_in(key, i)
        noise = jax.random.truncated_normal(k, -2.0, 2.0, (bank_size, fan_in, fan_out))
        nominal = np.zeros((fan_in, fan_out))
        if i == 0:
            nominal[NOMINAL_FEATURE, 0], nominal[NOMINAL_FEATURE, 1] = 1.0, -1.0
        elif i < len(sizes) - 2:
            nominal[0, 0] = nominal[1, 1] = 1.0
        else:
            nominal[0, 0], nominal[1, 0] = 1.0, -1.0
        bank[f"w{i}"] = (nominal + BANK_NOISE * noise / np.sqrt(fan_in)).astype(dtype)
        bank[f"b{i}"] = jnp.zeros((bank_size, fan_out), dtype)
    return bank


def init_velo_lopt(key: jax.Array, lstm_width: int = 32, bank_size: int = 16,
                   hidden: tuple[int, ...] = (4, 4), dtype=jnp.float32) -> dict:
    """Meta-parameters of :func:`velo_lopt`.

    The untrained optimizer is a working one. The controller starts at the *mean* of the
    weight bank with step multiplier ``INITIAL_STEP_MULT``: the control head's weights are zero
    with biases ``1/100``, the step-size head's weights zero. Every bank member is a nominal
    network computing an Adam direction (see :func:`_nominal_bank`) plus its own small random
    deviation, so the untrained step is about ``0.01·RMS(θ)·m̂/√v̂`` per tensor. (VeLO starts
    its bank at random and pays for it with thousands of accelerator-months of ES; a nominal
    start is what STAR's nominal term and this project's CPU budget call for.)

    Args:
      key: PRNG key.
      lstm_width: width of the per-tensor LSTM (VeLO: 512; small here so it meta-trains on a
        CPU).
      bank_size: ``K``, the number of per-parameter MLPs mixed (VeLO: 256).
      hidden: hidden widths of the per-parameter MLP.
      dtype: floating dtype.

    Returns:
      ``{"mix_in", "mix_max", "lstm", "controls", "step_size", "bank", decays...}``.
    """
    where = "lopt.init_velo_lopt"
    for name, value in (("lstm_width", lstm_width), ("bank_size", bank_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
    hidden = tuple(hidden)
    if not hidden or any(not isinstance(h, int) or isinstance(h, bool) or h < 1 for h in hidden):
        raise ValueError(f"{where}: hidden must be a non-empty tuple of positive ints, "
                         f"got {hidden!r}")
    keys = jax.random.split(key, 5)
    width = lstm_width
    lstm = {"wx": _linear(keys[2], width, 4 * width, dtype)["w"],
            "wh": _linear(jax.random.fold_in(keys[2], 1), width, 4 * width, dtype)["w"],
            # forget-gate bias 1: the usual LSTM initialisation, so the memory starts open
            "b": jnp.zeros((4 * width,), dtype).at[width:2 * width].set(1.0)}
    bank = _nominal_bank(keys[4], bank_size, hidden, dtype)
    return {
        "mix_in": _linear(keys[0], NUM_TENSOR_INPUTS, width, dtype),
        "mix_max": _linear(keys[1], NUM_TENSOR_INPUTS, width, dtype),
        "lstm": lstm,
        "controls": {"w": jnp.zeros((width, bank_size), dtype),
                     "b": jnp.full((bank_size,), 0.01, dtype)},
        "step_size": {"w": jnp.zeros((width, 1), dtype),
                      "b": jnp.full((1,), np.log(INITIAL_STEP_MULT), dtype)},
        "bank": bank,
        "momentum_decays": jnp.zeros((len(MOMENTUM_DECAYS),), dtype),
        "rms_decays": jnp.zeros((len(RMS_DECAYS),), dtype),
        "adafactor_decays": jnp.zeros((len(ADAFACTOR_DECAYS),), dtype),
    }


# --------------------------------------------------------------------------------------------
# Loss features (VeLO's rolling loss buffer).


def _loss_decays(num_steps: Any, dtype) -> jax.Array:
    """EMA decays ``exp(−1/h)`` for half-lives ``h`` log-spaced from 10 to ``num_steps``."""
    longest = jnp.log(jnp.maximum(jnp.asarray(num_steps, dtype), 10.0))
    half_lives = jnp.exp(jnp.linspace(jnp.log(jnp.asarray(10.0, dtype)), longest, NUM_LOSS_EMAS))
    return jnp.exp(-1.0 / half_lives)


def loss_features(means: jax.Array, running_min: jax.Array, iteration: jax.Array,
                  decays: jax.Array) -> jax.Array:
    """Nine features: each EMA's place between its running minimum and the next slower EMA,
    ``clip((ema_i − min_i)/(ema_{i+1} − min_i) − 1, −1, 1)``; zero for the first two steps."""
    corrected = means / (1.0 - decays ** iteration.astype(decays.dtype))
    span = jnp.maximum(corrected[1:] - running_min[:-1], 1e-8)
    features = jnp.clip((corrected[:-1] - running_min[:-1]) / span - 1.0, -1.0, 1.0)
    return jnp.where(iteration <= 2, 0.0, features)


# --------------------------------------------------------------------------------------------
# Per-tensor controller.


def _clip_log_abs(x: jax.Array, scale: float = 10.0) -> jax.Array:
    return 0.5 * jnp.clip(jnp.log(1e-8 + jnp.abs(scale * x)), -5.0, 5.0)


def tensor_features(p: jax.Array, m: jax.Array, v: jax.Array, fraction: jax.Array,
                    losses: jax.Array, rank: int) -> jax.Array:
    """The controller's 28 inputs for one tensor (``p`` at least one axis, ``m`` and ``v`` with
    a trailing decay axis)."""
    scale = jax.lax.rsqrt(jnp.maximum(1e-9, jnp.mean(jnp.square(p))))
    m, v = m * scale, v * scale
    axes = tuple(range(p.ndim))
    var_m = jnp.var(m, axis=axes)
    mean_v = jnp.mean(v, axis=axes)
    var_v = jnp.var(v, axis=axes)
    return jnp.concatenate([
        jnp.tanh(10.0 * (fraction - jnp.asarray(HORIZON_CENTRES, p.dtype))), losses,
        _clip_log_abs(var_m), _clip_log_abs(mean_v), _clip_log_abs(var_v),
        jax.nn.one_hot(min(rank, MAX_RANK), MAX_RANK + 1, dtype=p.dtype)])


def _lstm(params: dict, x: jax.Array, hidden: jax.Array, cell: jax.Array
          ) -> tuple[jax.Array, jax.Array]:
    gates = x @ params["wx"] + hidden @ params["wh"] + params["b"]
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    cell = jax.nn.sigmoid(f) * cell + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(cell), cell


def controller(meta: dict, features: jax.Array, hidden: jax.Array, cell: jax.Array):
    """All tensors at once: mixing across tensors, one LSTM step, the two heads.

    Args:
      features: ``(num_tensors, 28)``; hidden, cell: ``(num_tensors, width)``.

    Returns:
      ``(controls (num_tensors, K), step_multipliers (num_tensors,), hidden, cell)``.
    """
    shared = jnp.max(jax.nn.relu(_apply_linear(meta["mix_max"], features)), axis=0,
                     keepdims=True)
    x = _apply_linear(meta["mix_in"], features) + shared
    hidden, cell = _lstm(meta["lstm"], x, hidden, cell)
    controls = _apply_linear(meta["controls"], hidden)
    step = jnp.exp(_apply_linear(meta["step_size"], hidden)[:, 0])
    return controls, step, hidden, cell


def mix_bank(bank: dict, controls: jax.Array) -> dict:
    """The tensor's per-parameter MLP: ``(100/K) Σ_k c_k W_k`` for every weight of the bank."""
    k = controls.shape[-1]
    return jax.tree_util.tree_map(lambda w: (100.0 / k) * jnp.tensordot(controls, w, 1), bank)


def param_features(p, g, m, v, fac, fac_g) -> jax.Array:
    """The per-parameter MLP's 30 inputs, normalised per tensor, ``(*p.shape, 30)``."""
    base = accumulator_features(p, g, m, v, fac, fac_g)
    extra = [jnp.clip(g, -0.1, 0.1)[..., None], g[..., None] * jax.lax.rsqrt(v + 1e-6)]
    return normalise_per_tensor(jnp.concatenate([base, *extra], axis=-1))


# --------------------------------------------------------------------------------------------
# The transformation.


def _check_meta(where: str, meta: Any) -> None:
    expected = {"mix_in", "mix_max", "lstm", "controls", "step_size", "bank",
                "momentum_decays", "rms_decays", "adafactor_decays"}
    if not isinstance(meta, dict) or set(meta) != expected:
        found = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{where}: meta must be a dict with keys {sorted(expected)} "
                         f"(from lopt.init_velo_lopt), got {found}")
    inputs = np.shape(meta["bank"]["w0"])[1]
    if inputs != NUM_PARAM_INPUTS:
        raise ValueError(f"{where}: the weight bank takes {inputs} inputs, expected "
                         f"{NUM_PARAM_INPUTS}")


def velo_lopt(meta: dict, num_steps: Any, *, min_scale: float = MIN_SCALE,
              max_relative_step: float = MAX_RELATIVE_STEP, max_regress: float = MAX_REGRESS,
              guard_rate: float = GUARD_RATE) -> optax.GradientTransformationExtraArgs:
    """The VeLO-style learned optimizer (see the module docstring).

    The step of a tensor ``θ`` is ``Δ = −0.001·d·exp(0.001 a)·σ·s`` with the parameter scale
    ``σ = max(RMS(θ), min_scale)``, clipped to the trust region ``RMS(Δ) ≤ max_relative_step·σ``
    (scaled down as a whole, so its direction is kept), times the divergence guard's ``ρ``.

    The three safeguards (issue 17) leave VeLO's step bit for bit wherever they do not bind.
    A per-step bound alone cannot keep a long run finite: a step pinned at 3% of RMS(θ) along
    θ still compounds (1.03^t), which is what the shipped meta-parameters, meta-trained on
    horizons up to 128 steps, do after about a thousand steps. The guard reads the loss VeLO is
    given anyway: while the loss EMA with the shortest half-life (10 steps) is above its
    running minimum ``m`` plus ``max_regress·max(ℓ₀ − m, 0.4·|ℓ₀|)`` (ℓ₀ the first loss),
    ``ρ`` shrinks by ``guard_rate`` a step, and otherwise regrows by ``guard_rate/10`` a step
    to 1 (:func:`bilevel.lopt.safeguards.guard_step_factor`, shared with
    :func:`~bilevel.lopt.safeguards.safeguarded`). A run that has given back a quarter of its
    progress so stops within a few steps, rather than running away. (On ``mlp_digits_long``
    the milder ``max_regress=0.5, guard_rate=0.1`` still let 2 of 4 runs told 0.25x or 1x the
    horizon spike above 1.5x the initial loss; these defaults let none.)

    Args:
      meta: meta-parameters from :func:`init_velo_lopt` or a file.
      num_steps: the training horizon the optimizer is told (a number > 0 or a traced scalar);
        the fraction of training ``t/num_steps`` and the loss EMAs' half-lives depend on it.
      min_scale: floor of the parameter scale ``σ`` (>= 0), in the parameters' units. VeLO's is
        ``√1e-9 ≈ 3e-5``, at which a zero-initialised bias moves by about ``3e-7`` a step and
        effectively never trains; with the default ``1e-2`` such a tensor takes the untrained
        optimizer's step (``0.01·σ`` per unit direction), i.e. Adam's with learning rate
        ``1e-4``, until its own RMS passes the floor. It binds only on tensors with
        ``RMS < min_scale``: zero or tiny ones (the shipped tasks' weight matrices start at
        ``1/√fan_in ≥ 0.036``). 0 restores VeLO's scale.
      max_relative_step: the trust region (> 0, ``math.inf`` to switch it off): one step may
        change a tensor by at most this fraction of its scale, in RMS, so it bounds a step's
        multiplicative growth of the tensor by ``1 + max_relative_step``. The default ``0.03``
        is three times the untrained optimizer's step (``0.01·σ``). The shipped
        meta-parameters step ~0.09·σ in their first steps on ``mlp_digits`` and below 0.01·σ
        after about 50, where the bound does not bind; on a bias-free MLP they step 0.2·σ to
        1·σ at every step, and ``0.1`` still let that run to a loss of 1e10 in 500 steps
        (``0.03`` did not). (A mixture of the bank's ReLU networks scales ``d`` by the cube of
        the mixture's scale, so such steps are easy to produce.)
      max_regress: the guard's threshold, the fraction of the progress from the first loss to
        the smoothed loss's running minimum that may be given back (``math.inf``: no guard).
      guard_rate: the fraction ``ρ`` shrinks by a step while the threshold is passed, in
        ``(0, 1)``; it regrows by ``guard_rate/10`` a step once the loss is back below.

    Returns:
      an ``optax.GradientTransformationExtraArgs``; ``update(grads, state, params, loss=...)``
      needs ``params`` and the minibatch ``loss``.
    """
    where = "lopt.velo_lopt"
    _check_meta(where, meta)
    if num_steps is None:
        raise ValueError(f"{where}: num_steps (the training horizon) is required")
    try:
        if not float(num_steps) > 0:
            raise ValueError(f"{where}: num_steps must be > 0, got {num_steps!r}")
    except (TypeError, jax.errors.ConcretizationTypeError):
        pass  # traced
    check_safeguards(where, min_scale, max_relative_step, max_regress, guard_rate)
    dtype = meta["momentum_decays"].dtype
    width = meta["lstm"]["wh"].shape[0]

    def init(params):
        n = len(jax.tree_util.tree_leaves(params))
        zeros = jnp.zeros((n, width), dtype)
        return VeLOState(init_state(params), zeros, zeros, jnp.zeros((NUM_LOSS_EMAS,), dtype),
                         jnp.full((NUM_LOSS_EMAS,), 1e30, dtype), jnp.zeros((), dtype),
                         jnp.ones((), dtype))

    def update(grads, state, params=None, *, loss=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(f"{where}: update needs params (the current parameters)")
        if loss is None:
            raise ValueError(f"{where}: update needs the minibatch loss: "
                             f"opt.update(grads, state, params, loss=loss)")
        acc = state.accumulators
        decays = _loss_decays(num_steps, dtype)
        loss = jnp.asarray(loss, dtype)
        means, running_min = update_loss_buffer(state.loss_means, state.loss_min, acc.iteration,
                                                loss, decays)
        losses = loss_features(means, running_min, acc.iteration + 1, decays)
        # the fastest EMA, bias-corrected as running_min is, so that at step 0 all three agree
        smoothed = means[0] / (1.0 - decays[0] ** (acc.iteration + 1).astype(dtype))
        initial_loss = jnp.where(acc.iteration == 0, smoothed, state.initial_loss)
        factor = state.step_factor
        if max_regress != np.inf:
            factor = guard_step_factor(factor, smoothed, running_min[0], initial_loss,
                                       max_regress, guard_rate)
        fraction = acc.iteration.astype(dtype) / jnp.asarray(num_steps, dtype)

        beta_m, beta_v, beta_f = (learned_decays(d0, meta[name]) for d0, name in (
            (MOMENTUM_DECAYS, "momentum_decays"), (RMS_DECAYS, "rms_decays"),
            (ADAFACTOR_DECAYS, "adafactor_decays")))
        g_leaves, treedef = jax.tree_util.tree_flatten(grads)
        p_leaves = treedef.flatten_up_to(params)
        state_def = state_structure(grads)
        m_leaves = state_def.flatten_up_to(acc.momentum)
        v_leaves = state_def.flatten_up_to(acc.second_moment)
        f_leaves = state_def.flatten_up_to(acc.factored)

        per_tensor, features = [], []
        for p, g, m, v, fac in zip(p_leaves, g_leaves, m_leaves, v_leaves, f_leaves,
                                   strict=True):
            rank = int(np.sum(np.asarray(jnp.shape(p)) > 1))
            p, g = _as_vector(p), jnp.clip(_as_vector(g), -GRADIENT_CLIP, GRADIENT_CLIP)
            bm, bv, bf = (b.astype(g.dtype) for b in (beta_m, beta_v, beta_f))
            m = bm * m + (1.0 - bm) * g[..., None]
            v = bv * v + (1.0 - bv) * jnp.square(g)[..., None]
            fac, fac_g = _update_factored(fac, g, bf)
            per_tensor.append((p, g, m, v, fac, fac_g))
            features.append(tensor_features(p, m, v, fraction, losses, rank).astype(dtype))

        if features:
            controls, step_mult, hidden, cell = controller(meta, jnp.stack(features),
                                                           state.hidden, state.cell)
        else:  # every parameter frozen (optax.multi_transform, masked): no tensor to control
            hidden, cell = state.hidden, state.cell
        steps, ms, vs, facs = [], [], [], []
        for i, (p, g, m, v, fac, fac_g) in enumerate(per_tensor):
            network = mix_bank(meta["bank"], controls[i])
            out = apply_network(network, param_features(p, g, m, v, fac, fac_g).astype(dtype))
            scale = parameter_scale(p, min_scale)
            step = -STEP_MULT * out[..., 0] * jnp.exp(EXP_MULT * out[..., 1]) * scale * step_mult[i]
            step = trust_region(step, scale, max_relative_step) * factor
            steps.append(step.astype(p.dtype).reshape(jnp.shape(p_leaves[i])))
            ms.append(m)
            vs.append(v)
            facs.append(fac)
        unflatten = state_def.unflatten
        accumulators = LOptState(acc.iteration + 1, unflatten(ms), unflatten(vs),
                                 unflatten(facs))
        return treedef.unflatten(steps), VeLOState(accumulators, hidden, cell, means, running_min,
                                                   initial_loss, factor)

    return optax.GradientTransformationExtraArgs(init, update)
