"""Checks that turn bad input into one-line causes: config values vs constructor types, model vs data, CLI errors."""

from __future__ import annotations

import collections.abc
import difflib
import importlib
import inspect
import logging
import math
import os
import sys
import tempfile
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from diffusion_lab.nets.base import DenoisingNet

log = logging.getLogger(__name__)

HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")
TRACEBACK_ENV = "DIFFUSION_LAB_TRACEBACK"


class ConfigError(ValueError):
    """A config value of the wrong type, or a key its constructor does not take."""


# ------------------------------------------------------------------------------------ config types
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
    errors = config_errors(config)
    if errors:
        raise ConfigError("invalid config: " + "; ".join(errors))


# ------------------------------------------------------------------------------------- model vs data
def check_model_fits_data(model: torch.nn.Module, datamodule: Any) -> None:
    """ConfigError (one line) when the model cannot take the data: a UNet that cannot halve the input size as
    often as it has levels (the skip connections would not line up, or pixels be dropped), or fewer class
    embeddings than the data has classes (higher labels would index past the table or hit the null class)."""
    net = getattr(model, "net", None)
    shape = getattr(model, "sample_shape", None)
    if isinstance(net, DenoisingNet) and shape is not None:
        factor = net.input_multiple
        h, w = shape[-2:]
        if h % factor or w % factor:
            size = getattr(datamodule, "image_size", None)
            where = f"data.image_size={size} gives" if size == h else "the data gives"
            mult = (getattr(net, "init_kwargs", None) or {}).get("channel_mult")
            why = (
                f"which this UNet cannot halve {len(mult) - 1} time(s) (model.net.channel_mult={list(mult)})"
                if mult
                else f"which this {type(net).__name__} cannot cut into {factor}x{factor} patches"
                f" (model.net.patch_size={factor})"
            )
            raise ConfigError(
                f"{where} {h}x{w} inputs, {why}: use a multiple of {factor}, e.g. {-(-h // factor) * factor}"
            )
    ours, theirs = getattr(model, "num_classes", None), getattr(datamodule, "num_classes", None)
    if ours is not None and theirs is not None and ours < theirs:
        raise ConfigError(
            f"model.net.num_classes={ours} is smaller than the data's {theirs} classes (labels 0..{theirs - 1}):"
            f" set it to {theirs} (or null for an unconditional model)"
        )
    if ours is not None and theirs and ours > theirs:  # the extra classes would never be trained, yet sampled
        raise ConfigError(
            f"model.net.num_classes={ours} but the data has {theirs} classes (labels 0..{theirs - 1}):"
            f" set model.net.num_classes={theirs} (or null for an unconditional model)"
        )


# ------------------------------------------------------------------------------------------ output
def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create `path` and check a file can be written in it; ValueError with the OS's reason if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"cannot write the {what} {path}: {e.strerror or e}") from e
    return path


def file_argument(value: Any, key: str) -> str:
    """A CLI argument that names a file, as a string; ValueError naming `key` when it is no path at all."""
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ValueError(f"{key} must be a file path, got {value!r}")
    return str(value)


# ---------------------------------------------------------------------------------------- CLI errors
def one_line(error: BaseException) -> str:
    """The error's message on one line; wrapper errors (Hydra's InstantiationException) show their cause."""
    cause = error.__cause__
    text = " ".join(str(error).split())
    if type(error).__name__ == "InstantiationException" and cause is not None:
        target = text.split("'")[1] if text.count("'") >= 2 else ""
        return f"{target}: {one_line(cause)}" if target else one_line(cause)
    if not text:
        text = type(error).__name__
    return text


@contextmanager
def exit_on_user_error(
    extra: tuple[type[BaseException], ...] = (), *, reraise: bool = False
) -> Iterator[None]:
    """In a CLI: log `error: <one-line cause>` and exit 1 on a user-facing error (bad config, data, checkpoint).

    `DIFFUSION_LAB_TRACEBACK=1` (or `HYDRA_FULL_ERROR=1`) re-raises, for the full traceback; so does
    `reraise=True` after logging (a Hydra sweep records the failed job and runs the others)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from diffusion_lab.callbacks.nan_guard import NonFiniteTrainingError
    from diffusion_lab.data.base import DataError

    try:
        yield
    except (ValueError, DataError, NonFiniteTrainingError, MisconfigurationException, *extra) as e:
        if os.environ.get(TRACEBACK_ENV, "0") not in ("", "0") or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("error: %s", one_line(e))
        if reraise:  # a sweep records the failed job; Hydra prints this message, not a traceback
            from hydra.errors import CompactHydraException

            raise CompactHydraException("(each failed job of the sweep logged its cause above)") from e
        sys.exit(1)
