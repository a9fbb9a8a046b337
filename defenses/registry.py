"""Name -> defense. The orchestrator finds defenses only through here.

Every module of the ``defenses`` package is imported once and each ``Defense`` subclass with a
``name`` is registered, so adding a defense is adding one file."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import defenses
from defenses.base import Defense

_REGISTRY: dict[str, type[Defense]] = {}


def _discover() -> dict[str, type[Defense]]:
    if not _REGISTRY:
        for info in pkgutil.iter_modules(defenses.__path__):
            module = importlib.import_module(f"defenses.{info.name}")
            for obj in vars(module).values():
                if (inspect.isclass(obj) and issubclass(obj, Defense) and not inspect.isabstract(obj)
                        and obj.__module__ == module.__name__ and getattr(obj, "name", None)):
                    if obj.name in _REGISTRY:
                        raise RuntimeError(f"two defenses named {obj.name!r}")
                    _REGISTRY[obj.name] = obj
    return _REGISTRY


def names() -> list[str]:
    return sorted(_discover())


def get(name: str) -> type[Defense]:
    registry = _discover()
    if name not in registry:
        raise KeyError(f"unknown defense {name!r}; registered defenses: {', '.join(sorted(registry))}")
    return registry[name]
