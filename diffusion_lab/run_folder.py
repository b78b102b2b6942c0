"""A run folder as a record that is never lost: one owner at a time, resume appends, the newest checkpoint found."""

from __future__ import annotations

import csv
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from diffusion_lab.checkpoints import CheckpointError, UnsafeCheckpointError, read_checkpoint
from diffusion_lab.files import write_text_atomic, writing

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
RECORD_FILES = ("summary.json", "csv/metrics.csv")


class RunFolderError(ValueError):
    """The run folder is in use by another process, or holds another run."""


# ------------------------------------------------------------------------------------------ ownership
def launched_as_rank_zero() -> bool:
    """False in the processes a launcher (Lightning, torchrun, SLURM's srun) starts for ranks > 0."""
    return all(int(os.environ.get(v, "0") or 0) == 0 for v in RANK_VARIABLES)


class RunLock:
    """An exclusive `flock` on `<run>/.lock`, held while this process trains in the folder.

    The kernel drops the lock when its process ends, however it ends (also `kill -9`, a crashed node's NFS
    client losing its lease), so a dead run never leaves the folder stuck; the file itself stays and names the
    last owner (pid, host, start time), which the refusal quotes. Only the launching rank takes it: the ranks
    a launcher starts share the folder of rank 0.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunFolderError(
                f"{self.path.parent} is in use by another run ({owner}): wait for it to end, or give another"
                " hydra.run.dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(),
            0,
        )
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------------------ resuming
@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint to continue from: its step and whether training had finished when it was written."""

    path: Path
    step: int
    training_finished: bool


def resume_point(path: str | os.PathLike) -> ResumePoint:
    """Read (memory-mapped, checksum verified) where a checkpoint stands; CheckpointError if it cannot be used."""
    ckpt = read_checkpoint(path, mmap=True)
    if "global_step" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint (no global_step): cannot resume from it")
    if "phema" in ckpt:  # written by `phema` / `evaluate sigma_rels=`: weights only, no training state
        raise PostHocCheckpoint(
            f"{path} is a post-hoc EMA reconstruction, not a training checkpoint: cannot resume from it"
        )
    if "optimizer_states" not in ckpt:
        raise CheckpointError(
            f"{path} holds no training state (optimizer, loops): an export or a post-hoc EMA reconstruction is"
            " for sampling; resume from a checkpoint the run wrote"
        )
    finished = bool(
        ((ckpt.get("callbacks") or {}).get("FinalCheckpoint") or {}).get("training_finished", False)
    )
    return ResumePoint(Path(path), int(ckpt["global_step"]), finished)


def newest_checkpoint(run_dir: str | os.PathLike) -> ResumePoint | None:
    """The checkpoint of `<run>/checkpoints` at the highest step (the most recently written among equals) that
    passes its checksum; damaged or unreadable ones are skipped with a warning, one that weights-only loading
    refuses stops the run (UnsafeCheckpointError). None when there is none."""
    found = []
    for p in Path(run_dir, "checkpoints").glob("*.ckpt"):
        try:
            found.append((resume_point(p), p.stat().st_mtime_ns))
        except UnsafeCheckpointError:  # not damage: a file that would run code is refused, not passed over
            raise
        except PostHocCheckpoint:
            continue  # not a state of this run's training
        except (CheckpointError, OSError) as e:
            log.warning("skipping %s: %s", p, e)
    if not found:
        return None
    return max(found, key=lambda item: (item[0].step, item[1]))[0]


def holds_a_run(run_dir: str | os.PathLike) -> list[str]:
    """What in `run_dir` shows that a run has trained there already (checkpoints, metrics, summary)."""
    run_dir = Path(run_dir)
    found = [str(p.relative_to(run_dir)) for p in sorted(Path(run_dir, "checkpoints").glob("*.ckpt"))[:3]]
    return found + [f for f in RECORD_FILES if (run_dir / f).is_file()]


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    return Path(folder).resolve() in Path(path).resolve().parents


class PostHocCheckpoint(CheckpointError):
    """A checkpoint reconstructed after training (post-hoc EMA): it samples, but holds no training state."""


class AlreadyFinished(Exception):
    """`auto_resume` found a run that finished (and wrote its summary) at or beyond `trainer.max_steps`."""


def plan_resume(
    run_dir: str | os.PathLike,
    *,
    ckpt_path: str | None,
    auto_resume: bool,
    max_steps: int,
    rank_zero: bool = True,
) -> ResumePoint | None:
    """Where a run in `run_dir` starts: `ckpt_path`, else with `auto_resume` the folder's newest checkpoint, else
    from scratch. Refuses (RunFolderError, one line) to start over in, or to import another run's checkpoint
    into, a folder that holds a run, and to resume a checkpoint already at `max_steps` (AlreadyFinished when
    `auto_resume` meets a finished run with its summary). Resuming into the folder itself moves metric rows
    logged after the checkpoint aside (`rewind_metrics`). Only `rank_zero` checks and touches the records."""
    run_dir = Path(run_dir)
    if not isinstance(auto_resume, bool):
        raise RunFolderError(f"auto_resume must be true or false, got {auto_resume!r}")
    if ckpt_path is not None and not isinstance(ckpt_path, str):
        raise RunFolderError(f"ckpt_path must be a file path, got {ckpt_path!r}")
    if ckpt_path:
        point = resume_point(ckpt_path)
    else:
        point = newest_checkpoint(run_dir) if auto_resume else None
        if point is None and auto_resume:
            log.info("auto_resume: no checkpoint in %s, starting from scratch", run_dir / "checkpoints")
    own = point is not None and is_inside(point.path, run_dir)
    if rank_zero and not own and (used := holds_a_run(run_dir)):
        raise RunFolderError(
            f"{run_dir} already holds a run ({', '.join(used)}): continue it with auto_resume=true, or give"
            " another hydra.run.dir"
        )
    if point is None:
        return None
    completing = False
    if max_steps > 0 and point.step >= max_steps:
        if auto_resume and not ckpt_path and summarized_step(run_dir) >= point.step:
            raise AlreadyFinished(f"{run_dir} holds a finished run (step {point.step}): nothing to do")
        if not (auto_resume and not ckpt_path):
            raise RunFolderError(
                f"nothing to train: {point.path} is at step {point.step} and trainer.max_steps={max_steps};"
                " raise trainer.max_steps to extend the run"
            )
        completing = True  # stopped during its end-of-run work (grids, accuracy, summary): do that now
        log.info(
            "auto_resume: %s ends at step %d without its summary: completing its end of run",
            run_dir,
            point.step,
        )
    if rank_zero and own:
        rewind_metrics(
            run_dir / "csv" / "metrics.csv",
            step=point.step,
            training_finished=point.training_finished or completing,
        )
    log.info("resuming from %s (step %d)", point.path, point.step)
    return point


