"""Studies of the VeLO-style optimizer's claims: horizon, critical batch size, continuation past
the planned horizon, and the cost model of its overhead against Adam.

    python experiments/velo_studies.py --part all [--meta PATH] [--out DIR] [--seeds 3]

* ``horizon``: ``velo_lopt`` told ``num_steps`` = 0.25x ... 4x the true length (VeLO's
  critical hidden hyperparameter, Rezk et al. 2023), beside Adam with a cosine schedule told
  the same wrong horizons (its learning rate tuned at the true one).
* ``batch``: steps to a target loss against the batch size, ``velo_lopt`` against Adam whose
  learning rate is tuned per batch size (the critical batch size: where doubling the batch
  stops halving the steps).
* ``continuation``: train for T steps told T, then go on to 2T by (a) continuing naively
  (the fraction of training passes 1), (b) telling the running optimizer 2T, (c) restarting
  its state told T, against (d) one run told 2T.
* ``cost``: update and whole-step time of ``velo_lopt`` and Adam on MLPs with different
  numbers of tensors and parameters, and the least-squares fit
  ``t = a + b·tensors + c·parameters`` (a constant, a per-tensor and a per-parameter term).

Every figure is measured in the same run as the baseline it is compared to. Results go to
``experiments/results/lopt/velo/`` (CSV, Markdown, PNG).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bilevel.lopt import evaluate, tasks, velo  # noqa: E402
from bilevel.lopt.optimizers import load_meta_params, pretrained  # noqa: E402
from experiments._common import cpu_model, git_commit, positive_int  # noqa: E402

LRS = tuple(float(10.0 ** e) for e in np.arange(-3.5, -0.49, 0.5))  # 7 values, 3e-4 ... 0.3
OUT = Path(__file__).resolve().parent / "results" / "lopt" / "velo"


def _write(rows: list[dict], stem: Path, title: str, note: str) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cols = list(rows[0])
    lines = [f"# {title}", "", note, "", "| " + " | ".join(cols) + " |",
             "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))


def _fmt(x) -> str:
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.4g}"
    return str(x)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _finite_mean(x: np.ndarray) -> float:
    """Mean over the finite entries (seeds that diverged are counted in their own column)."""
    x = np.asarray(x, np.float64)
    return float(x[np.isfinite(x)].mean()) if np.isfinite(x).any() else math.nan


def _finite_std(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    return float(x[np.isfinite(x)].std()) if np.isfinite(x).any() else math.nan


def _velo_curves(task, meta, told, steps, keys, eval_every):
    return evaluate.run_seeds(task, velo.velo_lopt(meta, float(told)), steps, keys,
                              eval_every=eval_every)


# --------------------------------------------------------------------------------------------


def horizon_study(meta, seeds: int, out: Path, machine: str) -> None:
    task = tasks.TASKS["mlp_digits"]()
    steps = task.horizon
    keys = evaluate.seed_keys(seeds)
    every = evaluate.eval_interval(steps, 25)
    adam = evaluate.tune_baseline(task, "adam", LRS, steps, seeds, eval_every=every,
                                  schedule_steps=steps)
    rows, curves = [], {}
    for factor in (0.25, 0.5, 1.0, 2.0, 4.0):
        told = int(round(factor * steps))
        v = _velo_curves(task, meta, told, steps, keys, every)
        a = evaluate.run_seeds(task, evaluate.baseline("adam", adam.learning_rate,
                                                       schedule_steps=told), steps, keys,
                               eval_every=every)
        vf, af = np.asarray(v.eval_loss[:, -1]), np.asarray(a.eval_loss[:, -1])
        curves[factor] = (np.asarray(v.eval_steps[0]), np.nanmean(np.asarray(v.eval_loss), 0),
                          np.nanmean(np.asarray(a.eval_loss), 0))
        rows.append({"told/true": factor, "told num_steps": told,
                     "velo final loss": _finite_mean(vf), "velo std": _finite_std(vf),
                     "velo diverged seeds": int(np.sum(~np.isfinite(vf))),
                     "cosine Adam final loss": _finite_mean(af), "Adam std": _finite_std(af),
                     "Adam diverged seeds": int(np.sum(~np.isfinite(af)))})
    base_v = rows[2]["velo final loss"]
    base_a = rows[2]["cosine Adam final loss"]
    for r in rows:
        r["velo / velo@1x"] = r["velo final loss"] / base_v
        r["Adam / Adam@1x"] = r["cosine Adam final loss"] / base_a
    _write(rows, out / "horizon", "velo_lopt told the wrong horizon",
           f"Task {task.name}, true length {steps} steps, {seeds} seeds (mean, std of the final "
           f"full-training-set loss over the seeds that did not diverge; a diverged seed ends "
           f"with a non-finite loss and is counted in its own column). Adam: cosine decay told "
           f"the same horizon, peak learning rate tuned at the true one "
           f"({adam.learning_rate:.3g}, grid {len(LRS)} values). "
           f"{machine}")
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for factor, (s, vl, al) in curves.items():
        axes[0].plot(s, vl, label=f"told {factor}x")
        axes[1].plot(s, al, label=f"told {factor}x")
    for ax, title in zip(axes, ("velo_lopt", "Adam + cosine"), strict=True):
        ax.set(xlabel="step", title=title, yscale="log")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(out / "horizon.png", dpi=120)
    plt.close(fig)


def batch_study(meta, seeds: int, out: Path, machine: str) -> None:
    steps = 400
    every = evaluate.eval_interval(steps, 40)
    keys = evaluate.seed_keys(seeds)
    sizes = (8, 16, 32, 64, 128, 256)
    results = {}
    for b in sizes:
        task = tasks.image_mlp_task("digits", 32, 1, batch_size=b, name=f"mlp_digits_b{b}")
        adam = evaluate.tune_baseline(task, "adam", LRS, steps, seeds, eval_every=every)
        v = _velo_curves(task, meta, steps, steps, keys, every)
        results[b] = (adam, v)
    # The target: 1.2x the worse of the two optimizers' best mean final loss over batch sizes,
    # so that both reach it at some batch size.
    best_adam = min(_finite_mean(results[b][0].best.eval_loss[:, -1]) for b in sizes)
    best_velo = min(_finite_mean(results[b][1].eval_loss[:, -1]) for b in sizes)
    target = 1.2 * max(best_adam, best_velo)
    rows = []
    for b in sizes:
        adam, v = results[b]
        s = np.asarray(v.eval_steps[0])
        velo_steps = evaluate.steps_to_reach(s, np.nanmean(np.asarray(v.eval_loss), 0), target)
        adam_steps = evaluate.steps_to_reach(s, np.nanmean(np.asarray(adam.best.eval_loss), 0),
                                             target)
        rows.append({"batch": b, "target loss": target, "velo steps": velo_steps,
                     "Adam steps": adam_steps, "Adam lr": adam.learning_rate,
                     "velo examples": velo_steps * b, "Adam examples": adam_steps * b,
                     "velo final": _finite_mean(v.eval_loss[:, -1]),
                     "Adam final": _finite_mean(adam.best.eval_loss[:, -1])})
    _write(rows, out / "batch", "Steps to a target loss against the batch size",
           f"Task mlp_digits (64-32-10 ReLU), {steps} steps, {seeds} seeds (mean curve). Adam's "
           f"learning rate tuned per batch size over {len(LRS)} values; velo_lopt told "
           f"num_steps={steps}. Target = 1.2x the worse of the two optimizers' best mean final "
           f"loss over batch sizes; "
           f"inf = not reached in {steps} steps. {machine}")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(sizes, [r["velo steps"] for r in rows], "o-", label="velo_lopt")
    ax.plot(sizes, [r["Adam steps"] for r in rows], "s-", label="Adam (tuned per batch)")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="steps to target")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "batch.png", dpi=120)
    plt.close(fig)


def _continue(task, opt, params, state, key, steps):
    @jax.jit
    def go(params, state, batches):
        return tasks.run_steps(task, opt, params, state, batches)

    (params, state), losses = go(params, state, task.batches(key, steps))
    return params, state, np.asarray(losses)


def continuation_study(meta, seeds: int, out: Path, machine: str) -> None:
    task = tasks.TASKS["mlp_digits"]()
    horizon = 250
    rows, curves = [], {}
    for seed in range(seeds):
        init_key, k1, k2 = jax.random.split(jax.random.key(seed), 3)
        params0 = task.init(init_key)
        first = velo.velo_lopt(meta, horizon)
        p1, s1, l1 = _continue(task, first, params0, first.init(params0), k1, horizon)
        arms = {
            "naive continue (told T)": (first, s1),
            "increase steps (told 2T)": (velo.velo_lopt(meta, 2 * horizon), s1),
            "reset state (told T)": (first, first.init(p1)),
        }
        for name, (opt, state) in arms.items():
            p2, _, l2 = _continue(task, opt, p1, state, k2, horizon)
            curves.setdefault(name, []).append(np.concatenate([l1, l2]))
            rows.append({"arm": name, "seed": seed, "loss at T": float(task.eval_loss(p1)),
                         "loss at 2T": float(task.eval_loss(p2))})
        long = velo.velo_lopt(meta, 2 * horizon)
        q1, t1, m1 = _continue(task, long, params0, long.init(params0), k1, horizon)
        q2, _, m2 = _continue(task, long, q1, t1, k2, horizon)
        curves.setdefault("one run told 2T", []).append(np.concatenate([m1, m2]))
        rows.append({"arm": "one run told 2T", "seed": seed, "loss at T": float(task.eval_loss(q1)),
                     "loss at 2T": float(task.eval_loss(q2))})
    summary = []
    for name in curves:
        finals = np.asarray([r["loss at 2T"] for r in rows if r["arm"] == name])
        mids = np.asarray([r["loss at T"] for r in rows if r["arm"] == name])
        summary.append({"arm": name, "loss at T": float(mids.mean()),
                        "loss at 2T": float(finals.mean()), "std at 2T": float(finals.std())})
    _write(summary, out / "continuation", "Continuing past the planned horizon",
           f"Task {task.name}, T = {horizon}, {seeds} seeds (mean, std of the full-training-set "
           f"loss). The first three arms share the first T steps. {machine}")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    window = 10
    for name, c in curves.items():
        mean = np.mean(c, axis=0)
        ax.plot(np.convolve(mean, np.ones(window) / window, mode="valid"), label=name)
    ax.axvline(horizon, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="step", ylabel="minibatch loss (moving mean)", yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "continuation.png", dpi=120)
    plt.close(fig)


def _median_time(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cost_study(meta, repeats: int, out: Path, machine: str) -> None:
    rows = []
    configs = [(w, d) for d in (1, 4, 12) for w in (32, 256, 1024)]
    for width, depth in configs:
        sizes = (64, *([width] * depth), 10)
        params = {f"w{i}": jnp.full((a, b), 0.01) for i, (a, b) in
                  enumerate(zip(sizes[:-1], sizes[1:], strict=True))}
        params.update({f"b{i}": jnp.full((b,), 0.01) for i, b in enumerate(sizes[1:])})
        grads = jax.tree_util.tree_map(lambda p: 0.1 * jnp.ones_like(p), params)
        n_params = sum(p.size for p in params.values())
        row = {"width": width, "depth": depth, "tensors": len(params), "parameters": n_params}
        for name, opt in (("adam", optax.adam(1e-3)), ("velo", velo.velo_lopt(meta, 1000))):
            opt = optax.with_extra_args_support(opt)
            state = opt.init(params)
            update = jax.jit(lambda g, s, p, o=opt: o.update(g, s, p, loss=jnp.float32(1.0)))
            row[f"{name} update ms"] = 1e3 * _median_time(update, (grads, state, params),
                                                          repeats)
        row["velo/adam"] = row["velo update ms"] / row["adam update ms"]
        rows.append(row)
    design = np.asarray([[1.0, r["tensors"], r["parameters"]] for r in rows])
    fits = {}
    for name in ("adam", "velo"):
        t = np.asarray([r[f"{name} update ms"] for r in rows])
        # relative least squares: times span four decades, each row should count alike
        coef, *_ = np.linalg.lstsq(design / t[:, None], np.ones_like(t), rcond=None)
        fits[name] = coef
        for r, pred in zip(rows, design @ coef, strict=True):
            r[f"{name} fit ms"] = float(pred)
    note = (f"Update time only (jit, medians of {repeats} calls after a warm-up), float32 MLPs "
            f"64-(width x depth)-10. Least-squares fit (relative errors) "
            f"t = a + b*tensors + c*parameters: "
            + "; ".join(f"{n}: a = {c[0]:.3g} ms, b = {c[1]:.3g} ms/tensor, "
                        f"c = {c[2] * 1e6:.3g} ms per million parameters"
                        for n, c in fits.items())
            + f". Per-parameter overhead velo/adam = {fits['velo'][2] / fits['adam'][2]:.3g}; "
            f"per-tensor overhead velo - adam = {fits['velo'][1] - fits['adam'][1]:.3g} ms. "
            + machine)
    _write(rows, out / "cost", "Cost model of velo_lopt's update against Adam's", note)
    (out / "cost_fit.json").write_text(json.dumps(
        {n: {"constant_ms": c[0], "per_tensor_ms": c[1], "per_parameter_ms": c[2]}
         for n, c in fits.items()}, indent=2) + "\n")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, marker in (("adam", "s"), ("velo", "o")):
        ax.scatter([r["parameters"] for r in rows], [r[f"{name} update ms"] for r in rows],
                   marker=marker, label=f"{name} measured")
        ax.scatter([r["parameters"] for r in rows], [r[f"{name} fit ms"] for r in rows],
                   marker="x", label=f"{name} fit")
    ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="update time (ms)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "cost.png", dpi=120)
    plt.close(fig)


def suite_study(meta, cache: Path | None, out: Path, machine: str) -> None:
    """velo_lopt on the evaluation suite of ``experiments/lopt_eval.py`` (same tasks, horizons,
    seeds and tuned baselines), beside the shipped mlp_lopt and star_lopt rows of its
    ``eval.csv``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import lopt_eval

    cfg = lopt_eval.FULL
    rows = []
    for name in lopt_eval.task_names(cfg, None):
        task = tasks.TASKS[name]()
        steps = task.horizon
        start = time.perf_counter()
        tuned = lopt_eval.tuned_baselines(task, cfg, steps, cache)
        every = evaluate.eval_interval(steps, cfg.evals)
        curves = evaluate.run_seeds(task, velo.velo_lopt(meta, steps), steps,
                                    evaluate.seed_keys(cfg.seeds), eval_every=every)
        result = evaluate.TaskResult(task, {"velo_lopt": curves}, tuned)
        new = evaluate.result_rows(result, steps)
        rows += new
        print(f"{name:<24} {time.perf_counter() - start:6.0f} s  " + "  ".join(
            f"{r['optimizer']} {r['final_loss']:.3g} ({evaluate.format_speedup(r)})"
            for r in new), file=sys.stderr, flush=True)
    shipped = out.parent / "eval.csv"
    if shipped.is_file():
        with open(shipped) as f:
            rows += [{k: _parse(v) for k, v in r.items()} for r in csv.DictReader(f)
                     if r["optimizer"] in ("mlp_lopt", "star_lopt")]
    rows.sort(key=lambda r: (r["task"], str(r["optimizer"])))
    best = {}
    for r in rows:
        best[r["task"]] = min(best.get(r["task"], math.inf), r["final_loss"])
    for r in rows:  # x best over every optimizer of the merged table
        r["vs_best"] = r["final_loss"] / best[r["task"]] if best[r["task"]] > 0 else math.nan
    evaluate.write_csv(rows, out / "suite.csv")
    evaluate.plot_profile(rows, out / "suite_profile.png",
                          title="velo_lopt, mlp_lopt, star_lopt and LR-tuned baselines")
    wins = [r for r in rows if r["optimizer"] == "velo_lopt"]
    adam = {r["task"]: r["final_loss"] for r in rows if r["optimizer"] == "adam"}
    better = sum(r["final_loss"] < adam[r["task"]] for r in wins)
    text = (f"# velo_lopt on the evaluation suite\n\nThe tasks, horizons, {cfg.seeds} seeds and "
            f"LR-tuned baselines ({len(cfg.learning_rates)} learning rates each) of "
            f"`experiments/lopt_eval.py`; the mlp_lopt and star_lopt rows are those of "
            f"`../eval.csv`. velo_lopt is told the true horizon. It reaches a lower final loss "
            f"than tuned Adam on {better} of {len(wins)} tasks. {machine}\n\n"
            + evaluate.markdown_table(rows) + "\n")
    (out / "suite.md").write_text(text)
    print(text)


