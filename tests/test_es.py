"""Zeroth-order hypergradients: ES against closed-form gradients within their statistical error,
truncated PES against ``jax.grad`` of the full unroll (and truncated BPTT visibly biased), honest
``finite`` flags, keys, ``jit``/``vmap``, and trace-time errors.

Statistical assertions use a fixed key, so they are deterministic; the margins (5 standard
errors per component) would fail by chance with probability below 1e-4 for a fresh key.
Each random-number call site costs about a second of XLA compile time on the CPU, so the suite
compiles a handful of module-level jitted functions (vmapped over replicate keys) and reuses
them; problem knobs that would otherwise need a new function are passed as ``args``.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_spd
from jax.flatten_util import ravel_pytree

from bilevel.es import ESInfo, PESState, es_hypergrad, pes_hypergrad, pes_init

# --------------------------------------------------------------------------------------------
# ES on a quadratic 0.5 λᵀAλ + bᵀλ, λ a pytree of two leaves (7 numbers).

HPARAMS = {"a": jnp.array([0.3, -1.2, 0.8]), "b": jnp.array([[0.5, 1.0], [-0.4, 2.0]])}
DIM = 7
A = random_spd(3, DIM, condition=5.0)
B = jnp.linspace(-1.0, 1.0, DIM)
REPLICATES = 16
SMALL, LARGE = 16, 1024
SIGMA = {True: 0.01, False: 0.1}  # non-antithetic: large enough that its O(σ) term matters


def flat(tree):
    return ravel_pytree(tree)[0]


def quadratic(hparams, threshold):
    """The quadratic, plus NaN wherever ``λ_a[0] > threshold`` (``threshold=inf``: never)."""
    x = flat(hparams)
    poison = jnp.where(hparams["a"][0] > threshold, jnp.nan, 0.0)
    return 0.5 * x @ A @ x + B @ x + poison


TRUE_GRAD = A @ flat(HPARAMS) + B


@functools.cache
def es_batch(population, antithetic):
    """Jitted ES over a batch of keys: ``(hparams, keys, threshold) -> (grads, infos)``."""

    def one(hparams, key, threshold):
        return es_hypergrad(quadratic, hparams, key, population=population,
                            sigma=SIGMA[antithetic], args=(threshold,), antithetic=antithetic)

    return jax.jit(jax.vmap(one, in_axes=(None, 0, None)))


def keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def flat_rows(grads):
    return jax.vmap(flat)(grads)


def per_sample_variance(antithetic):
    """Variance of one direction's contribution to component j.

    Antithetic: the pair difference is exactly ``2σ εᵀg``, so the variance of ``(εᵀg) ε_j`` is
    ``||g||² + g_j²`` (Isserlis). Baseline-subtracted: ``(f(λ+σε) − f(λ))/σ · ε_j`` adds
    ``(σ/2) εᵀAε ε_j``; its variance is estimated from 200,000 draws.
    """
    g = np.asarray(TRUE_GRAD)
    if antithetic:
        return g @ g + g**2
    z = np.random.default_rng(0).standard_normal((200_000, DIM))
    sigma, a = SIGMA[False], np.asarray(A)
    difference = z @ g + 0.5 * sigma * np.einsum("ni,ij,nj->n", z, a, z)
    return np.var(difference[:, None] * z, axis=0)


def directions(population, antithetic):
    return population // 2 if antithetic else population


@pytest.mark.parametrize("antithetic", [True, False], ids=["antithetic", "baseline"])
def test_es_matches_quadratic_gradient_within_standard_error(antithetic):
    grads, info = es_batch(LARGE, antithetic)(HPARAMS, keys(REPLICATES), jnp.inf)
    assert bool(jnp.all(info.finite)) and bool(jnp.all(info.population == LARGE))
    samples = directions(LARGE, antithetic) * REPLICATES
    standard_error = np.sqrt(per_sample_variance(antithetic) / samples)
    z_scores = (np.asarray(flat_rows(grads).mean(0)) - np.asarray(TRUE_GRAD)) / standard_error
    assert np.all(np.abs(z_scores) < 5.0), z_scores


@pytest.mark.parametrize("antithetic", [True, False], ids=["antithetic", "baseline"])
def test_es_error_shrinks_with_population_as_predicted(antithetic):
    """Mean squared error over replicates ≈ Σ_j var_j / directions, so 64× smaller at 1024."""
    predicted_per_direction = per_sample_variance(antithetic).sum()
    errors = {}
    for population in (SMALL, LARGE):
        grads, _ = es_batch(population, antithetic)(HPARAMS, keys(REPLICATES), jnp.inf)
        errors[population] = float(jnp.mean(jnp.sum((flat_rows(grads) - TRUE_GRAD) ** 2, 1)))
        predicted = predicted_per_direction / directions(population, antithetic)
        assert 0.5 < errors[population] / predicted < 2.0, (population, errors, predicted)
    assert errors[LARGE] < errors[SMALL] / 16


def test_es_info_reports_the_population_losses():
    grads, info = es_batch(SMALL, True)(HPARAMS, keys(REPLICATES), jnp.inf)
    value = quadratic(HPARAMS, jnp.inf)
    # E L(λ + σε) = L(λ) + σ²/2 tr A; the spread of the losses is about σ ||g||.
    np.testing.assert_allclose(info.outer_loss, value + 0.5 * SIGMA[True] ** 2 * jnp.trace(A),
                               rtol=1e-3)
    spread = SIGMA[True] * jnp.linalg.norm(TRUE_GRAD)
    assert bool(jnp.all((info.outer_loss_std > 0.3 * spread) & (info.outer_loss_std < 3 * spread)))
    assert info.population.dtype == jnp.int32 and isinstance(info, ESInfo)


@pytest.mark.parametrize("antithetic", [True, False], ids=["antithetic", "baseline"])
@pytest.mark.parametrize("threshold", [0.3 + 0.005, 0.3 - 1e-9], ids=["some", "baseline-too"])
def test_es_nonfinite_loss_is_flagged_and_gradient_is_nan(antithetic, threshold):
    """``λ_a[0] = 0.3``: some perturbed losses are NaN (and, below 0.3, L(λ) as well)."""
    grads, info = es_batch(SMALL, antithetic)(HPARAMS, keys(REPLICATES), threshold)
    assert not bool(jnp.any(info.finite))
    assert bool(jnp.all(jnp.isnan(flat_rows(grads))))


def test_es_keys_determine_the_estimate_and_vmap_matches_single_calls():
    batch = keys(REPLICATES, seed=7)[jnp.arange(REPLICATES).at[1].set(0)]  # rows 0, 1 alike
    grads, infos = es_batch(SMALL, True)(HPARAMS, batch, jnp.inf)
    rows = flat_rows(grads)
    np.testing.assert_array_equal(rows[0], rows[1])
    assert float(jnp.max(jnp.abs(rows[0] - rows[2]))) > 1e-3

    # sigma is a traced keyword here: it cannot be checked while tracing, and need not be.
    single = jax.jit(functools.partial(es_hypergrad, quadratic, population=SMALL))
    for index in (0, 2):
        grad, info = single(HPARAMS, batch[index], sigma=SIGMA[True], args=(jnp.inf,))
        np.testing.assert_allclose(flat(grad), rows[index], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(info.outer_loss, infos.outer_loss[index], rtol=1e-12)
    moved = jax.tree_util.tree_map(lambda x: x + 0.1, HPARAMS)
    single(moved, batch[3], sigma=0.5, args=(2.0,))
    assert single._cache_size() == 1  # new keys and values, same shapes: no recompilation


def test_es_eager_in_float32_with_a_legacy_key():
    hparams = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), HPARAMS)
    grad, info = es_hypergrad(lambda h: jnp.sum(flat(h) ** 2), hparams, jax.random.PRNGKey(1),
                              population=4)
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grad))
    assert bool(info.finite) and int(info.population) == 4


# --------------------------------------------------------------------------------------------
# Truncated PES on an inner problem unrolled for T = N·K steps:
#   θ_{t+1} = θ_t − coupling · η e^{λ_rate} (θ_t − λ_pull),   loss_t = ||θ_{t+1} − target||²,
# plus ``noise · N(0, 1)`` from the data key and NaN where ``λ_pull[0] > threshold``.

ETA, K, N = 0.3, 2, 5
TARGET = jnp.array([1.0, -2.0, 0.5])
THETA0 = jnp.array([0.5, 0.5, -1.0])
LAMBDA = {"pull": jnp.array([0.3, -0.4, 1.0]), "rate": jnp.array(0.0)}
PES_SIGMA = 0.01
PES_REPLICATES, PES_POPULATION = 32, 256
CLEAN = (1.0, 0.0, jnp.inf)  # coupling, noise, threshold


def inner_steps(hparams, theta, coupling=1.0):
    """K inner steps from θ; returns the new θ and the loss summed over them."""
    loss = 0.0
    for _ in range(K):
        theta = theta - coupling * ETA * jnp.exp(hparams["rate"]) * (theta - hparams["pull"])
        loss = loss + jnp.sum((theta - TARGET) ** 2)
    return theta, loss


def unroll(hparams, theta, key, coupling, noise, threshold):
    theta, loss = inner_steps(hparams, theta, coupling)
    loss = loss + noise * jax.random.normal(key, (), loss.dtype)
    return theta, loss + jnp.where(hparams["pull"][0] > threshold, jnp.nan, 0.0)


def total_loss(hparams, truncated_backprop=False):
    """The loss summed over all N·K steps; truncated: no gradient across truncations."""
    theta, total = THETA0, 0.0
    for _ in range(N):
        if truncated_backprop:
            theta = jax.lax.stop_gradient(theta)
        theta, loss = inner_steps(hparams, theta)
        total = total + loss
    return total


def inner_init(key):
    """θ₀ is fixed (the reference gradient is for it); ``tag`` shows which key a particle got."""
    return {"theta": THETA0, "step": jnp.int32(0), "tag": jax.random.normal(key, (2,))}


def particle_unroll(hparams, state, key, *knobs):
    theta, loss = unroll(hparams, state["theta"], key, *knobs)
    return dict(state, theta=theta, step=state["step"] + K), loss


pes_init_batch = jax.jit(jax.vmap(
    lambda key: pes_init(inner_init, LAMBDA, key, PES_POPULATION)))
pes_step_batch = jax.jit(jax.vmap(
    lambda state, key, knobs: pes_hypergrad(particle_unroll, LAMBDA, state, key,
                                            sigma=PES_SIGMA, args=knobs),
    in_axes=(0, 0, None)))


def run_pes(knobs=CLEAN, seed=0):
    """Sum of the PES estimates over the N truncations, for each replicate population."""
    state = pes_init_batch(keys(PES_REPLICATES, seed))
    total, infos = 0.0, []
    for truncation in range(N):
        grad, state, info = pes_step_batch(state, keys(PES_REPLICATES, 100 * seed + truncation
                                                       + 1), knobs)
        total = total + flat_rows(grad)
        infos.append(info)
    return total, state, infos


def test_pes_is_unbiased_where_truncated_backprop_is_not():
    true = flat(jax.jit(jax.grad(total_loss))(LAMBDA))
    truncated = flat(jax.jit(jax.grad(functools.partial(total_loss, truncated_backprop=True)))(
        LAMBDA))
    sums, state, infos = run_pes()
    assert all(bool(jnp.all(info.finite)) for info in infos)
    assert bool(jnp.all(state.truncations == N))
    assert bool(jnp.all(state.inner_state["step"] == N * K))
    standard_error = sums.std(0) / np.sqrt(PES_REPLICATES)
    pes_z = (sums.mean(0) - true) / standard_error
    truncated_z = (truncated - true) / standard_error
    assert bool(jnp.all(jnp.abs(pes_z) < 5.0)), pes_z
    assert float(jnp.max(jnp.abs(truncated_z))) > 20.0, truncated_z
    # The statistical error is small against the gradient: the comparison has teeth.
    assert float(jnp.linalg.norm(standard_error)) < 0.05 * float(jnp.linalg.norm(true))
    assert pes_step_batch._cache_size() == 1  # N truncations, one compilation


def test_pes_init_pairs_share_inner_state_and_start_at_zero():
    state = pes_init_batch(keys(PES_REPLICATES))
    half = PES_POPULATION // 2
    tag = state.inner_state["tag"]
    assert tag.shape == (PES_REPLICATES, PES_POPULATION, 2) and isinstance(state, PESState)
    np.testing.assert_array_equal(tag[:, :half], tag[:, half:])
    assert float(jnp.min(jnp.abs(tag[:, 0] - tag[:, 1]))) > 0  # different pairs, different keys
    assert all(float(jnp.max(jnp.abs(x))) == 0 and x.shape[1] == PES_POPULATION
               for x in jax.tree_util.tree_leaves(state.perturbation_sum))
    assert bool(jnp.all(state.truncations == 0)) and state.truncations.dtype == jnp.int32


def test_pes_pairs_share_the_data_key():
    """A loss that ignores λ but depends on the data key: pairs cancel exactly, pairs differ."""
    state = pes_init_batch(keys(PES_REPLICATES))
    grad, state, info = pes_step_batch(state, keys(PES_REPLICATES, 1), (0.0, 1.0, jnp.inf))
    np.testing.assert_allclose(flat_rows(grad), 0.0, atol=1e-12)
    assert bool(jnp.all(info.outer_loss_std > 0.5)) and bool(jnp.all(info.finite))
    # ξ accumulated antithetically: the second half is minus the first.
    xi = state.perturbation_sum["pull"]
    np.testing.assert_array_equal(xi[:, :PES_POPULATION // 2], -xi[:, PES_POPULATION // 2:])


def test_pes_nonfinite_loss_is_flagged_and_gradient_is_nan():
    state = pes_init_batch(keys(PES_REPLICATES))
    grad, _, info = pes_step_batch(state, keys(PES_REPLICATES, 1), (1.0, 0.0, 0.3))
    assert not bool(jnp.any(info.finite))
    assert bool(jnp.all(jnp.isnan(flat_rows(grad))))


# --------------------------------------------------------------------------------------------
# Bad inputs fail at trace time, naming the function and the argument. Each case runs eagerly
# and through ``jax.jit(...).lower`` with hparams and key traced.

KEY = jax.random.key(0)
INTEGER_HPARAMS = {"a": jnp.ones(3), "b": jnp.ones((2, 2), jnp.int32)}
ES = "bilevel.es_hypergrad: "
PES_INIT = "bilevel.pes_init: "
PES = "bilevel.pes_hypergrad: "


def loss2(hparams):
    return jnp.sum(flat(hparams) ** 2)


def good_state(population=4):
    return pes_init(inner_init, LAMBDA, KEY, population)


def clean_unroll(hparams, state, key):
    return particle_unroll(hparams, state, key, *CLEAN)


def replace(state, **changes):
    return state._replace(**changes)


def case(name, fn, error, match):
    """``fn(hparams, key)`` must raise ``error`` matching ``match``."""
    return pytest.param(fn, error, match, id=name)


ERROR_CASES = [
    # --- es_hypergrad
    case("es-population-1", lambda h, k: es_hypergrad(loss2, h, k, population=1), ValueError,
         re.escape(ES + "population must be an even integer >= 2 (antithetic pairs), got 1")),
    case("es-population-odd", lambda h, k: es_hypergrad(loss2, h, k, population=5), ValueError,
         re.escape(ES + "population must be an even integer >= 2 (antithetic pairs), got 5")),
    case("es-population-1-baseline",
         lambda h, k: es_hypergrad(loss2, h, k, population=1, antithetic=False), ValueError,
         re.escape(ES + "population must be an integer >= 2, got 1")),
    case("es-population-float", lambda h, k: es_hypergrad(loss2, h, k, population=8.0),
         TypeError, re.escape(ES + "population must be a Python int (static under jit), got 8.0")),
    case("es-population-bool", lambda h, k: es_hypergrad(loss2, h, k, population=True),
         TypeError, re.escape(ES + "population must be a Python int")),
    case("es-sigma-zero", lambda h, k: es_hypergrad(loss2, h, k, sigma=0.0), ValueError,
         re.escape(ES + "sigma must be a finite number > 0, got 0.0")),
    case("es-sigma-negative", lambda h, k: es_hypergrad(loss2, h, k, sigma=-0.1), ValueError,
         re.escape(ES + "sigma must be a finite number > 0, got -0.1")),
    case("es-sigma-nan", lambda h, k: es_hypergrad(loss2, h, k, sigma=float("nan")), ValueError,
         re.escape(ES + "sigma must be a finite number > 0, got nan")),
    case("es-sigma-inf", lambda h, k: es_hypergrad(loss2, h, k, sigma=jnp.inf), ValueError,
         re.escape(ES + "sigma must be a finite number > 0, got inf")),
    case("es-sigma-vector", lambda h, k: es_hypergrad(loss2, h, k, sigma=jnp.ones(2)), ValueError,
         re.escape(ES + "sigma must be a scalar, got an array of shape (2,)")),
    case("es-integer-hparams",
         lambda h, k: es_hypergrad(loss2, {"a": h["a"], "b": h["b"].astype(jnp.int32)}, k),
         TypeError, re.escape(ES + "hparams leaf ['b'] has dtype int32; expected a floating")),
    case("es-empty-hparams", lambda h, k: es_hypergrad(lambda _: 0.0, {}, k), ValueError,
         re.escape(ES + "hparams is an empty pytree")),
    case("es-nonscalar-loss", lambda h, k: es_hypergrad(lambda q: flat(q), h, k), TypeError,
         re.escape(ES + "meta_loss must return a scalar, got an array of shape (7,)")),
    case("es-integer-loss", lambda h, k: es_hypergrad(lambda q: jnp.sum(q["a"] > 0), h, k),
         TypeError, re.escape(ES + "meta_loss must return a floating-point scalar, got int")),
    case("es-pytree-loss", lambda h, k: es_hypergrad(lambda q: (loss2(q), 0.0), h, k),
         TypeError, re.escape(ES + "meta_loss must return a scalar array, got a pytree")),
    case("es-loss-not-callable", lambda h, k: es_hypergrad(1.0, h, k), TypeError,
         re.escape(ES + "meta_loss must be callable, got float")),
    case("es-key-int", lambda h, k: es_hypergrad(loss2, h, 0), TypeError,
         re.escape(ES + "key must be a single PRNG key (jax.random.key(seed) or "
                   "jax.random.PRNGKey(seed)), got int")),
    case("es-key-batch", lambda h, k: es_hypergrad(loss2, h, jax.random.split(k, 2)), TypeError,
         re.escape(ES + "key must be a single PRNG key") + ".*shape \\(2,\\)"),
    case("es-key-float", lambda h, k: es_hypergrad(loss2, h, h["a"][:2]), TypeError,
         re.escape(ES + "key must be a single PRNG key") + ".*float64"),
    case("es-args-not-tuple", lambda h, k: es_hypergrad(quadratic, h, k, args=jnp.inf),
         TypeError, re.escape(ES + "args must be a tuple of extra arguments, got float")),
    case("es-antithetic-not-bool", lambda h, k: es_hypergrad(loss2, h, k, antithetic="yes"),
         TypeError, re.escape(ES + "antithetic must be True or False, got 'yes'")),
    case("es-loss-wrong-args", lambda h, k: es_hypergrad(quadratic, h, k), TypeError,
         "missing 1 required positional argument"),
    # --- pes_init
    case("pes_init-population-odd", lambda h, k: pes_init(inner_init, h, k, 3), ValueError,
         re.escape(PES_INIT + "population must be an even integer >= 2 (antithetic pairs), "
                   "got 3")),
    case("pes_init-population-0", lambda h, k: pes_init(inner_init, h, k, 0), ValueError,
         re.escape(PES_INIT + "population must be an even integer >= 2")),
    case("pes_init-not-callable", lambda h, k: pes_init(None, h, k, 4), TypeError,
         re.escape(PES_INIT + "inner_init must be callable, got NoneType")),
    case("pes_init-key", lambda h, k: pes_init(inner_init, h, 1, 4), TypeError,
         re.escape(PES_INIT + "key must be a single PRNG key")),
    case("pes_init-integer-hparams",
         lambda h, k: pes_init(inner_init, {"a": jnp.ones(2, jnp.int32)}, k, 4), TypeError,
         re.escape(PES_INIT + "hparams leaf ['a'] has dtype int32; expected a floating")),
    # --- pes_hypergrad (hparams is LAMBDA here; the traced h and k are unused or the key)
    case("pes-state-not-a-state",
         lambda h, k: pes_hypergrad(clean_unroll, LAMBDA, tuple(good_state()), k), TypeError,
         re.escape(PES + "state must be a bilevel.PESState (from bilevel.pes_init), got tuple")),
    case("pes-state-for-other-hparams",
         lambda h, k: pes_hypergrad(clean_unroll, LAMBDA, pes_init(inner_init, h, k, 4), k),
         ValueError,
         re.escape(PES + "state.perturbation_sum has structure {['a'], ['b']}, hparams has "
                   "{['pull'], ['rate']}")),
    case("pes-perturbation-sum-shape",
         lambda h, k: pes_hypergrad(clean_unroll, LAMBDA, replace(
             good_state(), perturbation_sum={"pull": jnp.zeros((4, 2)), "rate": jnp.zeros(4)}),
             k), ValueError,
         re.escape(PES + "state.perturbation_sum leaf ['pull'] has shape (4, 2); expected "
                   "(population, *(3,))")),
    case("pes-perturbation-sum-populations",
         lambda h, k: pes_hypergrad(clean_unroll, LAMBDA, replace(
             good_state(), perturbation_sum={"pull": jnp.zeros((4, 3)), "rate": jnp.zeros(6)}),
             k), ValueError,
         re.escape(PES + "state.perturbation_sum leaves have population axes [4, 6]")),
    case("pes-perturbation-sum-dtype",
         lambda h, k: pes_hypergrad(clean_unroll, LAMBDA, replace(
             good_state(), perturbation_sum={"pull": jnp.zeros((4, 3), jnp.float32),
                                             "rate": jnp.zeros(4)}), k), TypeError,
         re.escape(PES + "state.perturbation_sum leaf ['pull'] has dtype float32, hparams leaf "
                   "has float64")),
    case("pes-population-odd",
         lambda h, k: pes_hypergrad(clean_unroll, LAMBDA, replace(
             good_state(), perturbation_sum={"pull": jnp.zeros((3, 3)), "rate": jnp.zeros(3)}),
             k), ValueError,
         re.escape(PES + "population must be an even integer >= 2 (antithetic pairs), got 3")),
    case("pes-inner-state-population",
         lambda h, k: pes_hypergrad(clean_unroll, LAMBDA, good_state(6)._replace(
             inner_state=good_state(4).inner_state), k), ValueError,
         re.escape(PES + "state.inner_state leaf ['step'] has shape (4,); expected a leading "
                   "population axis of 6")),
    case("pes-unroll-returns-loss-only",
         lambda h, k: pes_hypergrad(lambda p, s, key: clean_unroll(p, s, key)[1], LAMBDA,
                                    good_state(), k), TypeError,
         re.escape(PES + "unroll must return a pair (new_inner_state, loss)")),
    case("pes-unroll-nonscalar-loss",
         lambda h, k: pes_hypergrad(lambda p, s, key: (s, p["pull"]), LAMBDA, good_state(), k),
         TypeError, re.escape(PES + "unroll's loss must be a floating-point scalar, got")),
    case("pes-unroll-changes-state",
         lambda h, k: pes_hypergrad(lambda p, s, key: ({"theta": s["theta"]}, p["rate"]),
                                    LAMBDA, good_state(), k), ValueError,
         re.escape(PES + "unroll must return a new_inner_state with the structure, shapes and "
                   "dtypes of one particle's inner_state")),
    case("pes-unroll-changes-dtype",
         lambda h, k: pes_hypergrad(
             lambda p, s, key: (dict(s, theta=s["theta"].astype(jnp.float32)), p["rate"]),
             LAMBDA, good_state(), k), ValueError,
         re.escape(PES + "unroll must return a new_inner_state")),
    case("pes-unroll-not-callable",
         lambda h, k: pes_hypergrad("unroll", LAMBDA, good_state(), k), TypeError,
         re.escape(PES + "unroll must be callable, got str")),
    case("pes-sigma", lambda h, k: pes_hypergrad(clean_unroll, LAMBDA, good_state(), k,
                                                 sigma=-1.0), ValueError,
         re.escape(PES + "sigma must be a finite number > 0, got -1.0")),
    case("pes-key", lambda h, k: pes_hypergrad(clean_unroll, LAMBDA, good_state(), None),
         TypeError, re.escape(PES + "key must be a single PRNG key") + ".*NoneType"),
    case("pes-args", lambda h, k: pes_hypergrad(particle_unroll, LAMBDA, good_state(), k,
                                                args=[1.0, 0.0, 1.0]), TypeError,
         re.escape(PES + "args must be a tuple of extra arguments, got list")),
    case("pes-integer-hparams",
         lambda h, k: pes_hypergrad(clean_unroll, {"pull": jnp.ones(3, jnp.int32),
                                                   "rate": jnp.ones(())}, good_state(), k),
         TypeError, re.escape(PES + "hparams leaf ['pull'] has dtype int32; expected a floating")),
]


@pytest.mark.parametrize("fn, error, match", ERROR_CASES)
def test_bad_inputs_raise_naming_function_and_argument(fn, error, match):
    with pytest.raises(error, match=match):
        fn(HPARAMS, KEY)
    with pytest.raises(error, match=match):
        jax.jit(fn).lower(HPARAMS, KEY)
