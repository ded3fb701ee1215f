"""Lazy public names: a package lists ``name -> module`` and imports the module on first use.

``import lmatlas`` (and ``lmatlas.infer``, ``lmatlas.edit``) must stay light so the command line
starts quickly; torch and transformers load only when a name that needs them is first read::

    # in a package's __init__.py
    _LAZY = {"Model": "lmatlas.model.handle"}
    __getattr__, __dir__ = lazy_exports(__name__, _LAZY)

The first lookup imports the module and stores the value in the package's namespace, so later
lookups never reach ``__getattr__`` again (PEP 562).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, table: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module ``__getattr__`` and ``__dir__`` for ``package`` serving the names of ``table``.

    Args:
        package: the package's ``__name__``.
        table: public name -> module that defines it.
    """

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__
