"""Meta-training of learned optimizers (``bilevel lopt train``).

Truncated meta-training as in ``learned_optimization`` (Metz et al. 2022): a few task *slots*
each hold an inner training run of a task drawn from :func:`bilevel.lopt.tasks.sample_member`.
Every outer step advances each slot by one truncation of ``unroll`` inner steps under the
current meta-parameters and estimates the meta-gradient of that truncation:

* ``estimator="mixflow"``: :func:`bilevel.unrolled_hypergrad` with ``mode="mixflow"`` through
  the truncation; the meta-loss is the training loss at its last step, on a fresh minibatch
  four times the inner batch. The gradient does not flow into earlier truncations (truncated
  backpropagation).
* ``estimator="pes"``: :func:`bilevel.pes_hypergrad`; the meta-loss is the mean training loss
  over the truncation, and PES's accumulated perturbations make the estimate unbiased over the
  whole inner run (Vicol et al. 2021).

The inner state (parameters and optimizer state) carries over from truncation to truncation
and is reset, with a new task, when the slot reaches its horizon. Horizons are drawn
log-uniformly between ``horizon_start`` and a maximum that grows linearly from
``horizon_start`` to ``horizon`` over the first half of meta-training (a curriculum on unroll
length). Each slot's meta-loss is divided by its task's loss at initialisation, so tasks with
different loss scales give meta-gradients of comparable size (per-task normalisation); the slots'
finite meta-gradients are averaged, clipped by global norm and applied with Adam (AdamW with
``weight_decay > 0``: STAR's decay on the meta-parameters). A slot whose meta-gradient is not
finite or whose normalised loss exceeds ``divergence`` is skipped and reset.

Everything random derives from ``(seed, outer step, slot)``, so a run resumed from a checkpoint
gives the same numbers as one that was never interrupted. :func:`meta_train` is the pure-ish
core (it takes a callback for progress and checkpoints); :func:`add_arguments` / :func:`run` are
the command-line shell.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel
from bilevel import checkpoint
from bilevel.config import flag, from_args
from bilevel.lopt import optimizers, options, tasks
from bilevel.lopt.options import ESTIMATORS, OPTIMIZERS, MetaTrainConfig  # noqa: F401

PyTree = Any
#: The outer minibatch of the mixflow meta-loss is this many inner batches.
OUTER_BATCH_MULTIPLE = 4
CHECKPOINT_NAME = "checkpoint.npz"
#: :mod:`bilevel.lopt.velo_train`'s checkpoint; both trainers write the outputs below.
VELO_CHECKPOINT_NAME = "velo_checkpoint.npz"
#: bilevel 0.1.0 pickled its checkpoints to these: refused, never unpickled.
PICKLED_CHECKPOINT_NAMES = ("checkpoint.pkl", "velo_checkpoint.pkl")
OUTPUTS = ("meta_params.npz", "meta_loss.csv", "meta_loss.png", "metadata.json")


# --------------------------------------------------------------------------------------------
# Optimizer construction.


def init_meta(config: MetaTrainConfig, key: jax.Array) -> dict:
    """Fresh meta-parameters for ``config.optimizer``, in JAX's default float dtype (that of
    the tasks' parameters: float64 under ``jax_enable_x64``)."""
    return optimizers.LEARNED_OPTIMIZERS[config.optimizer].init(
        key, hidden=config.hidden, horizon_features=config.horizon_features,
        dtype=jnp.result_type(float))


def optimizer_kwargs(config: MetaTrainConfig) -> dict:
    """The keyword arguments (besides ``num_steps``) the trained optimizer is built with."""
    learned = optimizers.LEARNED_OPTIMIZERS[config.optimizer]
    return {name: getattr(config, name) for name in learned.kwargs}


def make_optimizer(config: MetaTrainConfig, meta: dict, num_steps: Any
                   ) -> optax.GradientTransformationExtraArgs:
    """The learned optimizer under ``meta``; ``num_steps`` is used with horizon features."""
    num_steps = num_steps if config.horizon_features else None
    learned = optimizers.LEARNED_OPTIMIZERS[config.optimizer]
    return learned.build(meta, num_steps, **optimizer_kwargs(config))


