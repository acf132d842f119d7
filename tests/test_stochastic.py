"""Stochastic bilevel methods (bilevel.stochastic): SOBA, SABA, MASOBA, StocBiO, AmIGO, F2SA.

Float64 (tests/conftest.py). The problem is ridge regression with one log-L2 weight per feature,
as finite sums: inner ``g(θ, λ) = ½ mean_i (a_iᵀθ − b_i)² + ½ Σ_k e^{λ_k} θ_k²`` over n = 32
samples, outer ``f(θ, λ) = ½ mean_j (c_jᵀθ − d_j)² + κ/2 ||λ||²`` over m = 40 samples (the κ term
keeps λ* finite and tests the direct ∂_λ f term). θ*(λ) is a dense solve; λ* minimises
``f(θ*(λ), λ)`` (BFGS on its exact gradient, to a gradient norm < 1e-10); v* = −H⁻¹ ∇_θ f.

Every test runs over one registry (METHODS) of full-batch and minibatch settings, so a new method
is tested everywhere by adding one line. Settings and losses are module-level objects: runs with
the same losses and step-relevant config share one compiled step (the determinism and NaN tests
reuse the minibatch runs' compilations).

Tolerances (relative errors ||λ − λ*|| / ||λ*||, ||θ − θ*|| / ||θ*||), stated per method in the
registry: full batch 1e-6 (F2SA 1e-2: its penalty bias is O(1/σ)), minibatch 0.15 on λ and 0.35
on θ for the methods without variance reduction (they end in a noise ball; measured 0.07-0.08 on
λ and 0.06-0.23 on θ), 1e-6 for SABA (variance reduced: it converges exactly; measured 2e-9).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

from bilevel.stochastic import (
    F2SA,
    MASOBA,
    SABA,
    SOBA,
    AmIGO,
    StocBiO,
)
from bilevel.trainer import InnerProblem, TrainerConfig, train

# --------------------------------------------------------------------------------------------
# The problem and its closed-form solution.

DIM, N_INNER, N_OUTER, KAPPA = 4, 32, 40, 0.02


def inner_loss(params, hparams, a, b):
    return (0.5 * jnp.mean((a @ params - b) ** 2)
            + 0.5 * jnp.sum(jnp.exp(hparams) * params**2))


def outer_loss(params, hparams, c, d):
    return 0.5 * jnp.mean((c @ params - d) ** 2) + 0.5 * KAPPA * jnp.sum(hparams**2)


def make_data(seed=0):
    rng = np.random.default_rng(seed)
    truth = 0.3 * rng.standard_normal(DIM)
    a = rng.standard_normal((N_INNER, DIM))
    b = a @ truth + 3.0 * rng.standard_normal(N_INNER)  # noisy: λ* > 0, regularisation pays
    c = rng.standard_normal((N_OUTER, DIM))
    d = c @ truth + 0.1 * rng.standard_normal(N_OUTER)
    return (jnp.asarray(a), jnp.asarray(b)), (jnp.asarray(c), jnp.asarray(d))


INNER_ARGS, OUTER_ARGS = make_data()


def hessian(hparams):
    a, _ = INNER_ARGS
    return a.T @ a / N_INNER + jnp.diag(jnp.exp(hparams))


def theta_star(hparams):
    a, b = INNER_ARGS
    return jnp.linalg.solve(hessian(hparams), a.T @ b / N_INNER)


def v_star(hparams):
    """−H⁻¹ ∇_θ f at θ*(λ): the fixed point of SOBA's v (the module's sign convention)."""
    grad = jax.grad(outer_loss)(theta_star(hparams), hparams, *OUTER_ARGS)
    return -jnp.linalg.solve(hessian(hparams), grad)


def value(hparams):
    return outer_loss(theta_star(hparams), hparams, *OUTER_ARGS)


exact_hypergrad = jax.jit(jax.grad(value))


def solve_reference():
    result = scipy.optimize.minimize(
        lambda h: float(value(jnp.asarray(h))), np.zeros(DIM),
        jac=lambda h: np.asarray(exact_hypergrad(jnp.asarray(h))), method="BFGS",
        options={"gtol": 1e-13, "maxiter": 500})
    hparams = jnp.asarray(result.x)
    assert float(jnp.linalg.norm(exact_hypergrad(hparams))) < 1e-10
    return hparams


HPARAMS_STAR = solve_reference()
PARAMS_STAR = theta_star(HPARAMS_STAR)
PARAMS0, HPARAMS0 = jnp.zeros(DIM), jnp.zeros(DIM)


def relative_error(x, reference):
    return float(jnp.linalg.norm(x - reference) / jnp.linalg.norm(reference))


# --------------------------------------------------------------------------------------------
# The registry: each method's full-batch and minibatch settings, tolerances and HVPs per step.


class Case(NamedTuple):
    full: object  # full batches: converges to (θ*, λ*)
    minibatch: object  # minibatches of 16 inner and 20 outer rows
    full_tol: float  # on λ and θ, relative
    minibatch_tol: tuple[float, float]  # (λ, θ), relative
    direction_tol: float  # the direction at (θ*(λ), v*(λ)) against the exact hypergradient
    hvp_count: int


STEP = 0.25  # < 2/L: the inner Hessian's eigenvalues at λ* are 2.2-4.0
BATCHES = {"inner_batch_size": 16, "outer_batch_size": 20}
# SOBA's analysis: inner steps decaying as k^(-2/5), the outer step as k^(-3/5).
DECAY = {**BATCHES, "step_decay": 0.4}
NOISY = (0.15, 0.35)

METHODS = {
    "SOBA": Case(SOBA(inner_step_size=STEP), SOBA(inner_step_size=STEP, **DECAY),
                 1e-6, NOISY, 1e-12, 1),
    # Variance reduced: constant steps, and it still converges exactly.
    "SABA": Case(SABA(inner_step_size=STEP), SABA(inner_step_size=STEP, **BATCHES),
                 1e-6, (1e-6, 1e-6), 1e-12, 1),
    # A memory row per batch of a fixed partition (2 inner, 2 outer batches): exact too, a
    # little slower here (measured 1.5e-6 on λ after the 600 steps).
    "SABA-batch": Case(SABA(inner_step_size=STEP, memory="batch"),
                       SABA(inner_step_size=STEP, memory="batch", **BATCHES),
                       1e-6, (1e-5, 1e-5), 1e-12, 1),
    "MASOBA": Case(MASOBA(inner_step_size=STEP, averaging=0.5),
                   MASOBA(inner_step_size=STEP, averaging=0.5, v_radius=10.0, **DECAY),
                   1e-6, NOISY, 1e-12, 1),
    # Neumann bias (1 − η μ)^(Q+1) ≈ 0.45^21 ≈ 5e-8.
    "StocBiO": Case(StocBiO(inner_steps=5, inner_step_size=STEP, neumann_steps=20),
                    StocBiO(inner_steps=5, inner_step_size=STEP, neumann_steps=20,
                            neumann_step_size=0.2, **DECAY),
                    1e-6, NOISY, 1e-6, 20),
    "AmIGO": Case(AmIGO(inner_steps=5, inner_step_size=STEP, v_steps=5),
                  AmIGO(inner_steps=5, inner_step_size=STEP, v_steps=5, **DECAY),
                  1e-6, NOISY, 1e-12, 5),
    # Penalty σ_k = 1 + k: after 300 steps the O(1/σ) bias is ~1e-3.
    "F2SA": Case(F2SA(inner_steps=5, inner_step_size=STEP, penalty=1.0, penalty_increment=1.0),
                 F2SA(inner_steps=5, inner_step_size=STEP, penalty=1.0, penalty_increment=1.0,
                      **DECAY),
                 1e-2, NOISY, 1e-3, 0),
}


def bound(method):
    """SABA's and MASOBA's states are shaped like λ and the data (see the module docstring)."""
    return method.bind(HPARAMS0, INNER_ARGS, OUTER_ARGS)


FULL_STEPS, MINIBATCH_STEPS = 300, 600
FULL_CONFIGS = {name: TrainerConfig(outer_steps=FULL_STEPS, inner_steps=0,
                                    inner_optimizer=optax.identity(),
                                    outer_optimizer=optax.sgd(2.0), method=bound(case.full))
                for name, case in METHODS.items()}
MINIBATCH_CONFIGS = {
    name: TrainerConfig(outer_steps=MINIBATCH_STEPS, inner_steps=0,
                        inner_optimizer=optax.identity(),
                        outer_optimizer=optax.sgd(
                            2.0 if name.startswith("SABA") else lambda k: 2.0 / (k + 1.0) ** 0.6),
                        method=bound(case.minibatch))
    for name, case in METHODS.items()}


def run(config, inner_args=INNER_ARGS, outer_args=OUTER_ARGS, checkpoint_dir=None, **overrides):
    config = dataclasses.replace(config, **overrides)
    return train(inner_loss, outer_loss, PARAMS0, HPARAMS0, config, inner_args, outer_args,
                 checkpoint_dir=checkpoint_dir, progress=False)


# --------------------------------------------------------------------------------------------
# Convergence through bilevel.train, with inner_steps=0 (the methods move θ themselves).


@pytest.mark.parametrize("name", METHODS)
def test_full_batch_reaches_the_bilevel_solution(name):
    result = run(FULL_CONFIGS[name])
    tol = METHODS[name].full_tol
    assert relative_error(result.hparams, HPARAMS_STAR) < tol
    assert relative_error(result.params, PARAMS_STAR) < tol
    history = result.history
    assert all(row["finite"] and not row["skipped"] for row in history)
    assert "inner_loss" not in history[-1]  # inner_steps=0: no plain trainer steps ran
    assert {row["hvp_count"] for row in history} == {METHODS[name].hvp_count}
    assert history[-1]["inner_grad_norm"] < 1e-6
    if name == "F2SA":
        assert np.isnan(history[-1]["v_norm"]) and history[-1]["penalty"] == FULL_STEPS
    else:  # ||v*|| at the solution
        assert history[-1]["v_norm"] == pytest.approx(
            float(jnp.linalg.norm(v_star(HPARAMS_STAR))), rel=1e-4)
    assert history[-1]["outer_loss"] == pytest.approx(float(value(HPARAMS_STAR)), rel=1e-4)


@pytest.mark.parametrize("name", METHODS)
def test_minibatch_reaches_the_bilevel_solution(name):
    result = run(MINIBATCH_CONFIGS[name])
    hparams_tol, params_tol = METHODS[name].minibatch_tol
    assert relative_error(result.hparams, HPARAMS_STAR) < hparams_tol
    assert relative_error(result.params, PARAMS_STAR) < params_tol
    assert all(row["finite"] for row in result.history)


# --------------------------------------------------------------------------------------------
# The direction at the fixed point (θ*(λ), v*(λ)) is the exact hypergradient (full batches).

PROBE = HPARAMS_STAR + jnp.array([0.3, -0.2, 0.1, 0.4])  # away from λ*: the gradient is not 0


def fixed_point_state(name, method, hparams):
    """The method's state at (θ*(λ), v*(λ)); F2SA's at a late step (σ = 1e4) with z = z*_σ."""
    state = bound(method).init(PARAMS0)
    if name in ("SOBA", "SABA", "SABA-batch", "AmIGO"):
        return state._replace(v=v_star(hparams))
    if name == "MASOBA":
        return state._replace(v=v_star(hparams), average=exact_hypergrad(hparams))
    if name == "StocBiO":
        return state
    sigma = 1e4
    a, b = INNER_ARGS
    c, d = OUTER_ARGS  # z*_σ minimises g + f/σ: a dense solve
    z = jnp.linalg.solve(hessian(hparams) + c.T @ c / (N_OUTER * sigma),
                         a.T @ b / N_INNER + c.T @ d / (N_OUTER * sigma))
    return state._replace(z=z, step=jnp.asarray(int(sigma - 1), jnp.int32))


def hypergrad_step(method):
    """The method's step as one jitted function of arrays (data as arguments)."""
    def step(params, hparams, state, key, inner_args, outer_args):
        problem = InnerProblem(inner_loss, outer_loss, None, inner_args, outer_args)
        return method.hypergrad(problem, params, hparams, state, key)

    return jax.jit(step)


