"""Captions from attributes and class labels: one generic phrase composer, per-data-set vocabularies."""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusion_lab.nets.text import split_words

# ---------------------------------------------------------------------------------- generic core
SLOTS = ("prefix", "adj", "subject", "with", "wearing", "where")
_GLUE = ("a", "an", "with", "and", "wearing", ",")  # what compose_caption / label_caption add themselves


@dataclass(frozen=True)
class Phrase:
    """One fact about an image in words: its slot in the sentence, synonyms, order and how often it is said.

    slot:    "prefix" (replaces the frame, e.g. "a blurry photo of "), "adj" (before the subject),
             "subject" (the head noun, exactly one), "with" / "wearing" (lists after the subject),
             "where" (a trailing location phrase).
    options: synonyms, one is drawn per caption.
    order:   position inside the slot (opinion < size < age < colour, as English orders adjectives).
    p:       probability of being mentioned at all (the subject is always said).
    group:   at most one phrase of a group is said (e.g. "clean-shaven" vs "with no beard").
    """

    slot: str
    options: tuple[str, ...]
    order: int = 50
    p: float = 1.0
    group: str | None = None

    def __post_init__(self) -> None:
        if self.slot not in SLOTS:
            raise ValueError(f"unknown caption slot {self.slot!r}; valid slots: {', '.join(SLOTS)}")
        if not self.options:
            raise ValueError(f"phrase in slot {self.slot!r} has no words")


@dataclass(frozen=True)
class Vocabulary:
    """How one data set's attributes become phrases, and the sentence frames around them."""

    phrases: Callable[[Mapping[str, Any]], list[Phrase]]
    prefixes: tuple[str, ...] = ("",)
    max_details: int = 4  # phrases besides the subject and the frame
    max_adjectives: int = 2
    merge_wearing: float = 0.5  # probability that "wearing" items join the "with" list


def with_article(text: str) -> str:
    """Prefix 'a' or 'an' by the sound of the first word ("an older man", "a young woman", "an 8")."""
    word = text.split()[0].lower() if text.strip() else ""
    vowel_sound = (
        word[:1] in ("a", "e", "i", "o")
        or (word[:1] == "u" and not word.startswith(("uni", "use", "usu", "uto", "u-")))
        or word.startswith(("hour", "honest", "honou", "8", "11", "18"))
    ) and not word.startswith(("one", "eu", "ewe"))
    return ("an " if vowel_sound else "a ") + text


