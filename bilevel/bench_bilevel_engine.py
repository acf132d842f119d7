"""The engine of :mod:`bilevel.bench_bilevel`: the problems, the timed runs of both sides, the
study, its tables and plot (see that module's docstring). Imports JAX; the front does not."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel.bench_bilevel import (
    METHODS,
    OURS,
    BenchError,
    Benchmark,
    StudyConfig,
    load_runs,
    runs_file,
    step_params,
)

# --------------------------------------------------------------------------------------------
# Problems.


class Problem(NamedTuple):
    """One bilevel problem as both sides see it; ``score(θ, λ)`` is the metric (a float)."""

    name: str
    inner_loss: Callable  # (θ, λ, *inner_args) -> scalar, a mean over the rows
    outer_loss: Callable
    inner_args: tuple
    outer_args: tuple
    params0: jax.Array
    hparams0: jax.Array
    score: Callable[[Any, Any], float]
    metric: str  # "suboptimality" (lower is better) or "test_accuracy"
    info: dict  # sizes, generator, reference values: recorded with the results


SIZES = {  # full, smoke
    "quadratics": ({"n_inner": 32768, "n_outer": 1024, "dim_inner": 100, "dim_outer": 10},
                   {"n_inner": 1024, "n_outer": 256, "dim_inner": 20, "dim_outer": 5}),
    "datacleaning": ({"n_train": 20000, "n_val": 5000, "n_test": 10000},
                     {"n_train": 2000, "n_val": 500, "n_test": 2000}),
    "logreg": ({"n_train": 49990, "n_val": 91701, "n_features": 22},
               {"n_train": 4000, "n_val": 2000, "n_features": 22}),
}


def quadratic_loss(theta, lam, hess, hess_outer, cross, linear, linear_outer):
    """``mean_i ½θᵀH_iθ + ½λᵀG_iλ + λᵀC_iθ + b_iᵀθ + c_iᵀλ``, the benchmark's quadratic."""
    n = hess.shape[0]
    total = (0.5 * jnp.einsum("j,ijk,k->", theta, hess, theta)
             + 0.5 * jnp.einsum("j,ijk,k->", lam, hess_outer, lam)
             + jnp.einsum("j,ijk,k->", lam, cross, theta)
             + jnp.sum(linear @ theta) + jnp.sum(linear_outer @ lam))
    return total / n


def quadratic_solution(inner_args, outer_args):
    """``(θ*(λ) as (P, q), Q, r, λ*, h*)`` in float64: ``θ* = Pλ + q`` and
    ``h(λ) = ½λᵀQλ + rᵀλ + const`` for the means of the per-sample matrices."""
    hi, gi, ci, bi, ei = (np.asarray(a, np.float64).mean(0) for a in inner_args)
    ho, go, co, bo, eo = (np.asarray(a, np.float64).mean(0) for a in outer_args)
    del gi, ei  # the inner loss's λ-only terms do not move θ*
    p = -np.linalg.solve(hi, ci.T)
    q = -np.linalg.solve(hi, bi)
    big_q = p.T @ ho @ p + go + co @ p + p.T @ co.T
    r = p.T @ ho @ q + co @ q + p.T @ bo + eo
    lam_star = -np.linalg.solve(big_q, r)
    return p, q, big_q, r, lam_star


def quadratic_value(lam, p, q, outer_means):
    ho, go, co, bo, eo = outer_means
    theta = p @ lam + q
    return (0.5 * theta @ ho @ theta + 0.5 * lam @ go @ lam + lam @ co @ theta + bo @ theta
            + eo @ lam)


def own_quadratic_matrices(n, d_inner, d_outer, seed, mu=0.1, cross=0.1):
    """Our fallback generator (no benchmark folder): per-sample PSD ``x xᵀ`` Hessians whose mean
    has spectrum in about [mu, 1], small cross terms, Gaussian linear terms."""
    rng = np.random.default_rng(seed)

    def hessians(d, shift):
        scale = np.sqrt(np.geomspace(mu, 1.0, d))
        x = rng.standard_normal((n, d)) * scale
        return np.einsum("ni,nj->nij", x, x) + shift * np.eye(d)

    return (hessians(d_inner, 0.0), hessians(d_outer, mu),
            cross * rng.standard_normal((n, d_outer, d_inner)) / np.sqrt(d_inner),
            rng.standard_normal((n, d_inner)), rng.standard_normal((n, d_outer)))


