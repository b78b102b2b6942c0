"""One generation loop: the same seed, sampler and n draw the same pixels from `sample`, `evaluate` and Python."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from diffusion_lab.checkpoints import load_system
from diffusion_lab.data.transforms import to_uint8
from diffusion_lab.diffusion import get_sampler
from diffusion_lab.generate import balanced_labels, generate_all

from conftest import CONF_DIR, TINY, compose


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from diffusion_lab.train import train

    run = tmp_path_factory.mktemp("run")
    train(compose("train", [*TINY, "callbacks.class_accuracy=null", "callbacks.image_logger=null"], run))
    return run / "checkpoints" / "last.ckpt"


def _cfg(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name=name, overrides=overrides)


def test_the_same_seed_draws_the_same_images_from_the_cli_evaluate_and_python(ckpt, tmp_path):
    """DDPM (fresh noise every step) at guidance 2, each entry point chunking differently: 4 + 2, one chunk of 6,
    six chunks of 1. Sample i's x_T and noise come from its own seed, so every path gives the same pixels."""
    from diffusion_lab.evaluate import evaluate
    from diffusion_lab.sample import sample

    common = ["seed=5", "guidance_scale=2"]
    sample(_cfg("sample", [f"ckpt={ckpt}", "sampler=ddpm", "sampler.steps=3", "n=6", "batch_size=4",
                           f"out={tmp_path / 'cli'}", *common]))  # fmt: skip
    cli = np.load(tmp_path / "cli" / "samples.npz")
    evaluate(_cfg("evaluate", [f"ckpt={ckpt}", "samplers=[ddpm]", "steps=[3]", "guidance_scales=[2]", "seed=5",
                               "num_samples=6", "batch_size=6", "features=[random]", "metrics=[fid]",
                               "reference_split=null", f"cache_dir={tmp_path / 'cache'}", "progress=false",
                               f"out={tmp_path / 'eval'}"]))  # fmt: skip
    ev = np.load(tmp_path / "eval" / "samples" / "ddpm_steps3_g2_seed5_n6.npz")
    model, _ = load_system(ckpt)

    def python(seed: int) -> np.ndarray:
        images = generate_all(
            model,
            sampler=get_sampler("ddpm", steps=3),
            num_samples=6,
            seed=seed,
            batch_size=1,
            labels=balanced_labels(6, 10),
            guidance_scale=2.0,
        )
        return to_uint8(images)

    assert list(cli["labels"]) == list(ev["labels"]) == [0, 1, 2, 3, 4, 5]  # every class in turn
    np.testing.assert_array_equal(cli["images"], ev["images"])
    np.testing.assert_array_equal(cli["images"], python(5))
    other = python(6)
    assert cli["images"].std() > 10 and (other != cli["images"]).mean() > 0.5  # another seed: other pixels
    # a sample's pixels do not depend on the others drawn with it
    alone = generate_all(model, sampler=get_sampler("ddpm", steps=3), num_samples=6, seed=5, batch_size=6,
                         labels=torch.full((6,), 3), guidance_scale=2.0)  # fmt: skip
    np.testing.assert_array_equal(to_uint8(alone)[3], cli["images"][3])


def test_x0_clipping_is_the_data_spaces_not_the_samplers(ckpt):
    """Pixels clip x0_hat to [-1, 1] (the system passes clip_x0; a sampler has no such option); turning it off
    changes the samples."""
    model, _ = load_system(ckpt)

    def draw() -> torch.Tensor:
        return generate_all(model, sampler=get_sampler("ddim", steps=3), num_samples=4, seed=0,
                            labels=torch.arange(4), guidance_scale=3.0)  # fmt: skip

    assert model.clip_x0 is True
    default = draw()
    with pytest.raises(TypeError, match="clip_x0 is no longer a sampler option"):
        get_sampler("ddim", steps=3, clip_x0=False)
    model.clip_x0 = False
    assert (draw() - default).abs().max() > 1e-3
