"""Parameters held by several modules (weight tying): K-FAC must not precondition them.

A layer's Kronecker factors describe the gradient that flows through *that* module. A parameter
that another module also holds — an LM head tied to the token embedding
(``lm_head.weight = embed.weight``), two ``nn.Linear`` sharing one weight ``Parameter`` —
receives the sum of the gradients of every holder, which one module's factors do not describe.
Such layers are skipped (their gradients go to the optimizer as they are). The same module
object registered under several names is *one* holder: all its calls pass through its hooks
(a module called several times per forward is KFAC-expand over its calls, see
:meth:`~lightning_landscape.optim.kfac.layer.KFACLayer.add_output`).

Only sharing visible in the module tree is found: a parameter also used functionally in a
``forward`` (``F.linear(h, self.embed.weight)``) is not.

Example::

    >>> from torch import nn
    >>> emb, head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
    >>> head.weight = emb.weight
    >>> shared = holders(nn.ModuleDict({"embed": emb, "lm_head": head}))
    >>> [names for names in shared.values()]
    [['embed.weight', 'lm_head.weight']]
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["describe", "holders", "tied_message"]


def holders(model: nn.Module) -> dict[int, list[str]]:
    """``{id(parameter): qualified names}`` for parameters held by more than one module.

    A module registered under several names counts once (under its first name).
    """
    names: dict[int, list[str]] = {}
    modules: dict[int, set[int]] = {}
    seen: set[int] = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen:
            continue
        seen.add(id(module))
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
            names.setdefault(id(p), []).append(f"{prefix}.{pname}" if prefix else pname)
            modules.setdefault(id(p), set()).add(id(module))
    return {key: names[key] for key, owners in modules.items() if len(owners) > 1}


def _owner(qualified: str) -> str:
    return qualified.rsplit(".", 1)[0] if "." in qualified else ""


def describe(name: str, params: list[torch.Tensor], shared: dict[int, list[str]]) -> str | None:
    """Why the layer ``name`` with ``params`` is skipped for sharing, or ``None`` if it is not."""
    parts = []
    for p in params:
        held = shared.get(id(p))
        if held is None:
            continue
        own = next((n for n in held if _owner(n) == name), held[0])
        others = ", ".join(repr(n) for n in held if n != own)
        parts.append(f"{own!r} is also {others}")
    return "; ".join(parts) if parts else None


def tied_message(tied: dict[str, str]) -> str:
    """The one warning for the layers skipped for sharing (``{layer: describe(...)}``)."""
    listed = "; ".join(f"{n!r} ({r})" for n, r in tied.items())
    return (
        "K-FAC: not preconditioning layers holding a parameter that another module also holds "
        f"(tied weights: one module's factors do not describe the summed gradient): {listed}; "
        "their gradients go to the optimizer as they are"
    )