def build_quadratics(sizes: dict, bench: Benchmark | None, seed: int = 2442) -> Problem:
    n_in, n_out = sizes["n_inner"], sizes["n_outer"]
    d_in, d_out = sizes["dim_inner"], sizes["dim_outer"]
    if bench is not None:  # the benchmark's Dataset: keys split from PRNGKey(2442), mu .1
        generate = bench.gen_matrices()
        keys = jax.random.split(jax.random.PRNGKey(seed), 2)
        inner = generate(n_in, d_in, d_out, 1.0, 1.0, 0.1, 0.1, keys[0])
        outer = generate(n_out, d_in, d_out, 1.0, 1.0, 0.1, 0.1, keys[1])
        generator = f"benchmark_bilevel gen_matrices @ {bench.commit[:7]}"
        # gen_matrices returns (H_θθ, H_λλ, C, b_θ, b_λ) for each side, as simulated.py uses
    else:
        inner = own_quadratic_matrices(n_in, d_in, d_out, seed)
        outer = own_quadratic_matrices(n_out, d_in, d_out, seed + 1)
        generator = "bilevel fallback (own_quadratic_matrices)"
    inner = tuple(jnp.asarray(a, jnp.float32 if not jax.config.jax_enable_x64 else None)
                  for a in inner)
    outer = tuple(jnp.asarray(a, jnp.float32 if not jax.config.jax_enable_x64 else None)
                  for a in outer)
    p, q, big_q, _, lam_star = quadratic_solution(inner, outer)
    outer_means = tuple(np.asarray(a, np.float64).mean(0) for a in outer)
    h_star = quadratic_value(lam_star, p, q, outer_means)

    def score(params, hparams):
        lam = np.asarray(hparams, np.float64)
        return float(quadratic_value(lam, p, q, outer_means) - h_star)

    info = {"sizes": sizes, "generator": generator, "h_star": float(h_star),
            "value_hessian_min_eig": float(np.linalg.eigvalsh(big_q).min())}
    return Problem("quadratics", quadratic_loss, quadratic_loss, inner, outer,
                   jnp.zeros(d_in, inner[0].dtype), -2.0 * jnp.ones(d_out, inner[0].dtype),
                   score, "suboptimality", info)


def _cross_entropy(theta, x, y):
    logits = x @ theta.reshape(x.shape[1], -1)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(y * logits, axis=-1)


DATACLEANING_REG = 0.2


def datacleaning_inner(theta, lam, x, y, index):
    """``mean_i σ(λ_i) CE_i(θ) + 0.2 ||θ||²`` (the benchmark's weighted loss)."""
    weights = jax.nn.sigmoid(lam[index])
    return jnp.mean(weights * _cross_entropy(theta, x, y)) + DATACLEANING_REG * jnp.sum(theta**2)


def datacleaning_outer(theta, lam, x, y):
    return jnp.mean(_cross_entropy(theta, x, y))


def build_datacleaning(sizes: dict, corruption: float = 0.5, seed: int = 32) -> Problem:
    from sklearn.preprocessing import StandardScaler

    from bilevel import datasets

    try:
        data = datasets.load("fashion_mnist")
    except (FileNotFoundError, OSError) as error:
        raise BenchError(f"datacleaning needs Fashion-MNIST's IDX files ({error})") from error
    rng = np.random.RandomState(seed)
    n_train, n_val, n_test = sizes["n_train"], sizes["n_val"], sizes["n_test"]
    order = rng.permutation(len(data.y_train))[:n_train + n_val]
    x = data.x_train.reshape(len(data.x_train), -1)
    x_train, x_val = x[order[:n_train]], x[order[n_train:]]
    y_train, y_val = data.y_train[order[:n_train]].copy(), data.y_train[order[n_train:]]
    corrupted = rng.rand(n_train) < corruption
    y_train[corrupted] = rng.randint(0, 10, corrupted.sum())
    scaler = StandardScaler().fit(x_train)
    x_train, x_val = scaler.transform(x_train), scaler.transform(x_val)
    x_test = scaler.transform(data.x_test.reshape(len(data.x_test), -1)[:n_test])
    y_test = data.y_test[:n_test]
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    one_hot = np.eye(10)
    inner = (jnp.asarray(x_train, dtype), jnp.asarray(one_hot[y_train], dtype),
             jnp.arange(n_train, dtype=jnp.int32))
    outer = (jnp.asarray(x_val, dtype), jnp.asarray(one_hot[y_val], dtype))
    x_test_dev, y_test_dev = jnp.asarray(x_test, dtype), jnp.asarray(y_test)

    @jax.jit
    def accuracy(theta):
        logits = x_test_dev @ theta.reshape(x_test_dev.shape[1], -1)
        return jnp.mean(jnp.argmax(logits, axis=1) == y_test_dev)

    def score(params, hparams):
        return float(accuracy(params))

    info = {"sizes": sizes, "data": "fashion_mnist (Debian IDX files)", "corruption": corruption,
            "corrupted_rows": int(corrupted.sum()), "reg": DATACLEANING_REG}
    return Problem("datacleaning", datacleaning_inner, datacleaning_outer, inner, outer,
                   jnp.zeros(x.shape[1] * 10, dtype), -2.0 * jnp.ones(n_train, dtype), score,
                   "test_accuracy", info)


