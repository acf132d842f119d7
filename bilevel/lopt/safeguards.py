"""Stability by construction for learned optimizers (issue 17): a trust region on each tensor's
step relative to the tensor's scale, and a divergence guard that reads the reported loss.

A learned step rule is meta-trained on short horizons and a family of tasks; outside them
nothing in it stops a run from diverging. Two safeguards bound what it can do, and leave its
step bit for bit wherever they do not bind:

* the **trust region**: a tensor ``θ``'s step ``Δ`` is scaled down (as a whole, keeping its
  direction) to ``RMS(Δ) ≤ max_relative_step · σ`` with ``σ = max(RMS(θ), min_scale)``, so
  one step changes a tensor by at most that fraction of its scale;
* the **divergence guard**: every step is multiplied by ``ρ ∈ (0, 1]``. While the loss EMA with
  a 10-step half-life is above its running minimum ``m`` plus ``max_regress·P``, with the
  progress ``P = max(ℓ₀ − m, 0.4·|ℓ₀|)`` from the first loss ``ℓ₀`` (it has given back that
  fraction of its progress), ``ρ`` shrinks by ``guard_rate`` a step; once it is back below,
  ``ρ`` regrows by ``guard_rate/10`` a step, to exactly 1. A per-step bound alone cannot stop
  steps that compound over thousands of steps, nor a network so sharp that one step at the
  bound multiplies its loss; the guard stops both, from the loss every learned optimizer is
  given anyway.

:func:`bilevel.lopt.velo_lopt` has both built in (its floor also enters its step, which VeLO
scales by RMS(θ)); :func:`safeguarded` wraps any other optimizer, such as
:func:`~bilevel.lopt.mlp_lopt` and :func:`~bilevel.lopt.star_lopt`, with the same functions
and the same defaults. :func:`~bilevel.lopt.pretrained_optimizer` applies them to every
shipped optimizer unless told ``safeguards=False``; meta-training uses the bare rule.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

#: Default floor of the parameter scale σ (the parameters' units).
MIN_SCALE = 1e-2
#: Default trust region, the largest step RMS as a fraction of the parameter scale.
MAX_RELATIVE_STEP = 0.03
#: Default divergence guard: the fraction of its progress the smoothed loss may give back...
MAX_REGRESS = 0.25
#: ... before every step shrinks by this fraction a step (and grows back by as much after).
GUARD_RATE = 0.5
#: Half-life (steps) of the loss EMA the guard reads.
GUARD_HALF_LIFE = 10.0
#: The guard counts the progress as at least this fraction of the first loss, so that
#: minibatch noise before any progress (the EMA above its running minimum by a little) does not
#: trip it: without the floor it froze one of two runs of mlp_lopt on mlp_digits at the start.
PROGRESS_FLOOR = 0.4
#: ρ regrows by REGROW_RATIO·guard_rate a step, ten times more slowly than it shrinks: regrown
#: by 1/(1 − guard_rate) a step, mlp_lopt on mlp_digits_wide_deep was back at full steps within
#: three steps of a blow-up and blew up again.
REGROW_RATIO = 0.1
#: The keyword arguments of the safeguards and their defaults.
DEFAULTS = {"min_scale": MIN_SCALE, "max_relative_step": MAX_RELATIVE_STEP,
            "max_regress": MAX_REGRESS, "guard_rate": GUARD_RATE}
#: The safeguards switched off (VeLO's own rule when given to velo_lopt).
OFF = {"min_scale": 0.0, "max_relative_step": math.inf, "max_regress": math.inf}


def check_safeguards(where: str, min_scale: Any, max_relative_step: Any, max_regress: Any,
                     guard_rate: Any) -> None:
    """Raise ``ValueError`` naming the argument when a safeguard setting is out of range."""
    def number(x):
        return isinstance(x, int | float) and not isinstance(x, bool)

    if not number(min_scale) or not 0.0 <= min_scale < np.inf:
        raise ValueError(f"{where}: min_scale must be a finite number >= 0, got {min_scale!r}")
    if not number(max_relative_step) or not max_relative_step > 0.0:
        raise ValueError(f"{where}: max_relative_step must be a number > 0 (math.inf: no "
                         f"trust region), got {max_relative_step!r}")
    if not number(max_regress) or not max_regress >= 0.0:
        raise ValueError(f"{where}: max_regress must be a number >= 0 (math.inf: no guard), "
                         f"got {max_regress!r}")
    if not number(guard_rate) or not 0.0 < guard_rate < 1.0:
        raise ValueError(f"{where}: guard_rate must be a number in (0, 1), got {guard_rate!r}")


def parameter_scale(p: jax.Array, min_scale: float) -> jax.Array:
    """``σ = max(√(mean(θ²) + 1e-9), min_scale)``: VeLO's RMS scale with a floor."""
    return jnp.maximum(jnp.sqrt(jnp.mean(jnp.square(p)) + 1e-9), min_scale)


