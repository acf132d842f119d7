"""Evaluation of learned optimizers against learning-rate-tuned baselines (``bilevel lopt eval``).

The protocol follows VeLO (Metz et al. 2022, §4) and its independent re-evaluation (Rezk et al.
2023): every baseline (Adam, NAdamW, SGD with momentum) gets a log-spaced learning-rate sweep
per task, each run over several seeds; the tuned baseline is the learning rate with the lowest
mean final training loss. A learned optimizer is reported by

* its final training loss (the task's full-training-set loss after ``steps`` updates), and
* its **speed-up**: the number of steps LR-tuned Adam needs to reach the learned optimizer's
  final loss, over the learned optimizer's number of steps. Above 1 the learned optimizer is
  faster; below 1 Adam gets there sooner. When no Adam run reaches the loss within its own
  horizon the speed-up is only known to exceed ``adam_steps / steps`` and is reported as such.

Across tasks, :func:`performance_profile` gives each optimizer's fraction of tasks on which its
final loss is within a factor τ of the best optimizer's (Dolan & Moré 2002, on final losses).

The numerical core (:func:`run_optimizer`, :func:`run_baseline_sweep`, :func:`tune_baseline`,
:func:`speedup`, :func:`performance_profile`) is pure; :func:`add_arguments` and :func:`run`
are the command-line shell (parsing, progress bar, files).

A *task* is any object with the fields of :class:`bilevel.lopt.tasks.Task`: ``name``,
``init(key) -> params``, ``loss(params, batch) -> scalar``, ``batches(key, steps) -> batch tree
with a leading steps axis``, ``eval_loss(params) -> scalar`` and ``held_out``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel.lopt import options, tasks
from bilevel.lopt.options import BASELINES, DEFAULT_LRS, LEARNED  # noqa: F401

PyTree = Any
OPTIMIZERS = options.EVAL_OPTIMIZERS
#: NAdamW's decoupled weight decay (optax's default) and SGD's heavy-ball momentum.
NADAMW_WEIGHT_DECAY = 1e-4
SGD_MOMENTUM = 0.9


class Curve(NamedTuple):
    """Loss curves of one run (leading axes added by ``vmap``: learning rates, seeds).

    Attributes:
      train_loss: ``(steps,)`` minibatch loss before each update.
      eval_loss: ``(num_evals,)`` full-training-set loss (``task.eval_loss``) at ``eval_steps``.
      eval_steps: ``(num_evals,)`` int, ``0, eval_every, 2·eval_every, ..., steps``.
    """
    train_loss: jax.Array
    eval_loss: jax.Array
    eval_steps: jax.Array


def baseline(name: str, learning_rate, *, schedule_steps: int | None = None
             ) -> optax.GradientTransformationExtraArgs:
    """A hand-designed baseline optimizer; ``learning_rate`` may be a traced scalar (vmapped).

    Args:
      name: ``"adam"`` (Kingma & Ba 2015), ``"nadamw"`` (Nesterov Adam with decoupled weight
        decay 1e-4, Dozat 2016 / Loshchilov & Hutter 2019) or ``"sgdm"`` (heavy-ball momentum
        0.9).
      learning_rate: peak learning rate.
      schedule_steps: if given, the learning rate follows a cosine decay to 0 over this many
        steps (used to tell a baseline a training horizon).

    Returns:
      An optax transformation that accepts (and ignores) extra arguments such as ``loss=``.
    """
    if name not in BASELINES:
        raise ValueError(f"evaluate.baseline: name must be one of {', '.join(BASELINES)}, "
                         f"got {name!r}")
    lr = learning_rate
    if schedule_steps is not None:
        lr = optax.cosine_decay_schedule(learning_rate, schedule_steps)
    if name == "adam":
        opt = optax.adam(lr)
    elif name == "nadamw":
        opt = optax.nadamw(lr, weight_decay=NADAMW_WEIGHT_DECAY)
    else:
        opt = optax.sgd(lr, momentum=SGD_MOMENTUM)
    return optax.with_extra_args_support(opt)


def _check_schedule(steps: int, eval_every: int | None) -> int:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"evaluate.run_optimizer: steps must be an integer >= 1, got {steps!r}")
    eval_every = steps if eval_every is None else eval_every
    if not isinstance(eval_every, int) or eval_every < 1 or steps % eval_every:
        raise ValueError(f"evaluate.run_optimizer: eval_every must be an integer >= 1 that "
                         f"divides steps={steps}, got {eval_every!r}")
    return eval_every


def run_optimizer(task, optimizer: optax.GradientTransformation, steps: int, key: jax.Array,
                  *, eval_every: int | None = None) -> Curve:
    """Train ``task`` from ``task.init`` for ``steps`` updates of ``optimizer`` (pure, jittable).

    Each update is ``u, s = optimizer.update(g, s, θ, loss=ℓ); θ ← θ + u`` with ``(ℓ, g)`` the
    minibatch loss and gradient, so learned optimizers receive the loss they may use as a
    feature. The minibatches of chunk ``c`` (``eval_every`` steps) are
    ``task.batches(fold_in(k_data, c), eval_every)``: only one chunk of data is held at once,
    and a seed gives every optimizer the same initial parameters and the same batches.

    Args:
      task: see the module docstring.
      optimizer: an optax transformation (wrapped to accept ``loss=`` if it does not).
      steps: number of updates.
      key: PRNG key of this seed (initial parameters and data order).
      eval_every: steps between two full-training-set losses (default ``steps``: only the
        initial and the final one); must divide ``steps``.

    Returns:
      :class:`Curve`; ``vmap`` over ``key`` for seeds.
    """
    eval_every = _check_schedule(steps, eval_every)
    optimizer = optax.with_extra_args_support(optimizer)
    init_key, data_key = jax.random.split(key)
    params = task.init(init_key)
    state = optimizer.init(params)

    def chunk(carry, index):
        batches = task.batches(jax.random.fold_in(data_key, index), eval_every)
        carry, losses = tasks.run_steps(task, optimizer, *carry, batches)
        return carry, (losses, task.eval_loss(carry[0]))

    num_chunks = steps // eval_every
    _, (train_loss, eval_loss) = jax.lax.scan(chunk, (params, state), jnp.arange(num_chunks))
    eval_loss = jnp.concatenate([task.eval_loss(params)[None], eval_loss])
    eval_steps = jnp.arange(num_chunks + 1) * eval_every
    return Curve(train_loss.reshape(steps), eval_loss, eval_steps)


def seed_keys(seeds: int | Sequence[int]) -> jax.Array:
    """Keys of seeds ``0..seeds-1`` (or of the listed seeds), shared by every optimizer."""
    seeds = range(seeds) if isinstance(seeds, int) else seeds
    return jnp.stack([jax.random.key(s) for s in seeds])


def run_seeds(task, optimizer, steps: int, keys: jax.Array, *, eval_every: int | None = None
              ) -> Curve:
    """:func:`run_optimizer` vmapped over ``keys`` in one compiled program (leading seed axis)."""
    fn = jax.jit(jax.vmap(lambda k: run_optimizer(task, optimizer, steps, k,
                                                  eval_every=eval_every)))
    return fn(keys)


def run_baseline_sweep(task, name: str, learning_rates: Sequence[float], steps: int,
                       keys: jax.Array, *, eval_every: int | None = None,
                       schedule_steps: int | None = None) -> Curve:
    """A baseline over a learning-rate grid × seeds: one compiled program, axes ``(lr, seed)``.

    Args:
      task: see the module docstring.
      name: a name from :data:`BASELINES`.
      learning_rates: the grid (each > 0).
      steps, eval_every: as in :func:`run_optimizer`.
      keys: seed keys (:func:`seed_keys`).
      schedule_steps: cosine-decay horizon told to the baseline (None: constant rate).

    Returns:
      :class:`Curve` with leading axes ``(len(learning_rates), len(keys))``.
    """
    lrs = np.asarray(learning_rates, np.float64)
    if lrs.ndim != 1 or lrs.size == 0 or not np.all(np.isfinite(lrs) & (lrs > 0)):
        raise ValueError(f"evaluate.run_baseline_sweep: learning_rates must be a non-empty list "
                         f"of finite numbers > 0, got {list(learning_rates)}")
    baseline(name, 1.0)  # validates the name before compiling

    def one(lr, key):
        opt = baseline(name, lr, schedule_steps=schedule_steps)
        return run_optimizer(task, opt, steps, key, eval_every=eval_every)

    fn = jax.jit(jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None)))
    dtype = jax.tree_util.tree_leaves(jax.eval_shape(task.init, keys[0]))[0].dtype
    return fn(jnp.asarray(lrs, dtype), keys)


def _finite_or_inf(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return np.where(np.isfinite(x), x, np.inf)


class Tuned(NamedTuple):
    """Result of :func:`tune_baseline`.

    Attributes:
      name: the baseline.
      learning_rates: ``(L,)`` the grid.
      best_index: index of the chosen learning rate.
      score: ``(L,)`` mean over seeds of the selection loss (inf for a diverged run).
      curves: :class:`Curve` with axes ``(L, seeds, ...)``.
      at_edge: True when the best rate is the grid's smallest or largest (widen the grid).
    """
    name: str
    learning_rates: np.ndarray
    best_index: int
    score: np.ndarray
    curves: Curve
    at_edge: bool

    @property
    def learning_rate(self) -> float:
        return float(self.learning_rates[self.best_index])

    @property
    def best(self) -> Curve:
        """The curves (axes ``(seeds, ...)``) of the chosen learning rate."""
        return jax.tree_util.tree_map(lambda x: x[self.best_index], self.curves)


def select_learning_rate(eval_loss: np.ndarray, tail_fraction: float = 0.0
                         ) -> tuple[int, np.ndarray]:
    """Index of the best learning rate from full-training-set losses of axes ``(lr, seed, eval)``.

    The score of a rate is the mean over seeds of the final loss (``tail_fraction = 0``) or of
    the mean of the last ``ceil(tail_fraction · num_evals)`` evaluations; a run with any
    non-finite loss in that window scores ``inf`` (a diverged run is never chosen).

    Returns:
      ``(best_index, scores)``.
    """
    eval_loss = np.asarray(eval_loss, np.float64)
    if eval_loss.ndim != 3:
        raise ValueError(f"evaluate.select_learning_rate: eval_loss must have axes (lr, seed, "
                         f"eval), got shape {eval_loss.shape}")
    tail = max(1, math.ceil(tail_fraction * eval_loss.shape[-1]))
    per_seed = _finite_or_inf(eval_loss[..., -tail:]).mean(axis=-1)
    scores = per_seed.mean(axis=1)
    return int(np.argmin(scores)), scores


def tune_baseline(task, name: str, learning_rates: Sequence[float], steps: int,
                  seeds: int | Sequence[int], *, eval_every: int | None = None,
                  tail_fraction: float = 0.0, schedule_steps: int | None = None) -> Tuned:
    """Sweep a baseline's learning rate and choose the rate with the lowest mean final loss.

    VeLO's protocol (Metz et al. 2022, §4.1): a log-spaced grid, several seeds per rate, the
    rate with the best mean final training loss. See :func:`run_baseline_sweep` and
    :func:`select_learning_rate` for the arguments.
    """
    curves = run_baseline_sweep(task, name, learning_rates, steps, seed_keys(seeds),
                                eval_every=eval_every, schedule_steps=schedule_steps)
    best, scores = select_learning_rate(np.asarray(curves.eval_loss), tail_fraction)
    lrs = np.asarray(learning_rates, np.float64)
    return Tuned(name, lrs, best, scores, curves, best in (0, len(lrs) - 1))


def steps_to_reach(eval_steps, loss_curve, target: float) -> float:
    """First step at which a loss curve reaches ``target`` (``loss <= target``), else ``inf``.

    Between two evaluations the loss is interpolated linearly, so a curve evaluated every k
    steps resolves the crossing below k. A curve already at or below the target at its first
    evaluation gives that evaluation's step.
    """
    steps = np.asarray(eval_steps, np.float64)
    loss = np.asarray(loss_curve, np.float64)
    if loss.shape != steps.shape or loss.ndim != 1:
        raise ValueError(f"evaluate.steps_to_reach: loss_curve {loss.shape} and eval_steps "
                         f"{steps.shape} must be the same 1-D shape")
    below = np.flatnonzero(np.isfinite(loss) & (loss <= target))
    if below.size == 0:
        return math.inf
    i = int(below[0])
    if i == 0 or not np.isfinite(loss[i - 1]) or loss[i - 1] == loss[i]:
        return float(steps[i])
    fraction = (loss[i - 1] - target) / (loss[i - 1] - loss[i])
    return float(steps[i - 1] + fraction * (steps[i] - steps[i - 1]))


class Speedup(NamedTuple):
    """Result of :func:`speedup`.

    Attributes:
      value: ``adam_steps / lopt_steps``; ``inf`` when Adam never reaches the loss.
      adam_steps: steps tuned Adam needs (``inf`` if never within ``horizon``).
      horizon: the longest Adam run; when not reached the speed-up is ``> horizon / lopt_steps``.
      lopt_steps: the learned optimizer's number of steps.
      reached: whether some Adam run reached the loss.
      learning_rate_index: index of the learning rate that got there first (-1 if none).
    """
    value: float
    adam_steps: float
    horizon: float
    lopt_steps: float
    reached: bool
    learning_rate_index: int

    @property
    def lower_bound(self) -> float:
        """The speed-up is at least this (equal to ``value`` when reached)."""
        return self.value if self.reached else self.horizon / self.lopt_steps

    def __str__(self) -> str:
        if self.reached:
            return f"{self.value:.2f}x"
        return f">{self.lower_bound:.2f}x"


def speedup(eval_steps, adam_loss, lopt_final_loss: float, lopt_steps: int) -> Speedup:
    """VeLO's speed-up: steps LR-tuned Adam needs to reach a loss, over the learned optimizer's.

    ``adam_loss`` holds the seed-mean full-training-set loss curve of each learning rate (axes
    ``(lr, eval)``, or one curve ``(eval,)``); as in VeLO, "LR-tuned Adam" is the rate that
    reaches the target first, so ``adam_steps = min_lr steps_to_reach(curve_lr, target)``.

    Args:
      eval_steps: ``(num_evals,)`` steps of the curves' points.
      adam_loss: ``(lr, num_evals)`` or ``(num_evals,)``.
      lopt_final_loss: the target (the learned optimizer's seed-mean final loss).
      lopt_steps: the learned optimizer's number of steps (> 0).

    Returns:
      :class:`Speedup`; ``value < 1`` means Adam is faster. A non-finite ``lopt_final_loss``
      (a seed diverged) gives 0: any Adam run is at least as good from its first step.
    """
    if not lopt_steps > 0:
        raise ValueError(f"evaluate.speedup: lopt_steps must be > 0, got {lopt_steps}")
    horizon = float(np.asarray(eval_steps)[-1])
    if math.isnan(lopt_final_loss) or lopt_final_loss == math.inf:
        # a diverged learned optimizer: Adam is at least as good from its first step
        return Speedup(0.0, 0.0, horizon, float(lopt_steps), True, -1)
    curves = np.atleast_2d(np.asarray(adam_loss, np.float64))
    needed = np.array([steps_to_reach(eval_steps, c, lopt_final_loss) for c in curves])
    if not np.isfinite(needed).any():
        return Speedup(math.inf, math.inf, horizon, float(lopt_steps), False, -1)
    best = int(np.argmin(needed))
    return Speedup(needed[best] / lopt_steps, float(needed[best]), horizon, float(lopt_steps),
                   True, best)


def performance_profile(final_losses: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """Fraction of tasks on which each optimizer is within a factor τ of the best final loss.

    ``ρ_s(τ) = |{p : ℓ_{p,s} <= τ · min_s' ℓ_{p,s'}}| / |tasks|`` (Dolan & Moré 2002, with final
    losses as the cost). Losses must be > 0 (cross-entropies are); a non-finite loss is never
    within any factor.

    Args:
      final_losses: ``(tasks, optimizers)``.
      taus: ``(T,)`` factors >= 1.

    Returns:
      ``(optimizers, T)`` fractions in [0, 1].
    """
    losses = _finite_or_inf(final_losses)
    if losses.ndim != 2 or np.any(losses <= 0):
        raise ValueError(f"evaluate.performance_profile: final_losses must be (tasks, "
                         f"optimizers) of positive losses, got shape {losses.shape}")
    ratio = losses / losses.min(axis=1, keepdims=True)
    taus = np.asarray(taus, np.float64)
    return (ratio[:, :, None] <= taus[None, None, :]).mean(axis=0)


# --------------------------------------------------------------------------------------------
# The suite: every optimizer on every task, rows for the tables.


class TaskResult(NamedTuple):
    """Everything measured on one task: learned runs ``(seeds, ...)`` and tuned baselines."""
    task: Any
    learned: dict[str, Curve]
    tuned: dict[str, Tuned]


def evaluate_task(task, learned: dict[str, Callable[[int], Any]], baselines: Sequence[str],
                  learning_rates: Sequence[float], steps: int, seeds: int | Sequence[int],
                  *, eval_every: int | None = None,
                  on_done: Callable[[str], None] = lambda name: None) -> TaskResult:
    """Run every learned optimizer and tune every baseline on one task, same seeds for all.

    Args:
      task: see the module docstring.
      learned: name → ``make(steps)`` returning the optimizer told a training length of
        ``steps`` (a learned optimizer without horizon inputs ignores it).
      baselines: names from :data:`BASELINES`.
      learning_rates, steps, seeds, eval_every: as in :func:`tune_baseline`.
      on_done: called with each optimizer's name when its runs finish (progress bars).
    """
    keys = seed_keys(seeds)
    curves = {}
    for name, make in learned.items():
        curves[name] = jax.device_get(run_seeds(task, make(steps), steps, keys,
                                                eval_every=eval_every))
        on_done(name)
    tuned = {}
    for name in baselines:
        tuned[name] = tune_baseline(task, name, learning_rates, steps, seeds,
                                    eval_every=eval_every)
        tuned[name] = tuned[name]._replace(curves=jax.device_get(tuned[name].curves))
        on_done(name)
    return TaskResult(task, curves, tuned)


def _final(curve: Curve) -> np.ndarray:
    """Per-seed final full-training-set losses (non-finite → inf)."""
    return _finite_or_inf(np.asarray(curve.eval_loss)[..., -1])


def result_rows(result: TaskResult, steps: int) -> list[dict[str, Any]]:
    """One row per optimizer: final loss over seeds, tuned rate, speed-up over tuned Adam.

    ``speedup`` is :func:`speedup` against every Adam learning rate's seed-mean curve (empty
    when Adam was not run); ``vs_best`` is the final loss over the task's best final loss.
    """
    finals = {name: _final(c) for name, c in result.learned.items()}
    finals.update({name: _final(t.best) for name, t in result.tuned.items()})
    means = {name: float(np.mean(f)) for name, f in finals.items()}
    best = min(means.values())
    adam = result.tuned.get("adam")
    rows = []
    for name, final in finals.items():
        tuned = result.tuned.get(name)
        row = {"task": result.task.name, "held_out": bool(result.task.held_out),
               "optimizer": name, "steps": steps, "seeds": final.size,
               "final_loss": means[name], "final_loss_std": float(np.std(final)),
               "diverged_seeds": int(np.sum(~np.isfinite(final))),
               "vs_best": means[name] / best if best > 0 else math.nan,
               "learning_rate": tuned.learning_rate if tuned else "",
               "lr_at_grid_edge": tuned.at_edge if tuned else "",
               "speedup": "", "speedup_reached": "", "adam_steps_to_reach": ""}
        if adam is not None and name != "adam":
            adam_mean = np.asarray(adam.curves.eval_loss, np.float64).mean(axis=1)
            s = speedup(np.asarray(adam.curves.eval_steps)[0, 0], adam_mean, means[name], steps)
            row.update(speedup=s.lower_bound, speedup_reached=s.reached,
                       adam_steps_to_reach=s.adam_steps)
        rows.append(row)
    return rows


def format_speedup(row: dict[str, Any]) -> str:
    """``"1.52x"``, ``">1.00x"`` (tuned Adam never got there) or ``"-"``."""
    if row["speedup"] == "":
        return "-"
    prefix = "" if row["speedup_reached"] else ">"
    return f"{prefix}{row['speedup']:.2f}x"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The per-task table: final loss (mean ± std over seeds), tuned rate, speed-up vs Adam."""
    lines = ["| task | held out | optimizer | final train loss | x best | tuned lr | "
             "speed-up vs tuned Adam |", "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lr = "" if r["learning_rate"] == "" else f"{r['learning_rate']:.3g}"
        if r["lr_at_grid_edge"] is True:
            lr += " (edge)"
        diverged = f" ({r['diverged_seeds']} diverged)" if r["diverged_seeds"] else ""
        lines.append(f"| {r['task']} | {'yes' if r['held_out'] else 'no'} | {r['optimizer']} | "
                     f"{r['final_loss']:.4g} ± {r['final_loss_std']:.2g}{diverged} | "
                     f"{r['vs_best']:.2f} | {lr} | {format_speedup(r)} |")
    return "\n".join(lines)


def profile_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[str], np.ndarray]:
    """``(tasks, optimizers, final_losses (tasks, optimizers))`` from :func:`result_rows` rows."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    names = list(dict.fromkeys(r["optimizer"] for r in rows))
    losses = np.full((len(tasks), len(names)), np.inf)
    for r in rows:
        losses[tasks.index(r["task"]), names.index(r["optimizer"])] = r["final_loss"]
    return tasks, names, losses


def plot_profile(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Performance profile (:func:`performance_profile`) of the rows' optimizers, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, names, losses = profile_table(rows)
    ratios = losses / losses.min(axis=1, keepdims=True)
    largest = float(np.max(ratios[np.isfinite(ratios)], initial=1.0))
    taus = np.geomspace(1.0, max(10.0, 1.5 * largest), 600)  # far enough for every curve
    rho = performance_profile(losses, taus)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in zip(names, rho, strict=True):
        ax.step(taus, curve, where="post", label=name,
                lw=2.2 if name in LEARNED else 1.2, ls="-" if name in LEARNED else "--")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("τ (final training loss within τ × the best on the task)")
    ax.set_ylabel(f"fraction of the {len(tasks)} tasks")
    ax.set_title(title or "performance profile")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Rows of :func:`result_rows` as CSV (columns in :data:`CSV_COLUMNS` order)."""
    with Path(path).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


