"""How much does each unlabelled image's weight matter to the loss after the whole run? Exact.

The implicit (``confnet``) and one-step (``l2rw``) meta-gradients approximate one quantity: the
derivative of a loss after training with respect to each unlabelled image's weight.
:func:`semisup.unrolled_influence` computes it exactly, by differentiating the meta loss through
every step of the FixMatch run (:func:`bilevel.unrolled_hypergrad`, forward-over-reverse).
Here it is computed for two losses after the same run:

* the **meta loss** (the labelled set, as in DS3L, or the held-out validation set), the most a
  meta-gradient of that objective can know, with no fixed-point or one-step approximation;
* the **ID test loss**, which no method sees: the derivative of the quantity a weighting is
  meant to improve, i.e. the ideal meta-objective.

If even the test-loss derivative ranks ID above OOD images only weakly, no weighting learned by
gradient from any held-out loss can reach a high weight AUROC on the benchmark, however good
its meta-gradient: a weight AUROC of 0.9 and a lower test loss are then different goals.

    python -m experiments.ssl_unrolled_influence --dataset digits --model mlp
    python -m experiments.ssl_unrolled_influence --smoke
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from scipy import stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bilevel import datasets
from experiments import ssl_common as common
from experiments._common import positive_int
from experiments.fmnist_headroom import downsample
from experiments.ssl_influence import MODELS
from semisup import fixmatch, meta, metrics, options


def _truncations(text: str, steps: int, parser: argparse.ArgumentParser) -> list[int | None]:
    """``"all,100"`` -> ``[None, 100]`` (``None``: through every step)."""
    out = []
    for part in text.split(","):
        if part.strip() == "all":
            out.append(None)
            continue
        try:
            value = int(part)
        except ValueError:
            parser.error(f"--truncate must be 'all' or integers, comma-separated; got {text!r}")
        if not 1 <= value <= steps:
            parser.error(f"--truncate must lie in [1, --steps={steps}], got {value}")
        out.append(value)
    return out


def _statistics(grad: np.ndarray, ood: np.ndarray) -> dict:
    """AUROC (ID positive) and means of −dL/dw over the images with an influence."""
    has = grad != 0
    score, ood = -grad[has], ood[has]
    return {"images": int(has.sum()), "ood_images": int(ood.sum()),
            # Orders of magnitude above the others: the unroll's Jacobians have exploded.
            "max_abs": float(np.abs(score).max()) if has.any() else np.nan,
            "auroc": metrics.auroc(score, ~ood),
            "mean_id": float(score[~ood].mean()) if (~ood).any() else np.nan,
            "mean_ood": float(score[ood].mean()) if ood.any() else np.nan,
            "share_helpful_ood": float((score[ood] > 0).mean()) if ood.any() else np.nan,
            # The first-order change of the loss if every OOD image's weight went 1 -> 0:
            # −Σ_OOD dL/dw_i.
            "removing_ood": float(score[ood].sum()) if ood.any() else np.nan}


def _percentiles(score: np.ndarray) -> np.ndarray:
    """Each value's rank among ``score`` as a fraction in (0, 1) (average ranks for ties)."""
    return (stats.rankdata(score) - 0.5) / len(score)


