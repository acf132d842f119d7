"""Pieces the semi-supervised studies share: seed-stacked splits, vmapped runs, tables."""

from __future__ import annotations

import csv
import json
import math
import platform
import time
from pathlib import Path

import jax
import numpy as np
from rich.progress import Progress

from bilevel import datasets
from experiments._common import ROOT, cpu_model, git_commit
from semisup import fixmatch, metrics, protocol

RESULTS = ROOT / "experiments" / "results" / "ssl"
# Read when a script starts (it may run for an hour while the tree moves on), and blind to the
# results a run writes.
_CODE_AT_START = git_commit("semisup", "experiments", ":(exclude)experiments/results")


def splits(dataset: datasets.Dataset, seeds: list[int], **kwargs) -> protocol.Split:
    """One split per seed, stacked along a leading axis."""
    return protocol.stack_splits([protocol.make_split(dataset, seed=s, **kwargs) for s in seeds])


def for_method(data: protocol.Split, config: fixmatch.Config) -> protocol.Split:
    """Equal label budgets: runs without a use for the validation set train on it."""
    if config.uses_validation:
        return data
    merged = [protocol.merge_validation(protocol.Split(*(np.asarray(a)[i] for a in data)))
              for i in range(np.asarray(data.y_labelled).shape[0])]
    return protocol.stack_splits(merged)


def initial_states(config: fixmatch.Config, data: protocol.Split, seeds: list[int]
                   ) -> fixmatch.State:
    """The stacked initial states of ``seeds`` (keys ``1000 + seed``, shared by every study)."""
    return fixmatch.init_seeds(config, [jax.random.key(1000 + s) for s in seeds], data)


def run_arm(config: fixmatch.Config, data: protocol.Split, seeds: list[int], label: str,
            progress: Progress | None = None, merge: bool = True
            ) -> tuple[list[dict], fixmatch.State, float]:
    """Train ``config`` on every seed at once (vmapped); metrics per seed, states, seconds.

    ``merge``: methods without a use for the validation set train on it (equal label budgets);
    ``False`` leaves it out of their training set."""
    if merge:
        data = for_method(data, config)
    states = initial_states(config, data, seeds)
    task = progress.add_task(label, total=config.periods) if progress else None
    start = time.perf_counter()
    states, _ = fixmatch.run_seeds(
        config, states, data, config.periods,
        callback=(lambda _: progress.advance(task)) if progress else None)
    jax.block_until_ready(states)
    seconds = time.perf_counter() - start
    results = []
    for i in range(len(seeds)):
        one = jax.tree_util.tree_map(lambda a, i=i: np.asarray(a)[i], data)
        results.append(metrics.evaluate(config, fixmatch.unstack(states, i), one))
    if progress:
        progress.remove_task(task)
    return results, states, seconds


def mean_std(values) -> str:
    values = np.asarray(values, np.float64)
    if np.all(np.isnan(values)):
        return "n/a"
    return f"{np.nanmean(values):.3f} ± {np.nanstd(values, ddof=1) if len(values) > 1 else 0:.3f}"


def paired(a, b) -> str:
    mean, low, high = metrics.paired_difference(a, b)
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]" if not math.isnan(low) else f"{mean:+.3f}"


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)


def machine(**extra) -> dict:
    """The machine, versions and the code's commit (as the script started) for a results file."""
    commit = _CODE_AT_START
    return {"cpu": cpu_model(), "python": platform.python_version(), "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()],
            "commit": commit[0] if commit else None,
            "uncommitted_changes": commit[1] if commit else None, **extra}


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))
