"""A griffe extension for the docs build: read the package's Sphinx-flavoured docstrings.

The docstrings are Google style with a few reStructuredText habits. Before mkdocstrings renders
them as Markdown, this rewrites

- roles (``:class:`~a.b.C```, ``:func:`f```, ``:mod:`.x```, ...) into *optional* autorefs: a
  link where the target is documented, plain code (and no strict-mode warning) where not;
- ``.. math:: ...`` into a display equation for arithmatex;
- ``.. code-block:: lang`` lines (the indented block below already is a code block) and the
  literal-block marker ``::`` ending a paragraph (``Usage::`` -> ``Usage:``).

Used only by ``mkdocs build`` (``mkdocs.yml``: the python handler's ``extensions``).
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(class|func|meth|mod|attr|data|exc|obj|const):`(~?)([^`<>]+?)`")
MATH = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<body>.*)$", re.MULTILINE)
CODE_BLOCK = re.compile(r"^[ \t]*\.\. code-block::.*\n", re.MULTILINE)
LITERAL = re.compile(r"(\S)::[ \t]*$", re.MULTILINE)


def _owner_paths(obj: griffe.Object) -> tuple[str, str]:
    """(the module a bare name is looked up in, the class a bare method/attribute is in)."""
    module = obj if obj.is_module else obj.module
    cls = (
        obj
        if obj.is_class
        else (obj.parent if obj.parent is not None and obj.parent.is_class else None)
    )
    return module.path, (cls.path if cls is not None else module.path)


def _resolve(target: str, role: str, obj: griffe.Object) -> str:
    module_path, class_path = _owner_paths(obj)
    package = (
        module_path
        if (obj.module.is_package if not obj.is_module else obj.is_package)
        else module_path.rpartition(".")[0]
    )
    if target.startswith("."):
        return f"{package}{target}"
    if "." not in target:
        if role in ("meth", "attr"):
            return f"{class_path}.{target}"
        return f"{module_path}.{target}"
    if target.split(".", 1)[0] in {"lightning_landscape"}:
        return target
    # ``Class.method`` written relative to the module, or another library's path
    first = target.split(".", 1)[0]
    if first and first[0].isupper():
        return f"{module_path}.{target}"
    return target


def rewrite(text: str, obj: griffe.Object) -> str:
    def role(match: re.Match[str]) -> str:
        kind, short, target = match.group(1), match.group(2), match.group(3).strip()
        identifier = _resolve(target, kind, obj)
        shown = target.lstrip(".")
        if short:
            shown = shown.rsplit(".", 1)[-1]
        if kind in ("func", "meth"):
            shown += "()"
        return (
            f'<autoref identifier="{html.escape(identifier)}" optional>'
            f"<code>{html.escape(shown)}</code></autoref>"
        )

    text = ROLE.sub(role, text)
    text = MATH.sub(lambda m: f"{m['indent']}$$\n{m['indent']}{m['body']}\n{m['indent']}$$", text)
    text = CODE_BLOCK.sub("", text)
    return LITERAL.sub(r"\1:", text)


class SphinxRoles(griffe.Extension):
    """Rewrite every docstring of the loaded package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        self._walk(pkg, set())

    def _walk(self, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value, obj)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, seen)  # type: ignore[arg-type]
