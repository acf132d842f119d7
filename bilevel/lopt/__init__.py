"""Learned optimizers: the per-parameter MLP (``small_fc_lopt``), STAR and the VeLO-style
hierarchy, as optax transformations, with the tasks they are meta-trained and evaluated on.

The public API is what this module exports; everything else may change.

>>> from bilevel import lopt
>>> meta, metadata = lopt.pretrained("star_lopt")               # doctest: +SKIP
>>> opt = lopt.star_lopt(meta, **metadata["optimizer_kwargs"])   # doctest: +SKIP
"""

from bilevel.lopt import tasks
from bilevel.lopt.optimizers import (
    LOptState,
    available_pretrained,
    init_mlp_lopt,
    init_star_lopt,
    load_meta_params,
    mlp_lopt,
    num_meta_params,
    pretrained,
    save_meta_params,
    star_lopt,
)
from bilevel.lopt.tasks import TASKS, Task, sample_task
from bilevel.lopt.velo import VeLOState, init_velo_lopt, velo_lopt

__all__ = [
    "TASKS",
    "LOptState",
    "Task",
    "VeLOState",
    "available_pretrained",
    "init_mlp_lopt",
    "init_star_lopt",
    "init_velo_lopt",
    "load_meta_params",
    "mlp_lopt",
    "num_meta_params",
    "pretrained",
    "sample_task",
    "save_meta_params",
    "star_lopt",
    "tasks",
    "velo_lopt",
]
