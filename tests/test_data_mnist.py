"""MNIST / Fashion-MNIST data modules on tiny idx files (gzipped and plain), and Debian's fashion-mnist."""

from __future__ import annotations

import dataclasses
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_lab.data import mnist
from diffusion_lab.data.base import DataError, DatasetNotFoundError
from diffusion_lab.data.mnist import FashionMNISTDataModule, MNISTDataModule, read_idx


def write_idx(path: Path, array: np.ndarray) -> None:
    """LeCun's idx format: 0, 0, dtype code 0x08 (uint8), ndim, big-endian dims, data; .gz compresses."""
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def make_mnist(root: Path, *, n_train: int = 10, n_test: int = 4, seed: int = 0) -> dict:
    """Train files gzipped, test files plain (both occur in the wild)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    ref = {}
    for prefix, n, ext in (("train", n_train, ".gz"), ("t10k", n_test, "")):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", x)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", y)
        ref[prefix] = (x, y)
    return ref


def test_read_idx_gz_and_plain(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("x-idx3-ubyte", "x-idx3-ubyte.gz"):
        write_idx(tmp_path / name, a)
        np.testing.assert_array_equal(read_idx(tmp_path / name), a)
    (tmp_path / "bad").write_bytes(b"\x08\x03\x00\x00" + bytes(10))
    with pytest.raises(DataError, match="bad is not an idx file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 100) + bytes(10))
    with pytest.raises(DataError, match="short holds 10 bytes"):
        read_idx(tmp_path / "short")


def test_mnist_test_split_pixels_labels_and_val_split(tmp_path):
    ref = make_mnist(tmp_path)
    dm = MNISTDataModule(data_dir=tmp_path, image_size=28, val_fraction=0.2, seed=1)
    dm.setup()
    assert dm.num_classes == 10 and dm.class_names[7] == "seven" and dm.channels == 1
    x, y = ref["t10k"]
    batch = next(iter(dm.test_dataloader()))
    torch.testing.assert_close(
        batch["image"], torch.from_numpy(x).float()[:, None] / 127.5 - 1, atol=1e-6, rtol=0
    )
    assert batch["label"].tolist() == y.tolist()
    train, val = dm.train_set.indices.tolist(), dm.val_set.indices.tolist()
    assert len(val) == 2 and sorted(train + val) == list(range(10))
    xt, yt = ref["train"]
    for k, j in enumerate(val):
        torch.testing.assert_close(dm.val_set[k]["image"][0], torch.from_numpy(xt[j]).float() / 127.5 - 1)
        assert dm.val_set[k]["label"] == int(yt[j])
    # no flip for digits: repeated train reads are identical
    assert all(torch.equal(dm.train_set[0]["image"], dm.train_set[0]["image"]) for _ in range(10))


def test_mnist_resize_and_channels(tmp_path):
    make_mnist(tmp_path)
    dm = MNISTDataModule(data_dir=tmp_path, image_size=32, channels=3)
    dm.setup()
    x = dm.test_set[0]["image"]
    assert x.shape == (3, 32, 32) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert x.min() >= -1 and x.max() <= 1


def test_mnist_torchvision_layout_and_captions(tmp_path):
    ref = make_mnist(tmp_path / "MNIST" / "raw")
    dm = MNISTDataModule(data_dir=tmp_path, captions=True, image_size=28)
    dm.setup()
    y = ref["t10k"][1]
    words = {i: (w, str(i)) for i, w in enumerate(dm.class_names)}
    captions = [dm.test_set[i]["caption"] for i in range(len(dm.test_set))]
    for c, label in zip(captions, y):
        assert any(w in c.split() or f"{w}," in c.split() for w in words[int(label)]), c
        assert "hand" in c or "digit" in c or "number" in c


def test_mnist_missing_folder_message(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist.*train-images-idx3-ubyte.*yann.lecun.com"):
        MNISTDataModule(data_dir=tmp_path / "nope").setup()
    with pytest.raises(DatasetNotFoundError, match="data_dir is not set"):
        MNISTDataModule().setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="folder is empty"):
        MNISTDataModule(data_dir=tmp_path / "empty").setup()
    make_mnist(tmp_path / "bad")
    (tmp_path / "bad" / "t10k-labels-idx1-ubyte").write_bytes(b"garbage!")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte is not an idx file"):
        MNISTDataModule(data_dir=tmp_path / "bad").setup()


def test_fashion_mnist_without_the_debian_package(tmp_path, monkeypatch):
    spec = dataclasses.replace(mnist.FASHION_MNIST_SPEC, system_dirs=(str(tmp_path / "not-installed"),))
    monkeypatch.setattr(FashionMNISTDataModule, "spec", spec)
    with pytest.raises(DatasetNotFoundError) as e:
        FashionMNISTDataModule().setup()
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "/usr/share/datasets/fashion-mnist" in msg
    assert "set data_dir" in msg and "github.com/zalandoresearch/fashion-mnist" in msg
    ref = make_mnist(tmp_path / "fm")
    dm = FashionMNISTDataModule(data_dir=tmp_path / "fm", image_size=28, captions=True)
    dm.setup()
    assert dm.class_names[7] == "Sneaker" and dm.test_set[0]["label"] == int(ref["t10k"][1][0])


@pytest.mark.skipif(
    not Path(mnist.DEBIAN_FASHION_MNIST).is_dir(), reason="dataset-fashion-mnist not installed"
)
def test_fashion_mnist_debian_package_auto_detected():
    dm = FashionMNISTDataModule(data_dir=None, val_fraction=0.1, captions=True)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (54000, 6000, 10000)
    labels = np.array([dm.test_set.info(i)["label"] for i in range(len(dm.test_set))])
    assert np.bincount(labels).tolist() == [1000] * 10  # the official test set is balanced
    item = dm.test_set[0]
    assert item["image"].shape == (1, 32, 32) and item["label"] == 9  # the first test image is an ankle boot
    assert "boot" in item["caption"]
