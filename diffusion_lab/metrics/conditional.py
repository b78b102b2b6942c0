"""Conditional accuracy: does a class-conditional sample look like its class to a classifier of real data."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.svm import SVC


def _features(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, C*H*W) float64, clamped like a saved image would be."""
    return images.detach().float().clamp(-1, 1).flatten(1).cpu().numpy().astype(np.float64)


def fit_pixel_classifier(images: torch.Tensor, labels: torch.Tensor | np.ndarray) -> Pipeline:
    """An RBF SVM on raw pixels, fitted on real (held-out) images.

    No per-pixel standardisation: background pixels are constant in real digits, and scaling them
    up would let faint sampling noise there decide the class.
    """
    clf = make_pipeline(SVC(C=10.0, gamma="scale"))
    clf.fit(_features(images), np.asarray(labels))
    return clf


def class_accuracy(classifier: Pipeline, images: torch.Tensor, labels: torch.Tensor | np.ndarray) -> float:
    """Share of images the classifier assigns to the label they were generated for."""
    pred = classifier.predict(_features(images))
    return float((pred == np.asarray(labels)).mean())


def per_class_accuracy(
    classifier: Pipeline, images: torch.Tensor, labels: torch.Tensor | np.ndarray, num_classes: int
) -> list[float]:
    """Accuracy for each class id (NaN where a class has no images)."""
    pred = classifier.predict(_features(images))
    labels = np.asarray(labels)
    return [
        float((pred[labels == k] == k).mean()) if (labels == k).any() else float("nan")
        for k in range(num_classes)
    ]