def outer_optimizer(config: MetaTrainConfig) -> optax.GradientTransformation:
    """Clip by global norm, then Adam (AdamW with ``weight_decay > 0``)."""
    if config.weight_decay > 0:
        adam = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
    else:
        adam = optax.adam(config.learning_rate)
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adam)


# --------------------------------------------------------------------------------------------
# One truncation of one slot (jitted per task configuration).


class Truncation(NamedTuple):
    grad: PyTree
    inner_state: PyTree  # (params, opt_state), or a PESState
    meta_loss: jax.Array  # normalised
    finite: jax.Array


def _inner_run(config: MetaTrainConfig, task: tasks.Task, meta, inner_state, batches,
               num_steps):
    """Run ``unroll`` steps; returns the new ``(params, opt_state)`` and the losses."""
    return tasks.run_steps(task, make_optimizer(config, meta, num_steps), *inner_state, batches)


def _compiled_for(config: MetaTrainConfig) -> MetaTrainConfig:
    """The config with the fields the compiled functions do not depend on normalised, so that
    runs differing only in length or seed share compilations."""
    return dataclasses.replace(config, steps=1, seed=0)


@functools.lru_cache(maxsize=64)
def _truncation_fn(config: MetaTrainConfig, member: tasks.FamilyMember) -> Callable:
    task = tasks.make_family_task(member)

    def inner_loss(params, meta, batch):
        return task.loss(params, batch)

    def mixflow(meta, inner_state, key, batches, outer_batch, scale, num_steps):
        del key
        params, opt_state = inner_state

        def outer_loss(params, meta, outer_batches):
            per_batch = jax.vmap(task.loss, in_axes=(None, 0))(params, outer_batches)
            return jnp.mean(per_batch) / scale

        # The truncation continues the inner run: it starts from the carried optimizer state and
        # hands back the final one, so the unroll runs once.
        grad, info = bilevel.unrolled_hypergrad(
            inner_loss, outer_loss, params, meta,
            optimizer=lambda h: make_optimizer(config, h, num_steps), opt_state=opt_state,
            steps=config.unroll, per_step_args=(batches,), outer_args=(outer_batch,),
            mode="mixflow", on_failure="ignore")
        new_state = (info.params, info.opt_state)
        finite = info.finite & _all_finite(new_state)
        return Truncation(grad, new_state, info.outer_loss, finite)

    def unroll(meta, inner_state, key, batches, scale, num_steps):
        new_state, losses = _inner_run(config, task, meta, inner_state, batches, num_steps)
        return new_state, jnp.mean(losses) / scale

    def pes(meta, pes_state, key, batches, outer_batch, scale, num_steps):
        del outer_batch
        grad, new_state, info = bilevel.pes_hypergrad(unroll, meta, pes_state, key,
                                                      sigma=config.sigma,
                                                      args=(batches, scale, num_steps),
                                                      on_failure="ignore")
        finite = info.finite & _all_finite(new_state.inner_state)
        return Truncation(grad, new_state, info.outer_loss, finite)

    return jax.jit(mixflow if config.estimator == "mixflow" else pes)


def _all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


@functools.lru_cache(maxsize=64)
def _slot_init_fn(config: MetaTrainConfig, member: tasks.FamilyMember) -> Callable:
    task = tasks.make_family_task(member)

    def inner_init(key):
        params = task.init(key)
        return params, optimizers.init_state(params)

    if config.estimator == "mixflow":
        return jax.jit(inner_init)
    return jax.jit(lambda meta, key: bilevel.pes_init(inner_init, meta, key, config.population))


# --------------------------------------------------------------------------------------------
# Slots and the meta-training state.


class Slot(NamedTuple):
    """One inner training run."""

    member: tasks.FamilyMember
    inner_state: PyTree  # (params, opt_state) for mixflow; a PESState for PES
    step: int  # inner steps done
    horizon: int
    scale: float  # the task's loss at initialisation
    runs: int  # inner runs started in this slot


class MetaTrainState(NamedTuple):
    """Everything a resumed run needs; :func:`save_checkpoint` writes it."""

    config: MetaTrainConfig
    step: int
    meta: dict
    outer_state: PyTree
    slots: tuple[Slot, ...]
    history: tuple[dict, ...]
    seconds: float  # meta-training wall time so far, over all resumptions

    def checkpoint_template(self) -> MetaTrainState:
        """This state with a fresh outer-optimizer state: the template :func:`load_checkpoint`
        reads a checkpoint on, so that optax's state classes come from optax, not the file."""
        return self._replace(outer_state=outer_optimizer(self.config).init(self.meta))


