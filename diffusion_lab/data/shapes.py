"""Procedural captioned shapes (colour x shape x size x position) with an exact attribute detector."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from diffusion_lab.data.base import ArraySource, BaseDataModule, init_args, seeded_split
from diffusion_lab.data.captioners import Captioner
from diffusion_lab.data.phrases import Phrase, Vocabulary, compose_caption

CANVAS = 32  # shapes are drawn (and detected) on a 32 x 32 canvas; other sizes are resized from it
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 7, "medium": 11, "large": 15}  # extent in pixels (odd: a centre pixel)
POSITIONS: dict[str, tuple[float, float]] = {  # (row, col) of the shape's centre before jitter
    "center": (15.5, 15.5),
    "top left": (9, 9),
    "top right": (9, 22),
    "bottom left": (22, 9),
    "bottom right": (22, 22),
}
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
}
ATTRIBUTE_NAMES = [f"{k}={v}" for k, values in ATTRIBUTES.items() for v in values]  # one-hot columns
JITTER = 2  # the centre moves by up to this many pixels in each direction
_SIZES = {"small": ("small", "little", "tiny"), "medium": ("medium-sized",), "large": ("large", "big")}
_POSITIONS = {
    "center": ("in the center", "in the middle"),
    "top left": ("in the top left corner", "at the top left"),
    "top right": ("in the top right corner", "at the top right"),
    "bottom left": ("in the bottom left corner", "at the bottom left"),
    "bottom right": ("in the bottom right corner", "at the bottom right"),
}


def shapes_phrases(attributes: Mapping[str, Any]) -> list[Phrase]:
    """{shape, colour?, size?, position?} -> phrases; every given fact is said (p=1)."""
    a = attributes
    out = [Phrase("subject", (str(a["shape"]),))]
    if a.get("size"):
        out.append(Phrase("adj", _SIZES.get(a["size"], (str(a["size"]),)), order=10))
    if a.get("colour"):
        out.append(Phrase("adj", (str(a["colour"]),), order=20))
    if a.get("position"):
        out.append(Phrase("where", _POSITIONS.get(a["position"], (f"at the {a['position']}",))))
    return out


SHAPES_VOCABULARY = Vocabulary(shapes_phrases, prefixes=("", "an image of ", "a drawing of "), max_details=3)
# shape from the fill ratio area / bounding-box area: square 1, disc ~0.8, triangle ~0.5-0.6
_FILL_SQUARE, _FILL_CIRCLE = 0.9, 0.64


def draw_shape(attributes: Mapping[str, str], *, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """One uint8 (32, 32, 3) image: a filled shape of one colour on black, centre moved by `offset` pixels."""
    s = SIZES[attributes["size"]]
    h = (s - 1) // 2
    cy, cx = POSITIONS[attributes["position"]]
    cy, cx = int(np.floor(cy)) + offset[0], int(np.floor(cx)) + offset[1]
    y, x = np.mgrid[0:CANVAS, 0:CANVAS]
    dy, dx = y - cy, x - cx
    shape = attributes["shape"]
    if shape == "square":
        mask = (np.abs(dy) <= h) & (np.abs(dx) <= h)
    elif shape == "circle":
        mask = dy**2 + dx**2 <= (h + 0.5) ** 2
    elif shape == "triangle":  # apex up: row k (0 at the apex) has half-width floor(k h / (s - 1))
        k = dy + h
        mask = (k >= 0) & (k <= s - 1) & (np.abs(dx) <= np.floor(k * h / (s - 1)))
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")
    if not (0 <= cy - h and cy + h < CANVAS and 0 <= cx - h and cx + h < CANVAS):
        raise ValueError(f"shape {dict(attributes)} at offset {offset} leaves the {CANVAS}px canvas")
    image = np.zeros((CANVAS, CANVAS, 3), np.uint8)
    image[mask] = COLOURS[attributes["colour"]]
    return image


def random_attributes(n: int, rng: np.random.Generator) -> list[dict[str, str]]:
    """n attribute dicts, each value uniform over its choices."""
    return [{k: v[int(rng.integers(len(v)))] for k, v in ATTRIBUTES.items()} for _ in range(n)]


def render_shapes(attributes: Sequence[Mapping[str, str]], rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, 32, 32, 3) images of the given attributes, each centre jittered by up to JITTER pixels."""
    offsets = rng.integers(-JITTER, JITTER + 1, size=(len(attributes), 2))
    return np.stack([draw_shape(a, offset=tuple(o)) for a, o in zip(attributes, offsets.tolist())])


