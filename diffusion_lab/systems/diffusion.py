"""Pixel-space diffusion system: a denoising net + noise process + objective + optimizer in Lightning."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch

from diffusion_lab.checkpoints import load_init_net
from diffusion_lab.diffusion import (
    Guidance,
    LossInputs,
    Process,
    get_loss_weighting,
    get_noise_levels,
    get_objective,
)
from diffusion_lab.diffusion.utils import randn_like
from diffusion_lab.nets.base import DenoisingNet, check_denoising_net
from diffusion_lab.systems.optim import build_optimizers


class DiffusionSystem(L.LightningModule):
    """Diffusion training on any formulation, for any `DenoisingNet` (UNet, DiT): a noise process (DDPM's discrete
    VP schedules, EDM / VE, rectified flow), an objective (eps / v / x0 / flow velocity / EDM preconditioning), a
    training noise-level distribution and a loss weighting, with per-sample CFG condition dropout.

    `process` and `objective` + `objective_opts` (e.g. {sigma_data: 0.5} for edm) choose the formulation;
    `noise_levels` (+ opts) draws training t (uniform, log_normal, logit_normal). `encode` / `decode` map
    images to the diffusion space and back (identity here; the latent system overrides them). `init_ckpt`: a
    diffusion checkpoint whose net weights (EMA) the net starts from (ECT's start from a trained edm run).
    Conditioning: `condition(labels=, prompts=)` (a batch's `label` -> `class_labels`). `clip_x0`: sampling
    clips x0_hat to [-1, 1], the range of pixels (the latent system turns it off: latents are unbounded).
    """

    def __init__(
        self,
        *,
        net: DenoisingNet,
        process: Process,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        objective: str = "eps",
        objective_opts: dict[str, float] | None = None,
        noise_levels: str = "uniform",
        noise_levels_opts: dict[str, float] | None = None,
        loss_weighting: str = "uniform",
        loss_weighting_opts: dict[str, float] | None = None,
        cond_drop_prob: float = 0.1,
        image_size: int,
        compile: bool = False,
        compile_options: dict[str, Any] | None = None,
        channels_last: bool = False,
        init_ckpt: str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        self.save_hyperparameters(ignore=["net", "process", "optimizer", "lr_scheduler"])
        self.net = net
        self.process = process
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.objective = get_objective(objective, **(objective_opts or {}))
        if (
            self.objective.name == "eps"
            and float(self.process.coefficients(torch.tensor([self.process.t_max]))[0][0]) == 0
        ):
            raise ValueError(
                f"eps prediction cannot recover x0 where alpha = 0, as at the end of the {self.process.name} process "
                "(zero terminal SNR, flow at t = 1): use model.objective=v, x0 or flow"
            )
        check_denoising_net(net)
        if init_ckpt is not None:  # start from a trained run's net (ECT: consistency from an edm checkpoint)
            load_init_net(self.net, init_ckpt)
        self.noise_levels = get_noise_levels(noise_levels, **(noise_levels_opts or {}))
        self.loss_weight = get_loss_weighting(loss_weighting, **(loss_weighting_opts or {}))
        self.cond_drop_prob = cond_drop_prob
        self.image_size = image_size
        self.compile_net = compile
        # torch.compile kwargs: mode, backend, fullgraph, ...
        self.compile_options = dict(compile_options or {})
        self.channels_last = channels_last
        if channels_last:  # NHWC activations: faster convolutions on tensor-core GPUs (slower on this CPU)
            self.net.to(memory_format=torch.channels_last)
        if compile:
            # in place and lazy (compiled at the first call): parameter names, hence checkpoints, unchanged; the
            # UNet compiles to one graph without breaks; EMA copies (deep copies) and samplers reuse it. Not in
            # `configure_model`: overriding that hook makes Lightning's WeightAveraging warn about sharding.
            self.net.compile(**self.compile_options)

    # ----------------------------------------------------------------- conditioning
    @property
    def num_classes(self) -> int | None:
        return self.net.num_classes

    @property
    def is_text_conditional(self) -> bool:
        return False

    @property
    def is_conditional(self) -> bool:
        return self.num_classes is not None or self.is_text_conditional

    def condition(
        self, *, labels: torch.Tensor | None = None, prompts: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """The net keyword arguments of class `labels` (B,) and / or `prompts` (B texts); empty for neither. Every
        path that conditions the net (training batches, CFG's null condition, sampling) comes through here."""
        if prompts is not None:
            raise ValueError("prompts given, but this model is not text-conditional")
        if labels is None:
            return {}
        if self.num_classes is None:
            raise ValueError("class labels given, but this model is not class-conditional")
        return {"class_labels": torch.as_tensor(labels, device=self.device).long()}

    def null_condition(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The null condition of classifier-free guidance: class id `num_classes`, the empty caption."""
        null = self.condition(
            labels=None if self.num_classes is None else torch.full((1,), self.num_classes),
            prompts=[""] if self.is_text_conditional else None,
        )
        return {k: v.expand(batch_size, *v.shape[1:]) for k, v in null.items()}

    def drop_condition(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Replace each sample's condition by the null one with probability `cond_drop_prob` (CFG training)."""
        if not cond or self.cond_drop_prob == 0.0:
            return cond
        b = next(iter(cond.values())).shape[0]
        drop = torch.rand(b, device=self.device) < self.cond_drop_prob  # (B,)
        null = self.null_condition(b)
        out = {}
        for key, value in cond.items():
            mask = drop.view(-1, *([1] * (value.ndim - 1)))
            out[key] = torch.where(mask, null[key], value)
        return out

    # ----------------------------------------------------------------- data space
    clip_x0 = True  # a property of the data space (pixels in [-1, 1] are clipped, latents are not)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the space diffusion runs in (identity for pixel space)."""
        return images

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Diffusion space -> images in [-1, 1]."""
        return x0.clamp(-1, 1)

    # ----------------------------------------------------------------- training
    def batch_x0(self, batch: dict, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """The clean sample x0 of a batch in diffusion space (the latent system samples its posterior)."""
        return self.encode(batch["image"])

    def diffusion_step(self, batch: dict, *, generator: torch.Generator | None = None) -> torch.Tensor:
        x0 = self.batch_x0(batch, generator=generator)  # (B, C, H, W)
        labels = batch.get("label") if self.num_classes is not None else None
        prompts = batch.get("caption") if self.is_text_conditional else None
        if (self.num_classes is not None and labels is None) or (
            self.is_text_conditional and prompts is None
        ):
            raise ValueError(
                "the model is conditional but the batch has no 'label' / 'caption' (data.captions=true)"
            )
        cond = self.condition(labels=labels, prompts=prompts)
        cond = self.drop_condition(cond) if self.training else cond
        return self.objective.loss(  # the one seam: generic, or a few-step objective's own loss
            LossInputs(
                net=self.net,
                x0=x0,
                process=self.process,
                noise_levels=self.noise_levels,
                weighting=self.loss_weight,
                cond=cond,
                null_condition=self.null_condition if self.is_conditional else None,
                generator=generator,
                memory_format=torch.channels_last if self.channels_last else torch.contiguous_format,
                step=self.global_step,
            )
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_step(batch)
        self.log(
            "train/loss",
            loss,
            prog_bar=True,
            on_step=True,
            on_epoch=False,
            batch_size=_batch_size(batch),
            sync_dist=True,  # DDP: the mean over ranks (one scalar all-reduce; a no-op on one device)
        )
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # fixed t and noise per batch so the validation loss is comparable across evaluations
        g = torch.Generator(device=self.device).manual_seed(batch_idx)
        loss = self.diffusion_step(batch, generator=g)
        self.log(
            "val/loss", loss, prog_bar=True, on_epoch=True, batch_size=_batch_size(batch), sync_dist=True
        )
        return loss

    def configure_optimizers(self):
        return build_optimizers(self, self.optimizer_factory, self.lr_scheduler_factory)

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        *,
        sampler: Callable[..., torch.Tensor],
        num_samples: int | None = None,
        x_T: torch.Tensor | None = None,
        cond: dict[str, torch.Tensor] | None = None,
        guidance: Guidance | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Draw images in [-1, 1]: x_T ~ N(0, I) -> sampler(net, guidance) -> x0 -> decode. `generator`: one, or one
        per sample (`generate.py`'s seeding rule); the sampler clips x0_hat to [-1, 1] as `clip_x0` says.
        `guidance` (``diffusion/guidance.py``): CFG scale, rescale, interval, or a guide net (autoguidance)."""
        if x_T is None:
            if num_samples is None:
                raise ValueError("give num_samples or x_T")
            x_T = randn_like(torch.empty((num_samples, *self.sample_shape), device=self.device), generator)
        x_T = x_T.to(self.device)
        guidance = guidance or Guidance()
        cond = cond or {}
        unguided = guidance.scale == 1.0 or guidance.guide is not None
        uncond = None if not cond or unguided else self.null_condition(x_T.shape[0])
        was_training = self.training
        self.eval()
        try:
            x0 = sampler(
                self.net,
                x_T,
                self.process,
                objective=self.objective,
                cond=cond,
                uncond=uncond,
                guidance=guidance,
                clip_x0=self.clip_x0,
                generator=generator,
                progress=progress,
            )
        finally:
            self.train(was_training)
        return self.decode(x0)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of x_T."""
        return (self.net.in_channels, self.image_size, self.image_size)


def _batch_size(batch: dict) -> int:
    """Number of items in a dict batch (images, or cached latents)."""
    return len(next(v for v in batch.values() if isinstance(v, torch.Tensor)))
