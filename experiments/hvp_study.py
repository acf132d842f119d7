"""Inverse-HVP approximations inside implicit meta-learning: accuracy, failure modes, remedies.

Every part runs for each seed of ``--seeds`` (default 0, 1, 2: data, initial weights and the
randomised solvers) and its tables report mean ± std over them. Parts, each writing a CSV (one
row per seed) and a JSON copy of its rows under ``--out`` (default
``experiments/results/hvp_study``):

a. ``a_accuracy_cost.csv``: on ridge, logistic_l2 and digits_mlp, every approximation (CG,
   MINRES, GMRES, Neumann, Nyström, LiSSA, Identity, the unrolled MixFlow meta-gradient) at a
   few HVP budgets against the float64 Dense hypergradient at θ*: relative error, cosine, HVP
   count, wall time. This is the measuring core of ``bilevel compare-hvp``
   (:func:`bilevel.compare_hvp.prepare` and :func:`bilevel.compare_hvp.compare_hvp`), called as
   is; on digits_mlp also a damping sweep at one budget.
b. ``b_near_far.csv`` / ``b_spectra.csv``: the same comparison at points partway through inner
   training (k Adam steps from the initial parameters) and at θ*, each against the Dense solve
   at that point, with Lanczos extreme eigenvalues of the inner Hessian (and the exact ones from
   the dense Hessian, to check Lanczos); on digits_mlp also larger dampings.
c. ``c_training.csv`` (one row per outer step) and ``c_summary.csv`` (one row per run):
   ``bilevel.train`` on data reweighting and per-layer L2 of the digits MLP under Identity,
   Neumann and CG, then each remedy (damping at three strengths, GGN curvature, warm starts,
   hypergradient clipping) against the unremedied run.
f. ``f_training.csv`` / ``f_summary.csv``: the setting where validation accuracy collapses
   (digits MLP, plain SGD on λ): each approximation, then each remedy on CG.
d. ``README.md``: the conclusion, every number filled in from the CSVs, plus the machine.

``--parts`` runs some parts only; the README is always rewritten from the JSON rows of every
part found under ``--out``, so parts can be run one at a time. Each part's wall time is in
``run.json``: on 2 CPU cores shared with other jobs at load 15-20, parts a, b and c took 40-55
minutes each and f 10. Run ``python experiments/hvp_study.py`` or ``--smoke``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import time
import warnings
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)  # the Dense references are float64

import _common  # noqa: E402  (experiments/ is on sys.path when run as a script)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import bilevel  # noqa: E402
import hvp  # noqa: E402
from bilevel import compare_hvp  # noqa: E402

SOLVERS = ("cg", "minres", "gmres", "neumann", "nystrom", "lissa", "identity", "unrolled-mixflow")
SEEDS = (0, 1, 2)
#: HVP budgets per problem (ridge and logistic_l2 have 10 parameters: Nyström's rank <= 10).
BUDGETS = {"ridge": (2, 5, 10), "logistic_l2": (2, 5, 10), "digits_mlp": (5, 20, 50)}
SMOKE_BUDGETS = {"ridge": (2, 5), "logistic_l2": (2, 5)}
#: Part a: dampings besides compare-hvp's default, on digits_mlp at one budget (first seed).
SWEEP_PROBLEM, SWEEP_BUDGET, DAMPING_SWEEP_A = "digits_mlp", 20, (0.0, 1e-3, 1e-2)
#: Part b: inner Adam steps from the initial parameters, then θ* (from problem.solve_inner).
NEAR_FAR_STEPS = (0, 100)
NEAR_FAR_LR = 1e-2
NEAR_FAR_BUDGET = 20
LANCZOS_ITERS = 60
#: Part b: larger dampings at every point of digits_mlp (first seed only).
DAMPING_SWEEP_B = (1e-1,)
#: Part c: a run "forgot" when its validation accuracy ends this far below its best, and
#: "collapsed" when at some step it fell this far below its best so far.
FORGETTING_DROP = 0.05
COLLAPSE_DROP = 0.10
#: Part c: relative residual at which CG and Neumann stop (and count as converged).
TRAIN_TOL = 1e-4
TRAIN_BUDGET = 20
TRAIN_DAMPINGS = (1e-3, 1e-2, 1e-1)
#: Part f: plain SGD on λ with this learning rate, this many outer steps (found by a search
#: over outer optimizers and learning rates, reported in the README).
FORGET_LR = 10.0
FORGET_STEPS = 60


# --------------------------------------------------------------------------------------------
# Shared helpers


def tree_vector(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel()
                           for x in jax.tree_util.tree_leaves(tree)])


def write_csv(rows: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in columns})


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or "unknown",
            "cpu_model": _common.cpu_model(), "cores": os.cpu_count(), "python":
            platform.python_version(), "jax": jax.__version__, "device": str(jax.devices()[0]),
            "library_commit": library_commit()}


def library_commit() -> str:
    """The repository commit the library was imported from (``+dirty`` if hvp/ or bilevel/
    differ from it), so that results can be matched to the solver code that produced them."""
    found = _common.git_commit("hvp", "bilevel")
    if found is None:
        return "unknown"
    commit, dirty = found
    return commit + ("+dirty" if dirty else "")




# --------------------------------------------------------------------------------------------
# a. Accuracy against cost at θ*


def part_a(problems: dict, seeds: tuple[int, ...], repeats: int,
           sweep: bool) -> tuple[list[dict], dict]:
    """Every solver at every budget at θ*, per seed; on digits_mlp also a damping sweep."""
    rows, setups = [], {}
    for seed in seeds:
        for problem, budgets in problems.items():
            config = compare_hvp.CompareHvpConfig(
                problem=problem, solvers=SOLVERS, budgets=budgets, seed=seed, repeats=repeats,
                jobs=os.cpu_count() or 1)
            dampings = [config.damping]
            if sweep and problem == SWEEP_PROBLEM and seed == seeds[0]:
                dampings += [d for d in DAMPING_SWEEP_A if d != config.damping]
            for damping in dampings:
                begin = time.perf_counter()
                current = dataclasses.replace(
                    config, damping=damping,
                    budgets=config.budgets if damping == config.damping else (SWEEP_BUDGET,))
                setup = compare_hvp.prepare(current)
                found, _ = compare_hvp.compare_hvp(current, setup)
                print(f"[a] seed {seed} {problem} damping {damping:g}: {len(found)} variants in "
                      f"{time.perf_counter() - begin:.1f} s", flush=True)
                for row in found:
                    rows.append({"problem": problem, "seed": seed, **row,
                                 "num_params": setup.num_params, "lambda_max": setup.lambda_max,
                                 "damping": damping, "damping_floor": setup.damping_floor,
                                 "sweep": damping != config.damping})
                if damping == config.damping:
                    setups[problem, seed] = (config, setup)
    return rows, setups


# --------------------------------------------------------------------------------------------
# b. Near vs far from the inner optimum


def adam_points(problem, steps: tuple[int, ...], lr: float) -> dict[str, object]:
    """Inner parameters after k Adam steps from ``problem.params``, for each k, and θ*."""
    optimizer = optax.adam(lr)

    @functools.partial(jax.jit, static_argnums=3)
    def run(params, hparams, inner_args, k_max):
        def step(carry, _):
            p, s = carry
            g = jax.grad(problem.inner_loss)(p, hparams, *inner_args)
            u, s = optimizer.update(g, s, p)
            p = optax.apply_updates(p, u)
            return (p, s), p
        return jax.lax.scan(step, (params, optimizer.init(params)), None, length=k_max)[1]

    k_max = max(steps)
    trajectory = run(problem.params, problem.hparams, problem.inner_args, k_max) if k_max else None
    points = {}
    zero_start = not any(np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(problem.params))
    for k in steps:
        if k == 0 and zero_start:
            # θ = 0 (logistic_l2's start): the decay's cross term e^λ θ ⊙ v vanishes and so does
            # the hypergradient, leaving no reference to measure errors against.
            continue
        points[f"adam{k}"] = problem.params if k == 0 else jax.tree_util.tree_map(
            lambda t, k=k: t[k - 1], trajectory)
    points["optimum"] = problem.solve_inner(problem.params, problem.hparams, *problem.inner_args)
    return points


def setup_at(config: compare_hvp.CompareHvpConfig, base: compare_hvp.Setup,
             params) -> tuple[compare_hvp.Setup, dict]:
    """A :class:`bilevel.compare_hvp.Setup` at ``params`` (reference: Dense at this point) and
    facts about the point: gradient norm, spectrum (Lanczos and exact), IFT error vs θ*."""
    problem, damping = base.problem, config.damping
    data = (params, problem.hparams, problem.inner_args, problem.outer_args)

    @jax.jit
    def facts(params, hparams, inner_args, outer_args):
        n = sum(x.size for x in jax.tree_util.tree_leaves(params))
        exact = [bilevel.hypergrad(problem.inner_loss, problem.outer_loss, params, hparams,
                                   inner_args, outer_args, solver=hvp.Dense(max_size=n),
                                   damping=d)[0] for d in (0.0, damping)]
        operator = hvp.hessian(problem.inner_loss, params, hparams, *inner_args)
        damped = hvp.hessian(problem.inner_loss, params, hparams, *inner_args, damping=damping)
        top = hvp.power_iteration(damped, compare_hvp.POWER_ITERS,
                                  jax.random.key(config.seed))[0]
        spectrum = hvp.extreme_eigenvalues(operator, LANCZOS_ITERS, jax.random.key(config.seed))
        eigenvalues = jnp.linalg.eigvalsh(operator.dense(n))
        grad_inner = jax.grad(problem.inner_loss)(params, hparams, *inner_args)
        grad_outer = jax.grad(problem.outer_loss)(params, hparams, *outer_args)
        return exact, top, spectrum, eigenvalues, grad_inner, grad_outer

    (reference, damped), top, spectrum, eigenvalues, grad_inner, grad_outer = facts(*data)
    ref = tree_vector(reference)
    lambda_max = abs(float(top))
    optimum_ref = tree_vector(base.reference)
    eig = np.asarray(eigenvalues)
    info = {
        "inner_grad_norm": float(np.linalg.norm(tree_vector(grad_inner))),
        "outer_loss_at_point": float(problem.outer_loss(params, problem.hparams,
                                                        *problem.outer_args)),
        "lanczos_min": float(spectrum.lambda_min), "lanczos_max": float(spectrum.lambda_max),
        "exact_min": float(eig[0]), "exact_max": float(eig[-1]),
        "negative_eigenvalues": int(np.sum(eig < 0)),
        "power_lambda": float(top), "alpha": 1.0 / lambda_max,
        "neumann_contraction": float(np.max(np.abs(1.0 - (eig + damping) / lambda_max))),
        "ift_error_vs_optimum": float(np.linalg.norm(ref - optimum_ref)
                                      / np.linalg.norm(optimum_ref)),
        "ift_cosine_vs_optimum": float(ref @ optimum_ref / (np.linalg.norm(ref)
                                                            * np.linalg.norm(optimum_ref))),
    }
    dtype = jnp.dtype(config.dtype)
    cast = lambda tree: jax.tree_util.tree_map(  # noqa: E731
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
    setup = compare_hvp.Setup(problem, (*cast(data), jnp.asarray(damping, dtype)), reference,
                              float(np.linalg.norm(tree_vector(damped) - ref)
                                    / np.linalg.norm(ref)),
                              lambda_max, 1.0 / lambda_max, lambda_max / 10,
                              float(np.linalg.norm(tree_vector(grad_outer))), base.num_params)
    return setup, info


def base_setup(setups: dict, problem: str, seed: int, budgets: tuple[int, ...],
               repeats: int) -> tuple[compare_hvp.CompareHvpConfig, compare_hvp.Setup]:
    """Part a's (config, setup) for ``(problem, seed)``, built here when part a did not run."""
    if (problem, seed) not in setups:
        config = compare_hvp.CompareHvpConfig(problem=problem, solvers=SOLVERS, budgets=budgets,
                                              seed=seed, repeats=repeats,
                                              jobs=os.cpu_count() or 1)
        setups[problem, seed] = (config, compare_hvp.prepare(config))
    return setups[problem, seed]