def one_hot(attributes: Sequence[Mapping[str, str]]) -> np.ndarray:
    """uint8 (N, len(ATTRIBUTE_NAMES)) one-hot rows of attribute dicts."""
    out = np.zeros((len(attributes), len(ATTRIBUTE_NAMES)), np.uint8)
    for i, a in enumerate(attributes):
        for k in ATTRIBUTES:
            out[i, ATTRIBUTE_NAMES.index(f"{k}={a[k]}")] = 1
    return out


# ------------------------------------------------------------------------------------------ detector
def _to_unit_hwc(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 (N, H, W, 3) or float (N, 3, H, W) in [-1, 1] -> float (N, 32, 32, 3) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        x = images.detach().float().clamp(-1, 1).cpu()
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected float images (N, 3, H, W), got {tuple(x.shape)}")
        if x.shape[-1] != CANVAS:
            x = torch.nn.functional.interpolate(x, size=(CANVAS, CANVAS), mode="bilinear", antialias=True)
        return ((x + 1) / 2).permute(0, 2, 3, 1).numpy()
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[1:3] != (CANVAS, CANVAS):
        raise ValueError(f"expected uint8 images (N, {CANVAS}, {CANVAS}, 3), got {arr.shape}")
    return arr.astype(np.float32) / 255.0


def detect_shapes(
    images: np.ndarray | torch.Tensor, *, threshold: float = 0.5
) -> list[dict[str, str | None]]:
    """Read {colour, shape, size, position} back from images (exact on drawn ones; None where nothing is found).

    The shape is the largest 4-connected blob of pixels whose brightest channel exceeds `threshold`:
    colour = nearest palette colour to its mean, size = nearest extent to its bounding box, shape from
    its fill ratio (square ~1, disc ~0.8, triangle ~0.5), position = nearest centre to its box centre.
    """
    from scipy import ndimage

    x = _to_unit_hwc(images)
    palette = np.array(list(COLOURS.values()), np.float32) / 255.0  # (K, 3)
    anchors = np.array(list(POSITIONS.values()), np.float32)  # (P, 2)
    extents = np.array(list(SIZES.values()), np.float32)
    out: list[dict[str, str | None]] = []
    for img in x:
        labels, n = ndimage.label(img.max(axis=-1) > threshold)
        if n == 0:
            out.append(dict.fromkeys(ATTRIBUTES))
            continue
        areas = np.bincount(labels.ravel())[1:]
        blob = labels == (int(np.argmax(areas)) + 1)
        rows, cols = np.nonzero(blob)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        fill = blob.sum() / float(h * w)
        centre = np.array([(rows.max() + rows.min()) / 2, (cols.max() + cols.min()) / 2], np.float32)
        mean = img[blob].mean(axis=0)
        out.append(
            {
                "colour": list(COLOURS)[int(np.argmin(((palette - mean) ** 2).sum(-1)))],
                "shape": "square"
                if fill >= _FILL_SQUARE
                else "circle"
                if fill >= _FILL_CIRCLE
                else "triangle",
                "size": list(SIZES)[int(np.argmin(np.abs(extents - max(h, w))))],
                "position": list(POSITIONS)[int(np.argmin(((anchors - centre) ** 2).sum(-1)))],
            }
        )
    return out


# ------------------------------------------------------------------------------------ data module
class ShapesCaptioner(Captioner):
    """Captions of shapes attribute dicts through SHAPES_VOCABULARY (synonyms and frames vary)."""

    def __init__(self, attributes: Sequence[Mapping[str, str]], *, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.attributes = list(attributes)

    def describe(self, j: int, rng: np.random.Generator) -> str:
        return compose_caption(self.attributes[j], rng, vocab=SHAPES_VOCABULARY)


class ShapesDataModule(BaseDataModule):
    """`num_images` random shapes drawn once from `seed`, split train/val/test; batches carry one-hot attributes."""

    attribute_names = ATTRIBUTE_NAMES

    def __init__(
        self,
        *,
        num_images: int = 20000,
        image_size: int = 32,
        channels: int = 3,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        **loader: Any,
    ) -> None:
        if num_images < 3:
            raise ValueError(f"num_images must be >= 3 (one per split), got {num_images}")
        super().__init__(**init_args(locals()))
        self.item_attributes: list[dict[str, str]] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        rng = np.random.default_rng(self.seed)
        self.item_attributes = random_attributes(self.num_images, rng)
        images = render_shapes(self.item_attributes, rng)
        parts = seeded_split(self.num_images, self.fractions, self.seed)
        captioner = ShapesCaptioner(self.item_attributes, seed=self.seed) if self.captions else None
        self._make_splits(
            ArraySource(images), parts, attributes=one_hot(self.item_attributes), captioner=captioner
        )