STEPS = {name: hypergrad_step(case.full) for name, case in METHODS.items()}


@pytest.mark.parametrize("name", METHODS)
def test_direction_at_the_fixed_point_is_the_exact_hypergradient(name, key):
    case = METHODS[name]
    params, state = theta_star(PROBE), fixed_point_state(name, case.full, PROBE)
    grad, new_params, new_state, stats = STEPS[name](params, PROBE, state, key, INNER_ARGS,
                                                     OUTER_ARGS)
    exact = exact_hypergrad(PROBE)
    assert relative_error(grad, exact) < case.direction_tol
    np.testing.assert_allclose(new_params, params, rtol=1e-12, atol=1e-13)  # θ* is fixed
    if name != "F2SA" and hasattr(new_state, "v"):  # and so is v*
        np.testing.assert_allclose(new_state.v, state.v, rtol=1e-12, atol=1e-13)
    assert bool(stats["finite"]) and float(stats["inner_grad_norm"]) < 1e-12
    assert int(stats["hvp_count"]) == case.hvp_count
    assert float(stats["outer_loss"]) == pytest.approx(float(value(PROBE)), rel=1e-12)


# --------------------------------------------------------------------------------------------
# Determinism, non-finite steps.


def test_same_key_same_numbers_other_key_other_numbers():
    config = MINIBATCH_CONFIGS["SOBA"]  # compiled by the minibatch test: no new compile
    first, again = run(config, outer_steps=20), run(config, outer_steps=20)
    other = run(config, outer_steps=20, seed=1)
    np.testing.assert_array_equal(first.hparams, again.hparams)
    np.testing.assert_array_equal(first.params, again.params)
    strip = [{k: v for k, v in row.items() if k != "wall_time"} for row in first.history]
    assert strip == [{k: v for k, v in row.items() if k != "wall_time"}
                     for row in again.history]
    assert not np.array_equal(first.hparams, other.hparams)


