"""FixMatch with per-image weights on the unlabelled loss, and the confidence network trained by
implicit meta-gradients.

The loss (Sohn et al. 2020, eq. 4, with weights)::

    L = CE(labelled) + λ_u · (1/μB) Σ_i w_i · 1[max p_weak,i ≥ τ] · CE(argmax p_weak,i, p_strong,i)

Pseudo-labels are hard and stop-gradient. The weights ``w`` come from the method:

=============  ==================================================================================
supervised     no unlabelled loss
fixmatch       ``w = 1``
oracle         ``w = 1[ID]`` (the upper bound: OOD images removed)
softmax        ``w ∝ max p_weak`` (confidence weighting)
l2rw           ``w ∝ max(0, ∇_θ ℓ_i · ∇_θ L_val)``: one-step look-ahead (Ren et al. 2018, L2RW;
               Guo et al. 2020, DS3L), recomputed on every batch
confnet        ``w ∝ 2·sigmoid(z_i − z̄)``, ``z = c_φ(x_weak[, p_weak])``: a small CNN (optionally
               also reading the classifier's weak-view probabilities) trained every K steps by
               the implicit hypergradient of the meta loss (:func:`bilevel.hypergrad`)
=============  ==================================================================================

Every weighting is normalised to mean 1 over the images that pass the confidence mask, so the
total unlabelled weight is FixMatch's and a method only moves it between images; with weights 1
(the confidence network at initialisation) the loss is exactly FixMatch's.

The confidence network's logits are centred over the masked batch before the sigmoid
(:func:`confidence_weights`). The normalisation makes the loss blind to a common scale of the
weights; without the centring, that flat direction is where an adaptive meta-optimiser walks on
noise until the sigmoid saturates and the meta-gradient vanishes (measured: every weight at the
bound 2 after 200 meta-steps). Centred, a common shift of the logits changes nothing and gets
an exactly zero gradient.

The meta loss (``meta_data``) is the cross-entropy on a held-out labelled validation set, or,
as in DS3L (Guo et al. 2020), on the labelled training set itself, which spends no labels on the
meta-objective.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel
import hvp
from semisup import augment, models
from semisup.protocol import Split

METHODS = ("supervised", "fixmatch", "oracle", "softmax", "l2rw", "confnet")
#: Methods whose weights are computed from the validation set; the others should train on it
#: (:func:`semisup.protocol.merge_validation`) so that label budgets are equal.
USES_VALIDATION = ("l2rw", "confnet")
#: SOLVERS, the solvers a meta-step can use, is read from hvp.SOLVERS: see make_solver below.
CURVATURES = ("last", "all")
CONF_INPUTS = ("image", "image+softmax")
META_OPTIMIZERS = ("adam", "sgd")
META_DATA = ("validation", "labelled")


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyperparameters of one training run (defaults: the FixMatch paper's, where it has them).

    Fields:
      method: one of :data:`METHODS`.
      steps: inner (classifier) steps; a multiple of ``meta_every``.
      batch_size, mu: B labelled and μB unlabelled images per step.
      lambda_u, threshold: λ_u and the confidence threshold τ.
      lr, momentum, weight_decay: SGD with Nesterov momentum, lr · cos(7πk / 16K).
      ema: decay of the weight average used for evaluation.
      flip: flip images in the augmentations (off for digits).
      widths, hidden: the classifier (see :class:`semisup.models.Body`); ``widths=()`` is an MLP
        with one hidden layer.
      solver, solver_iters: the inverse-HVP approximation of the meta-gradient (a name in
        :data:`SOLVERS`) and its iterations (Neumann terms, CG iterations, Nyström rank; see
        :func:`make_solver`).
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
      meta_data: the meta loss's data for ``l2rw`` and ``confnet``: ``"validation"`` (the
        held-out set) or ``"labelled"`` (the labelled training set, DS3L-style).
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
    solver_iters: int = 10
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
                raise ValueError(f"{where}: {name} must be one of {allowed}, got "
                                 f"{getattr(self, name)!r}")
        for name in ("steps", "batch_size", "mu", "hidden", "solver_iters", "meta_every"):
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
    def uses_validation(self) -> bool:
        """Whether the run reads the held-out validation set (else it should train on it:
        :func:`semisup.protocol.merge_validation`, so that label budgets are equal)."""
        return self.method in USES_VALIDATION and self.meta_data == "validation"

    @property
    def periods(self) -> int:
        """Training is run in periods of ``meta_every`` inner steps (plus a meta-step)."""
        return self.steps // self.meta_every


class State(NamedTuple):
    """Everything a run carries between steps (arrays only, so it checkpoints and vmaps).

    ``score_sum``/``weight_sum``/``mask_sum``/``seen`` accumulate, per unlabelled image, the
    method's raw score (before normalisation and mask), the weight it actually received
    (normalised and masked), how often it passed the mask and how often it was drawn.
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


