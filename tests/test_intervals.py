"""Reference FID protocol and intervals: EDM's Frechet distance vs scipy / torchmetrics, streaming statistics,
bootstrap coverage, the resampled metrics at the identity, Welch's t / t interval / Holm vs scipy, balanced labels."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy import stats as scipy_stats
from torchmetrics.image.fid import _compute_fid

from diffusion_lab.data.digits import DigitsDataModule
from diffusion_lab.generate import balanced_labels, random_labels, seed_range
from diffusion_lab.metrics.features import RandomConvFeatures
from diffusion_lab.metrics.fid import (
    FeatureStats,
    GaussianStats,
    RealFeatureCache,
    describe_datamodule,
    fid_infinity,
    fid_resampled,
    frechet_distance,
)
from diffusion_lab.metrics.intervals import bootstrap_intervals, holm, mean_interval, t_interval, welch_t_test
from diffusion_lab.metrics.kid import kid_resampled, mmd2_unbiased, polynomial_kernel
from diffusion_lab.metrics.prdc import prdc_resampled, precision_recall
from diffusion_lab.metrics.scoring import accuracy_with_interval, score_with_intervals

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def _features(seed: int, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    mix = np.random.default_rng(d).normal(size=(d, d)) / np.sqrt(d)
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ mix + shift + rng.uniform(0, 1, size=(n, d)) ** 3


def _edm_reference(mu, sigma, mu_ref, sigma_ref) -> float:
    """NVlabs/edm fid.py::calculate_fid_from_inception_stats, float64."""
    m = np.square(mu - mu_ref).sum()
    s = scipy.linalg.sqrtm(np.dot(sigma, sigma_ref))
    return float(np.real(m + np.trace(sigma + sigma_ref - s * 2)))


@pytest.mark.parametrize(("n", "d"), [(400, 16), (300, 64), (50, 80)])  # the last: singular covariances
def test_frechet_distance_equals_edm_scipy_and_torchmetrics(n, d):
    a = GaussianStats.from_features(_features(0, n, d))
    b = GaussianStats.from_features(_features(1, n + 17, d, shift=0.2))
    ref = _edm_reference(a.mu, a.sigma, b.mu, b.sigma)
    assert ref > 0.1
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    tm = _compute_fid(*(torch.as_tensor(v) for v in (a.mu, a.sigma, b.mu, b.sigma)))
    assert frechet_distance(a, b) == pytest.approx(float(tm), rel=1e-6)


def test_fid_resampled_equals_frechet_distance():
    real = GaussianStats.from_features(_features(1, 500, 32, shift=0.3))
    for n in (20, 200):  # n < D and n > D take the two Gram forms
        fake = _features(2, n, 32)
        fid = fid_resampled(fake, real)
        assert fid(np.arange(n)) == pytest.approx(
            frechet_distance(GaussianStats.from_features(fake), real), rel=1e-6
        )
        idx = np.random.default_rng(0).integers(0, n, n)
        assert fid(idx) == pytest.approx(
            frechet_distance(GaussianStats.from_features(fake[idx]), real), rel=1e-6
        )


def test_streaming_statistics_equal_one_shot():
    f = _features(3, 1000, 24, shift=5.0)  # a large mean: the one-pass formula must still hold in float64
    acc = FeatureStats(24)
    for chunk in np.array_split(f, 7):
        acc.update(chunk)
    s, ref = acc.stats(), GaussianStats.from_features(f)
    assert s.n == 1000
    np.testing.assert_allclose(s.mu, ref.mu, rtol=1e-12)
    np.testing.assert_allclose(s.sigma, np.cov(f, rowvar=False), rtol=1e-9, atol=1e-12)
    acc.update(torch.as_tensor(f[:3]))  # torch batches too
    assert acc.n == 1003
    with pytest.raises(ValueError, match="expected features"):
        acc.update(f[:, :3])


def test_bootstrap_interval_covers_at_its_stated_rate():
    """400 seeded data sets from a skewed distribution (exponential, mean 1, n=80): the 95% interval of the mean
    covers 1 in 95% of them, within 3 binomial standard deviations (1.1% each)."""
    covered = 0
    for i in range(400):
        x = np.random.default_rng(1000 + i).exponential(1.0, size=80)
        lo, hi = mean_interval(x, resamples=200, seed=i)
        covered += lo <= 1.0 <= hi
    tol = 3 * np.sqrt(0.95 * 0.05 / 400)
    assert abs(covered / 400 - 0.95) <= tol + 0.015  # + the percentile bootstrap's known O(1/n) undercoverage


def test_bootstrap_is_seeded_and_pivots_on_point():
    x = np.random.default_rng(0).normal(size=100)
    stat = lambda i: {"mean": x[i].mean(), "sd": x[i].std()}  # noqa: E731
    a = bootstrap_intervals(stat, 100, seed=3)
    assert a == bootstrap_intervals(stat, 100, seed=3) and a != bootstrap_intervals(stat, 100, seed=4)
    lo, hi = a["mean"]
    assert lo < x.mean() < hi and hi - lo == pytest.approx(2 * 1.96 / 10, rel=0.25)
    shifted = bootstrap_intervals(stat, 100, seed=3, point={"mean": 10.0})["mean"]
    assert shifted == pytest.approx((lo - x.mean() + 10, hi - x.mean() + 10))


def test_resampled_kid_and_prdc_at_identity_equal_the_point_metrics():
    real, fake = _features(4, 300, 8), _features(5, 120, 8, shift=0.4)
    kid = kid_resampled(real, fake, subset_size=100, seed=0)
    x = real[np.random.default_rng(0).choice(300, 100, replace=False)]
    ref = mmd2_unbiased(polynomial_kernel(x, x), polynomial_kernel(fake, fake), polynomial_kernel(x, fake))
    assert kid(np.arange(120)) == pytest.approx(ref, rel=1e-10)
    prdc = prdc_resampled(real, fake, k=3)
    assert prdc(np.arange(120)) == precision_recall(real, fake, k=3)
    dup = np.repeat(np.arange(60), 2)  # every point twice = the first 60 points, same balls
    assert prdc(dup)["recall"] == pytest.approx(prdc(np.arange(60))["recall"])


def test_score_with_intervals_brackets_every_value():
    real, fake = _features(6, 400, 8), _features(7, 200, 8, shift=0.3)
    logits = np.random.default_rng(0).normal(size=(200, 5)) * 3
    out = score_with_intervals(
        "x",
        real,
        fake,
        logits,
        metrics=["fid", "fid_infinity", "kid", "precision_recall", "inception_score"],
        kid_subsets=10,
        kid_subset_size=100,
        resamples=50,
    )
    for key in ("fid_x", "kid_x", "precision_x", "recall_x", "is_x"):  # fid_inf_x: a point value only
        assert out[f"{key}_lo"] < out[key] < out[f"{key}_hi"], key
    assert out["fid_inf_x"] < out["fid_x"] and "fid_inf_x_lo" not in out
    real_stats = GaussianStats.from_features(_features(8, 400, 8))
    assert score_with_intervals("x", real, fake, None, metrics=["fid"], real_stats=real_stats, resamples=20)[
        "fid_x"
    ] == pytest.approx(frechet_distance(GaussianStats.from_features(fake), real_stats))
    acc, lo, hi = accuracy_with_interval(logits, logits.argmax(1) * (np.arange(200) % 2), resamples=50)
    assert acc == pytest.approx(np.mean(logits.argmax(1) * (np.arange(200) % 2) == logits.argmax(1)))
    assert lo < acc < hi


def test_welch_t_interval_and_holm_match_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, size=5), rng.normal(1, 3, size=3)
    t, df, p = welch_t_test(a, b)
    ref = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(ref.statistic, rel=1e-10) and p == pytest.approx(ref.pvalue, rel=1e-10)
    assert df == pytest.approx(ref.df, rel=1e-10)
    lo, hi = t_interval(a)
    ref_lo, ref_hi = scipy_stats.t.interval(0.95, len(a) - 1, loc=a.mean(), scale=scipy_stats.sem(a))
    assert (lo, hi) == pytest.approx((ref_lo, ref_hi), rel=1e-10)
    # Holm on (0.01, 0.04, 0.03, 0.5): sorted 0.01*4, 0.03*3, 0.04*2 (monotone), 0.5*1
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert welch_t_test([1.0, 1.0], [1.0, 1.0])[2] == 1.0


@pytest.mark.parametrize(("n", "k", "start"), [(100, 10, 0), (50, 10, 7), (1000, 10, 123)])
def test_class_balanced_labels_give_exactly_n_over_classes(n, k, start):
    labels = balanced_labels(n, k, start=start)
    assert torch.bincount(labels, minlength=k).tolist() == [n // k] * k


def test_reference_statistics_streamed_cached_and_equal_to_features(tmp_path):
    dm = DigitsDataModule(image_size=8, batch_size=32)
    dm.setup("test")
    ext = RandomConvFeatures(in_channels=1, width=4)
    cache = RealFeatureCache(tmp_path)
    kw = dict(description=describe_datamodule(dm), split="test", batch_size=50)
    streamed = cache.stats(ext, dm.test_set, **kw)
    assert cache.computed == 1 and streamed.n == len(dm.test_set)
    again = cache.stats(ext, dm.test_set, **kw)
    assert cache.computed == 1  # read back from the file
    np.testing.assert_array_equal(again.sigma, streamed.sigma)
    feats, _ = cache.get(ext, dm.test_set, **kw)
    ref = GaussianStats.from_features(feats)
    np.testing.assert_allclose(streamed.mu, ref.mu, rtol=1e-10)
    np.testing.assert_allclose(streamed.sigma, ref.sigma, rtol=1e-8, atol=1e-10)
    other = RealFeatureCache(tmp_path / "b").stats(ext, dm.test_set, features=feats, **kw)
    np.testing.assert_allclose(other.sigma, ref.sigma)


def test_seed_range_and_random_labels_follow_the_sample_index():
    assert (
        seed_range(None, 5) == range(5)
        and seed_range("10-14", 5) == range(10, 15)
        and seed_range(3, 2) == range(3, 5)
    )
    with pytest.raises(ValueError, match="holds 3 seeds"):
        seed_range("0-2", 5)
    with pytest.raises(ValueError, match="not a range"):
        seed_range("a-b", 5)
    whole = random_labels(40, 10, seed=1)
    assert torch.equal(random_labels(20, 10, seed=1, start=20), whole[20:])
    assert not torch.equal(whole, random_labels(40, 10, seed=2)) and len(set(whole.tolist())) > 5


def test_fid_infinity_removes_the_small_n_bias():
    """fake ~ N(m, I), real = the exact population statistics of N(0, I): FID_inf = |m|^2 = 1 (Chong & Forsyth's
    extrapolation), while FID at n = 2000 in 64 dimensions sits ~0.5 above it (the small-n bias)."""
    d, n = 64, 2000
    real = GaussianStats(mu=np.zeros(d), sigma=np.eye(d), n=10**9)
    for seed in range(3):
        fake = np.random.default_rng(seed).normal(size=(n, d)) + 1 / np.sqrt(d)
        at_n = frechet_distance(GaussianStats.from_features(fake), real)
        inf, slope = fid_infinity(fake, real, seed=0)
        assert at_n > 1.4 and slope > 0 and abs(inf - 1.0) < 0.1, (at_n, inf)
