"""CelebA read from its official layout: img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_lab.data.base import (
    BaseDataModule,
    DataError,
    FileSource,
    data_error,
    folder_is_empty,
    folder_problem,
    init_args,
)
from diffusion_lab.data.captioners import AttributeCaptioner
from diffusion_lab.data.phrases import Phrase, Vocabulary

log = logging.getLogger(__name__)

# ------------------------------------------------------------------- captions: the 40 attributes in words
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()

_HAIR_COLOURS = (
    ("Blond_Hair", ("blond", "blonde")),
    ("Black_Hair", ("black",)),
    ("Brown_Hair", ("brown",)),
    ("Gray_Hair", ("gray", "grey")),
)
# attribute -> (slot, words, order, p, group): the facts said only when the attribute is 1
_CELEBA_SIMPLE: dict[str, tuple[str, tuple[str, ...], int, float, str | None]] = {
    "Chubby": ("adj", ("chubby", "plump", "round-faced"), 30, 0.5, None),
    "Pale_Skin": ("adj", ("pale", "pale-skinned", "fair-skinned"), 50, 0.4, None),
    "Blurry": (
        "prefix",
        ("a blurry photo of ", "a blurry picture of ", "an out-of-focus photo of "),
        0,
        0.8,
        None,
    ),
    "Bangs": ("with", ("bangs", "a fringe"), 12, 0.5, None),
    "Receding_Hairline": ("with", ("a receding hairline",), 14, 0.5, None),
    "Arched_Eyebrows": ("with", ("arched eyebrows",), 30, 0.25, "eyebrows"),
    "Bushy_Eyebrows": ("with", ("bushy eyebrows", "thick eyebrows"), 30, 0.3, "eyebrows"),
    "Narrow_Eyes": ("with", ("narrow eyes",), 31, 0.25, None),
    "Bags_Under_Eyes": ("with", ("bags under the eyes", "bags under his eyes"), 32, 0.25, None),
    "High_Cheekbones": ("with", ("high cheekbones",), 33, 0.25, None),
    "Rosy_Cheeks": ("with", ("rosy cheeks",), 34, 0.3, None),
    "Big_Nose": ("with", ("a big nose", "a large nose"), 35, 0.25, "nose"),
    "Pointy_Nose": ("with", ("a pointy nose", "a pointed nose"), 35, 0.25, "nose"),
    "Big_Lips": ("with", ("big lips", "full lips"), 36, 0.25, None),
    "Mouth_Slightly_Open": ("with", ("a slightly open mouth", "slightly parted lips"), 37, 0.3, None),
    "Oval_Face": ("with", ("an oval face",), 38, 0.2, None),
    "Double_Chin": ("with", ("a double chin",), 39, 0.3, None),
    "Eyeglasses": ("wearing", ("glasses", "eyeglasses", "spectacles"), 10, 0.9, None),
    "Wearing_Hat": ("wearing", ("a hat",), 11, 0.9, None),
    "Wearing_Earrings": ("wearing", ("earrings",), 20, 0.6, None),
    "Wearing_Necklace": ("wearing", ("a necklace",), 21, 0.5, None),
    "Wearing_Necktie": ("wearing", ("a tie", "a necktie"), 22, 0.6, None),
    "Heavy_Makeup": ("wearing", ("heavy makeup", "a lot of makeup"), 30, 0.5, None),
    "Wearing_Lipstick": ("wearing", ("lipstick",), 31, 0.5, None),
}
_CELEBA_BEARD = {  # men only: facial-hair annotations on women are mostly label noise
    "Goatee": ("with", ("a goatee",), 21, 0.7, None),
    "Mustache": ("with", ("a mustache", "a moustache"), 22, 0.7, None),
    "Sideburns": ("with", ("sideburns", "long sideburns"), 23, 0.4, None),
    "5_o_Clock_Shadow": ("with", ("stubble", "a five o'clock shadow", "light stubble"), 24, 0.5, None),
}


def _on(value: Any) -> bool:
    """CelebA flags come as 1/-1, 1/0 or bools."""
    return float(value) > 0


def celeba_phrases(attributes: Mapping[str, Any]) -> list[Phrase]:
    """CelebA's 40 binary attributes -> phrases; gender and age pick the subject, negatives only if informative."""
    on = {name: _on(attributes.get(name, 0)) for name in CELEBA_ATTRIBUTES}
    male, young = on["Male"], on["Young"]
    out = [
        Phrase("subject", ("man", "man", "guy", "gentleman") if male else ("woman", "woman", "lady")),
        Phrase("adj", ("young",) if young else ("older", "middle-aged"), order=40, p=0.6),
    ]
    if on["Attractive"]:
        out.append(
            Phrase("adj", ("attractive", "good-looking", "handsome" if male else "beautiful"), 10, 0.25)
        )
    if on["Smiling"]:
        out.append(Phrase("adj", ("smiling", "smiling", "grinning"), 20, 0.85, group="smile"))
        out.append(Phrase("with", ("a smile", "a big smile"), 5, 0.3, group="smile"))
    if on["Bald"]:
        out.append(Phrase("adj", ("bald", "bald-headed"), 35, 0.9))
    else:
        colour = next((words for name, words in _HAIR_COLOURS if on[name]), None)
        style = "wavy" if on["Wavy_Hair"] else "straight" if on["Straight_Hair"] else None
        if colour or style:
            texts = tuple(" ".join(w for w in (style, c, "hair") if w) for c in (colour or (None,)))
            out.append(Phrase("with", texts, 10, 0.85))
    table = dict(_CELEBA_SIMPLE)
    if on["Bald"]:
        table.pop("Bangs")
    if male:
        table.update(_CELEBA_BEARD)
        if not on["No_Beard"]:
            out.append(Phrase("with", ("a beard", "a full beard"), 20, 0.8))
        elif not (on["Goatee"] or on["Mustache"] or on["5_o_Clock_Shadow"] or on["Sideburns"]):
            out.append(Phrase("adj", ("clean-shaven",), 32, 0.25, group="shaven"))
            out.append(Phrase("with", ("no beard",), 25, 0.2, group="shaven"))
    for name, (slot, words, order, p, group) in table.items():
        if on[name]:
            if name == "Bags_Under_Eyes" and not male:
                words = ("bags under the eyes", "bags under her eyes")
            out.append(Phrase(slot, words, order, p, group))
    return out


