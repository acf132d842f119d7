"""One learned-optimizer meta-training truncation: before and after carrying the optimizer state.

``bilevel lopt train --estimator mixflow`` advances every task slot by one truncation per outer
step. Before ``unrolled_hypergrad`` took and returned the inner optimizer's state, the
truncation faked the optimizer's ``init`` to resume the run, and then ran the whole truncation
forward a second time to recover the final state. This script times both, in one run, on the
same slots: the *baseline* is that old truncation, written out here, and *carried* is the
library's own (``bilevel.lopt.train._truncation_fn``). It checks that both give the same
meta-gradient and inner state, and writes ``experiments/results/lopt/truncation.{csv,md}``.

    python experiments/bench_lopt_truncation.py [--repeats 20] [--unroll 20]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import ROOT, cpu_model, git_commit, positive_int, timed_rounds

import bilevel
from bilevel.lopt import tasks, train

OUT = ROOT / "experiments" / "results" / "lopt"


def old_truncation_fn(config: train.MetaTrainConfig, member: tasks.FamilyMember):
    """The truncation as it was: a fake ``init`` to resume, and one more forward pass."""
    task = tasks.make_family_task(member)

    def inner_loss(params, meta, batch):
        return task.loss(params, batch)

    def continuing(transformation, state):
        return optax.GradientTransformationExtraArgs(lambda params: state, transformation.update)

    def mixflow(meta, inner_state, key, batches, outer_batch, scale, num_steps):
        params, opt_state = inner_state

        def outer_loss(params, meta, outer_batches):
            per_batch = jax.vmap(task.loss, in_axes=(None, 0))(params, outer_batches)
            return jnp.mean(per_batch) / scale

        grad, info = bilevel.unrolled_hypergrad(
            inner_loss, outer_loss, params, meta,
            optimizer=lambda h: continuing(train.make_optimizer(config, h, num_steps), opt_state),
            steps=config.unroll, per_step_args=(batches,), outer_args=(outer_batch,),
            mode="mixflow", on_failure="ignore")
        new_state, _ = tasks.run_steps(
            task, train.make_optimizer(config, jax.lax.stop_gradient(meta), num_steps),
            params, opt_state, batches)
        return grad, new_state, info.outer_loss

    return jax.jit(mixflow)


def members(config: train.MetaTrainConfig) -> list[tasks.FamilyMember]:
    """The first MLP and the first quadratic of the meta-training pool."""
    pool = train.task_pool(config)
    return [next(m for m in pool if m.kind == kind) for kind in ("mlp", "quadratic")]


def describe(member: tasks.FamilyMember) -> str:
    if member.kind == "quadratic":
        return f"quadratic dim {member.dim}, condition {member.condition:g}"
    return (f"MLP {member.dataset} width {member.width} depth {member.depth} "
            f"{member.activation}")


def leaves_equal(a, b) -> float:
    """The largest relative difference between two pytrees' leaves."""
    worst = 0.0
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if not y.size:
            continue
        scale = max(np.max(np.abs(y)), 1e-30)
        worst = max(worst, float(np.max(np.abs(x - y)) / scale))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=20, help="timed calls (default 20)")
    parser.add_argument("--unroll", type=positive_int, default=20,
                        help="inner steps per truncation (default 20, as bilevel lopt train)")
    args = parser.parse_args()
    rows = []
    for optimizer in ("mlp", "star"):
        config = dataclasses.replace(
            train.MetaTrainConfig(optimizer=optimizer, kinds=("mlp", "quadratic")),
            unroll=args.unroll)
        compiled = train._compiled_for(config)
        for member in members(config):
            init = train._slot_init_fn(compiled, member)
            inner_state = init(jax.random.key(1))
            slot = train.Slot(member, inner_state, 0, 200, 1.0, 1)
            batches, outer_batch = train._batches(config, slot, jax.random.key(2))
            meta = train.init_meta(config, jax.random.key(0))
            call = (meta, inner_state, jax.random.key(3), batches, outer_batch,
                    jnp.float32(1.0), jnp.float32(200.0))
            old, new = old_truncation_fn(compiled, member), train._truncation_fn(compiled, member)
            grad_old, state_old, _ = old(*call)
            result = new(*call)
            difference = max(leaves_equal(result.grad, grad_old),
                             leaves_equal(result.inner_state, state_old))
            calls = {"baseline": functools.partial(old, *call),
                     "carried": functools.partial(new, *call)}
            times = timed_rounds(calls, args.repeats, np.random.default_rng(0))
            t_old, t_new = (float(np.median(times[name])) for name in ("baseline", "carried"))
            rows.append({"optimizer": f"{optimizer}_lopt", "task": describe(member),
                         "unroll": args.unroll, "baseline_ms": round(t_old * 1e3, 2),
                         "carried_ms": round(t_new * 1e3, 2),
                         "carried_over_baseline": round(t_new / t_old, 3),
                         "max_rel_difference": f"{difference:.1e}"})
            print(rows[-1], flush=True)
    write(rows, args)


def write(rows: list[dict], args: argparse.Namespace) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "truncation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    commit = git_commit("bilevel", "hvp")
    lines = [
        "# One meta-training truncation: re-run forward (baseline) vs optimizer state carried",
        "",
        f"Machine: {cpu_model()}, {jax.devices()[0].platform}, JAX {jax.__version__}, "
        f"Python {platform.python_version()}; commit {commit[0] if commit else '?'}"
        f"{' (uncommitted changes)' if commit and commit[1] else ''}. Medians of "
        f"{args.repeats} rounds after a warm-up, each calling both variants in a random order.",
        "",
        "| optimizer | task | unroll | baseline (ms) | carried (ms) | carried / baseline | "
        "max rel. difference |",
        "|---|---|---|---|---|---|---|",
        *(f"| {r['optimizer']} | {r['task']} | {r['unroll']} | {r['baseline_ms']} | "
          f"{r['carried_ms']} | {r['carried_over_baseline']} | {r['max_rel_difference']} |"
          for r in rows),
        "",
        "The meta-training outer step is one truncation per slot plus the outer Adam step, so "
        "its time moves by the same ratio.",
    ]
    Path(OUT / "truncation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
