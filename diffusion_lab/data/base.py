"""Shared pieces of every data module: image sources, a dict-batch dataset, seeded splits, clear errors."""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from diffusion_lab.data.captioners import Captioner, LabelCaptioner
from diffusion_lab.data.resumable import ResumableDataLoader
from diffusion_lab.data.transforms import ImageTransform
from diffusion_lab.files import file_digest

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


# --------------------------------------------------------------------------------------------- errors
class DataError(RuntimeError):
    """A data set is malformed or a file in it cannot be read."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A data set's files are missing (or the folder is empty)."""


class CorruptImageError(DataError):
    """One image file cannot be decoded; `path` names it."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        super().__init__(f"corrupt or unreadable image file {self.path}: {reason}")


def data_error(
    dataset: str,
    data_dir: str | os.PathLike | None,
    problem: str,
    *,
    layout: str,
    source: str,
    hint: str = "",
    missing: bool = True,
) -> DataError:
    """One-paragraph error: what is wrong, the expected layout, where to get the files."""
    where = f"in {str(data_dir)!r}" if data_dir is not None else "(data_dir is not set)"
    msg = f"{dataset} {where}: {problem}. Expected layout: {layout}. Get it from {source}."
    if hint:
        msg += f" {hint}"
    return (DatasetNotFoundError if missing else DataError)(msg)


def folder_is_empty(path: Path) -> bool:
    """True for an existing directory without any entry (hidden files ignored)."""
    return path.is_dir() and not any(not p.name.startswith(".") for p in path.iterdir())


def folder_problem(path: Path) -> str | None:
    """What is wrong with a data folder: it does not exist or is empty (`folder_is_empty`); None if neither."""
    if not path.is_dir():
        return "the folder does not exist"
    return "the folder is empty" if folder_is_empty(path) else None


# ------------------------------------------------------------------------------------------ download
def md5sum(path: str | os.PathLike) -> str:
    """Hex MD5 of a file."""
    return file_digest(path, "md5")


def download_url(url: str, dest: str | os.PathLike, *, md5: str | None = None, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` (via `dest.part`), verify its MD5, and return `dest`; fails loudly."""
    dest = Path(dest)
    if dest.is_file() and (md5 is None or md5sum(dest) == md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    log.info("downloading %s -> %s", url, dest)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        raise DatasetNotFoundError(
            f"could not download {url} ({e}); are you offline? Download it by hand and put it at {dest}."
        ) from e
    if md5 is not None and (got := md5sum(part)) != md5:
        part.unlink(missing_ok=True)
        raise DataError(
            f"checksum mismatch for {url}: md5 {got}, expected {md5}; the download is corrupt or the file "
            f"changed upstream. Delete it and retry, or put a verified copy at {dest}."
        )
    part.replace(dest)
    return dest


# ---------------------------------------------------------------------------------------- image I/O
def load_image_file(path: str | os.PathLike, *, channels: int = 3) -> np.ndarray:
    """Decode an image file with Pillow to uint8 (H, W) for 1 channel or (H, W, 3); CorruptImageError if not."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("L" if channels == 1 else "RGB"))
    except FileNotFoundError as e:
        raise CorruptImageError(path, "file not found") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise CorruptImageError(path, f"{type(e).__name__}: {e}") from e


class ArraySource:
    """Images held in memory as one uint8 (N, H, W[, C]) array."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, j: int) -> np.ndarray:
        return self.images[j]

    def name(self, j: int) -> str:
        return str(j)


class FileSource:
    """Images read from files `root / names[j]` with Pillow on access."""

    def __init__(self, root: str | os.PathLike, names: Sequence[str], *, channels: int = 3) -> None:
        self.root = str(root)
        self.names = np.asarray(list(names), dtype=str)  # one array: cheap to share with workers
        self.channels = channels

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, j: int) -> np.ndarray:
        return load_image_file(os.path.join(self.root, self.names[j]), channels=self.channels)

    def name(self, j: int) -> str:
        return str(self.names[j])


