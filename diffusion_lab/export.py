"""Checkpoints to share: `python -m diffusion_lab.export ckpt=... out=model.safetensors` (EMA weights + run config)."""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusion_lab.checkpoints import (
    EXPORT_KEYS,
    SAFETENSORS_SUFFIX,
    read_checkpoint,
    run_config,
    to_safetensors,
    weights_to_sample,
)
from diffusion_lab.files import atomic_save, sha256_file

log = logging.getLogger(__name__)


def write_safetensors(ckpt: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a sampling checkpoint (its `EXPORT_KEYS`: weights, run config, autoencoder block) as safetensors,
    atomically and with its SHA-256 beside it; `read_checkpoint` reads it back."""
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        raise ValueError(f"the export must be a {SAFETENSORS_SUFFIX} file, got {path}")
    tensors, metadata = to_safetensors(ckpt)
    atomic_save(save(tensors, metadata), path, checksum=True)
    return path


def export(ckpt: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the weights `sample` uses (the EMA ones), the run config and the other blocks sampling needs, no
    optimizer or other training state, from checkpoint `ckpt` to `out` (default: beside it, `.safetensors`)."""
    data = read_checkpoint(ckpt)
    run_config(data, ckpt)  # a diffusion_lab training checkpoint (or an export of one)
    shared = {k: data[k] for k in EXPORT_KEYS if k in data}
    shared["state_dict"] = weights_to_sample(data, ckpt)
    out = Path(out) if out else Path(ckpt).with_suffix(SAFETENSORS_SUFFIX)
    write_safetensors(shared, out)
    log.info("exported %s (%.1f MB) -> %s (%.1f MB)", ckpt, _mb(ckpt), out, _mb(out))
    return out


def time_loading(ckpt: str | os.PathLike, *, repeats: int = 5) -> dict[str, Any]:
    """Seconds to read `ckpt` and its export (written to a temp folder), medians of `repeats`: `read_checkpoint`
    (what `sample` does: weights-only unpickling or safetensors; the SHA-256 check it makes once per process and
    file is timed on its own) and the bare deserialisation (`torch.load(weights_only=True)` vs
    `safetensors.torch.load_file`); the file sizes. The page cache holds both files (just written / read): this
    times hashing and parsing, not the disk."""
    import torch
    from safetensors.torch import load_file

    bare = {"ckpt": lambda p: torch.load(p, map_location="cpu", weights_only=True), "safetensors": load_file}
    out: dict[str, Any] = {"file": str(ckpt), "repeats": repeats}
    with tempfile.TemporaryDirectory() as tmp:
        exported = export(ckpt, Path(tmp) / Path(ckpt).with_suffix(SAFETENSORS_SUFFIX).name)
        for name, path in (("ckpt", Path(ckpt)), ("safetensors", exported)):
            read_checkpoint(path)  # verified once: the repeats below time loading alone
            row: dict[str, Any] = {"mb": round(_mb(path), 3)}
            for what, load in (
                ("sha256_s", sha256_file),
                ("read_checkpoint_s", read_checkpoint),
                ("deserialize_s", bare[name]),
            ):
                seconds = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    load(path)
                    seconds.append(time.perf_counter() - start)
                row[what] = statistics.median(seconds)
            out[name] = row
    return out


def format_load_times(result: Mapping[str, Any]) -> str:
    """`time_loading`'s result as a markdown table."""
    rows = [
        f"| {name} | {r['mb']:.1f} | {r['sha256_s'] * 1e3:.0f} | {r['read_checkpoint_s'] * 1e3:.0f} |"
        f" {r['deserialize_s'] * 1e3:.0f} |"
        for name, r in ((n, result[n]) for n in ("ckpt", "safetensors"))
    ]
    ratio = result["ckpt"]["read_checkpoint_s"] / result["safetensors"]["read_checkpoint_s"]
    return "\n".join(
        [
            f"{result['file']} and its export (page cache warm; medians of {result['repeats']}):",
            "",
            "| file | MB | SHA-256 check ms (once per process) | read_checkpoint ms | bare deserialize ms |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"the export loads {ratio:.1f}x faster through read_checkpoint",
        ]
    )


def _mb(path: str | os.PathLike) -> float:
    return Path(path).stat().st_size / 2**20


def main() -> None:
    import hydra
    from hydra.errors import InstantiationException
    from omegaconf.errors import OmegaConfBaseException

    from diffusion_lab.checkpoints import trusted_checkpoints
    from diffusion_lab.cli import exit_on_user_error
    from diffusion_lab.console import quiet

    @hydra.main(version_base="1.3", config_path="conf", config_name="export")
    def _main(cfg) -> None:
        quiet()
        errors = (InstantiationException, OmegaConfBaseException)
        with exit_on_user_error(errors), trusted_checkpoints(cfg.get("trust_checkpoint", False)):
            print(export(cfg.ckpt, cfg.out))

    _main()


if __name__ == "__main__":
    main()
