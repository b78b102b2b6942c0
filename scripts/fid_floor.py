"""Real-vs-real FID floor on Fashion-MNIST (README "Evaluation protocol"): disjoint halves of the test split at
n = 1k and 5k, train vs test at n = 10k, with the judge's (classifier) features; the 95% bootstrap interval
(B = 200) of the first split and the spread of FID over 5 random splits.

    OMP_NUM_THREADS=1 python scripts/fid_floor.py <fashion_mnist_classifier run>/checkpoints/last.ckpt
"""

import json
import sys
import time

import numpy as np
import torch

from diffusion_lab.data.mnist import FashionMNISTDataModule
from diffusion_lab.metrics.features import extract_all, get_feature_extractor
from diffusion_lab.metrics.scoring import score_with_intervals


def features(extractor, ds, idx) -> np.ndarray:
    x = torch.stack([ds[int(j)]["image"] for j in idx])
    return extract_all(extractor, x, batch_size=500)[0]


def floor_row(n: int, test: np.ndarray, train: np.ndarray) -> dict:
    """FID (and KID, precision / recall at n <= 5000) of two real sets of n, over 5 random splits."""
    fids, widths, row = [], [], {}
    for split_seed in range(5):
        rng = np.random.default_rng(split_seed)
        if n < 10000:
            perm = rng.permutation(len(test))
            a, b, what = test[perm[:n]], test[perm[n : 2 * n]], f"test halves (disjoint, {n} vs {n})"
        else:
            a, b = test, train[rng.permutation(len(train))[:10000]]
            what = "train 10k (random draw from a 20k pool) vs test 10k"
        metrics = ["fid", "kid", "precision_recall"] if n <= 5000 and split_seed == 0 else ["fid"]
        out = score_with_intervals(
            "classifier", a, b, None, metrics=metrics, kid_subsets=50, resamples=200, seed=0
        )
        fids.append(out["fid_classifier"])
        widths.append(out["fid_classifier_hi"] - out["fid_classifier"])
        if split_seed == 0:
            row = {"n": n, "what": what, **{k: round(v, 5) for k, v in out.items()}}
    row["fid_over_5_splits_mean"] = float(np.mean(fids))
    row["fid_over_5_splits_std"] = float(np.std(fids, ddof=1))
    row["fid_bootstrap_upper_halfwidth_mean"] = float(np.mean(widths))
    row["fid_splits_1.96sd"] = float(1.96 * np.std(fids, ddof=1))
    return row


def main(ckpt: str) -> None:
    torch.set_num_threads(1)
    dm = FashionMNISTDataModule(image_size=32, channels=1, val_fraction=0.02, seed=0)
    dm.setup("fit")
    dm.setup("test")
    extractor = get_feature_extractor("classifier", ckpt=ckpt)
    start = time.time()
    test = features(extractor, dm.test_set, range(len(dm.test_set)))
    train = features(extractor, dm.train_set, np.random.default_rng(0).permutation(len(dm.train_set))[:20000])
    print(f"features in {time.time() - start:.0f} s, extractor {extractor.fingerprint[:12]}", flush=True)
    for n in (1000, 5000, 10000):
        print(json.dumps(floor_row(n, test, train)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
