"""evaluate end to end on tiny trained checkpoints: metrics.csv / .md / plot with the right rows, values, resume."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lab.data.digits import DigitsDataModule
from diffusion_lab.metrics.features import ClassifierFeatures, extract_all, uint8_to_images
from diffusion_lab.metrics.fid import fid_from_features
from diffusion_lab.metrics.scores import conditional_accuracy
from diffusion_lab.systems.diffusion import DiffusionSystem
from diffusion_lab.train import train

from conftest import CONF_DIR, TINY, compose

TINY_CLASSIFIER = [
    "experiment=digits_classifier",
    "trainer.max_steps=3",
    "trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "model.net.base_channels=4",
    "model.net.feature_dim=8",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval")
    diffusion = train(compose("train", [*TINY, "callbacks.class_accuracy=null"], root / "run"))[
        "last_checkpoint"
    ]
    classifier = train(compose("train", TINY_CLASSIFIER, root / "clf"))["last_checkpoint"]
    torch.set_num_threads(n)
    return root, diffusion, classifier


def _eval_cfg(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="evaluate", overrides=overrides)


def _overrides(root, diffusion, classifier, **extra) -> list[str]:
    base = {
        "ckpt": diffusion,
        "samplers": "[ddim,ddpm]",
        "steps": "[2,3]",
        "guidance_scales": "[1.0,2.0]",
        "num_samples": 12,
        "batch_size": 8,  # two chunks per cell
        "features": "[classifier,random]",
        "classifier_ckpt": classifier,
        "kid_subsets": 5,
        "cache_dir": root / "cache",
        "progress": "false",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items() if v is not None]


def _read(path):
    return list(csv.DictReader(open(path)))


def test_evaluate_end_to_end_then_resume(checkpoints, monkeypatch):
    from diffusion_lab.evaluate import evaluate

    root, diffusion, classifier = checkpoints
    rows = evaluate(_eval_cfg(_overrides(root, diffusion, classifier)))
    out = root / "run" / "eval"  # default: next to the checkpoint's run dir
    table = _read(out / "metrics.csv")
    assert (table[0]["sampler"], table[0]["nfe"], table[0]["guidance_scale"]) == ("real_val", "0", "")
    cells = [(r["sampler"], int(r["steps"]), int(r["nfe"]), float(r["guidance_scale"])) for r in table[1:]]
    assert cells == [(s, k, k, g) for s in ("ddim", "ddpm") for k in (2, 3) for g in (1.0, 2.0)]
    for col in (
        "fid_classifier",
        "fid_random",
        "kid_classifier",
        "kid_classifier_std",
        "precision_classifier",
        "recall_random",
        "is_classifier",
        "class_accuracy",
    ):
        assert all(math.isfinite(float(r[col])) for r in table), col
    assert "is_random" not in table[0]  # no logits, no Inception Score
    assert all(0 <= float(r["class_accuracy"]) <= 1 and 1 <= float(r["is_classifier"]) <= 10 for r in table)
    md = (out / "metrics.md").read_text()
    assert md.count("\n| ddim |") == 4 + 2 * 2 and "## fid_classifier (guidance 2): sampler x steps" in md
    assert md.count("\n| real_val (reference) |") == 2 * 2
    png = Image.open(out / "metrics_vs_nfe.png")
    assert png.format == "PNG" and png.size[0] > 400
    assert len(list((out / "samples").glob("*.npz"))) == 8

    # the numbers follow from the cached samples: FID with the classifier features, accuracy from its logits
    samples = np.load(out / "samples" / "ddpm_steps3_g2_seed0_n12.npz")
    assert samples["images"].shape == (12, 8, 8, 1) and list(samples["labels"]) == [i % 10 for i in range(12)]
    ext = ClassifierFeatures(ckpt=classifier)
    dm = DigitsDataModule(image_size=8)
    dm.setup()
    real = extract_all(ext, torch.stack([dm.test_set[i]["image"] for i in range(len(dm.test_set))]))[0]
    fake, logits = extract_all(ext, uint8_to_images(samples["images"]))
    row = rows[8]
    assert (row["sampler"], row["steps"], row["guidance_scale"]) == ("ddpm", 3, 2.0)
    assert row["fid_classifier"] == pytest.approx(fid_from_features(real, fake), rel=1e-5)
    assert row["class_accuracy"] == conditional_accuracy(logits, samples["labels"])
    assert rows[1]["fid_random"] != rows[5]["fid_random"]  # ddim vs ddpm: other samples, other numbers
    # the reference row: the first 12 real validation images scored like a sample set
    val_images = torch.stack([dm.val_set[i]["image"] for i in range(12)])
    val_feats, val_logits = extract_all(ext, val_images)
    assert rows[0]["fid_classifier"] == pytest.approx(fid_from_features(real, val_feats), rel=1e-5)
    val_labels = np.array([dm.val_set[i]["label"] for i in range(12)])
    assert rows[0]["class_accuracy"] == conditional_accuracy(val_logits, val_labels)

    # rerun: every cell comes from the cache (sampling would fail), same table
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again although the cell was cached")

    monkeypatch.setattr(DiffusionSystem, "sample", no_sampling)
    again = evaluate(_eval_cfg(_overrides(root, diffusion, classifier)))
    assert [{k: r[k] for k in r if k != "sample_seconds"} for r in again] == [
        {k: r[k] for k in r if k != "sample_seconds"} for r in rows
    ]
    # a new steps value: only its cells are sampled
    calls = []
    monkeypatch.setattr(
        DiffusionSystem, "sample", lambda self, **kw: calls.append(1) or torch.zeros(len(kw["x_T"]), 1, 8, 8)
    )
    more = evaluate(_eval_cfg(_overrides(root, diffusion, classifier, steps="[2,3,4]", samplers="[ddim]")))
    assert [(r["steps"], r["guidance_scale"]) for r in more[1:]] == [
        (k, g) for k in (2, 3, 4) for g in (1.0, 2.0)
    ]
    assert len(calls) == 2 * 2  # (steps=4) x 2 guidance scales x 2 chunks


def test_evaluate_errors_are_clear(checkpoints, tmp_path):
    from diffusion_lab.evaluate import evaluate

    root, diffusion, classifier = checkpoints
    with pytest.raises(ValueError, match="needs classifier_ckpt"):
        evaluate(_eval_cfg(_overrides(root, diffusion, classifier, classifier_ckpt="null", out=tmp_path)))
    with pytest.raises(ValueError, match="valid choices: .*ddim"):
        evaluate(_eval_cfg(_overrides(root, diffusion, classifier, samplers="[nope]", out=tmp_path)))
    with pytest.raises(FileNotFoundError, match="experiment=digits_classifier"):
        evaluate(_eval_cfg(_overrides(root, diffusion, str(tmp_path / "missing.ckpt"), out=tmp_path)))
    with pytest.raises(ValueError, match="reference_split must differ"):
        evaluate(_eval_cfg(_overrides(root, diffusion, classifier, reference_split="test", out=tmp_path)))
    with pytest.raises(ValueError, match="is not a diffusion model"):
        evaluate(_eval_cfg(_overrides(root, classifier, classifier, out=tmp_path)))


def test_evaluate_writes_protocol_intervals_and_moves_the_seed_range(checkpoints, tmp_path):
    """Every row carries its protocol (seed range, class sampling, reference split:size, extractor fingerprints)
    and a 95% interval per metric; seeds=12-23 draws exactly samples 12..23 of the 0-23 set (EDM's --seeds)."""
    from diffusion_lab.evaluate import evaluate

    root, diffusion, classifier = checkpoints
    kw = dict(samplers="[ddim]", steps="[2]", guidance_scales="[1.0]", reference_split="null", bootstrap=20)
    whole = evaluate(
        _eval_cfg(_overrides(root, diffusion, classifier, num_samples=24, out=tmp_path / "a", **kw))
    )
    part = evaluate(
        _eval_cfg(_overrides(root, diffusion, classifier, seeds="12-23", out=tmp_path / "b", **kw))
    )
    row = part[0]
    assert row["seeds"] == "12-23" and whole[0]["seeds"] == "0-23" and row["class_sampling"] == "balanced"
    assert row["reference"].startswith("test:") and "classifier:" in row["extractors"]
    for col in ("fid_classifier", "fid_random", "kid_classifier", "precision_random", "class_accuracy"):
        assert row[f"{col}_lo"] <= row[col] <= row[f"{col}_hi"], col
    a = np.load(next((tmp_path / "a" / "samples").glob("*.npz")))
    b = np.load(next((tmp_path / "b" / "samples").glob("*seeds-12-23*.npz")))
    np.testing.assert_array_equal(a["images"][12:], b["images"])
    np.testing.assert_array_equal(a["labels"][12:], b["labels"])
    md = (tmp_path / "b" / "metrics.md").read_text()
    assert f"{row['fid_classifier']:.4g} [" in md and "95% bootstrap interval" in md
    with pytest.raises(ValueError, match="holds 5 seeds but num_samples=12"):
        evaluate(_eval_cfg(_overrides(root, diffusion, classifier, seeds="0-4", out=tmp_path / "c", **kw)))