def test_a_resumed_run_ends_as_an_uninterrupted_one(tmp_path):
    """SABA's state (memories, means, step count) goes through the trainer's checkpoints."""
    config = MINIBATCH_CONFIGS["SABA"]  # compiled by the minibatch test; the resume recompiles
    whole = run(config, outer_steps=12)
    run(config, checkpoint_dir=tmp_path, outer_steps=5)
    resumed = run(config, checkpoint_dir=tmp_path, outer_steps=12)
    assert resumed.resumed_from == 5
    np.testing.assert_array_equal(resumed.hparams, whole.hparams)
    np.testing.assert_array_equal(resumed.params, whole.params)


@pytest.mark.parametrize("name", METHODS)
def test_a_nan_makes_the_step_not_finite_and_changes_nothing(name, key):
    case = METHODS[name]
    state = bound(case.full).init(PARAMS0)
    params = PARAMS0.at[0].set(jnp.nan)
    grad, new_params, new_state, stats = STEPS[name](params, HPARAMS0, state, key, INNER_ARGS,
                                                     OUTER_ARGS)
    assert not bool(stats["finite"])
    np.testing.assert_array_equal(new_params, params)  # handed back as it came, NaN included
    # SABA's place in its epochs moves on (a skipped step's batch is not drawn again).
    moving = {"order", "draws"} if name.startswith("SABA") else set()
    for field, old in state._asdict().items():
        if field not in moving:
            for a, b in zip(jax.tree_util.tree_leaves(getattr(new_state, field)),
                            jax.tree_util.tree_leaves(old), strict=True):
                np.testing.assert_array_equal(a, b)
    if moving:
        assert int(new_state.draws) == int(state.draws) + 1


