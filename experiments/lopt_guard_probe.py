"""Probe: a run the learned optimizers' divergence guard does not catch, step by step.

Trains one evaluation task with a learned optimizer (safeguards on, as ``bilevel lopt eval``
runs it: the seeds vmapped in one program) and records, per step, the minibatch loss and the
guard's factor ρ (:class:`bilevel.lopt.safeguards.SafeguardState`); at the end, each training
example's own loss. A run diverges (the issue's definition) when its full-training-set loss
ends above 1.5x the initial one; the probe shows whether the guard saw it.

    python experiments/lopt_guard_probe.py \\
        --meta-params experiments/results/lopt/meta_training/star_lopt_pes_h1000/meta_params.npz \\
        --out experiments/results/lopt/guard_probe.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from bilevel import lopt  # noqa: E402
from bilevel.lopt import evaluate  # noqa: E402
from bilevel.lopt.safeguards import SafeguardState  # noqa: E402


def _guard_state(state) -> SafeguardState:
    found = []

    def visit(x):
        if isinstance(x, SafeguardState):
            found.append(x)
            return True
        return False

    jax.tree_util.tree_map(lambda x: x, state, is_leaf=visit)
    return found[0]


def probe(task, opt, steps: int, seeds: int, chunk: int):
    """Per seed: the full-training-set loss every ``chunk`` steps, the minibatch losses and ρ
    every step, and the final parameters."""
    opt = optax.with_extra_args_support(opt)

    def run(key):
        init_key, data_key = jax.random.split(key)  # as evaluate.run_optimizer
        params = task.init(init_key)

        def one_chunk(carry, index):
            batches = task.batches(jax.random.fold_in(data_key, index), chunk)

            def body(carry, batch):
                p, s = carry
                loss, g = jax.value_and_grad(task.loss)(p, batch)
                u, s = opt.update(g, s, p, loss=loss)
                return (optax.apply_updates(p, u), s), (loss, _guard_state(s).step_factor)

            carry, record = jax.lax.scan(body, carry, batches)
            return carry, (record, task.eval_loss(carry[0]))

        (params, _), ((losses, rho), evals) = jax.lax.scan(
            one_chunk, (params, opt.init(params)), jnp.arange(steps // chunk))
        return (jnp.concatenate([task.eval_loss(task.init(init_key))[None], evals]),
                losses.reshape(-1), rho.reshape(-1), params)

    return jax.jit(jax.vmap(run))(evaluate.seed_keys(seeds))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--meta-params", type=Path, required=True)
    parser.add_argument("--optimizer", default="star_lopt")
    parser.add_argument("--task", default="mlp_mnist5k_deep_elu")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True, help="Markdown file")
    args = parser.parse_args(argv)
    if args.task not in lopt.TASKS:
        parser.error(f"--task: one of {', '.join(lopt.TASKS)}")
    start = time.perf_counter()
    data = task_data(args.task)
    task = lopt.TASKS[args.task]()
    steps = task.horizon
    make = evaluate.learned_from_file(args.optimizer, args.meta_params, True)
    evals, losses, rho, params = probe(task, make(steps), steps, args.seeds, 25)
    evals, losses, rho = (np.asarray(a) for a in (evals, losses, rho))
    lines = [f"# The divergence guard on {args.task}", "",
             f"`{args.optimizer}` from `{args.meta_params}`, safeguards on, {steps} steps, "
             f"seeds 0–{args.seeds - 1} vmapped (as `bilevel lopt eval`). Produced by "
             f"`experiments/lopt_guard_probe.py`.", "",
             "| seed | initial loss | final loss (full set) | diverged | largest minibatch loss "
             "| minibatch losses > 5 | smallest ρ | largest example loss | 2nd | median |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in range(args.seeds):
        p = jax.tree_util.tree_map(lambda a, s=s: a[s], params)
        per = np.sort(np.asarray(jax.vmap(
            lambda x, y, p=p: task.loss(p, {"x": x[None], "y": y[None]}))(*data)))[::-1]
        lines.append(f"| {s} | {evals[s, 0]:.3g} | {evals[s, -1]:.4g} | "
                     f"{'yes' if evals[s, -1] > 1.5 * evals[s, 0] else 'no'} | "
                     f"{losses[s].max():.4g} | {int((losses[s] > 5).sum())} | "
                     f"{rho[s].min():.3g} | {per[0]:.3g} | {per[1]:.3g} | "
                     f"{np.median(per):.3g} |")
    lines += ["", f"Machine: {os.cpu_count()} CPUs, jax {jax.__version__} on "
              f"{jax.devices()[0].platform}; {time.perf_counter() - start:.0f} s; "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", ""]
    args.out.write_text("\n".join(lines))
    print(args.out.read_text())
    return 0


def task_data(name: str):
    """The training set of an image-MLP task, flattened as the task's loss reads it."""
    from bilevel import datasets

    dataset = {"mlp_mnist5k_deep_elu": "mnist5k"}.get(name)
    if dataset is None:
        raise SystemExit(f"--task {name}: the per-example losses are wired for "
                         f"mlp_mnist5k_deep_elu only")
    data = datasets.load(dataset)
    return (jnp.asarray(data.x_train.reshape(len(data.x_train), -1), jnp.float32),
            jnp.asarray(data.y_train))


if __name__ == "__main__":
    sys.exit(main())
