"""The names ``bilevel ssl``'s options choose from, and its help formatter, importable without
JAX (``bilevel ssl --help`` reads them; :mod:`semisup.fixmatch` imports JAX and flax).

The tuples equal :mod:`semisup.fixmatch`'s and :mod:`semisup.protocol`'s of the same names
(a test checks it). ``--solver`` has no such tuple: its names are :data:`hvp.SOLVERS`' (see
:data:`semisup.fixmatch.SOLVERS`), which needs JAX, so the command checks it after parsing.
"""

from __future__ import annotations

from bilevel.argtypes import DefaultsHelpFormatter

METHODS = ("supervised", "fixmatch", "oracle", "softmax", "l2rw", "confnet")
CURVATURES = ("last", "all")
CONF_INPUTS = ("image", "image+softmax")
META_OPTIMIZERS = ("adam", "sgd")
META_DATA = ("validation", "labelled")
DESIGNS = ("add", "swap")
#: ``--dataset``: the in-distribution sets ``bilevel ssl train`` accepts.
DATASETS = ("digits", "mnist5k", "mnist", "fashion_mnist", "cifar10")
#: ``--model`` -> (convolution widths, hidden width) of :class:`semisup.models.Body`.
MODELS = {"mlp": ((), 64), "cnn": ((16, 32), 64)}


HelpFormatter = DefaultsHelpFormatter
