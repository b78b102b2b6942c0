"""Exact resume: a run resumed from a checkpoint (mid-epoch, at an epoch end, after `kill -9`, after SIGTERM or
Ctrl-C) repeats the uninterrupted run's per-step loss, learning rate and final raw + EMA weights; keep-last-K;
architecture checks; an LR schedule that is re-planned when a run is extended or given another LR."""

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
from hydra.utils import instantiate as hydra_instantiate
from lightning.pytorch.callbacks import Callback

from diffusion_lab.checkpoints import CheckpointError
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


# ------------------------------------------------------------------------------------------ signals
def logged_steps(run: Path, key: str) -> list[int]:
    """The `step` of every metrics.csv row holding `key`, in file order (each step once, in order)."""
    with open(run / "csv" / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get(key) not in ("", None)]


class _SendSignal(Callback):
    """Sends this process a signal as the batch of `at_step` starts (a scheduler's SIGTERM, a Ctrl-C)."""

    def __init__(self, sig: int, at_step: int) -> None:
        self.sig, self.at_step = sig, at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.sig)


SIGNALLED = [
    *RESUME,
    "callbacks.checkpoint.every_n_train_steps=100",
]  # only the signal writes a mid-run checkpoint


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_step_exits_nonzero_and_the_run_resumes_exactly(reference, tmp_path, sig):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train(compose("train", SIGNALLED, run), extra_callbacks=[_SendSignal(sig, at_step=5)])
    assert e.value.code == 128 + sig  # 143 for SIGTERM, 130 for SIGINT: the scheduler sees an unfinished job
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 6  # the step in flight
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back

    summary = train(compose("train", [*SIGNALLED, "auto_resume=true"], run))  # the same folder, continued
    assert summary["steps"] == STEPS and summary["resumed_from"] == str(last)
    assert logged_steps(run, "train/loss") == list(range(STEPS))
    assert_same_curve(run, reference, after=0)
    assert_same_weights(last, reference / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_sigterm_to_a_real_run_saves_and_it_resumes_to_the_same_weights(reference, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "diffusion_lab.train", *SIGNALLED, f"hydra.run.dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 120
        while not (run / "samples" / "step_000004.png").exists():  # mid-run: the grid of step 4 is written
            assert proc.poll() is None, f"training exited early: {proc.stdout.read()[-2000:]}"
            assert time.time() < deadline, "no grid after 120 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        err, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and f"saved {run / 'checkpoints' / 'last.ckpt'}" in err
    last = run / "checkpoints" / "last.ckpt"
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 4 <= step < STEPS, f"the signal came too late (stopped at step {step})"

    summary = train(compose("train", [*SIGNALLED, "auto_resume=true"], run))
    assert summary["steps"] == STEPS
    assert logged_steps(run, "train/loss") == list(range(STEPS))
    assert_same_curve(run, reference, after=0)
    assert_same_weights(last, reference / "checkpoints" / "last.ckpt")


# ------------------------------------------------------------------------------------- LR schedule
PEAK = 4e-3
LR_RUN = [*TINY, "trainer.max_steps=10", "callbacks.class_accuracy=null", "callbacks.image_logger=null"]


def planned(step: int, total: int, peak: float = PEAK) -> float:
    """The configured schedule in closed form: 10% linear warm-up from 0.04 x peak, then a half cosine to 0."""
    p = step / total
    if p < 0.1:
        return peak * (0.04 + 0.96 * p / 0.1)
    return peak * 0.5 * (1 + math.cos(math.pi * (p - 0.1) / 0.9))


def test_any_max_steps_runs_and_a_finished_run_extends_on_a_replanned_schedule(tmp_path, caplog):
    run = tmp_path / "run"
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)]
    assert train(compose("train", LR_RUN, run))["steps"] == 10  # OneCycleLR: ZeroDivisionError at 10 steps
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)] == handlers
    summary = train(compose("train", [*LR_RUN, "trainer.max_steps=14", "auto_resume=true"], run))
    assert summary["steps"] == 14  # OneCycleLR: "Tried to step 11 times"
    lr = column(metrics(run), "lr-AdamW")
    assert logged_steps(run, "lr-AdamW") == list(range(14))
    expected = [planned(s, 10) for s in range(10)] + [planned(s, 14) for s in range(10, 14)]
    torch.testing.assert_close(torch.tensor([lr[s] for s in range(14)]), torch.tensor(expected))
    assert "LR schedule re-planned: 14 steps now, 10 in the checkpoint" in caplog.text


def test_a_lower_lr_given_on_resume_wins_and_is_reported(tmp_path, caplog):
    over = [*LR_RUN, "trainer.max_steps=12"]
    train(compose("train", over, tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "step000008.ckpt"
    run = tmp_path / "b"
    train(compose("train", [*over, f"ckpt_path={ckpt}", "model.optimizer.lr=1e-4"], run))
    lr = column(metrics(run), "lr-AdamW")
    assert sorted(lr) == list(range(8, 12))
    for s in range(8, 12):  # the restored scheduler and optimizer state held 4e-3
        assert lr[s] == pytest.approx(planned(s, 12, peak=1e-4), rel=1e-6)
    assert "learning rate: the config's 0.0001 replaces the checkpoint's 0.004" in caplog.text


def test_max_time_as_typed_ends_where_the_schedule_ends(tmp_path):
    from lightning.pytorch.callbacks import Timer

    cfg = compose("train", [*LR_RUN, "trainer.max_time=00:00:15:00"], tmp_path / "cfg")
    trainer = hydra_instantiate(cfg.trainer, logger=False)
    timer = next(cb for cb in trainer.callbacks if isinstance(cb, Timer))
    assert timer.time_remaining() == 900  # DD:HH:MM:SS

    run = tmp_path / "run"
    over = [*LR_RUN, "trainer.max_steps=-1", "trainer.max_time=00:00:00:05"]
    summary = train(compose("train", over, run))
    lr = column(metrics(run), "lr-AdamW")
    steps = sorted(lr)
    assert summary["steps"] >= 5 and steps == list(range(summary["steps"]))
    peak_at = max(steps, key=lambda s: lr[s])
    assert lr[peak_at] > 0.5 * PEAK
    assert all(lr[a] >= lr[b] for a, b in zip(steps[peak_at:], steps[peak_at + 1 :]))  # decays to the end
    assert lr[steps[-1]] < 0.3 * PEAK  # not cut off mid-way at a high LR


class _EarlySigterm(Callback):
    """A SIGTERM that Lightning's own handler caught before training began (it sets `received_sigterm`)."""

    def on_train_start(self, trainer, pl_module):
        trainer._signal_connector.received_sigterm = True


def test_a_sigterm_caught_by_lightning_before_training_still_saves_and_exits_143(tmp_path):
    with pytest.raises(SystemExit) as e:  # Lightning alone: SIGTERMException, exit code 0, nothing saved
        train(compose("train", SIGNALLED, tmp_path), extra_callbacks=[_EarlySigterm()])
    assert e.value.code == 128 + signal.SIGTERM
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 1


def test_slurm_warning_signal_saves_and_requeues_the_job(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # a stand-in that records how it was called
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.args"}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train(compose("train", SIGNALLED, run), extra_callbacks=[_SendSignal(signal.SIGUSR1, at_step=3)])
    assert e.value.code == 128 + signal.SIGUSR1
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
