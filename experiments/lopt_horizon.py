"""Study: what a learned optimizer does when the training length it is told is wrong, and far
beyond the lengths it was meta-trained on (the VeLO critique, reproduced).

Part A (told horizon). An optimizer that reads the fraction of training done, ``t/num_steps``,
is told ``num_steps = f · T`` for f ∈ {0.25, 0.5, 1, 2, 4} and trained for the true ``T``
steps. The learned optimizer is any shipped meta-parameter set with fraction-of-training inputs
(``metadata["horizon_features"]``); the reference is Adam with a cosine decay to zero over the
told length (its peak rate tuned with the true length told), the hand-designed schedule that
needs the same number. Rezk et al. (2023) found VeLO's ``num_steps`` needs per-problem tuning.

Part B (long horizons). STAR and the blackbox MLP optimizer (the shipped sets) run for 10x the
longest inner-training length of their meta-training (``metadata["config"]["horizon"]``), next
to LR-tuned Adam over the same length; Harrison et al. (2022) report that the blackbox MLP
becomes unstable beyond its meta-training horizon while STAR's nominal term keeps it stable.

Usage::

    python experiments/lopt_horizon.py                        # full study
    python experiments/lopt_horizon.py --smoke --out /tmp/h   # short runs (about 1 min)

Writes ``horizon.csv``, ``horizon.md`` and ``horizon.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import _common  # noqa: E402  (experiments/ is on sys.path when run as a script)
import jax
import numpy as np
import optax
from lopt_eval import cached  # noqa: E402  (experiments/ is on sys.path)

from bilevel import lopt
from bilevel.lopt import evaluate

FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    told_tasks: tuple[str, ...]  # Part A
    told_steps: int  # Part A's true horizon T
    long_tasks: tuple[str, ...]  # Part B
    long_factor: int  # Part B runs long_factor x the meta-training horizon
    seeds: int
    learning_rates: tuple[float, ...]
    evals: int


FULL = Config("full", ("mlp_digits", "mlp_mnist5k", "quadratic"), 500,
              ("mlp_digits", "logistic_digits", "quadratic", "mlp_mnist5k"), 10, 3,
              evaluate.DEFAULT_LRS, 40)
SMOKE = Config("smoke", ("mlp_digits",), 40, ("quadratic",), 2, 2, (1e-3, 1e-2, 1e-1), 4)


def mean_final(curve: evaluate.Curve) -> float:
    final = np.asarray(curve.eval_loss, np.float64)[..., -1]
    return float(np.mean(np.where(np.isfinite(final), final, np.inf)))


def horizon_sets(untrained: bool) -> dict[str, tuple[dict, dict]]:
    """Shipped meta-parameter sets with fraction-of-training inputs, by name."""
    if untrained:
        return {"mlp_lopt_horizon (untrained)": (
            lopt.init_mlp_lopt(jax.random.key(0), horizon_features=True),
            {"horizon_features": True})}
    found = {}
    for name in lopt.available_pretrained():
        meta, metadata = lopt.pretrained(name)
        if metadata.get("horizon_features") and name.split("_")[0] in ("mlp", "star"):
            found[name] = (meta, metadata)
    return found


def _kind(name: str) -> str:
    return "mlp_lopt" if name.startswith("mlp") else "star_lopt"


def part_a(cfg: Config, untrained: bool, data_dir, cache: Path | None
           ) -> tuple[list[dict], list[str], dict]:
    rows, notes, curves = [], [], {}
    sets = horizon_sets(untrained)
    if not sets:
        notes.append(("A", "No shipped meta-parameter set has fraction-of-training inputs "
                     f"(available: {', '.join(lopt.available_pretrained()) or 'none'}), so the "
                     "learned optimizer's side of Part A was not run; only the cosine-Adam "
                     "reference below was."))
    steps = cfg.told_steps
    every = evaluate.eval_interval(steps, cfg.evals)
    keys = evaluate.seed_keys(cfg.seeds)
    for task_name in cfg.told_tasks:
        task = lopt.TASKS[task_name](data_dir=data_dir)
        tuned = cached(cache, (task_name, "adam-cosine", steps, cfg.learning_rates, cfg.seeds,
                               every), lambda task=task: evaluate.tune_baseline(
            task, "adam", cfg.learning_rates, steps, cfg.seeds, eval_every=every,
            schedule_steps=steps))
        candidates = {f"adam_cosine (lr {tuned.learning_rate:g})": lambda told, lr=tuned.
                      learning_rate: evaluate.baseline("adam", lr, schedule_steps=told)}
        for name, (meta, metadata) in sets.items():
            make = {"mlp_lopt": lopt.mlp_lopt, "star_lopt": lopt.star_lopt}[_kind(name)]
            kwargs = dict(metadata.get("optimizer_kwargs", {}))
            kwargs.pop("num_steps", None)
            candidates[name] = lambda told, make=make, meta=meta, kwargs=kwargs: make(
                meta, num_steps=told, **kwargs)
        for label, build in candidates.items():
            base = None
            for factor in FACTORS:
                told = int(round(factor * steps))
                curve = evaluate.run_seeds(task, build(told), steps, keys, eval_every=every)
                final = mean_final(curve)
                base = final if factor == 1.0 else base
                curves[(task_name, label, factor)] = curve
                rows.append({"part": "A", "task": task_name, "optimizer": label,
                             "true_steps": steps, "told_steps": told, "told_factor": factor,
                             "final_loss": final, "loss_at_meta_horizon": "",
                             "min_loss": float(np.min(np.nanmean(
                                 np.asarray(curve.eval_loss, np.float64), axis=0)))})
            for r in rows:
                if r["part"] == "A" and r["task"] == task_name and r["optimizer"] == label:
                    r["vs_told_true"] = r["final_loss"] / base
    return rows, notes, curves


def part_b(cfg: Config, untrained: bool, data_dir, cache: Path | None
           ) -> tuple[list[dict], list[str], dict]:
    rows, notes, curves = [], [], {}
    makers, horizons = {}, {}
    for name in evaluate.LEARNED:
        if untrained:
            init = lopt.init_mlp_lopt if name == "mlp_lopt" else lopt.init_star_lopt
            meta, metadata = init(jax.random.key(0)), {"config": {"horizon": 20}}
        else:
            meta, metadata = lopt.pretrained(name)
        makers[name] = evaluate.learned_factory(name, meta, metadata)
        horizons[name] = int(metadata.get("config", {}).get("horizon", 0))
    if len(set(horizons.values())) != 1 or not all(horizons.values()):
        notes.append(("B", f"Meta-training horizons differ or are missing: {horizons}; "
                            "each optimizer is run for 10x its own."))
    keys = evaluate.seed_keys(cfg.seeds)
    for task_name in cfg.long_tasks:
        task = lopt.TASKS[task_name](data_dir=data_dir)
        for name, make in makers.items():
            horizon = horizons[name] or task.horizon
            steps = cfg.long_factor * horizon
            every = evaluate.eval_interval(steps, cfg.evals)
            curve = jax.device_get(evaluate.run_seeds(task, make(steps), steps, keys,
                                                      eval_every=every))
            curves[(task_name, name)] = curve
            rows.append(_long_row(task_name, name, curve, steps, horizon))
        steps = cfg.long_factor * max(horizons.values() or [task.horizon])
        every = evaluate.eval_interval(steps, cfg.evals)
        tuned = cached(cache, (task_name, "adam", steps, cfg.learning_rates, cfg.seeds, every),
                       lambda task=task, steps=steps, every=every: evaluate.tune_baseline(
                           task, "adam", cfg.learning_rates, steps, cfg.seeds,
                           eval_every=every))
        curves[(task_name, "adam")] = jax.device_get(tuned.best)
        rows.append(_long_row(task_name, f"adam (lr {tuned.learning_rate:g})", tuned.best,
                              steps, steps // cfg.long_factor))
    return rows, notes, curves


def _long_row(task: str, name: str, curve, steps: int, horizon: int) -> dict:
    loss = np.nanmean(np.asarray(curve.eval_loss, np.float64), axis=0)
    at = np.asarray(curve.eval_steps)[0]
    index = int(np.argmin(np.abs(at - horizon)))
    final = mean_final(curve)
    return {"part": "B", "task": task, "optimizer": name, "true_steps": steps,
            "told_steps": "", "told_factor": "", "final_loss": final,
            "loss_at_meta_horizon": float(loss[index]), "min_loss": float(np.min(loss)),
            "vs_told_true": "", "final_over_min": final / float(np.min(loss))}


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def plot(path: Path, cfg: Config, rows: list[dict], curves_b: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks_b = list(dict.fromkeys(k[0] for k in curves_b))
    fig, axes = plt.subplots(1, 1 + len(tasks_b), figsize=(4.2 * (1 + len(tasks_b)), 3.4),
                             squeeze=False)
    ax = axes[0, 0]
    for (task, label), sel in _group(r for r in rows if r["part"] == "A").items():
        ax.plot([r["told_factor"] for r in sel], [r["vs_told_true"] for r in sel], marker="o",
                label=f"{task}: {label.split(' (')[0]}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("told horizon / true horizon")
    ax.set_ylabel("final loss / final loss told the truth")
    ax.set_title("A: told the wrong horizon", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(True, which="both", alpha=0.3)
    for ax, task in zip(axes[0, 1:], tasks_b, strict=True):
        for (t, name), curve in curves_b.items():
            if t != task:
                continue
            loss = np.nanmean(np.asarray(curve.eval_loss, np.float64), axis=0)
            ax.plot(np.asarray(curve.eval_steps)[0], loss, label=name)
        horizon = next(r["true_steps"] // cfg.long_factor for r in rows
                       if r["part"] == "B" and r["task"] == task)
        ax.axvline(horizon, color="grey", ls=":", lw=1, label="meta-training horizon")
        ax.set_yscale("log")
        ax.set_title(f"B: {task}, {cfg.long_factor}x horizon", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _group(rows) -> dict:
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], r["optimizer"]), []).append(r)
    return groups


def report(cfg: Config, rows, notes, info, untrained: bool) -> str:
    lines = ["# Horizons: told the wrong training length, and run far beyond meta-training", ""]
    if untrained:
        lines += ["**UNTRAINED meta-parameters (a debugging run): not the learned optimizers' "
                  "results.**", ""]
    if cfg.name != "full":
        lines += [f"**{cfg.name} variant**: not the study's result.", ""]
    lines += ["## A. Told horizon = f x the true one", "",
              f"True horizon T = {cfg.told_steps} steps, {cfg.seeds} seeds; final loss = "
              "full-training-set loss after T steps (seed mean); the last column is over the "
              "same optimizer's when told the truth (f = 1).", ""]
    lines += [text for part, text in notes if part == "A"]
    lines += ["", "| task | optimizer | f = " + " | ".join(f"{f:g}" for f in FACTORS) + " |",
              "|---|---|" + "---:|" * len(FACTORS)]
    for (task, label), sel in _group(r for r in rows if r["part"] == "A").items():
        cells = " | ".join(f"{r['final_loss']:.4g} ({r['vs_told_true']:.2f}x)" for r in sel)
        lines.append(f"| {task} | {label} | {cells} |")
    lines += ["", f"## B. {cfg.long_factor}x the meta-training horizon", "",
              "Loss at the meta-training horizon H, at the end (the true horizon, told to "
              "optimizers with horizon inputs), the minimum along the run, and final / minimum "
              "(above 1: the loss went back up).", "",
              "| task | optimizer | steps | loss at H | final loss | min loss | final / min |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in (r for r in rows if r["part"] == "B"):
        lines.append(f"| {r['task']} | {r['optimizer']} | {r['true_steps']} | "
                     f"{r['loss_at_meta_horizon']:.4g} | {r['final_loss']:.4g} | "
                     f"{r['min_loss']:.4g} | {r['final_over_min']:.2f} |")
    lines += [""] + [f"- {text}" for part, text in notes if part == "B"]
    lines += ["", "![horizon study](horizon.png)", "", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    return "\n".join(lines) + "\n"


def machine(load_before: float, seconds: float) -> dict[str, str]:
    found = _common.git_commit("bilevel", "experiments/lopt_horizon.py")
    commit = "unknown" if found is None else found[0] + (" (uncommitted changes)" if found[1]
                                                         else " (clean)")
    return {"CPU": f"{_common.cpu_model()} ({os.cpu_count()} cores, shared)",
            "platform": platform.platform(),
            "JAX": f"{jax.__version__}, optax {optax.__version__}", "library at commit": commit,
            "load average (1 min) before / after": f"{load_before:.2f} / {os.getloadavg()[0]:.2f}",
            "wall time": f"{seconds / 60:.1f} min",
            "date (UTC)": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--untrained", action="store_true",
                        help="freshly initialised meta-parameters (debugging the script only)")
    parser.add_argument("--parts", default="A,B", help="comma list of A, B (default: both)")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder keeping Adam's sweeps between runs (default: none)")
    parser.add_argument("--out", type=Path,
                        default=_common.ROOT / "experiments" / "results" / "lopt")
    args = parser.parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    load_before, start = os.getloadavg()[0], time.perf_counter()
    rows, notes, curves_b = [], [], {}
    if "A" in args.parts:
        new, note, _ = part_a(cfg, args.untrained, args.data_dir, args.cache)
        rows, notes = rows + new, notes + note
        print(f"part A done ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    if "B" in args.parts:
        new, note, curves_b = part_b(cfg, args.untrained, args.data_dir, args.cache)
        rows, notes = rows + new, notes + note
        print(f"part B done ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    info = machine(load_before, time.perf_counter() - start)
    write_csv(args.out / "horizon.csv", rows)
    plot(args.out / "horizon.png", cfg, rows, curves_b)
    text = report(cfg, rows, notes, info, args.untrained)
    (args.out / "horizon.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
