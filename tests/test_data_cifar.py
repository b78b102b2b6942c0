"""CIFAR-10/100 data modules on tiny files in the official python-pickle formats (tarball and folder)."""

from __future__ import annotations

import dataclasses
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_lab.data.base import DataError, DatasetNotFoundError, md5sum
from diffusion_lab.data.cifar import CIFAR10_SPEC, CIFAR10DataModule, CIFAR100DataModule

NAMES10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 4


def _batch(rng: np.random.Generator, n: int, labels: dict[bytes, list[int]]) -> bytes:
    d = {b"batch_label": b"fake", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), **labels}
    d[b"filenames"] = [f"img_{i}.png".encode() for i in range(n)]
    return pickle.dumps(d, protocol=2)


def make_cifar10(root: Path, *, tarball: bool = True, seed: int = 0, names: list[str] = NAMES10) -> dict:
    """Official layout: cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}, optionally as .tar.gz."""
    rng = np.random.default_rng(seed)
    files, data, labels = {}, {}, {}
    for name in [*CIFAR10_SPEC.train_files, "test_batch"]:
        y = rng.integers(0, 10, PER_BATCH).tolist()
        raw = _batch(rng, PER_BATCH, {b"labels": y})
        files[name] = raw
        data[name], labels[name] = pickle.loads(raw, encoding="bytes")[b"data"], y
    meta = {
        b"label_names": [n.encode() for n in names],
        b"num_cases_per_batch": PER_BATCH,
        b"num_vis": 3072,
    }
    files["batches.meta"] = pickle.dumps(meta, protocol=2)
    root.mkdir(parents=True, exist_ok=True)
    if tarball:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            for name, raw in files.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    else:
        (root / "cifar-10-batches-py").mkdir()
        for name, raw in files.items():
            (root / "cifar-10-batches-py" / name).write_bytes(raw)
    return {"data": data, "labels": labels}


def _as_image(row: np.ndarray) -> torch.Tensor:
    """The official row layout (3072 = R plane, G plane, B plane of 32x32) -> (3, 32, 32) in [-1, 1]."""
    return torch.from_numpy(row.reshape(3, 32, 32).astype(np.float32)) / 127.5 - 1.0


def test_cifar10_tarball_test_split_pixels_and_labels(tmp_path):
    ref = make_cifar10(tmp_path)
    dm = CIFAR10DataModule(data_dir=tmp_path, val_fraction=0.25, seed=0)
    dm.setup()
    assert dm.class_names == NAMES10 and dm.num_classes == 10 and dm.channels == 3 and dm.image_size == 32
    assert len(dm.test_set) == PER_BATCH and len(dm.train_set) + len(dm.val_set) == 5 * PER_BATCH
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (PER_BATCH, 3, 32, 32) and batch["image"].dtype == torch.float32
    for i in range(PER_BATCH):
        torch.testing.assert_close(
            batch["image"][i], _as_image(ref["data"]["test_batch"][i]), atol=1e-6, rtol=0
        )
    assert batch["label"].tolist() == ref["labels"]["test_batch"]
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1


def test_cifar10_train_val_split_is_seeded_disjoint_and_complete(tmp_path):
    ref = make_cifar10(tmp_path, tarball=False)
    all_rows = np.concatenate([ref["data"][f] for f in CIFAR10_SPEC.train_files])
    all_labels = sum((ref["labels"][f] for f in CIFAR10_SPEC.train_files), [])

    def split(seed):
        dm = CIFAR10DataModule(data_dir=tmp_path, val_fraction=0.25, seed=seed, hflip=False)
        dm.setup()
        return dm, dm.train_set.indices.tolist(), dm.val_set.indices.tolist()

    dm, train, val = split(0)
    assert len(val) == 5 and sorted(train + val) == list(range(20)) and val == sorted(val)
    assert split(0)[2] == val and split(1)[2] != val
    for k, j in enumerate(val):  # val items are the train-batch rows they claim to be
        item = dm.val_set[k]
        torch.testing.assert_close(item["image"], _as_image(all_rows[j]), atol=1e-6, rtol=0)
        assert item["label"] == all_labels[j]


def test_cifar10_class_names_come_from_batches_meta(tmp_path):
    names = [f"thing{i}" for i in range(10)]
    make_cifar10(tmp_path, names=names)
    dm = CIFAR10DataModule(data_dir=tmp_path, captions=True)
    dm.setup()
    assert dm.class_names == names
    assert all(names[dm.test_set[i]["label"]] in dm.test_set[i]["caption"] for i in range(PER_BATCH))


def test_cifar10_folder_and_tarball_agree(tmp_path):
    make_cifar10(tmp_path / "a", tarball=True, seed=3)
    make_cifar10(tmp_path / "b", tarball=False, seed=3)
    sets = []
    for d in ("a", "b"):
        dm = CIFAR10DataModule(data_dir=tmp_path / d)
        dm.setup()
        sets.append(torch.stack([dm.test_set[i]["image"] for i in range(len(dm.test_set))]))
    torch.testing.assert_close(sets[0], sets[1])


