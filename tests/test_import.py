"""`import dreamood` is fast and light: no heavy library is imported until it is used."""

from __future__ import annotations

import subprocess
import sys

import dreamood

HEAVY = ("torch", "diffusers", "transformers", "faiss", "sklearn", "matplotlib", "skimage", "scipy")


def test_import_loads_no_heavy_library() -> None:
    code = f"import sys, dreamood; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"import dreamood loaded: {result.stdout.strip()}"


def test_every_public_name_resolves_and_is_documented() -> None:
    for name in dreamood.__all__:
        value = getattr(dreamood, name)
        assert value.__doc__, f"dreamood.{name} has no docstring"
    assert set(dreamood.__all__) <= set(dir(dreamood))


def test_unknown_attribute_raises_attribute_error() -> None:
    try:
        dreamood.NotAThing  # noqa: B018
    except AttributeError as error:
        assert "NotAThing" in str(error)
    else:
        raise AssertionError("expected AttributeError")


def test_data_subpackage_names_resolve_and_class_lists_need_no_torchvision() -> None:
    import dreamood.data

    for name in dreamood.data.__all__:
        assert getattr(dreamood.data, name).__doc__ or isinstance(getattr(dreamood.data, name), tuple | list)
    code = "import sys, dreamood.data as d; d.CIFAR100_CLASSES; print('torchvision' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
