"""The documentation site loads nothing from the network: KaTeX ships with it (the Chromium check is in .ci/run)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_loads_no_remote_script_style_or_font() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assets = [*config.get("extra_javascript", []), *config.get("extra_css", [])]
    assert assets and not [a for a in assets if "//" in str(a)]
    assert config["theme"].get("font") is False  # Material would fetch Roboto from Google Fonts
    assert "docs_hooks/katex_hook.py" in config["hooks"]
    for asset in assets:
        if not str(asset).startswith("assets/katex/"):
            assert (ROOT / "docs" / asset).is_file(), asset


def test_katex_is_pinned_and_copied_by_the_hook() -> None:
    package = json.loads((ROOT / "docs_hooks" / "package.json").read_text())
    lock = json.loads((ROOT / "docs_hooks" / "package-lock.json").read_text())
    version = package["dependencies"]["katex"]
    assert lock["packages"]["node_modules/katex"]["version"] == version
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    hook = (ROOT / "docs_hooks" / "katex_hook.py").read_text()
    for asset in config["extra_javascript"] + config["extra_css"]:
        if str(asset).startswith("assets/katex/"):
            assert str(asset).removeprefix("assets/katex/") in hook
