"""The one reader of checkpoints: verify and read a file, rebuild a system, autoencoder, classifier or text encoder."""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import pickle
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch

from diffusion_lab.files import CorruptFileError, verify_checksum
from diffusion_lab.imports import locate
from diffusion_lab.nets.autoencoder import AutoencoderKL
from diffusion_lab.nets.classifier import ConvClassifier

log = logging.getLogger(__name__)
T = TypeVar("T")

CHECKPOINT_KEY = "diffusion_lab"  # the block holding the resolved run config (callbacks.run_config.RunConfig)
AUTOENCODER_KEY = "autoencoder"  # the self-contained block a stage-1 (or latent) checkpoint carries
AUTOENCODER_FORMAT = "diffusion_lab.AutoencoderKL/1"
RENAMED_MODEL_KEYS = {"schedule": "process", "prediction_type": "objective"}  # in stored model configs
DIFFUSION_SYSTEM = "diffusion_lab.systems.diffusion.DiffusionSystem"  # named, not imported: systems sit above
CLASSIFIER_SYSTEM = "diffusion_lab.systems.classifier.ClassifierSystem"
CLASSIFIER_NET = "diffusion_lab.nets.classifier.ConvClassifier"
TRAIN_CLASSIFIER_HINT = (
    "Train one with `python -m diffusion_lab.train experiment=digits_classifier` (or "
    "fashion_mnist_classifier) and pass its <run>/checkpoints/last.ckpt"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used or written: missing, truncated, not ours, not matching the model."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No file at the checkpoint path."""


def read_checkpoint(
    path: str | os.PathLike,
    *,
    what: str = "checkpoint",
    hint: str = "",
    mmap: bool = False,
    map_location: Any = "cpu",
) -> dict[str, Any]:
    """A checkpoint file as a dict, its SHA-256 verified when one was written beside it (files without one pass);
    CheckpointError (one line) when missing, changed on disk, truncated or not a dict. `mmap`: tensors stay
    memory-mapped (cheap for metadata, config and shapes).

    Read weights-only (`torch.load(weights_only=True)`: tensors and plain Python values, which is all this
    framework writes): a file whose pickle names anything else (a class, a function: code that unpickling would
    run) is refused with UnsafeCheckpointError naming it, unless `trusted_checkpoints(True)` is in force (the
    entry points' `trust_checkpoint=true`). A `.safetensors` export (`diffusion_lab.export`) reads as the
    checkpoint it was made from, without its training state."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointNotFound(f"{what} not found: {path}" + (f". {hint}." if hint else ""))
    try:
        verify_checksum(path)
    except CorruptFileError as e:
        raise CheckpointError(f"checkpoint {e}") from e
    if path.suffix == SAFETENSORS_SUFFIX:
        return read_safetensors(path, what=what, map_location=map_location)
    trust = checkpoints_trusted()
    if trust:
        log.warning(
            "trust_checkpoint=true: loading %s with full unpickling, which runs any code the file carries",
            path,
        )
    try:
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=not trust, mmap=mmap)
        except RuntimeError as e:  # mmap needs the zip format (torch >= 1.6); an older file is read whole
            if not mmap or "mmap" not in str(e):
                raise
            ckpt = torch.load(path, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from e
        raise refusal(path, e, what=what) from None
    except Exception as e:  # truncated, not a torch file, ...
        raise CheckpointError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a training checkpoint (it holds a {type(ckpt).__name__})")
    return ckpt


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle needs more than weights-only loading allows (it could run code)."""


_trust_checkpoints = False  # set by `trusted_checkpoints` (the entry points' trust_checkpoint=true)


def checkpoints_trusted() -> bool:
    """Whether checkpoints are read with full unpickling now (`trusted_checkpoints(True)` in force)."""
    return _trust_checkpoints


_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


@contextmanager
def trusted_checkpoints(trust: bool) -> Iterator[None]:
    """Within this block, `read_checkpoint` unpickles fully (`trust`) or weights-only (the default)."""
    global _trust_checkpoints
    if not isinstance(trust, bool):
        raise ValueError(f"trust_checkpoint must be true or false, got {trust!r}")
    before, _trust_checkpoints = _trust_checkpoints, trust
    try:
        yield
    finally:
        _trust_checkpoints = before


def trust_from_config(entry: Callable[..., T]) -> Callable[..., T]:
    """Decorator for an entry point whose first argument is its config: runs it with `trust_checkpoint`
    (default false) in force for every checkpoint it reads (ckpt, guide, classifier, autoencoder, text encoder)."""

    @functools.wraps(entry)
    def run(cfg, *args: Any, **kwargs: Any) -> T:
        with trusted_checkpoints(cfg.get("trust_checkpoint", False)):
            return entry(cfg, *args, **kwargs)

    return run


def refusal(path: str | os.PathLike, error: BaseException, *, what: str = "checkpoint") -> CheckpointError:
    """The one-line error for a file that weights-only loading rejected: UnsafeCheckpointError naming the global
    it wanted to unpickle (a class, a function); else (bytes that are no pickle at all) CheckpointError."""
    text = str(error)
    if m := _GLOBAL.search(text):
        return UnsafeCheckpointError(
            f"refusing to load {what} {path}: it wants to unpickle the global {m.group(1)!r}, which is not a tensor"
            " or a plain value (unpickling it could run code). Load it only if you trust who made the file:"
            " trust_checkpoint=true"
        )
    detail = " ".join(
        text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0].split()
    )
    return CheckpointError(f"cannot read {what} {path}: not a checkpoint (weights-only unpickler: {detail})")