def _parse(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(value, value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("horizon", "batch", "continuation", "cost", "suite",
                                           "all"), default="all")
    parser.add_argument("--cache", type=Path, default=None,
                        help="lopt_eval.py's cache of the baselines' sweeps, if any")
    parser.add_argument("--meta", type=Path, default=None,
                        help="velo meta-parameters (.npz); default: the shipped velo_lopt")
    parser.add_argument("--seeds", type=positive_int, default=3)
    parser.add_argument("--repeats", type=positive_int, default=30)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    meta, metadata = load_meta_params(args.meta) if args.meta else pretrained("velo_lopt")
    found = git_commit("bilevel", "experiments/velo_studies.py")
    commit = "unknown" if found is None else found[0] + (" (with local changes)" if found[1]
                                                         else "")
    machine = (f"Machine: {cpu_model()}, {jax.device_count()} x {jax.devices()[0].device_kind}, "
               f"jax {jax.__version__}, commit {commit}; meta-parameters: "
               f"{metadata.get('outer_steps')} ES steps.")
    args.out.mkdir(parents=True, exist_ok=True)
    parts = (("horizon", "batch", "continuation", "cost", "suite") if args.part == "all"
             else (args.part,))
    for part in parts:
        print(f"== {part}")
        if part == "cost":
            cost_study(meta, args.repeats, args.out, machine)
        elif part == "suite":
            suite_study(meta, args.cache, args.out, machine)
        else:
            {"horizon": horizon_study, "batch": batch_study,
             "continuation": continuation_study}[part](meta, args.seeds, args.out, machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
