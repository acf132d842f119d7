"""bilevel: hypergradients (implicit, unrolled, ES) built on :mod:`hvp`.

The public API is what this module exports; everything else may change.
"""

from bilevel.implicit import HypergradInfo, hypergrad, implicit
from bilevel.unrolled import UnrolledInfo, unrolled_hypergrad

__all__ = [
    "HypergradInfo",
    "UnrolledInfo",
    "hypergrad",
    "implicit",
    "unrolled_hypergrad",
]
