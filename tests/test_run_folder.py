"""Run folders that never lose work: one owner at a time, a resumed run appends to its records, a finished run is
not overwritten, a fresh run never starts over a used folder, a checkpoint damaged on disk is passed over."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion_lab.train import train

from conftest import TINY, compose

REPO = Path(__file__).resolve().parents[1]
# checkpoints at steps 2, 4, 6; grids at 3 and 6 and at the end; class accuracy at the end
RUN = [*TINY, "trainer.max_steps=6", "callbacks.image_logger.every_n_steps=3"]


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def steps_with(run: Path, key: str) -> list[int]:
    """The `step` of every metrics.csv row holding `key`, in file order."""
    return [int(r["step"]) for r in rows(run) if r.get(key) not in ("", None)]


def test_resume_into_its_folder_appends_to_the_records(tmp_path):
    run = tmp_path / "run"
    first = train(compose("train", RUN, run))
    before = {k: v for k, v in first.items()}
    extended = train(compose("train", [*RUN, "trainer.max_steps=10", "auto_resume=true"], run))
    assert extended["steps"] == 10 and extended["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    # every training step logged once, in order; both sessions' end-of-run accuracy kept
    assert steps_with(run, "train/loss") == list(range(10))
    assert steps_with(run, "eval/class_accuracy") == [6, 10]
    # the summary keeps the earlier session whole, and the grids of both sessions
    saved = json.loads((run / "summary.json").read_text())
    assert saved["earlier"] == [before]
    assert saved["sample_grids"][: len(before["sample_grids"])] == before["sample_grids"]
    assert saved["sample_grids"][-1].endswith("step_000010.png") and saved["final_train_loss"] is not None


def test_resume_from_a_mid_run_checkpoint_moves_later_rows_aside(tmp_path):
    run = tmp_path / "run"
    over = [*RUN, "callbacks.class_accuracy=null"]
    train(compose("train", over, run))
    original = {int(r["step"]): r["train/loss"] for r in rows(run) if r["train/loss"]}
    train(compose("train", [*over, f"ckpt_path={run / 'checkpoints' / 'step000002.ckpt'}"], run))
    assert steps_with(run, "train/loss") == list(range(6))  # steps 2..5 once, from the resumed session
    with open(run / "csv" / "metrics_discarded.csv", newline="") as f:
        assert sorted({int(r["step"]) for r in csv.DictReader(f) if r["train/loss"]}) == [2, 3, 4, 5]
    resumed = {int(r["step"]): r["train/loss"] for r in rows(run) if r["train/loss"]}
    for s in range(6):  # an exact resume: the same losses
        assert float(resumed[s]) == pytest.approx(float(original[s]), rel=1e-5)


def test_a_finished_run_is_neither_rerun_nor_overwritten(tmp_path):
    run = tmp_path / "run"
    over = [*RUN, "callbacks.image_logger=null"]
    train(compose("train", over, run))
    files = {p: p.read_bytes() for p in [run / "summary.json", run / "csv" / "metrics.csv"]}
    last = run / "checkpoints" / "last.ckpt"
    with pytest.raises(
        ValueError, match=r"nothing to train: .*last\.ckpt is at step 6 and trainer\.max_steps=6"
    ):
        train(compose("train", [*over, f"ckpt_path={last}"], run))
    # auto_resume (a requeued job): nothing to do, exit 0, the earlier summary returned
    again = train(compose("train", [*over, "auto_resume=true"], run))
    assert again["steps"] == 6 and again["final_train_loss"] is not None
    for p, data in files.items():
        assert p.read_bytes() == data, p


def test_a_fresh_run_never_starts_over_a_used_folder(tmp_path):
    run = tmp_path / "run"
    over = [*RUN, "trainer.max_steps=2", "callbacks.image_logger=null", "callbacks.class_accuracy=null"]
    train(compose("train", over, run))
    summary = (run / "summary.json").read_bytes()
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoints/last\.ckpt.*auto_resume=true"):
        train(compose("train", over, run))
    other = tmp_path / "other"  # another run's checkpoint imported into a used folder: refused as well
    train(compose("train", over, other))
    ckpt = other / "checkpoints" / "step000002.ckpt"
    with pytest.raises(ValueError, match="already holds a run"):
        train(compose("train", [*over, "trainer.max_steps=4", f"ckpt_path={ckpt}"], run))
    assert (run / "summary.json").read_bytes() == summary


def test_auto_resume_passes_over_a_damaged_checkpoint(tmp_path, caplog):
    run = tmp_path / "run"
    over = [*RUN, "callbacks.image_logger=null", "callbacks.class_accuracy=null"]
    train(compose("train", over, run))
    last = run / "checkpoints" / "last.ckpt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a weight tensor: torch.load would not notice
    last.write_bytes(bytes(data))
    from diffusion_lab.run_folder import newest_checkpoint

    point = newest_checkpoint(run)
    assert point.path.name == "step000006.ckpt" and point.step == 6
    assert "skipping" in caplog.text and "corrupted" in caplog.text


# ------------------------------------------------------------------------------------------ the lock
_HOLDER = """
import sys, time
from diffusion_lab.run_folder import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_one_owner_per_folder_and_a_killed_owner_leaves_it_free(tmp_path):
    from diffusion_lab.run_folder import RunLock

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"in use by another run \(pid {holder.pid} on "):
            RunLock(tmp_path).acquire()
        holder.kill()  # kill -9: no clean-up runs, the kernel drops the lock
        holder.wait()
    finally:
        holder.kill()
    with RunLock(tmp_path):  # free again
        with pytest.raises(ValueError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()


@pytest.mark.slow
def test_two_processes_racing_for_one_folder(tmp_path):
    run = tmp_path / "run"
    over = [*TINY, "trainer.max_steps=30", "callbacks.image_logger=null", "callbacks.class_accuracy=null"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "diffusion_lab.train", *over, f"hydra.run.dir={run}"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, **pipes) for _ in range(2)]
    errs = [p.communicate(timeout=300)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], errs
    loser = errs[codes.index(1)]
    lines = [ln for ln in loser.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in loser
    assert "in use by another run (pid" in lines[0] or "already holds a run" in lines[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 30 and "earlier" not in summary  # one run's records only
    assert steps_with(run, "train/loss") == list(range(30))


# ------------------------------------------------------------------------------------------ helpers
def test_rewind_and_merge_helpers(tmp_path):
    from diffusion_lab.run_folder import merge_summary, rewind_metrics

    path = tmp_path / "metrics.csv"
    path.write_text("step,train/loss,eval/x\n0,1.0,\n1,0.9,\n2,0.8,\n2,,0.5\n3,0.7,\n")
    assert rewind_metrics(path, step=2, training_finished=False) == 3
    assert [r["step"] for r in csv.DictReader(open(path))] == ["0", "1"]
    assert [r["step"] for r in csv.DictReader(open(tmp_path / "metrics_discarded.csv"))] == ["2", "2", "3"]
    assert rewind_metrics(path, step=0, training_finished=True) == 0  # a finished run's rows all stay

    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"steps": 4, "class_accuracy": 0.5, "sample_grids": ["a.png"], "x": 1}))
    merged = merge_summary(summary, {"steps": 8, "class_accuracy": None, "sample_grids": ["b.png"]})
    assert merged["steps"] == 8 and merged["class_accuracy"] == 0.5 and merged["x"] == 1
    assert merged["sample_grids"] == ["a.png", "b.png"] and merged["earlier"][0]["steps"] == 4
    summary.write_text('{"steps": 4, "final_tr')  # truncated by an old, non-atomic writer: kept aside
    assert merge_summary(summary, {"steps": 8}) == {"steps": 8}
    assert (tmp_path / "summary.json.unreadable").read_text() == '{"steps": 4, "final_tr'
