"""Study: do the shipped learned optimizers stay stable when told a horizon 0.25x-4x the true
one (issue 17: no NaN, no loss above 1.5x its initial value)?

Every named task of ``lopt.TASKS`` whose data is on this machine is trained for its own horizon
``T`` by each shipped learned optimizer told ``num_steps = f·T`` for f in ``--factors``
(0.25, 1, 4), over a few seeds. ``mlp_lopt`` reads no horizon, so its one run per seed stands
for every f. Each optimizer runs twice, as ``lopt.pretrained_optimizer`` makes it: with the
step rule as meta-trained (``before``: ``safeguards=False``; for ``velo_lopt`` VeLO's rule,
scale = RMS(θ), no trust region, no guard) and with the safeguards of
:mod:`bilevel.lopt.safeguards` (``after``: the defaults; built into ``velo_lopt``, wrapped
around ``mlp_lopt`` and ``star_lopt``). A run *diverges* when any of its losses (the
minibatch loss at every step, the full-training-set loss at ``--evals`` points) is not finite,
or when a full-training-set loss exceeds 1.5x the initial one. Where neither rule diverged,
the final full-training-set loss after over before is tabulated (what the safeguards cost).
Besides the named tasks, ``mlp_digits_bias_free`` (``mlp_digits`` without its bias vectors) is
run, the network on which VeLO's rule was known to diverge.

STAR (``--parts star``): on four tasks of its meta-training family, STAR runs 10x its
meta-training horizon ``H`` (told ``H``, so ``told_factor`` = 0.1 and its fraction-of-training
inputs saturate), as shipped, with its nominal term removed (``nominal_step=0``: the learned
terms alone) and with its learned heads zeroed (``init_star_lopt``: the nominal AggMo-Adam term
alone), to show what the nominal term does there (Harrison et al. 2022).

Usage::

    python experiments/lopt_stability.py                         # full study
    python experiments/lopt_stability.py --smoke --out /tmp/s    # 2 tasks, 40 steps
    python experiments/lopt_stability.py --combine a.csv b.csv   # tables from parts run apart

Writes ``stability.csv`` and ``stability.md`` into ``--out`` after every task, so an
interrupted run leaves a partial result, labelled as such.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import platform
import sys
import time
from pathlib import Path

import _common  # noqa: E402  (experiments/ is on sys.path when run as a script)
import jax
import jax.numpy as jnp
import numpy as np

from bilevel import lopt
from bilevel.lopt import evaluate, safeguards

OUT = Path(__file__).resolve().parent / "results" / "lopt"
FACTORS = (0.25, 1.0, 4.0)
DIVERGENCE = 1.5  # a run diverges when its full-training-set loss exceeds this x the initial
#: ``(optimizer, rule) -> keyword arguments of lopt.pretrained_optimizer``: the step rule as
#: meta-trained (``before``; VeLO's for velo_lopt) and with the safeguards (``after``).
RULES = {(name, rule): ({"safeguards": False} if rule == "before" else {})
         for name in ("mlp_lopt", "star_lopt", "velo_lopt") for rule in ("before", "after")}
STAR_TASKS = ("mlp_digits", "logistic_digits", "quadratic", "mlp_mnist5k")
STAR_FACTOR = 10  # STAR runs this many times its meta-training horizon
COLUMNS = ("task", "held_out", "steps", "optimizer", "rule", "told_factor", "seeds", "nan_runs",
           "diverged_runs", "worst_max_over_initial", "mean_final_over_initial",
           "mean_final_loss")


def bias_free(task):
    """``task`` (an MLP of ``lopt.tasks.image_mlp_task``) with its biases held at zero and
    removed from the parameters."""
    def full(params):
        return {**params, **{f"b{k[1:]}": jnp.zeros(v.shape[1:], v.dtype)
                             for k, v in params.items()}}

    return task._replace(
        name=f"{task.name}_bias_free", held_out=True,
        init=lambda key: {k: v for k, v in task.init(key).items() if k.startswith("w")},
        loss=lambda params, batch: task.loss(full(params), batch),
        eval_loss=lambda params: task.eval_loss(full(params)))


def _builder(name: str, kwargs: dict):
    """``build(told)`` for a shipped optimizer (``lopt.pretrained_optimizer``, what a user
    gets) and whether it reads the horizon."""
    _, metadata = lopt.pretrained(name)
    horizon = name == "velo_lopt" or bool(metadata.get("horizon_features"))
    return (lambda told: lopt.pretrained_optimizer(name, num_steps=told if horizon else None,
                                                   **kwargs)), horizon


def run_factors(task, build, steps: int, told: np.ndarray, keys: jax.Array, every: int
                ) -> evaluate.Curve:
    """One compiled program: axes ``(len(told), len(keys))``; the told horizon is traced."""
    def one(t, key):
        return evaluate.run_optimizer(task, build(t), steps, key, eval_every=every)

    fn = jax.jit(jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None)))
    return fn(jnp.asarray(told, jnp.float32), keys)


def summarise(curve: evaluate.Curve) -> dict:
    """Per-run flags and ratios over the seed axis (the last leading axis)."""
    train = np.asarray(curve.train_loss, np.float64)
    ev = np.asarray(curve.eval_loss, np.float64)
    nan = ~np.isfinite(train).all(-1) | ~np.isfinite(ev).all(-1)
    ratio = np.where(np.isfinite(ev), ev, np.inf) / ev[..., :1]
    diverged = nan | (ratio.max(-1) > DIVERGENCE)
    final = np.where(np.isfinite(ev[..., -1]), ev[..., -1], np.inf)
    return {"nan_runs": int(nan.sum()), "diverged_runs": int(diverged.sum()),
            "worst_max_over_initial": float(ratio.max()),
            "mean_final_over_initial": float(np.mean(final / ev[..., 0])),
            "mean_final_loss": float(np.mean(final))}


def run_task(task, factors, seeds: int, evals: int, steps: int | None, rules=None
             ) -> list[dict]:
    steps = steps or task.horizon
    every = evaluate.eval_interval(steps, evals)
    keys = evaluate.seed_keys(seeds)
    rows = []
    for (name, rule), kwargs in RULES.items():
        if rules is not None and f"{name}:{rule}" not in rules:
            continue
        build, horizon = _builder(name, kwargs)
        told = np.asarray([f * steps for f in factors]) if horizon else np.asarray([steps])
        start = time.time()
        curve = run_factors(task, build, steps, told, keys, every)
        for i, factor in enumerate(factors):
            index = i if horizon else 0
            one = jax.tree_util.tree_map(lambda x, index=index: x[index], curve)
            rows.append({"task": task.name, "held_out": task.held_out, "steps": steps,
                         "optimizer": name, "rule": rule, "told_factor": factor,
                         "seeds": seeds, **summarise(one)})
        print(f"{task.name} {name} ({rule}): "
              + ", ".join(f"f={r['told_factor']:g} {r['diverged_runs']}/{seeds}"
                          for r in rows[-len(factors):])
              + f" diverged  [{time.time() - start:.0f} s]", flush=True)
    return rows


def _parse(row: dict) -> dict:
    out = {}
    for key, value in row.items():
        if key == "held_out":
            out[key] = value == "True"
        elif key in ("steps", "seeds", "nan_runs", "diverged_runs"):
            out[key] = int(value)
        elif key in ("task", "optimizer", "rule"):
            out[key] = value
        else:
            out[key] = float(value)
    return out


def star_variants() -> dict[str, tuple]:
    """``label -> (meta, nominal_step)`` of the STAR study, and its meta-training horizon."""
    meta, metadata = lopt.pretrained("star_lopt")
    nominal = dict(metadata.get("optimizer_kwargs", {})).get("nominal_step", 1e-3)
    zeroed = lopt.init_star_lopt(jax.random.key(0), horizon_features=True)
    return {"10x H: shipped": (meta, nominal), "10x H: learned terms only": (meta, 0.0),
            "10x H: nominal term alone": (zeroed, nominal)}, int(metadata["config"]["horizon"])


def run_star(task, seeds: int, evals: int) -> list[dict]:
    variants, horizon = star_variants()
    steps = STAR_FACTOR * horizon
    every = evaluate.eval_interval(steps, evals)
    rows = []
    for label, (meta, nominal) in variants.items():
        start = time.time()
        opt = lopt.star_lopt(meta, num_steps=horizon, nominal_step=nominal)
        curve = evaluate.run_seeds(task, opt, steps, evaluate.seed_keys(seeds), eval_every=every)
        rows.append({"task": task.name, "held_out": task.held_out, "steps": steps,
                     "optimizer": "star_lopt", "rule": label,
                     "told_factor": horizon / steps, "seeds": seeds, **summarise(curve)})
        print(f"{task.name} star_lopt ({label}): {rows[-1]['diverged_runs']}/{seeds} diverged, "
              f"final/initial {rows[-1]['mean_final_over_initial']:.3g} "
              f"[{time.time() - start:.0f} s]", flush=True)
    return rows


def star_table(rows: list[dict]) -> list[str]:
    mine = [r for r in rows if r["rule"].startswith("10x H")]
    if not mine:
        return []
    lines = ["## STAR at 10x its meta-training horizon", "",
             f"Told H = {int(mine[0]['told_factor'] * mine[0]['steps'])} steps, run "
             f"{mine[0]['steps']}. Shipped: as meta-trained; learned terms only: "
             "`nominal_step=0`; nominal term alone: the learned heads zeroed (`init_star_lopt`).",
             "", "| task | variant | diverged | worst max / initial | final / initial |",
             "|---|---|---:|---:|---:|"]
    for r in mine:
        lines.append(f"| {r['task']} | {r['rule'][7:]} | {r['diverged_runs']} / {r['seeds']} | "
                     f"{_fmt(r['worst_max_over_initial'])} | "
                     f"{_fmt(r['mean_final_over_initial'])} |")
    return lines + [""]


def cost_table(rows: list[dict], factors) -> list[str]:
    """Mean final loss ``after / before`` per task and optimizer, over the told factors at which
    no run of either rule diverged, and their geometric mean over those tasks."""
    lines = ["## Final loss with the safeguards over without", "",
             "Mean final full-training-set loss, `after` / `before`, per told factor where no "
             "run of either rule diverged (a dash: one did; mlp_lopt reads no horizon, so its "
             "three cells are one pair of runs); `geo. mean` over the cells shown.",
             "", "| task | optimizer | " + " | ".join(f"f = {f:g}" for f in factors) + " |",
             "|---|---|" + "---:|" * len(factors)]
    logs: dict[str, list[float]] = {}
    found = {(r["task"], r["optimizer"]) for r in rows if r["rule"] == "after"}
    for task, name in sorted(found):
        cells = []
        for f in factors:
            pair = {r["rule"]: r for r in rows if r["task"] == task and r["optimizer"] == name
                    and r["told_factor"] == f and r["rule"] in ("before", "after")}
            if len(pair) < 2 or any(r["diverged_runs"] for r in pair.values()):
                cells.append("–")
                continue
            ratio = pair["after"]["mean_final_loss"] / pair["before"]["mean_final_loss"]
            logs.setdefault(name, []).append(math.log(ratio))
            cells.append(f"{ratio:.3f}")
        lines.append(f"| {task} | {name} | " + " | ".join(cells) + " |")
    for name, values in sorted(logs.items()):
        lines.append(f"| geo. mean | {name} | {math.exp(np.mean(values)):.3f} over "
                     f"{len(values)} cells |" + " |" * (len(factors) - 1))
    return lines + [""]


def _fmt(x) -> str:
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.4g}"
    return str(x)


def totals(rows: list[dict], factors) -> list[str]:
    lines = ["| optimizer | rule | " + " | ".join(f"f = {f:g}" for f in factors)
             + " | all |", "|---|---|" + "---:|" * (len(factors) + 1)]
    for name, rule in RULES:
        mine = [r for r in rows if r["optimizer"] == name and r["rule"] == rule
                and r["told_factor"] in factors]
        if not mine:
            continue
        cells = []
        for f in (*factors, None):
            sel = [r for r in mine if f is None or r["told_factor"] == f]
            runs = sum(r["seeds"] for r in sel)
            cells.append(f"{sum(r['diverged_runs'] for r in sel)} / {runs} "
                         f"({sum(r['nan_runs'] for r in sel)} NaN)")
        lines.append(f"| {name} | {rule} | " + " | ".join(cells) + " |")
    return lines


def write(rows: list[dict], out: Path, args, done: int, total: int, wall: float) -> None:
    rows = sorted(rows, key=lambda r: (r["task"], r["optimizer"], r["rule"], r["told_factor"]))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stability.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    commit = _common.git_commit("bilevel", "experiments")
    status = ("complete" if done == total else
              f"**PARTIAL: {done} of {total} tasks have every optimizer's rows** (interrupted; "
              f"the per-task table shows which rows exist)")
    lines = [
        "# Stability of the shipped learned optimizers against the told horizon", "",
        f"Status: {status}. Each task trained for its own horizon T by each shipped optimizer "
        f"told num_steps = f·T, {args.seeds} seeds. A run diverges when a loss is not finite or "
        f"the full-training-set loss (at {args.evals} points and at the start) exceeds "
        f"{DIVERGENCE}x its initial value. mlp_lopt reads no horizon: one run per seed, "
        f"repeated under every f. `before` = the step rule as meta-trained "
        f"(`lopt.pretrained_optimizer(..., safeguards=False)`; for velo_lopt VeLO's: scale "
        f"RMS(θ), no trust region, no guard); `after` = `lopt.pretrained_optimizer`'s default, "
        f"the safeguards of `bilevel.lopt.safeguards` (min_scale={safeguards.MIN_SCALE:g}, "
        f"max_relative_step={safeguards.MAX_RELATIVE_STEP:g}, "
        f"max_regress={safeguards.MAX_REGRESS:g}, guard_rate={safeguards.GUARD_RATE:g}; "
        f"progress floor {safeguards.PROGRESS_FLOOR:g}·ℓ₀, regrowth "
        f"{safeguards.REGROW_RATIO:g}·guard_rate a step), built into velo_lopt and wrapped "
        f"around mlp_lopt and star_lopt. mlp_digits_bias_free is mlp_digits without its "
        f"biases." + (f" {args.note}" if getattr(args, "note", None) else ""), "",
        "## Diverged runs (of all runs), over the tasks", "", *totals(rows, args.factors), "",
        *cost_table(rows, args.factors), *star_table(rows), "## Per task", "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    lines += ["", "## Machine", "", f"- CPU: {_common.cpu_model()}",
              f"- platform: {platform.platform()}",
              f"- JAX: {jax.__version__}, devices: {jax.devices()[0].platform}",
              "- library at commit: " + (
                  f"{commit[0]}{' (with local changes)' if commit[1] else ''}" if commit
                  else "unknown"),
              f"- wall time: {wall / 60:.1f} min" + (" (combined from parts run apart: the longest)"
                                                     if args.combine else ""),
              f"- date (UTC): {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}"]
    (out / "stability.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="2 tasks, 40 steps, 2 seeds")
    parser.add_argument("--tasks", nargs="*", default=None, help="default: every available task")
    parser.add_argument("--factors", type=float, nargs="+", default=list(FACTORS))
    parser.add_argument("--seeds", type=_common.positive_int, default=2)
    parser.add_argument("--evals", type=_common.positive_int, default=20)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--rules", default=None,
                        help="comma list of optimizer:rule to run (default all), e.g. "
                             "velo_lopt:after")
    parser.add_argument("--parts", default="told,star",
                        help="comma list: told (the told-horizon counts), star (STAR at 10x "
                             "its meta-training horizon); default both")
    parser.add_argument("--combine", type=Path, nargs="+", default=None,
                        help="write the tables from these stability.csv files (parts run apart, "
                             "same --seeds, --evals, --factors) instead of running")
    parser.add_argument("--total-tasks", type=int, default=0,
                        help="with --combine: how many tasks the study has (default: those found)")
    parser.add_argument("--wall-minutes", type=float, default=0.0,
                        help="with --combine: the wall time to report")
    parser.add_argument("--note", default=None,
                        help="a sentence added to the description (e.g. where combined rows "
                             "come from)")
    args = parser.parse_args(argv)
    if args.combine:
        rows = [_parse(r) for path in args.combine for r in csv.DictReader(open(path))]
        names = sorted({r["task"] for r in rows})
        complete = [n for n in names if {(r["optimizer"], r["rule"]) for r in rows
                                         if r["task"] == n} >= set(RULES)]
        write(rows, args.out, args, len(complete), args.total_tasks or len(names),
              60 * args.wall_minutes)
        print((args.out / "stability.md").read_text())
        return 0
    names = args.tasks or (["mlp_digits", "quadratic"] if args.smoke else None)
    extra = "mlp_digits_bias_free"
    tasks, missing = evaluate.load_tasks(
        None if names is None else [n for n in names if n != extra], args.data_dir)
    if not args.smoke and (names is None or extra in names):
        tasks.append(bias_free(lopt.TASKS["mlp_digits"](data_dir=args.data_dir)))
    parts = set(args.parts.split(","))
    for name, why in missing:
        print(f"skipping {name}: {why}", file=sys.stderr)
    steps = 40 if args.smoke else None
    rows, start = [], time.time()
    for done, task in enumerate(tasks, 1):
        evals = args.evals if not args.smoke else 4
        if "told" in parts:
            rows += run_task(task, args.factors, args.seeds, evals, steps,
                             None if args.rules is None else args.rules.split(","))
        if "star" in parts and task.name in STAR_TASKS and not args.smoke:
            rows += run_star(task, args.seeds, evals)
        write(rows, args.out, args, done, len(tasks), time.time() - start)
    print((args.out / "stability.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
