"""MkDocs hook: ship KaTeX with the built site, so the documentation's maths renders without any network.

KaTeX comes from the npm registry, pinned in ``docs_hooks/package.json`` / ``package-lock.json``. When
``docs_hooks/node_modules`` lacks it, the hook runs ``npm ci`` there once (Node.js and npm must be installed).
After the build it copies the script, the auto-render extension, the style sheet and the WOFF2 fonts into
``<site>/assets/katex/``; ``mkdocs.yml`` loads them from there and ``docs/javascripts/katex.js`` renders the
``\\( ... \\)`` and ``\\[ ... \\]`` spans that ``pymdownx.arithmatex`` (generic mode) writes.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

HERE = Path(__file__).resolve().parent
DIST = HERE / "node_modules" / "katex" / "dist"
TARGET = Path("assets") / "katex"
FILES = ("katex.min.js", "katex.min.css", "contrib/auto-render.min.js")


def _ensure_katex() -> None:
    if all((DIST / name).is_file() for name in FILES):
        return
    npm = shutil.which("npm")
    if npm is None:
        raise PluginError(
            f"KaTeX is missing from {DIST} and npm is not installed: install Node.js and npm "
            f"(Debian: apt-get install -y npm), then run `npm ci --prefix {HERE}`"
        )
    command = [npm, "ci", "--prefix", str(HERE), "--no-audit", "--no-fund", "--loglevel=error"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not all((DIST / name).is_file() for name in FILES):
        raise PluginError(f"`{' '.join(command)}` failed to install KaTeX: {result.stderr.strip()[-2000:]}")


def on_config(config: Any) -> Any:
    _ensure_katex()
    return config


def on_post_build(config: Any) -> None:
    target = Path(config["site_dir"]) / TARGET
    for name in FILES:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DIST / name, target / name)
    # The style sheet lists WOFF2 first; every browser that runs KaTeX reads it.
    (target / "fonts").mkdir(parents=True, exist_ok=True)
    for font in (DIST / "fonts").glob("*.woff2"):
        shutil.copyfile(font, target / "fonts" / font.name)
