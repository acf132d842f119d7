"""Canonical bilevel problems with known answers, for tests, the CLI and experiments.

Every constructor returns a :class:`BilevelProblem`: an inner and an outer loss, the data they
take as arguments, a starting point, an accurate jittable inner solver and, where one exists, the
hypergradient ``d outer(θ*(λ), λ) / dλ`` in closed form.

* ``ridge``: λ = log L2 strength (scalar, or per feature); inner ½ mean (Xθ − y)² + ½ Σ e^λ θ²;
  outer validation MSE; θ* by a linear solve; exact hypergradient.
* ``logistic_l2``: λ = per-feature log L2 strengths; inner logistic loss + ½ Σ e^λᵢ θᵢ²; outer
  validation logistic loss; θ* by damped Newton; no closed form.
* ``imaml``: λ = the meta-initialisation φ; inner Σ_tasks support MSE + prox/2 ‖θ_t − φ‖²; outer
  mean query MSE; θ* by linear solves; exact hypergradient.
* ``reweighting``: λ = per-example logits h, weights σ(h), some training labels flipped; inner
  weighted least squares (or logistic) + ridge; outer clean validation loss; exact hypergradient
  for least squares.
* ``digits_mlp``: λ = log weight decay per layer (a dict); inner cross-entropy of a tanh MLP on
  scikit-learn's digits + decay; outer validation cross-entropy; θ* by L-BFGS; no closed form.

Data are always passed to the losses as ``inner_args`` / ``outer_args``, never closed over:
arrays closed over by a jitted function become constants that XLA may constant-fold for seconds.
Data are made in float64 NumPy from a generator seeded by the key's bits (same key, same data)
and then cast, so the float32 and float64 versions of a problem hold the same numbers up to
rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

PyTree = Any

#: Step sizes 1, 1/2, ..., 2^-(n-1) tried at once by the Newton line search.
_BACKTRACKS = 20
_ARMIJO = 1e-4


@dataclasses.dataclass(frozen=True, eq=False)  # arrays have no truth value: compare by identity
class BilevelProblem:
    """A bilevel problem ``min_λ outer(θ*(λ), λ)`` with ``θ*(λ) = argmin_θ inner(θ, λ)``.

    Attributes:
      name: the registry name (a key of :data:`PROBLEMS`).
      inner_loss: ``inner_loss(params, hparams, *inner_args) -> scalar``.
      outer_loss: ``outer_loss(params, hparams, *outer_args) -> scalar``.
      params: initial inner parameters, a starting point for inner solvers.
      hparams: initial hyperparameters, a floating pytree.
      inner_args: the inner loss's data.
      outer_args: the outer loss's data.
      solve_inner: ``solve_inner(params_init, hparams, *inner_args) -> params``, an accurate,
        jitted inner minimiser built from ``lax`` loops (so it also runs under ``vmap``).
      exact_hypergrad: ``exact_hypergrad(hparams) -> d outer(θ*(λ), λ)/dλ`` in closed form (a
        pytree like ``hparams``), or None where there is no closed form.
      batch_argnums: positions in ``(hparams, *inner_args)`` of the arguments whose leading
        axis runs over training examples (the inner loss is a mean over that axis), in the
        convention of ``hvp.hessian(inner_loss, params, hparams, *inner_args,
        batch_argnums=...)``: a stochastic solver such as ``hvp.LiSSA`` draws minibatches
        along it. Empty where the inner loss is not a mean over examples (e.g. iMAML's sum
        over tasks, each with its own parameters), so no minibatch Hessian is unbiased.
      metadata: facts about the instance (e.g. which labels were flipped); free-form.
    """

    name: str
    inner_loss: Callable[..., jax.Array]
    outer_loss: Callable[..., jax.Array]
    params: PyTree
    hparams: PyTree
    inner_args: tuple
    outer_args: tuple
    solve_inner: Callable[..., PyTree]
    exact_hypergrad: Callable[[PyTree], PyTree] | None
    batch_argnums: tuple[int, ...] = ()
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        where = f"bilevel.BilevelProblem({self.name!r})"
        arguments = (self.hparams, *self.inner_args)
        numbers = self.batch_argnums
        if (not isinstance(numbers, tuple)
                or any(not isinstance(i, int) or isinstance(i, bool) for i in numbers)
                or len(set(numbers)) != len(numbers)
                or any(not 0 <= i < len(arguments) for i in numbers)):
            raise ValueError(f"{where}: batch_argnums must be a tuple of distinct positions in "
                             f"(hparams, *inner_args), integers in [0, {len(arguments)}), got "
                             f"{numbers!r}")
        sizes = {i: _leading_sizes(arguments[i]) for i in numbers}
        found = {size for leaves in sizes.values() for size in leaves}
        if len(found) > 1 or None in found or any(not leaves for leaves in sizes.values()):
            raise ValueError(f"{where}: the arguments named by batch_argnums={numbers} must be "
                             f"arrays sharing one leading (example) axis; their leading sizes "
                             f"are {sizes}")

    def hyperobjective(self, hparams: PyTree, params_init: PyTree | None = None) -> jax.Array:
        """``F(λ) = outer(solve_inner(params_init, λ), λ)``, what a hypergradient differentiates.

        ``params_init`` defaults to ``self.params``. For a nonconvex inner problem, finite
        differences should warm-start from ``θ*(λ)``: from a distant start, the solvers' discrete
        line-search decisions can carry ``λ ± h`` to different local minima. Under ``jit``, pass
        the data as arguments rather than jitting this bound method, whose arrays would become
        constants.
        """
        start = self.params if params_init is None else params_init
        solution = self.solve_inner(start, hparams, *self.inner_args)
        return self.outer_loss(solution, hparams, *self.outer_args)


def _leading_sizes(tree: PyTree) -> list[int | None]:
    """The leading-axis size of every leaf (None for a scalar leaf)."""
    return [jnp.shape(leaf)[0] if jnp.ndim(leaf) else None
            for leaf in jax.tree_util.tree_leaves(tree)]


# --------------------------------------------------------------------------------------------
# Argument checks and data helpers


def _check_dtype(where: str, dtype: Any) -> np.dtype:
    dtype = np.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{where}: dtype must be a floating-point dtype, got {dtype}")
    if dtype.itemsize == 8 and not jax.config.read("jax_enable_x64"):
        raise ValueError(f"{where}: dtype {dtype} needs jax.config.update('jax_enable_x64', True)")
    return dtype


def _check_count(where: str, name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{where}: {name} must be an integer >= {minimum}, got {value!r}")


def _check_positive(where: str, name: str, value: float) -> None:
    if not value > 0.0:
        raise ValueError(f"{where}: {name} must be > 0, got {value!r}")


def _rng(key: jax.Array) -> np.random.Generator:
    """A NumPy generator seeded by the bits of a JAX key (typed or raw ``uint32``).

    Data are drawn with NumPy, not ``jax.random``: XLA compiles threefry for every new shape,
    which cost seconds of CPU per problem here, for arrays made once.
    """
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())


def _linear_data(rng: np.random.Generator, n: int, weights: np.ndarray,
                 noise: float) -> tuple[np.ndarray, np.ndarray]:
    """``X ~ N(0, I)``, ``y = X w + noise · ε``, in float64 NumPy."""
    x = rng.standard_normal((n, weights.shape[-1]))
    return x, x @ weights + noise * rng.standard_normal(n)


def _arrays(dtype: np.dtype, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
    # Made in float64 and then cast, so float32 and float64 problems share their data.
    return tuple(jnp.asarray(a, dtype) for a in arrays)


# --------------------------------------------------------------------------------------------
# Shared losses and solvers


def _mse(params: jax.Array, hparams: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared error ``mean (Xθ − y)²``; ``hparams`` is not used."""
    del hparams
    return jnp.mean((x @ params - y) ** 2)


