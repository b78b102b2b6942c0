"""Exact resume: a run resumed from a checkpoint (mid-epoch, at an epoch end, after `kill -9`) repeats the
uninterrupted run's per-step loss, learning rate and final raw + EMA weights; keep-last-K; architecture checks."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffusion_lab.callbacks.checkpoint import CheckpointError
from diffusion_lab.train import train

from conftest import TINY, compose

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
# 5 batches per epoch, so 12 steps cross two epoch ends (with a validation each); a checkpoint every step
RESUME = [
    *TINY,
    f"trainer.max_steps={STEPS}",
    "+trainer.limit_train_batches=5",
    "+trainer.limit_val_batches=1",
    "trainer.check_val_every_n_epoch=1",
    "callbacks.checkpoint.every_n_train_steps=1",
    "callbacks.checkpoint.save_top_k=-1",
    "callbacks.ema.update_starting_at_step=0",
    "callbacks.image_logger.every_n_steps=4",
    "+callbacks.image_logger.on_train_end=false",
    "callbacks.class_accuracy=null",
]
# bit-identical on one CPU thread; the tolerance leaves room for other BLAS builds / thread counts
RTOL, ATOL = 1e-5, 1e-6


def metrics(run: Path) -> dict[int, dict[str, float]]:
    """{step: {column: value}} of a run's CSV log (columns merged over rows)."""
    out: dict[int, dict[str, float]] = {}
    with open(run / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            step = out.setdefault(int(row["step"]), {})
            step.update({k: float(v) for k, v in row.items() if v not in ("", None) and k != "step"})
    return out


def column(m: dict[int, dict[str, float]], key: str) -> dict[int, float]:
    return {s: row[key] for s, row in m.items() if key in row}


def assert_same_curve(resumed: Path, reference: Path, *, after: int) -> None:
    """train/loss and the LR of every step after `after` match the reference run's."""
    got, ref = metrics(resumed), metrics(reference)
    for key in ("train/loss", "lr-AdamW"):
        a = column(got, key)
        b = {s: v for s, v in column(ref, key).items() if s >= after}
        assert sorted(a) == sorted(b), f"{key}: logged steps {sorted(a)} vs {sorted(b)}"
        torch.testing.assert_close(
            torch.tensor([a[s] for s in sorted(a)], dtype=torch.float64),
            torch.tensor([b[s] for s in sorted(b)], dtype=torch.float64),
            rtol=RTOL,
            atol=ATOL,
        )


def assert_same_weights(a: Path, b: Path) -> None:
    ca = torch.load(a, map_location="cpu", weights_only=False)
    cb = torch.load(b, map_location="cpu", weights_only=False)
    assert ca["global_step"] == cb["global_step"]
    for key in ("state_dict", "current_model_state"):  # EMA and raw weights
        for name, v in ca[key].items():
            torch.testing.assert_close(v, cb[key][name], rtol=RTOL, atol=ATOL, msg=f"{key}.{name}")


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the kill test's subprocess runs with OMP_NUM_THREADS=1: same arithmetic
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread) -> Path:
    """The uninterrupted run."""
    run = tmp_path_factory.mktemp("reference")
    summary = train(compose("train", RESUME, run))
    assert summary["steps"] == STEPS
    return run


@pytest.mark.parametrize("step", [5, 7])  # at the end of epoch 0 (before its validation), and mid-epoch 1
def test_resume_repeats_the_uninterrupted_run(reference, tmp_path, step):
    ckpt = reference / "checkpoints" / f"step{step:06d}.ckpt"
    run = tmp_path / "resumed"
    summary = train(
        compose("train", [*RESUME, "callbacks.checkpoint.save_top_k=2", f"ckpt_path={ckpt}"], run)
    )
    assert summary["steps"] == STEPS
    assert min(column(metrics(run), "train/loss")) == step  # CSV step s logs training step s + 1
    assert_same_curve(run, reference, after=step)
    assert_same_weights(
        run / "checkpoints" / f"step{STEPS:06d}.ckpt", reference / "checkpoints" / f"step{STEPS:06d}.ckpt"
    )
    # keep-last-K: only the newest 2 periodic checkpoints are left, last.ckpt besides them
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == [
        "last.ckpt",
        f"step{STEPS - 1:06d}.ckpt",
        f"step{STEPS:06d}.ckpt",
    ]


def test_resume_with_worker_processes_repeats_the_uninterrupted_run(reference, tmp_path):
    """Mid-epoch resume with 2 loader workers (the reference ran without): the same batches, the same losses."""
    ckpt = reference / "checkpoints" / "step000007.ckpt"
    run = tmp_path / "resumed"
    train(compose("train", [*RESUME, "data.num_workers=2", f"ckpt_path={ckpt}"], run))
    assert_same_curve(run, reference, after=7)


def test_resume_into_another_architecture_lists_what_differs(reference, tmp_path):
    ckpt = reference / "checkpoints" / "step000004.ckpt"
    over = [*RESUME, f"ckpt_path={ckpt}"]
    with pytest.raises(
        CheckpointError, match=r"model\.net\.base_channels: checkpoint 8 vs now 16.*shape mismatch"
    ):
        train(compose("train", [*over, "model.net.base_channels=16"], tmp_path / "a"))
    with pytest.raises(CheckpointError, match=r"model\.image_size: checkpoint 8 vs now 16"):
        train(compose("train", [*over, "data.image_size=16"], tmp_path / "b"))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        train(compose("train", [*RESUME, f"ckpt_path={tmp_path / 'nope.ckpt'}"], tmp_path / "c"))


@pytest.mark.slow
def test_kill_9_then_resume_repeats_the_uninterrupted_run(reference, tmp_path):
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "diffusion_lab.train", *RESUME, f"hydra.run.dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "step000006.ckpt").exists():
            assert proc.poll() is None, f"training exited early: {proc.stderr.read().decode()[-2000:]}"
            assert time.time() < deadline, "no checkpoint after 120 s"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # mid-run, possibly mid-write
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    for p in (run / "checkpoints").glob("*.ckpt"):  # whatever the kill interrupted, every file on disk loads
        torch.load(p, map_location="cpu", weights_only=False)
    last = run / "checkpoints" / "last.ckpt"  # written after step000006.ckpt: the kill may fall in between
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 5 <= step < STEPS, f"the kill came too late (last checkpoint at step {step})"

    resumed = tmp_path / "resumed"
    summary = train(compose("train", [*RESUME, f"ckpt_path={last}"], resumed))
    assert summary["steps"] == STEPS
    assert min(column(metrics(resumed), "train/loss")) == step
    assert_same_curve(resumed, reference, after=step)
    assert_same_weights(resumed / "checkpoints" / "last.ckpt", reference / "checkpoints" / "last.ckpt")