def logreg_inner(theta, lam, x, y):
    """``mean_i log(1 + exp(−y_i x_iᵀθ)) + ½ Σ_k e^{λ_k} θ_k²``."""
    return jnp.mean(jax.nn.softplus(-y * (x @ theta))) + 0.5 * jnp.sum(jnp.exp(lam) * theta**2)


def logreg_outer(theta, lam, x, y):
    return jnp.mean(jax.nn.softplus(-y * (x @ theta)))


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def logreg_theta_star(lam, x, y, theta=None, iterations=30):
    """θ*(λ) by Newton's method in float64 (strongly convex: ``e^λ > 0``)."""
    theta = np.zeros(x.shape[1]) if theta is None else theta
    reg = np.exp(lam)
    for _ in range(iterations):
        margin = y * (x @ theta)
        grad = -(x.T @ (y * _sigmoid(-margin))) / len(y) + reg * theta
        weights = _sigmoid(margin) * _sigmoid(-margin)
        hess = (x.T * weights) @ x / len(y) + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        theta = theta - step
        if np.linalg.norm(step) < 1e-12 * (1 + np.linalg.norm(theta)):
            break
    return theta, hess


def logreg_value_and_grad(lam, train, val):
    """``h(λ) = F(θ*(λ))`` and ``∇h = −e^λ θ* ⊙ H⁻¹∇_θF`` (implicit function theorem)."""
    theta, hess = logreg_theta_star(lam, *train)
    xv, yv = val
    margin = yv * (xv @ theta)
    value = np.mean(np.logaddexp(0.0, -margin))
    grad_theta = -(xv.T @ (yv * _sigmoid(-margin))) / len(yv)
    return value, -np.exp(lam) * theta * np.linalg.solve(hess, grad_theta)


def build_logreg(sizes: dict, seed: int = 2442) -> Problem:
    import scipy.optimize
    from sklearn.datasets import make_classification
    from threadpoolctl import threadpool_limits

    n_train, n_val, d = sizes["n_train"], sizes["n_val"], sizes["n_features"]
    x, y = make_classification(n_samples=n_train + n_val, n_features=d, n_informative=10,
                               n_redundant=4, flip_y=0.1, class_sep=0.8, random_state=seed)
    x = x / np.abs(x).max(0)  # each feature in [-1, 1], as libsvm scales ijcnn1
    y = 2.0 * y - 1.0
    train, val = (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])
    key_theta, key_lam = jax.random.split(jax.random.PRNGKey(seed), 2)  # the benchmark's init
    params0 = jax.random.normal(key_theta, (d,))
    hparams0 = jnp.log(jax.random.uniform(key_lam, (d,)))
    # One BLAS thread: these are 22 × 22 systems, and threads cost 100× on a busy machine.
    with threadpool_limits(1):
        result = scipy.optimize.minimize(
            logreg_value_and_grad, np.asarray(hparams0, np.float64), args=(train, val),
            jac=True, method="L-BFGS-B", options={"gtol": 1e-10, "ftol": 1e-15, "maxiter": 1000})
    h_star = float(result.fun)

    def score(params, hparams):
        with threadpool_limits(1):
            value = logreg_value_and_grad(np.asarray(hparams, np.float64), train, val)[0]
        return float(value - h_star)

    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    inner = tuple(jnp.asarray(a, dtype) for a in train)
    outer = tuple(jnp.asarray(a, dtype) for a in val)
    info = {"sizes": sizes, "data": "sklearn make_classification, ijcnn1's shape",
            "h_star": h_star, "reference_grad_norm": float(np.linalg.norm(result.jac))}
    return Problem("logreg", logreg_inner, logreg_outer, inner, outer, params0.astype(dtype),
                   hparams0.astype(dtype), score, "suboptimality", info)


def build_problem(name: str, smoke: bool, bench: Benchmark | None) -> Problem:
    sizes = SIZES[name][1 if smoke else 0]
    if name == "quadratics":
        return build_quadratics(sizes, bench)
    if name == "datacleaning":
        return build_datacleaning(sizes)
    return build_logreg(sizes)


# --------------------------------------------------------------------------------------------
# Our methods, with the benchmark's settings of the same algorithm.


class OurRun(NamedTuple):
    method: Any  # a bilevel.AbstractMethod
    outer_optimizer: Any
    chunk: int  # outer steps between clock reads (the benchmark's eval_freq)
    inner_steps: int  # full-batch steps of inner_optimizer before the method (implicit-cg)
    inner_optimizer: Any = None  # an optax transformation, its state carried (implicit-cg)


def _decaying(scale: float, exponent: float):
    return lambda k: scale / (k + 1.0) ** exponent


