"""Open built documentation pages in headless Chromium and fail when their maths did not render.

Usage: ``python docs_hooks/check_rendered.py SITE_DIR [PAGE ...] [--screenshots DIR]``

Each page (default: every page with maths, marked by pymdownx.arithmatex's ``arithmatex`` class) is loaded
from disk, without Chromium's own network services. The DOM after the scripts ran is dumped; its visible text
(without code blocks and without KaTeX's hidden MathML copy of the source) must hold no raw TeX delimiter
``\\(``, ``\\)``, ``\\[``, ``\\]`` or ``$$`` and at least one rendered KaTeX formula, and the page must
load no script or style sheet from the network. A screenshot of each page goes to ``--screenshots``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

DELIMITERS = ("\\(", "\\)", "\\[", "\\]", "$$")
# Elements whose text is not rendered prose: code, scripts, and KaTeX's MathML copy of the TeX source.
SKIPPED_TAGS = {"code", "pre", "script", "style", "annotation", "noscript"}
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
# An element opened inside these is never closed explicitly in HTML.
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Text(HTMLParser):
    """The rendered text of a page, its count of KaTeX formulas, and the remote scripts and style sheets."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, bool]] = []
        self.text: list[str] = []
        self.formulas = 0
        self.remote: list[str] = []

    def _skipping(self) -> bool:
        return any(skip for _, skip in self.stack)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        classes = (values.get("class") or "").split()
        if "katex" in classes:
            self.formulas += 1
        for key in ("src", "href"):
            link = values.get(key) or ""
            remote = link.startswith(("http://", "https://", "//"))
            if remote and (tag == "script" or (tag == "link" and values.get("rel") == "stylesheet")):
                self.remote.append(link)
        if tag in VOID_TAGS:
            return
        self.stack.append((tag, tag in SKIPPED_TAGS or "katex-mathml" in classes))

    def handle_endtag(self, tag: str) -> None:
        for index in range(len(self.stack) - 1, -1, -1):
            if self.stack[index][0] == tag:
                del self.stack[index:]
                return

    def handle_data(self, data: str) -> None:
        if not self._skipping():
            self.text.append(data)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("check_rendered: no chromium on PATH (Debian: apt-get install -y chromium)")


def check_page(browser: str, page: Path, screenshot: Path | None) -> list[str]:
    """The problems of one page (empty when its maths rendered)."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as profile:
        common = [browser, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000"]
        dump = subprocess.run(
            [*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=False
        )
        if dump.returncode != 0 or not dump.stdout.strip():
            return [f"chromium could not load the page (exit {dump.returncode}): {dump.stderr.strip()[-500:]}"]
        if screenshot is not None:
            subprocess.run(
                [*common, "--window-size=1280,1600", f"--screenshot={screenshot}", page.as_uri()],
                capture_output=True,
                timeout=120,
                check=False,
            )
    parser = _Text()
    parser.feed(dump.stdout)
    text = "".join(parser.text)
    for delimiter in DELIMITERS:
        count = text.count(delimiter)
        if count:
            at = text.index(delimiter)
            problems.append(f"{count} raw {delimiter!r} left, e.g. ...{' '.join(text[at - 40 : at + 60].split())}...")
    if parser.formulas == 0:
        problems.append("no KaTeX formula was rendered")
    if parser.remote:
        problems.append(f"loads from the network: {', '.join(parser.remote)}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site_dir", type=Path)
    parser.add_argument("pages", nargs="*", help="pages relative to SITE_DIR (default: every page with maths)")
    parser.add_argument("--screenshots", type=Path, help="folder for one PNG screenshot per page")
    args = parser.parse_args(argv)
    browser = _chromium()
    if not args.pages:
        args.pages = sorted(
            page.relative_to(args.site_dir).as_posix()
            for page in args.site_dir.rglob("*.html")
            if 'class="arithmatex"' in page.read_text(encoding="utf-8")
        )
        if not args.pages:
            print(f"FAIL: no page of {args.site_dir} has maths (class arithmatex)")
            return 1
    if args.screenshots is not None:
        args.screenshots.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in args.pages:
        page = (args.site_dir / name).resolve()
        if not page.is_file():
            print(f"FAIL {name}: no such page in {args.site_dir}")
            failed += 1
            continue
        shot = None if args.screenshots is None else args.screenshots / (name.replace("/", "_") + ".png")
        problems = check_page(browser, page, shot)
        print(f"{'FAIL' if problems else 'ok  '} {name}" + "".join(f"\n     {p}" for p in problems))
        failed += bool(problems)
    print(f"{len(args.pages) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