def part_b(setups: dict, problems: tuple[str, ...], seeds: tuple[int, ...],
           steps: tuple[int, ...], budget: int, repeats: int,
           sweep: bool) -> tuple[list[dict], list[dict]]:
    """Each solver at points along inner training and at θ*, against Dense at each point."""
    rows, spectra = [], []
    for seed in seeds:
        for name in problems:
            base_config, base = base_setup(setups, name, seed, BUDGETS[name], repeats)
            # Nyström's rank is the budget and cannot exceed the parameter count.
            config = dataclasses.replace(base_config, budgets=(min(budget, base.num_params),),
                                         repeats=repeats)
            dampings = [config.damping]
            if sweep and name == SWEEP_PROBLEM and seed == seeds[0]:
                dampings += list(DAMPING_SWEEP_B)
            for point, params in adam_points(base.problem, steps, NEAR_FAR_LR).items():
                for damping in dampings:
                    begin = time.perf_counter()
                    current = dataclasses.replace(config, damping=damping)
                    setup, info = setup_at(current, base, params)
                    found, _ = compare_hvp.compare_hvp(current, setup)
                    common = {"problem": name, "seed": seed, "point": point}
                    spectra.append({**common, **info, "damping": damping,
                                    "damping_floor": setup.damping_floor,
                                    "budget": config.budgets[0],
                                    "sweep": damping != config.damping})
                    for row in found:
                        rows.append({**common, **row, **info, "damping": damping,
                                     "sweep": damping != config.damping})
                    print(f"[b] seed {seed} {name} {point} damping {damping:g}: lambda in "
                          f"[{info['exact_min']:.3g}, {info['exact_max']:.3g}], "
                          f"{time.perf_counter() - begin:.1f} s", flush=True)
    return rows, spectra


# --------------------------------------------------------------------------------------------
# c. Implicit meta-learning runs and remedies


def mlp_logits(params, x):
    """The digits MLP's forward pass, as in ``bilevel.problems`` (checked against its loss)."""
    hidden = jnp.tanh(x @ params["layer1"]["w"] + params["layer1"]["b"])
    return hidden @ params["layer2"]["w"] + params["layer2"]["b"]


def _mlp_model(params, x):
    return mlp_logits(params, x), params


def _mlp_loss(outputs, hparams, labels):
    """Cross-entropy + per-layer decay, written on (logits, params) so that the GGN keeps the
    decay's exact (diagonal) Hessian."""
    logits, params = outputs
    log_probs = jax.nn.log_softmax(logits)
    ce = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))
    decay = sum(0.5 * jnp.exp(hparams[name]) * (jnp.sum(params[name]["w"] ** 2)
                                                + jnp.sum(params[name]["b"] ** 2))
                for name in ("layer1", "layer2"))
    return ce + decay


def mlp_ggn(params, hparams, x, labels):
    return hvp.ggn(_mlp_model, _mlp_loss, params, (x,), (hparams, labels))


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    problem: object
    inner_steps: int
    inner_lr: float
    outer_lr: float
    metrics: object
    ggn: object | None  # curvature= builder, or None where GGN equals the Hessian
    outer: str = "adam"  # "adam" or "sgd" (plain gradient descent on λ)
    seed: int = 0


def reweighting_task(seed: int) -> Task:
    problem = bilevel.data_reweighting(jax.random.key(seed), n_train=100, n_val=100, dim=10,
                                       noise_fraction=0.3, ridge=1e-3)
    flipped = np.asarray(problem.metadata["flipped"])
    x_val, y_val = problem.outer_args

    def metrics(params, hparams):
        weights = np.asarray(jax.nn.sigmoid(hparams))
        return {"val_acc": float(jnp.mean(jnp.sign(x_val @ params) == y_val)),
                "weight_flipped": float(weights[flipped].mean()),
                "weight_clean": float(weights[~flipped].mean())}

    # Linear model, squared loss: the GGN is the Hessian, so the GGN remedy does not apply.
    return Task("reweighting", problem, 10, 0.1, 0.3, metrics, None, seed=seed)


def digits_task(seed: int) -> Task:
    problem = bilevel.digits_mlp(jax.random.key(seed))
    x, labels = problem.inner_args
    check = _mlp_loss(_mlp_model(problem.params, x), problem.hparams, labels)
    reference = problem.inner_loss(problem.params, problem.hparams, x, labels)
    if not np.allclose(check, reference, rtol=1e-5):
        raise RuntimeError(f"the GGN split of digits_mlp's inner loss does not match it: "
                           f"{float(check)} vs {float(reference)}")
    x_val, labels_val = problem.outer_args

    def metrics(params, hparams):
        return {"val_acc": float(jnp.mean(jnp.argmax(mlp_logits(params, x_val), 1)
                                          == labels_val)),
                **{f"log_decay_{k}": float(v) for k, v in hparams.items()}}

    return Task("digits_mlp", problem, 10, 1e-2, 0.3, metrics, mlp_ggn, seed=seed)


def far_task(task: Task) -> Task:
    """The same problem kept far from θ*: one inner step per outer step and a larger outer
    learning rate, so the hypergradient is taken where the Hessian is still indefinite."""
    return dataclasses.replace(task, name=f"{task.name}-far", inner_steps=1,
                               outer_lr=3 * task.outer_lr)


def sgd_task(task: Task) -> Task:
    """The digits task with plain SGD on λ (learning rate :data:`FORGET_LR`): the outer step is
    proportional to the hypergradient, so one huge hypergradient moves λ far."""
    return dataclasses.replace(task, name=f"{task.name}-sgd", outer="sgd", outer_lr=FORGET_LR)


def train_run(task: Task, method, outer_steps: int, clip: float | None):
    outer = (optax.adam if task.outer == "adam" else optax.sgd)(task.outer_lr)
    config = bilevel.TrainerConfig(outer_steps=outer_steps, inner_steps=task.inner_steps,
                                   inner_optimizer=optax.adam(task.inner_lr),
                                   outer_optimizer=outer, method=method,
                                   hypergrad_clip=clip, seed=task.seed)
    begin = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # skipped steps are counted instead
        result = bilevel.train_problem(task.problem, config, metrics=task.metrics, progress=False)
    return result, time.perf_counter() - begin


