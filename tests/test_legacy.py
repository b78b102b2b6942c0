"""Checkpoints written before the continuous-time core still load and draw the same images, with every sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_lab.checkpoints import load_system
from diffusion_lab.diffusion import Guidance, get_sampler

DATA = Path(__file__).parent / "data" / "legacy"
REFERENCE = np.load(DATA / "reference_samples.npz")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


@pytest.mark.parametrize("key", sorted(REFERENCE.files))
def test_legacy_checkpoint_samples_the_stored_images(key):
    """`tests/data/legacy/make_legacy.py` trained and sampled these at commit 1b2858d (integer timesteps,
    `schedule` + `prediction_type` in the stored config); today's code must reproduce them. Redrawn since:
    eps_linear_cond's euler / euler_ancestral / heun, when the linspace grid took one starting convention for
    every sampler (x_T * 1 where these started from x_T * 0.99998; nothing else differs, to 5e-6)."""
    name, sampler = key.split("/")
    model, config = load_system(DATA / f"{name}.ckpt")
    assert "schedule" in config["model"] and "process" not in config["model"]  # really the old format
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn((4, *model.sample_shape), generator=g)
    cond = {"class_labels": torch.tensor([0, 3, 5, 9])} if model.num_classes else {}
    images = model.sample(
        sampler=get_sampler(sampler, steps=5),
        x_T=x_T,
        cond=cond,
        guidance=Guidance(scale=3.0 if cond else 1.0),
        generator=g,
    )
    expected = torch.from_numpy(REFERENCE[key])
    assert expected.abs().mean() > 0.3 and not (expected.abs() == 1).all()  # real images, not all clipped
    torch.testing.assert_close(images, expected, atol=2e-5, rtol=0)
