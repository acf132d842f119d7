"""semisup: semi-supervised learning with meta-learned confidence weights.

Named ``semisup`` rather than ``ssl``: a top-level package called ``ssl`` shadows Python's
standard ``ssl`` module whenever the repository root is on ``sys.path`` (pytest, ``python -m``),
and ``import flax`` then fails inside asyncio.
"""

__all__: list[str] = []