CSV_COLUMNS = ("task", "held_out", "optimizer", "steps", "seeds", "final_loss", "final_loss_std",
               "diverged_seeds", "vs_best", "learning_rate", "lr_at_grid_edge", "speedup",
               "speedup_reached", "adam_steps_to_reach")


# --------------------------------------------------------------------------------------------
# The command-line shell: ``bilevel lopt eval``.


def eval_interval(steps: int, evals: int) -> int:
    """The smallest divisor ``d`` of ``steps`` with at most ``evals`` evaluations (``steps/d``)."""
    return next(d for d in range(1, steps + 1) if steps % d == 0 and steps // d <= evals)


def learned_factory(name: str, meta: dict, metadata: dict, safeguards: bool = True
                    ) -> Callable[[int], Any]:
    """``make(steps)`` for a learned optimizer from its meta-parameters and their metadata.

    ``make(steps)`` is :func:`bilevel.lopt.build_optimizer` told ``num_steps = steps`` (the true
    horizon; meta-parameters without fraction-of-training inputs ignore it), with the keyword
    arguments recorded at meta-training (``metadata["optimizer_kwargs"]``) and, unless
    ``safeguards=False``, the trust region and divergence guard of
    :mod:`bilevel.lopt.safeguards`: what a user of the optimizer gets.
    """
    from bilevel.lopt import ecosystem

    metadata = {**metadata, "optimizer": name}

    def make(steps: int):
        return ecosystem.build_optimizer(meta, metadata, num_steps=steps, safeguards=safeguards)

    make(1)  # fail now (a clear error) rather than after the baselines' runs
    return make


add_arguments = options.add_eval_arguments


#: What a --meta-params file must be.
_META_FILE = "an .npz written by bilevel lopt train or lopt.save_meta_params"


def _load_learned(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Callable]:
    """``{name: make(steps)}``; raises ValueError with a message for the user."""
    from bilevel import lopt

    safeguards = getattr(args, "safeguards", True)
    given = dict(args.meta_params or {})
    if "" in given:
        if len(names) != 1:
            raise ValueError(f"--meta-params: a bare PATH needs exactly one learned optimizer "
                             f"in --optimizers, got {len(names)}; use NAME=PATH")
        given = {names[0]: given[""]}
    extra = [n for n in given if n not in names]
    if extra:
        raise ValueError(f"--meta-params names {extra[0]}, which is not in --optimizers")
    makers = {}
    for name in names:
        if name in given:
            makers[name] = learned_from_file(name, given[name], safeguards)
        else:
            makers[name] = learned_factory(name, *lopt.pretrained(name), safeguards)
    return makers


def learned_from_file(name: str, path: Path, safeguards: bool = True) -> Callable[[int], Any]:
    """:func:`learned_factory` of the meta-parameters in ``path``, after checking that one
    update of the optimizer they make traces.

    Raises:
      ValueError: ``--meta-params: ...``, when ``path`` is missing or not a meta-parameter file
        for ``name`` (any other file: text, a pickle, an ``.npz`` of other arrays).
    """
    from bilevel import lopt

    if not Path(path).is_file():
        raise ValueError(f"--meta-params: no file {str(path)!r}")
    try:
        meta, metadata = lopt.load_meta_params(path)
    except Exception:  # any failure to read it means one thing to the user  # noqa: BLE001
        raise ValueError(f"--meta-params: {path} is not a meta-parameter file "
                         f"({_META_FILE})") from None
    if not meta or not isinstance(metadata, dict):
        raise ValueError(f"--meta-params: {path} is not a meta-parameter file ({_META_FILE}); "
                         f"it holds no meta-parameters")
    try:
        make = learned_factory(name, meta, metadata, safeguards)
        _trace_one_update(make(2))
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as error:
        reason = f"missing {error}" if isinstance(error, KeyError) else str(error)
        raise ValueError(f"--meta-params: {path} is not a {name} meta-parameter file "
                         f"({reason})") from None
    return make


def _trace_one_update(optimizer) -> None:
    """Trace (without running) one update on a small matrix and vector."""
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros((2,))}

    def update(params):
        state = optimizer.init(params)
        return optimizer.update(params, state, params, loss=jnp.zeros(()))

    jax.eval_shape(update, params)


