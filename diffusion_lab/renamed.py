"""Config names that changed (one name per concept): an override that uses the old one fails in one line."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

RENAMED_KEYS = {  # old override key (a config group or a dotted key) -> the new one
    "noise": "process",
    "model.prediction_type": "model.objective",
    "sampler.spacing": "sampler/grid (e.g. sampler/grid=trailing)",
    "sampler.clip_x0": "model.clip_x0 (the data space decides)",
}


def renamed_override(overrides: Sequence[str]) -> str | None:
    """The one-line error for the first command-line override that uses a former name, else None."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~").removeprefix("/").split("@", 1)[0]
        if key in RENAMED_KEYS:
            return f"{key} was renamed: use {RENAMED_KEYS[key]} (in {override!r})"
    return None


def renamed_keys(config: Mapping[str, Any]) -> list[str]:
    """One error per former key a composed config still sets (e.g. an experiment file written before a rename)."""
    errors = []
    for old, new in RENAMED_KEYS.items():
        node: Any = config
        for part in old.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            errors.append(f"{old} was renamed: use {new}")
    return errors


def exit_on_renamed(overrides: Sequence[str]) -> None:
    """In a CLI, before Hydra composes the config: `error: <old> was renamed: use <new>` and exit 1."""
    if message := renamed_override(overrides):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
