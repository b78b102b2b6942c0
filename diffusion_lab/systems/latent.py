"""Latent diffusion (Rombach et al. 2022): a denoising net on scaled latents of a frozen stage-1 autoencoder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from diffusion_lab.checkpoints import autoencoder_checkpoint_block, load_autoencoder, sub_state
from diffusion_lab.diffusion.utils import randn_like
from diffusion_lab.nets.text import TextEncoder
from diffusion_lab.systems.diffusion import DiffusionSystem


class LatentDiffusionSystem(DiffusionSystem):
    """Diffusion training (any formulation) on x0 = scale_factor * z, z ~ q(z | image) of a frozen AutoencoderKL; samples are decoded.

    Conditioning: class labels (when the net has `num_classes`) and/or text (when a `text_encoder` is
    given: batch captions -> context (B, L, D) + mask for the net's cross-attention). Classifier-free
    guidance: with probability `cond_drop_prob` a sample's condition becomes the null one (class id
    `num_classes`, the encoding of the empty caption). `autoencoder_ckpt` is a stage-1 checkpoint (its
    stored scale factor is used); the autoencoder never trains. `latent_cache`: a folder where the
    training set's posterior moments are cached once per (autoencoder, data) pair (null = encode each batch).
    """

    def __init__(
        self,
        *,
        autoencoder_ckpt: str,
        text_encoder: TextEncoder | None = None,
        latent_cache: str | None = None,
        **kwargs: Any,
    ) -> None:
        """``kwargs``: everything DiffusionSystem takes (net, process, objective, optimizer, ...)."""
        super().__init__(**kwargs)
        self.save_hyperparameters(
            ignore=["net", "process", "optimizer", "lr_scheduler", "text_encoder", "kwargs"]
        )
        autoencoder, scale_factor = load_autoencoder(autoencoder_ckpt)
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        self.scale_factor = float(scale_factor)
        self.autoencoder_ckpt = str(autoencoder_ckpt)
        self.text_encoder = text_encoder
        self.latent_cache = latent_cache
        self._check_shapes()

    def _check_shapes(self) -> None:
        ae, net = self.autoencoder, self.net
        if net.in_channels != ae.latent_channels or net.out_channels != ae.latent_channels:
            raise ValueError(
                f"the net works on {net.in_channels} channels but the autoencoder's latents have "
                f"{ae.latent_channels}: set model.net.in_channels={ae.latent_channels}"
            )
        ae.latent_shape(
            self.image_size
        )  # raises when image_size is not a multiple of the downsampling factor
        context_dim = net.context_dim
        if self.text_encoder is not None and context_dim != self.text_encoder.dim:
            raise ValueError(
                f"the net's context_dim is {context_dim} but the text encoder gives {self.text_encoder.dim}-dim "
                f"tokens: set model.net.context_dim={self.text_encoder.dim}"
            )
        if self.text_encoder is None and context_dim is not None:
            raise ValueError("the net has cross-attention (context_dim) but no text_encoder is given")

    def train(self, mode: bool = True):
        super().train(mode)
        self.autoencoder.eval()  # frozen: never in training mode
        return self

    # ----------------------------------------------------------------- conditioning
    @property
    def is_text_conditional(self) -> bool:
        return self.text_encoder is not None

    def condition(
        self, *, labels: torch.Tensor | None = None, prompts: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """As DiffusionSystem.condition, plus `prompts` -> `context` (B, L, D) / `context_mask` (B, L)."""
        cond = super().condition(labels=labels)
        if prompts is not None:
            if self.text_encoder is None:
                raise ValueError("prompts given, but this model is not text-conditional")
            context, mask = self.text_encoder(list(prompts))
            cond.update(context=context, context_mask=mask)
        return cond

    # ----------------------------------------------------------------- latent space
    def batch_x0(self, batch: dict, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """x0 = scale_factor * (mean + std * eps): posterior sample from the images, or from cached moments."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"], batch["latent_std"]  # (B, C, h, w) each
        else:
            with torch.no_grad():
                posterior = self.autoencoder.encode(batch["image"])
            mean, std = posterior.mean, posterior.std
        return self.scale_factor * (mean + std * randn_like(mean, generator).to(mean.dtype))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled posterior means (deterministic)."""
        return self.scale_factor * self.autoencoder.encode(images).mean

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1]."""
        return self.autoencoder.decode(x0 / self.scale_factor).clamp(-1, 1)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.autoencoder.latent_shape(self.image_size)

    clip_x0 = False  # latents are not bounded like pixels

    @torch.no_grad()
    def sample(self, *, cond: dict[str, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
        """As DiffusionSystem.sample; a text model without a prompt samples from the empty caption."""
        if self.text_encoder is not None and not (cond and "context" in cond):
            x_T = kwargs.get("x_T")
            n = x_T.shape[0] if x_T is not None else kwargs.get("num_samples")
            null = self.null_condition(n)
            cond = {**{k: v for k, v in null.items() if k.startswith("context")}, **(cond or {})}
        return super().sample(cond=cond, **kwargs)

    # ----------------------------------------------------------------- latent cache
    def on_fit_start(self) -> None:
        if self.latent_cache is None:
            return
        from diffusion_lab.data.base import ImageDataset
        from diffusion_lab.data.latents import CachedLatentDataset, load_or_build_cache

        dm = self.trainer.datamodule
        train_set = getattr(dm, "train_set", None)
        if not isinstance(train_set, ImageDataset):
            rank_zero_warn(f"latent_cache skipped: the data module's train_set is {type(train_set).__name__}")
            return
        strategy = self.trainer.strategy
        if self.trainer.is_global_zero:
            load_or_build_cache(
                self.autoencoder, self.autoencoder_ckpt, train_set, self.latent_cache, device=self.device
            )
        strategy.barrier("latent_cache")
        latents, path = load_or_build_cache(
            self.autoencoder, self.autoencoder_ckpt, train_set, self.latent_cache, build=False
        )
        dm.train_set = CachedLatentDataset(train_set, latents)  # the train loader is built after this hook
        rank_zero_info(f"latent cache: training on {path}")

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The checkpoint is itself a stage-1 checkpoint: `load_autoencoder(ldm.ckpt)` works, so the
        # model can be rebuilt from this file alone (checkpoints.load_system points autoencoder_ckpt here).
        state = checkpoint.get("state_dict") or self.state_dict()
        checkpoint["autoencoder"] = autoencoder_checkpoint_block(
            self.autoencoder, sub_state(state, "autoencoder."), self.scale_factor
        )