# The classes a checkpoint of either trainer rebuilds by name (optax's come from a template).
for _class in (MetaTrainState, Slot, MetaTrainConfig, tasks.FamilyMember, optimizers.LOptState,
               optimizers.FactoredMoments, bilevel.PESState):
    checkpoint.register(_class)


def _key(config: MetaTrainConfig, *path: int) -> jax.Array:
    key = jax.random.key(config.seed)
    for p in path:
        key = jax.random.fold_in(key, p)
    return key


def max_horizon(config: MetaTrainConfig, step: int) -> int:
    """The curriculum: linear from ``horizon_start`` to ``horizon`` over the first half."""
    frac = min(1.0, step / max(1.0, config.steps / 2))
    return int(round(config.horizon_start + frac * (config.horizon - config.horizon_start)))


@functools.lru_cache(maxsize=8)
def task_pool(config: MetaTrainConfig) -> tuple[tasks.FamilyMember, ...]:
    """The ``config.pool`` family configurations meta-training draws from (distinct, in order
    of first draw)."""
    pool: list[tasks.FamilyMember] = []
    draw = 0
    while len(pool) < config.pool and draw < 100 * config.pool:
        member = tasks.sample_member(_key(config, 3, draw), config.kinds)
        draw += 1
        if member not in pool:
            pool.append(member)
    return tuple(pool)


def _new_slot(config: MetaTrainConfig, meta: dict, step: int, index: int, runs: int) -> Slot:
    key = _key(config, 1, step, index)
    member_key, horizon_key, init_key = jax.random.split(key, 3)
    pool = task_pool(config)
    member = pool[int(jax.random.randint(member_key, (), 0, len(pool)))]
    high = max_horizon(config, step)
    u = float(jax.random.uniform(horizon_key))
    horizon = config.horizon_start * (high / config.horizon_start) ** u
    horizon = int(math.ceil(horizon / config.unroll) * config.unroll)
    init = _slot_init_fn(_compiled_for(config), member)
    task = tasks.make_family_task(member)
    if config.estimator == "mixflow":
        inner_state = init(init_key)
        scale = float(task.eval_loss(inner_state[0]))
    else:
        inner_state = init(meta, init_key)
        first = jax.tree_util.tree_map(lambda x: x[0], inner_state.inner_state[0])
        scale = float(task.eval_loss(first))
    return Slot(member, inner_state, 0, horizon, max(scale, 1e-8), runs + 1)


def init_meta_train(config: MetaTrainConfig) -> MetaTrainState:
    """Meta-parameters, outer optimizer state and the first inner runs."""
    meta = init_meta(config, _key(config, 0))
    slots = tuple(_new_slot(config, meta, 0, i, 0) for i in range(config.slots))
    return MetaTrainState(config, 0, meta, outer_optimizer(config).init(meta), slots, (), 0.0)


def _batches(config: MetaTrainConfig, slot: Slot, key: jax.Array):
    """The truncation's minibatches and the meta-loss's (``OUTER_BATCH_MULTIPLE`` fresh ones)."""
    task = tasks.make_family_task(slot.member)
    inner_key, outer_key = jax.random.split(key)
    return (task.batches(inner_key, config.unroll),
            task.batches(outer_key, OUTER_BATCH_MULTIPLE))


@functools.lru_cache(maxsize=8)
def _outer_update_fn(config: MetaTrainConfig) -> Callable:
    outer = outer_optimizer(config)

    def apply(meta, outer_state, grad):
        updates, outer_state = outer.update(grad, outer_state, meta)
        return optax.apply_updates(meta, updates), outer_state, optax.tree.norm(grad)

    return jax.jit(apply)


