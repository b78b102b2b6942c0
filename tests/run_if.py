"""Skip one test, not its whole module, when an optional package is missing (lightning-hydra-template's RunIf)."""

from __future__ import annotations

import importlib.util

import pytest


def RunIf(*packages: str, reason: str = "") -> pytest.MarkDecorator:  # noqa: N802 - a decorator, named as the template's
    """`@RunIf("tensorboard", reason="pip install 'diffusion_lab[tensorboard]'")`: skipped unless each can be imported."""
    missing = [p for p in packages if not installed(p)]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}: {reason}".rstrip(": "))


def installed(package: str) -> bool:
    """Whether `package` (dotted names too) can be imported, found without importing it."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a missing parent package
        return False
