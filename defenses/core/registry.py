"""Name -> defense. The orchestrator finds defenses only through here.

Every top-level module of the ``defenses`` package is one defense (the library lives in its
subpackages): each is imported once and its ``Defense`` subclass with a ``name`` registered,
so adding a defense is adding one file. A top-level module that defines none is an error."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import defenses
from defenses.core.base import Defense

_REGISTRY: dict[str, type[Defense]] = {}


class RegistryError(RuntimeError):
    """The defenses package breaks its layout rule (one defense per top-level module)."""


def _discover() -> dict[str, type[Defense]]:
    if not _REGISTRY:
        found: dict[str, type[Defense]] = {}
        for info in pkgutil.iter_modules(defenses.__path__):
            if info.ispkg:  # the library: core, attacks, evaluation, saliency
                continue
            module = importlib.import_module(f"defenses.{info.name}")
            own = [obj for obj in vars(module).values()
                   if inspect.isclass(obj) and issubclass(obj, Defense) and not inspect.isabstract(obj)
                   and obj.__module__ == module.__name__ and getattr(obj, "name", None)]
            if not own:
                raise RegistryError(f"defenses/{info.name}.py defines no defense (a registered Defense "
                                    "subclass with a name); library code goes into a subpackage "
                                    "(defenses/core, attacks, evaluation, saliency), and a file left "
                                    "from an older checkout (rsync never deletes) is to be removed")
            for obj in own:
                if obj.name in found:
                    raise RegistryError(f"two defenses named {obj.name!r}")
                found[obj.name] = obj
        _REGISTRY.update(found)
    return _REGISTRY


def names() -> list[str]:
    return sorted(_discover())


def get(name: str) -> type[Defense]:
    registry = _discover()
    if name not in registry:
        raise KeyError(f"unknown defense {name!r}; registered defenses: {', '.join(sorted(registry))}")
    return registry[name]