def summarise(history: list[dict], budget_iterations: int) -> dict:
    loss = np.array([r["outer_loss"] for r in history], float)
    acc = np.array([r["val_acc"] for r in history], float)
    norm = np.array([r["hypergrad_norm"] for r in history], float)
    finite_norm = norm[np.isfinite(norm)]
    steps = np.diff(loss[np.isfinite(loss)])
    signs = np.sign(steps[steps != 0])
    best = int(np.nanargmax(acc))
    running_best = np.maximum.accumulate(np.nan_to_num(acc, nan=0.0))
    drawdown = running_best - np.nan_to_num(acc, nan=0.0)
    decays = [np.array([r[k] for r in history], float) for k in history[0]
              if k.startswith("log_decay_")]
    return {
        "max_drawdown": float(drawdown.max()), "drawdown_step": int(drawdown.argmax()) + 1,
        "collapsed": bool(drawdown.max() >= COLLAPSE_DROP),
        "max_log_decay": float(max(np.nanmax(d) for d in decays)) if decays else None,
        "initial_outer_loss": loss[0], "final_outer_loss": loss[-1],
        "min_outer_loss": float(np.nanmin(loss)),
        "initial_val_acc": acc[0], "best_val_acc": acc[best], "best_step": best + 1,
        "final_val_acc": acc[-1], "acc_drop_from_best": acc[best] - acc[-1],
        "forgot": bool(acc[best] - acc[-1] >= FORGETTING_DROP),
        "skipped_steps": int(sum(r["skipped"] for r in history)),
        "unconverged_steps": int(sum(not r.get("converged", True) for r in history)),
        "clipped_steps": int(sum(r["clipped"] for r in history)),
        # The history has no solver status; a solve that stopped before its budget without
        # converging met negative curvature (CG) or diverged/stagnated (Neumann).
        "early_stops": int(sum(("iterations" in r) and not r["converged"]
                               and r["iterations"] < budget_iterations for r in history)),
        "median_hypergrad_norm": float(np.median(finite_norm)) if finite_norm.size else math.nan,
        "max_hypergrad_norm": float(np.max(finite_norm)) if finite_norm.size else math.nan,
        "norm_growth": float(np.mean(finite_norm[-5:]) / np.mean(finite_norm[:5]))
        if finite_norm.size >= 10 else math.nan,
        "oscillation": float(np.mean(signs[1:] != signs[:-1])) if signs.size > 1 else 0.0,
        "total_hvps": int(sum(r.get("hvp_count", 0) for r in history)),
        "max_residual_norm": float(np.nanmax([r.get("residual_norm", math.nan)
                                              for r in history] + [-math.inf])),
        # Solves that returned their warm start untouched (0 iterations).
        "zero_iteration_solves": int(sum(r.get("iterations", 1) == 0 for r in history)),
    }


def within_budget(name: str, budget: int, **options) -> hvp.AbstractSolver:
    """The solver ``name`` of :data:`hvp.SOLVERS` that spends at most ``budget`` products per
    solve, its residual check included: ``hvp.make_solver`` at the largest budget whose
    ``hvps_at_budget`` fits (CG and MINRES: ``budget - 1`` iterations; Neumann with a given
    ``alpha``: ``budget - 1`` terms)."""
    cls = hvp.SOLVERS[name]
    fits = [b for b in range(1, budget + 1) if cls.hvps_at_budget(b) <= budget]
    if not fits:
        raise ValueError(f"hvp_study: {name} spends more than {budget} products at any budget")
    return hvp.make_solver(name, fits[-1], **options)


def part_c(builders: list, seeds: tuple[int, ...], outer_steps: int, budget: int,
           dampings: tuple[float, ...]) -> tuple[list[dict], list[dict]]:
    """Per seed and task: Identity, Neumann and CG, then each remedy on Neumann and CG."""
    curves, summary = [], []
    for seed in seeds:
        for build in builders:
            task = build(seed)
            # α = 1/λ̂_max at the initial λ's θ*, as in part a (compare_hvp.prepare's power
            # iteration).
            alpha = _alpha_at_optimum(task.problem, seed)
            baselines = {
                "identity": hvp.make_solver("identity", scale=alpha),
                "neumann": within_budget("neumann", budget, alpha=alpha, tol=TRAIN_TOL),
                "cg": within_budget("cg", budget, tol=TRAIN_TOL),
            }
            runs = [(name, "none", bilevel.ImplicitMethod(solver=solver))
                    for name, solver in baselines.items()]
            for name in ("neumann", "cg"):
                runs += _remedies(name, baselines[name], task, dampings)
            _run_all(task, runs, baselines, outer_steps, budget, curves, summary)
    return curves, summary


def _remedies(name: str, solver, task: Task, dampings: tuple[float, ...]) -> list[tuple]:
    runs = [(name, f"damping={d:g}", bilevel.ImplicitMethod(solver=solver, damping=d))
            for d in dampings]
    if task.ggn is not None:
        runs.append((name, "ggn", bilevel.ImplicitMethod(solver=solver, curvature=task.ggn)))
    runs.append((name, "warm_start", bilevel.ImplicitMethod(solver=solver, warm_start=True)))
    return runs


def _run_all(task: Task, runs: list[tuple], clip_for: dict, outer_steps: int, budget: int,
             curves: list, summary: list) -> None:
    """The runs, then one clipped run per solver of ``clip_for`` (clipped at its unremedied
    run's median hypergradient norm)."""
    base_norms = {}
    for solver_name, remedy, method in runs:
        result, seconds = train_run(task, method, outer_steps, None)
        _record(task, solver_name, remedy, result, seconds, None, curves, summary, budget)
        if remedy == "none":
            base_norms[solver_name] = summary[-1]["median_hypergrad_norm"]
    for solver_name, solver in clip_for.items():
        clip = base_norms.get(solver_name, math.nan)
        if not (math.isfinite(clip) and clip > 0):
            continue
        result, seconds = train_run(task, bilevel.ImplicitMethod(solver=solver), outer_steps,
                                    clip)
        _record(task, solver_name, "clip", result, seconds, clip, curves, summary, budget)


def part_f(seeds: tuple[int, ...], outer_steps: int, budget: int,
           dampings: tuple[float, ...]) -> tuple[list[dict], list[dict]]:
    """Validation-accuracy collapse: digits MLP with SGD on λ, each approximation undamped,
    then each remedy on CG (the one that collapses)."""
    curves, summary = [], []
    for seed in seeds:
        task = sgd_task(digits_task(seed))
        alpha = _alpha_at_optimum(task.problem, seed)
        n = sum(x.size for x in jax.tree_util.tree_leaves(task.problem.params))
        solvers = {
            "cg": within_budget("cg", budget, tol=TRAIN_TOL),
            "minres": within_budget("minres", budget, tol=TRAIN_TOL),
            "neumann": within_budget("neumann", budget, alpha=alpha, tol=TRAIN_TOL),
            "identity": hvp.make_solver("identity", scale=alpha),
            "dense": hvp.make_solver("dense", max_size=n),
        }
        runs = [(name, "none", bilevel.ImplicitMethod(solver=solver))
                for name, solver in solvers.items()]
        runs += _remedies("cg", solvers["cg"], task, dampings)
        _run_all(task, runs, {"cg": solvers["cg"]}, outer_steps, budget, curves, summary)
    return curves, summary


def _alpha_at_optimum(problem, seed: int) -> float:
    params = problem.solve_inner(problem.params, problem.hparams, *problem.inner_args)
    operator = hvp.hessian(problem.inner_loss, params, problem.hparams, *problem.inner_args)
    top = hvp.power_iteration(operator, compare_hvp.POWER_ITERS, jax.random.key(seed))[0]
    return 1.0 / abs(float(top))


def _record(task, solver_name, remedy, result, seconds, clip, curves, summary, budget):
    common = {"task": task.name, "seed": task.seed, "solver": solver_name, "remedy": remedy}
    for row in result.history:
        curves.append({**common, **{k: v for k, v in row.items() if k != "wall_time"}})
    summary.append({**common, "clip": clip, **summarise(result.history, budget - 1),
                    "seconds": seconds, "compile_s": result.compile_time})
    s = summary[-1]
    if solver_name in ("identity", "dense"):  # no iterations: these columns say nothing
        s["zero_iteration_solves"] = s["early_stops"] = None
    print(f"[c] seed {task.seed} {task.name} {solver_name:8s} {remedy:13s} loss "
          f"{s['initial_outer_loss']:.4g} -> {s['final_outer_loss']:.4g}, acc best "
          f"{s['best_val_acc']:.3f} final {s['final_val_acc']:.3f} drawdown "
          f"{s['max_drawdown']:.3f}, skipped {s['skipped_steps']}, {seconds:.1f} s", flush=True)


# --------------------------------------------------------------------------------------------
# Aggregation over seeds


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and not isinstance(v, str)
            and math.isfinite(float(v))]


