"""CelebA data module on a tiny fixture in the official layout (JPEGs, attribute and partition text files)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lab.data.base import CorruptImageError, DataError, DatasetNotFoundError
from diffusion_lab.data.celeba import CELEBA_ATTRIBUTES, CelebADataModule

H, W, CROP = 24, 20, 12  # official images are 218 x 178 (H x W), usually cropped to 140
PARTITION = [0, 1, 2, 0, 0, 2, 1, 0, 0]  # files 000001..000009; 0/1/2 = train/val/test
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (40, 220, 220), (220, 40, 220),
           (128, 128, 128), (250, 250, 250), (10, 10, 10)]  # fmt: skip


def make_celeba(root: Path, *, seed: int = 0) -> dict:
    """img_align_celeba/*.jpg (a solid colour inside the crop, black border), list_attr + list_eval_partition."""
    rng = np.random.default_rng(seed)
    (root / "img_align_celeba").mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(len(PARTITION))]
    for name, colour in zip(names, COLOURS):
        arr = np.zeros((H, W, 3), np.uint8)
        arr[3:-3, 2:-2] = colour  # crop takes rows 6..18, cols 4..16: well inside the solid block
        Image.fromarray(arr).save(root / "img_align_celeba" / name, quality=95)
    values = rng.choice([-1, 1], size=(len(names), 40))
    lines = [str(len(names)), " ".join(CELEBA_ATTRIBUTES)]
    lines += [name + " " + " ".join(f"{v:2d}" for v in row) for name, row in zip(names, values)]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, PARTITION)))
    return {"names": names, "attributes": values > 0}


def _dm(root: Path, **kw) -> CelebADataModule:
    dm = CelebADataModule(data_dir=root, image_size=CROP, crop_size=CROP, **kw)
    dm.setup()
    return dm


@pytest.mark.parametrize("split,part", [("train_set", 0), ("val_set", 1), ("test_set", 2)])
def test_celeba_splits_pixels_and_attributes(tmp_path, split, part):
    ref = make_celeba(tmp_path)
    dm = _dm(tmp_path, hflip=False)
    ds = getattr(dm, split)
    expected = [j for j, p in enumerate(PARTITION) if p == part]
    assert [ds.info(i)["id"] for i in range(len(ds))] == [ref["names"][j] for j in expected]
    for i, j in enumerate(expected):
        item = ds[i]
        assert item["image"].shape == (3, CROP, CROP)
        colour = torch.tensor(COLOURS[j], dtype=torch.float32).view(3, 1, 1) / 127.5 - 1
        assert (item["image"] - colour).abs().max() < 12 / 127.5, f"{ref['names'][j]}: crop shows the border"
        assert item["attributes"].dtype == torch.float32 and item["attributes"].shape == (40,)
        assert item["attributes"].tolist() == ref["attributes"][j].astype(float).tolist()
    assert dm.attribute_names == CELEBA_ATTRIBUTES


def test_celeba_center_crop_is_exact(tmp_path):
    make_celeba(tmp_path)
    grad = (np.arange(H * W * 3).reshape(H, W, 3) % 251).astype(np.uint8)
    Image.fromarray(grad).save(tmp_path / "img_align_celeba" / "000001.jpg", format="PNG")  # lossless content
    dm = _dm(tmp_path, hflip=False)
    top, left = (H - CROP) // 2, (W - CROP) // 2
    expected = (
        torch.from_numpy(grad[top : top + CROP, left : left + CROP]).permute(2, 0, 1).float() / 127.5 - 1
    )
    torch.testing.assert_close(dm.train_set[0]["image"], expected, atol=1e-6, rtol=0)
    resized = CelebADataModule(data_dir=tmp_path, image_size=6, crop_size=CROP, hflip=False)
    resized.setup()
    assert resized.train_set[0]["image"].shape == (3, 6, 6)
    torch.testing.assert_close(resized.train_set[0]["image"].mean(), expected.mean(), atol=0.02, rtol=0)


def test_celeba_batches_and_captions(tmp_path):
    make_celeba(tmp_path)
    dm = _dm(tmp_path, captions=True, batch_size=2)
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"image", "attributes", "caption"}
    assert batch["image"].shape == (2, 3, CROP, CROP) and batch["attributes"].shape == (2, 40)
    assert all(isinstance(c, str) and c for c in batch["caption"])
    again = next(iter(dm.val_dataloader()))
    assert again["caption"] == batch["caption"]  # a fixed caption per image for evaluation
    torch.manual_seed(0)
    draws = {tuple(dm.train_set[i]["caption"] for i in range(len(dm.train_set))) for _ in range(6)}
    assert len(draws) > 1  # training draws captions at random


def test_celeba_missing_empty_and_malformed(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist.*list_attr_celeba.txt.*mmlab") as e:
        CelebADataModule(data_dir=tmp_path / "nope").setup()
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="folder is empty.*img_align_celeba"):
        CelebADataModule(data_dir=tmp_path / "empty").setup()
    root = tmp_path / "c"
    make_celeba(root)
    for p in (root / "img_align_celeba").iterdir():
        p.unlink()
    with pytest.raises(DatasetNotFoundError, match="img_align_celeba/ is empty"):
        CelebADataModule(data_dir=root).setup()
    root = tmp_path / "d"
    make_celeba(root)
    (root / "list_eval_partition.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="list_eval_partition.txt is missing"):
        CelebADataModule(data_dir=root).setup()
    root = tmp_path / "e"
    make_celeba(root)
    text = (root / "list_attr_celeba.txt").read_text().splitlines()
    text[4] = text[4].rsplit(" ", 2)[0]  # drop one value of the 3rd image
    (root / "list_attr_celeba.txt").write_text("\n".join(text))
    with pytest.raises(DataError, match="list_attr_celeba.txt line 5: expected a file name and 40 values"):
        CelebADataModule(data_dir=root).setup()
    root = tmp_path / "f"
    make_celeba(root)
    (root / "img_align_celeba" / "000004.jpg").unlink()
    with pytest.raises(DatasetNotFoundError, match="1 of the 9 images .* missing .*000004.jpg"):
        CelebADataModule(data_dir=root).setup()


def test_celeba_corrupt_image_named_or_skipped(tmp_path, caplog):
    make_celeba(tmp_path)
    (tmp_path / "img_align_celeba" / "000004.jpg").write_bytes(b"\xff\xd8\xff garbage, not a jpeg")
    dm = _dm(tmp_path, hflip=False)
    assert dm.train_set.info(1)["id"] == "000004.jpg"
    with pytest.raises(CorruptImageError, match="000004.jpg"):
        dm.train_set[1]
    with pytest.raises(CorruptImageError, match="000004.jpg"):
        for _ in dm.train_dataloader():
            pass
    dm = _dm(tmp_path, hflip=False, skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        item = dm.train_set[1]
    assert "000004.jpg" in caplog.text
    colour = torch.tensor(COLOURS[4], dtype=torch.float32).view(3, 1, 1) / 127.5 - 1  # the next train image
    assert (item["image"] - colour).abs().max() < 12 / 127.5
    assert item["attributes"].tolist() == dm.train_set[2]["attributes"].tolist()
