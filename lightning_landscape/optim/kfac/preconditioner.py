r"""``KFACPreconditioner``: K-FAC for any optimizer (the shell; the work is in ``.updates``)."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_landscape.checks import check_choice, check_int, check_regex, check_that

from . import checkpoint
from .factors import DampingMode
from .fisher import sample_fisher
from .hooks import register
from .hyper import Hyper
from .layer import select_layers, unwrap
from .profile import attach, detach
from .sharing import tied_message
from .updates import gradients_finite, inverse_sqrt, precondition, update_factors, update_inverses

__all__ = ["KFACPreconditioner", "StepInfo", "unwrap"]


@dataclass
class StepInfo:
    """What the last :meth:`KFACPreconditioner.step` did (read by the Lightning callback)."""

    step: int = -1
    skipped: bool = False  # non-finite gradients (an AMP step the GradScaler skips)
    factors_updated: bool = False
    inverses_updated: bool = False
    preconditioned: bool = False
    kl_scale: float = 1.0
    damping: float = math.nan
    factor_seconds: float = 0.0
    inverse_seconds: float = 0.0


class KFACPreconditioner:
    r"""Kronecker-factored preconditioning of the gradients of ``nn.Linear``/``nn.Conv2d`` layers.

    Use it between ``backward`` and the optimizer step, with any optimizer::

        loss.backward()
        pre.step()          # p.grad ← ν · (G ⊗ A + λI)⁻¹ p.grad for every registered layer
        optimizer.step()

    Per registered layer (docs/theory/kfac.md §Kronecker factors): ``A`` from the layer inputs, ``G`` from the
    per-example output gradients (KFAC-expand for convolutions; the bias is the last column).
    ``G`` is the *empirical* Fisher factor of the backward pass that already happens, made
    per-example: with ``loss_reduction="mean"`` the recorded output gradients are multiplied by
    the number of examples seen since the last step on this rank, so factors (and the meaning
    of ``damping``) do not depend on the batch size or on mean vs sum.

    - Every ``factor_update_every`` steps the statistics of all micro-batches since the last
      step (gradient accumulation) are summed, all-reduced with their example counts in one
      collective and normalised, so the factors equal one process on the union batch. Running
      averages ``F ← ξF + (1−ξ)F_batch`` start from the first batch.
    - Every ``inverse_update_every`` steps both factors are eigendecomposed (in the factor
      dtype: float32, float64 for float64 models), optionally distributed over the ranks.
    - Every step: ``Δ = Q_G[(Q_Gᵀ ∇W Q_A) ⊘ (d_G d_Aᵀ + λ)]Q_Aᵀ`` (``damping_mode="exact"``)
      or the factored π-damped inverse (``"pi"``), then KL clipping
      ``ν = min(1, √(κ / (η² Σ_layers ⟨Δ, ∇W⟩)))`` with ``η`` read from
      ``optimizer.param_groups[0]["lr"]`` at each step (or ``lr``).
    - A step with non-finite gradients (an AMP step the ``GradScaler`` will skip) changes
      nothing: its statistics are dropped and the step counter does not advance (checked on
      factor-update steps, and on every step with ``grad_scaler``). With ``grad_scaler`` the
      output gradients are divided by its scale; call :meth:`step` after
      ``scaler.unscale_(optimizer)``.

    Only forwards in training mode with gradients enabled, outside :meth:`paused`, on a
    factor-update step, are recorded (validation and measurements are not). Registered modules
    whose hooks never fired by the first factor update (e.g. ``MultiheadAttention.out_proj``,
    which is called functionally) are skipped with one warning naming them; grouped
    convolutions and frozen layers are skipped at construction. Under DDP, call :meth:`step`
    on every rank after the gradients are synchronised. A module called several times per
    forward is one layer whose calls are positions of the same examples (KFAC-expand over the
    calls, as if called once on the stacked inputs). Layers holding a parameter another module
    also holds (tied weights) are skipped with one warning naming it (:mod:`.sharing`).

    Args:
        model: The model (a ``DistributedDataParallel`` wrapper is unwrapped); layer names are
            relative to the unwrapped module.
        damping: ``λ > 0``; a number or a callable of the step.
        factor_decay: ``ξ`` in ``[0, 1)``; a number or a callable of the step.
        factor_update_every: ``T_cov``: record statistics and update factors every T steps.
        inverse_update_every: ``T_inv``: recompute the eigendecompositions every T steps.
        kl_clip: ``κ > 0`` (number or callable of the step), or ``None`` (no clipping).
        optimizer: The optimizer whose group-0 lr is ``η``; K-FAC also attaches its
            profile to it (:mod:`lightning_landscape.optim.kfac.profile`).
        lr: ``η`` (number or callable of the step) instead of reading the optimizer.
        loss_reduction: ``"mean"`` (the step's gradient is the mean over the examples
            recorded since the last step) or ``"sum"``.
        layers: Regex; register only modules whose name it matches (``re.search``).
        skip: Regex; never register modules whose name it matches.
        damping_mode: ``"exact"`` or ``"pi"``.
        grad_scaler: A ``torch.amp.GradScaler`` whose scale multiplied the loss.
        distribute_inverses: Spread the eigendecompositions over the ranks (by cost) and share
            the results in one all-reduce.
        process_group: Process group for the collectives (default: the world).
        factor_dtype: dtype of factors and eigenbases (default float32, float64 for float64
            models).
        compute_dtype: dtype of the per-step eigenbasis products (default ``factor_dtype``;
            ``torch.bfloat16`` is 2-3× faster on CPUs/GPUs with bf16 matrix units, ~3 digits).

    For the true (sampled) Fisher instead of the empirical one, call :meth:`sample_fisher`
    on the outputs of each training forward, before its backward.

    Raises:
        ValueError: For a bad argument; the message names it and its value.

    Example::

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(inplace=True),
        ...                           torch.nn.Linear(8, 2))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        >>> pre = KFACPreconditioner(net, optimizer=opt, factor_update_every=1)
        >>> torch.nn.functional.cross_entropy(net(torch.randn(16, 4)),
        ...                                   torch.randint(0, 2, (16,))).backward()
        >>> pre.step(); opt.step()
        >>> sorted(pre.factors()), tuple(pre.factors()["0"][0].shape)
        (['0', '2'], (5, 5))
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: float | Callable[[int], float] = 1e-3,
        factor_decay: float | Callable[[int], float] = 0.95,
        factor_update_every: int = 10,
        inverse_update_every: int = 100,
        kl_clip: float | Callable[[int], float] | None = 1e-3,
        optimizer: torch.optim.Optimizer | None = None,
        lr: float | Callable[[int], float] | None = None,
        loss_reduction: str = "mean",
        layers: str | None = None,
        skip: str | None = None,
        damping_mode: str = "exact",
        grad_scaler: Any = None,
        distribute_inverses: bool = False,
        process_group: Any = None,
        factor_dtype: torch.dtype | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        check_that("model", model, isinstance(model, nn.Module), "a torch.nn.Module")
        self.damping = Hyper("damping", damping, low=0.0)
        self.factor_decay = Hyper("factor_decay", factor_decay, low=0.0, high=1.0, closed_low=True)
        self.factor_update_every = check_int("factor_update_every", factor_update_every)
        self.inverse_update_every = check_int("inverse_update_every", inverse_update_every)
        self.kl_clip = None if kl_clip is None else Hyper("kl_clip", kl_clip, low=0.0)
        self.lr = None if lr is None else Hyper("lr", lr, low=0.0)
        is_opt = isinstance(optimizer, (torch.optim.Optimizer, type(None)))
        check_that("optimizer", optimizer, is_opt, "a torch.optim.Optimizer or None")
        if self.kl_clip is not None and optimizer is None and lr is None:
            raise ValueError(
                f"`kl_clip`={kl_clip!r} needs the learning rate: pass `optimizer=` or `lr=` "
                "(or `kl_clip=None` to disable KL clipping)"
            )
        self.loss_reduction = check_choice("loss_reduction", loss_reduction, ("mean", "sum"))
        mode = check_choice("damping_mode", damping_mode, ("exact", "pi"))
        self.damping_mode: DampingMode = "pi" if mode == "pi" else "exact"
        is_scaler = grad_scaler is None or callable(getattr(grad_scaler, "get_scale", None))
        check_that("grad_scaler", grad_scaler, is_scaler, "a torch.amp.GradScaler or None")
        is_bool = isinstance(distribute_inverses, bool)
        check_that("distribute_inverses", distribute_inverses, is_bool, "a bool")
        is_dtype = factor_dtype in (None, torch.float32, torch.float64)
        check_that("factor_dtype", factor_dtype, is_dtype, "torch.float32, torch.float64 or None")
        is_cdtype = compute_dtype in (None, torch.float32, torch.float64, torch.bfloat16,
                                      torch.float16)  # fmt: skip
        check_that("compute_dtype", compute_dtype, is_cdtype, "a floating torch.dtype or None")
        include, exclude = check_regex("layers", layers), check_regex("skip", skip)
        self.model = unwrap(model)
        self.optimizer = optimizer
        self.grad_scaler = grad_scaler
        self.distribute_inverses = distribute_inverses
        self.process_group = process_group
        self.layers, self.skipped, tied = select_layers(
            self.model, include, exclude, factor_dtype, compute_dtype
        )
        if self.skipped:
            listed = "; ".join(f"{n!r}: {r}" for n, r in self.skipped.items())
            warnings.warn(f"K-FAC: not preconditioning {listed}", UserWarning, stacklevel=2)
        if tied:
            warnings.warn(tied_message(tied), UserWarning, stacklevel=2)
            self.skipped.update({n: f"shared parameter ({r})" for n, r in tied.items()})
        if not self.layers:
            warnings.warn(
                "K-FAC: no nn.Linear/nn.Conv2d layer registered", UserWarning, stacklevel=2
            )
        self._handles = {
            name: register(layer, self._recording, self._recording_grad)
            for name, layer in self.layers.items()
        }
        self.steps = 0
        self.skipped_steps = 0
        self.kl_scale = 1.0
        self.last_damping: float | None = None
        self.info = StepInfo()
        self._pause_depth = 0
        self._sampling = self._sampled = False  # inside / after sample_fisher this window
        self._warned: set[str] = set()
        if optimizer is not None:
            attach(self, optimizer)

    # -- recording ----------------------------------------------------------------------------
    def _recording(self, module: nn.Module) -> bool:
        return (
            self._pause_depth == 0
            and module.training
            and torch.is_grad_enabled()
            and not torch.is_inference_mode_enabled()
            and self.steps % self.factor_update_every == 0
        )

    def _recording_grad(self) -> bool:  # after sample_fisher only sampled gradients count
        return self._pause_depth == 0 and (self._sampling or not self._sampled)

    def sample_fisher(
        self,
        outputs: torch.Tensor,
        likelihood: str = "gaussian",
        *,
        variance: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> bool:
        """Make ``G`` of this forward the true Fisher: one sampled backward (:mod:`.fisher`).

        Call it on the model outputs of a training forward before its backward (every
        micro-batch); it does nothing (returns ``False``) unless the forward was recorded (a
        factor-update step, not paused). Then ``G`` comes from sampled targets ``ŷ ~ p(·|f)``
        and the training backward only produces the gradients.
        """
        return sample_fisher(self, outputs, likelihood, variance, generator)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing run inside this context reaches the statistics (re-entrant)."""
        self._pause_depth += 1
        try:
            yield
        finally:
            self._pause_depth -= 1

    def _clear(self) -> None:
        self._sampled = False
        for layer in self.layers.values():
            layer.clear()

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, UserWarning, stacklevel=3)

    # -- the step -------------------------------------------------------------------------------
    def step(self) -> None:
        """Update factors / eigenbases when due, then precondition the registered gradients."""
        k = self.steps
        info = StepInfo(step=k)
        self.info = info
        factor_step = k % self.factor_update_every == 0
        if (factor_step or self.grad_scaler is not None) and not gradients_finite(self.model):
            self._clear()
            self.skipped_steps += 1
            info.skipped = True
            return
        if factor_step:
            start = time.perf_counter()
            info.factors_updated = self._update_factors(k)
            info.factor_seconds = self._elapsed(start)
        self._clear()
        stale = any(layer.A is not None and not layer.ready for layer in self.layers.values())
        if k % self.inverse_update_every == 0 or stale:
            start = time.perf_counter()
            info.inverses_updated = update_inverses(
                list(self.layers.values()),
                distribute=self.distribute_inverses,
                group=self.process_group,
            )
            info.inverse_seconds = self._elapsed(start)
        info.damping = self.damping(k)
        info.preconditioned = self._precondition(k, info.damping)
        info.kl_scale = self.kl_scale
        self.steps += 1

    def _elapsed(self, start: float) -> float:
        device = next((layer.device for layer in self.layers.values()), None)
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    def _update_factors(self, k: int) -> bool:
        silent = update_factors(
            list(self.layers.values()),
            per_example=self.loss_reduction == "mean",
            loss_scale=float(self.grad_scaler.get_scale() or 1.0) if self.grad_scaler else 1.0,
            decay=self.factor_decay(k),
            group=self.process_group,
        )
        if silent is None:
            self._warn_once(
                f"K-FAC: non-finite factor statistics at step {k} with finite gradients; "
                "this factor update was dropped"
            )
            return False
        if silent:
            self._skip(
                silent,
                "its hooks never fired in a recorded training step (called functionally, "
                "e.g. nn.MultiheadAttention.out_proj, or unused by the loss)",
            )
        return bool(self.layers)

    def _skip(self, names: list[str], reason: str) -> None:
        for name in names:
            self._handles.pop(name).remove()
            del self.layers[name]
            self.skipped[name] = reason
        listed = ", ".join(repr(n) for n in names)
        warnings.warn(
            f"K-FAC: skipping {listed}: {reason}; their gradients are left unpreconditioned",
            UserWarning,
            stacklevel=3,
        )

    def _precondition(self, k: int, damping: float) -> bool:
        kl_clip = None if self.kl_clip is None else self.kl_clip(k)
        if kl_clip is None:
            lr = 0.0
        elif self.lr is not None:
            lr = self.lr(k)
        else:
            assert self.optimizer is not None
            lr = float(self.optimizer.param_groups[0]["lr"])
        nu = precondition(
            list(self.layers.values()), damping, self.damping_mode, kl_clip=kl_clip, lr=lr
        )
        if nu is None:
            return False
        self.kl_scale, self.last_damping = nu, damping
        return True

    # -- inspection ---------------------------------------------------------------------------
    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module name: (A, G)}``: copies of the running factors (layers with factors)."""
        return {
            name: (layer.A.clone(), layer.G.clone())
            for name, layer in self.layers.items()
            if layer.A is not None and layer.G is not None
        }

    @property
    def ready(self) -> bool:
        """Whether some layer has been preconditioned (a step has used its eigenbasis)."""
        return self.last_damping is not None

    def inverse_sqrt(
        self, params: list[torch.Tensor], vectors: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """``P^{-1/2}`` applied to ``vectors`` (aligned with ``params``), ``P`` as last used.

        ``P`` is the damped ``G ⊗ A`` of each registered layer with the last step's eigenbasis
        and damping; the identity on other parameters (and everywhere before the first step).
        """
        if self.last_damping is None:
            return list(vectors)
        layers = list(self.layers.values())
        return inverse_sqrt(layers, params, vectors, self.last_damping, self.damping_mode)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step counter, KL scale, skipped layers, factors and eigenbases (copies)."""
        return checkpoint.state_of(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (layers skipped in the saved run are skipped here too).

        Raises:
            ValueError: If a registered layer has no saved state (a different model).
        """
        checkpoint.load_into(self, state)

    def remove(self) -> None:
        """Remove the hooks and the stability rule attached to the optimizer."""
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        if self.optimizer is not None:
            detach(self, self.optimizer)
