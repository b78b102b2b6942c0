"""CIFAR-10 / CIFAR-100 read from the official python pickles (the tarball or its extracted folder)."""

from __future__ import annotations

import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_lab.data.base import (
    BaseDataModule,
    DataError,
    data_error,
    download_url,
    folder_problem,
    init_args,
)


@dataclass(frozen=True)
class CIFARSpec:
    """Where one CIFAR variant lives and how its pickles are keyed."""

    name: str
    url: str
    archive: str
    md5: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)

    @property
    def layout(self) -> str:
        return (
            f"data_dir/{self.archive} (as downloaded) or its extracted folder "
            f"data_dir/{self.folder}/{{{','.join(self.files)}}}"
        )


CIFAR10_SPEC = CIFARSpec(
    name="CIFAR-10",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    archive="cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
)
CIFAR100_SPEC = CIFARSpec(
    name="CIFAR-100",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    archive="cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
)


def _present(data_dir: Path, spec: CIFARSpec) -> Path | None:
    """The folder holding all pickles, or the archive, or None."""
    for folder in (data_dir / spec.folder, data_dir):
        if all((folder / f).is_file() for f in spec.files):
            return folder
    archive = data_dir / spec.archive
    return archive if archive.is_file() else None


def _read_raw(data_dir: Path, spec: CIFARSpec) -> dict[str, bytes]:
    """The raw bytes of every pickle, from the extracted folder or streamed out of the tarball."""
    where = _present(data_dir, spec)
    if where is None:
        problem = folder_problem(data_dir) or (
            f"neither {spec.archive} nor a complete {spec.folder}/ was found "
            f"(found: {', '.join(sorted(p.name for p in data_dir.iterdir())[:8])})"
        )
        raise data_error(
            spec.name,
            data_dir,
            problem,
            layout=spec.layout,
            source=spec.url,
            hint="Or pass download=True on a machine that is online.",
        )
    if where.is_dir():
        return {f: (where / f).read_bytes() for f in spec.files}
    raw: dict[str, bytes] = {}
    try:
        with tarfile.open(where, "r|*") as tar:  # streamed: one pass over the gzip
            for member in tar:
                name = os.path.basename(member.name)
                if member.isfile() and name in spec.files and name not in raw:
                    raw[name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise data_error(
            spec.name,
            data_dir,
            f"{where.name} is not a readable tar.gz ({type(e).__name__}: {e}); a truncated download?",
            layout=spec.layout,
            source=spec.url,
            hint=f"Delete {where} and download it again (md5 {spec.md5}).",
            missing=False,
        ) from e
    if missing := [f for f in spec.files if f not in raw]:
        raise data_error(
            spec.name,
            data_dir,
            f"{where.name} lacks {', '.join(missing)}",
            layout=spec.layout,
            source=spec.url,
            missing=False,
        )
    return raw


def _unpickle(raw: bytes, what: str) -> dict[str, Any]:
    """An official CIFAR pickle (bytes keys, python-2 era) -> dict with str keys; DataError if malformed."""
    try:
        obj = pickle.loads(raw, encoding="bytes")
    except Exception as e:  # any unpickling failure means a malformed file
        raise DataError(f"{what} is not a CIFAR python pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{what} should hold a dict, found {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _decode_names(names: Any, what: str) -> list[str]:
    if not isinstance(names, (list, tuple)) or not names:
        raise DataError(f"{what} has no list of class names")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def read_cifar(
    data_dir: str | os.PathLike, spec: CIFARSpec, *, label_key: str = "labels", names_key: str = "label_names"
) -> dict[str, Any]:
    """{train_images, train_labels, test_images, test_labels (uint8 (N, 32, 32, 3), int64), class_names}."""
    data_dir = Path(data_dir)
    raw = _read_raw(data_dir, spec)
    try:
        return _parse(raw, spec, label_key, names_key)
    except DataError as e:
        raise data_error(
            spec.name, data_dir, str(e), layout=spec.layout, source=spec.url, missing=False
        ) from e


def _parse(raw: dict[str, bytes], spec: CIFARSpec, label_key: str, names_key: str) -> dict[str, Any]:
    """Decode and check the pickles (DataError naming the file if one is malformed)."""
    meta = _unpickle(raw[spec.meta_file], spec.meta_file)
    if names_key not in meta:
        raise DataError(f"{spec.meta_file} has no {names_key!r} (keys: {sorted(meta)})")
    class_names = _decode_names(meta[names_key], spec.meta_file)
    out: dict[str, Any] = {"class_names": class_names}
    for split, files in (("train", spec.train_files), ("test", spec.test_files)):
        xs, ys = [], []
        for f in files:
            what = f"batch {f!r}"
            d = _unpickle(raw[f], what)
            x = d.get("data")
            y = np.asarray(d.get(label_key, []), dtype=np.int64)
            if (
                not isinstance(x, np.ndarray)
                or x.dtype != np.uint8
                or x.ndim != 2
                or x.shape[1] != 3 * 32 * 32
            ):
                shape = getattr(x, "shape", None)
                raise DataError(f"{what}: 'data' should be uint8 (N, 3072), got {type(x).__name__} {shape}")
            if len(y) != len(x) or (len(y) and (y.min() < 0 or y.max() >= len(class_names))):
                raise DataError(
                    f"{what}: {label_key!r} should be {len(x)} labels in 0..{len(class_names) - 1}"
                )
            xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, H, W, C)
            ys.append(y)
        out[f"{split}_images"] = np.ascontiguousarray(np.concatenate(xs))
        out[f"{split}_labels"] = np.concatenate(ys)
    return out


class CIFAR10DataModule(BaseDataModule):
    """CIFAR-10: official test batch = test split; a seeded `val_fraction` of the train batches = val."""

    spec = CIFAR10_SPEC
    num_classes = 10
    class_names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _label_key, _names_key = "labels", "label_names"

    def __init__(
        self,
        *,
        data_dir: str | os.PathLike = "data/cifar10",
        download: bool = False,
        image_size: int = 32,
        channels: int = 3,
        hflip: bool = True,
        val_fraction: float = 0.02,
        **loader: Any,
    ) -> None:
        super().__init__(**init_args(locals()))

    def prepare_data(self) -> None:
        """Download and checksum the tarball (Lightning calls this on one process per node)."""
        if self.download and _present(self.data_dir, self.spec) is None:
            download_url(self.spec.url, self.data_dir / self.spec.archive, md5=self.spec.md5)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.prepare_data()
        d = read_cifar(self.data_dir, self.spec, label_key=self._label_key, names_key=self._names_key)
        self.class_names = d["class_names"]
        self.num_classes = len(self.class_names)
        images, labels = (np.concatenate([d[f"train_{k}"], d[f"test_{k}"]]) for k in ("images", "labels"))
        self._labelled_splits(images, labels, n_train=len(d["train_images"]))


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 with its 100 fine labels (or the 20 coarse superclasses with `label_type="coarse"`)."""

    spec = CIFAR100_SPEC
    num_classes = 100
    class_names = None  # read from the `meta` pickle in setup()

    def __init__(
        self,
        *,
        data_dir: str | os.PathLike = "data/cifar100",
        download: bool = False,
        label_type: str = "fine",
        image_size: int = 32,
        channels: int = 3,
        hflip: bool = True,
        val_fraction: float = 0.02,
        **loader: Any,
    ) -> None:
        if label_type not in ("fine", "coarse"):
            raise ValueError(f"label_type must be 'fine' or 'coarse', got {label_type!r}")
        super().__init__(**init_args(locals(), "label_type"))
        self.label_type = label_type
        self.num_classes = 100 if label_type == "fine" else 20
        self._label_key, self._names_key = f"{label_type}_labels", f"{label_type}_label_names"