def summarized_step(run_dir: str | os.PathLike) -> int:
    """The step `<run>/summary.json` records (-1 when there is none or it cannot be read): a run whose newest
    checkpoint is beyond it has not finished its end-of-run work."""
    try:
        steps = json.loads(Path(run_dir, "summary.json").read_text()).get("steps")
    except (OSError, ValueError, AttributeError):
        return -1
    return int(steps) if isinstance(steps, int) and not isinstance(steps, bool) else -1


# ------------------------------------------------------------------------------------------ records
HYDRA_RECORDS = ("config.yaml", "overrides.yaml", "hydra.yaml")
_kept_records: dict[Path, str] = {}


def keep_hydra_records(folders: list[Path], subdir: str = ".hydra") -> None:
    """Remember the Hydra records (`<folder>/.hydra/*.yaml`) already in `folders`, before Hydra writes the new
    command's over them: a refused command puts them back (`restore_hydra_records`)."""
    _kept_records.clear()  # one Hydra run (or sweep) per process at a time
    for folder in folders:
        for name in HYDRA_RECORDS:
            path = Path(folder, subdir, name)
            if path.is_file():
                _kept_records[path.resolve()] = path.read_text()


def restore_hydra_records(run_dir: str | os.PathLike) -> list[Path]:
    """Put back the Hydra records of `run_dir` that `keep_hydra_records` found there: the command was refused,
    so they must go on describing the run in the folder. Returns the files restored."""
    run_dir = Path(run_dir).resolve()
    restored = []
    for path, text in _kept_records.items():
        if run_dir in path.parents and (not path.is_file() or path.read_text() != text):
            write_text_atomic(path, text, what="Hydra record")
            restored.append(path)
    return restored


def rewind_metrics(csv_path: str | os.PathLike, *, step: int, training_finished: bool) -> int:
    """Make `metrics.csv` end where the checkpoint a run resumes from stands: rows logged after it (step >= the
    checkpoint's step; none for a finished run's final checkpoint) are moved to `metrics_discarded.csv` beside
    it, since the resumed run logs those steps again. Returns the number of rows moved."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        return 0
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = list(reader.fieldnames or []), list(reader)
    keep, moved = [], []
    for r in rows:
        after = not training_finished and r.get("step") not in (None, "") and int(float(r["step"])) >= step
        (moved if after else keep).append(r)
    if not moved:
        return 0
    discarded = csv_path.with_name("metrics_discarded.csv")
    with writing(discarded, "metrics file"), open(discarded, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if f.tell() == 0:
            writer.writeheader()
        writer.writerows(moved)
    write_text_atomic(csv_path, _csv_text(fields, keep), what="metrics file")
    log.info(
        "resuming at step %d: %d metric rows logged after that step moved to %s", step, len(moved), discarded
    )
    return len(moved)


def _csv_text(fields: list[str], rows: list[dict]) -> str:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing an existing `metrics.csv` (its columns included) instead of deleting it."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir=log_dir)
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])

    def _check_log_dir_exists(self) -> None:
        pass  # Lightning's deletes metrics.csv here


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger that appends to the run folder's `metrics.csv` (a resumed run continues it; train.py
    first moves rows newer than the checkpoint aside, so each step is logged once, in order)."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def merge_summary(path: str | os.PathLike, summary: dict[str, Any]) -> dict[str, Any]:
    """`summary` completed by the earlier `summary.json` at `path` (a run resumed into its folder): figures this
    session did not produce keep their earlier value, sample grids accumulate, and the earlier summary is kept
    whole under `earlier` (newest first). An unreadable earlier file is kept aside as `summary.json.unreadable`."""
    path = Path(path)
    if not path.is_file():
        return summary
    try:
        old = json.loads(path.read_text())
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError) as e:
        log.warning("earlier %s is unreadable (%s): kept as %s.unreadable", path, e, path.name)
        path.replace(path.with_name(path.name + ".unreadable"))
        return summary
    earlier = old.pop("earlier", [])
    merged = {k: v for k, v in old.items() if k not in summary or summary[k] is None}
    merged.update({k: v for k, v in summary.items() if v is not None or k not in old})
    for key in ("sample_grids", "reconstruction_grids"):
        if isinstance(old.get(key), list) and isinstance(summary.get(key), list):
            merged[key] = old[key] + [p for p in summary[key] if p not in old[key]]
    merged["earlier"] = [old, *earlier]
    return merged


def write_summary(path: str | os.PathLike, summary: dict[str, Any]) -> None:
    """Write `summary.json` atomically (a crash leaves the old file or the new one, never a truncated one)."""
    write_text_atomic(path, json.dumps(summary, indent=2) + "\n", what="run summary")