def meta_train_step(state: MetaTrainState) -> tuple[MetaTrainState, dict]:
    """One outer step: a truncation of every slot, the averaged meta-gradient, Adam."""
    config = state.config
    grads, losses, slots, skipped = [], [], [], 0
    for index, slot in enumerate(state.slots):
        key = _key(config, 2, state.step, index)
        batch_key, pes_key = jax.random.split(key)
        batches, outer_batch = _batches(config, slot, batch_key)
        fn = _truncation_fn(_compiled_for(config), slot.member)
        result = fn(state.meta, slot.inner_state, pes_key, batches, outer_batch,
                    jnp.float32(slot.scale), jnp.float32(slot.horizon))
        loss = float(result.meta_loss)
        ok = bool(result.finite) and loss <= config.divergence
        if ok:
            grads.append(result.grad)
            losses.append(loss)
            slot = slot._replace(inner_state=result.inner_state, step=slot.step + config.unroll)
        else:
            skipped += 1
        if not ok or slot.step >= slot.horizon:
            slot = _new_slot(config, state.meta, state.step + 1, index, slot.runs)
        slots.append(slot)
    meta, outer_state, grad_norm = state.meta, state.outer_state, float("nan")
    if grads:
        grad = jax.tree_util.tree_map(lambda *g: sum(g) / len(g), *grads)
        meta, outer_state, norm = _outer_update_fn(_compiled_for(config))(meta, outer_state,
                                                                          grad)
        grad_norm = float(norm)
    record = {"step": state.step + 1,
              "meta_loss": float(np.mean(losses)) if losses else float("nan"),
              "grad_norm": grad_norm, "skipped": skipped,
              "max_horizon": max_horizon(config, state.step)}
    new_state = state._replace(step=state.step + 1, meta=meta, outer_state=outer_state,
                               slots=tuple(slots), history=state.history + (record,))
    return new_state, record


def meta_train(state: MetaTrainState, on_step: Callable[[MetaTrainState, dict], None]
               | None = None, step: Callable | None = None) -> MetaTrainState:
    """Run outer steps until ``state.config.steps``; ``on_step`` sees every new state.

    ``step(state) -> (state, record)`` is :func:`meta_train_step` unless given (the VeLO
    trainer passes its own; any state with ``step``, ``config.steps`` and ``seconds`` works).
    """
    step = meta_train_step if step is None else step
    while state.step < state.config.steps:
        start = time.perf_counter()
        state, record = step(state)
        state = state._replace(seconds=state.seconds + time.perf_counter() - start)
        if on_step is not None:
            on_step(state, record)
    return state


# --------------------------------------------------------------------------------------------
# Checkpoints.


_WRITER = "bilevel lopt train"


def _optimizer(config: Any) -> str:
    return getattr(config, "optimizer", "velo")


def save_checkpoint(path: str | os.PathLike, state: NamedTuple) -> None:
    """Write ``state`` (either trainer's) atomically with :func:`bilevel.checkpoint.save`; the
    metadata says which optimizer's run it is and at which step."""
    checkpoint.save(path, state, {"writer": _WRITER, "optimizer": _optimizer(state.config),
                                  "step": int(state.step)})


def _check_writer(path: str | os.PathLike, metadata: dict) -> None:
    if metadata.get("writer") != _WRITER:
        raise checkpoint.CheckpointError(path, f"it was written by {metadata.get('writer')!r}")


def read_checkpoint(path: str | os.PathLike) -> NamedTuple:
    """The state in ``path`` as stored by :func:`save_checkpoint` (either trainer's, if its
    module is imported), the outer-optimizer state as plain tuples.

    Raises:
      ValueError: ``path`` is not such a file (truncated, another format, another program's).
    """
    try:
        state, metadata = checkpoint.load(path)
        _check_writer(path, metadata)
    except checkpoint.CheckpointError as error:
        raise ValueError(f"lopt.train.read_checkpoint: {path} is not a meta-training checkpoint "
                         f"({error.reason})") from None
    if not hasattr(state, "checkpoint_template"):
        raise ValueError(f"lopt.train.read_checkpoint: {path} holds a run of --optimizer "
                         f"{metadata.get('optimizer')}, whose trainer is not imported")
    return state


def stored_optimizer(path: str | os.PathLike) -> str:
    """The ``--optimizer`` of the run checkpointed in ``path`` (read from its header only).

    Raises:
      ValueError: ``path`` is not a meta-training checkpoint.
    """
    try:
        metadata = checkpoint.read_metadata(path)
        _check_writer(path, metadata)
    except checkpoint.CheckpointError as error:
        raise ValueError(f"lopt.train.stored_optimizer: {path} is not a meta-training checkpoint "
                         f"({error.reason})") from None
    return str(metadata.get("optimizer"))


