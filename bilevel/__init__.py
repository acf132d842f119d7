"""bilevel: hypergradients (implicit, unrolled, ES) built on :mod:`hvp`.

The hypergradient entry points are added here as they land; until then the package holds no
public names.
"""

__all__: list[str] = []