def load_tasks(names: Sequence[str] | None, data_dir: Path | None
               ) -> tuple[list, list[tuple[str, str]]]:
    """The evaluation tasks ``names`` (``None``: all of :data:`bilevel.lopt.TASKS`) whose data
    are available, and ``(name, what is missing)`` for the others."""
    from bilevel.lopt.tasks import NEEDS_DATA_DIR, TASKS

    built, missing = [], []
    for name in TASKS if names is None else names:
        if name in NEEDS_DATA_DIR and data_dir is None:
            missing.append((name, "needs its dataset files: pass --data-dir"))
            continue
        try:
            built.append(TASKS[name](data_dir=data_dir))
        except ImportError as error:
            missing.append((name, options.install_hint(error)))
        except (OSError, ValueError) as error:
            missing.append((name, f"cannot read its data: {error}"))
    return built, missing


def _tasks_or_exit(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list:
    """Tasks whose data are there; explicit ``--tasks`` without their data exit with status 2,
    the default set skips them with a line each."""
    tasks, missing = load_tasks(args.tasks, args.data_dir)
    if missing and args.tasks is not None:
        name, why = missing[0]
        parser.error(f"--tasks: {name} {why}")
    for name, why in missing:
        print(f"skipping {name}: {why}", file=sys.stderr)
    if not tasks:
        parser.error("no evaluation task has its data; see the lines above")
    return tasks


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``bilevel lopt eval``: every optimizer on every task; tables, CSV and the profile plot."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    learned_names = [n for n in args.optimizers if n in LEARNED]
    baselines = [n for n in args.optimizers if n in BASELINES]
    try:
        makers = _load_learned(args, learned_names)
    except ValueError as error:
        parser.error(str(error))
    tasks = _tasks_or_exit(args, parser)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--out: cannot create {str(args.out)!r}: {error.strerror}")
    stderr = Console(stderr=True)
    progress = Progress(TextColumn("{task.description:<36}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=stderr, transient=True,
                        disable=not stderr.is_terminal)
    start, rows = time.perf_counter(), []
    with progress:
        bar = progress.add_task("", total=len(tasks) * len(args.optimizers))
        for task in tasks:
            steps = args.steps or task.horizon
            progress.update(bar, description=f"{task.name} ({steps} steps)")
            result = evaluate_task(task, makers, baselines, args.lrs, steps, args.seeds,
                                   eval_every=eval_interval(steps, args.evals),
                                   on_done=lambda name: progress.advance(bar))
            rows += result_rows(result, steps)
    write_csv(rows, args.out / "eval.csv")
    table = markdown_table(rows)
    (args.out / "eval.md").write_text(
        f"# Learned optimizers against tuned baselines\n\n{table}\n\n"
        f"Seeds {args.seeds}; baselines' grid {', '.join(f'{v:g}' for v in args.lrs)}; "
        f"final train loss = full-training-set loss after the last step (mean ± std over "
        f"seeds); speed-up = steps LR-tuned Adam needs to reach the optimizer's final loss / "
        f"its steps ('>' when no Adam run reached it: a lower bound; < 1: Adam is faster).\n")
    written = ["eval.csv", "eval.md"]
    if len(args.optimizers) > 1:
        plot_profile(rows, args.out / "profile.png")
        written.append("profile.png")
    print(table)
    print(f"wrote {', '.join(written)} to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0
