"""The autoencoder experiments through train.py: last.ckpt carries the scale factor; configs compose."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion_lab.checkpoints import load_autoencoder
from diffusion_lab.nets.autoencoder import AutoencoderKL

from conftest import compose

TINY_AE = [
    "data=digits",  # ships offline and loads in no time; the experiment's own data is Fashion-MNIST
    "data.image_size=16",
    "data.batch_size=8",
    "model.net.base_channels=8",
    "model.net.channel_mult=[1,2]",
    "model.net.norm_groups=8",
    # the quick experiment runs without a GAN; exercise the adversarial path here all the same
    "model.discriminator={_target_:diffusion_lab.nets.discriminator.NLayerDiscriminator,"
    "in_channels:1,base_channels:8,num_layers:1}",
    "model.perceptual_weight=0",
    "model.disc_start=2",
    "model.scale_factor_batches=2",
    "trainer.max_steps=6",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "callbacks.ema.update_starting_at_step=1",
    "callbacks.checkpoint.every_n_train_steps=2",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def test_mnist_autoencoder_experiment_writes_last_ckpt_with_scale_factor(tmp_path):
    from diffusion_lab.train import train

    out = tmp_path / "run"
    train(compose("train", ["experiment=mnist_autoencoder", *TINY_AE], out))
    net, scale = load_autoencoder(out / "checkpoints" / "last.ckpt")
    assert isinstance(net, AutoencoderKL) and net.downsampling_factor == 2
    assert 0.05 < scale < 50.0
    # checkpoints written during training exist but carry no scale factor; last.ckpt does
    mids = [p for p in (out / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    assert mids and all(torch.load(p, weights_only=True)["autoencoder"]["scale_factor"] is None for p in mids)
    assert list((out / "samples").glob("recon_step*.png"))
    metrics = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/psnr", "val/ssim", "train/rec_loss", "train/d_loss"} <= set(metrics)
    assert json.loads((out / "summary.json").read_text())["last_checkpoint"].endswith("last.ckpt")


@pytest.mark.parametrize(
    "experiment,f,latent,gan", [("mnist_autoencoder", 4, 8, False), ("celeba_autoencoder", 4, 16, True)]
)
def test_autoencoder_experiments_compose(experiment, f, latent, gan, tmp_path):
    from hydra.utils import instantiate

    cfg = compose("train", [f"experiment={experiment}"], tmp_path)
    assert cfg.trainer.gradient_clip_val is None  # manual optimization
    assert cfg.model.perceptual_weight > 0 and (cfg.model.discriminator is not None) == gan
    net = instantiate(cfg.model.net)
    assert net.downsampling_factor == f
    assert net.latent_shape(cfg.data.image_size) == (4, latent, latent)
