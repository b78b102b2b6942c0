"""conf/data/*.yaml map 1:1 to data-module constructors; shared transforms and the digits module."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_lab.data.base import ArraySource, DataError, ImageDataset, download_url, seeded_split
from diffusion_lab.data.digits import DigitsDataModule
from diffusion_lab.data.transforms import ImageTransform, center_crop_array

CONF = Path(__file__).resolve().parents[1] / "diffusion_lab" / "conf" / "data"
EXPECTED = {"digits", "cifar10", "cifar100", "celeba", "mnist", "fashion_mnist", "image_folder"}


def _load(name: str):
    from omegaconf import OmegaConf

    return OmegaConf.load(CONF / f"{name}.yaml")


def _target(cfg):
    module, cls = cfg._target_.rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_keys_are_exactly_the_constructor_kwargs(name):
    cfg = _load(name)
    cls = _target(cfg)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k for k, p in params.items() if k != "self"}
    assert all(params[k].kind is inspect.Parameter.KEYWORD_ONLY for k in kwargs)
    assert set(cfg.keys()) - {"_target_"} == kwargs
    for k in kwargs:  # YAML defaults agree with the constructor, except paths and CPU-sized choices
        if k != "data_dir":
            assert cfg[k] == params[k].default, f"{name}.{k}: yaml {cfg[k]} vs code {params[k].default}"


def test_all_data_configs_exist_and_instantiate(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    assert {p.stem for p in CONF.glob("*.yaml")} >= EXPECTED
    for name in sorted(EXPECTED):
        cfg = OmegaConf.merge(OmegaConf.create({"paths": {"data_dir": str(tmp_path)}}), {"data": _load(name)})
        dm = instantiate(cfg.data)
        assert type(dm) is _target(cfg.data)
        if hasattr(dm, "data_dir") and dm.data_dir is not None:
            assert str(dm.data_dir).startswith(str(tmp_path))
    digits = _load("digits")
    assert (digits.image_size, digits.channels, digits.batch_size) == (16, 1, 64)


def test_digits_unchanged_and_captioned():
    dm = DigitsDataModule(captions=True)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1438, 180, 179)
    assert dm.num_classes == 10 and dm.channels == 1 and dm.image_size == 16
    parts = seeded_split(1797, (0.8, 0.1, 0.1), 0)
    assert dm.val_set.indices.tolist() == parts[1].tolist()
    from sklearn.datasets import load_digits

    d = load_digits()
    j = int(parts[2][0])
    item = dm.test_set[0]
    ref = ImageDataset(
        ArraySource(np.round(d.images / 16 * 255).astype(np.uint8)[[j]]),
        transform=ImageTransform(image_size=16, channels=1),
        labels=d.target[[j]],
    )
    torch.testing.assert_close(item["image"], ref[0]["image"])
    assert item["label"] == int(d.target[j])
    assert dm.class_names[item["label"]] in item["caption"] or str(item["label"]) in item["caption"]
    plain = DigitsDataModule()
    plain.setup()
    assert set(next(iter(plain.train_dataloader()))) == {"image", "label"}  # no caption unless asked


def test_image_transform_crop_resize_flip():
    arr = np.arange(10 * 14, dtype=np.uint8).reshape(10, 14)
    np.testing.assert_array_equal(center_crop_array(arr), arr[:, 2:12])
    np.testing.assert_array_equal(center_crop_array(arr, 6), arr[2:8, 4:10])
    x = ImageTransform(image_size=10, channels=1)(arr)
    torch.testing.assert_close(x[0], torch.from_numpy(arr[:, 2:12]).float() / 127.5 - 1)
    x = ImageTransform(image_size=5, channels=3)(arr)
    assert x.shape == (3, 5, 5)
    assert x.mean().item() == pytest.approx(arr[:, 2:12].mean() / 127.5 - 1, abs=1e-3)
    with pytest.raises(ValueError, match="crop size 12 is larger"):
        ImageTransform(image_size=4, channels=1, crop_size=12)(arr)


def test_download_url_offline_message(tmp_path):
    with pytest.raises(DataError, match="could not download .*put it at"):
        download_url((tmp_path / "absent.tar.gz").as_uri(), tmp_path / "dest" / "x.tar.gz")


def test_loader_options_are_checked_and_spelled_out():
    """Data modules take the loader options as `**loader`: a typo fails naming the module, the signature shows them."""
    from diffusion_lab.data.base import LOADER_OPTIONS
    from diffusion_lab.data.cifar import CIFAR100DataModule

    with pytest.raises(
        TypeError, match=r"CIFAR100DataModule\(\) got unexpected keyword argument\(s\) batchsize"
    ):
        CIFAR100DataModule(batchsize=3)
    params = inspect.signature(CIFAR100DataModule.__init__).parameters
    assert list(params)[-len(LOADER_OPTIONS) :] == list(LOADER_OPTIONS)
    dm = DigitsDataModule(batch_size=7, seed=3, captions=True)
    assert (dm.batch_size, dm.seed, dm.captions, dm.num_workers) == (7, 3, True, 0)
