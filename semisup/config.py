"""The settings of a run (:class:`Config`), what it carries between steps (:class:`State`), and
the two optimisers the settings define."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from semisup.options import CONF_INPUTS, CURVATURES, META_DATA, META_OPTIMIZERS
from semisup.solvers import SOLVERS
from semisup.weighting import METHODS, WEIGHTINGS, Weighting


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyperparameters of one training run (defaults: the FixMatch paper's, where it has them).

    Fields:
      method: a name in :data:`semisup.WEIGHTINGS` (how the unlabelled images are weighted).
      steps: inner (classifier) steps; a multiple of ``meta_every``.
      batch_size, mu: B labelled and μB unlabelled images per step.
      lambda_u, threshold: λ_u and the confidence threshold τ.
      lr, momentum, weight_decay: SGD with Nesterov momentum, lr · cos(7πk / 16K).
      ema: decay of the weight average used for evaluation.
      flip: flip images in the augmentations (off for digits).
      widths, hidden: the classifier (see :class:`semisup.models.Body`); ``widths=()`` is an MLP
        with one hidden layer.
      solver, maxiter: the inverse-HVP approximation of the meta-gradient (a name in
        :data:`semisup.SOLVERS`) and its iteration budget (Neumann terms, CG iterations, Nyström
        rank; see :func:`semisup.make_solver`). ``solver_iters=``, its old name, still works
        with a ``DeprecationWarning`` (and wins over ``maxiter``, so that
        ``dataclasses.replace(config, solver_iters=...)`` changes it).
      curvature: ``"last"`` (Hessian of the head, the body's features held fixed) or ``"all"``.
      damping: added to the Hessian in the solve.
      meta_every, meta_lr: a meta-step every K inner steps, with learning rate ``meta_lr``.
      meta_optimizer: ``"adam"`` or ``"sgd"`` for the confidence network. Adam normalises the
        small, noisy meta-gradient per parameter; SGD follows its mean at its own scale, so its
        ``meta_lr`` must suit that scale (digits MLP: 1 moved the logits by about 0.6 over 200
        meta-steps, 10 by about 7, and 100 diverged).
      meta_weight_decay: decoupled weight decay on the confidence network (AdamW's with Adam,
        ``φ ← φ − meta_lr · meta_weight_decay · φ`` with SGD). It pulls the logits towards 0, so
        the weights towards 1 (plain FixMatch), and bounds how far noise can spread them.
      conf_widths: the confidence network.
      conf_inputs: ``"image"`` (the weak view alone) or ``"image+softmax"`` (also the
        classifier's class probabilities of the weak view, stop-gradient).
      meta_data: the meta loss's data for the methods that read one (``l2rw``, ``confnet``):
        ``"validation"`` (the held-out set) or ``"labelled"`` (the labelled training set,
        DS3L-style).
    """

    method: str = "fixmatch"
    steps: int = 1000
    batch_size: int = 64
    mu: int = 7
    lambda_u: float = 1.0
    threshold: float = 0.95
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    ema: float = 0.999
    flip: bool = True
    widths: tuple[int, ...] = (16, 32)
    hidden: int = 64
    solver: str = "cg"
    maxiter: int = 10
    curvature: str = "last"
    damping: float = 0.0
    meta_every: int = 5
    meta_lr: float = 1e-3
    meta_optimizer: str = "adam"
    meta_weight_decay: float = 0.0
    conf_widths: tuple[int, ...] = (8, 16)
    conf_inputs: str = "image"
    meta_data: str = "validation"

    def __post_init__(self):
        where = "semisup.Config"
        for name, allowed in (("method", METHODS), ("solver", SOLVERS),
                              ("curvature", CURVATURES), ("conf_inputs", CONF_INPUTS),
                              ("meta_data", META_DATA), ("meta_optimizer", META_OPTIMIZERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{where}: {name} must be one of {tuple(allowed)}, got "
                                 f"{getattr(self, name)!r}")
        for name in ("steps", "batch_size", "mu", "hidden", "maxiter", "meta_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{where}: {name} must be an integer >= 1, got {value!r}")
        if self.steps % self.meta_every:
            raise ValueError(f"{where}: steps ({self.steps}) must be a multiple of meta_every "
                             f"({self.meta_every})")
        for name, low, high in (("threshold", 0.0, 1.0), ("ema", 0.0, 1.0),
                                ("momentum", 0.0, 1.0)):
            if not low <= getattr(self, name) < high or (name == "threshold" and
                                                         self.threshold == 0.0):
                raise ValueError(f"{where}: {name} must be in ({low}, {high}), got "
                                 f"{getattr(self, name)}")
        for name in ("lambda_u", "weight_decay", "damping", "meta_weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{where}: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "meta_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{where}: {name} must be > 0, got {getattr(self, name)}")
        if not self.conf_widths:
            raise ValueError(f"{where}: conf_widths must be non-empty")

    @property
    def weighting(self) -> Weighting:
        """The :class:`semisup.Weighting` of ``method``."""
        return WEIGHTINGS[self.method]()

    @property
    def uses_validation(self) -> bool:
        """Whether the run reads the held-out validation set (else it should train on it:
        :func:`semisup.protocol.merge_validation`, so that label budgets are equal)."""
        return self.weighting.uses_validation and self.meta_data == "validation"

    @property
    def periods(self) -> int:
        """Training is run in periods of ``meta_every`` inner steps (plus a meta-step)."""
        return self.steps // self.meta_every

    @property
    def solver_iters(self) -> int:
        """Deprecated: :attr:`maxiter`."""
        warnings.warn("semisup.Config.solver_iters is deprecated; use maxiter",
                      DeprecationWarning, stacklevel=2)
        return self.maxiter


def _accept_solver_iters(init):
    """``Config(solver_iters=n)``, the old name of ``maxiter``, with a DeprecationWarning."""

    @functools.wraps(init)
    def __init__(self, *args, solver_iters=None, **kwargs):
        if solver_iters is not None:
            warnings.warn("semisup.Config: solver_iters is deprecated; use maxiter",
                          DeprecationWarning, stacklevel=2)
            kwargs["maxiter"] = solver_iters
        init(self, *args, **kwargs)

    return __init__


Config.__init__ = _accept_solver_iters(Config.__init__)


class State(NamedTuple):
    """Everything a run carries between steps (arrays only, so it checkpoints and vmaps).

    ``conf_params`` and ``meta_opt_state`` are the weighting's trainable parameters (the
    confidence network's for ``confnet``) and their meta-optimiser's state; every method's
    state has them, so that all states share one layout. ``score_sum``/``weight_sum``/
    ``mask_sum``/``seen`` accumulate, per unlabelled image, the method's raw score (before
    normalisation and mask), the weight it actually received (normalised and masked), how often
    it passed the mask and how often it was drawn.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    conf_params: Any
    meta_opt_state: Any
    key: jax.Array
    score_sum: jax.Array
    weight_sum: jax.Array
    mask_sum: jax.Array
    seen: jax.Array
    hvp_count: jax.Array
    meta_steps: jax.Array
    meta_failures: jax.Array


def optimizer(config: Config) -> optax.GradientTransformation:
    """The classifier's optimiser: SGD-Nesterov on the loss plus weight decay, with the learning
    rate ``lr · cos(7πk / 16K)``."""
    def schedule(step):
        return config.lr * jnp.cos(7.0 * jnp.pi * step / (16.0 * config.steps))

    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(schedule, momentum=config.momentum, nesterov=True))


def meta_optimizer(config: Config) -> optax.GradientTransformation:
    """The weighting's meta-optimiser (``meta_optimizer``, ``meta_lr``,
    ``meta_weight_decay``)."""
    if config.meta_optimizer == "sgd":
        return optax.chain(optax.add_decayed_weights(config.meta_weight_decay),
                           optax.sgd(config.meta_lr))
    if config.meta_weight_decay:
        return optax.adamw(config.meta_lr, weight_decay=config.meta_weight_decay)
    return optax.adam(config.meta_lr)
