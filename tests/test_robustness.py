"""Crash safety: atomic checkpoint writes (also under SIGKILL), no NaN weights on disk, the non-finite step guard,
checksums that catch changed bytes, a full disk reported as such, an EMA that never holds the initial weights."""

from __future__ import annotations

import csv
import errno
import hashlib
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
    atomic_save({"version": version, "big": big * version, "sum": float((big * version).double().sum())}, sys.argv[1])
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
    # float64 sums: a float32 sum of 3M values moves by ~1e-6 with the thread count (the writer has one thread)
    assert math.isclose(float(ckpt["big"].double().sum()), ckpt["sum"], rel_tol=1e-9)
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
    with pytest.raises(CheckpointError, match="cannot write the checkpoint"):
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


# ------------------------------------------------------------------------------- damaged files, full disks
class _FullDisk:
    """Stands in for `os` in the checkpoint module: files it opens take 1000 bytes, then ENOSPC."""

    def __init__(self, real) -> None:
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def fdopen(self, fd, *args, **kwargs):
        f = self._real.fdopen(fd, *args, **kwargs)
        write, room = f.write, [1000]

        def limited(data):
            if len(data) > room[0]:
                raise OSError(errno.ENOSPC, "No space left on device")
            room[0] -= len(data)
            return write(data)

        f.write = limited
        return f


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import diffusion_lab.files as checkpoint_module  # where atomic_save lives

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    before = path.read_bytes()
    monkeypatch.setattr(checkpoint_module, "os", _FullDisk(os))
    with pytest.raises(CheckpointError, match=r"disk full: cannot write the checkpoint .*last\.ckpt") as e:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(100_000)}, "global_step": 2}, path)
    assert "previous checkpoint is intact" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.undo()
    assert path.read_bytes() == before and io.load_checkpoint(path)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]  # no temp file


def test_a_checkpoint_with_changed_bytes_is_refused_and_old_ones_without_checksum_load(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "a.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.arange(100_000.0)}, "global_step": 3}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (tmp_path / "a.ckpt.sha256").read_text().startswith(f"{digest}  a.ckpt")  # `sha256sum -c` reads it
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside the tensor: torch.load reads it without complaint
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=False)["global_step"] == 3
    with pytest.raises(CheckpointError, match=r"a\.ckpt is corrupted: its SHA-256 differs") as e:
        io.load_checkpoint(path)
    assert "\n" not in str(e.value)
    (tmp_path / "a.ckpt.sha256").unlink()  # a checkpoint from before checksums: loads as it did
    assert io.load_checkpoint(path)["global_step"] == 3


def test_ema_averages_from_the_first_step_with_a_warmup(tmp_path):
    """No checkpoint holds the initial weights: the EMA copies step 1, then decays by 1 - (1 + t)^-0.75."""

    class _Raw(Callback):
        def __init__(self) -> None:
            self.after = []

        def on_train_start(self, trainer, pl_module):
            self.initial = {k: v.clone() for k, v in pl_module.state_dict().items()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.after.append({k: v.clone() for k, v in pl_module.state_dict().items()})

    raw = _Raw()
    over = [*TINY, "trainer.max_steps=3", "callbacks.class_accuracy=null", "callbacks.image_logger=null"]
    train(compose("train", over, tmp_path), extra_callbacks=[raw])
    ema = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    d1, d2 = (min(0.995, 1 - (1 + t) ** -0.75) for t in (1, 2))  # the configured warm-up, gamma 1, power 3/4
    for k, w in ema.items():
        if not w.is_floating_point():
            continue
        w1, w2, w3 = (step[k] for step in raw.after)
        expected = torch.lerp(w3, torch.lerp(w2, w1, d1), d2)
        torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-6, msg=k)
    changed = [
        k for k in ema if ema[k].is_floating_point() and not torch.equal(raw.after[-1][k], raw.initial[k])
    ]
    assert changed and not any(torch.equal(ema[k], raw.initial[k]) for k in changed)


def test_sampling_a_checkpoint_whose_ema_never_began_uses_the_raw_weights(tmp_path, caplog):
    from diffusion_lab.checkpoints import load_system

    over = [*TINY, "trainer.max_steps=2", "callbacks.class_accuracy=null", "callbacks.image_logger=null"]
    train(compose("train", over, tmp_path / "run"))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    ckpt["averaging_state"]["n_averaged"] = torch.tensor(0)  # Lightning's EMA before update_starting_at_step
    ckpt["state_dict"] = {k: torch.zeros_like(v) for k, v in ckpt["state_dict"].items()}  # its untouched copy
    torch.save(ckpt, tmp_path / "early.ckpt")
    model, _ = load_system(tmp_path / "early.ckpt")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ckpt["current_model_state"][k])
    assert "the EMA had not begun" in caplog.text and "raw trained weights" in caplog.text