def test_a_nan_sample_skips_only_the_steps_that_draw_it():
    c, d = OUTER_ARGS
    outer_args = (c, d.at[3].set(jnp.nan))
    with pytest.warns(RuntimeWarning, match="skipped"):
        result = run(MINIBATCH_CONFIGS["SOBA"], outer_args=outer_args, outer_steps=40)
    finite = result.series("finite")
    assert 0 < finite.sum() < len(finite)  # 20 of 40 rows per batch: about half the steps
    assert np.all(result.series("skipped") == ~finite)
    assert np.all(np.isfinite(result.hparams)) and np.all(np.isfinite(result.params))


def test_saba_with_a_nan_sample_skips_one_step_an_epoch():
    """SABA's outer batches come in epochs of 2 (20 of 40 rows): exactly one step an epoch draws
    the NaN row and is skipped; the next draws the other half (the draws move on when skipped)."""
    c, d = OUTER_ARGS
    with pytest.warns(RuntimeWarning, match="skipped"):
        result = run(MINIBATCH_CONFIGS["SABA"], outer_args=(c, d.at[3].set(jnp.nan)),
                     outer_steps=40)
    finite = result.series("finite").reshape(20, 2)
    np.testing.assert_array_equal(finite.sum(axis=1), 1)
    assert np.all(np.isfinite(result.hparams)) and np.all(np.isfinite(result.params))


