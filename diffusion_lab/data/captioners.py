"""Captions of the items of one data set: from class labels, attribute rows or text files, fixed or random."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffusion_lab.data.phrases import Vocabulary, compose_caption, label_caption


class Captioner:
    """Captions of the items of one data set: fixed per (seed, item, k) for evaluation, random for training."""

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed

    def describe(self, j: int, rng: np.random.Generator) -> str:
        """One caption of source item j drawn with rng."""
        raise NotImplementedError

    def fixed(self, j: int, k: int = 0) -> str:
        """The k-th reproducible caption of item j (k=0: the evaluation caption)."""
        return self.describe(j, np.random.default_rng([self.seed % 2**32, int(j), int(k)]))

    def sample(self, j: int) -> str:
        """A fresh random caption of item j, drawn from torch's RNG (seeded per worker by the DataLoader)."""
        return self.describe(j, np.random.default_rng(int(torch.randint(0, 2**62, ()).item())))

    def captions(self, j: int, n: int) -> list[str]:
        """Up to n distinct fixed captions of item j (fewer when the vocabulary has fewer)."""
        out: list[str] = []
        for k in range(8 * n):
            c = self.fixed(j, k)
            if c not in out:
                out.append(c)
            if len(out) == n:
                break
        return out


class LabelCaptioner(Captioner):
    """Captions from class labels and names with one label-template style."""

    def __init__(
        self, labels: np.ndarray, class_names: Sequence[str], *, style: str = "photo", seed: int = 0
    ) -> None:
        super().__init__(seed=seed)
        self.labels = np.asarray(labels)
        self.class_names = list(class_names)
        self.style = style

    def describe(self, j: int, rng: np.random.Generator) -> str:
        return label_caption(self.class_names[int(self.labels[j])], rng, style=self.style)


class AttributeCaptioner(Captioner):
    """Captions from per-item attribute rows (N, K) named by `names`, through a vocabulary."""

    def __init__(
        self, attributes: np.ndarray, names: Sequence[str], *, vocab: Vocabulary, seed: int = 0
    ) -> None:
        super().__init__(seed=seed)
        self.attributes = np.asarray(attributes)
        self.names = list(names)
        self.vocab = vocab

    def describe(self, j: int, rng: np.random.Generator) -> str:
        return compose_caption(dict(zip(self.names, self.attributes[j].tolist())), rng, vocab=self.vocab)


class TextCaptioner(Captioner):
    """Captions given as text (e.g. a .txt beside each image, one caption a line); k-th fixed = k-th line."""

    def __init__(
        self, texts: Sequence[Sequence[str] | None], *, fallback: Captioner | None = None, seed: int = 0
    ) -> None:
        super().__init__(seed=seed)
        self.texts = [list(t) if t else None for t in texts]
        self.fallback = fallback

    def _lines(self, j: int) -> list[str] | None:
        lines = self.texts[j]
        if lines is None and self.fallback is None:
            raise ValueError(f"item {j} has no caption text and no fallback captioner")
        return lines

    def describe(self, j: int, rng: np.random.Generator) -> str:
        lines = self._lines(j)
        return lines[int(rng.integers(len(lines)))] if lines else self.fallback.describe(j, rng)

    def fixed(self, j: int, k: int = 0) -> str:
        lines = self._lines(j)
        return lines[k % len(lines)] if lines else self.fallback.fixed(j, k)
