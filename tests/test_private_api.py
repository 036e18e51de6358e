"""The package uses only public APIs of its dependencies (an AST scan of ``lightning_landscape/``).

A private name of a dependency breaks silently on an upgrade, so none may be used:

- imported: ``from torch.nn.modules.batchnorm import _BatchNorm``, ``import torch._dynamo``,
  ``from torch._C import x``;
- accessed through a chain rooted at an imported module or name: ``nn.modules.batchnorm._BatchNorm``,
  ``torch._dynamo.config``, ``LightningCLI._add_configure_optimizers_method_to_model``;
- accessed on any object, ``obj._name`` or ``getattr(obj, "_name")``, where ``_name`` is not
  defined anywhere in the package (a ``def``/``class``, a module, a variable, or an attribute
  set on ``self``/``cls``): ``trainer._accelerator_connector``, ``opt._optimizer``;
- named as a dotted string: ``"torch._dynamo" in sys.modules``;
- overridden: a class of ours that defines (or sets on ``self``) a private member of a
  dependency's base class, e.g. ``LightningCLI._add_configure_optimizers_method_to_model``.

Dunder names (``__name__``) are public protocol. :data:`ALLOWED` lists what has no public
equivalent, each with the reason.
"""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

import lightning_landscape

PACKAGE = Path(lightning_landscape.__file__).resolve().parent
OURS = "lightning_landscape"

#: Private names allowed, as regular expressions on the dotted name (``torch._foreach_add_``) or
#: on the attribute (``._replace``), each with why no public equivalent exists.
ALLOWED: dict[str, str] = {
    # torch's multi-tensor ("foreach") kernels: no public equivalent exists; torch.optim's own
    # foreach implementations call them (optim/ uses them for the same `foreach=True` paths).
    r"torch\._foreach_\w+": "torch's multi-tensor kernels (used by torch.optim itself)",
    # a named tuple's API is underscored so as not to clash with field names, and public:
    # https://docs.python.org/3/library/collections.html#collections.namedtuple
    r"\._(fields|field_defaults|asdict|replace|make)": "the documented named-tuple API",
}


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    name: str
    why: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.name} ({self.why})"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _allowed(name: str, allowed: Iterable[str] = ALLOWED) -> bool:
    return any(re.fullmatch(pattern, name) for pattern in allowed)


_ATTRIBUTE_CALLS = {"getattr", "hasattr", "delattr", "setattr"}


def _string_attribute(node: ast.Call) -> str | None:
    """``"_x"`` of ``getattr(obj, "_x", ...)`` and its kin, else ``None``."""
    func = node.func
    if isinstance(func, ast.Name) and func.id in _ATTRIBUTE_CALLS and len(node.args) >= 2:
        arg = node.args[1]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg.value
    return None


def _on_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id in ("self", "cls")


def defined_names(trees: Iterable[tuple[str, ast.AST]]) -> set[str]:
    """Every name the package defines: modules, ``def``/``class``, variables, import aliases,
    arguments and attributes set on ``self``/``cls`` (or ``setattr(self, "_x", ...)``)."""
    own: set[str] = set()
    for path, tree in trees:
        own.update(Path(path).with_suffix("").parts)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.arg):
                own.add(node.arg)
            elif isinstance(node, ast.alias):
                own.add(node.asname or node.name.split(".")[0])
            elif isinstance(node, ast.Attribute) and not isinstance(node.ctx, ast.Load):
                if _on_self(node.value):
                    own.add(node.attr)
            elif isinstance(node, ast.Call) and (name := _string_attribute(node)):
                setter = isinstance(node.func, ast.Name) and node.func.id == "setattr"
                if setter and _on_self(node.args[0]):
                    own.add(name)
    return own


