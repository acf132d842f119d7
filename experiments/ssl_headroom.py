"""Headroom of the class-mismatch benchmark: FixMatch against FixMatch with the oracle OOD filter.

A benchmark on which the oracle cannot beat FixMatch cannot show anything about weighting, so
this measures the gap (paired over seeds) across model, labels per class and OOD kind, at a
fixed amount of added OOD data, and names the setting where it is largest.

    python experiments/ssl_headroom.py            # the full study (digits)
    python experiments/ssl_headroom.py --smoke    # seconds: one tiny configuration
"""

from __future__ import annotations

import argparse
import itertools

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.progress import Progress  # noqa: E402

from bilevel import datasets  # noqa: E402
from experiments import ssl_common as common  # noqa: E402
from experiments._common import positive_int  # noqa: E402
from semisup import fixmatch, protocol  # noqa: E402

MODELS = {"mlp": dict(widths=(), hidden=64), "cnn": dict(widths=(16, 32), hidden=64)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--labels", default="1,3,9", help="labelled images per class")
    parser.add_argument("--ood", default="near,far")
    parser.add_argument("--ood-ratio", type=float, default=1.0)
    parser.add_argument("--design", choices=protocol.DESIGNS, default="add",
                        help="OOD added to a fixed ID pool, or swapped in at a fixed pool size")
    parser.add_argument("--unlabelled", type=positive_int, default=300)
    parser.add_argument("--validation", type=positive_int, default=1,
                        help="validation images per class (unused by these methods, which "
                             "train on them: the label budget is labels + validation)")
    parser.add_argument("--seeds", type=positive_int, default=3)
    parser.add_argument("--steps", type=positive_int, default=500)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--mu", type=positive_int, default=4)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--out", default=str(common.RESULTS / "headroom"))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.labels, args.ood, args.seeds, args.steps = "mlp", "4", "near", 2, 10
    dataset = datasets.load(args.dataset)
    rows = []
    grid = list(itertools.product(args.models.split(","), [int(x) for x in args.labels.split(",")],
                                  args.ood.split(",")))
    seeds = list(range(args.seeds))
    done = []
    with Progress() as progress:
        for model, labels, ood in grid:
            data = common.splits(dataset, seeds, labelled_per_class=labels,
                                 validation_per_class=args.validation,
                                 num_unlabelled=args.unlabelled, ood_ratio=args.ood_ratio, ood=ood,
                                 design=args.design)
            accuracy = {}
            for method in ("supervised", "fixmatch", "oracle"):
                config = fixmatch.Config(method=method, steps=args.steps, batch_size=args.batch,
                                         mu=args.mu, threshold=args.threshold, ema=0.99,
                                         flip=False, meta_every=5, **MODELS[model])
                results, _, seconds = common.run_arm(config, data, seeds,
                                                     f"{model} {labels}/class {ood} {method}",
                                                     progress)
                accuracy[method] = [r["test_accuracy"] for r in results]
                for seed, r in zip(seeds, results, strict=True):
                    rows.append({"model": model, "labels_per_class": labels, "ood": ood,
                                 "method": method, "seed": seed, "seconds": seconds, **r})
            gap = common.paired(accuracy["oracle"], accuracy["fixmatch"])
            progress.console.print(f"{model} {labels}/class {ood}: supervised "
                                   f"{common.mean_std(accuracy['supervised'])}, fixmatch "
                                   f"{common.mean_std(accuracy['fixmatch'])}, oracle "
                                   f"{common.mean_std(accuracy['oracle'])}, gap {gap}")
            done.append((model, labels, ood))
            # Written after every cell, so a run stopped part-way keeps what it finished.
            summary = _write(rows, done, args)
    print(_markdown(summary, args))
    return 0


def _write(rows, done, args):
    out = common.Path(args.out)
    common.write_csv(out.with_suffix(".csv"), rows)
    summary = _summary(rows, done, args)
    out.with_suffix(".md").write_text(_markdown(summary, args))
    common.write_json(out.with_suffix(".json"), common.machine(args=vars(args)))
    _plot(summary, out.with_suffix(".png"))
    return summary


def _summary(rows, grid, args):
    summary = []
    for model, labels, ood in grid:
        def acc(method, model=model, labels=labels, ood=ood):
            return [r["test_accuracy"] for r in rows if (r["model"], r["labels_per_class"],
                                                          r["ood"], r["method"]) ==
                    (model, labels, ood, method)]
        fix = [r for r in rows if (r["model"], r["labels_per_class"], r["ood"], r["method"]) ==
               (model, labels, ood, "fixmatch")]
        summary.append({"model": model, "labels": labels + args.validation, "ood": ood,
                        "supervised": common.mean_std(acc("supervised")),
                        "fixmatch": common.mean_std(acc("fixmatch")),
                        "oracle": common.mean_std(acc("oracle")),
                        "gap": common.paired(acc("oracle"), acc("fixmatch")),
                        "gap_mean": float(np.mean(acc("oracle")) - np.mean(acc("fixmatch"))),
                        "ood_pass": common.mean_std([r["ood_pass_rate"] for r in fix]),
                        "ood_weight_share": common.mean_std([r["ood_weight_share"]
                                                             for r in fix])})
    return summary


def _markdown(summary, args) -> str:
    lines = [f"# Headroom: FixMatch vs the oracle OOD filter ({args.dataset}, "
             f"{args.ood_ratio:.0%} OOD ({'added' if args.design == 'add' else 'swapped in'}), "
             f"{args.unlabelled} "
             f"{'ID unlabelled' if args.design == 'add' else 'unlabelled in all'}, "
             f"{args.seeds} seeds, {args.steps} steps)", "",
             f"Label budget per class = labelled + validation ({args.validation}); supervised, "
             "FixMatch and the oracle train on all of it (semisup.merge_validation). "
             "Test accuracy (EMA weights), mean ± std over seeds; gap = oracle − FixMatch, "
             "paired mean [95 % t interval]. OOD pass = share of OOD draws passing FixMatch's "
             "mask; OOD weight = OOD share of FixMatch's unlabelled loss weight.", "",
             "| model | label budget/class | OOD | supervised | FixMatch | oracle | gap | OOD pass "
             "| OOD weight |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['model']} | {s['labels']} | {s['ood']} | {s['supervised']} | "
                     f"{s['fixmatch']} | {s['oracle']} | {s['gap']} | {s['ood_pass']} | "
                     f"{s['ood_weight_share']} |")
    best = max(summary, key=lambda s: s["gap_mean"])
    lines += ["", f"Largest mean gap: {best['model']}, label budget {best['labels']}/class, "
              f"{best['ood']} OOD ({best['gap']})."]
    return "\n".join(lines) + "\n"


def _plot(summary, path):
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [f"{s['model']}\n{s['labels']}/cl {s['ood']}" for s in summary]
    ax.bar(range(len(summary)), [100 * s["gap_mean"] for s in summary])
    ax.set_xticks(range(len(summary)), names, fontsize=7)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("oracle − FixMatch (accuracy points)")
    ax.set_title("Headroom of the class-mismatch benchmark")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