def our_method(name: str, params: dict) -> OurRun:
    """Our method configured like the benchmark's solver of the same algorithm: the same step
    ``ρ = step_size``, outer step ``ρ / outer_ratio``, batch size, inner and Neumann step counts,
    and schedules (SOBA: both steps ``/ √(k+1)``, as the benchmark's SOBA; SABA, StocBiO,
    AmIGO: constant), and its sampling: minibatches are blocks of consecutive rows of the
    (shuffled) data, ``sampling="blocks"``, and SABA keeps a memory per block. ``saba-sample``
    is SABA with the library's defaults instead: random rows, a memory per sample."""
    from bilevel import stochastic

    rho, ratio = float(params["step_size"]), float(params["outer_ratio"])
    batch = {"inner_batch_size": int(params.get("batch_size", 64)),
             "outer_batch_size": int(params.get("batch_size", 64)), "sampling": "blocks"}
    steps = int(params.get("n_inner_steps", 10))
    chunk = int(params.get("eval_freq", 16))
    if name == "soba":
        return OurRun(stochastic.SOBA(inner_step_size=rho, step_decay=0.5, **batch),
                      optax.sgd(_decaying(rho / ratio, 0.5)), chunk, 0)
    if name == "masoba":  # not in the benchmark: SOBA's settings, averaging 0.5
        return OurRun(stochastic.MASOBA(inner_step_size=rho, averaging=0.5, step_decay=0.5,
                                        **batch), optax.sgd(_decaying(rho / ratio, 0.5)), chunk, 0)
    if name in ("saba", "saba-sample"):  # saba: a memory row per block, as the benchmark's
        if name == "saba-sample":
            batch = {**batch, "sampling": "rows"}
        memory = "batch" if name == "saba" else "sample"
        return OurRun(stochastic.SABA(inner_step_size=rho, memory=memory, **batch),
                      optax.sgd(rho / ratio), chunk, 0)
    if name == "stocbio":
        return OurRun(stochastic.StocBiO(inner_steps=steps, inner_step_size=rho,
                                         neumann_steps=int(params.get("n_shia_steps", 10)),
                                         neumann_step_size=rho, **batch),
                      optax.sgd(rho / ratio), chunk, 0)
    if name == "amigo":
        return OurRun(stochastic.AmIGO(inner_steps=steps, inner_step_size=rho, v_steps=steps,
                                       v_step_size=rho, **batch), optax.sgd(rho / ratio), chunk, 0)
    if name == "f2sa":  # the benchmark's penalty grows like k^(6/7) and z's step like σ/k^(5/7);
        # ours: σ_k = σ_0 + δ k and every step / (k+1)^(4/7), the outer step's schedule.
        return OurRun(stochastic.F2SA(inner_steps=steps, inner_step_size=rho,
                                      penalty=float(params.get("lmbda0", 1.0)),
                                      penalty_increment=float(params.get("delta_lmbda", 0.1)),
                                      step_decay=4 / 7, **batch),
                      optax.sgd(_decaying(rho / ratio, 4 / 7)), chunk, 0)
    if name == "implicit-cg":  # full batch, the settings of experiments/datacleaning_scale.py:
        # 10 Adam(1e-2) steps on θ (its state carried), warm-started CG(10) for v, Adam(0.3) on
        # λ. Adam, not SGD at the benchmark's step sizes: SGD(ρ / outer_ratio) = SGD(100) on
        # data cleaning's weights, and GD on θ at 1/L(λ₀) once L grows with λ, both diverged.
        import hvp
        from bilevel.trainer import ImplicitMethod

        return OurRun(ImplicitMethod(solver=hvp.CG(maxiter=10), warm_start=True),
                      optax.adam(0.3), 1, 10, optax.adam(1e-2))
    raise ValueError(f"not one of our methods: {name!r}")


_CHUNKS: dict = {}


def _our_chunk(problem: Problem, name: str, params: dict, run: OurRun):
    """One compiled chunk per (losses, method, settings): seeds after the first reuse it."""
    key = (problem.inner_loss, problem.outer_loss, name, json.dumps(params, sort_keys=True))
    if key not in _CHUNKS:
        _CHUNKS[key] = _make_chunk(problem, run)
    return _CHUNKS[key]