def _imported(tree: ast.AST) -> dict[str, str]:
    """Names bound by imports of other packages (any scope) → the dotted path they stand for."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != OURS:
                    local = alias.asname or alias.name.split(".")[0]
                    bound[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names if node.module.split(".")[0] != OURS else ():
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return bound


def _chain(node: ast.Attribute) -> tuple[str | None, list[str]]:
    """``(root name, [attr, ...])`` of ``a.b.c`` (root ``None`` if it is not a plain name)."""
    parts: list[str] = []
    current: ast.expr = node
    while isinstance(current, ast.Attribute):
        parts.append(current.attr)
        current = current.value
    return (current.id if isinstance(current, ast.Name) else None), parts[::-1]


_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def scan(source: str, path: str, own: set[str], allowed: Iterable[str] = ALLOWED) -> list[Finding]:
    """The private uses of other packages' names in one module's ``source``."""
    tree = ast.parse(source, filename=path)
    bound = _imported(tree)
    roots = {path_.split(".")[0] for path_ in bound.values()}
    found: list[Finding] = []

    def report(node: ast.AST, name: str, why: str) -> None:
        if not _allowed(name, allowed):
            found.append(Finding(path, getattr(node, "lineno", 0), name, why))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] != OURS and any(map(_private, parts)):
                    report(node, alias.name, "private module imported")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] == OURS:
                continue
            if any(map(_private, parts)):
                report(node, node.module, "private module imported")
            for alias in node.names:
                if _private(alias.name):
                    report(node, f"{node.module}.{alias.name}", "private name imported")
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            root, attrs = _chain(node)
            if root in bound:
                dotted = ".".join([bound[root], *attrs[: attrs.index(node.attr) + 1]])
                report(node, dotted, "private name of a dependency accessed")
            elif node.attr not in own and not (root in ("self", "cls") and len(attrs) == 1):
                report(node, f".{node.attr}", "private attribute the package does not define")
            elif node.attr not in own:
                report(node, f"self.{node.attr}", "inherited private attribute accessed")
        elif isinstance(node, ast.Call) and (name := _string_attribute(node)):
            if _private(name) and name not in own:
                report(node, f".{name}", "private attribute the package does not define")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            parts = node.value.split(".")
            dotted = _DOTTED.fullmatch(node.value) and parts[0] in roots | {"torch"}
            if dotted and any(map(_private, parts)):
                report(node, node.value, "private module named in a string")
    return found


def _package_sources() -> list[tuple[str, str]]:
    return [
        (str(p.relative_to(PACKAGE.parent)), p.read_text(encoding="utf-8"))
        for p in sorted(PACKAGE.rglob("*.py"))
    ]


def _scan_package(allowed: Iterable[str] = ALLOWED) -> list[Finding]:
    sources = _package_sources()
    own = defined_names((path, ast.parse(text)) for path, text in sources)
    return [f for path, text in sources for f in scan(text, path, own, tuple(allowed))]


def test_the_package_uses_no_private_name_of_a_dependency() -> None:
    findings = _scan_package()
    assert not findings, "private APIs of dependencies used:\n" + "\n".join(map(str, findings))


def private_overrides(tree: ast.AST, namespace: dict[str, object]) -> list[str]:
    """``Class._name`` for each private member that a class of ``tree`` (found by name in
    ``namespace``) defines in its body or sets on ``self`` while a base class from another
    package defines it too (overriding or clobbering a dependency's private member)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef) or not isinstance(namespace.get(node.name), type):
            continue
        cls: type = namespace[node.name]  # type: ignore[assignment]
        names = set()
        for item in ast.walk(node):
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item in node.body:
                names.add(item.name)
            elif isinstance(item, ast.Name) and isinstance(item.ctx, ast.Store):
                names.add(item.id)  # class-body assignments (and locals, harmless)
            elif isinstance(item, ast.Attribute) and isinstance(item.ctx, ast.Store):
                names.update([item.attr] if _on_self(item.value) else [])
        foreign = [b for b in cls.__mro__[1:] if b.__module__.split(".")[0] != OURS]
        for name in sorted(filter(_private, names)):
            owners = [b for b in foreign if name in vars(b) and b is not object]
            if owners and not _allowed(f"{owners[0].__module__}.{owners[0].__qualname__}.{name}"):
                found.append(f"{node.name}.{name} (defined by {owners[0].__qualname__})")
    return found


def test_no_class_overrides_a_private_member_of_a_dependency() -> None:
    findings = []
    for path, text in _package_sources():
        module = ".".join(Path(path).with_suffix("").parts).removesuffix(".__init__")
        namespace = vars(importlib.import_module(module))
        findings += [f"{path}: {f}" for f in private_overrides(ast.parse(text), namespace)]
    assert not findings, "private members of dependencies overridden:\n" + "\n".join(findings)


def test_every_allowed_entry_is_still_needed() -> None:
    # an allow-list entry that matches nothing any more is deleted, not kept "just in case"
    names = [f.name for f in _scan_package(allowed=())]
    assert [p for p in ALLOWED if not any(_allowed(n, [p]) for n in names)] == []


# -- the scanner itself, on planted snippets ----------------------------------------------------
def _findings(snippet: str, own: Iterable[str] = ()) -> list[str]:
    tree = ast.parse(snippet)
    defined = defined_names([("snippet.py", tree)]) | set(own)
    return [f.name for f in scan(snippet, "snippet.py", defined)]


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        (
            "from torch.nn.modules.batchnorm import _BatchNorm",
            ["torch.nn.modules.batchnorm._BatchNorm"],
        ),
        ("import torch._dynamo", ["torch._dynamo"]),
        ("from torch._C import Generator", ["torch._C"]),
        (
            "from lightning.pytorch.cli import _global_add_class_path as f",
            ["lightning.pytorch.cli._global_add_class_path"],
        ),
        (
            "from torch import nn\nx = nn.modules.batchnorm._BatchNorm",
            ["torch.nn.modules.batchnorm._BatchNorm"],
        ),
        ("import torch\nif torch._dynamo.is_compiling(): pass", ["torch._dynamo"]),
        ("import torch.nn as tnn\ntnn.modules._x.y", ["torch.nn.modules._x"]),
        (
            "from lightning.pytorch.cli import LightningCLI\n"
            "class C(LightningCLI):\n"
            "    def f(self, s):\n"
            "        LightningCLI._add_configure_optimizers_method_to_model(self, s)\n",
            ["lightning.pytorch.cli.LightningCLI._add_configure_optimizers_method_to_model"],
        ),
        ("def f(opt):\n    return opt._optimizer", ["._optimizer"]),
        ("def f(t):\n    return getattr(t, '_accelerator_connector')", ["._accelerator_connector"]),
        ("class C(Base):\n    def f(self):\n        return self._params", ["self._params"]),
        ("def f(trainer):\n    trainer._results = None", ["._results"]),
        ("import sys\nok = 'torch._dynamo' in sys.modules", ["torch._dynamo"]),
    ],
)
def test_the_scanner_finds_a_planted_private_use(snippet: str, expected: list[str]) -> None:
    assert _findings(snippet) == expected