# ------------------------------------------------------------------------------------------ dataset
class ImageDataset(Dataset):
    """Items `indices` of an image source -> dicts {image, label?, attributes?, caption?}.

    `label`, `attributes` and the captioner are indexed by the source index, so an item keeps its
    caption whatever split it lands in. `train=True` draws a random caption per access; otherwise
    the fixed caption of the item is used (deterministic evaluation). A corrupt image raises a
    CorruptImageError naming the file, or with `skip_corrupt=True` logs a warning naming it and
    returns the next readable item instead.
    """

    def __init__(
        self,
        source: ArraySource | FileSource,
        indices: Sequence[int] | np.ndarray | None = None,
        *,
        transform: ImageTransform,
        labels: np.ndarray | None = None,
        class_names: Sequence[str] | None = None,
        attributes: np.ndarray | None = None,
        attribute_names: Sequence[str] | None = None,
        captioner: Captioner | None = None,
        train: bool = False,
        skip_corrupt: bool = False,
    ) -> None:
        self.source = source
        self.indices = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.labels = labels
        self.class_names = list(class_names) if class_names is not None else None
        self.attributes = attributes
        self.attribute_names = list(attribute_names) if attribute_names is not None else None
        self.captioner = captioner
        self.train = train
        self.skip_corrupt = skip_corrupt
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.indices)

    def _load(self, i: int) -> tuple[np.ndarray, int]:
        """(uint8 image, source index) of item i, or of the next readable item when skipping."""
        n = len(self.indices)
        if not -n <= i < n:  # plain iteration (`for item in dataset`) stops here
            raise IndexError(f"index {i} out of range for {n} items")
        for step in range(n if self.skip_corrupt else 1):
            j = int(self.indices[(i + step) % n])
            try:
                return self.source[j], j
            except CorruptImageError as e:
                if not self.skip_corrupt:
                    raise
                if e.path not in self._warned:
                    self._warned.add(e.path)
                    log.warning("skipping %s (skip_corrupt=True); using the next image instead", e)
        raise DataError(f"no readable image left in this split of {len(self)} items (skip_corrupt=True)")

    def __getitem__(self, i: int) -> dict:
        image, j = self._load(i)
        try:
            out: dict = {"image": self.transform(image)}  # (C, H, W) in [-1, 1]
        except ValueError as e:
            raise DataError(f"image {self.source.name(j)}: {e}") from e
        if self.labels is not None:
            out["label"] = int(self.labels[j])
        if self.attributes is not None:
            out["attributes"] = torch.as_tensor(self.attributes[j], dtype=torch.float32)  # (K,) of 0/1
        if self.captioner is not None:
            out["caption"] = self.captioner.sample(j) if self.train else self.captioner.fixed(j)
        return out

    def caption(self, i: int, k: int = 0) -> str:
        """The k-th fixed caption of item i (k=0 is the evaluation caption); no image is decoded."""
        if self.captioner is None:
            raise RuntimeError("this dataset was built without captions (captions=False)")
        return self.captioner.fixed(int(self.indices[i]), k)

    def info(self, i: int) -> dict:
        """What is known about item i without decoding it: its name, label, class name, attributes."""
        j = int(self.indices[i])
        out: dict = {"id": self.source.name(j)}
        if self.labels is not None:
            out["label"] = int(self.labels[j])
            if self.class_names is not None:
                out["class_name"] = self.class_names[out["label"]]
        if self.attributes is not None:
            names = self.attribute_names or [str(k) for k in range(len(self.attributes[j]))]
            out["attributes"] = [name for name, v in zip(names, self.attributes[j]) if v]
        return out


def split_fractions(*, val_fraction: float, test_fraction: float = 0.0) -> tuple[float, float, float]:
    """(train, val, test) shares from a data module's `val_fraction` / `test_fraction`; ValueError (one line,
    naming the key) unless each is a number in [0, 1) and together they leave a training share."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"data.{name}={value!r} must be a number in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"data.val_fraction={val_fraction} + data.test_fraction={test_fraction} leave nothing to train on"
            " (their sum must be < 1)"
        )
    return 1.0 - val_fraction - test_fraction, val_fraction, test_fraction


def held_out_val(n_train: int, n_total: int, *, val_fraction: float, seed: int) -> list[np.ndarray]:
    """(train, val, test) for data with an official test set after `n_train` training items: a seeded
    `val_fraction` of the training items is held out (sorted), the official test items are the test split."""
    train, val = seeded_split(n_train, (1.0 - val_fraction, val_fraction), seed)
    return [train, np.sort(val), np.arange(n_train, n_total)]


# the keyword arguments every data module takes and hands on unchanged, as `**loader`, to BaseDataModule
LOADER_OPTIONS = ("seed", "captions", "batch_size", "num_workers", "pin_memory")


def init_args(args: dict[str, Any], *leave_out: str) -> dict[str, Any]:
    """A data module constructor's `locals()` as keyword arguments of its base's: its own arguments (without
    self, `leave_out`) and the loader options of its `**loader`, which must be in LOADER_OPTIONS."""
    loader = args.get("loader", {})
    if unknown := sorted(set(loader) - set(LOADER_OPTIONS)):
        owner = getattr(args.get("__class__"), "__name__", "the data module")
        raise TypeError(
            f"{owner}() got unexpected keyword argument(s) {', '.join(unknown)}; its loader options are"
            f" {', '.join(LOADER_OPTIONS)}"
        )
    own = {k: v for k, v in args.items() if k not in ("self", "__class__", "loader", *leave_out)}
    return {**own, **loader}


def spell_out_loader(init: Any) -> None:
    """Give a data module's `__init__(*, <its own arguments>, **loader)` the signature and annotations with
    `loader` replaced by BaseDataModule's keyword-only loader options and their defaults: what inspect, help(),
    the config type checks (config_types.py) and tests/test_data_configs.py see."""
    signature = inspect.signature(init)
    *own, last = signature.parameters.values()
    if last.kind is not inspect.Parameter.VAR_KEYWORD or last.name != "loader":
        return
    base = BaseDataModule.__init__
    base_params = inspect.signature(base).parameters
    init.__signature__ = signature.replace(parameters=[*own, *(base_params[k] for k in LOADER_OPTIONS)])
    annotations = {k: v for k, v in init.__annotations__.items() if k != "loader"}
    init.__annotations__ = {**annotations, **{k: base.__annotations__[k] for k in LOADER_OPTIONS}}


def seeded_split(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Shuffle range(n) with a seed and cut it into consecutive parts of the given fractions."""
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {list(fractions)}")
    perm = np.random.default_rng(seed).permutation(n)
    cuts = np.cumsum([int(round(f * n)) for f in fractions[:-1]])
    return np.split(perm, cuts)


