"""Learned optimizers: the per-parameter MLP (``small_fc_lopt``), STAR and the VeLO-style
hierarchy, as optax transformations, with the tasks they are meta-trained and evaluated on, and
the safeguards (a trust region and a divergence guard) that keep them from diverging.

The public API is what this module exports; everything else may change.

Submodules are imported on first use (PEP 562), so that the command line's option
declarations (:mod:`bilevel.lopt.options`, and with them ``bilevel lopt --help``) do not pay
for importing JAX.

>>> from bilevel import lopt
>>> opt = lopt.pretrained_optimizer("star_lopt", num_steps=1000)  # doctest: +SKIP
>>> meta, metadata = lopt.pretrained("star_lopt")                 # doctest: +SKIP
>>> opt = lopt.star_lopt(meta, 1000, **metadata["optimizer_kwargs"])  # the same  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bilevel.lazy import attach

#: Public name -> the module that defines it.
_EXPORTS = {
    "TrainState": "bilevel.lopt.ecosystem",
    "build_optimizer": "bilevel.lopt.ecosystem",
    "pretrained_optimizer": "bilevel.lopt.ecosystem",
    "LOptState": "bilevel.lopt.optimizers",
    "available_pretrained": "bilevel.lopt.optimizers",
    "init_mlp_lopt": "bilevel.lopt.optimizers",
    "init_star_lopt": "bilevel.lopt.optimizers",
    "load_meta_params": "bilevel.lopt.optimizers",
    "mlp_lopt": "bilevel.lopt.optimizers",
    "num_meta_params": "bilevel.lopt.optimizers",
    "pretrained": "bilevel.lopt.optimizers",
    "save_meta_params": "bilevel.lopt.optimizers",
    "star_lopt": "bilevel.lopt.optimizers",
    "SafeguardState": "bilevel.lopt.safeguards",
    "safeguarded": "bilevel.lopt.safeguards",
    "TASKS": "bilevel.lopt.tasks",
    "Task": "bilevel.lopt.tasks",
    "sample_task": "bilevel.lopt.tasks",
    "VeLOState": "bilevel.lopt.velo",
    "init_velo_lopt": "bilevel.lopt.velo",
    "velo_lopt": "bilevel.lopt.velo",
}
#: Submodules reachable as attributes (``lopt.tasks``); ``optimizers``, ``safeguards`` and
#: ``velo`` too, as when this module imported them eagerly.
_SUBMODULES = ("optimizers", "safeguards", "tasks", "velo")

__all__ = sorted([*_EXPORTS, "tasks"])


__getattr__, __dir__ = attach(__name__, _EXPORTS, _SUBMODULES)


if TYPE_CHECKING:  # pragma: no cover
    from bilevel.lopt import tasks  # noqa: F401
    from bilevel.lopt.ecosystem import (  # noqa: F401
        TrainState,
        build_optimizer,
        pretrained_optimizer,
    )
    from bilevel.lopt.optimizers import (  # noqa: F401
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
    from bilevel.lopt.safeguards import SafeguardState, safeguarded  # noqa: F401
    from bilevel.lopt.tasks import TASKS, Task, sample_task  # noqa: F401
    from bilevel.lopt.velo import VeLOState, init_velo_lopt, velo_lopt  # noqa: F401
