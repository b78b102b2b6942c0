"""End-to-end: tiny train + sample, resume with EMA and optimizer state, experiment smoke runs, bad names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging

from diffusion_lab.checkpoints import CheckpointError, load_system
from diffusion_lab.train import train

from conftest import CONF_DIR, TINY, compose

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


def test_tiny_train_then_sample(tmp_path):
    from diffusion_lab.sample import sample

    summary = train(compose("train", TINY, tmp_path / "run"))
    run = tmp_path / "run"
    saved = json.loads((run / "summary.json").read_text())
    assert saved["steps"] == 4 and np.isfinite(saved["final_train_loss"])
    assert 0.0 <= saved["class_accuracy"] <= 1.0
    assert [Path(p).name for p in saved["sample_grids"]] == ["step_000002.png", "step_000004.png"]
    assert all(Path(p).is_file() for p in saved["sample_grids"])
    assert summary["last_checkpoint"] == str(run / "checkpoints" / "last.ckpt")

    # the checkpoint alone rebuilds the model, with the EMA weights as its state_dict
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert "current_model_state" in ckpt and "diffusion_lab" in ckpt
    model, config = load_system(run / "checkpoints" / "last.ckpt")
    # the default formulation: flow since #14 measured it best (README, "Formulations"); eps before
    assert config["model"]["objective"] == "flow"
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ckpt["state_dict"][k])

    from hydra import compose as hc
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        scfg = hc(
            "sample",
            [
                f"ckpt={run / 'checkpoints' / 'last.ckpt'}",
                "sampler.steps=2",
                "n=6",
                "class_label=3",
                f"out={tmp_path / 's'}",
            ],
        )
    info = sample(scfg)
    data = np.load(tmp_path / "s" / "samples.npz")
    assert data["images"].shape == (6, 8, 8, 1) and data["images"].dtype == np.uint8
    assert (data["labels"] == 3).all()
    assert (tmp_path / "s" / "grid.png").is_file() and info["nfe"] == 2


class _ResumeProbe(Callback):
    """Records the state a resumed run starts from."""

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.step = trainer.global_step
        self.opt_steps = {int(s["step"]) for s in opt.state.values()}
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMAWeightAveraging))
        self.ema = {k: v.clone() for k, v in ema._average_model.module.state_dict().items()}
        self.current = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.lr = opt.param_groups[0]["lr"]


def test_resume_restores_step_ema_and_optimizer(tmp_path):
    over = [*TINY, "callbacks.ema.update_starting_at_step=0", "callbacks.class_accuracy=null"]
    train(compose("train", over, tmp_path / "a"))
    mid = tmp_path / "a" / "checkpoints" / "step000002.ckpt"
    saved = torch.load(mid, map_location="cpu", weights_only=False)
    probe = _ResumeProbe()
    summary = train(compose("train", [*over, f"ckpt_path={mid}"], tmp_path / "b"), extra_callbacks=[probe])
    assert probe.step == 2 and summary["steps"] == 4
    assert probe.opt_steps == {2}  # AdamW's per-parameter step counters came back
    assert probe.lr == pytest.approx(saved["lr_schedulers"][0]["_last_lr"][0])
    for k, v in saved["state_dict"].items():  # EMA weights
        torch.testing.assert_close(probe.ema[k], v)
    for k, v in saved["current_model_state"].items():  # raw weights
        torch.testing.assert_close(probe.current[k], v)
    assert not all(torch.equal(probe.ema[k], probe.current[k]) for k in probe.ema)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_fast_dev_runs(experiment, tmp_path):
    from experiment_fixtures import overrides_for

    over = [f"experiment={experiment}", "+trainer.fast_dev_run=true", "trainer.enable_progress_bar=false"]
    over += overrides_for(experiment, tmp_path)
    train(compose("train", over, tmp_path / "run"))
    assert (tmp_path / "run" / "summary.json").is_file()


def test_unknown_names_list_the_choices(tmp_path):
    from hydra.errors import MissingConfigException

    from diffusion_lab.diffusion import get_process, get_sampler

    with pytest.raises(MissingConfigException, match="Available options"):
        compose("train", ["sampler=nope"], tmp_path)
    with pytest.raises(MissingConfigException, match="Available options"):
        compose("train", ["experiment=nope"], tmp_path)
    with pytest.raises(ValueError, match="valid choices: .*ddim"):
        get_sampler("nope")
    with pytest.raises(ValueError, match="valid choices: .*cosine"):
        get_process("nope")


def test_bad_checkpoint_fails_with_one_line(tmp_path):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_system(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_system(tmp_path / "missing.ckpt")


class _LastRawWeights(Callback):
    """Records the raw weights after every optimizer step (the last record = the final raw weights)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_final_checkpoint_holds_raw_and_ema_weights(tmp_path):
    over = [*TINY, "callbacks.ema.update_starting_at_step=0", "callbacks.class_accuracy=null"]
    probe = _LastRawWeights()
    train(compose("train", over, tmp_path / "run"), extra_callbacks=[probe])
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for k, v in probe.state.items():  # resuming a finished run continues from its raw weights...
        torch.testing.assert_close(ckpt["current_model_state"][k], v)
    # ...while the state_dict (what sample / evaluate load) is the EMA, which differs
    assert not all(torch.equal(ckpt["state_dict"][k], v) for k, v in probe.state.items())
