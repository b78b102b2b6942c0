"""KL autoencoder training (stage 1): reconstruction + LPIPS + KL + hinge GAN with the adaptive weight."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric

from diffusion_lab.checkpoints import autoencoder_checkpoint_block, sub_state
from diffusion_lab.images import log_image
from diffusion_lab.metrics.image_quality import psnr, ssim
from diffusion_lab.nets.autoencoder import AutoencoderKL
from diffusion_lab.nets.discriminator import hinge_d_loss

RECONSTRUCTION_LOSSES = ("l1", "l2")


def adaptive_weight(
    nll_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    *,
    eps: float = 1e-4,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """||grad nll|| / (||grad g_loss|| + eps) at the decoder's last layer, clamped, detached (Esser et al. 2021).

    taming-transformers / latent diffusion `calculate_adaptive_weight`: balances the GAN term against the
    reconstruction(+perceptual) term; multiply by the discriminator weight.
    """
    (nll_grads,) = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)
    (g_grads,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    return (nll_grads.norm() / (g_grads.norm() + eps)).clamp(0.0, max_weight).detach()


class AutoencoderSystem(L.LightningModule):
    """Trains an AutoencoderKL (+ optional PatchGAN) with Lightning manual optimization (two optimizers).

    Loss (per-pixel means): rec + perceptual_weight * LPIPS + kl_weight * KL / (C H W)
    + disc_weight * adaptive_weight * hinge generator loss once `train_step >= disc_start`. KL is divided
    by the input size so that `kl_weight` means what it means in latent diffusion (where losses are sums).
    Before `disc_start` the discriminator neither runs nor trains.

    `train_step` counts training batches; Lightning's `global_step` counts optimizer steps, i.e. two per
    batch once the discriminator trains (so `trainer.max_steps` and step-based callbacks use that unit).
    When training ends, the latent scale factor 1 / std(z) is computed on training batches (with the EMA
    weights when Lightning's EMAWeightAveraging is used) and every checkpoint saved after that carries it in
    `checkpoint["autoencoder"]` (see `diffusion_lab.checkpoints.load_autoencoder`).
    """

    def __init__(
        self,
        *,
        net: AutoencoderKL,
        optimizer: Callable[..., torch.optim.Optimizer],
        discriminator: nn.Module | None = None,
        disc_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        reconstruction_loss: str = "l1",
        perceptual_weight: float = 1.0,
        vgg_weights: str | None = None,
        perceptual_samples: int | None = None,
        kl_weight: float = 1e-6,
        disc_weight: float = 0.5,
        disc_start: int = 50001,
        adaptive_weight_max: float = 1e4,
        grad_clip_val: float | None = None,
        scale_factor_batches: int = 16,
        num_grid_images: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(
                f"unknown reconstruction_loss {reconstruction_loss!r}; valid choices: {', '.join(RECONSTRUCTION_LOSSES)}"
            )
        for name, value in (
            ("perceptual_weight", perceptual_weight),
            ("kl_weight", kl_weight),
            ("disc_weight", disc_weight),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if perceptual_samples is not None and perceptual_samples < 1:
            raise ValueError(f"perceptual_samples must be >= 1 or null, got {perceptual_samples}")
        if scale_factor_batches < 1:
            raise ValueError(f"scale_factor_batches must be >= 1, got {scale_factor_batches}")
        self.save_hyperparameters(ignore=["net", "optimizer", "discriminator", "disc_optimizer"])
        self.automatic_optimization = False
        self.net = net
        self.discriminator = discriminator
        self.optimizer_factory = optimizer
        self.disc_optimizer_factory = disc_optimizer
        self.reconstruction_loss = reconstruction_loss
        self.perceptual_weight = perceptual_weight
        self.perceptual_samples = perceptual_samples
        self.kl_weight = kl_weight
        self.disc_weight = disc_weight
        self.disc_start = disc_start
        self.adaptive_weight_max = adaptive_weight_max
        self.grad_clip_val = grad_clip_val
        self.scale_factor_batches = scale_factor_batches
        self.num_grid_images = num_grid_images
        self.seed = seed
        self.train_step = 0
        self.scale_factor: float | None = None
        self.grid_paths: list[str] = []
        self._grid: tuple[torch.Tensor, torch.Tensor] | None = None
        # The frozen LPIPS net is kept out of the module tree: not checkpointed, not EMA-averaged, not optimised.
        perceptual = None
        if perceptual_weight > 0:
            from diffusion_lab.metrics.perceptual import LPIPS

            perceptual = LPIPS(vgg_weights=vgg_weights)
        object.__setattr__(self, "perceptual", perceptual)
        self.val_psnr = MeanMetric()
        self.val_ssim = MeanMetric()
        self.val_lpips = MeanMetric()

    # ----------------------------------------------------------------- losses
    def lpips(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS per sample (B,) with the frozen perceptual net (moved to the inputs' device on first use)."""
        if self.perceptual is None:
            raise RuntimeError("LPIPS is disabled (perceptual_weight=0)")
        if self.perceptual.shift.device != x.device:
            self.perceptual.to(x.device)
        return self.perceptual(x, y)

    def reconstruction_terms(
        self, x: torch.Tensor, xrec: torch.Tensor, *, perceptual_samples: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(pixel loss, mean LPIPS or None, nll = pixel + perceptual_weight * LPIPS), all scalars.

        With `perceptual_samples` = n, LPIPS is averaged over the first n images only (the VGG pass is
        the dominant cost on a CPU; on shuffled batches this is an unbiased estimate).
        """
        diff = xrec - x  # (B, C, H, W)
        rec = diff.abs().mean() if self.reconstruction_loss == "l1" else diff.pow(2).mean()
        if self.perceptual is None:
            return rec, None, rec
        n = perceptual_samples or x.shape[0]
        p = self.lpips(xrec[:n], x[:n]).mean()
        return rec, p, rec + self.perceptual_weight * p

    def kl_term(self, posterior, x: torch.Tensor) -> torch.Tensor:
        """Mean KL per sample divided by the number of input elements (C H W)."""
        return posterior.kl().mean() / x[0].numel()

    @property
    def disc_active(self) -> bool:
        return self.discriminator is not None and self.train_step >= self.disc_start

    # ----------------------------------------------------------------- training
    def configure_optimizers(self):
        opt_ae = self.optimizer_factory(self.net.parameters())
        if self.discriminator is None:
            return opt_ae
        opt_d = (self.disc_optimizer_factory or self.optimizer_factory)(self.discriminator.parameters())
        return [opt_ae, opt_d]

    def _step(self, opt, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.grad_clip_val is not None:
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip_val, gradient_clip_algorithm="norm")
        opt.step()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["image"]  # (B, C, H, W) in [-1, 1]
        b = x.shape[0]
        opts = self.optimizers()
        opt_ae, opt_d = (opts, None) if self.discriminator is None else opts
        logs: dict[str, torch.Tensor] = {}

        # autoencoder (generator) step
        if opt_d is not None:
            self.toggle_optimizer(opt_ae)  # discriminator params frozen for this backward
        posterior = self.net.encode(x)  # over (B, C_z, h, w)
        xrec = self.net.decode(posterior.sample())  # (B, C, H, W)
        rec, p, nll = self.reconstruction_terms(x, xrec, perceptual_samples=self.perceptual_samples)
        kl = self.kl_term(posterior, x)
        loss = nll + self.kl_weight * kl
        if self.disc_active:
            g_loss = -self.discriminator(xrec).mean()
            d_weight = x.new_zeros(())
            if self.disc_weight > 0:
                d_weight = self.disc_weight * adaptive_weight(
                    nll, g_loss, self.net.last_layer, max_weight=self.adaptive_weight_max
                )
            loss = loss + d_weight * g_loss
            logs.update({"train/g_loss": g_loss.detach(), "train/d_weight": d_weight})
        self._step(opt_ae, loss)
        if opt_d is not None:
            self.untoggle_optimizer(opt_ae)
        logs.update({"train/loss": loss.detach(), "train/rec_loss": rec.detach(), "train/kl": kl.detach()})
        if p is not None:
            logs["train/lpips"] = p.detach()

        # discriminator step (hinge loss), only from disc_start on
        if self.disc_active:
            self.toggle_optimizer(opt_d)
            logits_real = self.discriminator(x.detach())  # (B, 1, H', W')
            logits_fake = self.discriminator(xrec.detach())
            d_loss = hinge_d_loss(logits_real, logits_fake)
            self._step(opt_d, d_loss)
            self.untoggle_optimizer(opt_d)
            logs.update(
                {
                    "train/d_loss": d_loss.detach(),
                    "train/logits_real": logits_real.detach().mean(),
                    "train/logits_fake": logits_fake.detach().mean(),
                }
            )
        self.train_step += 1
        # DDP: means over ranks (a few scalar all-reduces per step; no-ops on one device)
        self.log_dict(logs, prog_bar=False, batch_size=b, sync_dist=True)
        self.log("train/psnr", psnr(xrec.detach(), x).mean(), prog_bar=True, batch_size=b, sync_dist=True)
        return loss.detach()

    # ----------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]  # (B, C, H, W)
        b = x.shape[0]
        posterior = self.net.encode(x)
        xrec = self.net.decode(posterior.mode())  # (B, C, H, W), deterministic
        rec, p, nll = self.reconstruction_terms(x, xrec)
        kl = self.kl_term(posterior, x)
        self.val_psnr.update(psnr(xrec, x))
        self.val_ssim.update(ssim(xrec, x))
        self.log("val/psnr", self.val_psnr, prog_bar=True, batch_size=b)
        self.log("val/ssim", self.val_ssim, batch_size=b)
        if p is not None:
            self.val_lpips.update(self.lpips(xrec, x))
            self.log("val/lpips", self.val_lpips, batch_size=b)
        self.log_dict(
            {"val/rec_loss": rec, "val/kl": kl, "val/loss": nll + self.kl_weight * kl},
            batch_size=b,
            sync_dist=True,
        )
        if batch_idx == 0 and self.num_grid_images > 0:
            n = self.num_grid_images
            self._grid = (x[:n].detach().cpu(), xrec[:n].detach().cpu())

    def on_validation_epoch_end(self) -> None:
        grid, self._grid = self._grid, None
        if grid is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        path = Path(self.trainer.default_root_dir) / "samples" / f"recon_step{self.train_step:06d}.png"
        save_reconstruction_grid(*grid, path)
        self.grid_paths.append(str(path))
        log_image(self.trainer.loggers, "reconstructions", path, step=self.trainer.global_step)

    # ----------------------------------------------------------------- latent scale factor
    @torch.no_grad()
    def compute_scale_factor(self, dataloader: Iterable, *, max_batches: int | None = None) -> float:
        """1 / std of posterior samples z over up to `max_batches` batches (Rombach et al. 2022, sec. 4.3.2)."""
        max_batches = self.scale_factor_batches if max_batches is None else max_batches
        was_training = self.net.training
        self.net.eval()
        g = torch.Generator(device=self.device).manual_seed(self.seed)
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)  # sum, sum of squares, count
        for i, batch in enumerate(dataloader):
            if i >= max_batches:
                break
            x = (batch["image"] if isinstance(batch, dict) else batch).to(self.device)
            z = self.net.encode(x).sample(g).double()  # (B, C_z, h, w)
            stats += torch.stack([z.sum(), z.pow(2).sum(), z.new_tensor(z.numel())])
        self.net.train(was_training)
        if self._trainer is not None:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        if stats[2] == 0:
            raise ValueError("compute_scale_factor got an empty dataloader")
        mean = stats[0] / stats[2]
        std = math.sqrt(max(float(stats[1] / stats[2] - mean**2), 0.0))
        if not std > 0:
            raise ValueError("latents have zero variance: cannot compute the scale factor")
        return 1.0 / std

    def on_train_end(self) -> None:
        # Runs after the callbacks' on_train_end, i.e. after EMAWeightAveraging copied the EMA weights in.
        loader = self.trainer.train_dataloader
        if loader is None:
            raise RuntimeError("no training dataloader to compute the latent scale factor on")
        self.scale_factor = self.compute_scale_factor(loader)
        rank_zero_info(f"latent scale factor (1 / std of z): {self.scale_factor:.5f}")

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs after the callbacks' hooks: checkpoint["state_dict"] already holds the EMA weights if any.
        # The same tensors are referenced (not copied), so torch.save stores them once.
        state = checkpoint.get("state_dict") or self.state_dict()
        checkpoint["autoencoder"] = autoencoder_checkpoint_block(
            self.net, sub_state(state, "net."), self.scale_factor, ema="current_model_state" in checkpoint
        )
        checkpoint["autoencoder_system"] = {"train_step": self.train_step}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.scale_factor = (checkpoint.get("autoencoder") or {}).get("scale_factor")
        self.train_step = int((checkpoint.get("autoencoder_system") or {}).get("train_step", 0))

    @property
    def summary(self) -> dict[str, Any]:
        return {"scale_factor": self.scale_factor, "reconstruction_grids": list(self.grid_paths)}


def save_reconstruction_grid(inputs: torch.Tensor, recons: torch.Tensor, path: str | Path) -> Path:
    """PNG of (input | reconstruction) pairs side by side, about square, >= 512 px; images in [-1, 1]."""
    from einops import rearrange

    from diffusion_lab.images import make_grid, save_png

    n = inputs.shape[0]
    pairs = rearrange(torch.stack([inputs, recons.clamp(-1, 1)], dim=1), "n two c h w -> (n two) c h w")
    per_row = max(1, math.ceil(math.sqrt(n)))
    return save_png(make_grid(pairs, nrow=2 * per_row), path, min_size=512)