# --------------------------------------------------------------------------------------------
# Losses.


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


def _sum_squares(tree) -> jax.Array:
    return sum(jnp.sum(leaf ** 2) for leaf in jax.tree_util.tree_leaves(tree))


# --------------------------------------------------------------------------------------------
# Initialisation.


def _raw_key(key: jax.Array) -> jax.Array:
    """The uint32 data of ``key`` (typed or raw), the form the state stores and checkpoints."""
    return jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key


def _optimizer(config: Config) -> optax.GradientTransformation:
    def schedule(step):
        return config.lr * jnp.cos(7.0 * jnp.pi * step / (16.0 * config.steps))

    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(schedule, momentum=config.momentum, nesterov=True))


def _meta_optimizer(config: Config) -> optax.GradientTransformation:
    """The confidence network's optimizer (``meta_optimizer``, ``meta_lr``,
    ``meta_weight_decay``)."""
    if config.meta_optimizer == "sgd":
        return optax.chain(optax.add_decayed_weights(config.meta_weight_decay),
                           optax.sgd(config.meta_lr))
    if config.meta_weight_decay:
        return optax.adamw(config.meta_lr, weight_decay=config.meta_weight_decay)
    return optax.adam(config.meta_lr)


def init(config: Config, key: jax.Array, data: Split) -> State:
    """The initial :class:`State` for ``data`` (shapes only are read from it)."""
    key_model, key_conf, key_run = jax.random.split(key, 3)
    image_shape = tuple(data.x_labelled.shape[-3:])
    try:
        num_classes = int(np.max(np.asarray(data.y_labelled))) + 1
    except jax.errors.TracerArrayConversionError:
        raise TypeError("semisup.init: data.y_labelled must be concrete (the class count is "
                        "read from it); call init outside jit/vmap or vmap over the key only"
                        ) from None
    params = models.init_classifier(key_model, image_shape, num_classes, config.widths,
                                    config.hidden)
    conf = models.init_confidence(key_conf, image_shape, config.conf_widths,
                                  num_classes if config.conf_inputs == "image+softmax" else None)
    n = data.x_unlabelled.shape[-4]
    zeros = jnp.zeros((n,), jnp.float32)
    return State(jnp.zeros((), jnp.int32), params, _optimizer(config).init(params), params,
                 conf, _meta_optimizer(config).init(conf), _raw_key(key_run),
                 zeros, zeros, zeros, zeros, jnp.zeros((), jnp.int32),
                 jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


# --------------------------------------------------------------------------------------------
# One inner step.


def _logits(config, params, images):
    return models.logits(params, images, config.widths, config.hidden)


def _sample(config: Config, key, data: Split):
    """A weakly augmented labelled batch and a weak/strong view of an unlabelled batch."""
    k_l, k_u, k_wl, k_wu, k_s = jax.random.split(key, 5)
    labelled = jax.random.randint(k_l, (config.batch_size,), 0, data.x_labelled.shape[0])
    unlabelled = jax.random.randint(k_u, (config.mu * config.batch_size,), 0,
                                    data.x_unlabelled.shape[0])
    x_l = augment.weak_augment(k_wl, data.x_labelled[labelled], config.flip)
    x_u = data.x_unlabelled[unlabelled]
    weak = augment.weak_augment(k_wu, x_u, config.flip)
    strong = augment.strong_augment(k_s, x_u, flip_images=config.flip)
    return x_l, data.y_labelled[labelled], unlabelled, weak, strong


def validation_loss(config: Config, params, x_val, y_val) -> jax.Array:
    """Mean cross-entropy of the classifier on the validation set (the outer loss)."""
    return jnp.mean(cross_entropy(_logits(config, params, x_val), y_val))


def meta_set(config: Config, data: Split) -> tuple[jax.Array, jax.Array]:
    """The images and labels of the meta loss (see ``Config.meta_data``)."""
    if config.meta_data == "labelled":
        return data.x_labelled, data.y_labelled
    return data.x_validation, data.y_validation


def _conf_probs(config: Config, weak_logits):
    """The class-probability input of the confidence network, or None."""
    if config.conf_inputs == "image+softmax":
        return jax.nn.softmax(jax.lax.stop_gradient(weak_logits))
    return None


def _raw_scores(config: Config, state: State, data: Split, index, weak, strong, weak_logits,
                pseudo, mask):
    """The method's per-image score (before mask and normalisation; a logit for confnet)."""
    method = config.method
    if method == "fixmatch":
        return jnp.ones_like(mask)
    if method == "oracle":
        return 1.0 - data.unlabelled_ood[index].astype(mask.dtype)
    if method == "softmax":
        return jnp.max(jax.nn.softmax(weak_logits), axis=-1)
    if method == "confnet":
        return models.confidence(state.conf_params, weak, config.conf_widths,
                                 _conf_probs(config, weak_logits))
    # l2rw: the derivative of the meta loss after one step of size 1 on Σ ε_i ℓ_i is
    # −∇ℓ_i · ∇L_val; one JVP of the per-image losses along ∇L_val gives all of them.
    val_grad = jax.grad(functools.partial(validation_loss, config))(
        state.params, *meta_set(config, data))

    def per_image(params):
        return mask * cross_entropy(_logits(config, params, strong), pseudo)

    _, alignment = jax.jvp(per_image, (state.params,), (val_grad,))
    return jnp.maximum(alignment, 0.0)


def _accumulate(total, index, values):
    return total.at[index].add(values.astype(total.dtype))


def _batch_loss(config: Config, params, x_l, y_l, strong, pseudo, mask, weights):
    """FixMatch's weighted loss of the classifier on one batch (labelled and strong views in
    one forward pass)."""
    out = _logits(config, params, jnp.concatenate([x_l, strong]))
    return fixmatch_loss(out[:len(x_l)], y_l, out[len(x_l):], pseudo, mask, weights,
                         config.lambda_u)[0]


def _inner_step(config: Config, state: State, data: Split) -> tuple[State, jax.Array]:
    key, k_batch = jax.random.split(jax.random.wrap_key_data(state.key))
    x_l, y_l, index, weak, strong = _sample(config, k_batch, data)
    params = state.params
    if config.method == "supervised":
        def loss_fn(p):
            return jnp.mean(cross_entropy(_logits(config, p, x_l), y_l))
        scores = mask = weights = jnp.zeros(index.shape, jnp.float32)
    else:
        weak_logits = jax.lax.stop_gradient(_logits(config, params, weak))
        pseudo, mask = pseudo_labels(weak_logits, config.threshold)
        scores = jax.lax.stop_gradient(_raw_scores(config, state, data, index, weak, strong,
                                                   weak_logits, pseudo, mask))
        raw = confidence_weights(scores, mask) if config.method == "confnet" else scores
        weights = normalise(raw, mask)

        def loss_fn(p):
            return _batch_loss(config, p, x_l, y_l, strong, pseudo, mask, weights)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = _optimizer(config).update(grads, state.opt_state, params)
    params = optax.apply_updates(params, updates)
    ema = jax.tree_util.tree_map(lambda e, p: config.ema * e + (1 - config.ema) * p,
                                 state.ema_params, params)
    state = state._replace(
        step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
        key=jax.random.key_data(key), score_sum=_accumulate(state.score_sum, index, scores),
        weight_sum=_accumulate(state.weight_sum, index, weights * mask),
        mask_sum=_accumulate(state.mask_sum, index, mask),
        seen=_accumulate(state.seen, index, jnp.ones_like(mask)))
    return state, loss


# --------------------------------------------------------------------------------------------
# The meta-step of the confidence network.


#: The solver a meta-step never uses: the exact reference materialises the Hessian each time.
REFERENCE = "dense"
#: The relative residual the meta-step's iterative solvers stop at.
SOLVER_TOL = 1e-6
#: The settings of the solvers the committed results used, kept so that they reproduce:
#: name -> its options from ``(solver_iters, damping)``. Every other solver of :data:`SOLVERS` is
#: ``hvp.make_solver(name, solver_iters + 1, tol=SOLVER_TOL)``: the products of ``solver_iters``
#: CG iterations plus the residual check (its class's ``budget_rule`` says how).
SOLVER_SETTINGS: dict[str, Callable[[int, float], dict[str, Any]]] = {
    "identity": lambda iters, damping: {"tol": None},
    "neumann": lambda iters, damping: {"maxiter": iters, "tol": SOLVER_TOL},
    "cg": lambda iters, damping: {"maxiter": iters, "tol": SOLVER_TOL},
    "nystrom": lambda iters, damping: {"rank": iters, "rho": max(damping, 1e-3)},
}


def _probe_loss(params):
    return jnp.sum(params ** 2)


def usable_solver(name: str) -> bool:
    """Whether the solver ``name`` of :data:`hvp.SOLVERS` can make a meta-step: it is not the
    reference, it can be built from a budget, and its ``check_operator`` accepts the operator a
    meta-step hands it, the full-batch Hessian of :func:`bilevel.hypergrad`. That Hessian has no
    ``batch_argnums``: its labelled and unlabelled arguments have different batch sizes, so it
    cannot draw one minibatch of them. LiSSA, which needs one, is refused on that ground."""
    if name == REFERENCE or name not in hvp.SOLVERS:
        return False
    operator = hvp.hessian(_probe_loss, np.zeros(2, np.float32))  # abstract: nothing computed
    try:
        hvp.make_solver(name, 1).check_operator(operator)
    except (ValueError, TypeError):
        return False
    return True


class _SolverNames(Sequence):
    """The names of :data:`hvp.SOLVERS` that :func:`usable_solver` accepts, read from the registry
    at every use, so that a solver registered after this module was imported is among them."""

    def _names(self) -> tuple[str, ...]:
        return tuple(name for name in hvp.SOLVERS if usable_solver(name))

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and usable_solver(name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    __hash__ = None

    def __repr__(self) -> str:
        return repr(self._names())


#: The solvers a meta-step can use (``Config.solver``): the registered ones :func:`usable_solver`
#: accepts, in registration order; a live view of :data:`hvp.SOLVERS`.
SOLVERS = _SolverNames()


def make_solver(name: str, iters: int, damping: float = 0.0) -> hvp.AbstractSolver:
    """The inverse-HVP approximation ``name`` (of :data:`SOLVERS`) with ``iters`` iterations.

    The solvers of :data:`SOLVER_SETTINGS` get their settings from there (Neumann terms, CG
    iterations, Nyström rank ``iters`` with ``rho = max(damping, 1e-3)``); any other is
    ``hvp.make_solver(name, iters + 1, tol=SOLVER_TOL)``, the budget of ``iters`` CG iterations.
    """
    if name not in SOLVERS:
        raise ValueError(f"semisup.make_solver: unknown solver {name!r}; choose from "
                         f"{tuple(SOLVERS)}")
    if name in SOLVER_SETTINGS:
        return hvp.make_solver(name, **SOLVER_SETTINGS[name](iters, damping))
    has_tol = "tol" in {field.name for field in dataclasses.fields(hvp.SOLVERS[name])}
    return hvp.make_solver(name, iters + 1, **({"tol": SOLVER_TOL} if has_tol else {}))


def meta_losses(config: Config, weighting=None):
    """``(inner_loss, outer_loss, split)`` of the confidence network's bilevel problem.

    The inner loss is the weighted FixMatch loss (plus the weight decay the optimizer applies) as
    a function of the curvature parameters θ and the confidence network φ; the outer loss is the
    meta set's cross-entropy. With ``curvature="last"`` θ is the head, and the body's features of
    every batch are inputs (computed once, held fixed); with ``"all"`` θ is the whole classifier.
    ``split(params, batch) -> (θ, inner_args, outer_args)`` with ``batch = (x_l, y_l, weak,
    weak_probs, strong, pseudo, mask, x_meta, y_meta)``; ``weak_probs`` (the classifier's
    probabilities of the weak view, held fixed like the pseudo-labels) is read only with
    ``conf_inputs="image+softmax"``.

    ``weighting(φ, weak, weak_probs, mask) -> weights`` replaces the confidence network: with
    ``lambda w, *_: w`` the hyperparameters are the per-image weights themselves, and the
    hypergradient is each image's influence on the meta loss.
    """
    with_probs = config.conf_inputs == "image+softmax"

    def confnet(phi, weak, probs, mask):
        logits = models.confidence(phi, weak, config.conf_widths, probs if with_probs else None)
        return normalise(confidence_weights(logits, mask), mask)

    weighting = confnet if weighting is None else weighting

    def weighted(theta_logits, phi, y_l, weak, probs, pseudo, mask, lab_logits):
        weights = weighting(phi, weak, probs, mask)
        return fixmatch_loss(lab_logits, y_l, theta_logits, pseudo, mask, weights,
                             config.lambda_u)[0]

    if config.curvature == "last":
        def inner(theta, phi, f_l, y_l, weak, probs, f_s, pseudo, mask):
            loss = weighted(models.head(theta, f_s), phi, y_l, weak, probs, pseudo, mask,
                            models.head(theta, f_l))
            return loss + 0.5 * config.weight_decay * _sum_squares(theta)

        def outer(theta, phi, f_v, y_v):
            return jnp.mean(cross_entropy(models.head(theta, f_v), y_v))

        def split(params, batch):
            x_l, y_l, weak, probs, strong, pseudo, mask, x_v, y_v = batch
            feats = functools.partial(models.features, params["body"], widths=config.widths,
                                      hidden=config.hidden)
            return (params["head"], (feats(x_l), y_l, weak, probs, feats(strong), pseudo, mask),
                    (feats(x_v), y_v))
    else:
        def inner(theta, phi, x_l, y_l, weak, probs, strong, pseudo, mask):
            loss = weighted(_logits(config, theta, strong), phi, y_l, weak, probs, pseudo, mask,
                            _logits(config, theta, x_l))
            return loss + 0.5 * config.weight_decay * _sum_squares(theta)

        def outer(theta, phi, x_v, y_v):
            return validation_loss(config, theta, x_v, y_v)

        def split(params, batch):
            x_l, y_l, weak, probs, strong, pseudo, mask, x_v, y_v = batch
            return params, (x_l, y_l, weak, probs, strong, pseudo, mask), (x_v, y_v)
    return inner, outer, split


def meta_gradient(config: Config, params, conf_params, batch, key=None):
    """The implicit hypergradient of the meta loss with respect to the confidence network.

    ``batch = (x_l, y_l, weak, weak_probs, strong, pseudo, mask, x_meta, y_meta)`` (see
    :func:`meta_losses`). Returns ``(grad, info)`` from :func:`bilevel.hypergrad`.
    """
    inner, outer, split = meta_losses(config)
    theta, inner_args, outer_args = split(params, batch)
    return bilevel.hypergrad(inner, outer, theta, conf_params, inner_args, outer_args,
                             solver=make_solver(config.solver, config.solver_iters,
                                                config.damping),
                             damping=config.damping, key=key, on_failure="ignore",
                             stationarity_tol=None)


def _meta_step(config: Config, state: State, data: Split) -> State:
    key, k_batch, k_solve = jax.random.split(jax.random.wrap_key_data(state.key), 3)
    x_l, y_l, _, weak, strong = _sample(config, k_batch, data)
    weak_logits = jax.lax.stop_gradient(_logits(config, state.params, weak))
    pseudo, mask = pseudo_labels(weak_logits, config.threshold)
    batch = (x_l, y_l, weak, jax.nn.softmax(weak_logits), strong, pseudo, mask,
             *meta_set(config, data))
    grad, info = meta_gradient(config, state.params, state.conf_params, batch, k_solve)
    ok = info.finite
    grad = jax.tree_util.tree_map(lambda g: jnp.where(ok, g, 0.0), grad)
    updates, meta_opt_state = _meta_optimizer(config).update(grad, state.meta_opt_state,
                                                             state.conf_params)
    return state._replace(conf_params=optax.apply_updates(state.conf_params, updates),
                          meta_opt_state=meta_opt_state, key=jax.random.key_data(key),
                          hvp_count=state.hvp_count + info.hvp_count,
                          meta_steps=state.meta_steps + 1,
                          meta_failures=state.meta_failures + (~ok).astype(jnp.int32))


# --------------------------------------------------------------------------------------------
# The exact, unrolled influence of each unlabelled image on a loss after the whole run.


def _batch_keys(key: jax.Array, steps: int) -> jax.Array:
    """The batch keys (raw) of the next ``steps`` inner steps from the state key ``key``, drawn
    as :func:`_inner_step` draws them."""
    def split(key, _):
        key, k_batch = jax.random.split(key)
        return key, jax.random.key_data(k_batch)

    return jax.lax.scan(split, jax.random.wrap_key_data(key), None, length=steps)[1]


def _table_loss(config: Config, params, weights, x_l, y_l, index, weak, strong):
    """FixMatch's loss on one batch with image ``i``'s unlabelled term scaled by ``weights[i]``."""
    pseudo, mask = pseudo_labels(_logits(config, jax.lax.stop_gradient(params), weak),
                                 config.threshold)
    return _batch_loss(config, params, x_l, y_l, strong, pseudo, mask, weights[index])


def _eval_loss(config: Config, params, x_eval, y_eval):
    return jnp.mean(cross_entropy(_logits(config, params, x_eval), y_eval))


@functools.partial(jax.jit, static_argnames=("config", "steps", "truncate", "mode",
                                             "checkpoint_every"))
def _unrolled_scan(config, params, key, data, x_eval, y_eval, steps, truncate, mode,
                   checkpoint_every):
    # Every step's batch is drawn up front (memory: `steps` batches), so that the augmentations
    # stay out of the differentiated steps.
    batches = jax.vmap(lambda k: _sample(config, jax.random.wrap_key_data(k), data))(
        _batch_keys(key, steps))
    weights = jnp.ones((data.x_unlabelled.shape[0],), jnp.result_type(float))
    return bilevel.unrolled_hypergrad(
        functools.partial(_table_loss, config), lambda p, _, x, y: _eval_loss(config, p, x, y),
        params, weights, _optimizer(config), steps, outer_args=(x_eval, y_eval),
        per_step_args=batches, mode=mode, checkpoint_every=checkpoint_every, truncate=truncate)


def _table_step(config: Config, carry, weights, k_batch, data):
    """One optimizer step of :func:`_table_loss` on the batch of ``k_batch``, and its loss."""
    params, opt_state = carry
    batch = jax.lax.stop_gradient(_sample(config, jax.random.wrap_key_data(k_batch), data))
    loss, grads = jax.value_and_grad(_table_loss, argnums=1)(config, params, weights, *batch)
    updates, opt_state = _optimizer(config).update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss


@functools.partial(jax.jit, static_argnums=0)
def _table_step_vjp(config: Config, carry, weights, k_batch, data, cotangent):
    """The cotangents of ``(carry, weights)`` from the cotangent of the step's output carry."""
    _, vjp = jax.vjp(lambda c, w: _table_step(config, c, w, k_batch, data)[0], carry, weights)
    return vjp(cotangent)


_table_step_jit = jax.jit(_table_step, static_argnums=0)
_eval_value_and_grad = jax.jit(jax.value_and_grad(_eval_loss, argnums=1), static_argnums=0)


def _unrolled_python(config, params, key, data, x_eval, y_eval, steps, truncate):
    """:func:`_unrolled_scan` with plain reverse mode driven step by step from Python: every
    step's carry is stored (``steps`` copies of the parameters and optimizer state), then one
    jitted VJP per step runs backwards."""
    keys = _batch_keys(key, steps)
    weights = jnp.ones((data.x_unlabelled.shape[0],), jnp.result_type(float))
    carries, losses = [(params, _optimizer(config).init(params))], []
    for t in range(steps):
        carry, loss = _table_step_jit(config, carries[-1], weights, keys[t], data)
        carries.append(carry)
        losses.append(loss)
    final = carries[-1][0]
    value, params_ct = _eval_value_and_grad(config, final, x_eval, y_eval)
    cotangent = (params_ct, jax.tree_util.tree_map(
        lambda x: jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.inexact) else
        np.zeros(x.shape, jax.dtypes.float0), carries[-1][1]))
    grad = jnp.zeros_like(weights)
    for t in reversed(range(steps - (truncate or steps), steps)):
        cotangent, weights_ct = _table_step_vjp(config, carries[t], weights, keys[t], data,
                                                cotangent)
        grad = grad + weights_ct
    finite = jnp.all(jnp.isfinite(grad)) & jnp.isfinite(value)
    return grad, bilevel.UnrolledInfo(converged=finite, finite=finite, outer_loss=value,
                                      inner_losses=jnp.stack(losses), params=final,
                                      opt_state=carries[-1][1])


def unrolled_influence(config: Config, state: State, data: Split, x_eval, y_eval,
                       steps: int | None = None, truncate: int | None = None,
                       mode: str = "mixflow", checkpoint_every: int | str | None = "sqrt",
                       loop: str = "scan"):
    """The exact derivative of a loss after a whole FixMatch run with respect to each unlabelled
    image's weight.

    The run is FixMatch from ``state`` for ``steps`` inner steps (default ``config.steps``)
    with image ``i``'s unlabelled loss scaled by ``w_i``; at ``w = 1`` it is the run
    :func:`run_periods` makes with ``method="fixmatch"``, step for step (same batches,
    augmentations, pseudo-labels and learning-rate schedule). Returned is ``dL/dw`` at
    ``w = 1``, where ``L`` is the mean cross-entropy of ``(x_eval, y_eval)`` under the final
    (not the EMA) classifier, differentiated through every step (by
    :func:`bilevel.unrolled_hypergrad`, or see ``loop``). The pseudo-labels and the mask are
    piecewise constant in ``w`` and carry no derivative. ``−dL/dw_i > 0`` means that more weight
    on image ``i`` would have lowered ``L``; images never drawn or never masked get 0.

    Through a long run the derivative can explode: the product of the steps' Jacobians grows
    exponentially wherever training is locally unstable (a CNN over 2000 steps of
    SGD-Nesterov: ``|dL/dw|`` from 1e1 to overflow, by seed, against 1e-4 for an MLP).
    ``info.finite`` flags overflow; ``truncate`` gives the derivative through the last steps
    only, which stays finite.

    This is what the one-step (:data:`METHODS` ``l2rw``) and implicit (``confnet``) meta-gradients
    approximate. With ``(x_eval, y_eval)`` the test set it is the influence on the quantity
    the weighting is meant to improve.

    Args:
      config: the run's settings; ``method`` and the meta-step fields are not read.
      state: a state fresh from :func:`init` (the optimizer's schedule starts at step 0).
      data: the split (one run, not stacked).
      x_eval, y_eval: the images and integer labels of ``L``.
      steps: inner steps of the run.
      truncate: differentiate through the last ``truncate`` steps only.
      mode, checkpoint_every: as in :func:`bilevel.unrolled_hypergrad`. The batches of all
        ``steps`` are drawn before the run, so memory grows with ``steps × (1 + 2μ)B`` images
        besides what the mode stores.
      loop: ``"scan"`` (one jitted ``lax.scan``, through :func:`bilevel.unrolled_hypergrad`) or
        ``"python"`` (a jitted step and a jitted VJP per step, driven from Python, in plain
        reverse mode; ``mode`` and ``checkpoint_every`` are not read). XLA on the CPU runs
        convolutions inside a loop body tens of times slower than outside one (see the
        drivers below), so ``"python"`` is the one to use there for a CNN; it stores every
        step's parameters and optimizer state.

    Returns:
      ``(grad, info)``: ``grad`` of shape ``(num_unlabelled,)`` and a
      :class:`bilevel.UnrolledInfo` (``info.params`` is the final classifier).
    """
    where = "semisup.unrolled_influence"
    steps = config.steps if steps is None else steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"{where}: steps must be an integer >= 1, got {steps!r}")
    try:
        step = int(state.step)
    except jax.errors.ConcretizationTypeError:
        step = 0  # traced: the caller vouches for a fresh state
    if step != 0:
        raise ValueError(f"{where}: state must be fresh from semisup.init (step 0), got a state "
                         f"at step {step}; use truncate= to differentiate a later window")
    x_eval, y_eval = jnp.asarray(x_eval), jnp.asarray(y_eval)
    image_shape = tuple(data.x_unlabelled.shape[-3:])
    if x_eval.ndim != 4 or tuple(x_eval.shape[1:]) != image_shape:
        raise ValueError(f"{where}: x_eval must have shape (n, *{image_shape}), got "
                         f"{tuple(x_eval.shape)}")
    if y_eval.shape != x_eval.shape[:1] or not jnp.issubdtype(y_eval.dtype, jnp.integer):
        raise ValueError(f"{where}: y_eval must be integer labels of shape ({x_eval.shape[0]},), "
                         f"got {y_eval.dtype} {tuple(y_eval.shape)}")
    if loop not in ("scan", "python"):
        raise ValueError(f"{where}: loop must be 'scan' or 'python', got {loop!r}")
    if truncate is not None and (not isinstance(truncate, int) or isinstance(truncate, bool)
                                 or not 1 <= truncate <= steps):
        raise ValueError(f"{where}: truncate must be None or an integer in [1, steps={steps}], "
                         f"got {truncate!r}")
    data = jax.tree_util.tree_map(jnp.asarray, data)
    if loop == "python":
        return _unrolled_python(config, state.params, state.key, data, x_eval, y_eval, steps,
                                truncate)
    return _unrolled_scan(config, state.params, state.key, data, x_eval, y_eval, steps,
                          truncate, mode, checkpoint_every)


