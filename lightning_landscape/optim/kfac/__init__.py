"""K-FAC (Martens & Grosse 2015; KFC for convolutions): a preconditioner for any optimizer.

:class:`KFACPreconditioner` is pure torch (``loss.backward(); pre.step(); optimizer.step()``);
the Lightning plugin is :class:`lightning_landscape.callbacks.kfac.KFAC`. Modules:
:mod:`.factors` (per-layer algebra), :mod:`.layer` (per-layer state), :mod:`.hooks`
(statistics capture), :mod:`.distributed` (collectives), :mod:`.hyper` (argument checks),
:mod:`.fisher` (sampled Fisher), :mod:`.checkpoint`, :mod:`.preconditioner`.
"""

from __future__ import annotations

from .preconditioner import KFACPreconditioner, StepInfo, unwrap

__all__ = ["KFACPreconditioner", "StepInfo", "unwrap"]
