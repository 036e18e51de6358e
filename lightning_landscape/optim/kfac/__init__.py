"""K-FAC (Martens & Grosse 2015; KFC for convolutions): a preconditioner for any optimizer.

:class:`KFACPreconditioner` is pure torch (``loss.backward(); pre.step(); optimizer.step()``);
the Lightning plugin is :class:`lightning_landscape.callbacks.kfac.KFAC`. Modules:
:mod:`.factors` (per-layer algebra), :mod:`.layer` (per-layer state), :mod:`.hooks`
(statistics capture), :mod:`.distributed` (collectives), :mod:`.hyper` (argument checks),
:mod:`.fisher` (sampled Fisher), :mod:`.checkpoint`, :mod:`.preconditioner`, :mod:`.profile`
(the optimizer profile K-FAC attaches to the optimizer it preconditions).
"""

from __future__ import annotations

from .preconditioner import KFACPreconditioner, StepInfo, unwrap
from .profile import KFACProfile, kfac_profile

__all__ = ["KFACPreconditioner", "KFACProfile", "StepInfo", "kfac_profile", "unwrap"]