def _make_chunk(problem: Problem, run: OurRun):
    """The jitted ``run.chunk`` outer steps ``(carry, inner_args, outer_args) -> carry``; data
    go in as arguments (not closed-over constants)."""
    from bilevel.trainer import InnerProblem

    def step(carry, inner_args, outer_args):
        params, hparams, state, opt_state, inner_state, key = carry
        key, method_key = jax.random.split(key)
        if run.inner_steps:
            def inner_step(c, _):
                p, s = c
                updates, s = run.inner_optimizer.update(
                    jax.grad(problem.inner_loss)(p, hparams, *inner_args), s, p)
                return (optax.apply_updates(p, updates), s), None
            (params, inner_state), _ = jax.lax.scan(inner_step, (params, inner_state), None,
                                                    length=run.inner_steps)
        inner = InnerProblem(problem.inner_loss, problem.outer_loss, optax.identity(),
                             inner_args, outer_args)
        direction, params, state, stats = run.method.hypergrad(inner, params, hparams, state,
                                                               method_key)
        updates, new_opt_state = run.outer_optimizer.update(direction, opt_state, hparams)
        new_hparams = optax.apply_updates(hparams, updates)
        ok = stats["finite"] & jnp.all(jnp.isfinite(new_hparams))
        hparams = jnp.where(ok, new_hparams, hparams)
        opt_state = jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new_opt_state,
                                           opt_state)
        return params, hparams, state, opt_state, inner_state, key

    def chunk(carry, inner_args, outer_args):
        return jax.lax.fori_loop(0, run.chunk,
                                 lambda _, c: step(c, inner_args, outer_args), carry)

    # The carry is donated: SABA's memories (27 MB on the quadratics) are updated in place, not
    # copied at every call.
    return jax.jit(chunk, donate_argnums=0)


# --------------------------------------------------------------------------------------------
# Timed runs: a curve of (step, seconds, metric) under a wall-clock budget.


class Clock:
    """Seconds of work: the clock stops while the iterates are scored."""

    def __init__(self, budget: float):
        self.budget, self.start, self.paused = budget, time.perf_counter(), 0.0
        self.next_eval = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def due(self, elapsed: float) -> bool:
        return elapsed >= self.next_eval or elapsed >= self.budget

    def scored(self, pause: float, elapsed: float) -> None:
        self.paused += pause
        # dense early (log-time plots), at most ~40 points in all
        self.next_eval = elapsed + min(max(0.5 * elapsed, self.budget / 400), self.budget / 40)


def _record(points: list, clock: Clock, problem: Problem, step: int, params, hparams) -> bool:
    """Score the iterate (clock stopped) and append ``[step, seconds, metric]``; False when it
    is not finite (the run diverged and stops)."""
    elapsed = clock.elapsed()
    start = time.perf_counter()
    value = problem.score(params, hparams) if np.all(np.isfinite(np.asarray(hparams))) else math.nan
    clock.scored(time.perf_counter() - start, elapsed)
    points.append([int(step), round(elapsed, 6), value])
    return math.isfinite(value)


def run_ours(problem: Problem, name: str, params: dict, seed: int, budget: float) -> list:
    run = our_method(name, params)
    chunk = _our_chunk(problem, name, params, run)
    from bilevel.trainer import InnerProblem

    inner = InnerProblem(problem.inner_loss, problem.outer_loss, optax.identity(),
                         problem.inner_args, problem.outer_args)

    def initial():
        params0, hparams0 = jnp.copy(problem.params0), jnp.copy(problem.hparams0)
        state = run.method.init_state(inner, params0, hparams0)
        inner_state = run.inner_optimizer.init(params0) if run.inner_optimizer else ()
        carry = (params0, hparams0, state, run.outer_optimizer.init(hparams0), inner_state)
        # one buffer per leaf (a state may hold one zeros array twice): the chunk donates them
        return (*jax.tree_util.tree_map(jnp.copy, carry), jax.random.key(seed))

    jax.block_until_ready(chunk(initial(), problem.inner_args, problem.outer_args))  # compile
    points: list = []
    clock = Clock(budget)
    carry = jax.block_until_ready(initial())
    step = 0
    _record(points, clock, problem, step, carry[0], carry[1])
    while True:
        carry = jax.block_until_ready(chunk(carry, problem.inner_args, problem.outer_args))
        step += run.chunk
        elapsed = clock.elapsed()
        if clock.due(elapsed):
            if not _record(points, clock, problem, step, carry[0], carry[1]):
                break
        if elapsed >= budget:
            break
    return points


def their_functions(problem: Problem) -> tuple[Callable, Callable]:
    """The losses in the benchmark's convention ``f(inner_var, outer_var, start, batch_size)``,
    rows ``start:start+batch_size`` of the arrays (closed over, as its datasets do)."""
    def convention(loss, args):
        @jax.jit
        def whole(inner_var, outer_var):
            return loss(inner_var, outer_var, *args)

        def f(inner_var, outer_var, start=0, batch_size=1):
            batch = [jax.lax.dynamic_slice_in_dim(a, start, batch_size, axis=0) for a in args]
            return loss(inner_var, outer_var, *batch)

        return jax.jit(f, static_argnames=("batch_size",)), whole

    return (convention(problem.inner_loss, problem.inner_args)[0],
            convention(problem.outer_loss, problem.outer_args)[0])