def period(config: Config, state: State, data: Split) -> tuple[State, jax.Array]:
    """One period: ``meta_every`` inner steps, then a meta-step for ``confnet``.

    Pure; returns the new state and the mean training loss of the inner steps.
    """
    return _period(_inner_step, _meta_step, config, state, data)


def _period(step, meta, config: Config, state: State, data: Split):
    """:func:`period` with the inner step and the meta-step given (jitted, vmapped, ...)."""
    losses = []
    for _ in range(config.meta_every):
        state, loss = step(config, state, data)
        losses.append(loss)
    if config.method == "confnet":
        state = meta(config, state, data)
    return state, jnp.mean(jnp.stack(losses), axis=0)


# The drivers below jit one inner step and one meta-step and loop in Python rather than jitting a
# ``lax.scan`` over steps: XLA on the CPU runs convolutions inside a loop body about 40× slower
# than outside one (measured here: 1.6 s against 38 ms for five SGD steps of the default CNN),
# and separate jits keep the compile time independent of ``meta_every``.
_step_jit = jax.jit(_inner_step, static_argnums=0)
_meta_jit = jax.jit(_meta_step, static_argnums=0)
_step_seeds = jax.jit(jax.vmap(_inner_step, in_axes=(None, 0, 0)), static_argnums=0)
_meta_seeds = jax.jit(jax.vmap(_meta_step, in_axes=(None, 0, 0)), static_argnums=0)


