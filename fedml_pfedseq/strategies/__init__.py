"""Federated methods, one module each: a server strategy and a client strategy.

A module registers its method by ending with ``METHOD = Method(name, Server, Client[, Args=...])``; every module of
this package is scanned, and it is the one list of methods (docs/adding-a-method.md). A method with settings of its
own names its ``algorithm_args`` dataclass, declared in :mod:`fedml_pfedseq.algorithm_args` so that checking a recipe
needs no torch (that module reads the ``METHOD`` lines without importing the strategies).
"""
from __future__ import annotations

import importlib
import pkgutil

from fedml_pfedseq.method import Method


def _discover() -> dict[str, Method]:
    found: dict[str, Method] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        method = getattr(importlib.import_module(f"{__name__}.{info.name}"), "METHOD", None)
        if method is not None:
            if method.name.lower() in found:
                raise ImportError(f"two modules register the method {method.name!r}")
            found[method.name.lower()] = method
    return found


METHODS: dict[str, Method] = _discover()


def method_class(name: str) -> Method:
    """The method registered under ``name`` (case-insensitive)."""
    if name.lower() not in METHODS:
        raise KeyError(f"names an unknown method {name!r}; known: {[m.name for m in METHODS.values()]}")
    return METHODS[name.lower()]