@pytest.mark.parametrize(
    "snippet",
    [
        "from __future__ import annotations\nfrom torch import nn\nnn.BatchNorm1d.__mro__",
        "from ._compat import HessianOperator\nfrom . import _base\n_base.helper()",
        "class C:\n    def __init__(self):\n        self._cache = {}\n    def f(self, other):\n"
        "        return other._cache",
        "import torch\ntorch._foreach_add_([], [])",
        "x = 'see torch._dynamo for details.'",  # prose, not a dotted name
        "def f(obj):\n    setattr(obj, '__doc__', 'x')\n    return obj.__dict__",
    ],
)
def test_the_scanner_leaves_public_and_own_names_alone(snippet: str) -> None:
    assert _findings(snippet) == []


def test_the_scanner_finds_a_planted_private_override() -> None:
    snippet = (
        "from lightning.pytorch.cli import LightningCLI\n"
        "class CLI(LightningCLI):\n"
        "    def _add_configure_optimizers_method_to_model(self, subcommand):\n"
        "        super()._add_configure_optimizers_method_to_model(subcommand)\n"
        "    def _own_helper(self):\n"
        "        self._own_state = 1\n"
        "class Fine(LightningCLI):\n"
        "    def before_instantiate_classes(self):\n"
        "        pass\n"
    )
    namespace: dict[str, object] = {}
    exec(compile(snippet, "snippet.py", "exec"), namespace)
    found = private_overrides(ast.parse(snippet), namespace)
    assert found == ["CLI._add_configure_optimizers_method_to_model (defined by LightningCLI)"]


def test_own_definitions_cover_modules_functions_and_self_attributes() -> None:
    tree = ast.parse(
        "def _helper(): pass\nclass _Base: pass\n_TABLE = {}\n"
        "class C:\n    def f(self, _arg):\n        self._own = 1\n        setattr(self, '_set', 2)\n"
        "def g(trainer):\n    trainer._foreign = 1\n"
    )
    own = defined_names([("pkg/_private_module.py", tree)])
    assert {"_helper", "_Base", "_TABLE", "_own", "_set", "_arg", "_private_module"} <= own
    assert "_foreign" not in own  # set on a dependency's object: still an access