def _log_loss(params: jax.Array, hparams: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
    """Logistic loss ``mean log(1 + exp(−y xᵀθ))``, labels ``y ∈ {−1, +1}``; ``hparams`` unused."""
    del hparams
    return jnp.mean(jax.nn.softplus(-y * (x @ params)))


def _newton(loss: Callable[[jax.Array], jax.Array], params: jax.Array, steps: int) -> jax.Array:
    """``steps`` damped Newton steps on a vector: dense Hessian, vectorised Armijo backtracking.

    Near the minimiser the full step passes the Armijo test and convergence is quadratic; once
    round-off makes every trial look equal, the full Newton step is taken.
    """
    step_sizes = 0.5 ** jnp.arange(_BACKTRACKS, dtype=params.dtype)

    def step(_, theta):
        value, grad = jax.value_and_grad(loss)(theta)
        direction = -jnp.linalg.solve(jax.hessian(loss)(theta), grad)
        trials = jax.vmap(lambda t: loss(theta + t * direction))(step_sizes)
        accepted = trials <= value + _ARMIJO * step_sizes * jnp.vdot(grad, direction)
        size = jnp.where(jnp.any(accepted), step_sizes[jnp.argmax(accepted)], 1.0)
        return theta + size.astype(theta.dtype) * direction

    return lax.fori_loop(0, steps, step, params)


@functools.lru_cache(maxsize=64)  # instances with the same loss share one compiled solver
def _newton_solver(inner_loss: Callable, steps: int) -> Callable:
    @jax.jit
    def solve_inner(params_init, hparams, *inner_args):
        return _newton(lambda p: inner_loss(p, hparams, *inner_args), params_init, steps)

    return solve_inner


# --------------------------------------------------------------------------------------------
# 1. Ridge regression with a log regularisation strength


def _ridge_inner(params: jax.Array, hparams: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    """``½ mean (Xθ − y)² + ½ Σ e^λ θ²`` (λ a scalar or one per feature)."""
    return 0.5 * jnp.mean((x @ params - y) ** 2) + 0.5 * jnp.sum(jnp.exp(hparams) * params**2)


def _ridge_system(hparams: jax.Array, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``A = XᵀX/n + diag(e^λ)`` and ``b = Xᵀy/n``, so that ``θ* = A⁻¹ b``."""
    n, dim = x.shape
    penalty = jnp.broadcast_to(jnp.exp(hparams), (dim,))
    return x.T @ x / n + jnp.diag(penalty), x.T @ y / n


@jax.jit
def _ridge_solve(params_init: jax.Array, hparams: jax.Array, x: jax.Array,
                 y: jax.Array) -> jax.Array:
    del params_init  # closed form
    return jnp.linalg.solve(*_ridge_system(hparams, x, y))


@jax.jit
def _ridge_hypergrad(x: jax.Array, y: jax.Array, x_val: jax.Array, y_val: jax.Array,
                     hparams: jax.Array) -> jax.Array:
    """``dL/dλ_j = gᵀ dθ*/dλ_j`` with ``dθ*/dλ_j = −A⁻¹ e_j e^{λ_j} θ*_j`` and ``g = ∇_θ L_val``."""
    a, b = _ridge_system(hparams, x, y)
    theta = jnp.linalg.solve(a, b)
    outer_grad = 2.0 * x_val.T @ (x_val @ theta - y_val) / x_val.shape[0]
    per_feature = -jnp.linalg.solve(a, outer_grad) * jnp.exp(hparams) * theta  # A is symmetric
    return per_feature if jnp.ndim(hparams) else jnp.sum(per_feature)


def ridge(key: jax.Array, n_train: int = 50, n_val: int = 50, dim: int = 10, *,
          per_feature: bool = False, noise: float = 0.5, log_reg: float = -2.0,
          dtype: Any = jnp.float32) -> BilevelProblem:
    """Ridge regression whose log regularisation strength is tuned on a validation set.

    Inner ``½ mean (Xθ − y)² + ½ Σ e^λ θ²``, outer ``mean (X_val θ − y_val)²``; closed forms
    ``θ*(λ) = (XᵀX/n + diag e^λ)⁻¹ Xᵀy/n`` and ``dθ*/dλ = −(XᵀX/n + diag e^λ)⁻¹ diag(e^λ) θ*``.

    Args:
      key: PRNG key for the data (``X ~ N(0, I)``, ``y = X w + noise · ε``, ``w ~ N(0, I)``).
      n_train, n_val, dim: sizes.
      per_feature: one λ per feature (hparams of shape ``(dim,)``) instead of a scalar.
      noise: label noise standard deviation.
      log_reg: the initial λ.
      dtype: floating dtype of every array.

    Returns:
      A :class:`BilevelProblem` named ``"ridge"`` with an exact hypergradient.
    """
    where = "bilevel.problems.ridge"
    dtype = _check_dtype(where, dtype)
    for name, value in (("n_train", n_train), ("n_val", n_val), ("dim", dim)):
        _check_count(where, name, value)
    rng = _rng(key)
    weights = rng.standard_normal(dim)
    train = _linear_data(rng, n_train, weights, noise)
    val = _linear_data(rng, n_val, weights, noise)
    weights, x, y, x_val, y_val = _arrays(dtype, weights, *train, *val)
    return BilevelProblem(
        name="ridge", inner_loss=_ridge_inner, outer_loss=_mse,
        params=jnp.zeros((dim,), dtype),
        hparams=jnp.full((dim,) if per_feature else (), log_reg, dtype),
        inner_args=(x, y), outer_args=(x_val, y_val), solve_inner=_ridge_solve,
        exact_hypergrad=functools.partial(_ridge_hypergrad, x, y, x_val, y_val),
        batch_argnums=(1, 2),
        metadata={"convex": True, "true_weights": weights},
    )


# --------------------------------------------------------------------------------------------
# 2. L2-regularised logistic regression, one log strength per feature


def _logistic_inner(params: jax.Array, hparams: jax.Array, x: jax.Array,
                    y: jax.Array) -> jax.Array:
    """``mean log(1 + exp(−y xᵀθ)) + ½ Σ e^λᵢ θᵢ²``."""
    return _log_loss(params, None, x, y) + 0.5 * jnp.sum(jnp.exp(hparams) * params**2)


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # imported lazily: sklearn takes a second to import

    digits = load_digits()
    return digits.data.astype(np.float64), digits.target.astype(np.int32)


def _digits_split(where: str, rng: np.random.Generator, n_train: int, n_val: int,
                  classes: tuple[int, ...] | None) -> tuple[np.ndarray, ...]:
    """A random train/validation split of (a class subset of) digits, standardised on train."""
    images, labels = _load_digits()
    if classes is not None:
        keep = np.isin(labels, classes)
        images, labels = images[keep], labels[keep]
    if n_train + n_val > len(labels):
        raise ValueError(f"{where}: n_train + n_val must be <= {len(labels)} (the digits "
                         f"available), got {n_train} + {n_val}")
    order = rng.permutation(len(labels))
    train, val = order[:n_train], order[n_train:n_train + n_val]
    mean = images[train].mean(axis=0)
    # Pixels almost constant on the training split would otherwise blow up on validation.
    scale = np.maximum(images[train].std(axis=0), 1.0)
    standardise = lambda rows: (images[rows] - mean) / scale  # noqa: E731
    return standardise(train), labels[train], standardise(val), labels[val]


def _logistic_synthetic(key: jax.Array, n_train: int, n_val: int, dim: int,
                        dtype: np.dtype) -> tuple[jax.Array, ...]:
    rng = _rng(key)
    weights = rng.standard_normal(dim)
    x = rng.standard_normal((n_train + n_val, dim))
    # Labels drawn from the model: y = +1 with probability σ(xᵀw), so the data are not separable.
    heads = rng.uniform(size=n_train + n_val) < 1.0 / (1.0 + np.exp(-x @ weights))
    y = np.where(heads, 1.0, -1.0)
    return _arrays(dtype, x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def _logistic_data(where: str, key: jax.Array, n_train: int, n_val: int, dim: int | None,
                   data: str, classes: tuple[int, int],
                   dtype: np.dtype) -> tuple[jax.Array, ...]:
    if data == "synthetic":
        dim = 10 if dim is None else dim
        _check_count(where, "dim", dim)
        return _logistic_synthetic(key, n_train, n_val, dim, dtype)
    if data == "digits":
        if dim not in (None, 64):
            raise ValueError(f"{where}: digits have dim 64, got dim={dim}")
        if len(classes) != 2 or classes[0] == classes[1]:
            raise ValueError(f"{where}: classes must be two different digits, got {classes}")
        x, labels, x_val, labels_val = _digits_split(where, _rng(key), n_train, n_val,
                                                     tuple(classes))
        sign = lambda t: np.where(t == classes[1], 1.0, -1.0)  # noqa: E731
        return _arrays(dtype, x, sign(labels), x_val, sign(labels_val))
    raise ValueError(f"{where}: data must be 'synthetic' or 'digits', got {data!r}")


def logistic_l2(key: jax.Array, n_train: int = 100, n_val: int = 100, dim: int | None = None,
                *, data: str = "synthetic", classes: tuple[int, int] = (3, 8),
                log_reg: float = -2.0, newton_steps: int = 30,
                dtype: Any = jnp.float32) -> BilevelProblem:
    """Binary logistic regression with one L2 strength per feature, tuned on a validation set.

    Inner ``mean log(1 + exp(−y xᵀθ)) + ½ Σ e^λᵢ θᵢ²`` (labels ±1, no bias), outer the same
    log-loss on validation data. Strongly convex in θ for every λ. There is no closed-form
    hypergradient: check one with finite differences of :meth:`BilevelProblem.hyperobjective`.

    Args:
      key: PRNG key for the data (synthetic) or for the split (digits).
      n_train, n_val: sizes.
      dim: features; default 10 for synthetic data, and digits have 64.
      data: ``"synthetic"`` (``x ~ N(0, I)``, labels sampled from a logistic model) or
        ``"digits"`` (two classes of scikit-learn's 8×8 digits, standardised).
      classes: the digit pair for ``data="digits"``; the second is the positive class.
      log_reg: the initial λ (all features).
      newton_steps: iterations of ``solve_inner`` (damped Newton, dense Hessian).
      dtype: floating dtype of every array.

    Returns:
      A :class:`BilevelProblem` named ``"logistic_l2"``, ``exact_hypergrad=None``.
    """
    where = "bilevel.problems.logistic_l2"
    dtype = _check_dtype(where, dtype)
    for name, value in (("n_train", n_train), ("n_val", n_val), ("newton_steps", newton_steps)):
        _check_count(where, name, value)
    x, y, x_val, y_val = _logistic_data(where, key, n_train, n_val, dim, data, classes, dtype)
    return BilevelProblem(
        name="logistic_l2", inner_loss=_logistic_inner, outer_loss=_log_loss,
        params=jnp.zeros((x.shape[1],), dtype), hparams=jnp.full((x.shape[1],), log_reg, dtype),
        inner_args=(x, y), outer_args=(x_val, y_val),
        solve_inner=_newton_solver(_logistic_inner, newton_steps), exact_hypergrad=None,
        batch_argnums=(1, 2), metadata={"convex": True, "data": data},
    )


# --------------------------------------------------------------------------------------------
# 3. iMAML: proximal few-shot linear regression


def _imaml_inner(params: jax.Array, hparams: jax.Array, x_support: jax.Array,
                 y_support: jax.Array, *, prox: float) -> jax.Array:
    """``Σ_t [mean_s (x_tsᵀθ_t − y_ts)² + prox/2 ‖θ_t − φ‖²]``; θ ``(tasks, dim)``, φ ``(dim,)``."""
    residual = jnp.einsum("tsd,td->ts", x_support, params) - y_support
    return jnp.sum(jnp.mean(residual**2, axis=1)) + 0.5 * prox * jnp.sum((params - hparams) ** 2)


def _imaml_outer(params: jax.Array, hparams: jax.Array, x_query: jax.Array,
                 y_query: jax.Array) -> jax.Array:
    """Query MSE averaged over tasks and examples; φ enters only through θ*."""
    del hparams
    return jnp.mean((jnp.einsum("tqd,td->tq", x_query, params) - y_query) ** 2)


def _imaml_system(hparams: jax.Array, x_support: jax.Array, y_support: jax.Array,
                  prox: float) -> tuple[jax.Array, jax.Array]:
    """Per task ``A_t = 2X_tᵀX_t/S + prox I`` and ``b_t = 2X_tᵀy_t/S + prox φ``.

    The solution is ``θ*_t = A_t⁻¹ b_t``.
    """
    n_support, dim = x_support.shape[1:]
    gram = 2.0 * jnp.einsum("tsd,tse->tde", x_support, x_support) / n_support
    rhs = 2.0 * jnp.einsum("tsd,ts->td", x_support, y_support) / n_support + prox * hparams
    return gram + prox * jnp.eye(dim, dtype=x_support.dtype), rhs


def _batched_solve(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.linalg.solve(a, b[..., None])[..., 0]


@jax.jit
def _imaml_solve(params_init: jax.Array, hparams: jax.Array, x_support: jax.Array,
                 y_support: jax.Array, *, prox: float) -> jax.Array:
    del params_init  # closed form
    return _batched_solve(*_imaml_system(hparams, x_support, y_support, prox))


@jax.jit
def _imaml_hypergrad(x_support: jax.Array, y_support: jax.Array, x_query: jax.Array,
                     y_query: jax.Array, prox: float, hparams: jax.Array) -> jax.Array:
    """``dL/dφ = Σ_t prox A_t⁻¹ g_t`` since ``dθ*_t/dφ = prox A_t⁻¹`` (A_t symmetric)."""
    a, b = _imaml_system(hparams, x_support, y_support, prox)
    theta = _batched_solve(a, b)
    n_tasks, n_query = y_query.shape
    residual = jnp.einsum("tqd,td->tq", x_query, theta) - y_query
    outer_grad = 2.0 * jnp.einsum("tqd,tq->td", x_query, residual) / (n_tasks * n_query)
    return prox * jnp.sum(_batched_solve(a, outer_grad), axis=0)


def _imaml_data(key: jax.Array, n_tasks: int, n_support: int, n_query: int, dim: int,
                task_spread: float, noise: float) -> tuple[np.ndarray, ...]:
    """Task weights ``(tasks, dim)`` and stacked support and query sets ``(tasks, n, dim)``."""
    rng = _rng(key)
    task_weights = rng.standard_normal(dim) + task_spread * rng.standard_normal((n_tasks, dim))
    support = [_linear_data(rng, n_support, w, noise) for w in task_weights]
    query = [_linear_data(rng, n_query, w, noise) for w in task_weights]
    stack = lambda sets, i: np.stack([s[i] for s in sets])  # noqa: E731
    return task_weights, stack(support, 0), stack(support, 1), stack(query, 0), stack(query, 1)


def imaml_regression(key: jax.Array, n_tasks: int = 4, n_support: int = 5, n_query: int = 10,
                     dim: int = 10, *, prox: float = 1.0, task_spread: float = 0.5,
                     noise: float = 0.1, dtype: Any = jnp.float32) -> BilevelProblem:
    """iMAML-style few-shot linear regression: learn the meta-initialisation φ.

    Task weights ``w_t = μ + task_spread · N(0, I)``. Inner, for all tasks at once,
    ``Σ_t [support MSE_t(θ_t) + prox/2 ‖θ_t − φ‖²]`` (curvature ``2X_tᵀX_t/S + prox I`` per
    task); outer ``mean_t query MSE_t(θ*_t)``. With fewer support points than features the
    proximal term is what makes each task solvable. Closed forms
    ``θ*_t = A_t⁻¹(2X_tᵀy_t/S + prox φ)`` and ``dL/dφ = prox Σ_t A_t⁻¹ ∇_{θ_t} L``.

    Reference: Rajeswaran, Finn, Kakade, Levine, "Meta-learning with implicit gradients", 2019.

    Args:
      key: PRNG key for the tasks.
      n_tasks, n_support, n_query, dim: sizes; params have shape ``(n_tasks, dim)``.
      prox: strength of the proximal term (> 0).
      task_spread: standard deviation of the task weights around their common mean.
      noise: label noise standard deviation.
      dtype: floating dtype of every array.

    Returns:
      A :class:`BilevelProblem` named ``"imaml"`` with an exact hypergradient; hparams φ start
      at zero.
    """
    where = "bilevel.problems.imaml_regression"
    dtype = _check_dtype(where, dtype)
    for name, value in (("n_tasks", n_tasks), ("n_support", n_support), ("n_query", n_query),
                        ("dim", dim)):
        _check_count(where, name, value)
    _check_positive(where, "prox", prox)
    task_weights, *data = _arrays(dtype, *_imaml_data(key, n_tasks, n_support, n_query, dim,
                                                      task_spread, noise))
    support, query = tuple(data[:2]), tuple(data[2:])
    return BilevelProblem(
        name="imaml", inner_loss=functools.partial(_imaml_inner, prox=prox),
        outer_loss=_imaml_outer, params=jnp.zeros((n_tasks, dim), dtype),
        hparams=jnp.zeros((dim,), dtype), inner_args=support, outer_args=query,
        solve_inner=functools.partial(_imaml_solve, prox=prox),
        exact_hypergrad=functools.partial(_imaml_hypergrad, *support, *query, prox),
        metadata={"convex": True, "task_weights": task_weights},
    )


# --------------------------------------------------------------------------------------------
# 4. Data reweighting with noisy labels


def _reweighted_squared_inner(params: jax.Array, hparams: jax.Array, x: jax.Array, y: jax.Array,
                              *, ridge: float) -> jax.Array:
    """``½ mean σ(h) (xᵀθ − y)² + ridge/2 ‖θ‖²``."""
    weighted = jax.nn.sigmoid(hparams) * (x @ params - y) ** 2
    return 0.5 * jnp.mean(weighted) + 0.5 * ridge * jnp.sum(params**2)


def _reweighted_logistic_inner(params: jax.Array, hparams: jax.Array, x: jax.Array,
                               y: jax.Array, *, ridge: float) -> jax.Array:
    """``mean σ(h) log(1 + exp(−y xᵀθ)) + ridge/2 ‖θ‖²``."""
    weighted = jax.nn.sigmoid(hparams) * jax.nn.softplus(-y * (x @ params))
    return jnp.mean(weighted) + 0.5 * ridge * jnp.sum(params**2)


def _reweighting_system(hparams: jax.Array, x: jax.Array, y: jax.Array,
                        ridge: float) -> tuple[jax.Array, jax.Array]:
    """``A = XᵀWX/n + ridge I`` and ``b = XᵀWy/n`` with ``W = diag σ(h)``; ``θ* = A⁻¹ b``."""
    n, dim = x.shape
    weights = jax.nn.sigmoid(hparams)
    return (x.T * weights) @ x / n + ridge * jnp.eye(dim, dtype=x.dtype), x.T @ (weights * y) / n


@jax.jit
def _reweighting_solve(params_init: jax.Array, hparams: jax.Array, x: jax.Array, y: jax.Array,
                       *, ridge: float) -> jax.Array:
    del params_init  # closed form
    return jnp.linalg.solve(*_reweighting_system(hparams, x, y, ridge))


@jax.jit
def _reweighting_hypergrad(x: jax.Array, y: jax.Array, x_val: jax.Array, y_val: jax.Array,
                           ridge: float, hparams: jax.Array) -> jax.Array:
    """``dL/dh_i = −(x_iᵀA⁻¹g) r_i σ'(h_i)/n``, from ``A dθ* = −x_i r_i σ'(h_i) dh_i / n``.

    Here ``r = Xθ* − y`` and ``g = ∇_θ L_val``.
    """
    a, b = _reweighting_system(hparams, x, y, ridge)
    theta = jnp.linalg.solve(a, b)
    outer_grad = 2.0 * x_val.T @ (x_val @ theta - y_val) / x_val.shape[0]
    weights = jax.nn.sigmoid(hparams)
    residual = x @ theta - y
    return -(x @ jnp.linalg.solve(a, outer_grad)) * residual * weights * (1 - weights) / x.shape[0]


def _reweighting_data(key: jax.Array, n_train: int, n_val: int, dim: int,
                      n_flipped: int) -> tuple[np.ndarray, ...]:
    """Features, noisy train labels, validation set, the flipped mask and the clean labels."""
    rng = _rng(key)
    weights = rng.standard_normal(dim)
    x = rng.standard_normal((n_train + n_val, dim))
    clean = np.where(x @ weights >= 0, 1.0, -1.0)
    flipped = np.zeros(n_train, bool)
    flipped[rng.permutation(n_train)[:n_flipped]] = True
    noisy = np.where(flipped, -clean[:n_train], clean[:n_train])
    return x[:n_train], noisy, x[n_train:], clean[n_train:], flipped, clean[:n_train]


def data_reweighting(key: jax.Array, n_train: int = 40, n_val: int = 40, dim: int = 5, *,
                     noise_fraction: float = 0.3, loss: str = "squared", ridge: float = 1e-2,
                     newton_steps: int = 30, dtype: Any = jnp.float32) -> BilevelProblem:
    """Learn one weight ``w_i = σ(h_i)`` per training example when some labels are flipped.

    Labels ``y = sign(xᵀw_true) ∈ {−1, +1}``; ``round(noise_fraction · n_train)`` training
    labels are flipped, the validation labels are clean. Inner: the weighted training loss plus
    ``ridge/2 ‖θ‖²`` (strongly convex for every h); outer: the same loss, unweighted, on the
    validation set. With ``loss="squared"`` (a least-squares classifier: inner
    ``½ mean σ(h)(xᵀθ − y)²``, outer validation MSE) θ* and the hypergradient are closed form;
    with ``loss="logistic"`` the inner solver is damped Newton and there is no closed form.
    ``metadata["flipped"]`` marks the corrupted examples, whose weights a good hypergradient
    pushes down. Reference: Ren et al., "Learning to reweight examples", 2018.

    Args:
      key: PRNG key for the data and for which labels are flipped.
      n_train, n_val, dim: sizes; hparams have shape ``(n_train,)`` and start at 0 (w = ½).
      noise_fraction: fraction of flipped training labels, in [0, 1).
      loss: ``"squared"`` or ``"logistic"``.
      ridge: the L2 strength that keeps the inner problem strongly convex (> 0).
      newton_steps: iterations of ``solve_inner`` when ``loss="logistic"``.
      dtype: floating dtype of every array.

    Returns:
      A :class:`BilevelProblem` named ``"reweighting"``.
    """
    where = "bilevel.problems.data_reweighting"
    dtype = _check_dtype(where, dtype)
    for name, value in (("n_train", n_train), ("n_val", n_val), ("dim", dim),
                        ("newton_steps", newton_steps)):
        _check_count(where, name, value)
    if not 0.0 <= noise_fraction < 1.0:
        raise ValueError(f"{where}: noise_fraction must be in [0, 1), got {noise_fraction!r}")
    if loss not in ("squared", "logistic"):
        raise ValueError(f"{where}: loss must be 'squared' or 'logistic', got {loss!r}")
    _check_positive(where, "ridge", ridge)
    x, y, x_val, y_val, flipped, clean = _reweighting_data(
        key, n_train, n_val, dim, round(noise_fraction * n_train))
    x, y, x_val, y_val, clean = _arrays(dtype, x, y, x_val, y_val, clean)
    if loss == "squared":
        inner = functools.partial(_reweighted_squared_inner, ridge=ridge)
        outer, solve = _mse, functools.partial(_reweighting_solve, ridge=ridge)
        exact = functools.partial(_reweighting_hypergrad, x, y, x_val, y_val, ridge)
    else:
        inner = functools.partial(_reweighted_logistic_inner, ridge=ridge)
        outer, solve, exact = _log_loss, _newton_solver(inner, newton_steps), None
    return BilevelProblem(
        name="reweighting", inner_loss=inner, outer_loss=outer,
        params=jnp.zeros((dim,), dtype), hparams=jnp.zeros((n_train,), dtype),
        inner_args=(x, y), outer_args=(x_val, y_val), solve_inner=solve, exact_hypergrad=exact,
        batch_argnums=(0, 1, 2),  # one weight logit per example: h is sampled with its example
        metadata={"convex": True, "loss": loss, "flipped": jnp.asarray(flipped),
                  "clean_labels": clean},
    )


# --------------------------------------------------------------------------------------------
# 5. A small MLP on scikit-learn's digits, weight decay per layer

_LAYERS = ("layer1", "layer2")


def _mlp_logits(params: PyTree, x: jax.Array) -> jax.Array:
    # tanh, not ReLU: the losses must be smooth for Hessians and finite differences to agree.
    hidden = jnp.tanh(x @ params["layer1"]["w"] + params["layer1"]["b"])
    return hidden @ params["layer2"]["w"] + params["layer2"]["b"]


def _cross_entropy(params: PyTree, hparams: PyTree, x: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of the MLP; ``hparams`` is not used."""
    del hparams
    log_probs = jax.nn.log_softmax(_mlp_logits(params, x))
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def _mlp_init(rng: np.random.Generator, hidden: int, dtype: np.dtype) -> PyTree:
    """Weights ``N(0, 1/fan_in)``, biases zero."""
    w1, w2 = rng.standard_normal((64, hidden)), rng.standard_normal((hidden, 10))
    w1, b1, w2, b2 = _arrays(dtype, w1 / math.sqrt(64), np.zeros(hidden),
                             w2 / math.sqrt(hidden), np.zeros(10))
    return {"layer1": {"w": w1, "b": b1}, "layer2": {"w": w2, "b": b2}}


def _mlp_inner(params: PyTree, hparams: PyTree, x: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy + ``Σ_l ½ e^{λ_l} (‖W_l‖² + ‖b_l‖²)``.

    The biases are decayed too: softmax ignores a constant added to every output bias, so
    without it the Hessian has an exact null direction and θ* is not isolated.
    """
    decay = sum(0.5 * jnp.exp(hparams[name]) * (jnp.sum(params[name]["w"] ** 2)
                                                + jnp.sum(params[name]["b"] ** 2))
                for name in _LAYERS)
    return _cross_entropy(params, None, x, labels) + decay


def _mlp_inner_per_parameter(params: PyTree, hparams: PyTree, x: jax.Array,
                             labels: jax.Array) -> jax.Array:
    """Cross-entropy + ``Σ_i ½ e^{λ_i} θ_i²``, one log decay per parameter (``hparams`` has the
    structure of ``params``)."""
    decay = jax.tree_util.tree_map(lambda p, h: 0.5 * jnp.sum(jnp.exp(h) * p**2), params,
                                   hparams)
    return _cross_entropy(params, None, x, labels) + sum(jax.tree_util.tree_leaves(decay))


def _lbfgs(loss: Callable[[PyTree], jax.Array], params: PyTree, steps: int,
           memory_size: int) -> PyTree:
    optimizer = optax.lbfgs(memory_size=memory_size)
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(_, carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = optimizer.update(grad, state, params, value=value, grad=grad,
                                          value_fn=loss)
        return optax.apply_updates(params, updates), state

    return lax.fori_loop(0, steps, step, (params, optimizer.init(params)))[0]


@functools.lru_cache(maxsize=64)
def _lbfgs_solver(inner_loss: Callable, steps: int, memory_size: int) -> Callable:
    @jax.jit
    def solve_inner(params_init, hparams, *inner_args):
        return _lbfgs(lambda p: inner_loss(p, hparams, *inner_args), params_init, steps,
                      memory_size)

    return solve_inner


def digits_mlp(key: jax.Array, hidden: int = 16, n_train: int = 256, n_val: int = 256, *,
               log_reg: float = -4.0, per_parameter: bool = False, lbfgs_steps: int = 500,
               memory_size: int = 20, dtype: Any = jnp.float32) -> BilevelProblem:
    """A 64 → hidden → 10 tanh MLP on scikit-learn's 8×8 digits, weight decay tuned per layer.

    Inner: mean cross-entropy + ``Σ_l ½ e^{λ_l} ‖θ_l‖²`` over the weights and biases of
    ``l ∈ {layer1, layer2}`` (with ``per_parameter=True``: ``Σ_i ½ e^{λ_i} θ_i²``, one λ per
    weight and bias); outer: validation cross-entropy. Features are standardised with
    the training split's statistics. Nonconvex, so θ* is the local minimiser that
    ``solve_inner`` reaches from ``params_init`` (optax L-BFGS with its zoom line search,
    ``lbfgs_steps`` steps, in a ``lax.fori_loop``); at the defaults it reaches an inner gradient
    norm of about 1e-16 in float64 and 3e-8 in float32, at a point whose Hessian is positive
    definite. With ``hidden=16`` there are 1,210 parameters: the dense Hessian can be
    materialised for references. No closed-form hypergradient.

    Args:
      key: PRNG key for the train/validation split and the initial weights.
      hidden: hidden units.
      n_train, n_val: sizes (together at most 1,797).
      log_reg: the initial λ of both layers (of every parameter with ``per_parameter``).
      per_parameter: one log decay per parameter instead of one per layer.
      lbfgs_steps, memory_size: the inner solver's budget and L-BFGS history.
      dtype: floating dtype of every array.

    Returns:
      A :class:`BilevelProblem` named ``"digits_mlp"``; params ``{layer: {"w", "b"}}``,
      hparams ``{"layer1": λ₁, "layer2": λ₂}`` (scalars), or with ``per_parameter`` a pytree
      like params.
    """
    where = "bilevel.problems.digits_mlp"
    dtype = _check_dtype(where, dtype)
    for name, value in (("hidden", hidden), ("n_train", n_train), ("n_val", n_val),
                        ("lbfgs_steps", lbfgs_steps), ("memory_size", memory_size)):
        _check_count(where, name, value)
    rng = _rng(key)
    x, labels, x_val, labels_val = _digits_split(where, rng, n_train, n_val, None)
    params = _mlp_init(rng, hidden, dtype)
    if per_parameter:
        inner = _mlp_inner_per_parameter
        hparams = jax.tree_util.tree_map(lambda p: jnp.full_like(p, log_reg), params)
    else:
        inner = _mlp_inner
        hparams = {name: jnp.asarray(log_reg, dtype) for name in _LAYERS}
    return BilevelProblem(
        name="digits_mlp", inner_loss=inner, outer_loss=_cross_entropy, params=params,
        hparams=hparams, inner_args=(jnp.asarray(x, dtype), jnp.asarray(labels)),
        outer_args=(jnp.asarray(x_val, dtype), jnp.asarray(labels_val)),
        solve_inner=_lbfgs_solver(inner, lbfgs_steps, memory_size), exact_hypergrad=None,
        batch_argnums=(1, 2),
        metadata={"convex": False, "num_params": 64 * hidden + hidden + hidden * 10 + 10,
                  "per_parameter": per_parameter},
    )


# --------------------------------------------------------------------------------------------
# Registry

#: Registry name -> constructor ``(key, **kwargs) -> BilevelProblem``.
PROBLEMS: dict[str, Callable[..., BilevelProblem]] = {
    "ridge": ridge,
    "logistic_l2": logistic_l2,
    "imaml": imaml_regression,
    "reweighting": data_reweighting,
    "digits_mlp": digits_mlp,
}


def make_problem(name: str, key: jax.Array, **kwargs: Any) -> BilevelProblem:
    """Build the registered problem ``name`` from ``key``; ``kwargs`` go to its constructor.

    Raises:
      ValueError: ``name`` is not a key of :data:`PROBLEMS` (the message lists the known names).
    """
    if name not in PROBLEMS:
        raise ValueError(f"bilevel.problems.make_problem: unknown problem {name!r}; "
                         f"known problems: {', '.join(sorted(PROBLEMS))}")
    return PROBLEMS[name](key, **kwargs)