def load_checkpoint(path: str | os.PathLike, kind: type = MetaTrainState) -> MetaTrainState:
    """Read a checkpoint written by :func:`save_checkpoint` holding a ``kind`` (a state with
    ``meta``, ``outer_state`` and ``checkpoint_template``), checked against and rebuilt on the
    state's template."""
    state = read_checkpoint(path)
    if not isinstance(state, kind):
        raise ValueError(f"lopt.train.load_checkpoint: {path} does not hold a {kind.__name__}")
    try:
        state, _ = checkpoint.load(path, like=state.checkpoint_template())
    except checkpoint.CheckpointError as error:
        raise ValueError(f"lopt.train.load_checkpoint: {path} holds a {kind.__name__} this "
                         f"version cannot resume ({error.reason})") from None
    return state


def final_metadata(state: MetaTrainState) -> dict:
    """The metadata saved with the meta-parameters: how they were trained."""
    config = state.config
    recent = [r["meta_loss"] for r in state.history[-20:] if math.isfinite(r["meta_loss"])]
    return {
        "optimizer": f"{config.optimizer}_lopt",
        "optimizer_kwargs": optimizer_kwargs(config),
        "horizon_features": config.horizon_features,
        "config": {k: list(v) if isinstance(v, tuple) else v
                   for k, v in dataclasses.asdict(config).items()},
        "outer_steps": state.step,
        "meta_training_seconds": round(state.seconds, 1),  # wall clock, compilation included
        "final_meta_loss_last20_mean": float(np.mean(recent)) if recent else None,
        "first_meta_loss": state.history[0]["meta_loss"] if state.history else None,
        "task_pool": [tasks.make_family_task(m).name for m in task_pool(config)],
        "machine": f"{_cpu_model()} ({os.cpu_count()} CPUs), {jax.default_backend()}, "
                   f"jax {jax.__version__}",
        "num_meta_params": optimizers.num_meta_params(state.meta),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------------
# Command line (options: :func:`bilevel.lopt.options.add_train_arguments`).

add_arguments = options.add_train_arguments


def config_from_args(args: argparse.Namespace) -> MetaTrainConfig:
    """The config of ``lopt train``'s options; ``--weight-decay`` defaults to STAR's 0.1 for
    star, 0 for mlp."""
    weight_decay = args.weight_decay
    if weight_decay is None:
        learned = optimizers.LEARNED_OPTIMIZERS.get(args.optimizer)
        weight_decay = learned.meta_weight_decay if learned is not None else 0.0
    return from_args(MetaTrainConfig, args, weight_decay=weight_decay)


def write_outputs(out: Path, state: MetaTrainState) -> None:
    """The meta-loss log (CSV), its plot (PNG) and the meta-parameters (``.npz``)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "meta_loss.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "meta_loss", "grad_norm", "skipped",
                                               "max_horizon"])
        writer.writeheader()
        writer.writerows(state.history)
    optimizers.save_meta_params(out / "meta_params.npz", state.meta, final_metadata(state))
    (out / "metadata.json").write_text(json.dumps(final_metadata(state), indent=2) + "\n")
    plot_meta_loss(out / "meta_loss.png", state)


def plot_meta_loss(path: Path, state: MetaTrainState) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.asarray([r["step"] for r in state.history])
    losses = np.asarray([r["meta_loss"] for r in state.history], float)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.6, alpha=0.5, label="per step")
    window = min(20, max(1, len(losses) // 5))
    if len(losses) >= window:
        valid = np.where(np.isfinite(losses), losses, np.nan)
        smooth = np.convolve(np.nan_to_num(valid, nan=np.nanmean(valid)),
                             np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, lw=1.5, label=f"mean of {window}")
    c = state.config
    ax.set(xlabel="outer step", ylabel="meta-loss (loss / initial loss)",
           title=f"{c.optimizer}_lopt, {c.estimator}, unroll {c.unroll}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``bilevel lopt train`` for mlp and star: meta-train with a progress bar, checkpoints and
    resume (``--optimizer velo`` runs :func:`bilevel.lopt.velo_train.run`; the command line
    picks it, so that this module does not import the one that builds on it)."""
    if args.optimizer == "velo":
        parser.error("--optimizer velo: run bilevel.lopt.velo_train.run (bilevel lopt train "
                     "dispatches there)")
    return run_meta_training(args, parser, config_from_args=config_from_args,
                             init=init_meta_train, step=meta_train_step, kind=MetaTrainState,
                             checkpoint_name=CHECKPOINT_NAME, write_outputs=write_outputs,
                             final_metadata=final_metadata, label="meta-train")


# The run folder: resume, finished, refused or afresh (the rule in options.RESUME_RULE).

def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple | list) else str(value)


