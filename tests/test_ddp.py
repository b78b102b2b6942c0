"""DDP on CPU (gloo) through the real entry point: one run folder written once by rank 0, exact resume, SLURM."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffusion_lab.callbacks.random_state import RandomState, capture_random_state, rank_seed, seed_global

from conftest import CONF_DIR, TINY, compose

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
# one grid (at the end), checkpoints every 2 steps, class accuracy sampled on rank 0 at the end
RUN = [
    *TINY,
    "trainer.max_steps=6",
    "callbacks.image_logger.every_n_steps=1000",
    "callbacks.ema.update_starting_at_step=0",
]
# FID (a collective: every rank samples its chunks) at step 4 and at the end, on a cheap random-conv embedding
FID = (
    "+callbacks.fid={_target_:diffusion_lab.callbacks.fid.FID,"
    "feature:{_target_:diffusion_lab.metrics.features.RandomConvFeatures,in_channels:1,width:4},"
    "sampler:{_target_:diffusion_lab.diffusion.get_sampler,name:ddim,steps:2},"
    "every_n_steps:4,num_samples:8,batch_size:2,cache_dir:'CACHE'}"
)
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK")


def _env(**extra: str) -> dict[str, str]:
    """This environment without distributed / SLURM variables (Lightning would join them instead of launching)."""
    env = {
        k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV and not k.startswith(("SLURM_", "PL_"))
    }
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DIFFUSION_LAB_TRACEBACK": "1", **extra})
    return env


def _train(cwd: Path, args: list[str], *, env: dict[str, str] | None = None, ok: bool = True):
    cmd = [sys.executable, "-m", "diffusion_lab.train", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=240)
    if ok:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _run_dir(parent: Path) -> Path:
    runs = sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(runs) == 1, f"every rank must write into rank 0's run folder, found {[p.name for p in runs]}"
    return runs[0]


def _metric(run: Path, key: str) -> dict[int, float]:
    """step -> value of `key` in metrics.csv, failing on a step written twice (only rank 0 may write)."""
    out: dict[int, float] = {}
    with open(run / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get(key):
                step = int(row["step"])
                assert step not in out, f"{key} of step {step} written twice"
                out[step] = float(row[key])
    return out


@pytest.mark.slow
def test_ddp_two_processes_on_cpu_then_resume(tmp_path):
    # run 1: 6 steps on 2 processes into Hydra's default timestamped run folder (relative to cwd)
    fid = FID.replace("CACHE", str(tmp_path / "fid_cache"))
    _train(tmp_path, [*DDP, *RUN, "task_name=ddp", fid])
    run = _run_dir(tmp_path / "outputs" / "ddp")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["output_dir"] == str(run.resolve())
    assert [Path(p).name for p in summary["sample_grids"]] == ["step_000006.png"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000006.png"]
    assert 0.0 <= summary["class_accuracy"] <= 1.0
    assert [s for s, _ in summary["fid_random_history"]] == [4, 6] and math.isfinite(summary["fid_random"])
    assert sorted(_metric(run, "eval/fid_random")) == [4, 6]
    # one folder shared by both ranks: rank 1 logs beside rank 0 and writes no config of its own
    assert (run / "train_ddp_process_1.log").is_file() and (run / ".hydra" / "config.yaml").is_file()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    names = ["last.ckpt", "step000002.ckpt", "step000004.ckpt", "step000006.ckpt"]  # no temp files
    assert ckpts == sorted(names + [f"{n}.sha256" for n in names])  # each with its checksum (rank 0 writes)
    losses = _metric(run, "train/loss")
    assert sorted(losses) == list(range(6))
    mid = torch.load(run / "checkpoints" / "step000004.ckpt", map_location="cpu", weights_only=False)
    assert mid["global_step"] == 4 and len(mid["callbacks"]["RandomState"]["ranks"]) == 2

    # run 2: resume from step 4 -> continues at step 4 and repeats steps 4, 5 of run 1 exactly
    ckpt = run / "checkpoints" / "step000004.ckpt"
    _train(tmp_path, [*DDP, *RUN, "task_name=ddp_resumed", f"ckpt_path={ckpt}"])
    resumed = _run_dir(tmp_path / "outputs" / "ddp_resumed")
    assert json.loads((resumed / "summary.json").read_text())["steps"] == 6
    again = _metric(resumed, "train/loss")
    assert again == {s: losses[s] for s in (4, 5)}


class _Trainer(SimpleNamespace):
    global_step = 0


def test_ranks_draw_their_own_noise_and_resume_their_own_state():
    """Fresh DDP run: rank 1 re-seeds from (seed, rank); resume: each rank gets its own saved state back."""
    seed_global(7)
    rank0 = torch.rand(4)
    for rank in (0, 1):
        seed_global(7)
        RandomState().on_train_start(_Trainer(global_rank=rank, world_size=2), None)
        assert torch.equal(torch.rand(4), rank0) == (rank == 0)
    assert rank_seed(7, 0) == 7 and len({rank_seed(7, r) for r in range(8)}) == 8

    states, expected = [], []
    for rank in (0, 1):
        seed_global(rank_seed(3, rank))
        states.append(capture_random_state())
        expected.append(torch.rand(4))
    for rank in (0, 1):
        cb = RandomState()
        cb.load_state_dict({**states[0], "ranks": states})
        seed_global(99)
        cb.on_train_start(_Trainer(global_rank=rank, world_size=2), None)
        assert torch.equal(torch.rand(4), expected[rank])


def test_ddp_config_composes(tmp_path):
    from hydra.utils import instantiate

    cfg = compose("train", ["trainer=ddp", "trainer.num_nodes=2"], tmp_path)
    assert cfg.trainer.strategy._target_ == "lightning.pytorch.strategies.DDPStrategy"
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.precision == "bf16-mixed"  # the rest as trainer=gpu
    strategy = instantiate(cfg.trainer.strategy)
    assert strategy._timeout.total_seconds() == 1800


@pytest.mark.parametrize(
    ("launch_env", "refused"),
    [
        ({}, True),  # Lightning would start rank 1 by re-running the command line, i.e. the whole sweep
        ({"LOCAL_RANK": "0", "WORLD_SIZE": "2"}, False),  # processes started from outside (torchrun-like)
        (
            {
                "SLURM_NTASKS": "2",
                "SLURM_NTASKS_PER_NODE": "2",
                "SLURM_JOB_NAME": "train",
                "SLURM_PROCID": "0",
                "SLURM_LOCALID": "0",
                "SLURM_NODEID": "0",
                "SLURM_NODELIST": "localhost",
            },
            False,  # SLURM started every task (hydra/launcher=slurm)
        ),
    ],
)
def test_multirun_refuses_ddp_processes_that_lightning_would_launch(monkeypatch, launch_env, refused):
    import lightning as L

    from diffusion_lab.instantiate import check_multirun_launch

    for key in list(os.environ):
        if key in _LAUNCH_ENV or key.startswith(("SLURM_", "TORCHELASTIC_")):
            monkeypatch.delenv(key)
    for key, value in launch_env.items():
        monkeypatch.setenv(key, value)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False
    )
    if refused:
        with pytest.raises(ValueError, match="re-runs the command line for every rank"):
            check_multirun_launch(trainer)
    else:
        check_multirun_launch(trainer)
    check_multirun_launch(
        L.Trainer(accelerator="cpu", devices=1, logger=False)
    )  # one process: nothing to launch


# ------------------------------------------------------------------------------------------------ SLURM
def _has_submitit_plugin() -> bool:
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        return False
    return True


needs_submitit = pytest.mark.skipif(
    not _has_submitit_plugin(), reason="hydra-submitit-launcher not installed (pip install -e '.[slurm]')"
)


@needs_submitit
def test_slurm_launcher_config_composes(tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose(
            "train",
            ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    # one SLURM task per device: SLURM starts every DDP process, Lightning's SLURMEnvironment joins them
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.name == "train" and launcher.max_num_timeout == 0
    params = instantiate(launcher).params
    assert params["tasks_per_node"] == 4 and params["submitit_folder"].endswith(".submitit/%j")


# Stand-ins for SLURM's commands: sbatch runs the script's array tasks one after another in the background,
# srun starts SLURM_NTASKS copies of its command with SLURM_PROCID / SLURM_LOCALID (what a cluster does).
_SBATCH = """\
    import os, re, subprocess, sys
    script = sys.argv[-1]
    opts = dict(re.findall(r"^#SBATCH --([\\w-]+)(?:=(.*))?$", open(script).read(), re.M))
    job = str(1000 + os.getpid() % 8000)  # Lightning's rendezvous port: 15000 + the job id's last 4 digits
    tasks, nodes = int(opts.get("ntasks-per-node", 1)), int(opts.get("nodes", 1))
    array = [None]
    if "array" in opts:
        first, last = opts["array"].split("%")[0].split("-")
        array = list(range(int(first), int(last) + 1))
    runs = []
    for k, t in enumerate(array):
        env = dict(SLURM_JOB_NAME=opts.get("job-name", "x"), SLURM_NTASKS=tasks * nodes, SLURM_NTASKS_PER_NODE=tasks,
                   SLURM_JOB_NUM_NODES=nodes, SLURM_NODELIST="localhost", SLURM_JOB_NODELIST="localhost",
                   SLURM_NODEID=0, SLURM_JOB_ID=job if t is None else int(job) + k + 1)
        if t is not None:
            env.update(SLURM_ARRAY_JOB_ID=job, SLURM_ARRAY_TASK_ID=t)
        name = job if t is None else f"{job}_{t}"
        states = os.environ["FAKE_SLURM_STATES"]
        runs.append(" ".join(f"{a}={b}" for a, b in env.items()) + f" bash {script} || echo '{name}|FAILED|x' >> {states}")
    log = open(os.path.join(os.path.dirname(script), "sbatch.log"), "w")
    p = subprocess.Popen(["bash", "-c", " ; ".join(runs)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    open(os.environ["FAKE_SLURM_PIDS"], "a").write(f"{p.pid}\\n")
    print(f"Submitted batch job {job}")
"""
_SRUN = """\
    import os, subprocess, sys
    args, files = sys.argv[1:], {}
    while args[0].startswith("--"):
        if args[0] in ("--output", "--error"):
            files[args[0]], args = args[1], args[2:]
        else:
            args = args[1:]
    def path(p, rank):
        e = os.environ
        for key, var in (("%A", "SLURM_ARRAY_JOB_ID"), ("%a", "SLURM_ARRAY_TASK_ID"), ("%j", "SLURM_JOB_ID")):
            p = p.replace(key, e.get(var, ""))
        return p.replace("%t", str(rank))
    procs = []
    for r in range(int(os.environ["SLURM_NTASKS"])):
        env = dict(os.environ, SLURM_PROCID=str(r), SLURM_LOCALID=str(r))
        out = open(path(files["--output"], r), "w")
        err = open(path(files["--error"], r), "w") if "--error" in files else subprocess.STDOUT
        procs.append(subprocess.Popen(args, env=env, stdout=out, stderr=err))
    sys.exit(max(p.wait() for p in procs))
"""


def _fake_slurm(bin_dir: Path) -> None:
    bin_dir.mkdir()
    for name, body in (("sbatch", _SBATCH), ("srun", _SRUN)):
        (bin_dir / name).write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    (bin_dir / "sacct").write_text(
        '#!/bin/sh\necho "JobID|State|NodeList"\n'
    )  # state unknown: results decide
    (bin_dir / "scancel").write_text("#!/bin/sh\nexit 0\n")
    for p in bin_dir.iterdir():
        p.chmod(0o755)


@pytest.mark.slow
@needs_submitit
def test_slurm_launcher_runs_ddp_tasks_started_by_slurm(tmp_path):
    """`-m hydra/launcher=slurm trainer=ddp trainer.devices=2`: one SLURM job of 2 tasks (fake sbatch / srun) whose
    processes Lightning joins (SLURMEnvironment, no re-launch) and that write one job folder, once."""
    _fake_slurm(tmp_path / "bin")
    pids = tmp_path / "pids"
    path = f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"
    env = _env(PATH=path, FAKE_SLURM_PIDS=str(pids), FAKE_SLURM_STATES=str(tmp_path / "states"))
    args = [
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.cpus_per_task=1",
        "hydra.sweep.dir=sweep",
        "hydra.sweep.subdir=${hydra.job.num}",
        *DDP,
        *RUN,
        "trainer.max_steps=2",
        "callbacks.class_accuracy=null",
    ]
    try:
        _train(tmp_path, args, env=env)
    finally:
        for pid in pids.read_text().split() if pids.exists() else []:
            try:
                os.killpg(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    script = next((tmp_path / "sweep" / ".submitit").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --nodes=1" in script
    job = _run_dir(tmp_path / "sweep")
    assert json.loads((job / "summary.json").read_text())["steps"] == 2
    assert sorted(_metric(job, "train/loss")) == [0, 1]
    logs = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").glob("*/*_log.*"))
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs and "SLURM auto-requeueing enabled" in logs
