"""Import helpers: the object a dotted `_target_` names (ConfigError when none does); names that moved."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


class ConfigError(ValueError):
    """A config value of the wrong type, or a key its constructor does not take."""


def locate(path: str) -> Any:
    """The object a dotted `_target_` names (module attribute, possibly nested); ConfigError if none."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and (module == e.name or module.startswith(e.name + ".")):
                continue  # not a module: try the parent; a module that fails inside raises as it is
            raise
        try:
            for name in parts[i:]:
                obj = getattr(obj, name)
        except AttributeError:
            break
        return obj
    raise ConfigError(f"cannot import _target_ {path!r}")


def moved(module: str, homes: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for names that left `module` ({new module: "name name ..."}): ImportError naming the
    new home (no silent alias)."""
    names = {name: home for home, listed in homes.items() for name in listed.split()}

    def __getattr__(name: str) -> Any:
        if name in names:
            raise ImportError(f"{module}.{name} moved: import it from {names[name]}")
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
