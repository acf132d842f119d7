"""Inverse-HVP approximations inside implicit meta-learning: accuracy, failure modes, remedies.

Four parts, each writing a CSV under ``--out`` (default ``experiments/results/hvp_study``):

a. ``a_accuracy_cost.csv``: on ridge, logistic_l2 and digits_mlp, every approximation (CG, MINRES,
   Neumann, Nyström, LiSSA, Identity) at a few HVP budgets against the float64 Dense
   hypergradient at θ*: relative error, cosine, HVP count, wall time. This is the measuring core
   of ``bilevel compare-hvp`` (:func:`bilevel.cli.prepare` and :func:`bilevel.cli.compare_hvp`),
   called as is.
b. ``b_near_far.csv`` / ``b_spectra.csv``: the same comparison at points partway through inner
   training (k Adam steps from the initial parameters) and at θ*, each against the Dense solve
   at that point, with Lanczos extreme eigenvalues of the inner Hessian (and the exact ones from
   the dense Hessian, to check Lanczos). :func:`bilevel.cli.compare_hvp` is reused with a
   :class:`bilevel.cli.Setup` built at each point.
c. ``c_training.csv`` (one row per outer step) and ``c_summary.csv`` (one row per run):
   ``bilevel.train`` on data reweighting and per-layer L2 of the digits MLP under Identity,
   Neumann and CG, then each remedy (damping, GGN curvature, warm starts, hypergradient
   clipping) against the unremedied run.
d. ``README.md``: the conclusion, every number filled in from this run, plus the machine.

Run ``python experiments/hvp_study.py`` (about 10 minutes on 2 CPU cores) or ``--smoke``.
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
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)  # the Dense references are float64

import _common  # noqa: E402  (experiments/ is on sys.path when run as a script)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import bilevel  # noqa: E402
import hvp  # noqa: E402
from bilevel import cli  # noqa: E402

SOLVERS = ("cg", "minres", "neumann", "nystrom", "lissa", "identity")
#: HVP budgets per problem (ridge and logistic_l2 have 10 parameters: Nyström's rank <= 10).
BUDGETS = {"ridge": (2, 5, 10), "logistic_l2": (2, 5, 10), "digits_mlp": (5, 20, 50)}
SMOKE_BUDGETS = {"ridge": (2, 5), "logistic_l2": (2, 5)}
#: Part b: inner Adam steps from the initial parameters, then θ* (from problem.solve_inner).
NEAR_FAR_STEPS = (0, 1, 10, 100, 1000)
NEAR_FAR_LR = 1e-2
NEAR_FAR_BUDGET = 20
LANCZOS_ITERS = 60
#: Part c: a run "forgot" when its validation accuracy ends this far below its best.
FORGETTING_DROP = 0.05
#: Part c: relative residual at which CG and Neumann stop (and count as converged).
TRAIN_TOL = 1e-4
TRAIN_BUDGET = 20
TRAIN_DAMPING = 1e-2


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


def part_a(problems: dict, seed: int, repeats: int) -> tuple[list[dict], dict]:
    rows, setups = [], {}
    for problem, budgets in problems.items():
        config = cli.CompareHvpConfig(problem=problem, solvers=SOLVERS, budgets=budgets,
                                      seed=seed, repeats=repeats, jobs=os.cpu_count() or 1)
        begin = time.perf_counter()
        setup = cli.prepare(config)
        found, metadata = cli.compare_hvp(config, setup)
        print(f"[a] {problem}: {len(found)} variants in {time.perf_counter() - begin:.1f} s")
        for row in found:
            rows.append({"problem": problem, **row, "num_params": setup.num_params,
                         "lambda_max": setup.lambda_max, "damping": config.damping,
                         "damping_floor": setup.damping_floor})
        setups[problem] = (config, setup)
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


def setup_at(config: cli.CompareHvpConfig, base: cli.Setup, params) -> tuple[cli.Setup, dict]:
    """A :class:`bilevel.cli.Setup` at ``params`` (reference: Dense at this point) and facts
    about the point: gradient norm, spectrum (Lanczos and exact), IFT error vs θ*."""
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
        top = hvp.power_iteration(damped, cli.POWER_ITERS, jax.random.key(config.seed))[0]
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
    setup = cli.Setup(problem, (*cast(data), jnp.asarray(damping, dtype)), reference,
                      float(np.linalg.norm(tree_vector(damped) - ref) / np.linalg.norm(ref)),
                      lambda_max, 1.0 / lambda_max, lambda_max / 10,
                      float(np.linalg.norm(tree_vector(grad_outer))), base.num_params)
    return setup, info


def part_b(setups: dict, problems: tuple[str, ...], steps: tuple[int, ...], budget: int,
           repeats: int) -> tuple[list[dict], list[dict]]:
    rows, spectra = [], []
    for name in problems:
        base_config, base = setups[name]
        # Nyström's rank is the budget and cannot exceed the parameter count.
        config = dataclasses.replace(base_config, budgets=(min(budget, base.num_params),),
                                     repeats=repeats)
        for point, params in adam_points(base.problem, steps, NEAR_FAR_LR).items():
            begin = time.perf_counter()
            setup, info = setup_at(config, base, params)
            found, _ = cli.compare_hvp(config, setup)
            spectra.append({"problem": name, "point": point, **info,
                             "damping": config.damping, "damping_floor": setup.damping_floor})
            for row in found:
                rows.append({"problem": name, "point": point, **row, **info})
            spectra[-1]["budget"] = config.budgets[0]
            print(f"[b] {name} {point}: lambda in [{info['exact_min']:.3g}, "
                  f"{info['exact_max']:.3g}], {time.perf_counter() - begin:.1f} s")
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
    return Task("reweighting", problem, 10, 0.1, 0.3, metrics, None)


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

    return Task("digits_mlp", problem, 10, 1e-2, 0.3, metrics, mlp_ggn)


def far_task(task: Task) -> Task:
    """The same problem kept far from θ*: one inner step per outer step and a larger outer
    learning rate, so the hypergradient is taken where the Hessian is still indefinite."""
    return dataclasses.replace(task, name=f"{task.name}-far", inner_steps=1,
                               outer_lr=3 * task.outer_lr)


def train_run(task: Task, method, outer_steps: int, clip: float | None, seed: int):
    config = bilevel.TrainerConfig(outer_steps=outer_steps, inner_steps=task.inner_steps,
                                   inner_optimizer=optax.adam(task.inner_lr),
                                   outer_optimizer=optax.adam(task.outer_lr), method=method,
                                   hypergrad_clip=clip, seed=seed)
    begin = time.perf_counter()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
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
    return {
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


def part_c(tasks: list[Task], setups: dict, outer_steps: int, budget: int, damping: float,
           seed: int) -> tuple[list[dict], list[dict]]:
    curves, summary = [], []
    for task in tasks:
        # α = 1/λ̂_max at the initial λ's θ*, as in part a (from cli.prepare's power iteration).
        alpha = _alpha_at_optimum(task.problem, seed)
        baselines = {
            "identity": hvp.Identity(scale=alpha),
            "neumann": hvp.Neumann(maxiter=budget - 1, alpha=alpha, tol=TRAIN_TOL),
            "cg": hvp.CG(maxiter=budget - 1, tol=TRAIN_TOL),
        }
        runs = []
        for solver_name, solver in baselines.items():
            runs.append((solver_name, "none", bilevel.ImplicitMethod(solver=solver), "base"))
        for solver_name in ("neumann", "cg"):
            solver = baselines[solver_name]
            runs.append((solver_name, "damping", bilevel.ImplicitMethod(solver=solver,
                                                                        damping=damping), None))
            if task.ggn is not None:
                runs.append((solver_name, "ggn", bilevel.ImplicitMethod(solver=solver,
                                                                        curvature=task.ggn), None))
            runs.append((solver_name, "warm_start",
                         bilevel.ImplicitMethod(solver=solver, warm_start=True), None))
        base_norms = {}
        for solver_name, remedy, method, _ in runs:
            result, seconds = train_run(task, method, outer_steps, None, seed)
            _record(task, solver_name, remedy, result, seconds, None, curves, summary)
            if remedy == "none":
                base_norms[solver_name] = summary[-1]["median_hypergrad_norm"]
        for solver_name in baselines:
            clip = base_norms[solver_name]
            if not (math.isfinite(clip) and clip > 0):
                continue
            method = bilevel.ImplicitMethod(solver=baselines[solver_name])
            result, seconds = train_run(task, method, outer_steps, clip, seed)
            _record(task, solver_name, "clip", result, seconds, clip, curves, summary)
    return curves, summary


def _alpha_at_optimum(problem, seed: int) -> float:
    params = problem.solve_inner(problem.params, problem.hparams, *problem.inner_args)
    operator = hvp.hessian(problem.inner_loss, params, problem.hparams, *problem.inner_args)
    top = hvp.power_iteration(operator, cli.POWER_ITERS, jax.random.key(seed))[0]
    return 1.0 / abs(float(top))


def _record(task, solver_name, remedy, result, seconds, clip, curves, summary):
    for row in result.history:
        curves.append({"task": task.name, "solver": solver_name, "remedy": remedy,
                       **{k: v for k, v in row.items() if k != "wall_time"}})
    summary.append({"task": task.name, "solver": solver_name, "remedy": remedy,
                    "clip": clip, **summarise(result.history, TRAIN_BUDGET - 1),
                    "seconds": seconds,
                    "compile_s": result.compile_time})
    s = summary[-1]
    if solver_name == "identity":  # Identity never iterates: these columns say nothing about it
        s["zero_iteration_solves"] = s["early_stops"] = None
    print(f"[c] {task.name} {solver_name:8s} {remedy:10s} loss {s['initial_outer_loss']:.4g}"
          f" -> {s['final_outer_loss']:.4g}, acc best {s['best_val_acc']:.3f} final "
          f"{s['final_val_acc']:.3f}, skipped {s['skipped_steps']}, {seconds:.1f} s")


# --------------------------------------------------------------------------------------------
# Plots


def plot_a(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(dict.fromkeys(r["problem"] for r in rows))
    fig, axes = plt.subplots(1, len(problems), figsize=(5 * len(problems), 4),
                             constrained_layout=True, squeeze=False)
    for ax, problem in zip(axes[0], problems, strict=True):
        mine = [r for r in rows if r["problem"] == problem]
        for solver in SOLVERS:
            pts = [(r["hvp_count"], r["rel_error"]) for r in mine
                   if r["solver"] == solver and math.isfinite(r["rel_error"])]
            if pts:
                ax.plot(*zip(*pts, strict=False), marker="o", label=solver,
                        linestyle="-" if len(pts) > 1 else "none")
        ax.axhline(mine[0]["damping_floor"], color="grey", linestyle=":", label="damping floor")
        ax.set(xscale="log", yscale="log", title=problem, xlabel="HVPs",
               ylabel="relative error vs Dense f64")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_b(rows: list[dict], spectra: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(dict.fromkeys(r["problem"] for r in rows))
    fig, axes = plt.subplots(2, len(problems), figsize=(6 * len(problems), 7),
                             constrained_layout=True, squeeze=False)
    for col, problem in enumerate(problems):
        points = [s["point"] for s in spectra if s["problem"] == problem]
        ax = axes[0][col]
        for solver in SOLVERS:
            ys = [next((r["rel_error"] for r in rows if r["problem"] == problem
                        and r["point"] == p and r["solver"] == solver), math.nan)
                  for p in points]
            ys = [y if math.isfinite(y) else np.nan for y in ys]
            ax.plot(points, ys, marker="o", label=solver)
        ax.set(yscale="log", title=f"{problem}: error vs Dense at the same point",
               ylabel="relative error")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        ax = axes[1][col]
        mine = [s for s in spectra if s["problem"] == problem]
        ax.plot(points, [s["exact_max"] for s in mine], marker="o", label="lambda_max (exact)")
        ax.plot(points, [s["exact_min"] for s in mine], marker="o", label="lambda_min (exact)")
        ax.plot(points, [s["lanczos_min"] for s in mine], marker="x", linestyle="--",
                label=f"lambda_min (Lanczos {LANCZOS_ITERS})")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set(title="inner Hessian spectrum (symlog, linear within ±1e-3)", xlabel="point")
        ax.axhline(0, color="k", linewidth=0.5)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_c(curves: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in curves))
    fig, axes = plt.subplots(2, len(tasks), figsize=(7 * len(tasks), 8),
                             constrained_layout=True, squeeze=False)
    for col, task in enumerate(tasks):
        runs = list(dict.fromkeys((r["solver"], r["remedy"]) for r in curves
                                  if r["task"] == task))
        for solver, remedy in runs:
            mine = [r for r in curves if r["task"] == task and r["solver"] == solver
                    and r["remedy"] == remedy]
            style = "-" if remedy == "none" else "--"
            label = f"{solver}+{remedy}" if remedy != "none" else solver
            axes[0][col].plot([r["step"] for r in mine], [r["outer_loss"] for r in mine], style,
                              label=label)
            axes[1][col].plot([r["step"] for r in mine], [r["val_acc"] for r in mine], style,
                              label=label)
        axes[0][col].set(title=f"{task}: outer loss", yscale="log")
        axes[1][col].set(title=f"{task}: validation accuracy", xlabel="outer step")
        for ax in axes[:, col]:
            ax.grid(True, alpha=0.3)
        axes[0][col].legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# d. The written conclusion


def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}"


def _table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) if not isinstance(r.get(c), str)
                                       else r[c] for c in columns) + " |")
    return "\n".join(lines)


def best_at_budget(rows: list[dict], problem: str) -> list[dict]:
    """For each solver, its row with the smallest error on ``problem``."""
    out = []
    for solver in SOLVERS:
        mine = [r for r in rows if r["problem"] == problem and r["solver"] == solver]
        if mine:
            out.append(min(mine, key=lambda r: r["rel_error"] if math.isfinite(r["rel_error"])
                           else math.inf))
    return out


def write_readme(out: Path, a_rows, b_rows, spectra, c_summary, meta: dict) -> None:
    text = [f"# Inverse-HVP approximations in implicit meta-learning ({meta['variant']} run)", "",
            f"Generated by `experiments/hvp_study.py --seed {meta['seed']}"
            f"{' --smoke' if meta['variant'] == 'smoke' else ''}` on {meta['date']} in "
            f"{meta['seconds']:.0f} s. Every number below comes from this run's CSVs.", "",
            f"Machine: {meta['machine']['platform']}, CPU {meta['machine']['cpu_model']}, "
            f"{meta['machine']['cores']} cores, JAX {meta['machine']['jax']} on "
            f"{meta['machine']['device']}, Python {meta['machine']['python']}, library at commit "
            f"{meta['machine']['library_commit']}. Times are "
            f"medians of repeated calls on a shared machine: treat them as rough.", ""]
    text += _section_a(a_rows)
    text += _section_b(b_rows, spectra)
    text += _section_c(c_summary, meta)
    text += _section_recommendation(a_rows, spectra, b_rows, c_summary)
    text += _section_conclusion(a_rows, b_rows, spectra, c_summary)
    text += issues_section()
    text += ["## Files", "",
             "`a_accuracy_cost.csv`, `b_near_far.csv`, `b_spectra.csv`, `c_training.csv`, "
             "`c_summary.csv`, `a_accuracy_cost.png`, `b_near_far.png`, `c_training.png`, "
             "`run.json` (settings and machine).", ""]
    (out / "README.md").write_text("\n".join(text))


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


def _section_a(rows) -> list[str]:
    text = ["## a. Accuracy against cost at the inner optimum", "",
            "Reference: `bilevel.hypergrad` with `hvp.Dense()` in float64, undamped, at θ* from "
            "`problem.solve_inner`. Approximations run in float32 on `H + δI` with the settings "
            "of `bilevel compare-hvp` (Krylov `maxiter = budget − 1`, `tol = 0`; Neumann/LiSSA "
            "terms = budget with α = 1/λ̂_max; Nyström rank = budget, ρ = λ̂_max/10; Identity "
            "scale α). 'floor' is the error of the exact damped solve. ridge has one scalar λ, "
            "so its cosine is only the sign of the hypergradient.", ""]
    for problem in dict.fromkeys(r["problem"] for r in rows):
        mine = [r for r in rows if r["problem"] == problem]
        first = mine[0]
        text += [f"### {problem} ({first['num_params']} parameters, λ̂_max "
                 f"{_fmt(first['lambda_max'])}, δ {_fmt(first['damping'])}, floor "
                 f"{_fmt(first['damping_floor'])})", "",
                 _table(mine, ["solver", "budget", "hvp_count", "rel_error", "cosine", "status",
                               "time_ms", "time_ratio"]), ""]
    return text


def _section_b(rows, spectra) -> list[str]:
    if not rows:
        return []
    budgets = ", ".join(f"{b} ({p})" for p, b in
                        dict.fromkeys((s["problem"], s["budget"]) for s in spectra))
    text = ["## b. Near vs far from the inner optimum", "",
            f"Points: `adamK` = K Adam steps (lr {NEAR_FAR_LR}) from the problem's initial "
            f"parameters at the initial λ; `optimum` = θ*. At each point the reference is the "
            f"Dense solve of the *same* point's Hessian (so the error is the solver's alone); "
            f"`ift_error_vs_optimum` is how far that exact IFT formula at the point is from the "
            f"hypergradient at θ* (the error of not being converged). Budget: {budgets} "
            f"HVPs; α = 1/|λ̂| from power iteration at each point. Spectra: Lanczos "
            f"({LANCZOS_ITERS} products) and, for checking, `eigvalsh` of the dense Hessian. "
            f"`neumann_contraction` = max |1 − α(λ+δ)| over the exact spectrum: the Neumann "
            f"series diverges when it exceeds 1 and converges slowly when it is near 1.", "",
            _table(spectra, ["problem", "point", "inner_grad_norm", "lanczos_min",
                             "lanczos_max", "exact_min", "exact_max", "negative_eigenvalues",
                             "neumann_contraction", "ift_error_vs_optimum"]), "",
            "Relative error of each solver against the Dense solve at the same point "
            "(status in brackets):", ""]
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    header = ["problem", "point"] + solvers
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in spectra:
        cells = [s["problem"], s["point"]]
        for solver in solvers:
            r = next((r for r in rows if r["problem"] == s["problem"]
                      and r["point"] == s["point"] and r["solver"] == solver), None)
            cells.append("" if r is None else f"{_fmt(r['rel_error'])} ({r['status'].lower()})")
        lines.append("| " + " | ".join(cells) + " |")
    return text + lines + [""]


def _section_c(summary, meta) -> list[str]:
    if not summary:
        return []
    text = ["## c. Implicit meta-learning runs and remedies", "",
            f"`bilevel.train`, {meta['outer_steps']} outer steps, each after "
            f"{meta['inner_steps']} warm-started inner Adam steps (the `-far` task: 1 inner step "
            f"and 3× the outer learning rate, so θ stays far from θ* where the Hessian is "
            f"indefinite), outer Adam; solvers at "
            f"{meta['train_budget']} HVPs at most (stopping at relative residual {TRAIN_TOL}; "
            f"Identity: 0), α = 1/λ̂_max at the initial θ*. "
            f"Remedies: `damping` δ = {meta['train_damping']}; `ggn` = `curvature=` a "
            f"Gauss-Newton operator (`hvp.ggn` on (logits, params) so the decay's Hessian is "
            f"kept; data reweighting is a linear least-squares model whose GGN *is* its "
            f"Hessian, so it is skipped there); `warm_start=True`; `clip` = `hypergrad_clip` "
            f"at the unremedied run's median hypergradient norm. 'forgot' = validation "
            f"accuracy ends at least {FORGETTING_DROP} below its best; 'oscillation' = "
            f"fraction of sign changes of successive outer-loss differences; 'norm_growth' = "
            f"mean hypergradient norm of the last 5 steps over the first 5; 'early_stops' = "
            f"unconverged solves that stopped before their budget (CG: negative curvature; "
            f"Neumann: divergence).", "",
            _table(summary, ["task", "solver", "remedy", "initial_outer_loss",
                             "final_outer_loss", "min_outer_loss", "best_val_acc",
                             "final_val_acc", "forgot", "skipped_steps", "unconverged_steps",
                             "early_stops",
                             "clipped_steps", "max_hypergrad_norm", "norm_growth",
                             "oscillation", "total_hvps", "max_residual_norm",
                             "zero_iteration_solves", "seconds"]), ""]
    return text


def _effect(summary, task, solver, remedy):
    base = next((s for s in summary if s["task"] == task and s["solver"] == solver
                 and s["remedy"] == "none"), None)
    fixed = next((s for s in summary if s["task"] == task and s["solver"] == solver
                  and s["remedy"] == remedy), None)
    return base, fixed


def _row_of(rows, **match):
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _section_recommendation(a_rows, spectra, b_rows, summary) -> list[str]:
    """Which approximation to use when, each rule with the measurements behind it."""
    text = ["## Which approximation to use when", ""]
    problem = "digits_mlp" if any(r["problem"] == "digits_mlp" for r in a_rows) else a_rows[-1][
        "problem"]
    mine = [r for r in a_rows if r["problem"] == problem]
    budgets = sorted({r["budget"] for r in mine if r["budget"] is not None})
    mid = budgets[len(budgets) // 2]
    get = lambda solver, budget=mid: _row_of(mine, solver=solver, budget=budget)  # noqa: E731
    cg, minres, neumann = get("cg"), get("minres"), get("neumann")
    nystrom, lissa, identity = get("nystrom"), get("lissa"), get("identity", None)
    text.append(
        f"1. **At (or near) the inner optimum with a positive-definite Hessian: CG** (MINRES "
        f"{'is as accurate' if minres['rel_error'] <= 2 * cg['rel_error'] else 'is worse'} "
        f"there). On {problem} at {mid} HVPs: CG {_fmt(cg['rel_error'])}, MINRES "
        f"{_fmt(minres['rel_error'])}, Neumann {_fmt(neumann['rel_error'])}, LiSSA "
        f"{_fmt(lissa['rel_error'])}, Nyström {_fmt(nystrom['rel_error'])} relative error; "
        f"Identity {_fmt(identity['rel_error'])} (cosine {_fmt(identity['cosine'])}). At the "
        f"same budget CG took {_fmt(cg['time_ms'])} ms and Neumann {_fmt(neumann['time_ms'])} "
        f"ms ({_fmt(cg['time_ms'] / neumann['time_ms'])}×).")
    optimum = _row_of(spectra, problem=problem, point="optimum")
    if optimum is not None:
        contraction = optimum["neumann_contraction"]
        terms = math.log(0.1) / math.log(contraction) if 0 < contraction < 1 else math.inf
        text.append(
            f"2. **Neumann and Identity misjudge small curvature.** At θ* the spectrum is "
            f"[{_fmt(optimum['exact_min'])}, {_fmt(optimum['exact_max'])}]: with α = 1/λ_max "
            f"the slowest Neumann component contracts by {_fmt(optimum['neumann_contraction'])} "
            f"per term, so about {_fmt(terms)} terms shrink it tenfold (Neumann's error "
            f"{_fmt(neumann['rel_error'])} at {mid} HVPs), while Identity scales every "
            f"direction by 1/λ_max instead of 1/λ: the flattest by up to "
            f"{_fmt(optimum['exact_max'] / optimum['exact_min'])}× too little. Identity's "
            f"direction has cosine {_fmt(identity['cosine'])} with the truth, its magnitude is "
            f"off (error {_fmt(identity['rel_error'])}): usable at most as a cheap direction "
            f"under an outer optimizer that normalises the step (Adam).")
    indefinite = [s for s in spectra if s["negative_eigenvalues"] > 0]
    if indefinite:
        worst = min(indefinite, key=lambda s: s["exact_min"])
        rows = {r["solver"]: r for r in b_rows if r["problem"] == worst["problem"]
                and r["point"] == worst["point"]}
        text.append(
            f"3. **Away from the optimum the Hessian is indefinite and no solver's answer is "
            f"useful.** At {worst['problem']} {worst['point']} (λ_min {_fmt(worst['exact_min'])}"
            f", {worst['negative_eigenvalues']} negative eigenvalues) CG stops with "
            f"{rows['cg']['status'].lower()}, Neumann ends {rows['neumann']['status'].lower()} "
            f"(|1 − αλ| up to {_fmt(worst['neumann_contraction'])}), and even the exact solve "
            f"there is {_fmt(worst['ift_error_vs_optimum'])} (relative) from the θ* "
            f"hypergradient. Check `hvp.extreme_eigenvalues` (Lanczos matched the exact λ_min "
            f"to {_fmt(abs(worst['lanczos_min'] - worst['exact_min']))} here) and converge the "
            f"inner problem further before trusting any hypergradient; MINRES at least returns "
            f"a finite minimum-residual answer (error {_fmt(rows['minres']['rel_error'])}).")
    text += _remedy_lines(summary)
    text.append(
        f"5. **Nyström** with ρ = λ̂_max/10 (the CLI default) was never better than "
        f"{_fmt(min(r['rel_error'] for r in a_rows if r['solver'] == 'nystrom'))} relative "
        f"error here: the directions the sketch misses get 1/ρ, wrong whenever ρ is not "
        f"close to their curvature. **LiSSA** adds minibatch noise to Neumann's bias.")
    text.append("")
    return text


def _remedy_lines(summary) -> list[str]:
    lines = []
    forgot = [s for s in summary if s["forgot"]]
    drop = max(s["acc_drop_from_best"] for s in summary)
    lines.append(
        f"4. **Catastrophic forgetting** (validation accuracy ending ≥ {FORGETTING_DROP} below "
        f"its best): {len(forgot)} of {len(summary)} runs"
        + (f" ({', '.join(s['task'] + ' ' + s['solver'] + '+' + s['remedy'] for s in forgot)})"
           if forgot else "") + f"; the largest drop from best to final was {_fmt(drop)}."
        + ("" if forgot else " These runs are small and short: they do not reproduce the "
           "collapse reported for large models."))
    for task in dict.fromkeys(s["task"] for s in summary):
        for solver in ("cg", "neumann"):
            base, warm = _effect(summary, task, solver, "warm_start")
            _, ggn = _effect(summary, task, solver, "ggn")
            _, damped = _effect(summary, task, solver, "damping")
            if base is None or warm is None:
                continue
            parts = [f"warm starts: max hypergradient norm {_fmt(warm['max_hypergrad_norm'])} "
                     f"(unremedied {_fmt(base['max_hypergrad_norm'])}), max residual "
                     f"{_fmt(warm['max_residual_norm'])} (vs {_fmt(base['max_residual_norm'])}),"
                     f" {warm['zero_iteration_solves']} solves returned the warm start "
                     f"untouched, {warm['skipped_steps']} skipped steps, {warm['total_hvps']} "
                     f"HVPs (vs {base['total_hvps']})"]
            if damped is not None:
                parts.append(f"damping: early stops {damped['early_stops']} (vs "
                             f"{base['early_stops']}), final outer loss "
                             f"{_fmt(damped['final_outer_loss'])} (vs "
                             f"{_fmt(base['final_outer_loss'])})")
            if ggn is not None:
                parts.append(f"GGN: early stops {ggn['early_stops']} (vs {base['early_stops']}),"
                             f" final outer loss {_fmt(ggn['final_outer_loss'])}")
            lines.append(f"   - {task}, {solver}: " + "; ".join(parts) + ".")
    ggn_runs = [s for s in summary if s["remedy"] == "ggn"]
    lines.append(
        "   Why: on an indefinite operator the previous step's vector can be a poor start "
        "that a budget-limited solve extends further (see the warm-start section); warm "
        "starts are only safe on a positive-definite operator."
        + (f" The GGN is positive semi-definite: its {len(ggn_runs)} runs had "
           f"{sum(s['early_stops'] for s in ggn_runs)} early-stopped solves in all."
           if ggn_runs else ""))
    return lines


def _section_conclusion(a_rows, b_rows, spectra, summary) -> list[str]:
    text = ["## Conclusions (numbers from this run)", ""]
    # a: cheapest solver that reaches 10x the floor, per problem.
    for problem in dict.fromkeys(r["problem"] for r in a_rows):
        mine = [r for r in a_rows if r["problem"] == problem]
        floor = mine[0]["damping_floor"]
        target = max(10 * floor, 1e-2)
        good = sorted((r for r in mine if r["rel_error"] <= target),
                      key=lambda r: (r["hvp_count"], r["rel_error"]))
        best = {r["solver"]: r for r in best_at_budget(a_rows, problem)}
        parts = ", ".join(f"{s} {_fmt(best[s]['rel_error'])} (at {best[s]['hvp_count']} HVPs)"
                          for s in best)
        reach = (f"the cheapest variant within {_fmt(target)} relative error is "
                 f"{good[0]['solver']} at {good[0]['hvp_count']} HVPs"
                 if good else f"no variant reached {_fmt(target)} relative error")
        text.append(f"- **{problem}** at θ*: {reach}. Best error per solver: {parts}.")
    if spectra:
        for s in spectra:
            if s["negative_eigenvalues"] > 0:
                r = {x["solver"]: x for x in b_rows if x["problem"] == s["problem"]
                     and x["point"] == s["point"]}
                text.append(
                    f"- **{s['problem']} at {s['point']}** the Hessian is indefinite "
                    f"(exact λ_min {_fmt(s['exact_min'])}, Lanczos {_fmt(s['lanczos_min'])}, "
                    f"{s['negative_eigenvalues']} negative eigenvalues): CG "
                    f"{r['cg']['status'].lower()} (error {_fmt(r['cg']['rel_error'])}), "
                    f"Neumann {r['neumann']['status'].lower()} (contraction "
                    f"{_fmt(s['neumann_contraction'])}, error {_fmt(r['neumann']['rel_error'])}), "
                    f"MINRES error {_fmt(r['minres']['rel_error'])}; and the exact IFT there is "
                    f"{_fmt(s['ift_error_vs_optimum'])} (relative) from the θ* hypergradient, "
                    f"cosine {_fmt(s['ift_cosine_vs_optimum'])}.")
        for s in spectra:
            if s["point"] == "optimum":
                r = {x["solver"]: x for x in b_rows if x["problem"] == s["problem"]
                     and x["point"] == "optimum"}
                ratio = s["exact_max"] / s["exact_min"] if s["exact_min"] > 0 else math.inf
                needed = (math.log(0.1) / math.log(s["neumann_contraction"])
                          if 0 < s["neumann_contraction"] < 1 else math.inf)
                text.append(
                    f"- **{s['problem']} at θ***: condition number {_fmt(ratio)} (λ in "
                    f"[{_fmt(s['exact_min'])}, {_fmt(s['exact_max'])}]). Identity (α = "
                    f"1/λ_max) treats every direction as if its curvature were λ_max, so "
                    f"directions of curvature λ_min are under-weighted by up to {_fmt(ratio)}×: "
                    f"error {_fmt(r['identity']['rel_error'])}. Neumann's contraction "
                    f"{_fmt(s['neumann_contraction'])} needs about {_fmt(needed)} terms to "
                    f"shrink the slowest component tenfold; at {s['budget']} terms its error "
                    f"is {_fmt(r['neumann']['rel_error'])}, CG's "
                    f"{_fmt(r['cg']['rel_error'])}.")
    for task in dict.fromkeys(s["task"] for s in summary):
        for s in summary:
            if s["task"] == task and s["remedy"] == "none":
                text.append(
                    f"- **{task}, {s['solver']}** (no remedy): outer loss "
                    f"{_fmt(s['initial_outer_loss'])} → {_fmt(s['final_outer_loss'])} (min "
                    f"{_fmt(s['min_outer_loss'])}), validation accuracy best "
                    f"{_fmt(s['best_val_acc'])} at step {s['best_step']}, final "
                    f"{_fmt(s['final_val_acc'])} ({'forgot' if s['forgot'] else 'no collapse'}),"
                    f" {s['skipped_steps']} skipped, {s['unconverged_steps']} unconverged and "
                    f"{_fmt(s['early_stops'])} early-stopped solves, hypergradient norm growth "
                    f"{_fmt(s['norm_growth'])}.")
        for s in summary:
            if s["task"] == task and s["remedy"] != "none":
                base, _ = _effect(summary, task, s["solver"], s["remedy"])
                if base is None:
                    continue
                text.append(
                    f"  - {task} {s['solver']} + {s['remedy']}: final outer loss "
                    f"{_fmt(s['final_outer_loss'])} (vs {_fmt(base['final_outer_loss'])}), "
                    f"final accuracy {_fmt(s['final_val_acc'])} (vs "
                    f"{_fmt(base['final_val_acc'])}), skipped {s['skipped_steps']} (vs "
                    f"{base['skipped_steps']}), unconverged {s['unconverged_steps']} (vs "
                    f"{base['unconverged_steps']}), oscillation {_fmt(s['oscillation'])} (vs "
                    f"{_fmt(base['oscillation'])}).")
    text.append("")
    return text


# --------------------------------------------------------------------------------------------
# Main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/hvp_study"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a tiny fast variant")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    if args.smoke:
        problems_a, near_far, steps = SMOKE_BUDGETS, ("logistic_l2",), (1, 10)
        budget, repeats = 5, 1
        outer_steps, tasks = 4, [reweighting_task(args.seed)]
    else:
        problems_a, near_far, steps, budget, repeats = (BUDGETS, ("logistic_l2", "digits_mlp"),
                                                        NEAR_FAR_STEPS, NEAR_FAR_BUDGET, 3)
        digits = digits_task(args.seed)
        outer_steps, tasks = 40, [reweighting_task(args.seed), digits, far_task(digits)]
    train_budget, train_damping = TRAIN_BUDGET, TRAIN_DAMPING

    a_rows, setups = part_a(problems_a, args.seed, repeats)
    write_csv(a_rows, args.out / "a_accuracy_cost.csv")
    plot_a(a_rows, args.out / "a_accuracy_cost.png")

    b_rows, spectra = part_b(setups, near_far, steps, budget, repeats)
    write_csv(b_rows, args.out / "b_near_far.csv")
    write_csv(spectra, args.out / "b_spectra.csv")
    plot_b(b_rows, spectra, args.out / "b_near_far.png")

    curves, summary = part_c(tasks, setups, outer_steps, train_budget, train_damping, args.seed)
    write_csv(curves, args.out / "c_training.csv")
    write_csv(summary, args.out / "c_summary.csv")
    plot_c(curves, args.out / "c_training.png")

    meta = {"variant": "smoke" if args.smoke else "full", "seed": args.seed,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "seconds": time.perf_counter() - begin, "machine": machine(),
            "outer_steps": outer_steps, "inner_steps": tasks[0].inner_steps,
            "train_budget": train_budget, "train_damping": train_damping,
            "budgets": {k: list(v) for k, v in problems_a.items()}, "near_far_steps": steps,
            "near_far_budget": budget}
    (args.out / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_readme(args.out, a_rows, b_rows, spectra, summary, meta)
    print(f"wrote {args.out} in {meta['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