def changed_options(stored: Any, requested: Any, done: int) -> list[str]:
    """``"--seed 0 there, 3 here"`` for each option (or, for a field without one, the field) in
    which the config ``requested`` differs from the ``stored`` run's, which has done ``done``
    steps; raising ``steps`` (to continue a run further) is no difference."""
    kind = (getattr(stored, "optimizer", "velo"), getattr(requested, "optimizer", "velo"))
    if type(stored) is not type(requested):
        return [f"--optimizer {kind[0]} there, {kind[1]} here"]
    changed = []
    for name in (f.name for f in dataclasses.fields(requested)):
        there, here = getattr(stored, name), getattr(requested, name)
        option = flag(type(requested), name) or name
        if name == "steps":
            if here < done:
                changed.append(f"--steps {there} there (at step {done}), {here} here")
        elif there != here:
            changed.append(f"{option} {_shown(there)} there, {_shown(here)} here")
    return changed


def _stored_run(out: Path, checkpoint_name: str, config: Any,
                parser: argparse.ArgumentParser):
    """``(path, state)`` of this trainer's checkpoint in ``out``, or ``None``. A folder with the
    other trainer's run (whose classes may not be imported) or with bilevel 0.1.0's pickled
    checkpoint (never unpickled) is refused here."""
    for name in PICKLED_CHECKPOINT_NAMES:
        if (out / name).is_file():
            parser.error(f"--out: {out / name} was written by an older bilevel (pickle); rerun "
                         f"with --overwrite, or use bilevel<=0.1.0 to finish it")
    names = (checkpoint_name,) + tuple(n for n in (CHECKPOINT_NAME, VELO_CHECKPOINT_NAME)
                                       if n != checkpoint_name)
    for path in (out / name for name in names):
        if path.is_file():
            try:
                if path.name == checkpoint_name:
                    return path, read_checkpoint(path)
                there = stored_optimizer(path)
            except ValueError as error:
                parser.error(f"--out: {str(error).split(': ', 1)[1]}; use --overwrite to start "
                             f"afresh, or another --out")
            _refuse(parser, out, f"a run with other options (--optimizer {there} there, "
                                 f"{_optimizer(config)} here)")
    return None


def _remove_run(out: Path) -> list[str]:
    removed = []
    for name in (CHECKPOINT_NAME, VELO_CHECKPOINT_NAME, *PICKLED_CHECKPOINT_NAMES) + OUTPUTS:
        if (out / name).is_file():
            (out / name).unlink()
            removed.append(name)
    return removed


def _refuse(parser: argparse.ArgumentParser, out: Path, what: str) -> None:
    parser.error(f"--out {out} holds {what}; use --overwrite to start afresh, or another --out")


class Start(NamedTuple):
    """Where a run begins: ``state`` (``None``: afresh), or nothing to do (``finished``)."""

    state: Any = None
    finished: bool = False


def start_state(args: argparse.Namespace, parser: argparse.ArgumentParser, config: Any,
                checkpoint_name: str) -> Start:
    """Apply the run-folder rule (:data:`bilevel.lopt.options.RESUME_RULE`) to ``--out``:
    print what happens and say where the run starts; refusals exit with status 2."""
    out: Path = args.out
    if args.overwrite:
        removed = _remove_run(out)
        if removed:
            print(f"--overwrite: removed {', '.join(removed)} from {out}; starting afresh")
        return Start()
    stored = _stored_run(out, checkpoint_name, config, parser)
    if stored is None:
        if args.resume:
            parser.error(f"--resume: no checkpoint at {out / checkpoint_name}")
        outputs = [name for name in OUTPUTS if (out / name).exists()]
        if outputs:
            _refuse(parser, out, f"the outputs of a run ({', '.join(outputs)}) but no "
                                 f"checkpoint to resume")
        return Start()
    path, state = stored
    changed = changed_options(state.config, config, state.step)
    if changed:
        _refuse(parser, out, f"a run with other options ({'; '.join(changed)})")
    if state.step == config.steps and all((out / name).is_file() for name in OUTPUTS):
        print(f"{out} holds a finished run (step {state.step} of {config.steps}); left "
              f"untouched (--overwrite trains it afresh, a larger --steps continues it)")
        return Start(finished=True)
    raised = (f"; --steps raised from {state.config.steps}" if config.steps > state.config.steps
              else "")
    try:
        state = load_checkpoint(path, type(state))
    except ValueError as error:
        parser.error(f"--out: {str(error).split(': ', 1)[1]}; use --overwrite to start afresh, "
                     f"or another --out")
    print(f"resuming from step {state.step} of {config.steps} ({path}{raised})")
    return Start(state._replace(config=config))


