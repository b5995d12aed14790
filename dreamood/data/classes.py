"""Bundled class-name lists: CIFAR-100 and ImageNet (the paper's ImageNet-100 subset and all of ImageNet-1k).

The names are written as words a text encoder understands ("aquarium fish", not "aquarium_fish"), in the
datasets' label order, so ``TokenEmbeddings.from_pretrained(model, CIFAR100_CLASSES)`` gives the anchors of
labels ``0..99``.

The lists live in text files shipped with the package (``dreamood/data/lists/``) and are read once, at first
use. :func:`reference_words` reads the per-class words of the authors' public code (injection words, prompt
words and prompt templates), which the ``*-reference`` configurations use.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

__all__ = [
    "CIFAR100_CLASSES",
    "IMAGENET1K_CLASSES",
    "IMAGENET1K_WNIDS",
    "IMAGENET100_CLASSES",
    "IMAGENET100_WNIDS",
    "REFERENCE_DATASETS",
    "ReferenceWords",
    "reference_words",
]

#: Datasets whose reference word lists are bundled (see :func:`reference_words`).
REFERENCE_DATASETS: tuple[str, ...] = ("cifar100", "imagenet100")

if TYPE_CHECKING:
    #: The 100 CIFAR-100 fine labels in the dataset's label order, underscores replaced by spaces.
    CIFAR100_CLASSES: tuple[str, ...]
    #: The 1000 ImageNet-1k WordNet ids in class index order (sorted).
    IMAGENET1K_WNIDS: tuple[str, ...]
    #: Readable names of the 1000 ImageNet-1k classes in class index order (the synset's first lemma; the two
    #: names that occur twice, "crane" and "maillot", are told apart as "crane bird" and "maillot tank suit").
    IMAGENET1K_CLASSES: tuple[str, ...]
    #: The 100 ImageNet classes of DREAM-OOD's ImageNet-100 benchmark (Du et al., NeurIPS 2023), in the paper's order.
    IMAGENET100_WNIDS: tuple[str, ...]
    #: Readable names of the ImageNet-100 classes, in the order of ``IMAGENET100_WNIDS``.
    IMAGENET100_CLASSES: tuple[str, ...]


def _read_lines(name: str) -> list[str]:
    """The non-empty, non-comment lines of the bundled list ``name``."""
    text = resources.files("dreamood.data").joinpath("lists").joinpath(name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


@functools.cache
def _lists() -> dict[str, tuple[str, ...]]:
    rows = [line.split(" ", 1) for line in _read_lines("imagenet1k.txt")]
    wnids = tuple(wnid for wnid, _ in rows)
    names = tuple(name for _, name in rows)
    subset = tuple(_read_lines("imagenet100.txt"))
    name_of_wnid = dict(zip(wnids, names))
    return {
        "CIFAR100_CLASSES": tuple(_read_lines("cifar100.txt")),
        "IMAGENET1K_WNIDS": wnids,
        "IMAGENET1K_CLASSES": names,
        "IMAGENET100_WNIDS": subset,
        "IMAGENET100_CLASSES": tuple(name_of_wnid[wnid] for wnid in subset),
    }


def __getattr__(name: str) -> tuple[str, ...]:
    lists = _lists()
    if name not in lists:
        raise AttributeError(f"module 'dreamood.data.classes' has no attribute {name!r}")
    value = lists[name]
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


@dataclass(frozen=True)
class ReferenceWords:
    """The per-class words of the authors' public code (github deeplearning-wisc/dream-ood, commit fcb89c6).

    Attributes:
        dataset: ``"cifar100"`` or ``"imagenet100"``.
        class_names: dreamood's class names, in label order (``CIFAR100_CLASSES`` or ``IMAGENET100_CLASSES``).
        injection_words: Per class, the word whose *first* CLIP token gives the anchor T(y) and is the token
            replaced in the prompt (their ``ldm/modules/encoders/modules.py``): plurals and short forms such as
            "apples", "chimp", "mower", "orca".
        prompt_words: Per class, the word written into the prompt (their ``scripts/dream_ood.py``).
        prompt_templates: Per class, the prompt with one ``{}`` for the prompt word: "A high-quality image of
            the {}", with the authors' suffixes for seven ImageNet-100 classes (kite and quail + " bird", chest +
            " box", tick + " bite", stingray + " in the water", ox and impala + " animal") and "A high-quality
            image of the wire {}" for nail (their script appends that sentence to the plain prompt, a bug).
    """

    dataset: str
    class_names: tuple[str, ...]
    injection_words: tuple[str, ...]
    prompt_words: tuple[str, ...]
    prompt_templates: tuple[str, ...]

    @property
    def prompts(self) -> tuple[str, ...]:
        """Each class's full prompt text, the template with the prompt word written in."""
        return tuple(t.replace("{}", w) for t, w in zip(self.prompt_templates, self.prompt_words))


@functools.cache
def reference_words(dataset: str) -> ReferenceWords:
    """The authors' injection words, prompt words and prompt templates of ``dataset``, in label order.

    Args:
        dataset: One of :data:`REFERENCE_DATASETS`.

    Returns:
        The bundled word lists (read from ``dreamood/data/lists/reference_<dataset>.tsv`` once).

    Raises:
        ValueError: ``dataset`` is not one of :data:`REFERENCE_DATASETS`.
    """
    if dataset not in REFERENCE_DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(REFERENCE_DATASETS)}, got {dataset!r}")
    rows = [line.split("\t") for line in _read_lines(f"reference_{dataset}.tsv")]
    return ReferenceWords(
        dataset=dataset,
        class_names=tuple(row[0] for row in rows),
        injection_words=tuple(row[1] for row in rows),
        prompt_words=tuple(row[2] for row in rows),
        prompt_templates=tuple(row[3] for row in rows),
    )