def trust_region(step: jax.Array, scale: jax.Array, max_relative_step: float) -> jax.Array:
    """``step`` scaled down (as a whole) to ``RMS(step) ≤ max_relative_step·scale``.

    Where the bound does not bind the factor is exactly 1 (``jnp.minimum``), so the step is
    returned bit for bit; the ``1e-30`` only keeps a zero step finite.
    """
    if max_relative_step == np.inf:
        return step
    rms = jnp.sqrt(jnp.mean(jnp.square(step)))
    return step * jnp.minimum(1.0, max_relative_step * scale / jnp.maximum(rms, 1e-30))


def guard_step_factor(factor: jax.Array, smoothed: jax.Array, lowest: jax.Array,
                      initial: jax.Array, max_regress: float, rate: float) -> jax.Array:
    """The divergence guard's next factor ``ρ``.

    The smoothed loss has *regressed* when it is above ``lowest + max_regress·P``, with the
    progress ``P = max(initial − lowest, PROGRESS_FLOOR·|initial|)``: it has given back that
    fraction of its progress. Then ``ρ`` shrinks by ``rate``; otherwise it regrows by
    ``rate·REGROW_RATIO`` (ten times more slowly), up to exactly 1.
    """
    progress = jnp.maximum(initial - lowest, PROGRESS_FLOOR * jnp.abs(initial))
    regressed = smoothed > lowest + max_regress * progress
    return jnp.where(regressed, factor * (1.0 - rate),
                     jnp.minimum(1.0, factor * (1.0 + REGROW_RATIO * rate)))