class _Objective:
    """What benchopt's ``BaseSolver._set_objective`` reads of an objective."""

    sampling_strategy = None

    def __init__(self, problem: Problem):
        self.problem = problem
        self.f_inner, self.f_outer = their_functions(problem)

    def get_objective(self) -> dict:
        p = self.problem
        return dict(f_inner=self.f_inner, f_outer=self.f_outer,
                    n_inner_samples=int(p.inner_args[0].shape[0]),
                    n_outer_samples=int(p.outer_args[0].shape[0]),
                    inner_var0=jnp.copy(p.params0), outer_var0=jnp.copy(p.hparams0))


def run_theirs(problem: Problem, bench: Benchmark, solver_name: str, params: dict, seed: int,
               budget: float) -> list:
    """The benchmark's solver through benchopt's API: ``get_instance(**params)``,
    ``_set_objective`` (which warms up, compiling its epoch), then ``run(callback)``, the
    callback called every ``eval_freq`` outer steps."""
    cls = bench.solver_class(solver_name)
    known = {k: v for k, v in params.items() if k in cls.parameters}
    known["random_state"] = seed
    solver = cls.get_instance(**known)
    solver._set_objective(_Objective(problem))
    eval_freq = int(known.get("eval_freq", cls.parameters["eval_freq"][0]))
    points: list = []
    clock: Clock | None = None
    state = {"step": 0, "stop": False}

    def callback() -> bool:
        jax.block_until_ready((solver.inner_var, solver.outer_var))
        if clock is None or state["stop"]:
            return False
        if points:
            state["step"] += eval_freq
        elapsed = clock.elapsed()
        if clock.due(elapsed) or not points:
            if not _record(points, clock, problem, state["step"], solver.inner_var,
                           solver.outer_var):
                return False
        return elapsed < budget

    clock = Clock(budget)
    solver.run(callback)
    return points


# --------------------------------------------------------------------------------------------
# The study: every (method, seed), written as it finishes; the summary tables and the plot.
def machine_info(bench: Benchmark | None) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "device": str(jax.devices()[0].device_kind), "x64": bool(jax.config.jax_enable_x64),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "load_average": [round(x, 2) for x in os.getloadavg()]}
    if bench is not None:
        import benchopt
        info.update(benchopt=benchopt.__version__, benchmark_commit=bench.commit)
    return info


def run_study(config: StudyConfig, out: Path, on_run: Callable[[str], None] | None = None,
              bench: Benchmark | None = None) -> tuple[list[dict], Problem, dict]:
    """Every (method, seed) run of ``config`` not already in the runs file, each appended to it
    as it finishes (so a killed study resumes); returns all the runs, the problem and the facts
    of the machine."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if bench is None and any(METHODS[m].side == "benchmark" for m in config.methods):
        bench = Benchmark(Path(config.benchmark_dir) if config.benchmark_dir else None)
    elif bench is None and config.benchmark_dir:  # ours alone: still its generator and configs
        folder = Path(config.benchmark_dir).expanduser()
        if (folder / "solvers" / "soba.py").is_file():
            bench = Benchmark(folder, solvers=False)
    problem = build_problem(config.problem, config.smoke, bench)
    path = runs_file(out, config)
    runs = [r for r in load_runs(path) if r["budget"] == config.budget]
    done = {(r["method"], r["seed"]) for r in runs}
    for seed in range(1, config.seeds + 1):
        for name in config.methods:
            if (name, seed) in done:
                if on_run:
                    on_run(f"{name} seed {seed}: already in {path.name}")
                continue
            spec = METHODS[name]
            params, source = step_params(config.problem, spec.solver, bench)
            if spec.side == "ours":
                points = run_ours(problem, name, params, seed, config.budget)
            else:
                points = run_theirs(problem, bench, spec.solver, params, seed, config.budget)
            record = {"problem": config.problem, "method": name, "side": spec.side,
                      "seed": seed, "budget": config.budget,
                      "load_average": round(os.getloadavg()[0], 2), "params": params,
                      "params_source": source, "points": points}
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            runs.append(record)
            if on_run:
                final = points[-1] if points else [0, 0.0, math.nan]
                on_run(f"{name} seed {seed}: {final[0]} steps, {problem.metric} {final[2]:.4g}")
    runs = [r for r in runs if r["method"] in config.methods and r["seed"] <= config.seeds]
    return runs, problem, machine_info(bench)


# --------------------------------------------------------------------------------------------
# Summaries.


def _better(metric: str) -> Callable[[float, float], bool]:
    """``reached(value, target)``."""
    if metric == "test_accuracy":
        return lambda value, target: value >= target
    return lambda value, target: value <= target


def first_reach(points: list, target: float, metric: str) -> tuple[float, float]:
    """(steps, seconds) of the first point at or past ``target``; ``(inf, inf)`` if none."""
    reached = _better(metric)
    for step, seconds, value in points:
        if math.isfinite(value) and reached(value, target):
            return step, seconds
    return math.inf, math.inf


def _final(points: list) -> float:
    """The last point's metric (nan for a run that diverged)."""
    return points[-1][2] if points else math.nan


