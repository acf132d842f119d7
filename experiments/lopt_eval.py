"""Study: the shipped learned optimizers against LR-tuned Adam, NAdamW and SGD-momentum.

Every named task of ``lopt.TASKS`` whose data is on this machine (9 tasks, 5 of them held out
from meta-training: a wider and deeper MLP, a deep ELU MLP on MNIST-5k, a CNN, a 10x longer
horizon, an ill-conditioned quadratic) is trained for its horizon by

* ``mlp_lopt`` and ``star_lopt`` with the shipped meta-parameters (``lopt.pretrained``), and
* Adam, NAdamW and SGD-momentum, each over a half-decade grid of 9 learning rates (1e-4 ... 1),

all with the same 3 seeds (same initial parameters and minibatches per seed). The tuned baseline
is the rate with the lowest mean final full-training-set loss. Per task: final losses, the
speed-up (steps LR-tuned Adam needs to reach a learned optimizer's final loss / its steps;
VeLO's metric), and across tasks a performance profile. The core is
:mod:`bilevel.lopt.evaluate`; this script runs the configuration and writes the results.

Usage::

    python experiments/lopt_eval.py                        # full study (shipped meta-params)
    python experiments/lopt_eval.py --smoke --out /tmp/e   # 2 tasks, short runs (about 1 min)

Writes ``eval.csv``, ``eval.md``, ``eval_profile.png`` and ``eval_curves.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import inspect
import math
import os
import pickle
import platform
import sys
import time
from pathlib import Path

import _common  # noqa: E402  (experiments/ is on sys.path when run as a script)
import jax
import numpy as np
import optax

from bilevel import lopt
from bilevel.lopt import evaluate


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    tasks: tuple[str, ...] | None  # None: every task whose data is available
    steps: int | None  # None: each task's horizon
    seeds: int
    learning_rates: tuple[float, ...]
    evals: int


FULL = Config("full", None, None, 3, evaluate.DEFAULT_LRS, 20)
SMOKE = Config("smoke", ("mlp_digits", "cnn_digits"), 40, 2, (1e-3, 1e-2, 1e-1), 4)


def load_learned(args) -> tuple[dict, dict]:
    """``({name: make(steps)}, {name: metadata})`` from the shipped files or ``--meta-dir``."""
    makers, metadatas = {}, {}
    for name in evaluate.LEARNED:
        if args.untrained:
            init = {"mlp_lopt": lopt.init_mlp_lopt, "star_lopt": lopt.init_star_lopt,
                    "velo_lopt": lopt.init_velo_lopt}[name]
            meta, metadata = init(jax.random.key(0)), {"untrained": True}
        elif args.meta_dir is not None:
            meta, metadata = lopt.load_meta_params(args.meta_dir / f"{name}.npz")
        else:
            meta, metadata = lopt.pretrained(name)
            path = lopt.optimizers.PRETRAINED_DIR / f"{name}.npz"
            metadata = {**metadata, "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        makers[name] = evaluate.learned_factory(name, meta, metadata)
        metadatas[name] = metadata
    return makers, metadatas


def cached(cache: Path | None, key: tuple, compute):
    """``compute()``, or its pickled result from an earlier run with the same key.

    The key includes the sources of the task and evaluation modules, so an edited task or
    harness is never served a stale result. Lets the baselines' sweeps, which do not depend on
    the meta-parameters, be run before the meta-parameters exist.
    """
    if cache is None:
        return compute()
    sources = inspect.getsource(lopt.tasks) + inspect.getsource(evaluate)
    digest = hashlib.sha256(repr((key, sources)).encode()).hexdigest()[:20]
    path = cache / f"{key[0]}_{key[1]}_{digest}.pkl"
    if path.is_file():
        with path.open("rb") as f:
            return pickle.load(f)
    value = jax.device_get(compute())
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        pickle.dump(value, f)
    os.replace(tmp, path)
    return value


def tuned_baselines(task, cfg: Config, steps: int, cache: Path | None) -> dict:
    every = evaluate.eval_interval(steps, cfg.evals)
    return {name: cached(cache, (task.name, name, steps, cfg.learning_rates, cfg.seeds, every),
                         lambda name=name: evaluate.tune_baseline(
                             task, name, cfg.learning_rates, steps, cfg.seeds, eval_every=every))
            for name in evaluate.BASELINES}


def task_names(cfg: Config, data_dir) -> list[str]:
    if cfg.tasks is not None:
        return list(cfg.tasks)
    return [t for t in lopt.TASKS if data_dir is not None or t not in lopt.tasks.NEEDS_DATA_DIR]


def verdicts(rows: list[dict]) -> list[str]:
    """One sentence per (task, learned optimizer): better or worse than tuned Adam, and by how
    much, so a loss to Adam is stated where it happens."""
    lines = []
    by_task = {}
    for r in rows:
        by_task.setdefault(r["task"], {})[r["optimizer"]] = r
    for task, table in by_task.items():
        adam = table.get("adam")
        for name in evaluate.LEARNED:
            r = table.get(name)
            if r is None or adam is None:
                continue
            ratio = r["final_loss"] / adam["final_loss"]
            word = "beats" if ratio < 1 else "LOSES TO"
            lines.append(f"- {task}{' (held out)' if r['held_out'] else ''}: {name} {word} "
                         f"tuned Adam: final loss {r['final_loss']:.4g} vs {adam['final_loss']:.4g}"
                         f" ({ratio:.2f}x); speed-up {evaluate.format_speedup(r)}.")
    return lines


def summary(rows: list[dict]) -> list[str]:
    lines = []
    for name in evaluate.LEARNED + evaluate.BASELINES[1:]:
        mine = [r for r in rows if r["optimizer"] == name]
        if not mine:
            continue
        adam = {r["task"]: r["final_loss"] for r in rows if r["optimizer"] == "adam"}
        wins = [r for r in mine if r["final_loss"] < adam.get(r["task"], math.inf)]
        held = [r for r in mine if r["held_out"]]
        held_wins = [r for r in held if r in wins]
        speeds = [r["speedup"] for r in mine if r["speedup_reached"] is True]
        not_reached = sum(1 for r in mine if r["speedup_reached"] is False)
        geo = (f"median speed-up {np.median(speeds):.2f}x (range {min(speeds):.2f}-"
               f"{max(speeds):.2f}x) over the {len(speeds)} tasks where Adam reached its loss"
               if speeds else "no task where Adam reached its loss")
        lines.append(f"- {name}: lower final loss than tuned Adam on {len(wins)}/{len(mine)} "
                     f"tasks ({len(held_wins)}/{len(held)} held out); {geo}; Adam never "
                     f"reached it on {not_reached}.")
    return lines


def plot_profile(rows: list[dict], path: Path) -> None:
    """The performance profile over τ from 1 to past the worst ratio, so every optimizer's
    curve reaches 1 on the plot (learned optimizers here are up to thousands of times off)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, names, losses = evaluate.profile_table(rows)
    ratios = losses / losses.min(axis=1, keepdims=True)
    largest = float(np.max(ratios[np.isfinite(ratios)], initial=1.0))
    taus = np.geomspace(1.0, max(10.0, 1.5 * largest), 800)
    rho = evaluate.performance_profile(losses, taus)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, curve in zip(names, rho, strict=True):
        learned = name in evaluate.LEARNED
        ax.step(taus, curve, where="post", label=name, lw=2.2 if learned else 1.2,
                ls="-" if learned else "--")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("τ (final training loss within τ × the best on the task)")
    ax.set_ylabel(f"fraction of the {len(tasks)} tasks")
    ax.set_title(f"performance profile, {len(tasks)} tasks")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(results: list[evaluate.TaskResult], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = math.ceil(len(results) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, result in zip(axes.flat, results, strict=False):
        curves = {**result.learned, **{n: t.best for n, t in result.tuned.items()}}
        for name, curve in curves.items():
            steps = np.asarray(curve.eval_steps)[0]
            loss = np.asarray(curve.eval_loss, np.float64).mean(axis=0)
            ax.plot(steps, loss, label=name, lw=2.0 if name in evaluate.LEARNED else 1.0,
                    ls="-" if name in evaluate.LEARNED else "--")
        ax.set_yscale("log")
        ax.set_title(result.task.name + (" (held out)" if result.task.held_out else ""),
                     fontsize=9)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("full training loss (seed mean)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine(load_before: float, seconds: float) -> dict[str, str]:
    found = _common.git_commit("bilevel", "experiments/lopt_eval.py")
    commit = "unknown" if found is None else found[0] + (" (uncommitted changes)" if found[1]
                                                         else " (clean)")
    return {"CPU": f"{_common.cpu_model()} ({os.cpu_count()} cores, shared)",
            "platform": platform.platform(), "Python": platform.python_version(),
            "JAX": f"{jax.__version__}, optax {optax.__version__}",
            "backend": jax.default_backend(), "library at commit": commit,
            "load average (1 min) before / after": f"{load_before:.2f} / {os.getloadavg()[0]:.2f}",
            "wall time": f"{seconds / 60:.1f} min",
            "date (UTC)": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")}


def report(cfg: Config, rows, metadatas, info, untrained: bool) -> str:
    lines = ["# Learned optimizers against tuned baselines", ""]
    if untrained:
        lines += ["**UNTRAINED meta-parameters (a debugging run): these are not the learned "
                  "optimizers' results.**", ""]
    if cfg.name != "full":
        lines += [f"**{cfg.name} variant**: not the study's result.", ""]
    lrs = ", ".join(f"{v:g}" for v in cfg.learning_rates)
    lines += [f"{len({r['task'] for r in rows})} tasks "
              f"({len({r['task'] for r in rows if r['held_out']})} held out from meta-training), "
              f"{cfg.seeds} seeds (the same initial parameters and minibatches for every "
              f"optimizer), each task run for "
              f"{'its horizon' if cfg.steps is None else f'{cfg.steps} steps'}. Baselines: "
              f"Adam, NAdamW (weight decay {evaluate.NADAMW_WEIGHT_DECAY:g}), SGD with momentum "
              f"{evaluate.SGD_MOMENTUM}, each over {len(cfg.learning_rates)} learning rates "
              f"({lrs}); the tuned rate has the lowest seed-mean final loss ('edge' = the best "
              "rate is at the end of the grid). Final train loss = loss on the whole training "
              "set after the last step, mean ± std over seeds; x best = over the best optimizer's"
              " on the task. Speed-up = steps LR-tuned Adam (the rate that gets there first) "
              "needs to reach the optimizer's final loss / the optimizer's steps, interpolated "
              f"between {cfg.evals} evaluations per run; '>' = no Adam run got there (a lower "
              "bound), below 1 = Adam is faster. A learned optimizer with fraction-of-training "
              "inputs is told the true number of steps; 0.00x: tuned Adam reached that loss "
              "in under 0.5% of the steps (or at step 0: the optimizer ended at or above the "
              "initial loss).", "", evaluate.markdown_table(rows), "",
              "## Against tuned Adam", ""] + summary(rows) + [""] + verdicts(rows)
    lines += ["", "![performance profile](eval_profile.png)", "",
              "![loss curves](eval_curves.png)", "", "## Meta-parameters", ""]
    for name, metadata in metadatas.items():
        keep = {k: v for k, v in metadata.items() if not isinstance(v, dict | list) or k in
                ("optimizer_kwargs", "tasks")}
        lines.append(f"- {name}: {keep}")
    lines += ["", "## Machine", ""] + [f"- {k}: {v}" for k, v in info.items()]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="2 tasks, short runs")
    parser.add_argument("--tasks", default=None, help="comma list (default: all available)")
    parser.add_argument("--meta-dir", type=Path, default=None,
                        help="folder with mlp_lopt.npz and star_lopt.npz (default: shipped)")
    parser.add_argument("--untrained", action="store_true",
                        help="freshly initialised meta-parameters (debugging the harness only)")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder keeping the baselines' sweeps between runs (default: none)")
    parser.add_argument("--baselines-only", action="store_true",
                        help="only run (and cache) the baselines' sweeps, write nothing else")
    parser.add_argument("--out", type=Path,
                        default=_common.ROOT / "experiments" / "results" / "lopt")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    if args.tasks:
        cfg = dataclasses.replace(cfg, tasks=tuple(args.tasks.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    makers, metadatas = ({}, {}) if args.baselines_only else load_learned(args)
    load_before, start = os.getloadavg()[0], time.perf_counter()
    rows, results = [], []
    for name in task_names(cfg, args.data_dir):
        task = lopt.TASKS[name](data_dir=args.data_dir)
        steps = cfg.steps or task.horizon
        t0 = time.perf_counter()
        tuned = tuned_baselines(task, cfg, steps, args.cache)
        if args.baselines_only:
            print(f"{name:<24} baselines {time.perf_counter() - t0:6.0f} s", file=sys.stderr,
                  flush=True)
            continue
        every = evaluate.eval_interval(steps, cfg.evals)
        learned = {}
        for opt_name, make in makers.items():
            tag = metadatas[opt_name].get("file_sha256", "untrained")
            if tag == "untrained" or args.cache is None:
                tag = None
            learned[opt_name] = cached(
                args.cache if tag else None, (name, opt_name, steps, cfg.seeds, every, tag,
                                              inspect.getsource(lopt.optimizers)),
                lambda make=make, task=task, steps=steps, every=every: evaluate.run_seeds(
                    task, make(steps), steps, evaluate.seed_keys(cfg.seeds), eval_every=every))
        result = evaluate.TaskResult(task, learned, tuned)
        results.append(result)
        new = evaluate.result_rows(result, steps)
        rows += new
        print(f"{name:<24} {steps:>5} steps {time.perf_counter() - t0:6.0f} s  " + "  ".join(
            f"{r['optimizer']} {r['final_loss']:.3g} ({evaluate.format_speedup(r)})"
            for r in new), file=sys.stderr, flush=True)
    if args.baselines_only:
        return 0
    info = machine(load_before, time.perf_counter() - start)
    evaluate.write_csv(rows, args.out / "eval.csv")
    plot_profile(rows, args.out / "eval_profile.png")
    plot_curves(results, args.out / "eval_curves.png")
    text = report(cfg, rows, metadatas, info, args.untrained)
    (args.out / "eval.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