CELEBA_VOCABULARY = Vocabulary(
    celeba_phrases,
    prefixes=(
        "",
        "",
        "a photo of ",
        "a portrait of ",
        "a close-up photo of ",
        "a picture of ",
        "a headshot of ",
    ),
    max_details=4,
    max_adjectives=2,
)


CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
CELEBA_LAYOUT = (
    "data_dir/img_align_celeba/{000001.jpg,...,202599.jpg} (the 'Align&Cropped Images'), "
    "data_dir/list_attr_celeba.txt (line 1: image count, line 2: the 40 attribute names, then "
    "'000001.jpg -1 1 ...') and data_dir/list_eval_partition.txt ('000001.jpg 0', 0/1/2 = train/val/test); "
    "Kaggle's list_attr_celeba.csv / list_eval_partition.csv and a nested img_align_celeba/img_align_celeba/ "
    "also work"
)


def _error(data_dir: Path, problem: str, *, missing: bool = True, hint: str = "") -> DataError:
    return data_error(
        "CelebA", data_dir, problem, layout=CELEBA_LAYOUT, source=CELEBA_URL, hint=hint, missing=missing
    )


def _find(data_dir: Path, stem: str) -> Path | None:
    """An annotation file by stem: .txt at the top or in Anno/ or Eval/, else Kaggle's .csv."""
    for p in (data_dir / f"{stem}.txt", data_dir / "Anno" / f"{stem}.txt", data_dir / "Eval" / f"{stem}.txt"):
        if p.is_file():
            return p
    csv = data_dir / f"{stem}.csv"
    return csv if csv.is_file() else None


def read_attributes(path: str | os.PathLike) -> tuple[list[str], list[str], np.ndarray]:
    """list_attr_celeba.txt (or .csv) -> (attribute names, image file names, uint8 (N, 40) of 0/1)."""
    path = Path(path)
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if path.suffix == ".csv":
        header, rows, first = lines[0].split(",")[1:], [ln.split(",") for ln in lines[1:]], 2
    else:
        if len(lines) < 2 or not lines[0].strip().isdigit():
            raise DataError(f"{path.name}: line 1 should be the number of images, got {lines[:1]!r}")
        header, first = lines[1].split(), 3
        rows = [ln.split() for ln in lines[2:]]
        if int(lines[0]) != len(rows):
            raise DataError(f"{path.name}: line 1 says {int(lines[0])} images but {len(rows)} rows follow")
    if not header:
        raise DataError(f"{path.name}: no attribute names in the header")
    files, values = [], np.zeros((len(rows), len(header)), dtype=np.uint8)
    for i, row in enumerate(rows):
        if len(row) != len(header) + 1:
            raise DataError(
                f"{path.name} line {i + first}: expected a file name and {len(header)} values, got {len(row)} fields"
            )
        try:
            v = np.array([int(x) for x in row[1:]])
        except ValueError as e:
            raise DataError(f"{path.name} line {i + first}: values must be -1/1 (or 0/1): {e}") from e
        if not np.isin(v, (-1, 0, 1)).all():
            raise DataError(
                f"{path.name} line {i + first}: values must be -1/1 (or 0/1), got {sorted(set(v))}"
            )
        files.append(row[0])
        values[i] = v > 0
    return header, files, values