def summarize(runs: list[dict], metric: str) -> tuple[list[dict], dict]:
    """One row per method: final metric (median and quartiles over seeds), steps and seconds to
    the target (the best benchmark solver's median final value; without the benchmark, the best
    method's), median over seeds (inf when under half of the seeds reach it); and SOBA/SABA
    paired with the benchmark's."""
    methods = list(dict.fromkeys(r["method"] for r in runs))
    finals = {m: [_final(r["points"]) for r in runs if r["method"] == m] for m in methods}
    medians = {m: float(np.nanmedian(v)) if np.isfinite(v).any() else math.nan
               for m, v in finals.items()}
    pool = [m for m in methods if METHODS[m].side == "benchmark"] or methods
    pool = [m for m in pool if math.isfinite(medians[m])]
    best = (max if metric == "test_accuracy" else min)(pool, key=medians.get) if pool else None
    target = medians[best] if best else math.nan
    rows = []
    for m in methods:
        reach = [first_reach(r["points"], target, metric) for r in runs if r["method"] == m]
        rows.append({"method": m, "side": METHODS[m].side, "seeds": len(finals[m]),
                     "final_median": medians[m], "final_q25": _q(finals[m], 25),
                     "final_q75": _q(finals[m], 75),
                     "steps_per_s": _rate(runs, m),
                     "steps_to_target": _median_reach([s for s, _ in reach]),
                     "time_to_target": _median_reach([t for _, t in reach])})
    pairs = {}
    for ours in ("soba", "saba", "stocbio", "amigo", "f2sa"):
        theirs = f"benchopt-{ours}"
        if ours in medians and theirs in medians:
            # the worse of both methods' worst seeds: every run of both reaches it
            worst = [v for m in (ours, theirs) for v in finals[m] if math.isfinite(v)]
            if not worst:
                continue
            pair_target = (min if metric == "test_accuracy" else max)(worst)
            stats = {}
            for m in (ours, theirs):
                reach = [first_reach(r["points"], pair_target, metric) for r in runs
                         if r["method"] == m]
                stats[m] = (_median_reach([s for s, _ in reach]),
                            _median_reach([t for _, t in reach]))
            pairs[ours] = {"target": pair_target, "ours": stats[ours], "theirs": stats[theirs]}
    return rows, {"target": target, "target_method": best, "pairs": pairs}


def _q(values: list, q: float) -> float:
    values = [v for v in values if math.isfinite(v)]
    return float(np.percentile(values, q)) if values else math.nan


def _median_reach(values: list) -> float:
    """The median over seeds, counting unreached as inf (so inf when half or more miss)."""
    return float(np.median(np.asarray(values, float))) if values else math.inf


def _rate(runs: list[dict], method: str) -> float:
    rates = [r["points"][-1][0] / r["points"][-1][1] for r in runs
             if r["method"] == method and r["points"] and r["points"][-1][1] > 0]
    return float(np.median(rates)) if rates else math.nan


