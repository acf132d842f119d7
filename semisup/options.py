"""The names :class:`semisup.Config`, :func:`semisup.make_split` and ``bilevel ssl`` choose from,
declared once, importable without JAX (``bilevel ssl --help`` reads them; the modules that train
import JAX and flax).

The methods are the names of :data:`semisup.WEIGHTINGS` (:mod:`semisup.weighting`, also
JAX-free). ``--solver`` has no tuple here: its names are :data:`hvp.SOLVERS`' (see
:data:`semisup.solvers.SOLVERS`), which need JAX, so the command checks it after parsing.
"""

from __future__ import annotations

from bilevel.argtypes import DefaultsHelpFormatter

#: ``Config.curvature``: the Hessian of the head (``"last"``) or of the whole classifier.
CURVATURES = ("last", "all")
#: ``Config.conf_inputs``: what the confidence network reads.
CONF_INPUTS = ("image", "image+softmax")
#: ``Config.meta_optimizer``.
META_OPTIMIZERS = ("adam", "sgd")
#: ``Config.meta_data``: the meta loss's labelled images.
META_DATA = ("validation", "labelled")
#: ``make_split(design=...)``: OOD images added to a fixed ID pool, or swapped in.
DESIGNS = ("add", "swap")
#: ``--dataset``: the in-distribution sets ``bilevel ssl train`` accepts.
DATASETS = ("digits", "mnist5k", "mnist", "fashion_mnist", "cifar10")
#: ``--model`` -> (convolution widths, hidden width) of :class:`semisup.models.Body`.
MODELS = {"mlp": ((), 64), "cnn": ((16, 32), 64)}


HelpFormatter = DefaultsHelpFormatter
