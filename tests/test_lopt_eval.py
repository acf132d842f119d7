"""The evaluation harness of learned optimizers: closed forms and reference loops.

References: speed-ups of linear loss curves (closed form), the learning rate chosen for heavy-ball
SGD on a quadratic against its closed-form final loss (a 2×2 matrix power), the scanned runs
against a plain Python loop of optax updates, and the performance profile on a hand-made table.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bilevel.lopt import evaluate


class QuadraticTask(NamedTuple):
    """``ℓ(w, b) = ½ Σ h_i (w_i − b_i)²``, minibatch noise ``b ~ N(0, σ²)``; eval at ``b = 0``."""
    name: str
    init: Any
    loss: Any
    batches: Any
    eval_loss: Any
    held_out: bool


def quadratic_task(curvatures=(1.0, 0.1), noise=0.0, random_init=True) -> QuadraticTask:
    h = jnp.asarray(curvatures, jnp.float64)

    def init(key):
        if random_init:
            return {"w": jax.random.normal(key, h.shape, jnp.float64)}
        return {"w": jnp.ones_like(h)}

    def loss(params, batch):
        return 0.5 * jnp.sum(h * (params["w"] - batch) ** 2)

    def batches(key, steps):
        return noise * jax.random.normal(key, (steps, *h.shape), jnp.float64)

    def eval_loss(params):
        return 0.5 * jnp.sum(h * params["w"] ** 2)

    return QuadraticTask("quadratic", init, loss, batches, eval_loss, False)


# --------------------------------------------------------------------------------------------
# speed-up and steps to reach


def _linear(steps, slope, every=50):
    eval_steps = np.arange(0, steps + 1, every)
    return eval_steps, 1.0 - slope * eval_steps


def test_steps_to_reach_interpolates_linear_curve():
    eval_steps, loss = _linear(1000, 1e-3)
    assert evaluate.steps_to_reach(eval_steps, loss, 0.37) == pytest.approx(630.0, abs=1e-9)
    assert evaluate.steps_to_reach(eval_steps, loss, 1.5) == 0.0
    assert evaluate.steps_to_reach(eval_steps, loss, -0.1) == math.inf


def test_speedup_closed_form_min_over_learning_rates():
    eval_steps, slow = _linear(1000, 5e-4)
    _, fast = _linear(1000, 1e-3)
    # target 0.6: the fast rate reaches it at 400 steps, the slow one at 800
    result = evaluate.speedup(eval_steps, np.stack([slow, fast]), 0.6, lopt_steps=500)
    assert result.reached and result.learning_rate_index == 1
    assert result.adam_steps == pytest.approx(400.0, abs=1e-9)
    assert result.value == pytest.approx(0.8, abs=1e-12)  # < 1: Adam is faster
    assert str(result) == "0.80x"


def test_speedup_when_adam_never_reaches_is_a_lower_bound():
    eval_steps, loss = _linear(1000, 5e-4)  # ends at 0.5
    result = evaluate.speedup(eval_steps, loss, 0.1, lopt_steps=250)
    assert not result.reached and result.value == math.inf
    assert result.lower_bound == pytest.approx(4.0)
    assert str(result) == ">4.00x"
    # a diverged learned optimizer (NaN final loss) is beaten from Adam's first step
    nan = evaluate.speedup(eval_steps, loss, float("nan"), lopt_steps=250)
    assert nan.reached and nan.value == 0.0


def test_speedup_rejects_bad_steps():
    with pytest.raises(ValueError, match="lopt_steps"):
        evaluate.speedup(np.arange(3), np.ones(3), 0.5, lopt_steps=0)


# --------------------------------------------------------------------------------------------
# performance profile


def test_performance_profile_hand_computed():
    losses = np.array([[1.0, 2.0, np.nan],
                       [4.0, 2.0, 3.0],
                       [1.0, 1.0, 10.0]])
    rho = evaluate.performance_profile(losses, np.array([1.0, 1.5, 2.0, 20.0]))
    # ratios to the best: opt0 (1, 2, 1), opt1 (2, 1, 1), opt2 (nan, 1.5, 10)
    np.testing.assert_allclose(rho, [[2 / 3, 2 / 3, 1.0, 1.0],
                                     [2 / 3, 2 / 3, 1.0, 1.0],
                                     [0.0, 1 / 3, 1 / 3, 2 / 3]])


# --------------------------------------------------------------------------------------------
# learning-rate selection against heavy-ball SGD's closed form


def _heavy_ball_final_loss(h, lr, steps, w0):
    """optax.sgd(lr, momentum=β): m ← g + βm, w ← w − lr·m; on ½hw² this is a linear map."""
    beta = evaluate.SGD_MOMENTUM
    # state (w, m) -> (w − lr(hw + βm), hw + βm)
    transition = np.array([[1 - lr * h, -lr * beta], [h, beta]])
    w, _ = np.linalg.matrix_power(transition, steps) @ np.array([w0, 0.0])
    return 0.5 * h * w ** 2


def test_learning_rate_selection_matches_closed_form():
    h, steps = (1.0, 0.05), 60
    task = quadratic_task(h, noise=0.0, random_init=False)
    lrs = (1e-3, 1e-2, 1e-1, 1.0, 3.0, 10.0)  # 10 diverges: lr·h = 10 > 2(1 + β)
    expected = np.array([sum(_heavy_ball_final_loss(hi, lr, steps, 1.0) for hi in h)
                         for lr in lrs])
    tuned = evaluate.tune_baseline(task, "sgdm", lrs, steps, seeds=2, eval_every=20)
    np.testing.assert_allclose(tuned.score, expected, rtol=1e-9)
    assert tuned.score[-1] > 1e100  # diverged
    assert tuned.best_index == int(np.argmin(expected)) == 3
    assert tuned.learning_rate == lrs[tuned.best_index]
    assert tuned.curves.eval_loss.shape == (len(lrs), 2, steps // 20 + 1)


def test_select_learning_rate_tail_window():
    loss = np.array([[[3.0, 1.0, 5.0]], [[3.0, 2.0, 2.0]], [[0.1, 0.1, np.nan]]])
    assert evaluate.select_learning_rate(loss)[0] == 1  # axes (lr, seed, eval); nan never wins
    best, scores = evaluate.select_learning_rate(loss, tail_fraction=0.6)  # last 2 evals
    np.testing.assert_allclose(scores, [3.0, 2.0, np.inf])
    assert best == 1
    with pytest.raises(ValueError, match="axes"):
        evaluate.select_learning_rate(loss[0])


# --------------------------------------------------------------------------------------------
# the scan against a Python loop of optax updates


def _python_loop(task, optimizer, steps, key, eval_every):
    init_key, data_key = jax.random.split(key)
    params = task.init(init_key)
    state = optimizer.init(params)
    train, evals = [], [float(task.eval_loss(params))]
    for c in range(steps // eval_every):
        batches = task.batches(jax.random.fold_in(data_key, c), eval_every)
        for t in range(eval_every):
            loss, grads = jax.value_and_grad(task.loss)(params, batches[t])
            updates, state = optimizer.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            train.append(float(loss))
        evals.append(float(task.eval_loss(params)))
    return np.array(train), np.array(evals)


@pytest.mark.parametrize("name", evaluate.BASELINES)
def test_sweep_equals_python_loop(name):
    task = quadratic_task((2.0, 0.3, 0.01), noise=0.1)
    lrs, steps, every = (0.01, 0.1), 12, 4
    keys = evaluate.seed_keys(2)
    curves = evaluate.run_baseline_sweep(task, name, lrs, steps, keys, eval_every=every)
    for i, lr in enumerate(lrs):
        for s in range(2):
            train, evals = _python_loop(task, evaluate.baseline(name, lr), steps, keys[s], every)
            np.testing.assert_allclose(curves.train_loss[i, s], train, rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(curves.eval_loss[i, s], evals, rtol=1e-10, atol=1e-14)
    np.testing.assert_array_equal(curves.eval_steps[0, 0], [0, 4, 8, 12])


def test_same_seed_same_numbers_and_cosine_horizon():
    task = quadratic_task(noise=0.1)
    keys = evaluate.seed_keys([3])
    a = evaluate.run_seeds(task, evaluate.baseline("adam", 0.05), 10, keys, eval_every=5)
    b = evaluate.run_seeds(task, evaluate.baseline("adam", 0.05), 10, keys, eval_every=5)
    np.testing.assert_array_equal(a.eval_loss, b.eval_loss)
    # a cosine schedule told 10 steps makes the last update zero: the last two params agree
    told = evaluate.baseline("sgdm", 0.1, schedule_steps=10)
    lr = optax.cosine_decay_schedule(0.1, 10)
    assert float(lr(10)) == pytest.approx(0.0, abs=1e-12)
    curve = evaluate.run_seeds(task, told, 10, keys, eval_every=5)
    assert np.all(np.isfinite(curve.eval_loss))


def test_bad_inputs_raise_named_errors():
    task = quadratic_task()
    with pytest.raises(ValueError, match="eval_every"):
        evaluate.run_optimizer(task, optax.adam(0.1), 10, jax.random.key(0), eval_every=3)
    with pytest.raises(ValueError, match="steps"):
        evaluate.run_optimizer(task, optax.adam(0.1), 0, jax.random.key(0))
    with pytest.raises(ValueError, match="learning_rates"):
        evaluate.run_baseline_sweep(task, "adam", (0.1, -1.0), 4, evaluate.seed_keys(1))
    with pytest.raises(ValueError, match="name must be one of"):
        evaluate.baseline("lion", 0.1)


# --------------------------------------------------------------------------------------------
# learned optimizers inside the harness


@pytest.mark.slow  # 17 s; the velo case below checks the same factory
def test_learned_factory_tells_the_true_horizon_and_keeps_kwargs():
    from bilevel import lopt

    task, keys = quadratic_task(noise=0.1), evaluate.seed_keys(2)

    def run(opt):
        return evaluate.run_seeds(task, opt, 12, keys, eval_every=6).eval_loss

    meta = lopt.init_mlp_lopt(jax.random.key(0), horizon_features=True, dtype=jnp.float64)
    make = evaluate.learned_factory("mlp_lopt", meta, {"optimizer_kwargs": {"num_steps": 7}})
    told_true = run(make(12))
    np.testing.assert_array_equal(told_true, run(lopt.safeguarded(lopt.mlp_lopt(meta, 12))))
    assert not np.array_equal(told_true, run(lopt.safeguarded(lopt.mlp_lopt(meta, 7))))
    star = lopt.init_star_lopt(jax.random.key(0), dtype=jnp.float64)
    make = evaluate.learned_factory("star_lopt", star, {"optimizer_kwargs": {"nominal_step": 3e-3}})
    got = run(make(12))
    np.testing.assert_array_equal(got, run(lopt.safeguarded(lopt.star_lopt(star,
                                                                           nominal_step=3e-3))))
    assert not np.array_equal(got, run(lopt.safeguarded(lopt.star_lopt(star))))
    assert got.shape == (2, 3) and np.all(np.isfinite(got))
    bare = evaluate.learned_factory("star_lopt", star, {"optimizer_kwargs": {"nominal_step": 3e-3}},
                                    safeguards=False)
    np.testing.assert_array_equal(run(bare(12)), run(lopt.star_lopt(star, nominal_step=3e-3)))


def test_learned_factory_tells_velo_the_true_horizon():
    from bilevel import lopt

    task, keys = quadratic_task(noise=0.1), evaluate.seed_keys(2)
    meta = lopt.init_velo_lopt(jax.random.key(0), lstm_width=4, bank_size=2, dtype=jnp.float64)
    got = evaluate.run_seeds(task, evaluate.learned_factory("velo_lopt", meta, {})(12), 12, keys,
                             eval_every=6).eval_loss
    want = evaluate.run_seeds(task, lopt.velo_lopt(meta, 12), 12, keys, eval_every=6).eval_loss
    np.testing.assert_array_equal(got, want)
    assert np.all(np.isfinite(got))


@pytest.mark.parametrize("final", [math.inf, math.nan])
def test_a_diverged_learned_optimizer_has_speedup_zero(final):
    s = evaluate.speedup(np.arange(5.0), np.linspace(1.0, 0.5, 5), final, 4)
    assert s.value == 0.0 and s.reached
