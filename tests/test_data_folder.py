"""Image-folder data module: class subfolders or a flat folder, exact pixels, captions, corrupt files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lab.data.base import CorruptImageError, DataError, DatasetNotFoundError
from diffusion_lab.data.folder import ImageFolderDataModule


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _expected(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1


def make_classes(root: Path) -> dict[str, np.ndarray]:
    """root/{dog,cat,frog}/*.png, each 8x8 with a distinct value; returns {relative path: array}."""
    rng = np.random.default_rng(0)
    files = {}
    for name, n in (("dog", 3), ("cat", 2), ("frog", 3)):
        for i in range(n):
            rel = f"{name}/{i}.png" if i < 2 else f"{name}/nested/{i}.png"  # nested folders count too
            files[rel] = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            _png(root / rel, files[rel])
    return files


def test_folder_labels_from_sorted_subfolders_and_exact_pixels(tmp_path):
    files = make_classes(tmp_path)
    dm = ImageFolderDataModule(
        data_dir=tmp_path, image_size=8, hflip=False, val_fraction=0.25, test_fraction=0.25
    )
    assert dm.class_names == ["cat", "dog", "frog"] and dm.num_classes == 3  # known before setup
    dm.setup()
    seen = []
    for ds in (dm.train_set, dm.val_set, dm.test_set):
        for i in range(len(ds)):
            rel = ds.info(i)["id"]
            item = ds[i]
            assert item["label"] == ["cat", "dog", "frog"].index(rel.split("/")[0])
            torch.testing.assert_close(item["image"], _expected(files[rel]), atol=1e-6, rtol=0)
            seen.append(rel)
    assert sorted(seen) == sorted(files) and len(dm.val_set) == 2 and len(dm.test_set) == 2
    again = ImageFolderDataModule(data_dir=tmp_path, val_fraction=0.25, test_fraction=0.25)
    again.setup()
    assert again.val_set.indices.tolist() == dm.val_set.indices.tolist()  # seeded


def test_flat_folder_non_square_crop_and_grey(tmp_path):
    arr = np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3)
    _png(tmp_path / "wide.png", arr)
    _png(tmp_path / "b.png", np.zeros((6, 6, 3), np.uint8))
    (tmp_path / "notes.md").write_text("not an image")
    dm = ImageFolderDataModule(
        data_dir=tmp_path, image_size=6, hflip=False, val_fraction=0.0, test_fraction=0.0
    )
    dm.setup()
    assert dm.num_classes is None and len(dm.train_set) == 2
    i = [dm.train_set.info(k)["id"] for k in range(2)].index("wide.png")
    item = dm.train_set[i]
    assert "label" not in item
    torch.testing.assert_close(item["image"], _expected(arr[:, 2:8]), atol=1e-6, rtol=0)  # centred 6x6
    grey = ImageFolderDataModule(
        data_dir=tmp_path, image_size=6, channels=1, hflip=False, val_fraction=0.0, test_fraction=0.0
    )
    grey.setup()
    x = grey.train_set[i]["image"]
    pil_grey = np.asarray(Image.fromarray(arr[:, 2:8]).convert("L"))
    assert x.shape == (1, 6, 6)
    torch.testing.assert_close(x[0], torch.from_numpy(pil_grey).float() / 127.5 - 1, atol=1e-6, rtol=0)


def test_folder_flip_in_train_only(tmp_path):
    arr = np.zeros((4, 4, 3), np.uint8)
    arr[:, :2] = 255  # left half white
    for k in range(4):
        _png(tmp_path / f"{k}.png", arr)
    dm = ImageFolderDataModule(data_dir=tmp_path, image_size=4, val_fraction=0.25, test_fraction=0.25)
    dm.setup()
    torch.manual_seed(0)
    left_white = {bool(dm.train_set[0]["image"][:, :, 0].mean() > 0) for _ in range(20)}
    assert left_white == {True, False}
    assert all(dm.val_set[0]["image"][:, :, 0].mean() > 0 for _ in range(10))


def test_folder_captions_from_class_names_and_text_files(tmp_path):
    make_classes(tmp_path / "classes")
    dm = ImageFolderDataModule(data_dir=tmp_path / "classes", image_size=8, captions=True)
    dm.setup()
    for ds in (dm.train_set, dm.val_set):
        for i in range(len(ds)):
            item = ds[i]
            assert ["cat", "dog", "frog"][item["label"]] in item["caption"]
    flat = tmp_path / "flat"
    for k in range(3):
        _png(flat / f"{k}.png", np.zeros((4, 4, 3), np.uint8))
        (flat / f"{k}.txt").write_text(f"caption {k} one\ncaption {k} two\n")
    dm = ImageFolderDataModule(
        data_dir=flat, image_size=4, captions=True, val_fraction=0.0, test_fraction=0.0
    )
    dm.setup()
    ds = dm.train_set
    assert {ds.caption(i) for i in range(3)} == {f"caption {k} one" for k in range(3)}
    name = ds.info(0)["id"][0]
    assert ds.caption(0, 1) == f"caption {name} two"
    (flat / "0.txt").unlink()
    dm = ImageFolderDataModule(data_dir=flat, image_size=4, captions=True)
    with pytest.raises(DataError, match=r"no caption file \(first: 0.png\)"):
        dm.setup()


def test_folder_missing_empty_and_no_images(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist.*one subfolder per class"):
        ImageFolderDataModule(data_dir=tmp_path / "nope").setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="folder is empty"):
        ImageFolderDataModule(data_dir=tmp_path / "empty").setup()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("hi")
    with pytest.raises(DatasetNotFoundError, match="holds no image files"):
        ImageFolderDataModule(data_dir=tmp_path / "text").setup()


def test_folder_corrupt_image_named_or_skipped(tmp_path, caplog):
    for k in range(4):
        _png(tmp_path / f"{k}.png", np.full((4, 4, 3), 60 * k, np.uint8))
    (tmp_path / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    kw = dict(data_dir=tmp_path, image_size=4, hflip=False, val_fraction=0.0, test_fraction=0.0)
    dm = ImageFolderDataModule(**kw)
    dm.setup()
    i = [dm.train_set.info(k)["id"] for k in range(4)].index("2.png")
    with pytest.raises(CorruptImageError, match=r"2\.png"):
        dm.train_set[i]
    dm = ImageFolderDataModule(**kw, skip_corrupt=True)
    dm.setup()
    with caplog.at_level(logging.WARNING):
        images = [dm.train_set[k]["image"] for k in range(4)]
    assert "2.png" in caplog.text
    nxt = dm.train_set.info((i + 1) % 4)["id"]
    torch.testing.assert_close(images[i], images[(i + 1) % 4])
    assert images[i].mean().item() == pytest.approx(60 * int(nxt[0]) / 127.5 - 1)
