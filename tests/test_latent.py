"""Latent diffusion: frozen autoencoder, latent cache == on-the-fly, caption dropout, text CFG, standalone ckpt."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from diffusion_lab.data.captions import caption_words
from diffusion_lab.data.latents import CachedLatentDataset, cache_file, encode_dataset, load_or_build_cache
from diffusion_lab.data.shapes import ShapesDataModule
from diffusion_lab.data.transforms import to_tensor
from diffusion_lab.diffusion import Denoiser, Guidance, get_objective, get_process, get_sampler
from diffusion_lab.nets.text import TransformerTextEncoder, WordTokenizer
from diffusion_lab.nets.unet import UNet
from diffusion_lab.systems.latent import LatentDiffusionSystem

from conftest import compose
from experiment_fixtures import TINY_SHAPES, TINY_TEXT, overrides_for, tiny_autoencoder_ckpt


def _system(
    ae_ckpt: Path, *, cond_drop_prob: float = 0.1, latent_cache: str | None = None
) -> LatentDiffusionSystem:
    torch.manual_seed(0)
    text = TransformerTextEncoder(
        tokenizer=WordTokenizer(vocabulary=caption_words("shapes"), max_length=12),
        dim=16,
        depth=1,
        num_heads=2,
    )
    net = UNet(
        in_channels=4, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
        cross_attention_levels=(0, 1), num_heads=2, context_dim=16,
    )  # fmt: skip
    return LatentDiffusionSystem(
        net=net,
        process=get_process("linear", num_timesteps=100),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        image_size=32,
        autoencoder_ckpt=str(ae_ckpt),
        text_encoder=text,
        cond_drop_prob=cond_drop_prob,
        latent_cache=latent_cache,
    )


def _data(n: int = 24) -> ShapesDataModule:
    dm = ShapesDataModule(num_images=n, captions=True, batch_size=8, val_fraction=0.25, test_fraction=0.25)
    dm.setup()
    return dm


def _perturb(module: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_autoencoder_stays_frozen_while_the_rest_trains(tmp_path):
    system = _system(tiny_autoencoder_ckpt(tmp_path / "ae.ckpt"), latent_cache=str(tmp_path / "cache"))
    before = {k: v.clone() for k, v in system.state_dict().items() if isinstance(v, torch.Tensor)}
    dm = _data(40)
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(system, datamodule=dm)
    after = system.state_dict()
    ae = [k for k in before if k.startswith("autoencoder.")]
    others = [k for k in before if k.startswith(("net.", "text_encoder.")) and before[k].is_floating_point()]
    assert ae and others
    assert all(torch.equal(before[k], after[k]) for k in ae)  # not one autoencoder weight moved
    assert sum(not torch.equal(before[k], after[k]) for k in others) > len(others) // 2  # ...the rest trained
    assert not system.autoencoder.training and not any(
        p.requires_grad for p in system.autoencoder.parameters()
    )
    assert isinstance(dm.train_set, CachedLatentDataset)  # trained from the cache
    assert len(list((tmp_path / "cache").glob("latents_*.pt"))) == 1


def test_cached_and_on_the_fly_latents_give_the_same_batch(tmp_path, monkeypatch):
    ae_ckpt = tiny_autoencoder_ckpt(tmp_path / "ae.ckpt")
    system = _system(ae_ckpt)
    _perturb(system.autoencoder)  # a non-trivial posterior std
    dm = _data()
    latents, path = load_or_build_cache(system.autoencoder, ae_ckpt, dm.train_set, tmp_path / "cache")
    pixel = next(iter(DataLoader(dm.train_set, batch_size=8, shuffle=False)))
    cached = next(iter(DataLoader(CachedLatentDataset(dm.train_set, latents), batch_size=8, shuffle=False)))
    assert "image" not in cached and set(cached) >= {"latent_mean", "latent_std", "caption", "attributes"}
    torch.testing.assert_close(cached["attributes"], pixel["attributes"])
    x_pixel = system.batch_x0(pixel, generator=torch.Generator().manual_seed(7))
    x_cached = system.batch_x0(cached, generator=torch.Generator().manual_seed(7))
    assert x_pixel.shape == (8, 4, 8, 8)
    torch.testing.assert_close(x_cached, x_pixel, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(x_cached, system.batch_x0(cached, generator=torch.Generator().manual_seed(8)))
    # the file is reused (nothing re-encoded) and keyed by the autoencoder file's content
    monkeypatch.setattr(
        "diffusion_lab.data.latents.encode_dataset", lambda *a, **k: pytest.fail("re-encoded")
    )
    again, path2 = load_or_build_cache(system.autoencoder, ae_ckpt, dm.train_set, tmp_path / "cache")
    assert path2 == path and torch.equal(again["mean"], latents["mean"])
    other = tiny_autoencoder_ckpt(tmp_path / "ae2.ckpt", channel_mult=(1, 2, 4))
    assert cache_file(tmp_path, other, dm.train_set).name != path.name
    assert cache_file(tmp_path, ae_ckpt, dm.val_set).name != path.name


def test_hflip_data_caches_both_orientations(tmp_path):
    system = _system(tiny_autoencoder_ckpt(tmp_path / "ae.ckpt"))
    dm = _data()
    flipping = dm.train_set
    flipping.transform = type(flipping.transform)(image_size=32, channels=3, hflip=True)
    moments = encode_dataset(system.autoencoder, flipping)
    x = torch.stack([to_tensor(flipping.source[int(j)]) for j in flipping.indices[:2]])
    with torch.no_grad():
        torch.testing.assert_close(
            moments["mean"][:2, 1], system.autoencoder.encode(x.flip(-1)).mean, atol=1e-5, rtol=0
        )
    assert moments["mean"].shape[1] == 2


def test_caption_dropout_rate_is_the_configured_one(tmp_path):
    ae_ckpt = tiny_autoencoder_ckpt(tmp_path / "ae.ckpt")
    n = 4000
    for p in (0.0, 0.3, 1.0):
        system = _system(ae_ckpt, cond_drop_prob=p)
        with torch.no_grad():
            cond = system.condition(prompts=["a small red circle in the top left corner"] * n)
            null = system.null_condition(1)
            torch.manual_seed(0)
            dropped = system.drop_condition(cond)
        is_null = (dropped["context"] == null["context"]).flatten(1).all(1)
        assert torch.equal(
            dropped["context_mask"], torch.where(is_null[:, None], null["context_mask"], cond["context_mask"])
        )
        rate = is_null.float().mean().item()
        assert abs(rate - p) < 0.03, (p, rate)  # binomial std at p = 0.3: 0.007
    assert null["context_mask"].sum() == 2  # the empty caption: BOS EOS


def test_guidance_scale_one_is_the_conditional_prediction_and_cfg_is_batched_right(tmp_path):
    system = _system(tiny_autoencoder_ckpt(tmp_path / "ae.ckpt")).eval()
    _perturb(system.net)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([50, 50, 50])
    with torch.no_grad():
        cond = system.condition(
            prompts=["a red circle", "a large blue square in the middle", "a tiny cyan triangle"]
        )
        uncond = system.null_condition(3)
        c, u = system.net(x, t, **cond), system.net(x, t, **uncond)
        assert not torch.allclose(c, u)

        def guided(s: float) -> torch.Tensor:  # x0 objective: x0_hat is the raw output
            denoise = Denoiser(system.net, process=system.process, objective="x0", cond=cond, uncond=uncond,
                               guidance=Guidance(scale=s))  # fmt: skip
            return denoise(x, 50, 0.6, 0.8)[0]

        torch.testing.assert_close(guided(1.0), c)
        # scale s: ONE batched call on [uncond; cond] (contexts and masks concatenated) = u + s (c - u)
        for s in (0.0, 3.0):
            torch.testing.assert_close(guided(s), u + s * (c - u), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("experiment", ["shapes_ldm_text", "celeba_ldm_text"])
def test_latent_experiments_keep_low_snr_net_errors_out_of_x0(experiment, tmp_path):
    """The first sampling steps must not turn a small net error into a large x0_hat error.

    Regression: shapes_ldm_text trained eps on the pixel DDPM's linear betas (sqrt(alpha-bar_T) = 0.0064).
    Its eps RMSE at t >= 900 (0.07-0.1) became an x0_hat error of std 10-16 at the first DDIM step
    (x0_hat = (x_t - sigma eps_hat) / alpha); deterministic samplers carried it to latents of std ~6 instead
    of 1, decoded as "colourful noise" (clip_x0, which hides this in pixel space, is rightly off for latents).
    """
    from hydra.utils import instantiate

    cfg = compose("train", [f"experiment={experiment}", "autoencoder_ckpt=unused"], tmp_path)
    schedule = instantiate(cfg.process)
    T = schedule.num_timesteps
    ab = float(schedule.alphas_cumprod[T - 1])
    alpha, sigma = ab**0.5, (1 - ab) ** 0.5
    g = torch.Generator().manual_seed(0)
    x_t, out = torch.randn(4096, generator=g), torch.randn(4096, generator=g)
    error = 0.1 * torch.randn(4096, generator=g)  # the shapes LDM's eps RMSE near t = T after 500 steps
    objective = get_objective(cfg.model.objective)
    x0, _ = objective.denoised(out, x_t, alpha, sigma)
    x0_err, _ = objective.denoised(out + error, x_t, alpha, sigma)
    assert (x0_err - x0).std() < 0.5, (
        "scaled latents have std 1: x0_hat at t = T must not be dominated by net error"
    )


def test_cross_attention_levels_without_self_attention():
    torch.manual_seed(0)
    net = UNet(
        in_channels=4, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(),
        cross_attention_levels=(0,), num_heads=2, context_dim=6,
    )  # fmt: skip
    _perturb(net)
    level0 = net.down[0].attn
    assert level0.self_attn is None and level0.cross_attn is not None and net.down[2].attn is None
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 70])
    ctx, mask = torch.randn(2, 5, 6), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    other = ctx.clone()
    other[~mask] = 10 * torch.randn(int((~mask).sum()), 6)
    torch.testing.assert_close(
        net(x, t, context=ctx, context_mask=mask), net(x, t, context=other, context_mask=mask)
    )
    changed = ctx.clone()
    changed[:, 0] += 1.0
    assert not torch.allclose(
        net(x, t, context=ctx, context_mask=mask), net(x, t, context=changed, context_mask=mask)
    )
    with pytest.raises(ValueError, match="cross_attention_levels"):
        UNet(channel_mult=(1, 2), cross_attention_levels=(2,), context_dim=4)


def test_text_to_image_run_samples_from_its_checkpoint_alone(tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from diffusion_lab.checkpoints import load_system
    from diffusion_lab.sample import sample
    from diffusion_lab.train import train

    from conftest import CONF_DIR

    over = ["experiment=shapes_ldm_text", "trainer.max_steps=2", "trainer.enable_progress_bar=false"]
    over += [*overrides_for("shapes_ldm_text", tmp_path), "callbacks.prompt_adherence=null"]
    over += [
        "callbacks.image_logger.every_n_steps=2",
        "callbacks.image_logger.prompts=[a red circle,a blue square]",
    ]
    train(compose("train", over, tmp_path / "run"))
    assert (
        tmp_path / "run" / "samples" / "step_000002.txt"
    ).read_text() == "row 0: a red circle\nrow 1: a blue square\n"
    (tmp_path / "ae.ckpt").unlink()  # the text-to-image checkpoint carries its autoencoder
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    model, config = load_system(ckpt)
    assert config["model"]["autoencoder_ckpt"] == str(tmp_path / "ae.ckpt")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose(
            "sample",
            [
                f"ckpt={ckpt}",
                "sampler.steps=2",
                "n=3",
                "prompt=a large green square",
                "guidance_scale=4",
                f"out={tmp_path / 's'}",
            ],
        )
    info = sample(cfg)
    data = np.load(tmp_path / "s" / "samples.npz")
    assert data["images"].shape == (3, 32, 32, 3) and list(data["prompts"]) == ["a large green square"] * 3
    assert info["guidance_scale"] == 4 and json.loads((tmp_path / "s" / "sample.json").read_text())["n"] == 3
    # the adherence table of a checkpoint (shapes detector) at two guidance scales
    from diffusion_lab.metrics.adherence import main as adherence_main

    adherence_main([str(ckpt), "--guidance", "1", "3", "--steps", "2", "--prompts", "2", "--per-prompt", "1",
                    "--out", str(tmp_path / "adh.json")])  # fmt: skip
    table = json.loads((tmp_path / "adh.json").read_text())
    assert set(table) == {"1.0", "3.0"} and set(table["1.0"]) == {
        "colour",
        "shape",
        "size",
        "position",
        "all",
    }
    # unconditional sampling of a text model = the empty caption (same as guidance at scale 1 of "")
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, *model.sample_shape, generator=g)
    a = model.sample(sampler=get_sampler("ddim", steps=2), x_T=x_T)
    b = model.sample(sampler=get_sampler("ddim", steps=2), x_T=x_T, cond=model.condition(prompts=["", ""]))
    torch.testing.assert_close(a, b)


def test_mismatched_shapes_fail_with_one_line(tmp_path):
    ae_ckpt = tiny_autoencoder_ckpt(tmp_path / "ae.ckpt")
    cfg = compose(
        "train",
        [
            "experiment=shapes_ldm_text",
            f"autoencoder_ckpt={ae_ckpt}",
            *TINY_SHAPES,
            *TINY_TEXT,
            "model.net.in_channels=3",
        ],
        tmp_path,
    )
    from hydra.utils import instantiate

    with pytest.raises(Exception, match="in_channels=4"):
        instantiate(cfg.model, _convert_="all")
    with pytest.raises(FileNotFoundError, match="autoencoder checkpoint not found"):
        _system(tmp_path / "nope.ckpt")
