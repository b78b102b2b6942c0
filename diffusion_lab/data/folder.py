"""A folder of images, optionally one subfolder per class (labels from the sorted subfolder names)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_lab.data.base import (
    IMAGE_EXTENSIONS,
    BaseDataModule,
    DataError,
    FileSource,
    data_error,
    folder_problem,
    init_args,
    seeded_split,
)
from diffusion_lab.data.captioners import Captioner, LabelCaptioner, TextCaptioner

log = logging.getLogger(__name__)

FOLDER_LAYOUT = (
    "either data_dir/<class name>/**/<image> (one subfolder per class; labels follow the sorted folder names) "
    "or data_dir/<image> (unlabelled), with images of types " + " ".join(IMAGE_EXTENSIONS) + " and, for "
    "captions, optionally a <image name>.txt beside an image holding one caption per line"
)
FOLDER_SOURCE = "your own images (any folder of image files)"


def _images(folder: Path, *, recursive: bool) -> list[Path]:
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in pattern
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
    )


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], np.ndarray | None, list[str] | None]:
    """(file paths relative to root, int64 labels or None, class names or None); DatasetNotFoundError if none."""
    root = Path(root)

    def error(problem: str) -> DataError:
        return data_error("image folder", root, problem, layout=FOLDER_LAYOUT, source=FOLDER_SOURCE)

    if problem := folder_problem(root):
        raise error(problem)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = [(d.name, _images(d, recursive=True)) for d in subdirs]
    per_class = [(name, files) for name, files in per_class if files]
    top = _images(root, recursive=False)
    if per_class:
        if top:
            log.warning("%d images directly in %s are ignored: it has class subfolders", len(top), root)
        names = [name for name, _ in per_class]
        files = [str(p.relative_to(root)) for _, fs in per_class for p in fs]
        labels = np.concatenate([np.full(len(fs), k, dtype=np.int64) for k, (_, fs) in enumerate(per_class)])
        return files, labels, names
    if not top:
        raise error("it holds no image files")
    return [p.name for p in top], None, None


def _read_caption_file(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    return [ln for ln in lines if ln] or None


class ImageFolderDataModule(BaseDataModule):
    """Images from a folder, center-cropped square and resized; seeded train/val/test fractions."""

    def __init__(
        self,
        *,
        data_dir: str | os.PathLike = "data/images",
        image_size: int = 64,
        crop_size: int | None = None,
        channels: int = 3,
        hflip: bool = True,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        skip_corrupt: bool = False,
        **loader: Any,
    ) -> None:
        super().__init__(**init_args(locals()))
        self._scan: tuple[list[str], np.ndarray | None, list[str] | None] | None = None

    def _scanned(self) -> tuple[list[str], np.ndarray | None, list[str] | None]:
        if self._scan is None:
            self._scan = scan_image_folder(self.data_dir)
        return self._scan

    @property
    def class_names(self) -> list[str] | None:  # known before setup(): models size their embeddings from it
        return self._scanned()[2]

    @property
    def num_classes(self) -> int | None:
        names = self.class_names
        return len(names) if names is not None else None

    def _captioner(self, files: list[str], labels: np.ndarray | None) -> Captioner:
        by_label = LabelCaptioner(labels, self.class_names, seed=self.seed) if labels is not None else None
        texts = [_read_caption_file((self.data_dir / f).with_suffix(".txt")) for f in files]
        if all(t is None for t in texts) and by_label is not None:
            return by_label
        if by_label is None and (no_text := [f for f, t in zip(files, texts) if t is None]):
            raise data_error(
                "image folder",
                self.data_dir,
                f"captions=True but {len(no_text)} images have no caption file (first: {no_text[0]})",
                layout=FOLDER_LAYOUT,
                source=FOLDER_SOURCE,
                hint="Put a .txt beside each image, or use class subfolders for captions from class names.",
                missing=False,
            )
        return TextCaptioner(texts, fallback=by_label, seed=self.seed)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        files, labels, _ = self._scanned()
        train, val, test = seeded_split(len(files), self.fractions, self.seed)
        self._make_splits(
            FileSource(self.data_dir, files, channels=self.channels),
            (train, np.sort(val), np.sort(test)),
            crop_size=self.crop_size,
            labels=labels,
            captioner=self._captioner(files, labels) if self.captions else None,
            skip_corrupt=self.skip_corrupt,
        )
