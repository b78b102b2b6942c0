"""CLIP-style contrastive pretraining of a text encoder against an image tower (Radford et al. 2021)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lab.nets.text import TextEncoder
from diffusion_lab.systems.optim import build_optimizers


def info_nce(text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP: mean of the text->image and image->text cross-entropies over the N x N
    similarities `logit_scale * text @ image.T` of L2-normalised embeddings; matching pairs on the diagonal."""
    logits = logit_scale * text @ image.T  # (N, N)
    target = torch.arange(len(text), device=text.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def retrieval_hits(
    similarity: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int]
) -> dict[int, torch.Tensor]:
    """Per query (row): is a relevant gallery item among its top-k? similarity, relevant: (Q, G) -> {k: (Q,) bool}."""
    order = similarity.topk(min(max(ks), similarity.shape[1]), dim=1).indices  # (Q, K)
    found = relevant.gather(1, order)  # (Q, K) bool
    return {k: found[:, :k].any(dim=1) for k in ks}


class ContrastiveSystem(L.LightningModule):
    """Text tower (encoder -> pooled -> linear) and image tower (-> linear) trained with symmetric InfoNCE.

    The temperature is learned as logit_scale = log(1 / T), clipped at `max_logit_scale` (CLIP). Validation
    logs the InfoNCE loss and caption-to-image retrieval top-k over the whole held-out split: a hit when the
    caption's own image is among the k nearest images (`retrieval_top{k}`), and, when batches carry
    `attributes`, when an image with the same attributes is (`retrieval_attr_top{k}`); also written to
    `<run>/retrieval.json`. `text_encoder.*` weights of its checkpoint initialise a text-to-image model.
    """

    def __init__(
        self,
        *,
        text_encoder: TextEncoder,
        image_encoder: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        embed_dim: int = 128,
        pooling: str = "mean",
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        retrieval_top_k: Sequence[int] = (1, 5),
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "eos"):
            raise ValueError(f"unknown pooling {pooling!r}; valid choices: mean, eos")
        if not 0 < init_temperature:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
        self.save_hyperparameters(ignore=["text_encoder", "image_encoder", "optimizer", "lr_scheduler"])
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.text_proj = nn.Linear(text_encoder.dim, embed_dim, bias=False)
        self.image_proj = nn.Linear(image_encoder.out_dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.pooling = pooling
        self.max_logit_scale = max_logit_scale
        self.retrieval_top_k = tuple(int(k) for k in retrieval_top_k)
        self._val: list[dict[str, torch.Tensor]] = []
        self.retrieval: dict[str, float] = {}

    # ----------------------------------------------------------------- towers
    def embed_text(self, captions: Sequence[str]) -> torch.Tensor:
        context, mask = self.text_encoder(list(captions))  # (B, L, D), (B, L)
        return F.normalize(
            self.text_proj(TextEncoder.pool(context, mask, mode=self.pooling)), dim=-1
        )  # (B, E)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_encoder(images)), dim=-1)  # (B, E)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(self.max_logit_scale)).exp()

    # ----------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        text, image = self.embed_text(batch["caption"]), self.embed_images(batch["image"])
        loss = info_nce(text, image, self.scale())
        b = len(image)
        with torch.no_grad():
            acc = ((text @ image.T).argmax(dim=1) == torch.arange(b, device=self.device)).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log_dict(
            {"train/batch_top1": acc, "train/temperature": 1.0 / self.scale().detach()}, batch_size=b
        )
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        text, image = self.embed_text(batch["caption"]), self.embed_images(batch["image"])
        self.log("val/loss", info_nce(text, image, self.scale()), batch_size=len(image), sync_dist=True)
        item = {"text": text, "image": image}
        if "attributes" in batch:
            item["attributes"] = batch["attributes"]
        self._val.append(item)

    def on_validation_epoch_end(self) -> None:
        parts, self._val = self._val, []
        if not parts:
            return
        gathered = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if self.trainer.world_size > 1:
            gathered = {k: self.all_gather(v).flatten(0, 1) for k, v in gathered.items()}
        self.retrieval = caption_to_image_retrieval(
            gathered["text"], gathered["image"], gathered.get("attributes"), ks=self.retrieval_top_k
        )
        self.log_dict({f"val/{k}": v for k, v in self.retrieval.items()}, prog_bar=False)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            out = Path(self.trainer.default_root_dir) / "retrieval.json"
            out.write_text(json.dumps({"step": self.global_step, **self.retrieval}, indent=2) + "\n")

    def configure_optimizers(self):
        return build_optimizers(self, self.optimizer_factory, self.lr_scheduler_factory)


@torch.no_grad()
def caption_to_image_retrieval(
    text: torch.Tensor,
    image: torch.Tensor,
    attributes: torch.Tensor | None = None,
    *,
    ks: Sequence[int] = (1, 5),
    chunk: int = 1024,
) -> dict[str, float]:
    """Top-k caption->image retrieval of N pairs (normalised embeddings (N, E)); hits by item and by attributes."""
    n = len(text)
    hits: dict[str, list[torch.Tensor]] = {}
    for start in range(0, n, chunk):
        q = slice(start, min(n, start + chunk))
        sim = text[q] @ image.T  # (Q, N)
        own = torch.zeros_like(sim, dtype=torch.bool)
        own[torch.arange(sim.shape[0]), torch.arange(q.start, q.stop)] = True
        relevant = {"retrieval": own}
        if attributes is not None:
            relevant["retrieval_attr"] = (attributes[q, None, :] == attributes[None, :, :]).all(-1)  # (Q, N)
        for name, rel in relevant.items():
            for k, hit in retrieval_hits(sim, rel, ks).items():
                hits.setdefault(f"{name}_top{k}", []).append(hit)
    return {key: float(torch.cat(v).float().mean()) for key, v in hits.items()}
