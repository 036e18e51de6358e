"""MkDocs hooks of the docs build (``mkdocs.yml``: ``hooks``). Nothing here needs the network.

- ``<!-- api-modules: PACKAGE -->`` on a page becomes one ``::: PACKAGE.module`` block per
  public module of that package found on disk (no leading underscore), so the API reference
  follows the modules as they are, without a hand-kept list that a rename would break;
  ``<!-- api-modules: PACKAGE | members: false -->`` shows the modules' docstrings only.
- ``<!-- readme-section: TITLE -->`` becomes the README's ``## TITLE`` section (without its
  heading): the README stays the one place of its tables, and the docs show the same ones.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
API = re.compile(r"^<!-- api-modules: ([\w.]+)( \| members: false)? -->$", re.MULTILINE)
README = re.compile(r"^<!-- readme-section: (.+?) -->$", re.MULTILINE)


def _modules(package: str) -> list[str]:
    folder = ROOT.joinpath(*package.split("."))
    names = [p.stem for p in sorted(folder.glob("*.py")) if not p.stem.startswith("_")] + [
        p.name
        for p in sorted(folder.iterdir())
        if p.is_dir() and (p / "__init__.py").exists() and not p.name.startswith("_")
    ]
    return sorted(names)


def _api(match: re.Match[str]) -> str:
    package, docstring_only = match.group(1), match.group(2) is not None
    members = "\n      members: false" if docstring_only else ""
    blocks = []
    for name in _modules(package):
        blocks.append(
            f"## `{package}.{name}`\n\n::: {package}.{name}\n"
            f"    options:\n      show_root_heading: false\n      heading_level: 3{members}\n"
        )
    return "\n".join(blocks)


def _readme(match: re.Match[str]) -> str:
    title = match.group(1).strip()
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(
        rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL
    )
    if section is None:
        raise ValueError(f"README.md has no section '## {title}' (docs hook readme-section)")
    body = section.group(1).strip()
    # links relative to the repository root do not exist in the site: keep their text
    body = re.sub(r"!\[[^\]]*\]\((?!https?://)[^)]+\)", "", body)  # images of the repo root
    return re.sub(r"\[([^\]]+)\]\((?!https?://|#)[^)]+\)", r"\1", body)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    markdown = API.sub(_api, markdown)
    return README.sub(_readme, markdown)
