"""MNIST and Fashion-MNIST read from the official idx files (gzipped or not); finds Debian's fashion-mnist."""

from __future__ import annotations

import gzip
import os
import struct
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
from diffusion_lab.data.digits import DIGIT_NAMES

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx file (LeCun's format; `.gz` is decompressed) -> array of its dtype and shape; DataError if malformed."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read idx file {path}: {type(e).__name__}: {e}") from e
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated (header of {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    if len(data) - header != int(np.prod(dims)) * dtype.itemsize:
        raise DataError(f"{path} holds {len(data) - header} bytes of data, its header says {dims} x {dtype}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


@dataclass(frozen=True)
class IdxSpec:
    """Where one idx data set comes from and how it is named and captioned."""

    name: str
    key: str
    home: str
    base_url: str
    md5: dict[str, str]  # of the .gz files as downloaded
    class_names: tuple[str, ...]
    caption_style: str
    system_dirs: tuple[str, ...] = ()  # searched when data_dir is None (Debian packages)
    install_hint: str = ""


MNIST_SPEC = IdxSpec(
    name="MNIST",
    key="mnist",
    home="http://yann.lecun.com/exdb/mnist/",
    base_url="https://ossci-datasets.s3.amazonaws.com/mnist/",
    md5={
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    class_names=tuple(DIGIT_NAMES),
    caption_style="handwritten",
)
FASHION_MNIST_SPEC = IdxSpec(
    name="Fashion-MNIST",
    key="fashion_mnist",
    home="https://github.com/zalandoresearch/fashion-mnist",
    base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    md5={
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    class_names=tuple(FASHION_MNIST_CLASSES),
    caption_style="product",
    system_dirs=(DEBIAN_FASHION_MNIST,),
    install_hint=(
        "On Debian/Ubuntu `apt-get install dataset-fashion-mnist` puts the files in "
        f"{DEBIAN_FASHION_MNIST}, which is used when data_dir is null;"
    ),
)


def find_idx_files(data_dir: str | os.PathLike | None, spec: IdxSpec) -> dict[str, Path]:
    """The four idx files (plain or .gz) under data_dir (or data_dir/raw, torchvision's data_dir/<Name>/raw)."""
    if data_dir is None:
        candidates = [Path(d) for d in spec.system_dirs]
    else:
        d = Path(data_dir)
        tv = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}.get(spec.key, spec.name)
        candidates = [d, d / "raw", d / tv / "raw"]
    for folder in candidates:
        found = {}
        for key, stem in IDX_FILES.items():
            path = next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)
            if path is not None:
                found[key] = path
        if len(found) == len(IDX_FILES):
            return found
    layout = "data_dir/{" + ",".join(IDX_FILES.values()) + "}, each optionally gzipped (.gz)"
    hint = "Set data_dir to a folder holding those files, or pass download=True on a machine that is online."
    if spec.install_hint:
        hint = f"{spec.install_hint} otherwise {hint[0].lower()}{hint[1:]}"
    if data_dir is None:
        searched = ", ".join(spec.system_dirs)
        problem = f"no files found in {searched}" if searched else "no data_dir was given"
    else:
        problem = folder_problem(Path(data_dir)) or "the idx files are missing or incomplete"
    raise data_error(spec.name, data_dir, problem, layout=layout, source=spec.home, hint=hint)


def read_idx_dataset(data_dir: str | os.PathLike | None, spec: IdxSpec) -> dict[str, np.ndarray]:
    """{train_images, train_labels, test_images, test_labels}: uint8 (N, 28, 28) and int64 (N,)."""
    files = find_idx_files(data_dir, spec)
    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        try:
            x, y = read_idx(files[f"{split}_images"]), read_idx(files[f"{split}_labels"]).astype(np.int64)
            if x.ndim != 3 or x.dtype != np.uint8:
                raise DataError(
                    f"{files[f'{split}_images']} should hold uint8 (N, H, W) images, got {x.shape}"
                )
            if y.shape != (len(x),) or (len(y) and (y.min() < 0 or y.max() >= len(spec.class_names))):
                raise DataError(
                    f"{files[f'{split}_labels']} should hold {len(x)} labels in 0..9, got {y.shape}"
                )
        except DataError as e:
            layout = "the official idx files " + ", ".join(IDX_FILES.values()) + " (optionally .gz)"
            raise data_error(
                spec.name, data_dir, str(e), layout=layout, source=spec.home, missing=False
            ) from e
        out[f"{split}_images"], out[f"{split}_labels"] = x, y
    return out


class MNISTDataModule(BaseDataModule):
    """MNIST: official t10k files = test split; a seeded `val_fraction` of the training files = val."""

    spec = MNIST_SPEC
    num_classes = 10

    def __init__(
        self,
        *,
        data_dir: str | os.PathLike | None = None,
        download: bool = False,
        image_size: int = 32,
        channels: int = 1,
        val_fraction: float = 0.02,
        **loader: Any,
    ) -> None:
        super().__init__(**init_args(locals()))
        self.class_names = list(self.spec.class_names)

    def _found(self) -> bool:
        try:
            find_idx_files(self.data_dir, self.spec)
            return True
        except DataError:
            return False

    def prepare_data(self) -> None:
        """Download and checksum the four .gz files (Lightning calls this on one process per node)."""
        if not self.download or self._found():
            return
        if self.data_dir is None:
            self.data_dir = Path("data") / self.spec.key
        for name, md5 in self.spec.md5.items():
            download_url(self.spec.base_url + name, self.data_dir / name, md5=md5)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.prepare_data()
        d = read_idx_dataset(self.data_dir, self.spec)
        images, labels = (np.concatenate([d[f"train_{k}"], d[f"test_{k}"]]) for k in ("images", "labels"))
        self._labelled_splits(images, labels, n_train=len(d["train_images"]), style=self.spec.caption_style)


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (Zalando); with data_dir=None it uses Debian's `dataset-fashion-mnist` folder."""

    spec = FASHION_MNIST_SPEC
