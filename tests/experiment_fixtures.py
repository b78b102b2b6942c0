"""Per-experiment test overrides: tiny sizes, and small fixture data where an experiment needs files."""

from __future__ import annotations

from pathlib import Path

# experiments whose data ships offline run as they are (with tiny nets); others get fixture data here
SMALL_NET = ["model.net.base_channels=8", "model.net.channel_mult=[1,2]", "model.net.num_heads=2"]


# text-to-image / contrastive experiments: a tiny text encoder, tiny shapes data
TINY_TEXT = ["model.text_encoder.dim=16", "model.text_encoder.depth=1", "model.text_encoder.num_heads=2"]
TINY_SHAPES = ["data.num_images=60", "data.batch_size=8"]


def tiny_autoencoder_ckpt(path: Path, *, in_channels: int = 3, channel_mult=(1, 2, 2)) -> Path:
    """A random stage-1 checkpoint (f = 2^(levels - 1), 4 latent channels, scale factor 0.5) at `path`."""
    import torch

    from diffusion_lab.checkpoints import autoencoder_checkpoint_block
    from diffusion_lab.nets.autoencoder import AutoencoderKL

    torch.manual_seed(0)
    net = AutoencoderKL(
        in_channels=in_channels, base_channels=8, channel_mult=channel_mult, num_res_blocks=1, norm_groups=4
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"autoencoder": autoencoder_checkpoint_block(net, net.state_dict(), 0.5)}, path)
    return path


def _ldm_text(tmp_path: Path) -> list[str]:
    return [
        f"autoencoder_ckpt={tiny_autoencoder_ckpt(tmp_path / 'ae.ckpt')}",
        f"model.latent_cache={tmp_path / 'latent_cache'}",
        *SMALL_NET,
        *TINY_TEXT,
        "sampler.steps=2",
        "callbacks.image_logger.num_samples=6",
    ]


def overrides_for(experiment: str, tmp_path: Path) -> list[str]:
    if experiment in (
        "fashion_mnist",
        "ablation_formulation",
        "ablation_few_step",
    ):  # Fashion-MNIST, 8 px, tiny net
        accuracy = ["callbacks.class_accuracy.num_per_class=1", "callbacks.class_accuracy.sampler.steps=2"]
        return [
            *SMALL_NET,
            "model.net.attention_levels=[1]",
            "data.image_size=8",
            "sampler.steps=2",
            "callbacks.image_logger.num_samples=10",
            *(accuracy if experiment == "fashion_mnist" else []),
        ]
    if experiment == "quickstart" or experiment.startswith("ablation_"):  # ablations: the quickstart, swept
        return [
            *SMALL_NET,
            "callbacks.class_accuracy.num_per_class=1",
            "callbacks.class_accuracy.sampler.steps=2",
            "sampler.steps=2",
        ]
    if experiment == "shapes_autoencoder":
        return [*TINY_SHAPES, "model.net.base_channels=8", "model.scale_factor_batches=1"]
    if experiment == "shapes_contrastive":
        return [*TINY_SHAPES, *TINY_TEXT, "model.image_encoder.base_channels=8"]
    if experiment == "shapes_ldm_text":
        return [
            *TINY_SHAPES,
            *_ldm_text(tmp_path),
            "callbacks.prompt_adherence.num_prompts=2",
            "callbacks.prompt_adherence.num_per_prompt=1",
        ]
    if experiment in ("digits_classifier", "fashion_mnist_classifier"):
        return []  # filled below if the classifier experiments need more
    if experiment == "mnist_autoencoder":
        return [
            "data.batch_size=4",
            "model.net.base_channels=8",
            "model.perceptual_weight=0",
            "model.scale_factor_batches=1",
        ]
    if experiment == "celeba_autoencoder":
        from test_data_celeba import CROP, make_celeba

        make_celeba(tmp_path / "celeba")
        return [
            "trainer=cpu",
            f"data.data_dir={tmp_path / 'celeba'}",
            f"data.crop_size={CROP}",
            "data.image_size=16",
            "data.batch_size=4",
            "model.net.base_channels=8",
            "model.net.channel_mult=[1,2]",
            "model.discriminator.base_channels=8",
            "model.discriminator.num_layers=1",
            "model.perceptual_weight=0",
            "model.scale_factor_batches=1",
        ]
    if experiment == "celeba_ldm_text":
        from test_data_celeba import CROP, make_celeba

        make_celeba(tmp_path / "celeba")
        return [
            "trainer=cpu",
            f"data.data_dir={tmp_path / 'celeba'}",
            f"data.crop_size={CROP}",
            "data.image_size=16",
            "data.batch_size=4",
            "model.net.attention_levels=[1]",
            "model.net.cross_attention_levels=[0,1]",
            *_ldm_text(tmp_path),
        ]
    return []


def train_few_step(formulation: str, overrides: list[str], out_dir: Path):
    """Train `formulation=<few-step formulation>` with `overrides` (4 tiny steps), reload its checkpoint and check
    that its own sampler draws finite, non-constant class-conditional images in 1 and 2 steps: (model, config)."""
    import math

    import torch

    from diffusion_lab.checkpoints import load_system
    from diffusion_lab.diffusion import get_sampler
    from diffusion_lab.train import train

    from conftest import compose

    summary = train(compose("train", [*overrides, f"formulation={formulation}"], out_dir))
    assert math.isfinite(summary["final_train_loss"]) and summary["steps"] == 4
    model, config = load_system(out_dir / "checkpoints" / "last.ckpt")
    assert (config["formulation"], config["model"]["objective"]) == (formulation, formulation)
    for steps in (1, 2):
        x = model.sample(
            sampler=get_sampler(formulation, steps=steps),
            num_samples=2,
            cond={"class_labels": torch.tensor([0, 1])},
            generator=torch.Generator().manual_seed(0),
        )
        assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all() and x.std() > 0
    return model, config