def _fmt(value: float, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "not reached"
    return format(value, spec)


def markdown_table(rows: list[dict], summary: dict, metric: str) -> str:
    """The per-method table and, where both implementations ran, the same-algorithm pairs."""
    lines = ["| method | side | final median [q25, q75] | steps/s | steps to target | "
             "time to target (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['side']} | {_fmt(r['final_median'], '.4g')} "
                     f"[{_fmt(r['final_q25'], '.3g')}, {_fmt(r['final_q75'], '.3g')}] | "
                     f"{_fmt(r['steps_per_s'], '.0f')} | {_fmt(r['steps_to_target'], '.0f')} | "
                     f"{_fmt(r['time_to_target'], '.2f')} |")
    if summary["pairs"]:
        lines += ["", "Same algorithm, both implementations, to the worst final value of any "
                  "of their runs (so every seed of both reaches it):", "",
                  "| algorithm | target | steps ours / theirs | time ours / theirs (s) |",
                  "|---|---|---|---|"]
        for name, pair in summary["pairs"].items():
            (so, to), (st, tt) = pair["ours"], pair["theirs"]
            lines.append(f"| {name} | {_fmt(pair['target'], '.4g')} | {_fmt(so, '.0f')} / "
                         f"{_fmt(st, '.0f')} | {_fmt(to, '.2f')} / {_fmt(tt, '.2f')} |")
    return "\n".join(lines)


def markdown(config: StudyConfig, problem: Problem, runs: list[dict], rows: list[dict],
             summary: dict, info: dict) -> str:
    metric = problem.metric
    lines = [f"# {config.problem}: our stochastic bilevel methods against benchmark_bilevel",
             "", f"{config.seeds} seeds, {config.budget:g} s of wall clock per run (scoring and "
             f"compilation excluded on both sides); metric: {metric}"
             f"{' (h(λ) − h*)' if metric == 'suboptimality' else ''}. Target: "
             f"{_fmt(summary['target'], '.4g')}, the median final value of "
             f"{summary['target_method']}. Steps and seconds to a target are medians over the "
             f"seeds (not reached: half or more of the seeds never reached it).", "",
             markdown_table(rows, summary, metric), "",
             "Problem: " + json.dumps(problem.info), "", "Machine: " + json.dumps(info),
             "", _loads(runs), ""]
    return "\n".join(lines)


def _loads(runs: list[dict]) -> str:
    """The 1-minute load average each method's runs ended at (runs of one table may come from
    different sessions: the study resumes), or that it was not recorded."""
    parts = []
    for method in dict.fromkeys(r["method"] for r in runs):
        loads = [r["load_average"] for r in runs if r["method"] == method and "load_average" in r]
        parts.append(f"{method} {min(loads):g}–{max(loads):g}" if loads else
                     f"{method} not recorded")
    return "Load average (1 min) at the end of each method's runs: " + "; ".join(parts) + "."


def write_outputs(config: StudyConfig, out: Path, runs: list[dict], problem: Problem,
                  info: dict) -> tuple[list[dict], dict, list[Path]]:
    out = Path(out)
    stem = f"{config.problem}{'_smoke' if config.smoke else ''}"
    rows, summary = summarize(runs, problem.metric)
    text = markdown(config, problem, runs, rows, summary, info)
    settings = {r["method"]: (r["params"], r["params_source"]) for r in runs}
    text += "\n".join(["", "Settings per method:", ""] + [
        f"- {m}: {json.dumps(p)} ({s})" for m, (p, s) in settings.items()]) + "\n"
    (out / f"{stem}.md").write_text(text)
    with (out / f"{stem}_summary.csv").open("w") as f:
        f.write(",".join(rows[0]) + "\n")
        for r in rows:
            f.write(",".join(str(v) for v in r.values()) + "\n")
    with (out / f"{stem}_curves.csv").open("w") as f:
        f.write("problem,method,side,seed,step,seconds,metric\n")
        for r in runs:
            for step, seconds, value in r["points"]:
                f.write(f"{r['problem']},{r['method']},{r['side']},{r['seed']},{step},"
                        f"{seconds},{value}\n")
    plot(runs, problem, summary, out / f"{stem}.png", config)
    return rows, summary, [out / f"{stem}{s}" for s in (".md", "_summary.csv", "_curves.csv",
                                                        ".png")]


def median_curve(runs: list[dict], grid: np.ndarray) -> tuple[np.ndarray, ...]:
    """Median and quartiles over seeds of the metric carried forward onto a time grid."""
    curves = []
    for r in runs:
        t = np.array([p[1] for p in r["points"]])
        v = np.array([p[2] for p in r["points"]], float)
        idx = np.searchsorted(t, grid, side="right") - 1
        curves.append(np.where(idx >= 0, v[np.clip(idx, 0, None)], np.nan))
    stacked = np.array(curves)
    with np.errstate(all="ignore"):
        return tuple(np.nanpercentile(stacked, q, axis=0) for q in (50, 25, 75))


def plot(runs: list[dict], problem: Problem, summary: dict, path: Path,
         config: StudyConfig) -> None:
    import warnings

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    grid = np.geomspace(1e-3 * config.budget, config.budget, 200)
    methods = list(dict.fromkeys(r["method"] for r in runs))
    cmap = plt.get_cmap("tab10")
    for m in methods:
        base = m.removeprefix("benchopt-")
        color = cmap(OURS.index(base) % 10) if base in OURS else "k"
        style = "--" if METHODS[m].side == "benchmark" else "-"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mid, low, high = median_curve([r for r in runs if r["method"] == m], grid)
        ax.plot(grid, mid, style, color=color, label=m)
        ax.fill_between(grid, low, high, color=color, alpha=0.15)
    if math.isfinite(summary["target"]):
        ax.axhline(summary["target"], color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    if problem.metric == "suboptimality":
        ax.set_yscale("log")
        ax.set_ylabel("h(λ) − h*")
    else:
        ax.set_ylabel("test accuracy")
    ax.set_xlabel("wall-clock seconds (scoring excluded)")
    ax.set_title(f"{config.problem}: median over {config.seeds} seeds, quartiles shaded; "
                 f"dashed: benchmark_bilevel", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