def _drive(step, meta, config, state, data, num_periods, callback):
    data = jax.tree_util.tree_map(jnp.asarray, data)
    losses = []
    for _ in range(num_periods):
        state, loss = _period(step, meta, config, state, data)
        losses.append(loss)
        if callback is not None:
            callback(state)
    return state, np.asarray(jnp.stack(losses)) if losses else np.zeros((0,), np.float32)


def run_periods(config: Config, state: State, data: Split, num_periods: int,
                callback=None) -> tuple[State, np.ndarray]:
    """Run ``num_periods`` periods (see :func:`period`) of one run, jitted step by step.

    Args:
      config, state, data: the run.
      num_periods: how many periods to run.
      callback: optional ``callback(state)`` after each period (progress bars, checkpoints).

    Returns:
      The new state and the mean training loss of each period.
    """
    return _drive(_step_jit, _meta_jit, config, state, data, num_periods, callback)


def init_seeds(config: Config, keys: list, data: Split) -> State:
    """Initial states of several runs, stacked along a leading seed axis (one per key).

    ``data`` is the stacked splits (:func:`semisup.protocol.stack_splits`)."""
    first = jax.tree_util.tree_map(lambda a: np.asarray(a)[0], data)
    states = [init(config, key, first) for key in keys]
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *states)


