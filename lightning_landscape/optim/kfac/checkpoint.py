"""Checkpoints of a :class:`~lightning_landscape.optim.kfac.KFACPreconditioner`.

The state is the step counters, the KL scale, the last damping, the skipped layers and every
layer's factors and eigenbases (copies); loading skips the layers the saved run skipped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .preconditioner import KFACPreconditioner

__all__ = ["load_into", "state_of"]


def state_of(pre: KFACPreconditioner) -> dict[str, Any]:
    """``pre.state_dict()``."""
    return {
        "steps": pre.steps,
        "skipped_steps": pre.skipped_steps,
        "kl_scale": pre.kl_scale,
        "last_damping": pre.last_damping,
        "skipped": dict(pre.skipped),
        "layers": {name: layer.state_dict() for name, layer in pre.layers.items()},
    }


def load_into(pre: KFACPreconditioner, state: dict[str, Any]) -> None:
    """``pre.load_state_dict(state)``; ``ValueError`` if a registered layer has no state."""
    newly = [n for n in state.get("skipped", {}) if n in pre.layers]
    if newly:
        pre._skip(newly, state["skipped"][newly[0]])
    saved = state.get("layers", {})
    missing = sorted(set(pre.layers) - set(saved))
    if missing:
        raise ValueError(f"`state` has no K-FAC state for the layers {missing}")
    for name, layer in pre.layers.items():
        layer.load_state_dict(saved[name])
    pre.steps = int(state["steps"])
    pre.skipped_steps = int(state.get("skipped_steps", 0))
    pre.kl_scale = float(state.get("kl_scale", 1.0))
    damping = state.get("last_damping")
    pre.last_damping = None if damping is None else float(damping)
    pre.skipped.update(state.get("skipped", {}))
