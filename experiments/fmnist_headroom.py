"""Headroom on Fashion-MNIST: supervised, FixMatch and FixMatch with the oracle OOD filter,
over paired seeds, label budgets and amounts of near OOD added to a fixed ID pool.

ID classes 0–5 (T-shirt, Trouser, Pullover, Dress, Coat, Sandal); near OOD: the training images
of classes 6–9 (Shirt, Sneaker, Bag, Ankle boot), added at ``--ood-ratios`` times the ID pool.
A weighting can only show something where oracle − FixMatch is clearly above 0, so this names
the settings where the paired 95 % interval of that gap is above 0 and its mean at least 2
points.

Every finished (model, budget, OOD ratio, method, seed) run is appended to ``OUT.jsonl`` as it
ends; rerunning the same command resumes from there (nothing finished is run again), and the
tables and the plot are rewritten after every cell.

    python experiments/fmnist_headroom.py                 # the study (about an hour on 2 cores)
    python experiments/fmnist_headroom.py --smoke         # a minute: one tiny configuration
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.progress import Progress  # noqa: E402

from bilevel import datasets  # noqa: E402
from bilevel.argtypes import positive_int  # noqa: E402
from experiments import ssl_common as common  # noqa: E402
from semisup import fixmatch, metrics  # noqa: E402

#: model -> classifier fields of semisup.Config, and whether seeds are vmapped (an MLP gains
#: from it; a vmapped CNN runs its seeds as grouped convolutions, measured 2x slower per seed on
#: this CPU than one seed at a time).
MODELS = {"mlp": (dict(widths=(), hidden=128), True),
          "cnn": (dict(widths=(8, 16), hidden=64), False)}
METHODS = ("supervised", "fixmatch", "oracle")


def _ints(text):
    return [positive_int(t) for t in text.split(",")]


def _floats(text):
    return [float(t) for t in text.split(",")]


def downsample(dataset: datasets.Dataset, factor: int) -> datasets.Dataset:
    """Average-pools the images by ``factor`` (28×28 → 14×14 with 2)."""
    if factor == 1:
        return dataset

    def pool(x):
        n, h, w, c = x.shape
        return x[:, :h - h % factor, :w - w % factor].reshape(
            n, h // factor, factor, w // factor, factor, c).mean((2, 4))
    return dataset._replace(x_train=pool(dataset.x_train), x_test=pool(dataset.x_test))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp")
    parser.add_argument("--budgets", default="4,10,25",
                        help="labelled images per ID class (one of them is the validation image)")
    parser.add_argument("--ood-ratios", default="1,2,3", help="near OOD per ID unlabelled image")
    parser.add_argument("--unlabelled", type=positive_int, default=3000, help="ID unlabelled pool")
    parser.add_argument("--seeds", type=positive_int, default=10)
    parser.add_argument("--steps", type=positive_int, default=1000)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--mu", type=positive_int, default=4)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--pool", type=positive_int, default=2,
                        help="average-pool the 28×28 images by this factor")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(common.RESULTS / "fashion_mnist" / "headroom"))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.budgets, args.ood_ratios, args.seeds = "4", "1", 2
        args.steps, args.unlabelled = 10, 200
        args.out = args.out + "_smoke"
    dataset = downsample(datasets.load("fashion_mnist", args.data_dir), args.pool)
    out = common.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = _read_rows(out.with_suffix(".jsonl"))
    seeds = list(range(args.seeds))
    models, budgets, ratios = args.models.split(","), _ints(args.budgets), _floats(args.ood_ratios)
    cells = list(itertools.product(models, budgets, ratios))
    with Progress() as progress:
        overall = progress.add_task("cells", total=len(cells))
        for model, budget, ratio in cells:
            data = common.splits(dataset, seeds, labelled_per_class=budget - 1,
                                 validation_per_class=1, num_unlabelled=args.unlabelled,
                                 ood_ratio=ratio, ood="near", design="add")
            for method in METHODS:
                # The labelled and ID sets do not depend on the OOD ratio (they are drawn first),
                # so supervised runs once per budget.
                key_ratio = 0.0 if method == "supervised" else ratio
                todo = [s for s in seeds if (model, budget, key_ratio, method, s) not in rows]
                if not todo:
                    continue
                config = fixmatch.Config(method=method, steps=args.steps, batch_size=args.batch,
                                         mu=args.mu, threshold=args.threshold, ema=0.99,
                                         flip=False, meta_every=5, **MODELS[model][0])
                label = f"{model} {budget}/class {ratio:.0%} OOD {method}"
                groups = [todo] if MODELS[model][1] else [[s] for s in todo]
                for group in groups:
                    sub = _select(data, seeds, group)
                    results, _, seconds = common.run_arm(config, sub, group, label, progress)
                    for seed, r in zip(group, results, strict=True):
                        row = {"model": model, "budget": budget, "ood_ratio": key_ratio,
                               "method": method, "seed": seed, "steps": args.steps,
                               "seconds_per_seed": seconds / len(group), **r}
                        _append(out.with_suffix(".jsonl"), row)
                        rows[(model, budget, key_ratio, method, seed)] = row
            progress.advance(overall)
            _write(rows, cells, seeds, args, out)
            progress.console.print(_cell_line(rows, model, budget, ratio, seeds))
    print(out.with_suffix(".md").read_text())
    return 0


def _select(data, seeds, group):
    index = np.asarray([seeds.index(s) for s in group])
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[index], data)


def _read_rows(path) -> dict:
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: that run is simply redone
                continue
            rows[(row["model"], row["budget"], row["ood_ratio"], row["method"], row["seed"])] = row
    return rows


def _append(path, row) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _accuracies(rows, model, budget, ratio, method, seeds):
    key_ratio = 0.0 if method == "supervised" else ratio
    found = [rows.get((model, budget, key_ratio, method, s)) for s in seeds]
    return None if any(r is None for r in found) else [r["test_accuracy"] for r in found]


def _cell(rows, model, budget, ratio, seeds):
    acc = {m: _accuracies(rows, model, budget, ratio, m, seeds) for m in METHODS}
    if any(a is None for a in acc.values()):
        return None
    gap = metrics.paired_difference(np.asarray(acc["oracle"]), np.asarray(acc["fixmatch"]))
    gain = metrics.paired_difference(np.asarray(acc["fixmatch"]), np.asarray(acc["supervised"]))
    fix = [rows[(model, budget, ratio, "fixmatch", s)] for s in seeds]
    return {"model": model, "budget": budget, "ratio": ratio, "acc": acc, "gap": gap,
            "gain": gain, "ood_pass": [r["ood_pass_rate"] for r in fix],
            "ood_weight": [r["ood_weight_share"] for r in fix]}


def _interval(d) -> str:
    mean, low, high = (100 * x for x in d)
    return f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]"


def _pct(values) -> str:
    values = 100 * np.asarray(values, np.float64)
    return f"{values.mean():.1f} ± {values.std(ddof=1) if len(values) > 1 else 0:.1f}"


def _cell_line(rows, model, budget, ratio, seeds) -> str:
    c = _cell(rows, model, budget, ratio, seeds)
    if c is None:
        return f"{model} {budget}/class {ratio:.0%}: incomplete"
    return (f"{model} {budget}/class {ratio:.0%} OOD: supervised {_pct(c['acc']['supervised'])}, "
            f"FixMatch {_pct(c['acc']['fixmatch'])}, oracle {_pct(c['acc']['oracle'])}, "
            f"oracle − FixMatch {_interval(c['gap'])}")


def _write(rows, cells, seeds, args, out) -> None:
    done = [c for c in (_cell(rows, *cell, seeds) for cell in cells) if c is not None]
    seconds = {m: np.median([r["seconds_per_seed"] for r in rows.values() if r["method"] == m])
               for m in METHODS if any(r["method"] == m for r in rows.values())}
    size = 28 // args.pool
    lines = [f"# Headroom on Fashion-MNIST ({len(seeds)} paired seeds, {args.steps} steps, "
             f"{size}×{size} images)", "",
             f"ID classes 0–5, {args.unlabelled} ID unlabelled images; near OOD (classes 6–9) "
             "added at the given ratio of that pool. Label budget = labelled images per class "
             "(one of them the validation image, which these three methods train on). "
             f"Batch {args.batch}, μ = {args.mu}, τ = {args.threshold}, EMA 0.99. Test accuracy "
             "on ID test images (%), mean ± std over seeds; differences are paired means "
             "[95 % t interval] in points. OOD pass: share of OOD draws passing FixMatch's mask; "
             "OOD weight: OOD share of FixMatch's unlabelled loss.", "",
             "| model | budget/class | OOD | supervised | FixMatch | oracle | FixMatch − sup. | "
             "oracle − FixMatch | OOD pass | OOD weight |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in done:
        lines.append(f"| {c['model']} | {c['budget']} | {c['ratio']:.0%} | "
                     f"{_pct(c['acc']['supervised'])} | {_pct(c['acc']['fixmatch'])} | "
                     f"{_pct(c['acc']['oracle'])} | {_interval(c['gain'])} | "
                     f"{_interval(c['gap'])} | {_pct(c['ood_pass'])} | {_pct(c['ood_weight'])} |")
    chosen = [c for c in done if c["gap"][1] > 0 and c["gap"][0] >= 0.02]
    lines += ["", "Settings with headroom (oracle − FixMatch ≥ 2 points, interval above 0): " +
              (", ".join(f"{c['model']} {c['budget']}/class {c['ratio']:.0%}" for c in chosen)
               or "none") + ".", "",
              "Seconds per seed and run (median): " +
              ", ".join(f"{m} {s:.0f} s" for m, s in seconds.items()) + "."]
    machine = common.machine(args=vars(args))
    lines += ["", f"Machine: {machine['cpu']}, JAX {machine['jax']} on {machine['devices']}; "
              f"code at {machine['commit']}" +
              (" (with uncommitted changes)" if machine["uncommitted_changes"] else "") + "."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    common.write_csv(out.with_suffix(".csv"), list(rows.values()))
    common.write_json(out.with_suffix(".json"), machine)
    _plot(done, out.with_suffix(".png"))


def _plot(done, path) -> None:
    if not done:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [f"{c['model']}\n{c['budget']}/cl {c['ratio']:.0%}" for c in done]
    x = np.arange(len(done))
    for offset, key, name in ((-0.2, "gain", "FixMatch − supervised"),
                              (0.2, "gap", "oracle − FixMatch")):
        mean = np.array([100 * c[key][0] for c in done])
        err = np.array([[100 * (c[key][0] - c[key][1]) for c in done],
                        [100 * (c[key][2] - c[key][0]) for c in done]])
        ax.bar(x + offset, mean, 0.4, yerr=np.nan_to_num(err), label=name, capsize=2)
    ax.set_xticks(x, names, fontsize=7)
    ax.axhline(0, color="k", lw=0.5)
    ax.axhline(2, color="grey", lw=0.5, ls="--")
    ax.set_ylabel("accuracy points (95 % interval)")
    ax.set_title("Fashion-MNIST headroom")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"{time.perf_counter() - start:.0f} s")
    raise SystemExit(code)
