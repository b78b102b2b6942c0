"""The words each data set family's captions can say: `caption_words`, the word tokenizers' vocabulary."""

from __future__ import annotations

import itertools
from functools import cache

from diffusion_lab.data.celeba import CELEBA_ATTRIBUTES, CELEBA_VOCABULARY
from diffusion_lab.data.phrases import GLUE, LABEL_SYNONYMS, LABEL_TEMPLATES, vocabulary_words
from diffusion_lab.data.shapes import SHAPES_VOCABULARY
from diffusion_lab.imports import moved
from diffusion_lab.nets.text import split_words


@cache
def caption_words(name: str) -> tuple[str, ...]:
    """Every word the caption machinery can say for a data set family (enumerated from its vocabularies): the
    vocabulary of `nets.text.WordTokenizer` for "shapes", "celeba", "labels" (class-label captions) or "all"."""

    if name == "shapes":
        from diffusion_lab.data.shapes import ATTRIBUTES

        combos = (dict(zip(ATTRIBUTES, c)) for c in itertools.product(*ATTRIBUTES.values()))
        return tuple(sorted(vocabulary_words(SHAPES_VOCABULARY, combos)))
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
        return tuple(sorted(vocabulary_words(CELEBA_VOCABULARY, sets)))
    if name == "labels":
        from diffusion_lab.data.cifar import CIFAR10DataModule
        from diffusion_lab.data.digits import DIGIT_NAMES
        from diffusion_lab.data.mnist import FASHION_MNIST_CLASSES

        out = set(GLUE)
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


__getattr__ = moved(__name__, {  # where the names that lived here are now
    "diffusion_lab.data.phrases": "Phrase Vocabulary compose_caption label_caption with_article join_and LABEL_TEMPLATES LABEL_SYNONYMS",
    "diffusion_lab.data.captioners": "Captioner LabelCaptioner AttributeCaptioner TextCaptioner",
    "diffusion_lab.data.celeba": "CELEBA_ATTRIBUTES CELEBA_VOCABULARY celeba_phrases",
    "diffusion_lab.data.shapes": "SHAPES_VOCABULARY shapes_phrases",
    "diffusion_lab.write_captions": "DATASETS build_datamodule write_captions_jsonl main",
})  # fmt: skip

if __name__ == "__main__":
    raise SystemExit(
        "error: this script moved: python -m diffusion_lab.write_captions --dataset NAME --out FILE"
    )
