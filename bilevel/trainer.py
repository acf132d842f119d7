"""The bilevel training loop: warm-started inner optax steps, then one hypergradient step on λ.

Each outer step runs, as ONE jitted function compiled once (data are its arguments),

    θ ← θ + U_in(∇_θ L_in(θ, λ))            (``inner_steps`` optax steps, warm-started from the
                                            previous outer step's θ and inner optimizer state)
    g ← dL_out/dλ                           (any method: ImplicitMethod, UnrolledMethod, ESMethod)
    g ← g · min(1, c / ||g||)               (optional global-norm clip c = ``hypergrad_clip``)
    λ ← λ + U_out(g)                        (outer optax step)

The way of differentiating is a swappable object (as optimistix's adjoints are):
:class:`ImplicitMethod`
(the IFT with any :mod:`hvp` solver, optionally warm-started from the previous inverse HVP),
:class:`UnrolledMethod` (backpropagation through ``steps`` more inner steps, MixFlow-MG by
default) and
:class:`ESMethod` (antithetic evolution strategies on the outer loss after ``steps`` inner steps).

A step whose hypergradient, outer loss or updated λ is not finite is never applied (skip, not
stop): λ and the outer optimizer state keep their values, the history row says
``finite=False, skipped=True``, :attr:`TrainResult.skipped_steps` counts such steps and
:func:`train` warns at the end. Training goes on, since the inner problem keeps moving and that
may cure the cause; inner state that itself became non-finite is rolled back too. Unconverged
(but finite) implicit solves are applied and reported in the ``converged`` column.

Data are the whole arrays at every step (plain tuples, the default), or a stream
(:mod:`bilevel.streams`): a :class:`bilevel.Minibatches` drawn inside the jitted step, or a host
iterator of batches; each outer step then takes ``inner_steps + 1`` inner batches (one per inner
step, one for the hypergradient) and one outer batch::

    data = bilevel.Minibatches((x, y), batch_size=64)      # epochs of shuffled minibatches
    bilevel.train(inner_loss, outer_loss, params, hparams, config, data, (x_val, y_val))

The loop itself (progress bar, metrics, checkpoints) is a thin host-side shell around the pure
step. Checkpoints are written atomically and a run killed and restarted on the same
``checkpoint_dir`` ends with bit-identical params, hparams and history (wall times aside), its
streams continuing where they stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hvp
from bilevel import _common, checkpoint, unrolled
from bilevel.implicit import hypergrad
from bilevel.streams import FetchedFeed, HostStream, Minibatches, SampledFeed
from bilevel.unrolled import unrolled_hypergrad
from hvp import checks as _checks

PyTree = Any

CHECKPOINT_NAME = "checkpoint.npz"
#: Keys every history row has; ``metrics`` may not reuse them.
_BASE_KEYS = ("step", "outer_loss", "hypergrad_norm", "clipped", "finite", "skipped",
              "wall_time")


# --------------------------------------------------------------------------------------------
# Field validation.


def _fail(owner: str, name: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"bilevel.{owner}: {name} must be {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_int(owner: str, name: str, value: Any, low: int, high: float = math.inf,
               allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _is_int(value) or not low <= value <= high:
        bound = f"in [{low}, {high}]" if high < math.inf else f">= {low}"
        raise _fail(owner, name, f"an integer {bound}" + (" or None" if allow_none else ""),
                    value)


def _check_positive_float(owner: str, name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    number = isinstance(value, int | float | np.floating) and not isinstance(value, bool)
    if not number or not 0.0 < value < math.inf:
        raise _fail(owner, name, "a finite number > 0" + (" or None" if allow_none else ""),
                    value)


def _check_choice(owner: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise _fail(owner, name, f"one of {choices}", value)


# --------------------------------------------------------------------------------------------
# Methods: how the hypergradient is computed.


class InnerProblem(NamedTuple):
    """What a method sees of the bilevel problem inside the jitted outer step."""

    inner_loss: Callable
    outer_loss: Callable
    inner_optimizer: Any  # optax transformation or hparams -> transformation
    inner_args: tuple
    outer_args: tuple


class AbstractMethod:
    """The protocol of a way of computing ``dL_out/dλ`` inside :func:`train`.

    A method is a frozen dataclass (its fields are its settings, checked in ``__post_init__``)
    that implements two pure functions, both traced inside the jitted outer step:

    * ``init(params) -> state``: the state the method carries from one outer step to the next
      (e.g. :class:`ImplicitMethod`'s warm-start vector); checkpointed with the run. A method
      whose state also depends on λ₀ or the data overrides ``init_state(problem, params,
      hparams)`` instead, which :func:`train` calls (its default calls ``init``);
    * ``hypergrad(problem, params, hparams, state, key) -> (grad, new_params, new_state,
      stats)``: ``problem`` is an :class:`InnerProblem`; ``grad`` is shaped like ``hparams``;
      ``new_params`` are the inner parameters to carry on from (``params``, or θ_T of an
      unroll); ``stats`` is a dict of scalars for the history that holds ``outer_loss`` and
      ``finite`` (a step with ``finite`` False is skipped, not applied).

    :func:`bilevel.unrolled.inner_steps` runs optax steps on the inner loss for methods that
    need them.

    A method that draws its own minibatches from per-sample arrays in ``problem.inner_args`` /
    ``problem.outer_args`` (the :mod:`bilevel.stochastic` ones) sets the class attribute
    ``draws_own_batches = True`` and has the fields ``inner_batch_size`` and
    ``outer_batch_size`` (``None``: all rows). Given a :class:`bilevel.Minibatches`,
    :func:`train` then hands such a method the stream's arrays and sets its batch size from
    the stream's; every other method gets one batch per side and outer step.
    """

    #: True for a method that samples minibatches itself (see above).
    draws_own_batches = False

    def init(self, params: PyTree) -> PyTree:
        return ()

    def init_state(self, problem: InnerProblem, params: PyTree, hparams: PyTree) -> PyTree:
        """The state at the start of training, for a method whose state needs more than θ₀
        (e.g. SAGA memories shaped like λ and the data); by default ``init(params)``."""
        return self.init(params)

    def hypergrad(self, problem: InnerProblem, params: PyTree, hparams: PyTree, state: PyTree,
                  key: jax.Array) -> tuple[PyTree, PyTree, PyTree, dict]:
        raise NotImplementedError(f"{type(self).__name__} does not implement hypergrad")


@dataclasses.dataclass(frozen=True)
class ImplicitMethod(AbstractMethod):
    """ImplicitMethod hypergradient (:func:`bilevel.hypergrad`) at the current inner parameters.

    ``dL_out/dλ = ∂_λ L_out − ∂²_{λθ} L_in · H⁻¹ ∇_θ L_out``, the inverse HVP from ``solver``.
    The history gets ``residual_norm``, ``iterations``, ``hvp_count`` and ``converged`` of the
    solve, and ``stationary`` / ``inner_grad_norm`` of the inner parameters (see
    :func:`bilevel.hypergrad`). With ``warm_start=True`` the solve starts from the previous outer
    step's inverse HVP (``info.inverse_hvp``), which is carried, and checkpointed, from step to
    step.

    Attributes:
      solver: any :mod:`hvp` solver; with ``warm_start`` one that accepts ``init``.
      mode: product mode, one of ``hvp``'s modes (``"fwd_rev"``, ``"rev_rev"``, ``"rev_fwd"``).
      damping: Tikhonov damping δ >= 0 (the solve uses ``H + δI``); 0 with ``curvature``.
      warm_start: start each solve from the previous inverse HVP.
      curvature: optional ``curvature(params, hparams, *inner_args) -> hvp.LinearOperator`` used
        instead of the Hessian (e.g. :func:`hvp.ggn`).
    """

    solver: hvp.AbstractSolver = hvp.CG(maxiter=20)
    mode: str = "fwd_rev"
    damping: float = 0.0
    warm_start: bool = False
    curvature: Callable | None = None

    def __post_init__(self):
        if not isinstance(self.solver, hvp.AbstractSolver):
            raise TypeError("bilevel.ImplicitMethod: solver must be an hvp solver such as "
                            f"hvp.CG(), "
                            f"got {type(self.solver).__name__}")
        _check_choice("ImplicitMethod", "mode", self.mode, _checks.MODES)
        number = isinstance(self.damping, int | float) and not isinstance(self.damping, bool)
        if not number or not 0.0 <= self.damping < math.inf:
            raise _fail("ImplicitMethod", "damping", "a finite number >= 0", self.damping)
        if not isinstance(self.warm_start, bool):
            raise _fail("ImplicitMethod", "warm_start", "True or False", self.warm_start)
        if self.warm_start and not self.solver.accepts_init:
            raise ValueError(f"bilevel.ImplicitMethod: warm_start=True needs a solver that accepts "
                             f"init; {type(self.solver).__name__} does not")
        if self.curvature is not None and not callable(self.curvature):
            raise _fail("ImplicitMethod", "curvature", "None or a callable", self.curvature)
        if self.curvature is not None and self.damping != 0.0:
            raise ValueError("bilevel.ImplicitMethod: damping must be 0 with curvature= (add the "
                             "damping to the operator curvature builds)")

    def init(self, params):
        return jax.tree_util.tree_map(jnp.zeros_like, params) if self.warm_start else ()

    def hypergrad(self, inner, params, hparams, state, key):
        init = state if self.warm_start else None
        grad, info = hypergrad(inner.inner_loss, inner.outer_loss, params, hparams,
                               inner.inner_args, inner.outer_args, solver=self.solver,
                               mode=self.mode, damping=self.damping, curvature=self.curvature,
                               init=init, key=key, on_failure="ignore")
        if self.warm_start:
            # Keep the vector only from a solve that made progress; one that met negative
            # curvature, diverged or went non-finite would poison every later solve.
            usable = info.finite & ((info.status == hvp.Status.CONVERGED)
                                    | (info.status == hvp.Status.MAX_ITERATIONS)
                                    | (info.status == hvp.Status.STAGNATED))
            state = jax.tree_util.tree_map(
                lambda v: jnp.where(usable, v, jnp.zeros_like(v)), info.inverse_hvp)
        stats = {"outer_loss": info.outer_loss, "finite": info.finite,
                 # The solve's own verdict; whether the warm-started inner parameters are
                 # stationary is its own column.
                 "converged": (info.status == hvp.Status.CONVERGED) & info.finite,
                 "residual_norm": info.residual_norm,
                 "iterations": info.iterations, "hvp_count": info.hvp_count,
                 "status": info.status, "stationary": info.stationary,
                 "inner_grad_norm": info.inner_grad_norm}
        return grad, params, state, stats


@dataclasses.dataclass(frozen=True)
class UnrolledMethod(AbstractMethod):
    """Unrolled meta-gradient (:func:`bilevel.unrolled_hypergrad`) through ``steps`` more inner
    steps of the inner optimizer, starting from the current inner parameters.

    The unroll's final parameters (``info.params``) become the new inner parameters, so each
    outer step advances θ by ``inner_steps + steps`` updates. The unroll starts from a fresh
    inner optimizer state (``optimizer.init(θ)``), as :func:`bilevel.unrolled_hypergrad` does;
    the carried inner optimizer state is used by the ``inner_steps`` plain steps only. The
    ``outer_loss`` in the history is ``L_out(θ_T, λ)`` and ``converged`` is the unroll's
    ``info.converged`` (finite, and the inner loss did not blow up; see
    :class:`bilevel.UnrolledInfo`); there is no solve, so the history has no residual, iteration
    or HVP columns.

    Attributes:
      steps: unrolled inner steps T >= 1.
      mode: ``"mixflow"`` (MixFlow-MG, default) or ``"reverse"``.
      checkpoint_every: trajectory checkpointing: ``None``, an integer in [1, steps] or ``"sqrt"``.
      truncate: backpropagate through the last ``truncate`` steps only (``None``: all).
    """

    steps: int
    mode: str = "mixflow"
    checkpoint_every: int | str | None = None
    truncate: int | None = None

    def __post_init__(self):
        _check_int("UnrolledMethod", "steps", self.steps, 1)
        _check_choice("UnrolledMethod", "mode", self.mode, ("mixflow", "reverse"))
        if self.checkpoint_every != "sqrt":
            _check_int("UnrolledMethod", "checkpoint_every", self.checkpoint_every, 1, self.steps,
                       allow_none=True)
        _check_int("UnrolledMethod", "truncate", self.truncate, 1, self.steps, allow_none=True)

    def hypergrad(self, inner, params, hparams, state, key):
        grad, info = unrolled_hypergrad(inner.inner_loss, inner.outer_loss, params, hparams,
                                        optimizer=inner.inner_optimizer, steps=self.steps,
                                        inner_args=inner.inner_args,
                                        outer_args=inner.outer_args, mode=self.mode,
                                        checkpoint_every=self.checkpoint_every,
                                        truncate=self.truncate, on_failure="ignore")
        stats = {"outer_loss": info.outer_loss, "finite": info.finite,
                 "converged": info.converged}
        return grad, info.params, state, stats


@dataclasses.dataclass(frozen=True)
class ESMethod(AbstractMethod):
    """Antithetic evolution strategies (:func:`bilevel.es_hypergrad`) on the meta-loss
    ``λ ↦ L_out(θ_T(λ), λ)``, θ_T = ``steps`` inner optimizer steps from the current θ with a
    fresh optimizer state: the meta-loss :class:`UnrolledMethod` differentiates, estimated from
    ``population`` evaluations instead of backpropagation.

    As with :class:`UnrolledMethod`, θ_T at the unperturbed λ (one more evaluation) becomes the new
    inner parameters and ``outer_loss`` in the history is ``L_out(θ_T, λ)``; ``es_loss`` is the
    mean perturbed meta-loss and ``es_loss_std`` its spread over the population. Each outer step
    draws fresh directions from the trainer's PRNG key (checkpointed, so a resumed run draws the
    same ones).

    Attributes:
      population: perturbed evaluations per estimate, an integer >= 2 (even when antithetic).
      sigma: the perturbation scale σ > 0, in the units of ``hparams``.
      steps: inner steps inside the meta-loss, >= 1 (required, keyword).
      antithetic: use ``±ε`` pairs.
    """

    population: int = 16
    sigma: float = 0.01
    steps: int = dataclasses.field(kw_only=True)
    antithetic: bool = True

    def __post_init__(self):
        if not isinstance(self.antithetic, bool):
            raise _fail("ESMethod", "antithetic", "True or False", self.antithetic)
        _check_int("ESMethod", "population", self.population, 2)
        if self.antithetic and self.population % 2:
            raise _fail("ESMethod", "population", "an even integer with antithetic=True",
                        self.population)
        _check_positive_float("ESMethod", "sigma", self.sigma)
        _check_int("ESMethod", "steps", self.steps, 1)

    def hypergrad(self, inner, params, hparams, state, key):
        from bilevel.es import es_hypergrad  # a sibling module; imported where it is used

        def unroll(h, params, inner_args):
            transformation = _resolve_optimizer(inner.inner_optimizer, h)
            start = (params, transformation.init(params))
            (final, _), _ = _inner_loop(inner.inner_loss, transformation, start, h, inner_args,
                                        self.steps)
            return final

        def meta_loss(h, params, inner_args, outer_args):
            return inner.outer_loss(unroll(h, params, inner_args), h, *outer_args)

        grad, info = es_hypergrad(meta_loss, hparams, key, population=self.population,
                                  sigma=self.sigma, antithetic=self.antithetic,
                                  args=(params, inner.inner_args, inner.outer_args),
                                  on_failure="ignore")
        # θ_T at the unperturbed λ needs this run of its own: antithetic ES evaluates only
        # λ ± σε, and θ_T(λ) is neither of them nor their mean (the inner run is not linear in
        # λ). Measured on the CPU (ridge, 50 inner steps): 1.12x the step at population 16,
        # 1.17x at 4. With antithetic=False it is the baseline's own run, and XLA merges the
        # two identical loops (no extra loop in the compiled program, 1.01x).
        final = unroll(hparams, params, inner.inner_args)
        stats = {"outer_loss": inner.outer_loss(final, hparams, *inner.outer_args),
                 "finite": info.finite, "es_loss": info.outer_loss,
                 "es_loss_std": info.outer_loss_std}
        return grad, final, state, stats


# --------------------------------------------------------------------------------------------
# Configuration and result.


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """Everything about a bilevel training run except the problem.

    Attributes:
      outer_steps: number of outer (hyperparameter) steps, >= 1.
      inner_steps: plain inner optax steps per outer step, >= 0, warm-started from the previous
        outer step's inner parameters and inner optimizer state.
      inner_optimizer: an optax ``GradientTransformation``, or a function
        ``hparams -> GradientTransformation`` (λ in the update rule, e.g. a learned optimizer).
      outer_optimizer: an optax ``GradientTransformation`` applied to the hypergradient.
      method: :class:`ImplicitMethod`, :class:`UnrolledMethod` or :class:`ESMethod`.
      hypergrad_clip: clip the hypergradient's global norm to this value (a stability remedy
        against rare huge hypergradients from ill-conditioned solves); ``None``: no clipping.
      checkpoint_every: write a checkpoint every this many outer steps (and always at the end)
        when :func:`train` gets a ``checkpoint_dir``; ``None``: only at the end.
      seed: seeds the trainer's PRNG key (evolution-strategy directions, randomised solvers),
        an integer >= 0.
    """

    outer_steps: int
    inner_steps: int
    inner_optimizer: Any
    outer_optimizer: optax.GradientTransformation
    method: AbstractMethod = ImplicitMethod()
    hypergrad_clip: float | None = None
    checkpoint_every: int | None = None
    seed: int = 0

    def __post_init__(self):
        _check_int("TrainerConfig", "outer_steps", self.outer_steps, 1)
        _check_int("TrainerConfig", "inner_steps", self.inner_steps, 0)
        if not isinstance(self.inner_optimizer, optax.GradientTransformation) and not callable(
                self.inner_optimizer):
            raise _fail("TrainerConfig", "inner_optimizer", "an optax GradientTransformation or "
                        "a function hparams -> GradientTransformation", self.inner_optimizer)
        if not isinstance(self.outer_optimizer, optax.GradientTransformation):
            raise _fail("TrainerConfig", "outer_optimizer", "an optax GradientTransformation",
                        self.outer_optimizer)
        if not isinstance(self.method, AbstractMethod):
            raise _fail("TrainerConfig", "method",
                        "bilevel.ImplicitMethod(...), bilevel.UnrolledMethod(...) "
                        "or bilevel.ESMethod(...)", self.method)
        _check_positive_float("TrainerConfig", "hypergrad_clip", self.hypergrad_clip,
                              allow_none=True)
        _check_int("TrainerConfig", "checkpoint_every", self.checkpoint_every, 1,
                   allow_none=True)
        _check_int("TrainerConfig", "seed", self.seed, 0, 2**32 - 1)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """The outcome of :func:`train`.

    Attributes:
      params: the final inner parameters.
      hparams: the final hyperparameters.
      history: one dict per outer step (including steps run before a resume), with ``step``
        (1-based), ``outer_loss`` (at the inner parameters the hypergradient used, before the
        λ update), ``hypergrad_norm`` (before clipping), ``clipped``, ``finite``, ``skipped``,
        ``wall_time`` (seconds of the jitted step, compilation excluded), ``inner_loss`` (at the
        last plain inner step, when ``inner_steps >= 1``), the method's own columns (see
        :class:`ImplicitMethod`, :class:`UnrolledMethod`, :class:`ESMethod`) and the ``metrics``
        callback's.
      resumed_from: the outer step the run resumed from (0 for a fresh run).
      compile_time: seconds spent compiling the outer step (0.0 if nothing was left to run).
    """

    params: PyTree
    hparams: PyTree
    history: list[dict[str, Any]]
    resumed_from: int = 0
    compile_time: float = 0.0

    @property
    def skipped_steps(self) -> int:
        """Outer steps whose non-finite hypergradient was not applied."""
        return sum(bool(row["skipped"]) for row in self.history)

    def series(self, name: str) -> np.ndarray:
        """One history column as an array over the outer steps."""
        return np.array([row[name] for row in self.history])


# --------------------------------------------------------------------------------------------
# The pure outer step.


class _State(NamedTuple):
    step: jax.Array  # outer steps done (int32)
    params: PyTree
    hparams: PyTree
    inner_opt_state: PyTree
    outer_opt_state: PyTree
    method_state: PyTree  # e.g. ImplicitMethod's warm-start vector
    key: jax.Array


def _resolve_optimizer(optimizer: Any, hparams: PyTree) -> optax.GradientTransformation:
    return unrolled.resolve_optimizer("bilevel.train: inner_optimizer", optimizer, hparams)


_inner_loop = unrolled.inner_steps


def _clip(grad: PyTree, norm: jax.Array, clip: float | None) -> tuple[PyTree, jax.Array]:
    """``g · min(1, c / ||g||)``; returns the clipped gradient and whether it was scaled."""
    if clip is None:
        return grad, jnp.array(False)
    scale = jnp.minimum(1.0, clip / norm)
    return jax.tree_util.tree_map(lambda g: g * scale.astype(g.dtype), grad), norm > clip


def _select(ok: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)


def _floating_finite(tree: PyTree) -> jax.Array:
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if _common.is_differentiable(x)]
    return _common.tree_all_finite(leaves)


def _same_types(new: PyTree, old: PyTree) -> PyTree:
    """Cast every output leaf to its input's dtype (and strong type), so that the next call has
    exactly the signature the step was compiled for."""
    def cast(n, o):
        if jnp.issubdtype(o.dtype, jax.dtypes.prng_key):
            return n
        return jax.lax.convert_element_type(n, o.dtype)
    return jax.tree_util.tree_map(cast, new, old)


def _outer_update(config: TrainerConfig, state: _State, grad: PyTree, finite: jax.Array):
    """Clip, then one outer optax step on λ, applied only if everything stayed finite."""
    norm = _common.tree_norm(grad)
    clipped_grad, clipped = _clip(grad, norm, config.hypergrad_clip)
    updates, opt_state = config.outer_optimizer.update(clipped_grad, state.outer_opt_state,
                                                       state.hparams)
    hparams = optax.apply_updates(state.hparams, updates)
    finite = finite & _common.tree_all_finite(grad)
    apply = finite & _floating_finite((hparams, opt_state))
    stats = {"hypergrad_norm": norm, "clipped": clipped, "finite": finite, "skipped": ~apply}
    return (_select(apply, hparams, state.hparams),
            _select(apply, opt_state, state.outer_opt_state), stats)


def _is_feed(data: Any) -> bool:
    return isinstance(data, SampledFeed | FetchedFeed)


def _streamed_inner_loop(inner_loss: Callable, transformation, start: tuple, hparams: PyTree,
                         feed: Any, step: jax.Array, steps: int):
    """``steps`` inner optax steps, step t on draw ``step·(steps+1) + t`` of the stream, and the
    next draw (the method's batch); returns the final carry, the losses and that batch."""
    selectors = feed.selectors(step * (steps + 1), steps + 1)

    def one(carry, selector):
        carry, losses = _inner_loop(inner_loss, transformation, carry, hparams,
                                    feed.batch(selector), 1)
        return carry, losses[0]

    head = jax.tree_util.tree_map(lambda s: s[:steps], selectors)
    carry, losses = jax.lax.scan(one, start, head)
    return carry, losses, feed.batch(jax.tree_util.tree_map(lambda s: s[steps], selectors))


def _one_draw(data: Any, step: jax.Array) -> tuple:
    """The outer data of outer step ``step``: the arrays, or draw ``step`` of the stream."""
    if not _is_feed(data):
        return data
    return data.batch(jax.tree_util.tree_map(lambda s: s[0], data.selectors(step, 1)))


def _make_step(inner_loss: Callable, outer_loss: Callable, config: TrainerConfig) -> Callable:
    """The pure outer step ``(state, inner_data, outer_data) -> (state, stats)``; each data is
    the loss's tuple of arrays, or a stream's feed (:mod:`bilevel.streams`)."""

    def _outer_step(state: _State, inner_data: Any, outer_data: Any):
        key, method_key = jax.random.split(state.key)
        transformation = _resolve_optimizer(config.inner_optimizer, state.hparams)
        if _is_feed(inner_data):
            (params, inner_opt_state), inner_losses, inner_args = _streamed_inner_loop(
                inner_loss, transformation, (state.params, state.inner_opt_state),
                state.hparams, inner_data, state.step, config.inner_steps)
        else:
            inner_args = inner_data
            (params, inner_opt_state), inner_losses = _inner_loop(
                inner_loss, transformation, (state.params, state.inner_opt_state),
                state.hparams, inner_args, config.inner_steps)
        outer_args = _one_draw(outer_data, state.step)
        inner = InnerProblem(inner_loss, outer_loss, config.inner_optimizer, inner_args,
                             outer_args)
        grad, params, method_state, stats = config.method.hypergrad(
            inner, params, state.hparams, state.method_state, method_key)
        if config.inner_steps:
            stats["inner_loss"] = inner_losses[-1]
        # Inner state that turned non-finite is rolled back rather than carried on.
        inner_ok = _floating_finite((params, inner_opt_state))
        params = _select(inner_ok, params, state.params)
        inner_opt_state = _select(inner_ok, inner_opt_state, state.inner_opt_state)
        finite = stats.pop("finite") & jnp.isfinite(stats["outer_loss"])
        hparams, outer_opt_state, update_stats = _outer_update(config, state, grad, finite)
        new = _State(state.step + 1, params, hparams, inner_opt_state, outer_opt_state,
                     method_state, key)
        return _same_types(new, state), {**stats, **update_stats}

    return _outer_step


@functools.lru_cache(maxsize=16)
def _cached_jit(inner_loss: Callable, outer_loss: Callable, config: TrainerConfig) -> Callable:
    return jax.jit(_make_step(inner_loss, outer_loss, config))


def _jitted_step(inner_loss: Callable, outer_loss: Callable, config: TrainerConfig) -> Callable:
    """The jitted outer step, shared by every run whose losses and step-relevant config are the
    same objects, so that a resumed run (or a sweep over seeds) in one process compiles once."""
    step_config = dataclasses.replace(config, outer_steps=1, checkpoint_every=None, seed=0)
    try:
        return _cached_jit(inner_loss, outer_loss, step_config)
    except TypeError:  # an unhashable field (a loss that is a bound method of a list, ...)
        return jax.jit(_make_step(inner_loss, outer_loss, config))


def _strong(tree: PyTree) -> PyTree:
    """Arrays of canonical dtype and strong type: a weakly typed leaf (from a Python number)
    would change the step's signature after its first call."""
    def cast(x):
        dtype = jnp.result_type(x)
        if jnp.issubdtype(dtype, jax.dtypes.prng_key):
            return x
        return jax.lax.convert_element_type(jnp.asarray(x), dtype)
    return jax.tree_util.tree_map(cast, tree)


def _initial_state(params: PyTree, hparams: PyTree, config: TrainerConfig,
                   problem: InnerProblem) -> _State:
    params, hparams = _strong(params), _strong(hparams)
    transformation = _resolve_optimizer(config.inner_optimizer, hparams)
    return _strong(_State(step=jnp.zeros((), jnp.int32), params=params, hparams=hparams,
                          inner_opt_state=transformation.init(params),
                          outer_opt_state=config.outer_optimizer.init(hparams),
                          method_state=config.method.init_state(problem, params, hparams),
                          key=jax.random.key(config.seed)))


# --------------------------------------------------------------------------------------------
# Checkpoints (bilevel.checkpoint): the state's tree, checked against the initial state on load;
# the method's name and the history go in the metadata.

_WRITER = "bilevel.train"


def _save_checkpoint(directory: str, state: _State, history: list[dict],
                     config: TrainerConfig, data: _Data) -> None:
    checkpoint.save(os.path.join(directory, CHECKPOINT_NAME), state,
                    {"writer": _WRITER, "method": type(config.method).__name__,
                     "history": history, "data": data.describe()})


def _mismatch(path: str, message: str) -> ValueError:
    return ValueError(f"bilevel.train: the checkpoint {path} does not match this run: {message}. "
                      f"Use another checkpoint_dir, or delete the checkpoint to start afresh")


def _check_method(path: str, stored: Any, config: TrainerConfig) -> None:
    method = type(config.method).__name__
    if stored != method:
        raise _mismatch(path, f"it was written by method {stored}, this run uses {method}")


def _load_checkpoint(directory: str, initial: _State, config: TrainerConfig, data: _Data
                     ) -> tuple[_State, list[dict], dict] | None:
    """``(state, history, consumed)``, ``consumed`` the batches each host stream had used."""
    path = os.path.join(directory, CHECKPOINT_NAME)
    if not os.path.exists(path):
        return None
    try:
        metadata = checkpoint.read_metadata(path)
        if metadata.get("writer") != _WRITER:
            raise checkpoint.CheckpointError(path, f"it was written by "
                                                   f"{metadata.get('writer')!r}")
        _check_method(path, metadata.get("method"), config)
        consumed = _check_data(path, metadata.get("data"), data)
        state, metadata = checkpoint.load(path, like=initial)
        return state, metadata["history"], consumed
    except checkpoint.NoHeaderError:
        return (*_load_format_1(path, initial, config), _check_data(path, None, data))
    except checkpoint.MismatchError as error:
        raise _mismatch(path, _leaf_differs(error)) from None
    except checkpoint.CheckpointError as error:
        raise ValueError(f"bilevel.train: {path} is not a checkpoint of bilevel.train "
                         f"({error.reason}). Use another checkpoint_dir, or delete it to start "
                         f"afresh") from None


def _data_phrase(description: Mapping) -> str:
    kind = description.get("kind")
    if kind == "Minibatches":
        return (f"Minibatches(batch_size={description.get('batch_size')}, "
                f"replace={description.get('replace')}) of {description.get('samples')} samples")
    return {"arrays": "a tuple of arrays", "iterator": "an iterator of batches"}.get(
        kind, repr(kind))


def _check_data(path: str, stored: Any, data: _Data) -> dict[str, int]:
    """Refuse a checkpoint whose data were of another kind (a resumed run would not continue
    the same stream); return the batches each host stream had consumed."""
    stored = stored if isinstance(stored, Mapping) else {}  # before streams: arrays
    consumed = {}
    for name, this in data.describe().items():
        then = stored.get(name, {"kind": "arrays"})
        then = then if isinstance(then, Mapping) else {"kind": None}
        if {k: v for k, v in then.items() if k != "consumed"} != {
                k: v for k, v in this.items() if k != "consumed"}:
            raise _mismatch(path, f"its {name} were {_data_phrase(then)}, this run's are "
                                  f"{_data_phrase(this)}")
        if this["kind"] == "iterator":
            count = then.get("consumed")
            if not _is_int(count) or count < 0:
                raise _mismatch(path, f"it records no count of the {name} batches consumed")
            consumed[name] = int(count)
    return consumed


def _leaf_differs(error: checkpoint.MismatchError) -> str:
    if error.where == "the root":
        return f"it holds {error.found}, this run {error.expected}"
    return f"leaf {error.where} is {error.found} in the checkpoint, {error.expected} in this run"


def _load_format_1(path: str, initial: _State, config: TrainerConfig
                   ) -> tuple[_State, list[dict]]:
    """bilevel 0.1.0's checkpoint (the state's leaves, a JSON ``meta`` with ``format: 1`` and
    the method, and the history): it holds no pickle, so it still resumes."""
    try:
        meta = json.loads(checkpoint.load_legacy(path)[1]["meta"])
    except (checkpoint.CheckpointError, KeyError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != 1:
        raise ValueError(f"bilevel.train: {path} is not a checkpoint of bilevel.train (an .npz "
                         f"without its header). Use another checkpoint_dir, or delete it to "
                         f"start afresh")
    _check_method(path, meta.get("method"), config)
    try:
        state, extras = checkpoint.load_legacy(path, like=initial)
    except checkpoint.MismatchError as error:
        raise _mismatch(path, _leaf_differs(error)) from None
    return state, json.loads(extras.get("history", "[]"))


# --------------------------------------------------------------------------------------------
# The host-side loop.


def _to_python(value: Any) -> Any:
    value = np.asarray(value)
    if value.dtype == np.bool_:
        return bool(value)
    if np.issubdtype(value.dtype, np.integer):
        return int(value)
    return float(value)


def _call_metrics(metrics: Callable, params: PyTree, hparams: PyTree) -> dict[str, float]:
    values = metrics(params, hparams)
    if not isinstance(values, Mapping):
        raise TypeError(f"bilevel.train: metrics must return a dict of name -> number, got "
                        f"{type(values).__name__}")
    clash = sorted(set(values) & set(_BASE_KEYS))
    if clash:
        raise ValueError(f"bilevel.train: metrics returned {clash}, names the history already "
                         f"uses; rename them")
    return {str(name): float(value) for name, value in values.items()}


def _progress_bar(enabled: bool, total: int, completed: int):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(file=sys.stderr)
    show = enabled and (console.is_terminal or console.is_jupyter)
    bar = Progress(TextColumn("bilevel.train"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("outer loss {task.fields[loss]}"), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=console, disable=not show, transient=False)
    task = bar.add_task("train", total=total, completed=completed, loss="-")
    return bar, task


# --------------------------------------------------------------------------------------------
# The losses' data: arrays, Minibatches drawn in the step, or batches read on the host.

#: Folded into the seed's key to key the streams' draws (apart from the state's key, which is
#: split at every step: its first split equals fold_in(key, 0) and fold_in(key, 1)).
_STREAM_TAG = 0x5354524D


def _stream_key(seed: int, side: int) -> jax.Array:
    """The key of the ``side``-th loss's (0 inner, 1 outer) :class:`Minibatches` draws."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _STREAM_TAG), side)


def _source(where: str, name: str, data: Any, draws: int) -> Any:
    """``data`` as a tuple of arrays, a :class:`Minibatches` or a :class:`HostStream`."""
    if isinstance(data, Minibatches):
        return data
    if isinstance(data, tuple | list):
        return tuple(data)
    if isinstance(data, Iterator) or callable(data):
        return HostStream(where, name, data, draws)
    raise TypeError(f"{where}: {name} must be a tuple of arrays, a bilevel.Minibatches, an "
                    f"iterator of batches or a zero-argument function returning one, got "
                    f"{type(data).__name__}")


def _describe(source: Any) -> dict:
    return {"kind": "arrays"} if isinstance(source, tuple) else source.describe()


class _Data:
    """The two losses' data as :func:`train` got them, and what the jitted step receives."""

    def __init__(self, inner: Any, outer: Any, seed: int):
        self.sources = {"inner_args": inner, "outer_args": outer}
        self.keys = {name: _stream_key(seed, side)
                     for side, name in enumerate(self.sources)}
        self.as_arrays: set[str] = set()  # Minibatches whose arrays a method samples itself
        self.sampled: dict[str, SampledFeed] = {}

    def describe(self) -> dict:
        return {name: _describe(source) for name, source in self.sources.items()}

    def fit_method(self, where: str, config: TrainerConfig) -> TrainerConfig:
        """For a method that draws its own batches: the stream's batch size on the method."""
        method = config.method
        if not method.draws_own_batches:
            return config
        sizes = {}
        for name, source in self.sources.items():
            owner, side = type(method).__name__, name.removesuffix("_args")
            if isinstance(source, HostStream):
                raise TypeError(f"{where}: {name} is an iterator of batches, but {owner} draws "
                                f"its own minibatches from per-sample arrays; pass "
                                f"bilevel.Minibatches(arrays, batch_size) or the arrays")
            if not isinstance(source, Minibatches):
                continue
            if source.replace:
                raise ValueError(f"{where}: {name} is Minibatches(replace=True), but {owner} "
                                 f"draws its own minibatches, without replacement; use "
                                 f"replace=False")
            own = getattr(method, f"{side}_batch_size")
            if own is not None and own != source.batch_size:
                raise ValueError(f"{where}: {name} is Minibatches(batch_size="
                                 f"{source.batch_size}), but the method {owner} has "
                                 f"{side}_batch_size={own}; set the batch size in one place")
            sizes[f"{side}_batch_size"] = source.batch_size
            self.as_arrays.add(name)
        if not sizes:
            return config
        return dataclasses.replace(config, method=dataclasses.replace(method, **sizes))

    def _seen(self, name: str) -> Any:
        source = self.sources[name]
        return source.arrays if name in self.as_arrays else source

    def examples(self) -> tuple[tuple, tuple]:
        """A batch of each side, shaped as the step's (for the checks and ``init_state``)."""
        def example(source):
            if isinstance(source, tuple):
                return source
            return source.first_batch() if isinstance(source, Minibatches) else source.first
        return tuple(example(self._seen(name)) for name in self.sources)

    def skip(self, consumed: Mapping[str, int], step: int) -> None:
        for name, count in consumed.items():
            self.sources[name].skip(count, step)

    def feeds(self) -> tuple[Any, Any]:
        """The step's data arguments for its next call (host streams read their batches)."""
        def feed(name):
            source = self._seen(name)
            if isinstance(source, Minibatches):
                if name not in self.sampled:  # on the device once, not at every step
                    self.sampled[name] = SampledFeed(jax.device_put(source), self.keys[name])
                return self.sampled[name]
            return source.pull() if isinstance(source, HostStream) else source
        return tuple(feed(name) for name in self.sources)


def train(inner_loss: Callable, outer_loss: Callable, params: PyTree, hparams: PyTree,
          config: TrainerConfig, inner_args: Any = (), outer_args: Any = (), *,
          checkpoint_dir: str | os.PathLike | None = None,
          metrics: Callable[[PyTree, PyTree], Mapping[str, float]] | None = None,
          progress: bool = True) -> TrainResult:
    """Bilevel training: ``config.outer_steps`` outer steps of inner steps + hypergradient step.

    Each outer step is one jitted function, compiled ahead of time before the first step (so it
    cannot silently recompile later) and shared by later calls with the same losses and
    step-relevant config; data go in as arguments, not constants, so new data of the same shapes
    reuse it. See the module docstring for the update and the handling of non-finite steps.

    Data (``inner_args`` and ``outer_args`` each, independently; :mod:`bilevel.streams`):

    * a tuple of arrays: the whole data at every step (the default);
    * a :class:`bilevel.Minibatches`: batches drawn inside the jitted step. Its key is
      ``fold_in(fold_in(key(seed), 0x5354524D), 0)`` for ``inner_args`` (1 for ``outer_args``),
      ``seed`` being ``config.seed``; outer step k (0-based) uses inner draws ``k·(T+1) + t``,
      ``t = 0..T`` with ``T = config.inner_steps``: draw ``k·(T+1) + t`` for plain inner step t,
      the last for the method (``problem.inner_args``), and outer draw k;
    * an iterator of batches (tuples like ``inner_args``, every one with the first's shapes and
      dtypes), or a zero-argument function returning one: read on the host in that order
      (``T + 1`` inner batches and 1 outer batch per outer step). The checkpoint records how
      many batches were consumed; a resumed run calls the function once and skips them, so the
      function must give the same sequence each call. A bare iterator cannot be rewound:
      resuming from a checkpoint past step 0 with one is refused.

    The unrolled and ES methods reuse their one inner batch at each of their own unrolled steps.
    A method that draws its own minibatches (:mod:`bilevel.stochastic`) takes the arrays and the
    batch size of a :class:`bilevel.Minibatches` (its own ``*_batch_size`` must then be ``None``
    or the same) and draws as it does from arrays; it refuses an iterator and
    ``replace=True``.

    Args:
      inner_loss: ``inner_loss(params, hparams, *inner_args) -> scalar``.
      outer_loss: ``outer_loss(params, hparams, *outer_args) -> scalar``.
      params: initial inner parameters θ₀.
      hparams: initial hyperparameters λ₀, a pytree of floating arrays.
      config: a :class:`TrainerConfig`.
      inner_args, outer_args: the losses' data (see above).
      checkpoint_dir: where to write ``checkpoint.npz`` (every ``config.checkpoint_every`` outer
        steps and at the end). If it already holds one, training resumes from it; its state must
        have the structure, shapes and dtypes of this run's and its data the same kind (else
        ``ValueError``), and the run then ends exactly as an uninterrupted one would have.
      metrics: optional ``metrics(params, hparams) -> dict[str, float]`` called on the host after
        each outer step (e.g. validation accuracy); its entries join the history row.
      progress: show a ``rich`` progress bar with the outer loss (only on a terminal/notebook).

    Returns:
      a :class:`TrainResult` with the final params, hparams and the per-step history.

    Raises:
      ValueError: the checkpoint does not match, or was written further than ``outer_steps``;
        an iterator ran out, or yielded a batch unlike its first.
    """
    where = "bilevel.train"
    if not isinstance(config, TrainerConfig):
        raise TypeError(f"{where}: config must be a bilevel.TrainerConfig, got "
                        f"{type(config).__name__}")
    data = _Data(_source(where, "inner_args", inner_args, config.inner_steps + 1),
                 _source(where, "outer_args", outer_args, 1), config.seed)
    config = data.fit_method(where, config)
    inner_example, outer_example = data.examples()
    _common.check_losses(where, inner_loss, outer_loss, params, hparams, inner_example,
                         outer_example)
    state = _initial_state(params, hparams, config,
                           InnerProblem(inner_loss, outer_loss, config.inner_optimizer,
                                        inner_example, outer_example))
    history: list[dict] = []
    consumed: dict[str, int] = {}
    if checkpoint_dir is not None:
        checkpoint_dir = os.fspath(checkpoint_dir)
        os.makedirs(checkpoint_dir, exist_ok=True)
        loaded = _load_checkpoint(checkpoint_dir, state, config, data)
        if loaded is not None:
            state, history, consumed = loaded
    start = int(state.step)
    if start > config.outer_steps:
        raise ValueError(f"bilevel.train: the checkpoint in {checkpoint_dir} is at outer step "
                         f"{start}, past outer_steps={config.outer_steps}")
    compile_time = 0.0
    if start < config.outer_steps:
        data.skip(consumed, start)
        feeds = data.feeds()
        begin = time.perf_counter()
        step = _jitted_step(inner_loss, outer_loss, config).lower(state, *feeds).compile()
        compile_time = time.perf_counter() - begin
        state, history = _run(step, state, history, data, feeds, config, checkpoint_dir,
                              metrics, progress)
    if checkpoint_dir is not None and start < config.outer_steps and not _saved_at_end(config):
        _save_checkpoint(checkpoint_dir, state, history, config, data)
    result = TrainResult(state.params, state.hparams, history, resumed_from=start,
                         compile_time=compile_time)
    if result.skipped_steps and start < config.outer_steps:
        warnings.warn(f"bilevel.train: {result.skipped_steps} of {len(history)} outer steps had "
                      f"a non-finite hypergradient and were skipped (see history['skipped'])",
                      RuntimeWarning, stacklevel=2)
    return result


def _saved_at_end(config: TrainerConfig) -> bool:
    every = config.checkpoint_every
    return every is not None and config.outer_steps % every == 0


def _run(step, state, history, data, feeds, config, checkpoint_dir, metrics, progress):
    """The outer steps from ``state.step`` on; ``feeds`` are the first one's data arguments."""
    history = list(history)
    bar, task = _progress_bar(progress, config.outer_steps, int(state.step))
    with bar:
        for k in range(int(state.step), config.outer_steps):
            begin = time.perf_counter()
            state, stats = step(state, *feeds)
            stats = jax.device_get(stats)  # waits for the step
            row = {"step": k + 1, **{name: _to_python(v) for name, v in stats.items()},
                   "wall_time": time.perf_counter() - begin}
            if metrics is not None:
                row.update(_call_metrics(metrics, state.params, state.hparams))
            history.append(row)
            bar.update(task, advance=1, loss=f"{row['outer_loss']:.4e}")
            every = config.checkpoint_every
            if checkpoint_dir is not None and every is not None and (k + 1) % every == 0:
                _save_checkpoint(checkpoint_dir, state, history, config, data)
            if k + 1 < config.outer_steps:
                feeds = data.feeds()  # after the checkpoint, which counts consumed batches
    return state, history


def train_problem(problem: Any, config: TrainerConfig, *,
                  checkpoint_dir: str | os.PathLike | None = None,
                  metrics: Callable[[PyTree, PyTree], Mapping[str, float]] | None = None,
                  progress: bool = True) -> TrainResult:
    """:func:`train` on a :class:`bilevel.problems.BilevelProblem` (or any object with
    ``inner_loss``, ``outer_loss``, ``params``, ``hparams``, ``inner_args``, ``outer_args``)."""
    missing = [name for name in ("inner_loss", "outer_loss", "params", "hparams", "inner_args",
                                 "outer_args") if not hasattr(problem, name)]
    if missing:
        raise TypeError(f"bilevel.train_problem: problem must have inner_loss, outer_loss, "
                        f"params, hparams, inner_args and outer_args; "
                        f"{type(problem).__name__} lacks {missing}")
    return train(problem.inner_loss, problem.outer_loss, problem.params, problem.hparams, config,
                 problem.inner_args, problem.outer_args, checkpoint_dir=checkpoint_dir,
                 metrics=metrics, progress=progress)