def _written_rows(state) -> list[int]:
    """How many rows of SABA's inner and outer memories have been written (are non-zero)."""
    return [int(jnp.sum(jnp.any(m != 0, axis=1)))
            for m in (state.inner_memory[0], state.outer_memory[0])]


def test_saba_draws_every_sample_once_an_epoch(key):
    """Batches of 8 of 32 inner and 10 of 40 outer rows: after 3 steps 24 and 30 memory rows
    were written, all different; after 4 (an epoch) every row. Independent draws would have
    left rows out."""
    method = bound(SABA(inner_batch_size=8, outer_batch_size=10))
    step, state = hypergrad_step(method), method.init(PARAMS0)
    params, hparams = PARAMS0 + 0.1, HPARAMS0
    for t in range(8):
        _, params, state, _ = step(params, hparams, state, jax.random.fold_in(key, t),
                                   INNER_ARGS, OUTER_ARGS)
        written = _written_rows(state)
        if t == 2:
            assert written == [24, 30]
        if t == 3:
            assert written == [N_INNER, N_OUTER]
            order = int(state.order)
    assert int(state.draws) == 8 and int(state.order) == order  # one seed for the run


# --------------------------------------------------------------------------------------------
# sampling="blocks": minibatches are blocks of consecutive rows, sliced, not gathered.

BLOCKS = {"SOBA": dataclasses.replace(METHODS["SOBA"].minibatch, sampling="blocks"),
          "SABA": dataclasses.replace(METHODS["SABA"].minibatch, sampling="blocks"),
          "SABA-batch": dataclasses.replace(METHODS["SABA-batch"].minibatch, sampling="blocks"),
          "AmIGO": dataclasses.replace(METHODS["AmIGO"].minibatch, sampling="blocks")}


@pytest.mark.parametrize("name", BLOCKS)
def test_blocks_reach_the_bilevel_solution(name):
    """The same runs as test_minibatch_reaches_the_bilevel_solution, with blocks of 16 of 32
    inner and 20 of 40 outer rows: the same tolerances, SABA's memory="batch" ones for both
    SABAs (a fixed partition into blocks makes a per-sample memory a per-block one; measured
    2.2e-7 on λ, 4.8e-6 on θ)."""
    result = run(MINIBATCH_CONFIGS[name], method=bound(BLOCKS[name]))
    hparams_tol, params_tol = METHODS["SABA-batch" if name == "SABA" else name].minibatch_tol
    assert relative_error(result.hparams, HPARAMS_STAR) < hparams_tol
    assert relative_error(result.params, PARAMS_STAR) < params_tol
    assert all(row["finite"] for row in result.history)


def test_blocks_are_consecutive_rows_and_every_block_is_drawn(key):
    """Blocks of 8 of 35 rows (the last 3 never drawn): each draw is rows [8b, 8b+8) for a
    b in 0..3, equal to those rows of every array; over 64 keys all four blocks come up."""
    from bilevel.stochastic import _Sampler

    args = (jnp.arange(35.0), jnp.arange(70.0).reshape(35, 2))
    sampler = _Sampler(args, 35, 8, blocks=True)
    draw, indices = jax.jit(sampler.draw), jax.jit(sampler.indices)
    starts = set()
    for t in range(64):
        rows = np.asarray(indices(jax.random.fold_in(key, t)))
        assert rows[0] % 8 == 0 and rows[0] < 32
        np.testing.assert_array_equal(rows, rows[0] + np.arange(8))
        batch = draw(jax.random.fold_in(key, t))
        np.testing.assert_array_equal(batch[0], args[0][rows])
        np.testing.assert_array_equal(batch[1], args[1][rows])
        starts.add(int(rows[0]))
    assert starts == {0, 8, 16, 24}