def read_partition(path: str | os.PathLike) -> dict[str, int]:
    """list_eval_partition.txt (or .csv) -> {file name: 0 train | 1 val | 2 test}."""
    path = Path(path)
    sep = "," if path.suffix == ".csv" else None
    out = {}
    for i, line in enumerate(path.read_text().splitlines()):
        row = line.strip().split(sep)
        if not line.strip() or (sep and i == 0 and not row[-1].strip().isdigit()):
            continue  # blank line or csv header
        if len(row) != 2 or row[1].strip() not in ("0", "1", "2"):
            raise DataError(f"{path.name} line {i + 1}: expected '<file> <0|1|2>', got {line.strip()!r}")
        out[row[0].strip()] = int(row[1])
    return out


class CelebADataModule(BaseDataModule):
    """CelebA faces: official train/val/test partition, center crop then resize, the 40 attributes (0/1)."""

    attribute_names = list(CELEBA_ATTRIBUTES)

    def __init__(
        self,
        *,
        data_dir: str | os.PathLike = "data/celeba",
        image_size: int = 64,
        crop_size: int | None = 140,
        channels: int = 3,
        hflip: bool = True,
        skip_corrupt: bool = False,
        **loader: Any,
    ) -> None:
        super().__init__(**init_args(locals()))

    def _image_dir(self) -> Path:
        d = self.data_dir
        if problem := folder_problem(d):
            raise _error(d, problem)
        for cand in (d / "img_align_celeba" / "img_align_celeba", d / "img_align_celeba"):
            if cand.is_dir():
                if folder_is_empty(cand):
                    raise _error(d, f"{cand.relative_to(d)}/ is empty")
                return cand
        zipped = (
            "Unzip img_align_celeba.zip inside data_dir." if (d / "img_align_celeba.zip").is_file() else ""
        )
        raise _error(d, "there is no img_align_celeba/ folder", hint=zipped)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        d = self.data_dir
        image_dir = self._image_dir()
        attr_path, part_path = _find(d, "list_attr_celeba"), _find(d, "list_eval_partition")
        for stem, p in (("list_attr_celeba", attr_path), ("list_eval_partition", part_path)):
            if p is None:
                raise _error(d, f"{stem}.txt is missing")
        try:
            names, files, attributes = read_attributes(attr_path)
            partition = read_partition(part_path)
        except (DataError, UnicodeDecodeError) as e:
            raise _error(d, f"malformed annotation file: {e}", missing=False) from e
        if no_split := [f for f in files if f not in partition]:
            raise _error(d, f"{len(no_split)} images of {attr_path.name} are not in {part_path.name} "
                         f"(first: {no_split[0]})", missing=False)  # fmt: skip
        on_disk = set(os.listdir(image_dir))
        if absent := [f for f in files if f not in on_disk]:
            msg = f"{len(absent)} of the {len(files)} images listed in {attr_path.name} are missing from {image_dir}"
            if not self.skip_corrupt:
                raise _error(d, f"{msg} (first: {absent[0]})")
            log.warning("%s (first: %s); skipping them (skip_corrupt=True)", msg, absent[0])
            keep = np.array([f in on_disk for f in files])
            files, attributes = [f for f, k in zip(files, keep) if k], attributes[keep]
        split = np.array([partition[f] for f in files])
        self.attribute_names = names
        captioner = (
            AttributeCaptioner(attributes, names, vocab=CELEBA_VOCABULARY, seed=self.seed)
            if self.captions
            else None
        )
        self._make_splits(
            FileSource(image_dir, files, channels=self.channels),
            [np.flatnonzero(split == k) for k in (0, 1, 2)],
            crop_size=self.crop_size,
            attributes=attributes,
            captioner=captioner,
            skip_corrupt=self.skip_corrupt,
        )