def aggregate(rows: list[dict], keys: tuple[str, ...], values: tuple[str, ...],
              counts: tuple[str, ...] = ()) -> list[dict]:
    """One dict per distinct ``keys`` (first-seen order): for each of ``values`` its mean over
    the group's finite entries (``v``), standard deviation (``v_std``, population) and count
    (``v_n``); for each of ``counts`` how often each value occurred, e.g. ``"converged 3/3"``."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    out = []
    for key, members in groups.items():
        entry = dict(zip(keys, key, strict=True))
        entry["n"] = len(members)
        for name in values:
            found = _finite(r.get(name) for r in members)
            entry[name] = float(np.mean(found)) if found else math.nan
            entry[f"{name}_std"] = float(np.std(found)) if found else math.nan
            entry[f"{name}_n"] = len(found)
        for name in counts:
            tally: dict[str, int] = {}
            for r in members:
                label = str(r.get(name)).lower()
                tally[label] = tally.get(label, 0) + 1
            entry[name] = ", ".join(f"{k} {v}/{len(members)}" if len(tally) > 1 or v > 1 else k
                                    for k, v in tally.items())
        out.append(entry)
    return out


def _pm(entry: dict, name: str, digits: int = 3) -> str:
    """``mean ± std`` of an aggregated value (``n/a`` when no seed gave a finite one)."""
    mean, std = entry.get(name), entry.get(f"{name}_std")
    if mean is None or not math.isfinite(mean):
        return "n/a"
    missing = entry["n"] - entry.get(f"{name}_n", entry["n"])
    tail = f" ({missing} non-finite)" if missing else ""
    if entry.get(f"{name}_n", entry["n"]) == 1:  # one seed (the sweeps): no spread to show
        return f"{_fmt(mean, digits)}{tail}"
    return f"{_fmt(mean, digits)} ± {_fmt(std, 2)}{tail}"


def _pm_table(rows: list[dict], columns: list[str], spread: set[str]) -> str:
    """A Markdown table; the columns in ``spread`` are shown as mean ± std."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            value = r.get(c)
            cells.append(_pm(r, c) if c in spread else value if isinstance(value, str)
                         else _fmt(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_a(rows: list[dict], path: Path) -> None:
    """Mean relative error (error bars: std over seeds) against HVP count, per problem."""
    plt = _pyplot()
    rows = [r for r in rows if not r["sweep"]]
    problems = list(dict.fromkeys(r["problem"] for r in rows))
    fig, axes = plt.subplots(1, len(problems), figsize=(5 * len(problems), 4),
                             constrained_layout=True, squeeze=False)
    stats = aggregate(rows, ("problem", "solver", "budget"),
                      ("hvp_count", "rel_error", "damping_floor"))
    for ax, problem in zip(axes[0], problems, strict=True):
        mine = [r for r in stats if r["problem"] == problem]
        for solver in SOLVERS:
            pts = [r for r in mine if r["solver"] == solver and math.isfinite(r["rel_error"])]
            if pts:
                ax.errorbar([r["hvp_count"] for r in pts], [r["rel_error"] for r in pts],
                            yerr=[r["rel_error_std"] for r in pts], marker="o", capsize=2,
                            label=solver, linestyle="-" if len(pts) > 1 else "none")
        ax.axhline(mine[0]["damping_floor"], color="grey", linestyle=":", label="damping floor")
        ax.set(xscale="log", yscale="log", title=f"{problem} (mean ± std over seeds)",
               xlabel="HVPs", ylabel="relative error vs Dense f64")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_b(rows: list[dict], spectra: list[dict], path: Path) -> None:
    plt = _pyplot()
    rows = [r for r in rows if not r["sweep"]]
    spectra = [s for s in spectra if not s["sweep"]]
    problems = list(dict.fromkeys(r["problem"] for r in rows))
    errors = aggregate(rows, ("problem", "point", "solver"), ("rel_error",))
    eig = aggregate(spectra, ("problem", "point"), ("exact_min", "exact_max", "lanczos_min"))
    fig, axes = plt.subplots(2, len(problems), figsize=(6 * len(problems), 7),
                             constrained_layout=True, squeeze=False)
    for col, problem in enumerate(problems):
        mine = [e for e in eig if e["problem"] == problem]
        points = [e["point"] for e in mine]
        ax = axes[0][col]
        for solver in SOLVERS:
            found = [next((r for r in errors if r["problem"] == problem and r["point"] == p
                           and r["solver"] == solver), None) for p in points]
            ys = [np.nan if f is None or not math.isfinite(f["rel_error"]) else f["rel_error"]
                  for f in found]
            if not all(np.isnan(ys)):
                ax.plot(points, ys, marker="o", label=solver)
        ax.set(yscale="log", title=f"{problem}: error vs Dense at the same point (mean)",
               ylabel="relative error")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        ax = axes[1][col]
        for name, style, label in (("exact_max", "o-", "lambda_max (exact)"),
                                   ("exact_min", "o-", "lambda_min (exact)"),
                                   ("lanczos_min", "x--", f"lambda_min (Lanczos {LANCZOS_ITERS})")):
            ax.errorbar(points, [e[name] for e in mine], yerr=[e[f"{name}_std"] for e in mine],
                        fmt=style, capsize=2, label=label)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set(title="inner Hessian spectrum (symlog, linear within ±1e-3)", xlabel="point")
        ax.axhline(0, color="k", linewidth=0.5)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_c(curves: list[dict], path: Path, seed: int, panels=("outer_loss", "val_acc")) -> None:
    """Per task (columns): outer loss and validation accuracy against the outer step, one line
    per run of ``seed``."""
    plt = _pyplot()
    curves = [r for r in curves if r["seed"] == seed]
    tasks = list(dict.fromkeys(r["task"] for r in curves))
    fig, axes = plt.subplots(len(panels), len(tasks), figsize=(7 * len(tasks), 4 * len(panels)),
                             constrained_layout=True, squeeze=False)
    for col, task in enumerate(tasks):
        runs = list(dict.fromkeys((r["solver"], r["remedy"]) for r in curves
                                  if r["task"] == task))
        for solver, remedy in runs:
            mine = [r for r in curves if r["task"] == task and r["solver"] == solver
                    and r["remedy"] == remedy]
            style = "-" if remedy == "none" else "--"
            label = f"{solver}+{remedy}" if remedy != "none" else solver
            for row, panel in enumerate(panels):
                axes[row][col].plot([r["step"] for r in mine],
                                    [r.get(panel, math.nan) for r in mine], style, label=label)
        for row, panel in enumerate(panels):
            axes[row][col].set(title=f"{task} (seed {seed}): {panel}", xlabel="outer step")
            axes[row][col].grid(True, alpha=0.3)
            if panel in ("outer_loss", "hypergrad_norm"):
                axes[row][col].set_yscale("log")
        axes[0][col].legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_f(curves: list[dict], path: Path) -> None:
    """Validation accuracy against the outer step for every seed (the collapse), the undamped
    approximations on top, CG's remedies below."""
    plt = _pyplot()
    seeds = sorted({r["seed"] for r in curves})
    fig, axes = plt.subplots(2, len(seeds), figsize=(6 * len(seeds), 8), constrained_layout=True,
                             squeeze=False, sharey=True)
    for col, seed in enumerate(seeds):
        mine = [r for r in curves if r["seed"] == seed]
        base = [r for r in mine if r["solver"] == "cg" and r["remedy"] == "none"]
        axes[1][col].plot([r["step"] for r in base], [r["val_acc"] for r in base], "k-",
                          linewidth=2.5, alpha=0.3, label="cg (no remedy)")
        for (solver, remedy) in dict.fromkeys((r["solver"], r["remedy"]) for r in mine):
            run = [r for r in mine if r["solver"] == solver and r["remedy"] == remedy]
            row = 0 if remedy == "none" else 1
            label = solver if remedy == "none" else f"{solver}+{remedy}"
            axes[row][col].plot([r["step"] for r in run], [r["val_acc"] for r in run],
                                "-" if row == 0 else "--", label=label)
        axes[0][col].set(title=f"seed {seed}: undamped approximations, SGD lr {FORGET_LR:g} "
                               f"on λ", ylabel="validation accuracy")
        axes[1][col].set(title=f"seed {seed}: remedies on CG", xlabel="outer step",
                         ylabel="validation accuracy")
        for ax in axes[:, col]:
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# d. The written conclusion


def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int | np.integer):
        return str(x)
    return f"{x:.{digits}g}"


def _row_of(rows, **match):
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


NEUMANN_REPRO = """import jax.numpy as jnp, hvp
A = hvp.MatrixOperator(jnp.diag(jnp.array([1.0, 0.5, 0.1])))
b = jnp.ones(3)
for init in (None, jnp.array([3.0, 3.0, 3.0])):
    x, info = hvp.solve(A, b, hvp.Neumann(maxiter=100, alpha=1.0, tol=1e-6), init=init)
    print(init, x, hvp.Status(int(info.status)).name, int(info.iterations))"""

CG_WARM_REPRO = """import jax.numpy as jnp, hvp
A = hvp.MatrixOperator(jnp.diag(jnp.array([1.0, 0.5, 0.2, -0.01])))
b, x = jnp.ones(4), None
print("exact solution norm", float(jnp.linalg.norm(b / jnp.diag(A.matrix))))
for step in range(8):
    x, info = hvp.solve(A, b, hvp.CG(maxiter=19, tol=1e-4), init=x)
    print(step, hvp.Status(int(info.status)).name, float(jnp.linalg.norm(x)))"""


def run_snippet(code: str) -> str:
    """Run a reproduction snippet here and capture what it prints (the README shows both)."""
    import contextlib
    import io
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(code, {})  # noqa: S102 -- our own constant snippets
    return buffer.getvalue().rstrip()


def issues_section() -> list[str]:
    return ["## Warm starts: what this study found, and what the library now does", "",
            "1. `hvp.Neumann` with `init=` used to do zero iterations and return `init` "
            "unchanged (status DIVERGED) whenever `||b − A·init|| > divergence·||b||`, even on "
            "an SPD operator where the series from that start converges. Divergence is now "
            "measured against the larger of `||b||` and the start's own residual. The same "
            "snippet, run now (from zero and from the warm start):", "", "```python",
            NEUMANN_REPRO, "```", "```", run_snippet(NEUMANN_REPRO), "```", "",
            "2. On an indefinite operator, a loop that warm-starts CG from its previous "
            "NEGATIVE_CURVATURE answer grows the vector without bound (output of this run "
            "below). `ImplicitMethod(warm_start=True)` used to do exactly that; it now keeps "
            "the previous vector only after a CONVERGED, MAX_ITERATIONS or STAGNATED solve "
            "and otherwise starts from zero. A hand-written loop like this one still grows:",
            "", "```python", CG_WARM_REPRO, "```", "```", run_snippet(CG_WARM_REPRO), "```",
            "",
            "3. The trainer's history now records each solve's `status`; this study still "
            "counts 'early stops' as unconverged solves with `iterations < maxiter`.", ""]


def write_readme(out: Path, parts: dict, meta: dict) -> None:
    a_rows, b_rows, spectra = parts.get("a", []), parts.get("b", []), parts.get("spectra", [])
    c_summary, f_summary = parts.get("c", []), parts.get("f", [])
    machine = meta["machine"]
    text = [f"# Inverse-HVP approximations in implicit meta-learning ({meta['variant']} run)", "",
            f"Generated by `experiments/hvp_study.py --seeds {','.join(map(str, meta['seeds']))}"
            f"{' --smoke' if meta['variant'] == 'smoke' else ''}`"
            f"; parts run on {meta['dates']} ({meta['seconds']}). Every number below comes from "
            f"this run's CSVs; 'a ± b' is the mean and standard deviation over the "
            f"{len(meta['seeds'])} seeds (data split, initial weights, randomised solvers).", "",
            f"Machine: {machine['platform']}, CPU {machine['cpu_model']}, {machine['cores']} "
            f"cores, JAX {machine['jax']} on {machine['device']}, Python {machine['python']}, "
            f"library at commit {machine['library_commit']}. Times are medians of repeated calls "
            f"on a machine shared with other jobs (load average {meta['load']}): treat them as "
            f"rough.", ""]
    text += _section_a(a_rows) if a_rows else []
    text += _section_b(b_rows, spectra) if b_rows else []
    text += _section_c(c_summary, meta) if c_summary else []
    text += _section_f(f_summary, c_summary) if f_summary else []
    text += _section_conclusion(a_rows, b_rows, spectra, c_summary, f_summary)
    text += _section_advice(a_rows, b_rows, spectra, c_summary, f_summary)
    text += issues_section()
    text += ["## Files", "",
             "`a_accuracy_cost.csv`, `b_near_far.csv`, `b_spectra.csv`, `c_training.csv`, "
             "`c_summary.csv`, `f_training.csv`, `f_summary.csv` (one row per seed; the `.json` "
             "files hold the same rows for `--parts`), `a_accuracy_cost.png`, `b_near_far.png`, "
             "`c_training.png`, `f_forgetting.png`, `run.json` (settings and machine).", ""]
    (out / "README.md").write_text("\n".join(text))


def _section_a(rows) -> list[str]:
    base = [r for r in rows if not r["sweep"]]
    text = ["## a. Accuracy against cost at the inner optimum", "",
            "Reference: `bilevel.hypergrad` with `hvp.Dense()` in float64, undamped, at θ* from "
            "`problem.solve_inner`. Approximations run in float32 on `H + δI` with the settings "
            "of `bilevel compare-hvp` (Krylov `maxiter = budget − 1`, `tol = 0`, GMRES in "
            "restart cycles of at most 20; Neumann/LiSSA terms = budget with α = 1/λ̂_max; "
            "Nyström rank = budget, ρ = λ̂_max/10; Identity scale α; `unrolled-mixflow` = "
            "budget SGD steps of size α from θ*, differentiated by MixFlow-MG). 'floor' is the "
            "error of the exact damped solve. ridge has one scalar λ, so its cosine is only "
            "the sign of the hypergradient. `status` counts the seeds.", ""]
    for problem in dict.fromkeys(r["problem"] for r in base):
        mine = [r for r in base if r["problem"] == problem]
        head = aggregate(mine, ("problem",), ("num_params", "lambda_max", "damping",
                                              "damping_floor"))[0]
        stats = aggregate(mine, ("solver", "budget"), ("hvp_count", "rel_error", "cosine",
                                                       "time_ms", "time_ratio"), ("status",))
        text += [f"### {problem} ({_fmt(head['num_params'])} parameters, λ̂_max "
                 f"{_pm(head, 'lambda_max')}, δ {_fmt(head['damping'])}, floor "
                 f"{_pm(head, 'damping_floor')})", "",
                 _pm_table(stats, ["solver", "budget", "hvp_count", "rel_error", "cosine",
                                   "status", "time_ms", "time_ratio"],
                           {"rel_error", "cosine", "time_ratio"}), ""]
    sweep = [r for r in rows if r["problem"] == SWEEP_PROBLEM
             and (r["sweep"] or r["budget"] in (SWEEP_BUDGET, None))]
    if any(r["sweep"] for r in sweep):
        text += _damping_table(sweep, f"### Damping sweep ({SWEEP_PROBLEM}, budget "
                               f"{SWEEP_BUDGET}; Identity has no budget)",
                               "Relative error against the undamped reference; the last row is "
                               "the floor (the exact damped solve's error). δ = 0.0001 (the "
                               "default) over every seed, the other dampings on the first seed "
                               "only.")
    return text


def _damping_table(rows, title, note) -> list[str]:
    dampings = sorted({r["damping"] for r in rows})
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    stats = aggregate(rows, ("solver", "damping"), ("rel_error", "damping_floor"))
    header = ["solver"] + [f"δ = {_fmt(d)}" for d in dampings]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for solver in solvers:
        cells = [solver]
        for d in dampings:
            entry = _row_of(stats, solver=solver, damping=d)
            cells.append("" if entry is None else _pm(entry, "rel_error"))
        lines.append("| " + " | ".join(cells) + " |")
    floors = [_pm(_row_of(stats, damping=d), "damping_floor") for d in dampings]
    lines.append("| floor | " + " | ".join(floors) + " |")
    return [title, "", note, ""] + lines + [""]


def _section_b(rows, spectra) -> list[str]:
    base_spectra = [s for s in spectra if not s["sweep"]]
    base = [r for r in rows if not r["sweep"]]
    budgets = ", ".join(f"{b} ({p})" for p, b in
                        dict.fromkeys((s["problem"], s["budget"]) for s in base_spectra))
    eig = aggregate(base_spectra, ("problem", "point"),
                    ("inner_grad_norm", "lanczos_min", "lanczos_max", "exact_min", "exact_max",
                     "negative_eigenvalues", "neumann_contraction", "ift_error_vs_optimum",
                     "ift_cosine_vs_optimum"))
    text = ["## b. Near vs far from the inner optimum", "",
            f"Points: `adamK` = K Adam steps (lr {NEAR_FAR_LR}) from the problem's initial "
            f"parameters at the initial λ; `optimum` = θ*. At each point the reference is the "
            f"Dense solve of the *same* point's Hessian (so the error is the solver's alone); "
            f"`ift_error_vs_optimum` is how far that exact IFT formula at the point is from the "
            f"hypergradient at θ* (the error of not being converged). Budget: {budgets} "
            f"HVPs; α = 1/|λ̂| from power iteration at each point. Spectra: Lanczos "
            f"({LANCZOS_ITERS} products) and, for checking, `eigvalsh` of the dense Hessian. "
            f"`neumann_contraction` = max |1 − α(λ+δ)| over the exact spectrum: the Neumann "
            f"series diverges when it exceeds 1 and converges slowly when it is near 1. The "
            f"unrolled row starts its SGD steps at the point, so away from a stationary point "
            f"it differentiates a different quantity (where θ goes next) than the IFT.", "",
            _pm_table(eig, ["problem", "point", "inner_grad_norm", "lanczos_min", "exact_min",
                            "exact_max", "negative_eigenvalues", "neumann_contraction",
                            "ift_error_vs_optimum", "ift_cosine_vs_optimum"],
                      {"inner_grad_norm", "lanczos_min", "exact_min", "exact_max",
                       "negative_eigenvalues", "neumann_contraction", "ift_error_vs_optimum",
                       "ift_cosine_vs_optimum"}), "",
            "Relative error of each solver against the Dense solve at the same point (mean ± "
            "std; statuses over the seeds in brackets):", ""]
    errors = aggregate(base, ("problem", "point", "solver"), ("rel_error",), ("status",))
    solvers = list(dict.fromkeys(r["solver"] for r in base))
    header = ["problem", "point"] + solvers
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in eig:
        cells = [e["problem"], e["point"]]
        for solver in solvers:
            r = _row_of(errors, problem=e["problem"], point=e["point"], solver=solver)
            cells.append("" if r is None else f"{_pm(r, 'rel_error')} ({r['status']})")
        lines.append("| " + " | ".join(cells) + " |")
    text += lines + [""]
    sweep = [r for r in rows if r["problem"] == SWEEP_PROBLEM
             and r["seed"] == min(x["seed"] for x in rows)]
    if any(r["sweep"] for r in sweep):
        dampings = sorted({r["damping"] for r in sweep})
        text += [f"### Damping at each point ({SWEEP_PROBLEM}, seed {sweep[0]['seed']})", "",
                 "Relative error against the *undamped* Dense solve at the point (the floor is "
                 "the exact damped solve's); `λ_min + δ` > 0 makes the damped operator positive "
                 "definite.", ""]
        header = ["point", "δ", "λ_min + δ", "floor"] + solvers
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for point in dict.fromkeys(r["point"] for r in sweep):
            for d in dampings:
                spec = _row_of(spectra, problem=SWEEP_PROBLEM, seed=sweep[0]["seed"],
                               point=point, damping=d)
                cells = [point, _fmt(d), _fmt(spec["exact_min"] + d), _fmt(spec["damping_floor"])]
                for solver in solvers:
                    r = _row_of(sweep, point=point, damping=d, solver=solver)
                    cells.append("" if r is None else
                                 f"{_fmt(r['rel_error'])} ({r['status'].lower()})")
                lines.append("| " + " | ".join(cells) + " |")
        text += lines + [""]
    return text


SUMMARY_VALUES = ("final_outer_loss", "min_outer_loss", "best_val_acc", "final_val_acc",
                  "max_drawdown", "forgot", "collapsed", "early_stops", "skipped_steps",
                  "max_hypergrad_norm", "oscillation", "total_hvps", "max_log_decay", "seconds")


def _summary_table(summary, columns) -> str:
    stats = aggregate(summary, ("task", "solver", "remedy"), SUMMARY_VALUES)
    for entry in stats:
        for name in ("forgot", "collapsed"):
            entry[name] = f"{round(entry[name] * entry['n'])}/{entry['n']}"
    spread = set(SUMMARY_VALUES) - {"forgot", "collapsed"}
    return _pm_table(stats, columns, spread)


def _section_c(summary, meta) -> list[str]:
    return ["## c. Implicit meta-learning runs and remedies", "",
            f"`bilevel.train`, {meta['outer_steps']} outer steps, each after "
            f"{meta['inner_steps']} warm-started inner Adam steps (the `-far` task: 1 inner step "
            f"and 3× the outer learning rate, so θ stays far from θ* where the Hessian is "
            f"indefinite), outer Adam; solvers at "
            f"{meta['train_budget']} HVPs at most (stopping at relative residual {TRAIN_TOL}; "
            f"Identity: 0), α = 1/λ̂_max at the initial θ*. "
            f"Remedies: `damping=δ` for δ in {', '.join(map(str, meta['train_dampings']))}; "
            f"`ggn` = `curvature=` a "
            f"Gauss-Newton operator (`hvp.ggn` on (logits, params) so the decay's Hessian is "
            f"kept; data reweighting is a linear least-squares model whose GGN *is* its "
            f"Hessian, so it is skipped there); `warm_start=True`; `clip` = `hypergrad_clip` "
            f"at the unremedied run's median hypergradient norm. 'forgot' = validation "
            f"accuracy ends at least {FORGETTING_DROP} below its best (seeds that did); "
            f"'collapsed' = at some step it is at least {COLLAPSE_DROP} below its best so far; "
            f"'max_drawdown' = the largest such fall; 'oscillation' = fraction of sign changes "
            f"of successive outer-loss differences; 'early_stops' = unconverged solves that "
            f"stopped before their budget (CG: negative curvature; Neumann: divergence); "
            f"'max_log_decay' = the largest per-layer log weight decay reached.", "",
            _summary_table(summary, ["task", "solver", "remedy", "final_outer_loss",
                                     "best_val_acc", "final_val_acc", "max_drawdown", "forgot",
                                     "collapsed", "early_stops", "max_hypergrad_norm",
                                     "oscillation", "total_hvps", "seconds"]), ""]


def _section_f(summary, c_summary) -> list[str]:
    base = [s for s in summary if s["remedy"] == "none"]
    per_seed = ["| seed | solver | best_val_acc | max_drawdown | at step | final_val_acc | "
                "max_log_decay | max_hypergrad_norm | early_stops | skipped |",
                "|---|---|---|---|---|---|---|---|---|---|"]
    for s in base:
        per_seed.append(f"| {s['seed']} | {s['solver']} | {_fmt(s['best_val_acc'])} | "
                        f"{_fmt(s['max_drawdown'])} | {s['drawdown_step']} | "
                        f"{_fmt(s['final_val_acc'])} | {_fmt(s['max_log_decay'])} | "
                        f"{_fmt(s['max_hypergrad_norm'])} | {_fmt(s['early_stops'])} | "
                        f"{s['skipped_steps']} |")
    return ["## c (continued). Catastrophic forgetting: validation accuracy collapsing", "",
            f"Part c's runs move λ with Adam, whose step is at most about its learning rate "
            f"whatever the hypergradient's size; {sum(s['collapsed'] for s in c_summary)} of "
            f"its {len(c_summary)} runs collapsed (table above). Here "
            f"the digits MLP's per-layer log weight decay is trained with plain SGD "
            f"(learning rate {FORGET_LR:g}, {FORGET_STEPS} outer steps, each after 10 inner "
            f"Adam steps), so one outsized hypergradient moves λ by as much. Every solver runs "
            f"undamped at {TRAIN_BUDGET} HVPs at most (Dense: the exact solve of the same "
            f"undamped Hessian); the remedies are applied to CG. `f_forgetting.png` plots the "
            f"validation accuracy of every run against the outer step.", "",
            _summary_table(summary, ["task", "solver", "remedy", "best_val_acc",
                                     "final_val_acc", "max_drawdown", "collapsed", "forgot",
                                     "max_log_decay", "max_hypergrad_norm", "early_stops",
                                     "skipped_steps", "final_outer_loss"]), "",
            "Unremedied runs, per seed:", ""] + per_seed + [""]


def _mean_of(rows, name, **match):
    found = _finite(r.get(name) for r in rows if all(r.get(k) == v for k, v in match.items()))
    return (float(np.mean(found)), float(np.std(found)), len(found)) if found else (
        math.nan, math.nan, 0)


def _ms(rows, name, **match) -> str:
    mean, std, n = _mean_of(rows, name, **match)
    return "n/a" if not n else f"{_fmt(mean)} ± {_fmt(std, 2)}"


def _count(rows, name, **match) -> str:
    mine = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return f"{sum(bool(r[name]) for r in mine)}/{len(mine)}"


def _section_advice(a_rows, b_rows, spectra, c_summary, f_summary) -> list[str]:
    """The written conclusion: rules of thumb, each with this run's numbers behind it."""
    text = ["## Conclusion: which approximation to use when", ""]
    d = [r for r in a_rows if r["problem"] == SWEEP_PROBLEM and not r.get("sweep")]
    if d:
        b = SWEEP_BUDGET
        err = lambda solver, budget=b: _ms(d, "rel_error", solver=solver, budget=budget)  # noqa: E731
        ratio = lambda solver, budget=b: _ms(d, "time_ratio", solver=solver,  # noqa: E731
                                             budget=budget)
        floor = _ms(d, "damping_floor")
        small = min(r["budget"] for r in d if r["budget"] is not None)
        # Which solver had the smallest mean error at each (problem, budget >= 5)?
        means = aggregate([r for r in a_rows if not r.get("sweep") and r["budget"]],
                          ("problem", "budget", "solver"), ("rel_error",))
        winners = {(m["problem"], m["budget"]): min(
            (x for x in means if (x["problem"], x["budget"]) == (m["problem"], m["budget"])),
            key=lambda x: x["rel_error"])["solver"] for m in means if m["budget"] >= 5}
        others = sorted({f"{p} at {k}: {w}" for (p, k), w in winners.items()
                         if w not in ("cg", "minres", "gmres")})
        krylov = ("At every budget of 5 HVPs or more, on all three problems, one of them had "
                  "the smallest mean error (section a)" if not others else
                  "They had the smallest mean error at most budgets of 5 HVPs or more; "
                  f"exceptions: {', '.join(others)}")
        text += [
            f"1. **Inner problem converged, Hessian positive definite: a Krylov solver (CG, "
            f"or MINRES).** {krylov}. On {SWEEP_PROBLEM} at {b} HVPs CG's error is "
            f"{err('cg')} (floor {floor} from δ), MINRES {err('minres')}, GMRES "
            f"{err('gmres')}: equal within the spread over seeds; at {small} HVPs MINRES "
            f"({err('minres', small)}) beat CG ({err('cg', small)}). Time over the Identity "
            f"baseline at {b}: CG {ratio('cg')}, MINRES {ratio('minres')}, GMRES "
            f"{ratio('gmres')} (GMRES re-orthogonalises; every time here was taken on a "
            f"heavily shared machine). Prefer MINRES where the operator may be indefinite: it "
            f"does not stop at negative curvature, and it stayed bounded in the collapse runs "
            f"below (rule 7).",
            f"2. **Neumann and the unrolled meta-gradient are the same truncated series** "
            f"(Neumann {err('neumann')}, unrolled MixFlow {err('unrolled-mixflow')} at {b}; "
            f"identical to the digits shown). Their error falls like (1 − λ_min/λ_max)^k, so on "
            f"an ill-conditioned Hessian they need far more products than CG; the unroll also "
            f"costs {ratio('unrolled-mixflow')}× the baseline against Neumann's "
            f"{ratio('neumann')}×. Use the unroll when the inner optimizer is not at a fixed "
            f"point (its answer is then the derivative of where θ goes, not the IFT's).",
            f"3. **Identity is a direction, not a hypergradient**: cosine "
            f"{_ms(d, 'cosine', solver='identity')} but relative error {err('identity', None)}. "
            f"Acceptable only under an outer optimizer that normalises the step (Adam); with "
            f"plain SGD the scale is wrong by the Hessian's condition number.",
            f"4. **LiSSA** ({err('lissa', 50)} at 50) adds minibatch noise to Neumann's bias "
            f"({err('neumann', 50)}): only when a full-batch HVP is unaffordable. **Nyström** at "
            f"ρ = λ̂_max/10 plateaus ({err('nystrom', 50)} at rank 50): the directions the "
            f"sketch misses get 1/ρ, so it needs ρ tuned to the small eigenvalues.",
        ]
    sweep = [r for r in a_rows if r["problem"] == SWEEP_PROBLEM and r["solver"] == "cg"
             and r["budget"] == SWEEP_BUDGET]
    if any(r.get("sweep") for r in sweep):
        cells = ", ".join(f"δ = {_fmt(x)}: error {_ms(sweep, 'rel_error', damping=x)}"
                          for x in sorted({r["damping"] for r in sweep}))
        lam_min = _ms([s for s in spectra if not s.get("sweep")], "exact_min",
                      problem=SWEEP_PROBLEM, point="optimum")
        text.append(f"5. **Damping at θ* costs accuracy and buys nothing when H is positive "
                    f"definite**: CG at {SWEEP_BUDGET} HVPs on {SWEEP_PROBLEM}, {cells}. Keep "
                    f"δ well below λ_min (λ_min at θ* is {lam_min}); its job is elsewhere "
                    f"(rules 6 and 7).")
    far = [s for s in spectra if not s.get("sweep") and s["negative_eigenvalues"] > 0]
    if far:
        points = ", ".join(dict.fromkeys(f"{s['problem']} {s['point']}" for s in far))
        lanczos_gap = max(abs(s["lanczos_min"] - s["exact_min"]) / abs(s["exact_min"])
                          for s in spectra)
        near = [s for s in spectra if not s.get("sweep") and s["point"] == "adam1000"
                and s["problem"] == SWEEP_PROBLEM]
        text.append(
            f"6. **Far from the optimum the Hessian is indefinite ({points}) and no "
            f"inverse-HVP is meaningful**: the exact IFT there is "
            f"{_ms(far, 'ift_error_vs_optimum')} (relative, mean over those points) from the "
            f"hypergradient at θ*"
            + (f", against {_ms(near, 'ift_error_vs_optimum')} after 1000 Adam steps"
               if near else "")
            + f". Check the sign of Lanczos' λ_min (`hvp.extreme_eigenvalues`, "
            f"{LANCZOS_ITERS} products, was within {_fmt(100 * lanczos_gap, 2)}% of "
            f"`eigvalsh`'s at every point of section b) and converge the inner problem before "
            f"trusting any hypergradient.")
    if f_summary:
        runs = list(dict.fromkeys((s["solver"], s["remedy"]) for s in f_summary))
        collapsed = {run: sum(s["collapsed"] for s in f_summary
                              if (s["solver"], s["remedy"]) == run) for run in runs}
        n = len({s["seed"] for s in f_summary})
        undamped = [f"{sol} {k}/{n}" for (sol, rem), k in collapsed.items() if rem == "none"]
        remedied = [f"{rem} {k}/{n}" for (sol, rem), k in collapsed.items()
                    if rem != "none" and sol == "cg"]
        c_collapsed = sum(s["collapsed"] for s in c_summary)
        c_which = "".join(f" ({s['task']} {s['solver']}+{s['remedy']}, seed {s['seed']}: "
                          f"validation accuracy {_fmt(s['best_val_acc'])} → "
                          f"{_fmt(s['final_val_acc'])})" for s in c_summary if s["collapsed"])
        fixed = [rem for (sol, rem), k in collapsed.items()
                 if rem != "none" and sol == "cg" and not k]
        norms = ", ".join(f"{sol}{'' if rem == 'none' else '+' + rem} "
                          f"{_ms(f_summary, 'max_hypergrad_norm', solver=sol, remedy=rem)}"
                          for sol, rem in runs)
        text.append(
            f"7. **Catastrophic forgetting comes from an unbounded outer step on a hypergradient "
            f"from an indefinite or nearly singular Hessian.** With Adam on λ (part c) "
            f"{c_collapsed} of {len(c_summary)} runs collapsed{c_which}. With plain SGD on λ "
            f"(learning rate {FORGET_LR:g}) the seeds whose validation accuracy collapsed "
            f"were, undamped: {', '.join(undamped)}; CG with each remedy: "
            f"{', '.join(remedied)}. No seed collapsed with "
            f"{', '.join(fixed) if fixed else 'any remedy'}. The largest hypergradient norm "
            f"per run (before clipping; mean over seeds): {norms}. Undamped CG stops at the "
            f"first negative-curvature direction with a vector that can be large, and the "
            f"exact (Dense) undamped solve is no safer, "
            f"since it inverts the near-zero and negative eigenvalues exactly; MINRES, Neumann "
            f"(with its divergence stop) and Identity stayed bounded. A damping below |λ_min| "
            f"leaves the operator indefinite, and a warm start solves the same indefinite "
            f"system. In practice: bound the outer step (Adam or "
            f"`hypergrad_clip`) and make the operator positive definite (damping above "
            f"|λ_min|, or the GGN); far from θ* even that does not make the hypergradient "
            f"right (rule 6){', as the part c collapse shows' if c_collapsed else ''}.")
    text.append("")
    return text


def _section_conclusion(a_rows, b_rows, spectra, c_summary, f_summary) -> list[str]:
    text = ["## d. Which approximation to use when (numbers from this run)", ""]
    base = [r for r in a_rows if not r.get("sweep")]
    for problem in dict.fromkeys(r["problem"] for r in base):
        mine = [r for r in base if r["problem"] == problem]
        stats = aggregate(mine, ("solver", "budget"), ("hvp_count", "rel_error",
                                                       "damping_floor"))
        floor = float(np.mean([r["damping_floor"] for r in mine]))
        target = max(10 * floor, 1e-2)
        good = sorted((r for r in stats if r["rel_error"] <= target),
                      key=lambda r: (r["hvp_count"], r["rel_error"]))
        best = {}
        for r in stats:
            if math.isfinite(r["rel_error"]) and (r["solver"] not in best or r["rel_error"]
                                                   < best[r["solver"]]["rel_error"]):
                best[r["solver"]] = r
        reach = (f"the cheapest variant within {_fmt(target)} mean relative error is "
                 f"{good[0]['solver']} at {_fmt(good[0]['hvp_count'])} HVPs"
                 if good else f"no variant reached {_fmt(target)} mean relative error")
        parts = ", ".join(f"{s} {_pm(r, 'rel_error')} ({_fmt(r['hvp_count'])} HVPs)"
                          for s, r in best.items())
        text.append(f"- **{problem} at θ***: {reach}. Best per solver: {parts}.")
    if base:
        mid = SWEEP_BUDGET
        d = [r for r in base if r["problem"] == SWEEP_PROBLEM]
        if d:
            text.append(
                f"- **Same budget, {SWEEP_PROBLEM}, {mid} HVPs**: CG "
                f"{_ms(d, 'rel_error', solver='cg', budget=mid)}, "
                f"MINRES {_ms(d, 'rel_error', solver='minres', budget=mid)}, GMRES "
                f"{_ms(d, 'rel_error', solver='gmres', budget=mid)}, Neumann "
                f"{_ms(d, 'rel_error', solver='neumann', budget=mid)}, unrolled MixFlow "
                f"{_ms(d, 'rel_error', solver='unrolled-mixflow', budget=mid)}, LiSSA "
                f"{_ms(d, 'rel_error', solver='lissa', budget=mid)}, Nyström "
                f"{_ms(d, 'rel_error', solver='nystrom', budget=mid)}, Identity "
                f"{_ms(d, 'rel_error', solver='identity')} (cosine "
                f"{_ms(d, 'cosine', solver='identity')}). Time over the Identity baseline: CG "
                f"{_ms(d, 'time_ratio', solver='cg', budget=mid)}, Neumann "
                f"{_ms(d, 'time_ratio', solver='neumann', budget=mid)}, unrolled "
                f"{_ms(d, 'time_ratio', solver='unrolled-mixflow', budget=mid)}.")
    sweep = [r for r in a_rows if r["problem"] == SWEEP_PROBLEM
             and r["budget"] in (SWEEP_BUDGET,) and r["solver"] == "cg"]
    if any(r.get("sweep") for r in sweep):
        cells = ", ".join(f"δ = {_fmt(dd)}: {_ms(sweep, 'rel_error', damping=dd)} (floor "
                          f"{_ms(sweep, 'damping_floor', damping=dd)})"
                          for dd in sorted({r['damping'] for r in sweep}))
        text.append(f"- **Damping at θ*** ({SWEEP_PROBLEM}, CG at {SWEEP_BUDGET} HVPs): "
                    f"{cells}.")
    for s in aggregate([s for s in spectra if not s.get("sweep")], ("problem", "point"),
                       ("exact_min", "exact_max", "negative_eigenvalues",
                        "ift_error_vs_optimum", "neumann_contraction")):
        if s["negative_eigenvalues"] > 0:
            rows = [r for r in b_rows if r["problem"] == s["problem"]
                    and r["point"] == s["point"] and not r.get("sweep")]
            cg = aggregate([r for r in rows if r["solver"] == "cg"], ("solver",), (),
                           ("status",))[0]["status"]
            text.append(
                f"- **{s['problem']} at {s['point']}**: indefinite (λ_min {_pm(s, 'exact_min')}, "
                f"{_pm(s, 'negative_eigenvalues')} negative eigenvalues); CG {cg}, error "
                f"{_ms(rows, 'rel_error', solver='cg')}; MINRES "
                f"{_ms(rows, 'rel_error', solver='minres')}; Neumann "
                f"{_ms(rows, 'rel_error', solver='neumann')} (contraction "
                f"{_pm(s, 'neumann_contraction')}); and the exact IFT there is "
                f"{_pm(s, 'ift_error_vs_optimum')} (relative) from the θ* hypergradient.")
    for task in dict.fromkeys(s["task"] for s in c_summary):
        mine = [s for s in c_summary if s["task"] == task]
        parts = "; ".join(f"{solver}: final outer loss "
                          f"{_ms(mine, 'final_outer_loss', solver=solver, remedy='none')}, "
                          f"collapsed {_count(mine, 'collapsed', solver=solver, remedy='none')}"
                          for solver in dict.fromkeys(s["solver"] for s in mine))
        text.append(f"- **Training, {task} (Adam on λ)**: {parts}; all runs with a remedy "
                    f"collapsed {sum(s['collapsed'] for s in mine if s['remedy'] != 'none')}"
                    f"/{sum(s['remedy'] != 'none' for s in mine)}.")
    if f_summary:
        runs = list(dict.fromkeys((s["solver"], s["remedy"]) for s in f_summary))
        parts = "; ".join(f"{solver}{'' if remedy == 'none' else '+' + remedy}: collapsed "
                          f"{_count(f_summary, 'collapsed', solver=solver, remedy=remedy)}, "
                          f"drawdown {_ms(f_summary, 'max_drawdown', solver=solver, remedy=remedy)}"
                          for solver, remedy in runs)
        text.append(f"- **Training with SGD on λ (forgetting)**: {parts}.")
    text.append("")
    return text


# --------------------------------------------------------------------------------------------
# Main

#: Part -> the row lists it writes (CSV and JSON files of the same stem).
PART_FILES = {"a": ("a_accuracy_cost",), "b": ("b_near_far", "b_spectra"),
              "c": ("c_training", "c_summary"), "f": ("f_training", "f_summary")}


def _save(out: Path, stem: str, rows: list[dict]) -> None:
    write_csv(rows, out / f"{stem}.csv")
    (out / f"{stem}.json").write_text(json.dumps(rows, allow_nan=True) + "\n")


def _load(out: Path, stem: str) -> list[dict]:
    path = out / f"{stem}.json"
    return json.loads(path.read_text()) if path.exists() else []


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") \
            from None
    if not seeds or any(x < 0 for x in seeds):
        raise argparse.ArgumentTypeError(f"seeds must be integers >= 0, got {text!r}")
    return seeds


def _parts(text: str) -> tuple[str, ...]:
    parts = tuple(x for x in text.split(",") if x and x != "readme")
    if any(x not in PART_FILES for x in parts) or not (parts or text == "readme"):
        raise argparse.ArgumentTypeError(f"parts must be a comma list from "
                                         f"{','.join(PART_FILES)} (or readme), got {text!r}")
    return parts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/hvp_study"))
    parser.add_argument("--seeds", type=_seeds, default=SEEDS,
                        help="comma list of seeds (default: 0,1,2)")
    parser.add_argument("--parts", type=_parts, default=tuple(PART_FILES),
                        help="comma list of parts to run (default: a,b,c,f; 'readme': none); "
                        "the README is rebuilt from every part's rows found under --out")
    parser.add_argument("--smoke", action="store_true", help="a tiny fast variant")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    run_path = args.out / "run.json"
    meta = json.loads(run_path.read_text()) if run_path.exists() else {}
    variant = "smoke" if args.smoke else "full"
    if meta.get("seeds") != list(args.seeds) or meta.get("variant") != variant:
        meta = {}  # another run's parts do not belong to this one
        for stems in PART_FILES.values():
            for stem in stems:
                (args.out / f"{stem}.json").unlink(missing_ok=True)
    seeds = args.seeds
    if args.smoke:
        problems_a, near_far, steps = SMOKE_BUDGETS, ("logistic_l2",), (1, 10)
        budget, repeats, outer_steps, forget_steps = 5, 1, 4, 4
        builders, dampings, sweep = [reweighting_task], TRAIN_DAMPINGS[1:2], False
    else:
        problems_a, near_far, steps, budget, repeats = (BUDGETS, ("logistic_l2", "digits_mlp"),
                                                        NEAR_FAR_STEPS, NEAR_FAR_BUDGET, 3)
        outer_steps, forget_steps, dampings, sweep = 40, FORGET_STEPS, TRAIN_DAMPINGS, True
        builders = [reweighting_task, digits_task, lambda seed: far_task(digits_task(seed))]
    setups: dict = {}
    meta.setdefault("parts", {})
    for part in args.parts:
        begin = time.perf_counter()
        if part == "a":
            rows, setups = part_a(problems_a, seeds, repeats, sweep)
            _save(args.out, "a_accuracy_cost", rows)
        elif part == "b":
            rows, spectra = part_b(setups, near_far, seeds, steps, budget, repeats, sweep)
            _save(args.out, "b_near_far", rows)
            _save(args.out, "b_spectra", spectra)
        elif part == "c":
            curves, summary = part_c(builders, seeds, outer_steps, TRAIN_BUDGET, dampings)
            _save(args.out, "c_training", curves)
            _save(args.out, "c_summary", summary)
        elif part == "f":
            curves, summary = part_f(seeds[:1] if args.smoke else seeds, forget_steps,
                                     TRAIN_BUDGET, dampings)
            _save(args.out, "f_training", curves)
            _save(args.out, "f_summary", summary)
        meta["parts"][part] = {"date": datetime.datetime.now(datetime.UTC).strftime(
            "%Y-%m-%d %H:%M UTC"), "seconds": round(time.perf_counter() - begin),
            "load_average": [round(x, 2) for x in os.getloadavg()]}
        print(f"part {part}: {meta['parts'][part]['seconds']} s", flush=True)
        meta.update({
            "variant": variant, "seeds": list(seeds), "machine": machine(),
            "outer_steps": outer_steps, "inner_steps": 10, "train_budget": TRAIN_BUDGET,
            "train_dampings": list(dampings), "forget_lr": FORGET_LR,
            "forget_steps": forget_steps, "budgets": {k: list(v) for k, v in problems_a.items()},
            "near_far_steps": list(steps), "near_far_budget": budget})
        if run_path.exists():  # keep the timings of parts run meanwhile by another process
            on_disk = json.loads(run_path.read_text()).get("parts", {})
            meta["parts"] = {**on_disk, **meta["parts"]}
        run_path.write_text(json.dumps(meta, indent=2) + "\n")
    loaded = {part: _load(args.out, stem) for part, stem in
              (("a", "a_accuracy_cost"), ("b", "b_near_far"), ("spectra", "b_spectra"),
               ("c", "c_summary"), ("f", "f_summary"))}
    # Plots are drawn from the saved rows, so a part run alone redraws nothing else.
    if loaded["a"]:
        plot_a(loaded["a"], args.out / "a_accuracy_cost.png")
    if loaded["b"]:
        plot_b(loaded["b"], loaded["spectra"], args.out / "b_near_far.png")
    curves = _load(args.out, "c_training")
    if curves:
        plot_c(curves, args.out / "c_training.png", min(r["seed"] for r in curves))
    curves = _load(args.out, "f_training")
    if curves:
        plot_f(curves, args.out / "f_forgetting.png")
    parts = meta.get("parts", {})
    meta_text = dict(meta, dates=", ".join(f"{k}: {v['date']}" for k, v in parts.items()),
                     seconds=", ".join(f"{k}: {v['seconds']} s" for k, v in parts.items()),
                     load="; ".join(f"{k}: {v['load_average'][0]}" for k, v in parts.items()
                                    if v.get("load_average")) or "not recorded")
    write_readme(args.out, loaded, meta_text)
    print(f"wrote {args.out}/README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