def test_cifar10_train_flip_only_in_train(tmp_path):
    ref = make_cifar10(tmp_path)
    dm = CIFAR10DataModule(data_dir=tmp_path, val_fraction=0.25)
    dm.setup()
    torch.manual_seed(0)
    j = int(dm.train_set.indices[0])
    original = _as_image(np.concatenate([ref["data"][f] for f in CIFAR10_SPEC.train_files])[j])
    seen = set()
    for _ in range(20):
        x = dm.train_set[0]["image"]
        seen.add(
            "flipped" if torch.equal(x, original.flip(-1)) else "same" if torch.equal(x, original) else "?"
        )
    assert seen == {"flipped", "same"}
    assert all(torch.equal(dm.test_set[0]["image"], dm.test_set[0]["image"]) for _ in range(5))


def test_cifar10_label_captions(tmp_path):
    ref = make_cifar10(tmp_path)
    dm = CIFAR10DataModule(data_dir=tmp_path, captions=True)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    synonyms = {"airplane": ("airplane", "plane"), "automobile": ("car", "automobile")}
    for caption, y in zip(batch["caption"], ref["labels"]["test_batch"]):
        assert any(w in caption for w in synonyms.get(NAMES10[y], (NAMES10[y],))), caption
    assert next(iter(dm.test_dataloader()))["caption"] == batch["caption"]  # fixed for evaluation


def test_cifar10_missing_and_empty_folder_messages(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist") as e:
        CIFAR10DataModule(data_dir=tmp_path / "nope").setup()
    msg = str(e.value)
    assert (
        "cifar-10-python.tar.gz" in msg and "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
    )
    assert "\n" not in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="empty.*cifar-10-batches-py"):
        CIFAR10DataModule(data_dir=tmp_path / "empty").setup()


def test_cifar10_corrupt_tarball_and_pickle_named(tmp_path):
    make_cifar10(tmp_path / "t")
    archive = tmp_path / "t" / "cifar-10-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(DataError, match="cifar-10-python.tar.gz is not a readable"):
        CIFAR10DataModule(data_dir=tmp_path / "t").setup()
    make_cifar10(tmp_path / "f", tarball=False)
    (tmp_path / "f" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3.*not a CIFAR python pickle.*Get it from https://"):
        CIFAR10DataModule(data_dir=tmp_path / "f").setup()


def test_cifar10_download_verifies_md5(tmp_path, monkeypatch):
    make_cifar10(tmp_path / "server")
    archive = tmp_path / "server" / "cifar-10-python.tar.gz"
    spec = dataclasses.replace(CIFAR10_SPEC, url=archive.as_uri(), md5=md5sum(archive))
    monkeypatch.setattr(CIFAR10DataModule, "spec", spec)
    dm = CIFAR10DataModule(data_dir=tmp_path / "local", download=True)
    dm.prepare_data()
    assert (tmp_path / "local" / "cifar-10-python.tar.gz").read_bytes() == archive.read_bytes()
    dm.setup()
    assert len(dm.test_set) == PER_BATCH
    monkeypatch.setattr(CIFAR10DataModule, "spec", dataclasses.replace(spec, md5="0" * 32))
    with pytest.raises(DataError, match="checksum mismatch"):
        CIFAR10DataModule(data_dir=tmp_path / "other", download=True).prepare_data()
    assert not any((tmp_path / "other").iterdir())  # nothing half-written left behind


def test_cifar100_fine_and_coarse(tmp_path):
    rng = np.random.default_rng(0)
    fine_names = [f"class_{i}" for i in range(100)]
    coarse_names = [f"super_{i}" for i in range(20)]
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    labels = {}
    for split, n in (("train", 10), ("test", 3)):
        fine, coarse = rng.integers(0, 100, n).tolist(), rng.integers(0, 20, n).tolist()
        labels[split] = (fine, coarse)
        (folder / split).write_bytes(_batch(rng, n, {b"fine_labels": fine, b"coarse_labels": coarse}))
    meta = {
        b"fine_label_names": [n.encode() for n in fine_names],
        b"coarse_label_names": [n.encode() for n in coarse_names],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    for label_type, k, names in (("fine", 0, fine_names), ("coarse", 1, coarse_names)):
        dm = CIFAR100DataModule(data_dir=tmp_path, label_type=label_type, val_fraction=0.2)
        dm.setup()
        assert dm.class_names == names and dm.num_classes == len(names)
        assert [dm.test_set[i]["label"] for i in range(3)] == labels["test"][k]
    with pytest.raises(ValueError, match="label_type"):
        CIFAR100DataModule(data_dir=tmp_path, label_type="medium")