# ------------------------------------------------------------------------------------ safetensors
SAFETENSORS_SUFFIX = ".safetensors"
SAFETENSORS_FORMAT = "diffusion_lab.export/1"
EXPORT_KEYS = ("state_dict", CHECKPOINT_KEY, AUTOENCODER_KEY, "global_step", "epoch", "phema")
TRAINING_STATE = (  # what a checkpoint for sampling leaves out (exports, post-hoc EMA reconstructions)
    "optimizer_states",
    "lr_schedulers",
    "callbacks",
    "loops",
    "current_model_state",
    "averaging_state",
)


def to_safetensors(ckpt: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a sampling checkpoint's `EXPORT_KEYS`: every tensor under its path of keys joined
    by "/" (`state_dict/net.conv_in.weight`), stored once when several entries are the same tensor (a latent
    model's autoencoder weights sit in `state_dict` and in the `autoencoder` block); the rest as JSON."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()

    def walk(node: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        out = {}
        for k, v in node.items():
            if not isinstance(k, str) or "/" in k:
                raise CheckpointError(
                    f"cannot export the key {k!r} under {prefix!r}: keys must be texts without '/'"
                )
            name = f"{prefix}/{k}" if prefix else k
            if isinstance(v, Mapping):
                out[k] = walk(v, name)
            elif not isinstance(v, torch.Tensor):
                out[k] = v
            elif (
                same := (v.untyped_storage().data_ptr(), v.storage_offset(), v.shape, v.stride(), v.dtype)
            ) in seen:
                aliases[name] = seen[same]
            else:  # safetensors stores no shared or strided memory: a view of a stored storage is copied
                t = v.detach().cpu()
                tensors[name] = t.clone() if same[0] in storages or not t.is_contiguous() else t
                seen[same] = name
                storages.add(same[0])
        return out

    rest = walk({k: ckpt[k] for k in EXPORT_KEYS if k in ckpt}, "")
    try:
        text = json.dumps(rest)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot export the checkpoint's config and metadata as JSON: {e}") from e
    metadata = {"format": SAFETENSORS_FORMAT, "checkpoint": text, "aliases": json.dumps(aliases)}
    return tensors, metadata


def from_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, Any]:
    """The checkpoint dict `to_safetensors` took apart."""
    ckpt = json.loads(metadata["checkpoint"])
    aliases = json.loads(metadata.get("aliases") or "{}")
    for name in [*tensors, *aliases]:
        *parents, leaf = name.split("/")
        node = ckpt
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = tensors[aliases.get(name, name)]
    return ckpt


def read_safetensors(path: Path, *, what: str = "checkpoint", map_location: Any = "cpu") -> dict[str, Any]:
    """A `diffusion_lab.export` file as the sampling checkpoint it holds (tensors, run config, autoencoder block)."""
    from safetensors import SafetensorError, safe_open

    device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from e
    if metadata.get("format") != SAFETENSORS_FORMAT:
        raise CheckpointError(
            f"{path} is not a diffusion_lab export (metadata format {metadata.get('format')!r}, expected"
            f" {SAFETENSORS_FORMAT!r}): write one with `python -m diffusion_lab.export ckpt=... out=...`"
        )
    return from_safetensors(tensors, metadata)


def run_config(ckpt: Mapping[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """The resolved run config a diffusion_lab training run stored in its checkpoint."""
    if CHECKPOINT_KEY not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path} is not a diffusion_lab training checkpoint (no '{CHECKPOINT_KEY}' config block)"
        )
    return ckpt[CHECKPOINT_KEY]["config"]


# ------------------------------------------------------------------------------------ state dicts
def state_mismatch(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    """Short description of how a state_dict differs from a module's (shapes, missing, unexpected keys)."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es), e.g. " + "; ".join(shapes[:3]))
    if missing:
        parts.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:3])}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:3])}")
    return parts


def load_state_checked(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """load_state_dict that reports differing architectures as a short list, not a wall of keys."""
    if parts := state_mismatch(module.state_dict(), state):
        raise CheckpointError(f"{source} does not match the model: " + " | ".join(parts))
    module.load_state_dict(state)


def sub_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix` (e.g. "net."), with the prefix removed."""
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------ diffusion systems
def standalone_model_config(model_config: Mapping[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """The model config to rebuild a checkpoint from the file alone: a latent model's autoencoder comes from
    the checkpoint itself (it carries the stage-1 block), weights to start from (`init_ckpt`) are not read (the
    state_dict holds the trained ones), a tokenizer vocabulary stored by name is rebuilt from its name, and keys
    stored under their former names (RENAMED_MODEL_KEYS) are read under today's."""
    cfg = copy.deepcopy(dict(model_config))
    for old, new in RENAMED_MODEL_KEYS.items():
        if old in cfg and new not in cfg:
            cfg[new] = cfg.pop(old)
    if (
        isinstance(cfg.get("process"), dict)
        and cfg["process"].get("_target_") == "diffusion_lab.diffusion.get_schedule"
    ):
        cfg["process"] = {**cfg["process"], "_target_": "diffusion_lab.diffusion.get_process"}
    if "autoencoder_ckpt" in cfg:
        cfg["autoencoder_ckpt"] = str(path)
    text = cfg.get("text_encoder")
    for node in (cfg, text):
        if isinstance(node, dict) and "init_ckpt" in node:
            node["init_ckpt"] = None
    tokenizer = (text or {}).get("tokenizer") if isinstance(text, dict) else None
    if isinstance(tokenizer, dict) and isinstance(tokenizer.get("vocabulary"), str):
        tokenizer["vocabulary"] = {
            "_target_": "diffusion_lab.data.captions.caption_words",
            "name": tokenizer["vocabulary"],
        }
    return cfg


def check_generative(config: Mapping[str, Any], path: str | os.PathLike) -> None:
    """CheckpointError unless the checkpoint's system is a diffusion model (not a classifier, an autoencoder or a
    text encoder run), before anything is built from it."""
    target = (config.get("model") or {}).get("_target_", "")
    cls = locate(target) if target else None
    if not (
        isinstance(cls, type)
        and DIFFUSION_SYSTEM in {f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__}
    ):
        raise CheckpointError(
            f"{path} is not a diffusion model checkpoint: it holds a {target.rsplit('.', 1)[-1] or 'system'}"
            f" (task {config.get('task_name')!r}); give the checkpoint of a diffusion run"
        )


def weights_to_sample(ckpt: Mapping[str, Any], path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The EMA weights (`state_dict`); the raw ones, with a warning, when the EMA had not begun when the
    checkpoint was written (Lightning's EMAWeightAveraging before `update_starting_at_step`: `state_dict` then
    holds the initial, untrained weights)."""
    averaged = (ckpt.get("averaging_state") or {}).get("n_averaged")
    if averaged is not None and int(averaged) == 0 and "current_model_state" in ckpt:
        log.warning(
            "%s: the EMA had not begun when this checkpoint was written (step %s), so its EMA weights are the"
            " initial ones; sampling from the raw trained weights instead",
            path,
            ckpt.get("global_step"),
        )
        return ckpt["current_model_state"]
    return ckpt["state_dict"]


def nonfinite_weights(state: Mapping[str, Any]) -> list[str]:
    """The names of the floating-point tensors in a state_dict that hold a NaN or an inf."""
    return [
        k
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


def check_finite(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """CheckpointError (one line) when weights read from `path` hold NaN or inf: they would sample black images."""
    if bad := nonfinite_weights(state):
        raise CheckpointError(
            f"{path} holds non-finite weights (NaN/inf in {len(bad)} tensor(s), e.g. {', '.join(bad[:3])}):"
            " damaged on disk, or saved after training diverged; use another checkpoint"
        )


def load_system(path: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """Rebuild the trained diffusion system (EMA weights, eval mode) and its run config from a checkpoint alone."""
    from hydra.utils import instantiate  # the stored config names each constructor by its `_target_`

    ckpt = read_checkpoint(path)
    config = run_config(ckpt, path)
    check_generative(config, path)
    model = instantiate(standalone_model_config(config["model"], path), _convert_="all")
    weights = weights_to_sample(ckpt, path)
    check_finite(weights, path)
    load_state_checked(model, weights, source=str(path))
    model.eval().to(device)
    return model, config


def load_init_net(net: torch.nn.Module, path: str | os.PathLike) -> None:
    """Start ``net`` from the net weights (EMA) of a diffusion checkpoint of this framework (``init_ckpt=``, ECT:
    a consistency model from a trained formulation=edm run): the same architecture, any process and objective."""
    hint = "give a diffusion run's <run>/checkpoints/last.ckpt"
    ckpt = read_checkpoint(path, what="init_ckpt", hint=hint)
    check_generative(run_config(ckpt, path), path)
    load_state_checked(net, sub_state(weights_to_sample(ckpt, path), "net."), source=f"init_ckpt {path}")


def load_guide(path: str | os.PathLike, model, *, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The net of a guide checkpoint for autoguidance (Karras et al. 2024): a weaker model of the same kind
    (same process, objective and conditioning), e.g. an earlier checkpoint of the same run."""
    guide, _ = load_system(path, device=device)
    for what in ("process", "objective"):
        mine, theirs = getattr(model, what, None), getattr(guide, what, None)
        if repr(mine) != repr(theirs):
            raise ValueError(f"guide_ckpt {path} has another {what} ({theirs!r}) than the model ({mine!r})")
    for what in ("num_classes", "is_text_conditional", "sample_shape"):
        if getattr(model, what, None) != getattr(guide, what, None):
            raise ValueError(f"guide_ckpt {path} differs from the model in {what}: it cannot guide it")
    return guide.net


# ------------------------------------------------------------------------------------ stage-1 autoencoder
def autoencoder_checkpoint_block(
    net: AutoencoderKL, state_dict: dict[str, torch.Tensor], scale_factor: float | None, *, ema: bool = False
) -> dict[str, Any]:
    """The self-contained `checkpoint["autoencoder"]` block: constructor kwargs, weights, latent scale factor."""
    return {
        "format": AUTOENCODER_FORMAT,
        "kwargs": dict(net.init_kwargs),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "scale_factor": None if scale_factor is None else float(scale_factor),
        "ema": bool(ema),
    }


def load_autoencoder(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[AutoencoderKL, float]:
    """The (EMA) autoencoder in eval mode and its latent scale factor (latents for diffusion = scale_factor * z)
    from a stage-1 checkpoint, or a latent model's, alone (no Hydra)."""
    hint = "Train one first, e.g. `python -m diffusion_lab.train experiment=mnist_autoencoder`, and pass its "
    ckpt = read_checkpoint(path, what="autoencoder checkpoint", hint=hint + "<run_dir>/checkpoints/last.ckpt")
    block = ckpt.get(AUTOENCODER_KEY)
    if not isinstance(block, dict) or block.get("format") != AUTOENCODER_FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not a stage-1 autoencoder checkpoint: it has no {AUTOENCODER_KEY!r} block of format "
            f"{AUTOENCODER_FORMAT!r} (found keys: {sorted(ckpt)[:12]}). Pass the last.ckpt of an AutoencoderSystem run."
        )
    if block.get("scale_factor") is None:
        raise CheckpointError(
            f"{str(path)!r} has no latent scale factor: it is computed when training ends "
            "(AutoencoderSystem.on_train_end) and stored in <run_dir>/checkpoints/last.ckpt; checkpoints saved "
            "during training have none. Use last.ckpt, or call AutoencoderSystem.compute_scale_factor and save again."
        )
    net = AutoencoderKL(**block["kwargs"])
    net.load_state_dict(block["state_dict"])
    return net.to(map_location).eval(), float(block["scale_factor"])


# ------------------------------------------------------------------------------------ classifier, text encoder
def load_classifier(path: str | os.PathLike) -> tuple[ConvClassifier, int, dict]:
    """(net in eval mode, image size it was trained at, run config) of a `*_classifier` training run (no Hydra)."""
    ckpt = read_checkpoint(path, what="classifier checkpoint", hint=TRAIN_CLASSIFIER_HINT)
    config = (ckpt.get(CHECKPOINT_KEY) or {}).get("config")
    model_cfg = (config or {}).get("model") or {}
    net_cfg = model_cfg.get("net") or {}
    if model_cfg.get("_target_") != CLASSIFIER_SYSTEM or net_cfg.get("_target_") != CLASSIFIER_NET:
        raise CheckpointError(
            f"{path} is not a classifier checkpoint of diffusion_lab (model {model_cfg.get('_target_')!r}, "
            f"expected {CLASSIFIER_SYSTEM} with a ConvClassifier net). {TRAIN_CLASSIFIER_HINT}."
        )
    net = ConvClassifier(**{k: v for k, v in net_cfg.items() if k != "_target_"})
    check_finite(ckpt["state_dict"], path)
    load_state_checked(net, sub_state(ckpt["state_dict"], "net."), source=str(path))
    return net.eval(), int(model_cfg["image_size"]), config


def load_text_encoder_weights(encoder: torch.nn.Module, path: str | os.PathLike) -> None:
    """Copy the `text_encoder.*` weights of a diffusion_lab checkpoint (contrastive or text-to-image) into
    `encoder`, which must have been built with the same tokenizer (its `tokenizer_fingerprint` buffer) and sizes."""
    ckpt = read_checkpoint(path)
    if "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    state = ckpt["state_dict"]
    prefixes = [p for p in ("text_encoder.", "text_tower.encoder.") if any(k.startswith(p) for k in state)]
    if not prefixes:
        raise CheckpointError(f"{path} has no text encoder weights (no 'text_encoder.*' in its state_dict)")
    sub = sub_state(state, prefixes[0])
    ours, theirs = encoder.tokenizer_fingerprint, sub.get("tokenizer_fingerprint")
    # rounded: EMA averages buffers too, and lerp in float32 can move a byte value by ~1e-5
    if theirs is not None and not torch.equal(theirs.float().round(), ours):
        raise CheckpointError(
            f"text encoder in {path} was trained with a different tokenizer (vocabulary / max_length)"
        )
    if parts := state_mismatch(encoder.state_dict(), sub):
        raise CheckpointError(
            f"text encoder in {path} does not match this one (dim / depth / vocabulary): " + " | ".join(parts)
        )
    encoder.load_state_dict({**sub, "tokenizer_fingerprint": ours.clone()})


# ------------------------------------------------------------------------------------ resuming
def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} of nested dicts (lists are leaves)."""
    if not isinstance(node, Mapping):
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any], *, prefix: str = "") -> list[str]:
    """`key: checkpoint X vs now Y` for every leaf that differs (missing on one side: `<absent>`)."""
    a, b = flatten(saved, prefix), flatten(current, prefix)
    absent = "<absent>"
    return [
        f"{k}: checkpoint {a.get(k, absent)!r} vs now {b.get(k, absent)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, absent) != b.get(k, absent)
    ]


def check_resume(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    model_config: Mapping[str, Any] | None = None,
    strict_keys: tuple[str, ...] = ("image_size",),
) -> list[str]:
    """Fail (CheckpointError, one line) when a checkpoint cannot resume `model`, listing the differing config keys.

    It cannot when the weights do not fit (names, shapes) or when a config key named in `strict_keys` (the data
    shape) differs. Reads the file memory-mapped (tensors are not loaded). Returns the model config keys that
    differ although resuming works (a longer LR schedule, another learning rate), for the caller to report."""
    ckpt = read_checkpoint(path, mmap=True)
    saved = ((ckpt.get(CHECKPOINT_KEY) or {}).get("config") or {}).get("model")
    diffs = config_diff(saved, model_config, prefix="model") if saved is not None and model_config else []
    state = ckpt.get("current_model_state") or ckpt.get("state_dict") or {}
    mismatch = state_mismatch(model.state_dict(), state)
    strict = [d for d in diffs if d.split(":")[0].rsplit(".", 1)[-1] in strict_keys]
    if mismatch or strict:
        why = "; ".join(diffs[:8]) + (f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else "")
        raise CheckpointError(
            f"cannot resume from {path}: it was trained with a different model or data shape"
            + (f" — config differs: {why}" if diffs else " (it records no model config to compare)")
            + (" — weights: " + " | ".join(mismatch) if mismatch else "")
        )
    return diffs