def _plot(curves: dict, path, title: str) -> None:
    """Per loss, the histograms of ID and OOD images' within-run percentile of −dL/dw (pooled
    over seeds): apart if the derivative separates them, on top of each other if not."""
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2), squeeze=False)
    bins = np.linspace(0, 1, 21)
    for ax, (label, (id_pct, ood_pct, auroc)) in zip(axes[0], curves.items(), strict=True):
        ax.hist(id_pct, bins, density=True, alpha=0.6, label="ID")
        ax.hist(ood_pct, bins, density=True, alpha=0.6, label="OOD")
        ax.set_title(f"{label}: AUROC {auroc:.2f}", fontsize=9)
        ax.set_xlabel("percentile of −dL/dw within its run (high: helpful)", fontsize=8)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=tuple(datasets.DATASETS), default="digits")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the standard files (CIFAR-10, SVHN, ...)")
    parser.add_argument("--model", choices=tuple(MODELS), default="mlp")
    parser.add_argument("--labels", type=positive_int, default=3)
    parser.add_argument("--validation", type=positive_int, default=1)
    parser.add_argument("--meta-data", choices=options.META_DATA, default="labelled")
    parser.add_argument("--unlabelled", type=positive_int, default=300)
    parser.add_argument("--ood", default="near",
                        help="near, far, or another dataset's name (e.g. svhn, cifar100)")
    parser.add_argument("--ratio", type=float, default=1.0)
    parser.add_argument("--seeds", type=positive_int, default=5)
    parser.add_argument("--steps", type=positive_int, default=1000)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--mu", type=positive_int, default=4)
    parser.add_argument("--truncate", default="all",
                        help="comma-separated: 'all' (through every step) or K (the last K "
                             "steps only, the earlier ones held fixed)")
    parser.add_argument("--loop", choices=("scan", "python"), default="scan",
                        help="see semisup.unrolled_influence; 'python' for a CNN on the CPU")
    parser.add_argument("--pool", type=positive_int, default=1,
                        help="average-pool the images by this factor (2: Fashion-MNIST at 14×14, "
                             "as experiments/fmnist_headroom.py)")
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--out", default=str(common.RESULTS / "unrolled_influence"))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.truncate = 2, 10, "all,5"
    truncations = _truncations(args.truncate, args.steps, parser)
    seeds = list(range(args.seeds))
    try:
        dataset = datasets.load(args.dataset, args.data_dir)
        ood, other = args.ood, None
        if ood not in ("near", "far"):
            other, ood = datasets.load(ood, args.data_dir), "other"
    except (KeyError, FileNotFoundError, ValueError) as error:
        parser.error(str(error).strip("'\""))
    dataset, other = (None if d is None else downsample(d, args.pool) for d in (dataset, other))
    data = common.splits(dataset, seeds, labelled_per_class=args.labels,
                         validation_per_class=args.validation, num_unlabelled=args.unlabelled,
                         ood_ratio=args.ratio, ood=ood, ood_dataset=other)
    # Flips suit natural images (CIFAR-10), not digits (as `bilevel ssl train --flip auto`).
    config = fixmatch.Config(method="fixmatch", steps=args.steps, batch_size=args.batch,
                             mu=args.mu, ema=0.99, flip=args.dataset == "cifar10", meta_every=1,
                             threshold=args.threshold,
                             meta_data=args.meta_data, **MODELS[args.model])
    # FixMatch trains on the whole label budget; the meta loss reads the labelled set (DS3L) or
    # the validation set, which FixMatch then also trained on (as in ssl_influence).
    data = common.for_method(data, config)
    states = common.initial_states(config, data, seeds)
    rows, pooled = [], {}
    with common.Progress() as progress:
        task = progress.add_task("unrolled influence", total=len(seeds) * len(truncations))
        for i, seed in enumerate(seeds):
            state = fixmatch.unstack(states, i)
            one = jax.tree_util.tree_map(lambda a, i=i: jnp.asarray(np.asarray(a)[i]), data)
            ood = np.asarray(one.unlabelled_ood).astype(bool)
            for truncate in truncations:
                grads, row = {}, {"seed": seed, "truncate": truncate or args.steps}
                for target, (x, y) in (("meta", meta.meta_set(config, one)),
                                       ("test", (one.x_test, one.y_test))):
                    grad, info = fixmatch.unrolled_influence(config, state, one, x, y,
                                                             truncate=truncate, loop=args.loop)
                    grads[target] = np.asarray(grad, np.float64)
                    has = grads[target] != 0
                    if has.any() and bool(info.finite):
                        pct = _percentiles(-grads[target][has])
                        part = pooled.setdefault((truncate or args.steps, target), ([], []))
                        part[0].append(pct[~ood[has]])
                        part[1].append(pct[ood[has]])
                    row[f"{target}_finite"] = bool(info.finite)
                    row[f"{target}_loss"] = float(info.outer_loss)
                    row.update({f"{target}_{k}": v
                                for k, v in _statistics(grads[target], ood).items()})
                both = (grads["meta"] != 0) & (grads["test"] != 0)
                row["spearman_meta_test"] = float(stats.spearmanr(grads["meta"][both],
                                                                  grads["test"][both])[0])
                row["test_accuracy"] = fixmatch.accuracy(config, info.params,
                                                         np.asarray(one.x_test),
                                                         np.asarray(one.y_test))
                rows.append(row)
                progress.advance(task)
    out = common.Path(args.out)
    common.write_csv(out.with_suffix(".csv"), rows)
    common.write_json(out.with_suffix(".json"), common.machine(args=vars(args)))
    lines = [f"# Exact unrolled influence of each unlabelled image ({args.dataset}, "
             f"{args.model}, {args.labels}+{args.validation} labels/class, meta set "
             f"{args.meta_data}, {args.ratio:.0%} added {args.ood} OOD, {args.steps} steps, "
             f"{args.seeds} seeds)", "",
             "−dL/dw_i at w = 1, L after the whole FixMatch run (final, not EMA, weights), "
             "differentiated through the last `truncate` steps. AUROC: ID against OOD over "
             "the images with an influence (drawn and masked at least once in the window). "
             "Test: the ID test loss, which no method sees. Removing OOD: the first-order change "
             "of L if every OOD weight went from 1 to 0 (< 0: the oracle filter helps L). "
             "Spearman: rank correlation of the meta and test influences.", "",
             "| truncate | loss | AUROC | AUROC per seed | max abs(dL/dw) per seed | "
             "mean ID (×1e-4) | mean OOD (×1e-4) | OOD with −dL/dw > 0 | removing OOD (ΔL) | "
             "Spearman meta/test | test accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for truncate in dict.fromkeys(r["truncate"] for r in rows):
        sel = [r for r in rows if r["truncate"] == truncate]
        for target in ("meta", "test"):
            per_seed = " ".join(f"{r[target + '_auroc']:.2f}" for r in sel)
            largest = " ".join(f"{r[target + '_max_abs']:.0e}" for r in sel)
            lines.append(
                f"| {truncate} | {target} | {common.mean_std([r[f'{target}_auroc'] for r in sel])} "
                f"| {per_seed} | {largest} | "
                f"{common.mean_std([1e4 * r[f'{target}_mean_id'] for r in sel])} | "
                f"{common.mean_std([1e4 * r[f'{target}_mean_ood'] for r in sel])} | "
                f"{common.mean_std([r[f'{target}_share_helpful_ood'] for r in sel])} | "
                f"{common.mean_std([r[f'{target}_removing_ood'] for r in sel])} | "
                f"{common.mean_std([r['spearman_meta_test'] for r in sel])} | "
                f"{common.mean_std([r['test_accuracy'] for r in sel])} |")
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    curves = {}
    for (truncate, target), (id_parts, ood_parts) in pooled.items():
        sel = [r[f"{target}_auroc"] for r in rows if r["truncate"] == truncate]
        curves[f"{target} loss, last {truncate} steps"] = (
            np.concatenate(id_parts), np.concatenate(ood_parts), float(np.nanmean(sel)))
    if curves:
        _plot(curves, out.with_suffix(".png"),
              f"Exact unrolled −dL/dw of each unlabelled image ({args.dataset}, {args.model}, "
              f"{args.ratio:.0%} added {args.ood} OOD, {args.seeds} seeds pooled)")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
