"""Shapes data: the detector reads back exactly what was drawn; captions and one-hot attributes agree."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from diffusion_lab.data.shapes import (
    ATTRIBUTE_NAMES,
    ATTRIBUTES,
    JITTER,
    ShapesDataModule,
    detect_shapes,
    draw_shape,
)
from diffusion_lab.data.transforms import to_tensor
from diffusion_lab.metrics.adherence import attribute_adherence, shapes_prompts


def test_detector_recovers_every_drawn_attribute_exactly():
    combos = [dict(zip(ATTRIBUTES, c)) for c in itertools.product(*ATTRIBUTES.values())]
    offsets = [(0, 0), (-JITTER, -JITTER), (JITTER, JITTER), (-JITTER, JITTER), (JITTER, -JITTER)]
    drawn, truth = [], []
    for attrs, off in itertools.product(combos, offsets):
        drawn.append(draw_shape(attrs, offset=off))
        truth.append(attrs)
    assert len(truth) == 3 * 6 * 3 * 5 * 5
    assert detect_shapes(np.stack(drawn)) == truth
    # the float (N, 3, H, W) in [-1, 1] path (what a sampler returns) gives the same answers
    some = list(range(0, len(drawn), 37))
    images = torch.stack([to_tensor(drawn[i]) for i in some])
    assert detect_shapes(images) == [truth[i] for i in some]


def test_detector_reports_nothing_on_a_blank_image_and_checks_shapes():
    assert detect_shapes(np.zeros((1, 32, 32, 3), np.uint8)) == [dict.fromkeys(ATTRIBUTES)]
    with pytest.raises(ValueError, match="expected uint8 images"):
        detect_shapes(np.zeros((1, 16, 16, 3), np.uint8))


def test_data_module_captions_and_attributes_match_the_pixels():
    dm = ShapesDataModule(num_images=40, captions=True, batch_size=40, val_fraction=0.25, test_fraction=0.25)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    images = ((batch["image"] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for found, onehot, caption in zip(detect_shapes(images), batch["attributes"], batch["caption"]):
        names = {ATTRIBUTE_NAMES[k] for k in torch.nonzero(onehot).flatten().tolist()}
        assert names == {f"{k}={v}" for k, v in found.items()}
        assert found["colour"] in caption and found["shape"] in caption
    # validation captions are fixed per item; training captions vary
    assert dm.val_set.caption(0) == dm.val_set.caption(0) == batch["caption"][0]
    assert len({dm.train_set[0]["caption"] for _ in range(30)}) > 1


def test_attribute_adherence_by_hand():
    targets = [
        {"colour": "red", "shape": "circle"},
        {"colour": "blue", "shape": "square"},
        {"colour": "red", "shape": "triangle"},
        {"colour": "green", "shape": "circle"},
    ]
    detected = [
        {"colour": "red", "shape": "circle", "size": "small", "position": "center"},
        {"colour": "blue", "shape": "circle", "size": "small", "position": "center"},
        dict.fromkeys(ATTRIBUTES),
        {"colour": "green", "shape": "circle", "size": "large", "position": "center"},
    ]
    assert attribute_adherence(detected, targets) == {"colour": 0.75, "shape": 0.5, "all": 0.5}
    prompts, attrs = shapes_prompts(5, seed=3)
    assert prompts == shapes_prompts(5, seed=3)[0]
    assert all(a["colour"] in p and a["shape"] in p for p, a in zip(prompts, attrs))