def test_saba_blocks_per_sample_memory_is_the_per_block_memory():
    """With blocks, SABA's memory rows of one block are always refreshed together, so SAGA on
    the samples is SAGA on the blocks: the two memories give one run, to round-off."""
    runs = [run(MINIBATCH_CONFIGS[name], method=bound(BLOCKS[name]), outer_steps=50)
            for name in ("SABA", "SABA-batch")]
    np.testing.assert_allclose(runs[0].hparams, runs[1].hparams, rtol=1e-10)
    np.testing.assert_allclose(runs[0].params, runs[1].params, rtol=1e-10)


@pytest.mark.parametrize("memory", ["sample", "batch"])
def test_saba_blocks_visit_every_block_once_an_epoch(memory, key):
    """Blocks of 8 of 32 inner and 10 of 40 outer rows: each step writes one block's memory
    (its 8 or 10 consecutive rows, or its one row), a new one each step of the epoch."""
    method = bound(SABA(inner_batch_size=8, outer_batch_size=10, memory=memory,
                        sampling="blocks"))
    step, state = hypergrad_step(method), method.init(PARAMS0)
    params, hparams = PARAMS0 + 0.1, HPARAMS0
    seen = []
    for t in range(4):
        before = state.inner_memory[0]
        _, params, state, _ = step(params, hparams, state, jax.random.fold_in(key, t),
                                   INNER_ARGS, OUTER_ARGS)
        changed = np.flatnonzero(np.any(np.asarray(state.inner_memory[0] != before), axis=1))
        if memory == "sample":
            assert len(changed) == 8 and changed[0] % 8 == 0
            np.testing.assert_array_equal(changed, changed[0] + np.arange(8))
            seen.append(int(changed[0]) // 8)
        else:
            assert len(changed) == 1
            seen.append(int(changed[0]))
        assert _written_rows(state) == ([8 * (t + 1), 10 * (t + 1)] if memory == "sample"
                                        else [t + 1, t + 1])
    assert sorted(seen) == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------
# Fields, batch sizes and the state's shapes.


def test_saba_batch_memory_has_a_row_per_batch_and_visits_each_once_an_epoch(key):
    """Batches of 8 of 32 inner and 10 of 40 outer rows: 4 memory rows a side; after 3 steps 3
    of them were written, after 4 (an epoch) all."""
    method = bound(SABA(inner_batch_size=8, outer_batch_size=10, memory="batch"))
    step, state = hypergrad_step(method), method.init(PARAMS0)
    assert state.inner_memory[0].shape == (4, DIM) and state.outer_memory[1].shape == (4, DIM)
    params, hparams = PARAMS0 + 0.1, HPARAMS0
    for t in range(4):
        _, params, state, _ = step(params, hparams, state, jax.random.fold_in(key, t),
                                   INNER_ARGS, OUTER_ARGS)
        assert _written_rows(state) == [t + 1, t + 1]
    # the mean is the mean of the rows (the running update kept it)
    np.testing.assert_allclose(state.inner_mean[0], state.inner_memory[0].mean(0), rtol=1e-12)


@pytest.mark.parametrize("cls, field, bad", [
    (SOBA, "inner_step_size", 0.0),
    (SOBA, "v_step_size", -1.0),
    (SOBA, "inner_step_size", float("nan")),
    (SOBA, "inner_batch_size", 0),
    (SOBA, "outer_batch_size", 2.5),
    (SOBA, "step_decay", -0.1),
    (SOBA, "sampling", "slices"),
    (F2SA, "sampling", None),
    (SABA, "inner_step_size", float("inf")),
    (SABA, "v_step_size", True),
    (SABA, "memory", "samples"),
    (MASOBA, "averaging", 1.5),
    (MASOBA, "averaging", 0.0),
    (MASOBA, "v_radius", 0.0),
    (StocBiO, "inner_steps", 0),
    (StocBiO, "neumann_steps", 1.0),
    (StocBiO, "neumann_step_size", 0.0),
    (AmIGO, "v_steps", -1),
    (AmIGO, "v_step_size", "0.1"),
    (F2SA, "penalty", 0.0),
    (F2SA, "penalty_increment", -1.0),
    (F2SA, "max_penalty", 0.5),  # below penalty=1
    (F2SA, "z_step_size", float("nan")),
])
def test_bad_fields_are_refused_naming_the_field(cls, field, bad):
    with pytest.raises(ValueError, match=rf"bilevel\.{cls.__name__}: {field} must be"):
        cls(**{field: bad})


@pytest.mark.parametrize("side, size", [("inner", N_INNER), ("outer", N_OUTER)])
def test_a_batch_larger_than_the_data_is_refused_naming_it(side, size):
    method = SOBA(**{f"{side}_batch_size": size + 1})
    config = dataclasses.replace(FULL_CONFIGS["SOBA"], method=method)
    message = (rf"{side}_batch_size={size + 1} is larger than the {size} samples of {side}_args "
               rf"\(the leading axis of its arrays\)")
    with pytest.raises(ValueError, match=rf"bilevel\.SOBA: {message}"):
        run(config)  # at trace time, before anything is compiled
    with pytest.raises(ValueError, match=rf"bilevel\.SABA\.bind: {message}"):
        SABA(**{f"{side}_batch_size": size + 1}).bind(HPARAMS0, INNER_ARGS, OUTER_ARGS)


def test_data_without_a_common_sample_axis_is_refused(key):
    problem = InnerProblem(inner_loss, outer_loss, None, (INNER_ARGS[0], INNER_ARGS[1][:5]),
                           OUTER_ARGS)
    with pytest.raises(ValueError,
                       match=r"inner_args holds arrays with leading axes of sizes \[5, 32\]"):
        SOBA(inner_batch_size=4).hypergrad(problem, PARAMS0, HPARAMS0,
                                           SOBA().init(PARAMS0), key)


def test_states_shaped_like_hparams_need_bind_or_init_state():
    problem = InnerProblem(inner_loss, outer_loss, None, INNER_ARGS, OUTER_ARGS)
    for method in (SABA(), MASOBA()):
        with pytest.raises(TypeError, match=r"\.bind\(hparams, inner_args, outer_args\)"):
            method.init(PARAMS0)
        from_problem = method.init_state(problem, PARAMS0, HPARAMS0)
        from_bind = bound(method).init(PARAMS0)
        assert jax.tree_util.tree_structure(from_problem) == jax.tree_util.tree_structure(
            from_bind)
        for a, b in zip(jax.tree_util.tree_leaves(from_problem),
                        jax.tree_util.tree_leaves(from_bind), strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype
    state = SABA().init_state(problem, PARAMS0, HPARAMS0)
    assert state.inner_memory[0].shape == (N_INNER, DIM)
    assert state.outer_memory[1].shape == (N_OUTER, DIM)
    # Bound methods stay usable as the trainer's (hashable) jit cache key.
    assert hash(bound(SABA())) == hash(bound(SABA()))


def test_train_builds_sabas_state_itself():
    """bilevel.train calls the protocol's init_state(problem, params, hparams), so SABA needs no
    bind(): the run equals the bound one, number for number."""
    unbound = dataclasses.replace(MINIBATCH_CONFIGS["SABA"], outer_steps=5,
                                  method=METHODS["SABA"].minibatch)
    bound_run = run(dataclasses.replace(MINIBATCH_CONFIGS["SABA"], outer_steps=5))
    unbound_run = run(unbound)
    np.testing.assert_array_equal(unbound_run.hparams, bound_run.hparams)
    assert [row["outer_loss"] for row in unbound_run.history] == [
        row["outer_loss"] for row in bound_run.history]
