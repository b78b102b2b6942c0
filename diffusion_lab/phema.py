"""Post-hoc EMA (Karras et al. 2024): checkpoints of any EMA length reconstructed from the snapshots; the CLI.

`python -m diffusion_lab.phema ckpt_dir=<run>/checkpoints sigma_rel=[0.05,0.1,0.15]` reads the snapshots that
`callbacks.phema.PostHocEMA` wrote during training (`<ckpt_dir>/phema/snapshot-<step>-<sigma_rel>.pt`) and writes,
per `sigma_rel`, the EMA of that relative length at the last snapshot's step as an ordinary checkpoint
(`<ckpt_dir>/phema-<step>-<sigma_rel>.ckpt`: `sample` and `evaluate` take it).

The maths is `diffusion_lab.power_ema`; the snapshot files are `callbacks.phema`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from diffusion_lab.callbacks.phema import SNAPSHOT_DIR, Snapshot, list_snapshots, load_snapshot
from diffusion_lab.checkpoints import (
    SAFETENSORS_SUFFIX,
    TRAINING_STATE,
    CheckpointError,
    read_checkpoint,
    trust_from_config,
)
from diffusion_lab.cli import exit_on_user_error
from diffusion_lab.console import quiet
from diffusion_lab.export import write_safetensors
from diffusion_lab.files import atomic_save
from diffusion_lab.power_ema import posthoc_coefficients, sigma_rel_to_gamma

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ snapshots
def output_name(step: int, sigma_rel: float, suffix: str = ".ckpt") -> str:
    """The file name of a reconstructed checkpoint (`suffix` .safetensors: an export, `diffusion_lab.export`)."""
    return f"phema-{step:07d}-{sigma_rel:.3f}{suffix}"


def select_snapshots(
    directory: str | Path, *, step: int | None = None, in_sigma_rels: Sequence[float] | None = None
) -> tuple[list[Snapshot], int]:
    """(snapshots to combine, the step to reconstruct at): those at or before `step` (default: the last snapshot
    step, which `step` must also be), optionally only the tracked lengths `in_sigma_rels`."""
    snaps = list_snapshots(directory)
    if in_sigma_rels is not None:
        wanted = {round(float(s), 3) for s in in_sigma_rels}
        snaps = [s for s in snaps if round(s.sigma_rel, 3) in wanted]
    if not snaps:
        raise ValueError(
            f"no post-hoc EMA snapshots in {directory}"
            + (f" with sigma_rel in {list(in_sigma_rels)}" if in_sigma_rels is not None else "")
            + ": train with callbacks=[default,phema] (diffusion_lab.callbacks.phema.PostHocEMA)"
        )
    steps = sorted({s.step for s in snaps})
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"no snapshot at step {step}: the snapshots are at steps {steps}")
    return [s for s in snaps if s.step <= step], step


# ------------------------------------------------------------------------------------------------ reconstruction
def reconstruct_weights(
    snapshots: Sequence[Snapshot], step: int, sigma_rels: Sequence[float]
) -> tuple[list[dict[str, torch.Tensor]], np.ndarray]:
    """The EMA weights of each `sigma_rels` at `step` (float64 sums of the snapshots, one file in memory at a
    time) and the (snapshots, outputs) coefficients used."""
    coef = posthoc_coefficients(
        [s.step for s in snapshots], [s.sigma_rel for s in snapshots], step, sigma_rels
    )
    out: list[dict[str, torch.Tensor]] = [{} for _ in sigma_rels]
    names: set[str] | None = None
    for i, snap in enumerate(snapshots):
        weights = load_snapshot(snap)
        if names is None:
            names = set(weights)
        elif set(weights) != names:
            raise CheckpointError(f"{snap.path} holds other weights than the snapshots before it")
        for j, acc in enumerate(out):
            for name, w in weights.items():
                term = w.to(torch.float64) * float(coef[i, j])
                acc[name] = term if name not in acc else acc[name] + term
    return out, coef


def checkpoint_with_weights(
    template: dict[str, Any], weights: dict[str, torch.Tensor], info: dict[str, Any]
) -> dict[str, Any]:
    """A sampling checkpoint: the template's config and other blocks, its `state_dict` with `weights` in place
    (cast to the template's dtypes), no training state, and `info` under "phema"."""
    state = dict(template["state_dict"])
    unknown = sorted(set(weights) - set(state))
    if unknown:
        raise CheckpointError(
            f"the snapshots hold weights the template checkpoint lacks: {', '.join(unknown[:5])}"
        )
    for name, w in weights.items():
        state[name] = w.to(state[name].dtype)
    out = {k: v for k, v in template.items() if k not in TRAINING_STATE}
    out.update(state_dict=state, global_step=int(info["step"]), phema=info)
    return out


def reconstruct(
    ckpt_dir: str | Path,
    sigma_rels: Sequence[float],
    *,
    step: int | None = None,
    in_sigma_rels: Sequence[float] | None = None,
    template: str | Path | None = None,
    out_dir: str | Path | None = None,
    suffix: str = ".ckpt",
) -> list[Path]:
    """Write one checkpoint per `sigma_rels` (`<out_dir>/phema-<step>-<sigma_rel>.ckpt`, default out_dir =
    ckpt_dir) holding the post-hoc EMA of that length, reconstructed from `<ckpt_dir>/phema/` snapshots; the
    config and the weights that are not averaged (frozen parts, buffers) come from `template` (default
    `<ckpt_dir>/last.ckpt`). Returns the paths."""
    ckpt_dir = Path(ckpt_dir)
    sigma_rels = [float(s) for s in sigma_rels]
    sigma_rel_to_gamma(np.asarray(sigma_rels))  # range check before any file is read
    snapshots, step = select_snapshots(ckpt_dir / SNAPSHOT_DIR, step=step, in_sigma_rels=in_sigma_rels)
    template = Path(template) if template is not None else ckpt_dir / "last.ckpt"
    base = read_checkpoint(template)
    weights, coef = reconstruct_weights(snapshots, step, sigma_rels)
    out_dir = Path(out_dir) if out_dir is not None else ckpt_dir
    out_file = out_dir if out_dir.suffix == SAFETENSORS_SUFFIX else None
    if out_file is not None and len(sigma_rels) != 1:
        raise ValueError(
            f"out={out_file} is one file: give one sigma_rel, or a folder (and format=safetensors)"
        )
    paths = []
    for j, (sigma_rel, w) in enumerate(zip(sigma_rels, weights, strict=True)):
        info = {
            "sigma_rel": sigma_rel,
            "gamma": float(sigma_rel_to_gamma(sigma_rel)),
            "step": step,
            "template": str(template),
            "inputs": [
                {"file": s.path.name, "coefficient": float(coef[i, j])} for i, s in enumerate(snapshots)
            ],
        }
        path = out_file or out_dir / output_name(step, sigma_rel, suffix)
        if path.suffix == SAFETENSORS_SUFFIX:
            write_safetensors(checkpoint_with_weights(base, w, info), path)
        else:
            atomic_save(checkpoint_with_weights(base, w, info), path, checksum=True)
        log.info(
            "post-hoc EMA sigma_rel=%.3f at step %d from %d snapshots -> %s",
            sigma_rel,
            step,
            len(snapshots),
            path,
        )
        paths.append(path)
    return paths


def posthoc_checkpoints(ckpt: str | Path, sigma_rels: Sequence[float]) -> list[Path]:
    """For `evaluate`'s sigma_rel axis: the post-hoc EMA checkpoints of `ckpt`'s run at each sigma_rel (snapshots
    in `phema/` beside it, `ckpt` the template) at the last snapshot step, where the CLI writes them; a file
    there made from the same snapshots and template is reused."""
    ckpt = Path(ckpt)
    snapshots, step = select_snapshots(ckpt.parent / SNAPSHOT_DIR)
    inputs = [s.path.name for s in snapshots]
    todo, paths = [], []
    for sigma_rel in (float(s) for s in sigma_rels):
        path = ckpt.parent / output_name(step, sigma_rel)
        paths.append(path)
        if not _made_from(path, inputs, ckpt):
            todo.append(sigma_rel)
    if todo:
        reconstruct(ckpt.parent, todo, step=step, template=ckpt)
    return paths


def _made_from(path: Path, inputs: list[str], template: Path) -> bool:
    """Whether a reconstructed checkpoint exists that was made from these snapshot files and this template."""
    if not path.is_file():
        return False
    try:
        info = read_checkpoint(path, mmap=True).get("phema") or {}
    except CheckpointError:
        return False
    return [i["file"] for i in info.get("inputs", [])] == inputs and info.get("template") == str(template)


# ------------------------------------------------------------------------------------------------ CLI
def output_format(name: str) -> str:
    """`format=` of the CLI: ckpt (a torch checkpoint) or safetensors (an export, `diffusion_lab.export`)."""
    if name not in ("ckpt", "safetensors"):
        raise ValueError(f"format must be ckpt or safetensors, got {name!r}")
    return name


@trust_from_config
def run(cfg: DictConfig) -> list[Path]:
    """The CLI's work on a composed `conf/phema.yaml`."""
    from diffusion_lab.cli import file_argument
    from diffusion_lab.files import ensure_writable_dir
    from diffusion_lab.sample import number

    def numbers(value: Any, key: str) -> list[float]:
        values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
        return [number(v, f"{key}={value!r}: each") for v in values]

    sigma_rels = numbers(cfg.sigma_rel, "sigma_rel")
    if not sigma_rels:
        raise ValueError("sigma_rel must be a non-empty list, e.g. sigma_rel=[0.05,0.1]")
    try:
        sigma_rel_to_gamma(np.asarray(sigma_rels))
    except ValueError as e:
        raise ValueError(f"sigma_rel={cfg.sigma_rel!r}: {e}") from None
    ckpt_dir = Path(file_argument(cfg.ckpt_dir, "ckpt_dir"))
    if not ckpt_dir.is_dir():
        raise ValueError(
            f"ckpt_dir {ckpt_dir} is not a folder: give a run's checkpoints folder (<run>/checkpoints)"
        )
    step = None if cfg.step is None else number(cfg.step, "step", integer=True, minimum=1)
    in_sigma_rels = None if cfg.in_sigma_rel is None else numbers(cfg.in_sigma_rel, "in_sigma_rel")
    if cfg.out is not None:
        out = Path(file_argument(cfg.out, "out"))
        ensure_writable_dir(out.parent if out.suffix == SAFETENSORS_SUFFIX else out, "output folder (out)")
    template = None if cfg.template is None else file_argument(cfg.template, "template")
    return reconstruct(
        ckpt_dir,
        sigma_rels,
        step=step,
        in_sigma_rels=in_sigma_rels,
        template=template,
        out_dir=cfg.out,
        suffix=f".{output_format(cfg.get('format', 'ckpt'))}",
    )


@hydra.main(version_base="1.3", config_path="conf", config_name="phema")
def main(cfg: DictConfig) -> None:
    quiet()
    with exit_on_user_error((InstantiationException, OmegaConfBaseException)):
        for path in run(cfg):
            print(path)


if __name__ == "__main__":
    main()