def update_loss_buffer(means: jax.Array, running_min: jax.Array, iteration: jax.Array,
                       loss: jax.Array, decays: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One step of the loss EMAs (not bias-corrected) and the running minimum of the
    bias-corrected ones; the loss is first clipped to twice the largest EMA so that a single
    spike (or an infinite loss) cannot wreck them."""
    t = iteration.astype(decays.dtype)
    corrected = means / (1.0 - decays ** (t + 1.0))
    ceiling = jnp.where(iteration == 0, loss, 2.0 * jnp.abs(jnp.max(corrected)))
    loss = jnp.minimum(loss, ceiling)
    means = decays * means + (1.0 - decays) * loss
    corrected = means / (1.0 - decays ** (t + 1.0))
    return means, jnp.minimum(running_min, corrected)


class SafeguardState(NamedTuple):
    """State of :func:`safeguarded`.

    Attributes:
      inner: the wrapped optimizer's state.
      iteration: the number of updates made so far (int32).
      loss_mean: the guard's loss EMA (not bias-corrected), ``()``.
      loss_min: the running minimum of the bias-corrected EMA, ``()``.
      initial_loss: the first loss seen (as the EMA sees it), ``()``.
      step_factor: the guard's factor ``ρ`` in ``(0, 1]`` on every step, ``()``.
    """

    inner: PyTree
    iteration: jax.Array
    loss_mean: jax.Array
    loss_min: jax.Array
    initial_loss: jax.Array
    step_factor: jax.Array


def _state_dtype(params: PyTree):
    leaves = [x for x in jax.tree_util.tree_leaves(params)
              if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    return jnp.result_type(*leaves) if leaves else jnp.float32


def safeguarded(inner: optax.GradientTransformation, *, min_scale: float = MIN_SCALE,
                max_relative_step: float = MAX_RELATIVE_STEP, max_regress: float = MAX_REGRESS,
                guard_rate: float = GUARD_RATE) -> optax.GradientTransformationExtraArgs:
    """``inner`` with the trust region and the divergence guard (see the module docstring).

    The update of a tensor ``θ`` is ``ρ · clip(Δ)``, with ``Δ`` the inner optimizer's update
    and ``clip`` the trust region ``RMS(Δ) ≤ max_relative_step·max(RMS(θ), min_scale)``.
    Where neither binds (``ρ = 1`` and ``Δ`` inside the region) the update is ``Δ`` bit for
    bit; so it is with ``max_relative_step = max_regress = math.inf``.

    Args:
      inner: the optimizer to guard (its ``update`` receives ``params`` and the extra
        arguments, ``loss=`` included).
      min_scale: floor of the parameter scale σ (>= 0): a zero-initialised tensor may still
        move by ``max_relative_step·min_scale`` a step.
      max_relative_step: the trust region (> 0, ``math.inf`` to switch it off).
      max_regress: the guard's threshold, the fraction of the progress from the first loss to
        the smoothed loss's running minimum that may be given back (>= 0, ``math.inf``: no
        guard).
      guard_rate: the fraction ``ρ`` shrinks by a step while the threshold is passed, in
        ``(0, 1)``.

    Returns:
      an ``optax.GradientTransformationExtraArgs`` with state :class:`SafeguardState`;
      ``update(grads, state, params, loss=...)`` needs ``params`` and, with the guard on, the
      minibatch ``loss``.
    """
    where = "lopt.safeguarded"
    if not isinstance(inner, optax.GradientTransformation | optax.GradientTransformationExtraArgs):
        raise TypeError(f"{where}: inner must be an optax GradientTransformation, "
                        f"got {type(inner).__name__}")
    check_safeguards(where, min_scale, max_relative_step, max_regress, guard_rate)
    inner = optax.with_extra_args_support(inner)
    guard = max_regress != np.inf

    def init(params):
        dtype = _state_dtype(params)
        return SafeguardState(inner.init(params), jnp.zeros((), jnp.int32),
                              jnp.zeros((), dtype), jnp.full((), 1e30, dtype),
                              jnp.zeros((), dtype), jnp.ones((), dtype))

    def update(grads, state, params=None, **extra_args):
        if params is None:
            raise ValueError(f"{where}: update needs params (the current parameters)")
        loss = extra_args.get("loss")
        if guard and loss is None:
            raise ValueError(f"{where}: update needs the minibatch loss: "
                             f"opt.update(grads, state, params, loss=loss)")
        updates, inner_state = inner.update(grads, state.inner, params, **extra_args)
        means, lowest, initial, factor = (state.loss_mean, state.loss_min, state.initial_loss,
                                          state.step_factor)
        if guard:
            dtype = factor.dtype
            decay = jnp.exp(jnp.asarray(-1.0 / GUARD_HALF_LIFE, dtype))
            means, lowest = update_loss_buffer(means, lowest, state.iteration,
                                               jnp.asarray(loss, dtype), decay)
            smoothed = means / (1.0 - decay ** (state.iteration + 1).astype(dtype))
            initial = jnp.where(state.iteration == 0, smoothed, initial)
            factor = guard_step_factor(factor, smoothed, lowest, initial, max_regress,
                                       guard_rate)
        u_leaves, treedef = jax.tree_util.tree_flatten(updates)
        p_leaves = treedef.flatten_up_to(params)
        steps = []
        for u, p in zip(u_leaves, p_leaves, strict=True):
            step = trust_region(u, parameter_scale(jnp.asarray(p), min_scale), max_relative_step)
            steps.append((step * factor if guard else step).astype(u.dtype))
        return treedef.unflatten(steps), SafeguardState(inner_state, state.iteration + 1, means,
                                                        lowest, initial, factor)

    return optax.GradientTransformationExtraArgs(init, update)