def join_and(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _weighted_keep(phrases: list[Phrase], k: int, rng: np.random.Generator) -> list[Phrase]:
    """Keep at most k phrases, drawn without replacement with weights p (Efraimidis-Spirakis keys)."""
    if len(phrases) <= k:
        return phrases
    keys = rng.random(len(phrases)) ** (1.0 / np.array([max(ph.p, 1e-6) for ph in phrases]))
    keep = set(np.argsort(-keys)[:k].tolist())
    return [ph for i, ph in enumerate(phrases) if i in keep]


def compose_caption(
    attributes: Mapping[str, Any], rng: np.random.Generator | int, *, vocab: Vocabulary
) -> str:
    """One caption for an attribute dict: pick phrases (by p, groups, caps), synonyms, a frame; order them.

    The same (attributes, rng state) gives the same caption. Only what `vocab.phrases` returns can be
    said, so a vocabulary that emits phrases only for what holds never contradicts its attributes.
    """
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    phrases = vocab.phrases(attributes)
    subjects = [ph for ph in phrases if ph.slot == "subject"]
    if len(subjects) != 1:
        raise ValueError(f"a vocabulary must give exactly one subject phrase, got {len(subjects)}")
    # which facts are said: each with its probability, one per group, at most N adjectives / details
    said = [ph for ph in phrases if ph.slot != "subject" and rng.random() < ph.p]
    by_group: dict[str, list[Phrase]] = {}
    for ph in said:
        if ph.group is not None:
            by_group.setdefault(ph.group, []).append(ph)
    keep = {id(g[int(rng.integers(len(g)))]) for g in by_group.values()}
    said = [ph for ph in said if ph.group is None or id(ph) in keep]
    prefix = [ph for ph in said if ph.slot == "prefix"][:1]
    adjs = _weighted_keep([ph for ph in said if ph.slot == "adj"], vocab.max_adjectives, rng)
    details = _weighted_keep(
        adjs + [ph for ph in said if ph.slot not in ("prefix", "adj")], vocab.max_details, rng
    )
    # the words
    words = {id(ph): ph.options[int(rng.integers(len(ph.options)))] for ph in subjects + prefix + details}

    def slot(name: str) -> list[str]:
        return [words[id(ph)] for ph in sorted((d for d in details if d.slot == name), key=lambda d: d.order)]

    frame = words[id(prefix[0])] if prefix else vocab.prefixes[int(rng.integers(len(vocab.prefixes)))]
    head = with_article(" ".join([*slot("adj"), words[id(subjects[0])]]))
    withs, wears = slot("with"), slot("wearing")
    if wears and rng.random() < vocab.merge_wearing:
        withs, wears = withs + wears, []
    text = frame + head
    if withs:
        text += " with " + join_and(withs)
    if wears:
        text += (", wearing " if withs else " wearing ") + join_and(wears)
    for where in slot("where"):
        text += " " + where
    return re.sub(r"\s+", " ", text).strip()


# ------------------------------------------------------------------------------------ CelebA (40)
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


# ------------------------------------------------- a procedural attribute set (shapes), as an example
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


# ------------------------------------------------------------------------------------ class labels
LABEL_TEMPLATES: dict[str, tuple[str, ...]] = {
    "photo": ("a photo of {a}", "a picture of {a}", "an image of {a}", "a small photo of {a}", "{a}"),
    "handwritten": (
        "a handwritten {name}",
        "the handwritten digit {name}",
        "a handwritten number {name}",
        "the digit {name}, written by hand",
    ),
    "product": ("a photo of {a}", "a product photo of {a}", "a grayscale photo of {a}", "a picture of {a}"),
}
LABEL_SYNONYMS: dict[str, tuple[str, ...]] = {
    # CIFAR-10
    "airplane": ("airplane", "plane", "aeroplane"),
    "automobile": ("car", "automobile"),
    # Fashion-MNIST
    "T-shirt/top": ("t-shirt", "top", "tee"),
    "Trouser": ("pair of trousers", "pair of pants"),
    "Pullover": ("pullover", "sweater", "jumper"),
    "Sneaker": ("sneaker", "trainer", "running shoe"),
    "Bag": ("bag", "handbag"),
    "Ankle boot": ("ankle boot", "boot"),
    # digits
    **{w: (w, str(i)) for i, w in enumerate("zero one two three four five six seven eight nine".split())},
}


def label_caption(
    class_name: str,
    rng: np.random.Generator | int,
    *,
    style: str = "photo",
    synonyms: Mapping[str, tuple[str, ...]] = LABEL_SYNONYMS,
) -> str:
    """A caption from a class name: "a photo of a frog", "a handwritten seven", "a photo of a sneaker"."""
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    if style not in LABEL_TEMPLATES:
        raise ValueError(f"unknown label caption style {style!r}; valid: {', '.join(LABEL_TEMPLATES)}")
    words = synonyms.get(class_name) or (class_name.replace("_", " ").lower(),)
    name = words[int(rng.integers(len(words)))]
    templates = LABEL_TEMPLATES[style]
    return templates[int(rng.integers(len(templates)))].format(a=with_article(name), name=name)


# ------------------------------------------------------------------------- per-item captioners
@cache
def caption_words(name: str) -> tuple[str, ...]:
    """Every word the caption machinery can say for a data set family (enumerated from its vocabularies): the
    vocabulary of `nets.text.WordTokenizer` for "shapes", "celeba", "labels" (class-label captions) or "all"."""

    def words_of(vocab: Vocabulary, attribute_sets: Iterable[Mapping]) -> set[str]:
        out = set(_GLUE)
        for text in vocab.prefixes:
            out.update(split_words(text))
        for attributes in attribute_sets:
            for phrase in vocab.phrases(attributes):
                for text in phrase.options:
                    out.update(split_words(text))
        return out

    if name == "shapes":
        from diffusion_lab.data.shapes import ATTRIBUTES

        combos = (dict(zip(ATTRIBUTES, c)) for c in itertools.product(*ATTRIBUTES.values()))
        return tuple(sorted(words_of(SHAPES_VOCABULARY, combos)))
    if name == "celeba":
        hair = [
            a for a in CELEBA_ATTRIBUTES if a.endswith("_Hair") and a not in ("Wavy_Hair", "Straight_Hair")
        ]
        sets = []
        for male, young, bald, no_beard, colour, style, extras in itertools.product(
            (0, 1), (0, 1), (0, 1), (0, 1), hair, ("Wavy_Hair", "Straight_Hair", None), (0, 1)
        ):
            a = dict.fromkeys(CELEBA_ATTRIBUTES, 1)
            a.update(dict.fromkeys(hair + ["Wavy_Hair", "Straight_Hair"], 0))
            a.update(Male=male, Young=young, Bald=bald, No_Beard=no_beard, **{colour: 1})
            if style:
                a[style] = 1
            if not extras:
                a.update(Goatee=0, Mustache=0, Sideburns=0, **{"5_o_Clock_Shadow": 0})
            sets.append(a)
        return tuple(sorted(words_of(CELEBA_VOCABULARY, sets)))
    if name == "labels":
        from diffusion_lab.data.cifar import CIFAR10DataModule
        from diffusion_lab.data.digits import DIGIT_NAMES
        from diffusion_lab.data.mnist import FASHION_MNIST_CLASSES

        out = set(_GLUE)
        for template in itertools.chain(*LABEL_TEMPLATES.values()):
            out.update(split_words(template.replace("{a}", "").replace("{name}", "")))
        for name_ in [*DIGIT_NAMES, *FASHION_MNIST_CLASSES, *CIFAR10DataModule.class_names]:
            out.update(split_words(name_.replace("_", " ")))
        for synonyms in LABEL_SYNONYMS.values():
            for text in synonyms:
                out.update(split_words(text))
        return tuple(sorted(out))
    if name == "all":
        return tuple(sorted(set().union(*(caption_words(n) for n in ("shapes", "celeba", "labels")))))
    raise ValueError(f"unknown caption vocabulary {name!r}; valid: shapes, celeba, labels, all")


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


# -------------------------------------------------------------------------------- JSONL script
DATASETS = {
    "celeba": "diffusion_lab.data.celeba:CelebADataModule",
    "cifar10": "diffusion_lab.data.cifar:CIFAR10DataModule",
    "cifar100": "diffusion_lab.data.cifar:CIFAR100DataModule",
    "mnist": "diffusion_lab.data.mnist:MNISTDataModule",
    "fashion_mnist": "diffusion_lab.data.mnist:FashionMNISTDataModule",
    "digits": "diffusion_lab.data.digits:DigitsDataModule",
    "image_folder": "diffusion_lab.data.folder:ImageFolderDataModule",
}


def build_datamodule(dataset: str, **kwargs: Any):
    """Instantiate a data module by short name with captions on, passing only the kwargs it accepts."""
    import importlib

    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    module, cls_name = DATASETS[dataset].split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    accepted = inspect.signature(cls.__init__).parameters
    return cls(captions=True, **{k: v for k, v in kwargs.items() if k in accepted and v is not None})


def write_captions_jsonl(dataset, out: str | Path, *, per_image: int = 1, limit: int | None = None) -> int:
    """Write {index, id, captions, label?/class_name?/attributes?} per item of an ImageDataset; returns lines."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    with open(out, "w", encoding="utf-8") as f:
        for i in range(n):
            j = int(dataset.indices[i])
            record = {"index": i, **dataset.info(i), "captions": dataset.captioner.captions(j, per_image)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return n


def main(argv: Sequence[str] | None = None) -> None:
    """python -m diffusion_lab.data.captions --dataset celeba --data-dir D --split val --out captions.jsonl"""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    ap.add_argument("--data-dir", default=None, help="the data set's folder (not needed for digits)")
    ap.add_argument("--split", default="val", choices=["train", "val", "test"])
    ap.add_argument("--out", required=True, help="output .jsonl file")
    ap.add_argument(
        "--per-image", type=int, default=1, help="distinct captions per image (first = eval caption)"
    )
    ap.add_argument("--seed", type=int, default=0, help="the data module's seed (splits and captions)")
    ap.add_argument("--limit", type=int, default=None, help="write at most this many images")
    args = ap.parse_args(argv)
    dm = build_datamodule(args.dataset, data_dir=args.data_dir, seed=args.seed)
    dm.setup()
    n = write_captions_jsonl(
        getattr(dm, f"{args.split}_set"), args.out, per_image=args.per_image, limit=args.limit
    )
    print(f"wrote captions of {n} {args.split} images of {args.dataset} to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
