"""The bundled class lists (package data files) and the authors' per-class words."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import dreamood.data
from dreamood.data import classes

# The authors' published data, beside the checkout (skipped where absent).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# sha256 of "\n".join(list) of the lists as they were written as Python literals before they became data files.
_DIGESTS = {
    "CIFAR100_CLASSES": (100, "60ae3a3ac1355fcfec19c0ea3cb5fde15203ecf3b537cabcf6d5d54688ee9a4d"),
    "IMAGENET1K_CLASSES": (1000, "0b0f9fee7c952f257418d62aa701f023a9da13b443a14f5c4291e5724d92967c"),
    "IMAGENET1K_WNIDS": (1000, "385e0240499426c022b773be1ae4da780f057b89c9694c7f47199f62746b6edd"),
    "IMAGENET100_CLASSES": (100, "daf8a68854f68713140ccba37ddf9b4b60f17a6067c716b64d7e256a83e9ba92"),
    "IMAGENET100_WNIDS": (100, "fe3c0441e939852a79fe302b55fc52c754e9359aca0fd207d3c76da139d7cc5e"),
}


@pytest.mark.parametrize("name", sorted(_DIGESTS))
def test_class_lists_are_unchanged(name: str) -> None:
    value = getattr(dreamood.data, name)
    assert value is getattr(classes, name)
    assert isinstance(value, tuple) and all(isinstance(item, str) for item in value)
    count, digest = _DIGESTS[name]
    assert len(value) == count
    assert hashlib.sha256("\n".join(value).encode()).hexdigest() == digest


def test_class_lists_spot_checks() -> None:
    from dreamood.data.classes import CIFAR100_CLASSES, IMAGENET1K_CLASSES, IMAGENET100_CLASSES, IMAGENET100_WNIDS

    assert CIFAR100_CLASSES[:2] == ("apple", "aquarium fish") and CIFAR100_CLASSES[-1] == "worm"
    assert IMAGENET1K_CLASSES[0] == "tench" and IMAGENET1K_CLASSES[-1] == "toilet tissue"
    assert IMAGENET100_WNIDS[0] == "n01498041" and IMAGENET100_CLASSES[0] == "stingray"
    with pytest.raises(AttributeError, match="NO_SUCH_LIST"):
        _ = classes.NO_SUCH_LIST


def test_reference_words_layout() -> None:
    for dataset, names in (
        ("cifar100", dreamood.data.CIFAR100_CLASSES),
        ("imagenet100", dreamood.data.IMAGENET100_CLASSES),
    ):
        words = dreamood.data.reference_words(dataset)
        assert words.class_names == names
        assert len(words.injection_words) == len(words.prompt_words) == len(words.prompt_templates) == 100
        assert all(template.count("{}") == 1 for template in words.prompt_templates)
    cifar = dreamood.data.reference_words("cifar100")
    # 19 words differ from the class name's first word (plurals and short forms), 5 more drop " tree".
    assert sum(a != b.split()[0] for a, b in zip(cifar.injection_words, cifar.class_names)) == 19
    assert sum(a != b for a, b in zip(cifar.injection_words, cifar.class_names)) == 24
    assert cifar.injection_words[21] == "chimp" and cifar.prompt_words[21] == "chimpanzee"
    assert set(cifar.prompt_templates) == {"A high-quality image of the {}"}
    imagenet = dreamood.data.reference_words("imagenet100")
    differ = {b: a for a, b in zip(imagenet.injection_words, imagenet.class_names) if a != b.lower()}
    assert differ == {
        "crayfish": "crawfish",
        "killer whale": "orca",
        "hog": "pig",
        "giant panda": "panda",
        "aircraft carrier": "carrier",
        "lawn mower": "mower",
    }
    special = {w: p for w, p in zip(imagenet.prompt_words, imagenet.prompts) if not p.endswith("the " + w)}
    assert special == {
        "stingray": "A high-quality image of the stingray in the water",
        "kite": "A high-quality image of the kite bird",
        "tick": "A high-quality image of the tick bite",
        "quail": "A high-quality image of the quail bird",
        "ox": "A high-quality image of the ox animal",
        "impala": "A high-quality image of the impala animal",
        "chest": "A high-quality image of the chest box",
        "nail": "A high-quality image of the wire nail",
    }
    with pytest.raises(ValueError, match="cifar10"):
        dreamood.data.reference_words("cifar10")


@pytest.mark.skipif(not (SHARED_DATA / "reference_words.json").is_file(), reason="shared reference data absent")
def test_reference_words_match_the_authors_lists() -> None:
    published = json.loads((SHARED_DATA / "reference_words.json").read_text())
    for dataset in ("cifar100", "imagenet100"):
        words = dreamood.data.reference_words(dataset)
        assert list(words.injection_words) == published[dataset]["injection"]
        assert list(words.prompt_words) == published[dataset]["prompt"]