def run_seeds(config: Config, states: State, data: Split, num_periods: int, callback=None
              ) -> tuple[State, np.ndarray]:
    """:func:`run_periods` for stacked runs (every step ``vmap``-ed over the seed axis).

    Returns the new states and the losses ``(num_periods, seeds)``."""
    return _drive(_step_seeds, _meta_seeds, config, states, data, num_periods, callback)


def unstack(states: State, index: int) -> State:
    """The ``index``-th run of stacked states."""
    return jax.tree_util.tree_map(lambda a: a[index], states)


# --------------------------------------------------------------------------------------------
# Evaluation.


@functools.partial(jax.jit, static_argnums=(0,))
def predict(config: Config, params, images: jax.Array) -> jax.Array:
    """Class probabilities of ``images``."""
    return jax.nn.softmax(_logits(config, params, images))


@functools.partial(jax.jit, static_argnums=(0,))
def confidence_scores(config: Config, conf_params, images: jax.Array, params=None) -> jax.Array:
    """The confidence network's logits of ``images`` (no augmentation); ``params``, the
    classifier's, are needed with ``conf_inputs="image+softmax"``."""
    probs = None
    if config.conf_inputs == "image+softmax":
        if params is None:
            raise ValueError("semisup.confidence_scores: params (the classifier's) are needed "
                             "with conf_inputs='image+softmax'")
        probs = jax.nn.softmax(_logits(config, params, images))
    return models.confidence(conf_params, images, config.conf_widths, probs)


def accuracy(config: Config, params, images, labels, batch: int = 1024) -> float:
    """Classification accuracy, evaluated in batches (NaN for an empty set)."""
    if len(images) == 0:
        return float("nan")
    correct = 0
    for start in range(0, len(images), batch):
        probs = predict(config, params, jnp.asarray(images[start:start + batch]))
        correct += int(jnp.sum(jnp.argmax(probs, -1) == jnp.asarray(labels[start:start + batch])))
    return correct / len(images)

