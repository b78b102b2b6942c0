"""Shared test helpers: compose the Hydra training config with tiny, fast overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

CONF_DIR = str(Path(__file__).resolve().parents[1] / "diffusion_lab" / "conf")

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = [
    "trainer.max_steps=4",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "model.net.base_channels=8",
    "model.net.channel_mult=[1,2]",
    "model.net.num_heads=2",
    "data.image_size=8",
    "data.batch_size=8",
    "sampler.steps=3",
    "callbacks.image_logger.num_samples=10",
    "callbacks.image_logger.every_n_steps=2",
    "callbacks.checkpoint.every_n_train_steps=2",
    "callbacks.class_accuracy.num_per_class=2",
    "callbacks.class_accuracy.sampler.steps=2",
]


def compose(config_name: str, overrides: list[str], out_dir: Path):
    """The composed config, with `paths.output_dir` pointing at a test folder."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=[*overrides, f"paths.output_dir={out_dir}"])


@pytest.fixture
def one_thread():
    """One intra-op thread for a test (files opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`):
    stored reference outputs were drawn on one thread (two sum convolutions in another order), and on a shared,
    loaded CPU two threads are several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)
