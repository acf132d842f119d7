"""Weightings of FixMatch's unlabelled loss on Fashion-MNIST with near OOD, over paired seeds:
supervised, FixMatch, the oracle filter, max-softmax, L2RW's one-step look-ahead and the
confidence network (identity, Neumann or CG inverse-HVP; image or image+softmax input; the
held-out validation set or the labelled set as meta data).

The setting is the headroom study's (``experiments/fmnist_headroom.py``): ID classes 0–5, near
OOD classes 6–9 added at ``--ood-ratio`` times a fixed ID pool, ``--budget`` labelled images
per class (one of them the validation image, which methods without a meta loss train on), the
(8, 16) CNN on 14×14 images, one seed at a time. Arms are ``name[:field=value...]`` as in
``experiments/ssl_arms.py``, e.g. ``confnet-cg:conf_inputs=image+softmax:meta_data=labelled``.

Every finished (arm, seed) run is appended to ``OUT.jsonl``; rerunning the same command resumes
(nothing finished runs again), and the table and plot are rewritten after every run. The file is
read again before each run, so two processes given the same ``--out`` (one per core) share the
work: neither repeats a run the other has finished.

    python -m experiments.fmnist_arms --arms fixmatch,oracle,softmax,confnet-cg --seeds 10
    python -m experiments.fmnist_arms --smoke        # a minute: a tiny configuration
"""

from __future__ import annotations

import argparse
import json
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.progress import Progress  # noqa: E402

from bilevel import datasets  # noqa: E402
from bilevel.argtypes import positive_int  # noqa: E402
from experiments import fmnist_headroom as headroom  # noqa: E402
from experiments import ssl_arms  # noqa: E402
from experiments import ssl_common as common  # noqa: E402
from semisup import fixmatch, metrics  # noqa: E402

DEFAULT_ARMS = ("fixmatch,oracle,softmax,l2rw,confnet-identity,confnet-neumann,confnet-cg,"
                "confnet-cg:conf_inputs=image+softmax,"
                "confnet-cg:conf_inputs=image+softmax:meta_data=labelled")

#: Columns of the table: (row key, heading, percent?).
COLUMNS = (("weight_auroc", "AUROC ID/OOD", False),
           ("correct_weight_auroc", "AUROC correct PL", False),
           ("ood_weight_share", "OOD weight", True),
           ("pseudo_label_accuracy", "PL acc. (ID)", True),
           ("pseudo_label_top_share", "PL top class", True))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=DEFAULT_ARMS,
                        help="comma-separated arms name[:field=value...]")
    parser.add_argument("--budget", type=positive_int, default=4,
                        help="labelled images per ID class (one of them is the validation image)")
    parser.add_argument("--ood-ratio", type=float, default=3.0,
                        help="near OOD per ID unlabelled image")
    parser.add_argument("--unlabelled", type=positive_int, default=3000, help="ID unlabelled pool")
    parser.add_argument("--seeds", type=positive_int, default=10)
    parser.add_argument("--steps", type=positive_int, default=2000)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--mu", type=positive_int, default=4)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--meta-every", type=positive_int, default=5)
    parser.add_argument("--meta-lr", type=float, default=1e-2)
    parser.add_argument("--maxiter", type=positive_int, default=10,
                        help="the meta-step solver's iteration budget")
    parser.add_argument("--pool", type=positive_int, default=2,
                        help="average-pool the 28×28 images by this factor")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(common.RESULTS / "fashion_mnist" / "arms"))
    parser.add_argument("--table-only", action="store_true",
                        help="rewrite the table and plot from OUT.jsonl, running nothing")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.unlabelled, args.ood_ratio = 2, 10, 200, 1.0
        args.arms = "fixmatch,oracle,confnet-cg"
        args.out += "_smoke"
    arms = [a for a in args.arms.split(",") if a]
    if "fixmatch" not in arms or "oracle" not in arms:
        parser.error("--arms: must include fixmatch and oracle (the table is relative to them)")
    fields = dict(steps=args.steps, batch_size=args.batch, mu=args.mu, ema=0.99, flip=False,
                  meta_every=args.meta_every, meta_lr=args.meta_lr, maxiter=args.maxiter,
                  threshold=args.threshold, **headroom.MODELS["cnn"][0])
    try:  # every arm's configuration, checked before anything runs
        configs = {arm: fixmatch.Config(**{**fields, **ssl_arms._arm_overrides(arm)})
                   for arm in arms}
    except ValueError as error:
        parser.error(str(error))
    seeds = list(range(args.seeds))
    out = common.Path(args.out)
    if args.table_only:
        rows, timing = _read(out.with_suffix(".jsonl"))
        _write(rows, timing, arms, seeds, args, out)
        print(out.with_suffix(".md").read_text())
        return 0
    dataset = headroom.downsample(datasets.load("fashion_mnist", args.data_dir), args.pool)
    data = common.splits(dataset, seeds, labelled_per_class=args.budget - 1,
                         validation_per_class=1, num_unlabelled=args.unlabelled,
                         ood_ratio=args.ood_ratio, ood="near", design="add")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, timing = _read(out.with_suffix(".jsonl"))
    with Progress() as progress:
        overall = progress.add_task("runs", total=len(arms) * len(seeds))
        for arm in arms:
            config = configs[arm]
            for seed in seeds:
                rows, timing = _read(out.with_suffix(".jsonl"))  # another process's runs too
                if (arm, seed) not in rows:
                    sub = headroom._select(data, seeds, [seed])
                    results, states, seconds = common.run_arm(config, sub, [seed],
                                                              f"{arm} seed {seed}", progress)
                    row = {"arm": arm, "seed": seed, "steps": args.steps, "seconds": seconds,
                           **results[0]}
                    headroom._append(out.with_suffix(".jsonl"), row)
                    rows[(arm, seed)] = row
                    if config.weighting.meta_step is not None and arm not in timing:
                        timing[arm] = ssl_arms._time_meta_step(
                            config, states, common.for_method(sub, config))
                        headroom._append(out.with_suffix(".jsonl"),
                                         {"timing": arm, **timing[arm]})
                    _write(rows, timing, arms, seeds, args, out)
                progress.advance(overall)
            progress.console.print(_line(rows, arm, seeds))
    _write(rows, timing, arms, seeds, args, out)
    print(out.with_suffix(".md").read_text())
    return 0


