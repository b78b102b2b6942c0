"""KL autoencoder contracts: posterior maths, adaptive GAN weight, discriminator start, training, checkpoints."""

from __future__ import annotations

import functools
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from diffusion_lab.checkpoints import load_autoencoder
from diffusion_lab.metrics.image_quality import psnr, ssim
from diffusion_lab.nets.autoencoder import AutoencoderKL, DiagonalGaussian
from diffusion_lab.nets.discriminator import NLayerDiscriminator, hinge_d_loss
from diffusion_lab.systems.autoencoder import AutoencoderSystem, adaptive_weight, save_reconstruction_grid


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def one_thread():
    """Tiny nets gain nothing from intra-op threads, and lose a lot when the 2 CPU cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class BlobImages(Dataset):
    """Deterministic 16x16 grey images: a bright Gaussian blob at a per-index position on a dark background."""

    def __init__(self, n: int, size: int = 16, offset: int = 0) -> None:
        g = torch.Generator().manual_seed(1234 + offset)
        centres = torch.rand(n, 2, generator=g) * (size - 6) + 3
        widths = torch.rand(n, generator=g) * 2 + 1.5
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        d2 = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
        self.images = (2 * torch.exp(-d2 / (2 * widths[:, None, None] ** 2)) - 1)[:, None]  # (N, 1, H, W)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": 0}


def tiny_net(**kw) -> AutoencoderKL:
    args = dict(
        in_channels=1,
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        latent_channels=2,
        norm_groups=8,
    )
    return AutoencoderKL(**{**args, **kw})


def tiny_system(*, discriminator: bool = True, **kw) -> AutoencoderSystem:
    args = dict(
        net=tiny_net(),
        discriminator=NLayerDiscriminator(in_channels=1, base_channels=8, num_layers=1)
        if discriminator
        else None,
        optimizer=functools.partial(torch.optim.Adam, lr=3e-3),
        perceptual_weight=0.0,
        disc_start=2,
        scale_factor_batches=2,
        num_grid_images=4,
    )
    return AutoencoderSystem(**{**args, **kw})


def tiny_trainer(tmp_path, *, max_steps: int, callbacks=(), **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        default_root_dir=str(tmp_path),
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        **kw,
    )


def loader(n: int = 32, batch_size: int = 8, offset: int = 0) -> DataLoader:
    return DataLoader(BlobImages(n, offset=offset), batch_size=batch_size, shuffle=False)


# ----------------------------------------------------------------------------- posterior
def test_kl_matches_closed_form_and_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    post = DiagonalGaussian(mean, logvar)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, torch.exp(0.5 * logvar)), torch.distributions.Normal(0.0, 1.0)
    )
    torch.testing.assert_close(post.kl(), ref.flatten(1).sum(1))
    # by hand: mean 1, var 1 -> 0.5 per element; mean 0, var e -> 0.5 (e - 2) per element
    assert DiagonalGaussian(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).kl().item() == pytest.approx(2.0)
    one = DiagonalGaussian(torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)).kl().item()
    assert one == pytest.approx(3 * 0.5 * (math.e - 2.0))
    assert DiagonalGaussian(torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)).kl().tolist() == [0.0, 0.0]


def test_posterior_sample_mode_clamp_and_generator():
    mean = torch.full((1, 1, 64, 64), 2.0)
    post = DiagonalGaussian(mean, torch.full_like(mean, math.log(0.25)))  # std 0.5
    s = post.sample(torch.Generator().manual_seed(0))
    assert s.mean().item() == pytest.approx(2.0, abs=0.03) and s.std().item() == pytest.approx(0.5, abs=0.02)
    torch.testing.assert_close(s, post.sample(torch.Generator().manual_seed(0)))
    assert torch.equal(post.mode(), mean)
    assert DiagonalGaussian(mean, torch.full_like(mean, 100.0)).logvar.max().item() == 20.0
    assert DiagonalGaussian(mean, torch.full_like(mean, -100.0)).logvar.min().item() == -30.0
    moments = torch.cat([mean, torch.zeros_like(mean)], dim=1)
    assert torch.equal(DiagonalGaussian.from_moments(moments).mean, mean)


@pytest.mark.parametrize("channel_mult,f", [((1, 2, 2), 4), ((1, 1, 2, 2), 8)])
def test_autoencoder_downsampling_factor_and_shapes(channel_mult, f):
    net = tiny_net(channel_mult=channel_mult, latent_channels=3, attention_levels=[1])
    assert net.downsampling_factor == f
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    post = net.encode(x)
    assert post.mean.shape == (2, 3, 32 // f, 32 // f) == (2, *net.latent_shape(32))
    xrec, post2 = net(x, sample_posterior=False)
    assert xrec.shape == x.shape
    torch.testing.assert_close(xrec, net.decode(post.mode()))
    with pytest.raises(ValueError, match="not divisible by the downsampling factor"):
        net.encode(torch.zeros(1, 1, 36 if f == 8 else 30, 32))
    with pytest.raises(ValueError, match="expected latents"):
        net.decode(torch.zeros(1, 5, 4, 4))


def test_init_kwargs_are_plain_python_and_rebuild_the_net():
    net = tiny_net(channel_mult=[1, 2], attention_levels=(1,))
    assert net.init_kwargs["channel_mult"] == [1, 2] and net.init_kwargs["out_channels"] == 1
    clone = AutoencoderKL(**net.init_kwargs)
    clone.load_state_dict(net.state_dict())  # same architecture
    with pytest.raises(ValueError, match="attention_levels"):
        tiny_net(attention_levels=[2])


# ----------------------------------------------------------------------------- GAN parts
def test_adaptive_weight_matches_hand_computation():
    w = torch.tensor([[0.5, -1.0], [2.0, 0.25]], requires_grad=True)
    a, b, c = (
        torch.tensor([[1.0, 2.0], [3.0, -1.0]]),
        torch.tensor([[0.0, 1.0], [1.0, 1.0]]),
        torch.tensor([[1.0, -2.0], [0.5, 3.0]]),
    )
    nll = ((w * a - b) ** 2).sum()
    g_loss = (w * c).sum() ** 2
    # d nll / dw = 2 a (w a - b);  d g / dw = 2 (sum w c) c
    grad_nll = 2 * a * (w.detach() * a - b)
    grad_g = 2 * (w.detach() * c).sum() * c
    expected = grad_nll.norm() / (grad_g.norm() + 1e-4)
    got = adaptive_weight(nll, g_loss, w)
    assert not got.requires_grad
    torch.testing.assert_close(got, expected)
    # by hand: grad_nll = [[1, -12], [30, 2.5]] -> norm sqrt(1051.25); grad_g = 8.5 c -> norm 8.5 sqrt(14.25)
    assert got.item() == pytest.approx(math.sqrt(1051.25) / (8.5 * math.sqrt(14.25) + 1e-4), rel=1e-6)
    assert got.item() == pytest.approx(1.010474, abs=1e-6)
    assert adaptive_weight(nll * 1e9, g_loss, w, max_weight=100.0).item() == 100.0


def test_patchgan_shapes_and_hinge_loss():
    for n, size, out in [(1, 16, 6), (2, 32, 6), (3, 64, 6)]:
        d = NLayerDiscriminator(in_channels=3, base_channels=8, num_layers=n)
        assert d(torch.zeros(2, 3, size, size)).shape == (2, 1, out, out)
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2] -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))


# ----------------------------------------------------------------------------- system
class Snapshot(Callback):
    """Records (train_step, discriminator params, net weights, logged keys) after every training batch."""

    def __init__(self) -> None:
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        d = [p.detach().clone() for p in pl_module.discriminator.parameters()]
        net = {k: v.clone() for k, v in pl_module.net.state_dict().items()}
        self.rows.append((pl_module.train_step, d, net, set(trainer.callback_metrics)))


def test_discriminator_starts_at_disc_start_and_adversarial_term_is_zero_before(tmp_path):
    torch.manual_seed(0)
    with_d = tiny_system(disc_start=2)
    without_d = tiny_system(discriminator=False)
    without_d.net.load_state_dict(with_d.net.state_dict())
    d0 = [p.detach().clone() for p in with_d.discriminator.parameters()]
    snap = Snapshot()
    # batches 1-2: one optimizer step each; batches 3-4: two (autoencoder + discriminator) -> 6 steps
    L.seed_everything(0)
    tiny_trainer(tmp_path, max_steps=6, callbacks=[snap]).fit(with_d, loader())
    L.seed_everything(0)
    tiny_trainer(tmp_path, max_steps=2).fit(without_d, loader())
    assert [r[0] for r in snap.rows] == [1, 2, 3, 4]
    for _, d, _, keys in snap.rows[:2]:  # before disc_start: the discriminator is untouched and unused
        assert all(torch.equal(p, q) for p, q in zip(d, d0))
        assert "train/g_loss" not in keys and "train/d_loss" not in keys
    for (_, prev, _, _), (_, cur, _, keys) in zip(
        snap.rows[1:], snap.rows[2:]
    ):  # from disc_start on it trains
        assert any(not torch.equal(p, q) for p, q in zip(prev, cur))
        assert {"train/g_loss", "train/d_weight", "train/d_loss"} <= keys
    # before disc_start the autoencoder takes exactly the steps it takes without a discriminator
    for k, v in without_d.net.state_dict().items():
        torch.testing.assert_close(snap.rows[1][2][k], v)
    assert any(not torch.equal(snap.rows[0][2][k], v) for k, v in without_d.net.state_dict().items())


def test_tiny_training_improves_reconstruction(tmp_path):
    torch.manual_seed(0)
    system = tiny_system(disc_start=10_000)
    held_out = BlobImages(16, offset=7).images
    with torch.no_grad():
        before = psnr(system.net(held_out, sample_posterior=False)[0], held_out).mean().item()
    L.seed_everything(0)
    tiny_trainer(tmp_path, max_steps=60).fit(system, loader(64, 16))
    with torch.no_grad():
        after = psnr(system.net(held_out, sample_posterior=False)[0], held_out).mean().item()
    assert after > before + 6.0, (before, after)
    assert after > 18.0, after


def test_scale_factor_lands_in_last_checkpoint_and_load_autoencoder_round_trips(tmp_path):
    torch.manual_seed(0)
    system = tiny_system(disc_start=3)
    raw = {}

    class RawWeights(Callback):  # listed before EMA: sees the raw (non-averaged) weights at train end
        def on_train_end(self, trainer, pl_module):
            raw.update({k: v.clone() for k, v in pl_module.net.state_dict().items()})

    mid = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2, save_top_k=-1, save_last=False)
    ema = EMAWeightAveraging(decay=0.5)
    trainer = tiny_trainer(tmp_path, max_steps=8, callbacks=[RawWeights(), ema, mid], val_check_interval=4)
    L.seed_everything(0)
    train_loader = loader(32, 8)
    trainer.fit(system, train_loader, val_dataloaders=loader(8, 8, offset=3))
    assert system.scale_factor is not None
    last = tmp_path / "last.ckpt"
    trainer.save_checkpoint(last)

    # the scale factor: 1 / std of posterior samples over the training batches, with the EMA weights
    g = torch.Generator().manual_seed(system.seed)
    with torch.no_grad():
        z = torch.cat([system.net.encode(b["image"]).sample(g) for b in list(train_loader)[:2]])
    assert system.scale_factor == pytest.approx(1.0 / z.double().std(unbiased=False).item(), rel=1e-6)

    net, scale = load_autoencoder(last)
    assert scale == system.scale_factor
    assert not net.training
    x = BlobImages(4, offset=5).images
    with torch.no_grad():
        torch.testing.assert_close(
            net.decode(net.encode(x).mode()), system.net.eval().decode(system.net.encode(x).mode())
        )
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["autoencoder"]["ema"] is True
    assert any(not torch.equal(raw[k], v) for k, v in net.state_dict().items()), "expected the EMA weights"

    # a checkpoint written during training has no scale factor yet; other files are refused clearly
    mid_files = sorted((tmp_path / "ckpts").glob("*.ckpt"))
    assert mid_files
    with pytest.raises(ValueError, match="no latent scale factor"):
        load_autoencoder(mid_files[0])
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_autoencoder(tmp_path / "nope.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a stage-1 autoencoder checkpoint"):
        load_autoencoder(tmp_path / "other.ckpt")

    # validation wrote metrics and an (input | reconstruction) grid into <default_root_dir>/samples
    assert {"val/psnr", "val/ssim", "val/loss"} <= set(trainer.callback_metrics)
    grids = sorted((tmp_path / "samples").glob("recon_step*.png"))
    assert grids and system.grid_paths


def test_reconstruction_grid_layout(tmp_path):
    from PIL import Image

    inputs = -torch.ones(4, 1, 8, 8)
    recons = torch.ones(4, 1, 8, 8)
    path = save_reconstruction_grid(inputs, recons, tmp_path / "g.png")
    img = torch.from_numpy(__import__("numpy").asarray(Image.open(path).convert("L"))).float()
    # 2 rows of 2 (input | reconstruction) pairs; each cell 10 px (1 px padding), upscaled to >= 256 px
    assert img.shape[1] == 2 * img.shape[0]
    s = img.shape[0] // 20
    cell = lambda r, c: img[(10 * r + 5) * s, (10 * c + 5) * s].item()  # noqa: E731
    assert [cell(0, c) for c in range(4)] == [0.0, 255.0, 0.0, 255.0]


def test_psnr_ssim_helpers():
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    y = x + 0.1  # constant error 0.1 on a range of 2 -> PSNR = 10 log10(4 / 0.01) = 26.02 dB
    y[1] = x[1] + 0.2
    torch.testing.assert_close(psnr(y.clamp(-1, 1), x.clamp(-1, 1)).shape, torch.Size([2]))
    xc = x.clamp(-0.7, 0.7)
    p = psnr(xc + torch.tensor([0.1, 0.2])[:, None, None, None], xc)
    torch.testing.assert_close(p, torch.tensor([10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.04)]))
    torch.testing.assert_close(ssim(xc, xc), torch.ones(2))
    assert (ssim(xc + 0.3 * torch.randn_like(xc), xc) < 0.9).all()
