"""Lazy package attributes (PEP 562): a package names its public API and its submodules, and each
is imported on first use, so that importing the package (and a command's ``--help``) does not pay
for JAX.

>>> __getattr__, __dir__ = attach(__name__, {"train": "mypkg.trainer"}, ("checkpoint",))

``exports`` maps a public name to the module that defines it, or to ``(module, attribute)`` where
the two names differ. A value is cached in the package's namespace on first use. Imports nothing
beyond the standard library.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["attach"]


def attach(package: str, exports: Mapping[str, str | tuple[str, str]],
           submodules: Iterable[str] = ()) -> tuple[Callable[[str], Any], Callable[[], list]]:
    """``(__getattr__, __dir__)`` for ``package``'s module namespace.

    Args:
      package: the package's ``__name__``.
      exports: public name -> defining module, or -> ``(module, attribute)``.
      submodules: names of submodules reachable as attributes (``package.name``).
    """
    submodules = tuple(submodules)

    def __getattr__(name: str) -> Any:
        if name in exports:
            where = exports[name]
            module, attribute = (where, name) if isinstance(where, str) else where
            value = getattr(importlib.import_module(module), attribute)
        elif name in submodules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        # Through the namespace, not setattr: a package may guard its setattr (bilevel does).
        vars(sys.modules[package])[name] = value
        return value

    def __dir__() -> list[str]:
        namespace = vars(sys.modules[package])
        return sorted(set(namespace) | set(namespace.get("__all__", ())))

    return __getattr__, __dir__
