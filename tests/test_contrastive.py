"""CLIP-style pretraining: InfoNCE by hand, retrieval top-k, a tiny run whose text encoder seeds the LDM's."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EMAWeightAveraging

from diffusion_lab.data.captions import caption_words
from diffusion_lab.data.shapes import ShapesDataModule
from diffusion_lab.nets.classifier import ConvImageEncoder
from diffusion_lab.nets.text import TransformerTextEncoder, WordTokenizer
from diffusion_lab.systems.contrastive import (
    ContrastiveSystem,
    caption_to_image_retrieval,
    info_nce,
)


def test_info_nce_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1)
    image = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1)
    scale = 7.5
    total = 0.0
    for i in range(5):
        t2i = [scale * float(text[i] @ image[j]) for j in range(5)]
        i2t = [scale * float(image[i] @ text[j]) for j in range(5)]
        total += -t2i[i] + math.log(sum(math.exp(v) for v in t2i))
        total += -i2t[i] + math.log(sum(math.exp(v) for v in i2t))
    expected = total / (2 * 5)
    assert info_nce(text, image, scale).item() == pytest.approx(expected, rel=1e-12)
    # perfectly aligned pairs with a large scale -> loss near 0; swapping pairs -> large
    eye = torch.eye(4, dtype=torch.float64)
    assert info_nce(eye, eye, 100.0).item() < 1e-10
    assert info_nce(eye, eye.flip(0), 100.0).item() > 50


def test_retrieval_top_k_by_item_and_by_attributes():
    sim = torch.tensor(  # rows: captions, columns: images
        [[0.5, 0.9, 0.1, 0.2], [0.8, 0.3, 0.2, 0.1], [0.1, 0.2, 0.9, 0.3], [0.2, 0.1, 0.4, 0.7]]
    )  # own image ranked 2nd, 2nd, 1st, 1st
    text, image = torch.eye(4), sim.T.contiguous()  # text @ image.T == sim
    attrs = torch.tensor([[1, 0], [1, 0], [0, 1], [1, 1]])  # items 0 and 1 look the same
    r = caption_to_image_retrieval(text, image, attrs, ks=(1, 2))
    assert r["retrieval_top1"] == 0.5 and r["retrieval_top2"] == 1.0
    assert r["retrieval_attr_top1"] == 1.0
    assert caption_to_image_retrieval(text, image, ks=(1,), chunk=3) == {"retrieval_top1": 0.5}


def test_tiny_contrastive_run_logs_retrieval_and_seeds_an_encoder(tmp_path):
    torch.manual_seed(0)
    tok = WordTokenizer(vocabulary=caption_words("shapes"), max_length=16)
    system = ContrastiveSystem(
        text_encoder=TransformerTextEncoder(tokenizer=tok, dim=16, depth=1, num_heads=2),
        image_encoder=ConvImageEncoder(image_size=32, base_channels=8, out_dim=16),
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
        embed_dim=16,
        max_logit_scale=20.0,
    )
    assert system.scale().item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        system.logit_scale.fill_(10.0)
    assert system.scale().item() == pytest.approx(20.0)  # clipped at max_logit_scale
    dm = ShapesDataModule(num_images=80, captions=True, batch_size=16, val_fraction=0.2, test_fraction=0.1)
    ema = EMAWeightAveraging(decay=0.5, update_starting_at_step=0)  # averages buffers too
    trainer = L.Trainer(
        max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, val_check_interval=3, check_val_every_n_epoch=None, default_root_dir=tmp_path,
        callbacks=[ema],
    )  # fmt: skip
    trainer.fit(system, datamodule=dm)
    saved = json.loads((tmp_path / "retrieval.json").read_text())
    assert set(saved) == {
        "step",
        "retrieval_top1",
        "retrieval_top5",
        "retrieval_attr_top1",
        "retrieval_attr_top5",
    }
    assert 0 <= saved["retrieval_top1"] <= saved["retrieval_top5"] <= 1
    assert saved["retrieval_top1"] <= saved["retrieval_attr_top1"]
    ckpt = tmp_path / "c.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]  # EMA weights, fingerprint
    enc = TransformerTextEncoder(tokenizer=tok, dim=16, depth=1, num_heads=2, init_ckpt=str(ckpt))
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(v, saved[f"text_encoder.{k}"])
