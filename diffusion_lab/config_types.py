"""Config values vs constructor types: every wrong-typed value or unknown key of a resolved config, in one line."""

from __future__ import annotations

import collections.abc
import difflib
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import torch

from diffusion_lab.imports import ConfigError, locate
from diffusion_lab.renamed import renamed_keys

HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")


def _type_hints(target: Any) -> tuple[dict[str, Any], set[str] | None]:
    """(annotation per argument, accepted names or None when it takes **kwargs) of a class or function."""
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return {}, None
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: check names only
        hints = {}
    names = None
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        names = {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL}
    return hints, names


def matches(value: Any, hint: Any) -> bool | None:
    """Whether a plain config value fits an annotation: True, False, or None (cannot tell: not checked)."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        results = [matches(value, a) for a in args]
        return True if True in results else (None if None in results else False)
    if origin is typing.Literal:
        return value in args and type(value) in {type(a) for a in args}
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is torch.Tensor and isinstance(value, (str, bool, list, tuple, Mapping)):
        return False  # a config never holds a tensor: `lr: float | Tensor` given a word is wrong
    if isinstance(value, Mapping) and "_target_" in value:
        return None  # an object built by instantiate
    seq = (list, tuple, collections.abc.Sequence)
    if hint in seq or origin in seq:
        if not isinstance(value, (list, tuple)):
            return False
        item = args[0] if args and (origin is not tuple or len(args) == 2 and args[1] is Ellipsis) else None
        found = [matches(v, item) for v in value] if item is not None else []
        return False if False in found else True
    if hint in (dict, Mapping) or origin in (dict, collections.abc.Mapping):
        return isinstance(value, Mapping)
    return None


def _positive(v: float) -> bool:
    return math.isfinite(v) and v > 0


# what a value of these arguments must be, whichever constructor takes them (counts, sizes, rates, shares)
LIMITS: dict[str, tuple[str, Callable[[float], bool]]] = {
    **dict.fromkeys(
        (
            "image_size",
            "channels",
            "in_channels",
            "batch_size",
            "base_channels",
            "num_heads",
            "num_res_blocks",
            "num_classes",
            "steps",
            "num_samples",
            "num_per_class",
            "every_n_steps",
            "patch_size",
            "depth",
            "dim",
        ),
        (">= 1", lambda v: v >= 1),
    ),
    **dict.fromkeys(("lr", "shift", "decay"), ("> 0", _positive)),
    **dict.fromkeys(("num_workers", "weight_decay"), (">= 0", lambda v: math.isfinite(v) and v >= 0)),
    **dict.fromkeys(("dropout", "cond_drop_prob"), ("in [0, 1)", lambda v: 0 <= v < 1)),
}
NON_EMPTY = ("channel_mult",)


def _out_of_limits(name: str, value: Any) -> str | None:
    """What `value` of an argument called `name` must be, when it is not (see LIMITS), else None."""
    if name in NON_EMPTY and isinstance(value, (list, tuple)) and not value:
        return "a non-empty list"
    if name not in LIMITS or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    what, ok = LIMITS[name]
    return None if ok(value) else what


def _suggest(key: str, names: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(names), n=3)
    if close:
        return "did you mean " + " or ".join(close) + "?"
    return "it takes: " + ", ".join(sorted(names)) if len(names) <= 20 else f"see its {len(names)} arguments"


def _describe(hint: Any) -> str:
    text = str(hint).replace("typing.", "").replace("NoneType", "None")
    return getattr(hint, "__name__", text) if not typing.get_args(hint) else text


def config_errors(node: Any, key: str = "") -> list[str]:
    """Every wrong-typed value or unknown key of the `_target_` nodes in a resolved config (plain dicts)."""
    errors: list[str] = []
    if isinstance(node, Mapping):
        if isinstance(node.get("_target_"), str):
            try:
                target = locate(node["_target_"])
            except ConfigError as e:
                return [f"{key or '<root>'}: {e}"]
            hints, names = _type_hints(target)
            name = getattr(target, "__qualname__", node["_target_"])
            for k, v in node.items():
                if k in HYDRA_KEYS:
                    continue
                where = f"{key}.{k}" if key else str(k)
                if names is not None and k not in names:
                    hint = _suggest(str(k), names)
                    if not hint.startswith(
                        "did you mean"
                    ):  # e.g. an experiment's UNet setting under model/net=dit_*
                        hint += f"; a config setting it for another {key.rsplit('.', 1)[-1] or 'target'} is undone by '~{where}'"
                    errors.append(f"{where} is not an argument of {name} ({hint})")
                elif k in hints and matches(v, hints[k]) is False:
                    errors.append(f"{where}={v!r} has the wrong type: {name} expects {_describe(hints[k])}")
                elif (limit := _out_of_limits(str(k), v)) is not None:
                    errors.append(f"{where}={v!r} is out of range: {name} needs {limit}")
        for k, v in node.items():
            if k not in HYDRA_KEYS:
                errors += config_errors(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            errors += config_errors(v, f"{key}[{i}]")
    return errors


def check_config(config: Mapping[str, Any]) -> None:
    """ConfigError listing every value that does not fit its constructor's annotation (one line)."""
    errors = renamed_keys(config) + config_errors(config)
    if errors:
        raise ConfigError("invalid config: " + "; ".join(errors))