# -------------------------------------------------------------------------------------- data module
class BaseDataModule(L.LightningDataModule):
    """Loaders over `self.train_set` / `self.val_set` / `self.test_set`, built in `setup()`.

    Subclasses set `image_size`, `channels` (and `num_classes`, `class_names`, `attribute_names`
    where the data has them) and build the three splits with `_make_splits`. Val/test loaders are
    never shuffled, never flipped and use each item's fixed caption.
    """

    num_classes: int | None = None
    class_names: list[str] | None = None
    attribute_names: list[str] | None = None
    channels: int = 3
    image_size: int = 32

    data_dir: Path | None
    fractions: tuple[float, float, float]
    val_fraction: float

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if (init := cls.__dict__.get("__init__")) is not None:
            spell_out_loader(init)

    def __init__(
        self,
        *,
        image_size: int,
        channels: int,
        seed: int = 0,
        captions: bool = False,
        hflip: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        **settings: Any,
    ) -> None:
        """`settings`, a module's own arguments (`init_args`), are kept as attributes of their names: `data_dir`
        as a Path, `val_fraction` checked (`split_fractions`) and, with a `test_fraction`, both as `fractions`."""
        super().__init__()
        self.image_size = image_size
        self.channels = channels
        self.seed = seed
        self.captions = captions
        self.hflip = hflip
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        if "test_fraction" in settings:
            fractions = {k: settings.pop(k) for k in ("val_fraction", "test_fraction")}
            settings["fractions"] = split_fractions(**fractions)
        elif "val_fraction" in settings:
            split_fractions(val_fraction=settings["val_fraction"])
        if settings.get("data_dir") is not None:
            settings["data_dir"] = Path(settings["data_dir"])
        for name, value in settings.items():
            setattr(self, name, value)

    def label_captioner(self, labels: np.ndarray, *, style: str = "photo") -> LabelCaptioner | None:
        """Captions from the class names in one template style when `captions` is on, else None."""
        return (
            LabelCaptioner(labels, self.class_names, style=style, seed=self.seed) if self.captions else None
        )

    def _make_splits(
        self,
        source: ArraySource | FileSource,
        parts: Sequence[np.ndarray],
        *,
        crop_size: int | None = None,
        labels: np.ndarray | None = None,
        attributes: np.ndarray | None = None,
        captioner: Captioner | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        """Set train/val/test ImageDatasets over `parts` = (train, val, test) source indices (the training split
        flipped at random when `hflip`)."""
        kw = dict(
            labels=labels,
            class_names=self.class_names,
            attributes=attributes,
            attribute_names=self.attribute_names,
            captioner=captioner,
            skip_corrupt=skip_corrupt,
        )
        tf = dict(image_size=self.image_size, channels=self.channels, crop_size=crop_size)
        train, val, test = parts
        self.train_set = ImageDataset(
            source,
            train,
            transform=ImageTransform(**tf, hflip=self.hflip),
            train=True,
            **kw,
        )
        self.val_set = ImageDataset(source, val, transform=ImageTransform(**tf), **kw)
        self.test_set = ImageDataset(source, test, transform=ImageTransform(**tf), **kw)

    def _labelled_splits(
        self, images: np.ndarray, labels: np.ndarray, *, n_train: int | None = None, style: str = "photo"
    ) -> None:
        """Splits of labelled uint8 images in memory, captioned from the class names in `style`: the items after
        `n_train` are an official test set and a seeded `val_fraction` of the others is held out (`held_out_val`),
        or with `n_train=None` the seeded `fractions` of all."""
        if n_train is None:
            parts = seeded_split(len(images), self.fractions, self.seed)
        else:
            parts = held_out_val(n_train, len(images), val_fraction=self.val_fraction, seed=self.seed)
        captioner = self.label_captioner(labels, style=style)
        self._make_splits(ArraySource(images), parts, labels=labels, captioner=captioner)

    def _loader(self, ds: Dataset | None, *, shuffle: bool, drop_last: bool = False) -> DataLoader:
        if ds is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not been called")
        kw = dict(
            batch_size=self.batch_size,
            drop_last=drop_last and len(ds) >= self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
        if shuffle:  # its position is saved in checkpoints: a resumed run continues with the same batches
            return ResumableDataLoader(ds, **kw)
        # own generator: iterating a val/test loader draws nothing from the global RNG (exact resume)
        return DataLoader(ds, shuffle=False, generator=torch.Generator().manual_seed(0), **kw)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