def _read(path) -> tuple[dict, dict]:
    rows, timing = {}, {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: that run is simply redone
                continue
            if "timing" in row:
                timing[row.pop("timing")] = row
            else:
                rows[(row["arm"], row["seed"])] = row
    return rows, timing


def _values(rows, arm, seeds, key="test_accuracy"):
    found = [rows.get((arm, s)) for s in seeds]
    return None if any(r is None for r in found) else np.array([r[key] for r in found], float)


def _line(rows, arm, seeds) -> str:
    acc = _values(rows, arm, seeds)
    return f"{arm}: " + ("incomplete" if acc is None else f"accuracy {headroom._pct(acc)}")


def _summary(rows, arms, seeds) -> list[dict]:
    """One entry per arm with at least one finished seed; differences are paired over the
    seeds both arms (and the oracle, for the gap) have finished."""
    out = []
    for arm in arms:
        have = [s for s in seeds if (arm, s) in rows]
        if not have:
            continue
        entry = {"arm": arm, "seeds": len(have), "acc": _values(rows, arm, have),
                 "seconds": np.median(_values(rows, arm, have, "seconds"))}
        paired = [s for s in have if ("fixmatch", s) in rows]
        if len(paired) > 1:
            fix = _values(rows, "fixmatch", paired)
            entry["vs_fixmatch"] = metrics.paired_difference(_values(rows, arm, paired), fix)
            common = [s for s in paired if ("oracle", s) in rows]
            if common:
                gap = float(np.mean(_values(rows, "oracle", common) -
                                    _values(rows, "fixmatch", common)))
                mine = float(np.mean(_values(rows, arm, common) -
                                     _values(rows, "fixmatch", common)))
                entry["gap_closed"] = mine / gap if gap > 0 else np.nan
        for key, _, _ in COLUMNS:
            entry[key] = _values(rows, arm, have, key)
        out.append(entry)
    return out


def _mean(values, percent) -> str:
    if values is None or np.all(np.isnan(values)):
        return "–"
    scale = 100 if percent else 1
    mean, std = np.nanmean(values) * scale, np.nanstd(values, ddof=1) * scale
    return f"{mean:.1f} ± {std:.1f}" if percent else f"{mean:.2f} ± {std:.2f}"


def _write(rows, timing, arms, seeds, args, out) -> None:
    done = _summary(rows, arms, seeds)
    size = 28 // args.pool
    lines = [f"# Weightings on Fashion-MNIST ({len(seeds)} paired seeds, {args.steps} steps, "
             f"{size}×{size} images)", "",
             f"ID classes 0–5, {args.unlabelled} ID unlabelled images plus near OOD (classes "
             f"6–9) at {args.ood_ratio:.0%} of that pool; {args.budget} labelled images per "
             "class (one of them the validation image: the meta set of the arms with "
             "meta_data=validation, a training image for the others). CNN (8, 16), batch "
             f"{args.batch}, μ = {args.mu}, τ = {args.threshold}, EMA 0.99, meta-step every "
             f"{args.meta_every} steps, meta learning rate {args.meta_lr}, solver budget "
             f"{args.maxiter}.", "",
             "Seeds: finished paired seeds. Accuracy: ID test accuracy (%), mean ± std. "
             "− FixMatch: paired mean difference [95 % t interval] in points, over the seeds "
             "both have. Gap closed: that difference over oracle − FixMatch. "
             "AUROC ID/OOD: each unlabelled image's mean raw weight score over training, ID "
             "positive; AUROC correct PL: the same scores of ID images, correct final "
             "pseudo-label positive. OOD weight: OOD share of the unlabelled loss weight. PL: "
             "the final EMA classifier's pseudo-labels (accuracy on ID images; the most "
             "frequent class's share of the unlabelled loss weight received over training, 1/6 "
             "balanced). Meta-step: median ms "
             "of one meta-step, and its cost in inner steps.", "",
             "| arm | seeds | accuracy | − FixMatch | gap closed | " +
             " | ".join(h for _, h, _ in COLUMNS) + " | meta-step | s/run |",
             "|---" * (len(COLUMNS) + 7) + "|"]
    for e in done:
        relative = e["arm"] != "fixmatch" and "vs_fixmatch" in e
        closed = e.get("gap_closed", np.nan) if relative else np.nan
        t = timing.get(e["arm"])
        cells = [e["arm"], str(e["seeds"]), headroom._pct(e["acc"]),
                 headroom._interval(e["vs_fixmatch"]) if relative else "–",
                 f"{closed:.0%}" if np.isfinite(closed) else "–",
                 *(_mean(e[k], p) for k, _, p in COLUMNS),
                 f"{t['meta_step_ms']:.0f} ms ({t['meta_over_inner']:.1f}×)" if t else "–",
                 f"{e['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    best = [e for e in done if e["arm"] not in ("oracle", "fixmatch") and "vs_fixmatch" in e]
    if best:
        top = max(best, key=lambda e: e["vs_fixmatch"][0])
        lines += ["", f"Best non-oracle weighting: {top['arm']}, "
                  f"{headroom._interval(top['vs_fixmatch'])} points over FixMatch."]
    machine = common.machine(args=vars(args))
    lines += ["", f"Machine: {machine['cpu']}, JAX {machine['jax']} on {machine['devices']}; "
              f"code at {machine['commit']}" +
              (" (with uncommitted changes)" if machine["uncommitted_changes"] else "") + "."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    common.write_csv(out.with_suffix(".csv"), list(rows.values()))
    common.write_json(out.with_suffix(".json"), {**machine, "timing": timing})
    _plot(done, out.with_suffix(".png"))


def _plot(done, path) -> None:
    shown = [e for e in done if "vs_fixmatch" in e and e["arm"] != "fixmatch"]
    if not shown:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.45 * len(shown) + 1.5), sharey=True)
    y = np.arange(len(shown))
    mean = np.array([100 * e["vs_fixmatch"][0] for e in shown])
    err = np.nan_to_num(np.array([[100 * (e["vs_fixmatch"][0] - e["vs_fixmatch"][1])
                                   for e in shown],
                                  [100 * (e["vs_fixmatch"][2] - e["vs_fixmatch"][0])
                                   for e in shown]]))
    left.barh(y, mean, xerr=err, capsize=2, color="tab:blue")
    left.axvline(0, color="k", lw=0.5)
    left.set_yticks(y, [e["arm"] for e in shown], fontsize=7)
    left.set_xlabel("test accuracy − FixMatch (points, 95 % interval)")
    for offset, key, name in ((-0.2, "weight_auroc", "ID vs OOD"),
                              (0.2, "correct_weight_auroc", "correct pseudo-label")):
        right.barh(y + offset, [np.nanmean(e[key]) if not np.all(np.isnan(e[key])) else 0
                                for e in shown], 0.4, label=name)
    right.axvline(0.5, color="k", lw=0.5)
    right.set_xlim(0, 1)
    right.set_xlabel("weight AUROC")
    right.legend(fontsize=7)
    fig.suptitle("Fashion-MNIST, near OOD: weightings against FixMatch")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"{time.perf_counter() - start:.0f} s")
    raise SystemExit(code)
