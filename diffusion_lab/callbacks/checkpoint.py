"""Crash-safe checkpoint files: atomic writes (same-folder temp file, fsync, rename), no NaN weights, clear errors.

Lightning's `_atomic_save` writes through an fsspec transaction whose local temp file is made by
`tempfile.mkstemp()` in the system temp folder: when that is another filesystem (a tmpfs `/tmp`, a
different disk) the final `shutil.move` degrades to copy + delete, so a kill during the copy leaves a
truncated checkpoint; nothing is fsynced either. `AtomicCheckpointIO` replaces it for local paths.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

from diffusion_lab.checkpoints import CheckpointError, checkpoints_trusted, read_checkpoint, refusal
from diffusion_lab.files import TEMP_SUFFIX, atomic_save, checksum_path, describe_write_error

log = logging.getLogger(__name__)

_PROCESS_START = time.time()
WEIGHT_KEYS = ("state_dict", "current_model_state")  # EMAWeightAveraging keeps the raw weights in the second


def remove_stale_temp_files(
    directory: str | os.PathLike, *, older_than: float = _PROCESS_START
) -> list[Path]:
    """Delete temp files that a killed writer left in `directory` (those modified before `older_than`)."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for p in directory.glob(f".*{TEMP_SUFFIX}"):
        try:
            if p.is_file() and p.stat().st_mtime < older_than:
                p.unlink()
                removed.append(p)
        except OSError:
            continue
    if removed:
        log.info(
            "removed %d temp file(s) left by an interrupted checkpoint write in %s", len(removed), directory
        )
    return removed


def nonfinite_tensors(checkpoint: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point weights holding NaN or inf (in `state_dict` and `current_model_state`)."""
    bad = []
    for key in WEIGHT_KEYS:
        for name, t in (checkpoint.get(key) or {}).items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(f"{key}.{name}")
    return bad


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO for every save of a run (ModelCheckpoint and `trainer.save_checkpoint`).

    Local paths: `atomic_save` with a SHA-256 beside the file (`NAME.ckpt.sha256`, checked on every load: a
    checkpoint whose bytes changed on disk is refused, one without a checksum loads as before), refusing
    (CheckpointError) a checkpoint whose weights are not finite, and clearing temp files an earlier killed
    process left behind; a full disk is reported as such, the previous checkpoint kept. Remote paths (s3://, gs://...): Lightning's
    own fsspec transaction (object stores publish an upload only once it is complete). Reading a truncated or
    foreign file fails with a one-line CheckpointError; every read (the resume of `ckpt_path=` / `auto_resume`) is
    weights-only (`checkpoints.read_checkpoint`), a file that needs more is refused unless trust_checkpoint=true.
    """

    def __init__(self, *, check_finite: bool = True) -> None:
        super().__init__()
        self.check_finite = check_finite
        self._cleaned: set[Path] = set()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if not _is_local_file_protocol(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options for local files")
        path = Path(path)
        if self.check_finite and (bad := nonfinite_tensors(checkpoint)):
            raise CheckpointError(
                f"refusing to write {path}: {len(bad)} weight tensor(s) hold NaN/inf, e.g. {', '.join(bad[:3])};"
                " the earlier checkpoints are kept"
            )
        if path.parent not in self._cleaned:
            remove_stale_temp_files(path.parent)
            self._cleaned.add(path.parent)
        try:
            atomic_save(checkpoint, path, checksum=True)
        except OSError as e:  # the previous file (and its checksum) are untouched
            raise CheckpointError(
                describe_write_error(e, path, "checkpoint") + "; the previous checkpoint is intact"
            ) from e

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None):
        if not _is_local_file_protocol(str(path)):  # weights-only there too (Lightning's default is not)
            try:
                return super().load_checkpoint(
                    path, map_location=map_location, weights_only=not checkpoints_trusted()
                )
            except pickle.UnpicklingError as e:
                raise refusal(path, e) from None
        return read_checkpoint(path, map_location=map_location or (lambda storage, loc: storage))

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        if _is_local_file_protocol(str(path)):
            checksum_path(path).unlink(missing_ok=True)