def check_task_data(config: Any, parser: argparse.ArgumentParser) -> None:
    """Exit with one line if a dataset of the task pool is not installed (MNIST-5k needs the
    ``data`` extra), before any work rather than at the first slot that draws it."""
    from bilevel import datasets

    for name in sorted({m.dataset for m in task_pool(config) if m.dataset}):
        try:
            datasets.load(name)
        except ImportError as error:
            parser.error(f"--kinds {','.join(config.kinds)}: the task pool drawn for --seed "
                         f"{config.seed} holds {name} tasks; {name} {options.install_hint(error)}; "
                         f"or use --kinds quadratic")


def _train_with_progress(state: Any, step: Callable, checkpoint: Path, every: int,
                         label: str) -> tuple[Any, bool]:
    """Train to ``state.config.steps`` with a progress bar and checkpoints; on Ctrl-C, save
    the last finished step. Returns ``(state, interrupted)``."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(f"[bold]{label}[/]"), BarColumn(), TextColumn("{task.completed}/"
               "{task.total}"), TextColumn("{task.fields[loss]}"), TimeRemainingColumn())
    last = [state]
    total = state.config.steps

    def on_step(new_state, record):
        last[0] = new_state
        progress.update(bar, completed=new_state.step,
                        loss=f"meta-loss {record['meta_loss']:.4f}")
        if new_state.step % every == 0 or new_state.step == total:
            save_checkpoint(checkpoint, new_state)

    try:
        with Progress(*columns) as progress:
            bar = progress.add_task("meta", total=total, completed=state.step, loss="")
            state = meta_train(state, on_step, step)
    except KeyboardInterrupt:
        save_checkpoint(checkpoint, last[0])
        print(f"interrupted at step {last[0].step} of {total}; saved {checkpoint}; run the "
              f"same command again to resume", file=sys.stderr)
        return last[0], True
    save_checkpoint(checkpoint, state)
    return state, False


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def run_meta_training(args: argparse.Namespace, parser: argparse.ArgumentParser, *,
                      config_from_args: Callable, init: Callable, step: Callable, kind: type,
                      checkpoint_name: str, write_outputs: Callable, final_metadata: Callable,
                      label: str) -> int:
    """The command-line shell of a meta-trainer: options to a config, where the run-folder rule
    starts it (afresh, resumed, finished or refused), a progress bar, a checkpoint every
    ``--checkpoint-every`` steps, at the end and on Ctrl-C, then the outputs in ``--out``."""
    del kind  # the checkpoint says which trainer wrote it
    out: Path = args.out
    try:
        config = config_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite contradict each other: a rerun resumes by "
                     "itself; --overwrite starts afresh")
    if args.overwrite:  # the old run goes only once the new one can start
        check_task_data(config, parser)
    start = start_state(args, parser, config, checkpoint_name)
    if start.finished:
        return 0
    if not args.overwrite:
        check_task_data(config, parser)
    state = init(config) if start.state is None else start.state
    state, interrupted = _train_with_progress(state, step, out / checkpoint_name,
                                              args.checkpoint_every, label)
    if interrupted:
        return 130
    write_outputs(out, state)
    meta = final_metadata(state)
    print(f"meta-trained {meta['optimizer']} for {state.step} outer steps in "
          f"{state.seconds:.0f} s; meta-loss {_number(meta['first_meta_loss'])} (first) -> "
          f"{_number(meta['final_meta_loss_last20_mean'])} (mean of last 20); "
          f"wrote {out / 'meta_params.npz'}")
    return 0
