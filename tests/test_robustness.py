"""Crash safety: atomic checkpoint writes (also under SIGKILL), no NaN weights on disk, the non-finite step guard."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from diffusion_lab.callbacks.checkpoint import (
    AtomicCheckpointIO,
    CheckpointError,
    atomic_save,
    remove_stale_temp_files,
)
from diffusion_lab.callbacks.nan_guard import NonFiniteGuard, NonFiniteTrainingError
from diffusion_lab.train import train

from conftest import TINY, compose

REPO = Path(__file__).resolve().parents[1]


class _Boom:
    """Pickling it fails half-way through a save."""

    def __reduce__(self):
        raise RuntimeError("interrupted while writing")


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    atomic, naive = tmp_path / "atomic.ckpt", tmp_path / "naive.ckpt"
    for path in (atomic, naive):
        torch.save({"version": 1}, path)
    with pytest.raises(RuntimeError, match="interrupted"):
        torch.save({"version": 2, "w": torch.ones(1000), "boom": _Boom()}, naive)
    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_save({"version": 2, "w": torch.ones(1000), "boom": _Boom()}, atomic)
    with pytest.raises(RuntimeError, match="corrupted"):  # a plain torch.save leaves a broken file behind ...
        torch.load(naive, weights_only=False)
    assert torch.load(atomic, weights_only=False) == {"version": 1}  # ... the atomic one the old file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic.ckpt", "naive.ckpt"]  # no temp file left


_WRITER = """
import sys, torch
from diffusion_lab.callbacks.checkpoint import atomic_save
big = torch.randn(3_000_000)  # 12 MB: most of the time goes into writing it
for version in range(1, 10_000):
    atomic_save({"version": version, "big": big * version, "sum": float((big * version).sum())}, sys.argv[1])
    print(version, flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "ckpts" / "last.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        done = 0
        while done < 3:  # three complete saves, then kill at an arbitrary point of the following ones
            line = proc.stdout.readline()
            assert line, "the writer died"
            done = int(line)
        time.sleep(0.013 * (1 + os.getpid() % 7))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        done = max([done, *(int(x) for x in proc.stdout.read().split())])
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["version"] >= done  # the newest complete save (or the one being renamed into place)
    assert math.isclose(float(ckpt["big"].sum()), ckpt["sum"], rel_tol=1e-6)
    # a killed writer may leave its temp file; the next process's first save clears it
    remove_stale_temp_files(path.parent, older_than=time.time() + 1)
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_checkpoint_io_refuses_nan_weights_and_reports_unwritable_paths(tmp_path):
    io = AtomicCheckpointIO()
    good = {"state_dict": {"w": torch.ones(3)}, "current_model_state": {"w": torch.ones(3)}}
    io.save_checkpoint(good, tmp_path / "a.ckpt")
    bad = {"state_dict": {"w": torch.ones(3)}, "current_model_state": {"w": torch.tensor([1.0, math.nan, 0])}}
    with pytest.raises(CheckpointError, match=r"refusing to write .*current_model_state\.w"):
        io.save_checkpoint(bad, tmp_path / "a.ckpt")
    torch.testing.assert_close(
        io.load_checkpoint(tmp_path / "a.ckpt")["current_model_state"]["w"], torch.ones(3)
    )
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        io.save_checkpoint(good, tmp_path / "file" / "b.ckpt")
    (tmp_path / "trunc.ckpt").write_bytes((tmp_path / "a.ckpt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        io.load_checkpoint(tmp_path / "trunc.ckpt")


# ----------------------------------------------------------------------------------- non-finite guard
class _Poison(Callback):
    """Turns the batch of the given global steps into NaN, and records weights around them."""

    def __init__(self, steps) -> None:
        self.steps = set(steps)
        self.before: dict[int, dict] = {}
        self.after: dict[int, dict] = {}

    def _snapshot(self, trainer, pl_module) -> dict:
        opt = trainer.optimizers[0]
        return {
            "weights": {k: v.clone() for k, v in pl_module.state_dict().items()},
            "adam_steps": sorted({int(s["step"]) for s in opt.state.values()}),
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # train.py plugs it in
        if trainer.global_step in self.steps:
            batch["image"].fill_(float("nan"))
            self.before[trainer.global_step] = self._snapshot(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - 1 in self.steps:
            self.after[trainer.global_step - 1] = self._snapshot(trainer, pl_module)


GUARD = [*TINY, "trainer.max_steps=8", "callbacks.class_accuracy=null", "callbacks.image_logger=null"]


def _csv(run: Path, key: str) -> dict[int, float]:
    with open(run / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key) not in ("", None)}


def test_a_nan_step_is_skipped_and_counted(tmp_path):
    poison = _Poison([3])
    summary = train(compose("train", GUARD, tmp_path), extra_callbacks=[poison])
    assert summary["steps"] == 8 and summary["skipped_steps"] == 1
    before, after = poison.before[3], poison.after[3]
    for k, v in before["weights"].items():  # the NaN step changed neither the weights ...
        torch.testing.assert_close(after["weights"][k], v, rtol=0, atol=0)
    assert before["adam_steps"] == after["adam_steps"] == [3]  # ... nor AdamW's state
    loss, skipped = _csv(tmp_path, "train/loss"), _csv(tmp_path, "train/skipped_steps")
    assert math.isnan(loss[3]) and all(math.isfinite(v) for s, v in loss.items() if s != 3)
    assert [skipped[s] for s in range(8)] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert math.isfinite(summary["final_train_loss"])


def test_a_blow_up_stops_the_run_and_keeps_the_good_checkpoints(tmp_path):
    over = [*GUARD, "trainer.max_steps=12", "callbacks.nan_guard.max_consecutive_nonfinite=3"]
    poison = _Poison(range(5, 100))  # from the 6th step on, every batch is NaN
    with pytest.raises(NonFiniteTrainingError, match=r"3 steps in a row .*weights are those of step 5") as e:
        train(compose("train", over, tmp_path), extra_callbacks=[poison])
    assert "\n" not in str(e.value) and "last.ckpt" in str(e.value)
    assert not (tmp_path / "summary.json").exists()
    ckpts = {p.name: torch.load(p, weights_only=False) for p in (tmp_path / "checkpoints").glob("*.ckpt")}
    # the run stopped at step 8, before its checkpoint; none written holds a NaN
    assert sorted(ckpts) == ["last.ckpt", "step000002.ckpt", "step000004.ckpt", "step000006.ckpt"]
    assert ckpts["last.ckpt"]["global_step"] == 6
    for ck in ckpts.values():
        assert all(
            torch.isfinite(v).all() for key in ("state_dict", "current_model_state") for v in ck[key].values()
        )
    # the step-6 checkpoint, written during the NaN streak, holds the weights of the last good step (5)
    for k, v in poison.before[5]["weights"].items():
        torch.testing.assert_close(ckpts["step000006.ckpt"]["current_model_state"][k], v, rtol=0, atol=0)


def test_guard_rejects_a_bad_limit():
    with pytest.raises(ValueError, match="max_consecutive_nonfinite must be >= 1"):
        NonFiniteGuard(max_consecutive_nonfinite=0)
