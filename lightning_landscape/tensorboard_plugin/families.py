"""Which callback logged which tags: ``landscape/<name>/<quantity>`` → instance, family.

The quantities of each family are those declared in :mod:`lightning_landscape.metrics`.

An instance may be named anything (``name=`` of a callback, inner ``/`` allowed), so the family
is recognised from the quantities, not the name: a *signature* quantity names the family
(``lambda_max`` → ``sharpness``, ``eig_3`` → ``hessian``, ...), and every other tag under the
same instance prefix joins it if that family logs such a quantity. Per-layer Hessian tags
(``<name>/<module>/eig_1``) and sample-variance layers (``<name>/<module>``) are quantities of
their instance, not instances of their own.

Example::

    >>> families(["landscape/sharpness/lambda_max", "landscape/sharpness/threshold",
    ...           "landscape/heldout/ratio", "landscape/hessian/eig_1",
    ...           "landscape/hessian/net.0/eig_1", "landscape/hessian/density_data/text_summary",
    ...           "landscape/sample_variance/net.0", "landscape/sample_variance/last_over_first",
    ...           "train_loss"])  # doctest: +NORMALIZE_WHITESPACE
    {'heldout': ('sharpness', ('ratio',)),
     'hessian': ('hessian', ('density_data', 'eig_1', 'net.0/eig_1')),
     'sample_variance': ('sample_variance', ('last_over_first', 'net.0')),
     'sharpness': ('sharpness', ('lambda_max', 'threshold'))}
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from lightning_landscape.metrics import FAMILIES as DECLARED
from lightning_landscape.metrics import Metric, metric
from lightning_landscape.metrics import pattern as quantity_pattern

__all__ = ["FAMILIES", "PREFIX", "TEXT_SUFFIX", "families", "layers"]

#: Every tag of the suite starts with this.
PREFIX = "landscape/"
#: ``SummaryWriter.add_text(tag, ...)`` stores the text under ``tag + TEXT_SUFFIX``.
TEXT_SUFFIX = "/text_summary"


def _union(decls: Iterable[Metric]) -> str:
    return "|".join(f"(?:{quantity_pattern(m)})" for m in decls)


#: family → (signature quantities, every quantity it logs) as regexes for ``re.fullmatch``,
#: generated from the declarations of :mod:`lightning_landscape.metrics`.
FAMILIES: dict[str, tuple[str, str]] = {
    family: (_union(m for m in decls if m.signature), _union(decls))
    for family, decls in DECLARED.items()
}
_LAYER = re.compile(quantity_pattern(metric("sample_variance", "<module>")))
_SIGNATURE = {f: re.compile(sig) for f, (sig, _) in FAMILIES.items()}
_QUANTITY = {f: re.compile(q) for f, (_, q) in FAMILIES.items()}


def _rest(tag: str) -> str | None:
    """``tag`` without ``landscape/`` (and a text summary's suffix), else ``None``."""
    if not tag.startswith(PREFIX):
        return None
    rest = tag[len(PREFIX) :]
    if rest.endswith(TEXT_SUFFIX):
        rest = rest[: -len(TEXT_SUFFIX)]
    return rest or None


def _signature(rest: str) -> tuple[str, str] | None:
    """``(instance, family)`` if the last segment of ``rest`` is a signature quantity."""
    instance, _, quantity = rest.rpartition("/")
    if not instance:
        return None
    for family, pattern in _SIGNATURE.items():
        if pattern.fullmatch(quantity):
            return instance, family
    return None


def _explained(rest: str, kept: dict[str, str]) -> tuple[str, str] | None:
    """The longest kept instance that ``rest`` is a quantity of: ``(instance, quantity)``."""
    for instance in sorted(kept, key=len, reverse=True):
        if rest.startswith(instance + "/"):
            quantity = rest[len(instance) + 1 :]
            if _QUANTITY[kept[instance]].fullmatch(quantity):
                return instance, quantity
    return None


def families(tags: Iterable[str]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Map tags to ``{instance name: (family, sorted quantities)}`` (sorted by instance).

    ``tags`` may mix scalar tags and text tags (``.../density_data/text_summary`` counts as
    the quantity ``density_data``). Tags outside ``landscape/`` and tags no recognised
    instance explains are ignored.
    """
    rests = sorted({r for r in map(_rest, tags) if r is not None})
    candidates: dict[str, str] = {}
    for rest in rests:
        found = _signature(rest)
        if found is not None:
            candidates.setdefault(*found)
    kept: dict[str, str] = {}
    # Shortest first: `hessian/net.0` (from `hessian/net.0/eig_1`) is dropped when `hessian`
    # is a Hessian instance and explains that tag as a per-layer quantity.
    for instance in sorted(candidates, key=lambda name: (name.count("/"), name)):
        own = [r for r in rests if r.rpartition("/")[0] == instance and _signature(r)]
        if all(_explained(r, kept) for r in own):
            continue
        kept[instance] = candidates[instance]
    quantities: dict[str, set[str]] = {name: set() for name in kept}
    for rest in rests:
        found = _explained(rest, kept)
        if found is not None:
            quantities[found[0]].add(found[1])
    return {name: (kept[name], tuple(sorted(quantities[name]))) for name in sorted(kept)}


def _natural(text: str) -> list[tuple[int, int | str]]:
    return [(1, int(p)) if p.isdigit() else (0, p) for p in re.split(r"(\d+)", text) if p]


def layers(quantities: Iterable[str]) -> list[str]:
    """The layer quantities of a sample-variance instance, in natural (depth) order.

    Example::

        >>> layers(["net.10", "net.2", "last_over_first", "skipped", "net.1"])
        ['net.1', 'net.2', 'net.10']
    """
    return sorted((q for q in quantities if _LAYER.fullmatch(q)), key=_natural)
