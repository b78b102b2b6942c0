"""The phrase composer: facts about an image (attributes or a class label) in words, one caption per draw."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffusion_lab.nets.text import split_words

SLOTS = ("prefix", "adj", "subject", "with", "wearing", "where")
GLUE = ("a", "an", "with", "and", "wearing", ",")  # what compose_caption / label_caption add themselves


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


def vocabulary_words(vocab: Vocabulary, attribute_sets: Iterable[Mapping]) -> set[str]:
    """Every word `vocab` can say for these attribute sets, its frames and the glue words included."""
    out = set(GLUE)
    for text in vocab.prefixes:
        out.update(split_words(text))
    for attributes in attribute_sets:
        for phrase in vocab.phrases(attributes):
            for text in phrase.options:
                out.update(split_words(text))
    return out
