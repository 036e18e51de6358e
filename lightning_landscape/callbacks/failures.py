"""What happens when a measurement fails: a skip with a warning, never the end of training.

Any exception raised while measuring (a non-finite loss or product, an operation without a
double-backward formula, an out-of-memory error, a ``training_step`` that returns ``None``, a
bug) skips that measurement. :class:`FailurePolicy` keeps the bookkeeping of one callback:

- the *cause* of a failure is its exception type and message with numbers blanked out, so one
  cause gives one warning however often (and at whichever step) it recurs (the warning quotes
  the first occurrence's message as it was);
- the warning names the callback, the exception and, where one is known, the fix;
- ``skipped`` counts every skipped measurement (logged as ``landscape/<name>/skipped``);
- after ``limit`` consecutive failures with the same cause the callback stops measuring for the
  rest of the run and says so once.

Under DDP the decision is collective: each rank contributes ``(failed, out_of_memory, cause
code)`` to one max-reduction, so every rank skips, retries or stops together (a failure inside
a Hessian-vector product on one rank only reaches the others through the product's own
reduction, see :class:`~lightning_landscape.measures.operators.ProbeHessian`).
"""

from __future__ import annotations

import gc
import re
import warnings
import zlib
from dataclasses import dataclass

import lightning.pytorch as pl
import torch

from lightning_landscape.measures.probe import Probe

__all__ = [
    "Decision",
    "FailurePolicy",
    "cause_of",
    "collective_decision",
    "free_memory",
    "halved_probe",
    "hint_for",
    "is_out_of_memory",
]

_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def cause_of(error: BaseException) -> str:
    """``"Type: message"`` with every number replaced by ``N`` (step-independent)."""
    message = _NUMBER.sub("N", str(error).strip().splitlines()[0] if str(error).strip() else "")
    return f"{type(error).__name__}: {message[:300]}"


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an out-of-memory error of any device."""
    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def hint_for(error: BaseException) -> str:
    """The fix for ``error`` where one is known ('' otherwise)."""
    text = str(error)
    if is_out_of_memory(error):
        return (
            "The measurement ran out of memory even with half-size probe batches: lower "
            "`probe_batch_size` (or `probe_size`)."
        )
    if "double backward" in text or "derivative for" in text:
        return (
            "An operation of the model has no double-backward formula; define "
            "`landscape_loss(self, batch)` on the LightningModule with a differentiable path, "
            "or report the operation to lightning-landscape."
        )
    if type(error).__name__ == "NonFiniteError":
        return "The probe loss or its curvature is not finite at these parameters."
    if type(error).__name__ == "PeerFailure":
        return "See the warning of the rank where it failed."
    return ""


@dataclass(frozen=True)
class Decision:
    """The collective outcome of one measurement attempt (identical on every rank)."""

    failed: bool
    out_of_memory: bool
    cause_code: int


def local_flags(error: BaseException | None) -> list[float]:
    """This rank's ``[failed, out_of_memory, cause code]`` for the max-reduction."""
    if error is None:
        return [0.0, 0.0, 0.0]
    # a code below 2**24 is exact in float32, the dtype a device reduction may use
    code = float(zlib.crc32(cause_of(error).encode()) % (2**24 - 1) + 1)
    return [1.0, 1.0 if is_out_of_memory(error) else 0.0, code]


class FailurePolicy:
    """Skip counting, warn-once and give-up rule of one measurement callback.

    Args:
        owner: how warnings name the callback (e.g. ``"Sharpness"`` or ``"Sharpness(heldout)"``).
        skipped_tag: the tag the skip count is logged under.
        limit: consecutive failures with one cause after which measuring stops.
    """

    def __init__(self, owner: str, skipped_tag: str, limit: int = 3) -> None:
        self.owner = owner
        self.skipped_tag = skipped_tag
        self.limit = limit
        self.skipped = 0
        self.disabled = False
        self._streak: tuple[int, int] = (0, 0)  # (cause code, consecutive failures)
        self._warned: set[str] = set()

    def reset_run(self) -> None:
        """A new run: measure again, forget the streak (the skip count is kept)."""
        self.disabled = False
        self._streak = (0, 0)

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=3)

    def succeeded(self) -> None:
        self._streak = (0, 0)

    def failed(
        self, decision: Decision, error: BaseException | None, *, announce: bool = True
    ) -> None:
        """Count a skip, warn once per cause, and stop after ``limit`` in a row.

        ``error`` is this rank's exception (``None``: it failed elsewhere); ``announce=False``
        keeps a rank that did not fail quiet (rank 0 speaks for them).
        """
        self.skipped += 1
        code, count = self._streak
        count = count + 1 if code == decision.cause_code else 1
        self._streak = (decision.cause_code, count)
        if error is not None:
            cause = cause_of(error)
            hint = hint_for(error)
            first_line = (str(error).strip().splitlines() or [""])[0][:300]
            self.warn_once(
                cause,
                f"{self.owner}: skipped a measurement after {type(error).__name__}: "
                f"{first_line}. "
                + (hint + " " if hint else "")
                + f"Training goes on; skips are counted in {self.skipped_tag}.",
            )
        elif announce:
            self.warn_once(
                f"peer:{decision.cause_code}",
                f"{self.owner}: skipped a measurement because it failed on another process "
                f"(see that rank's warning). Training goes on; skips are counted in "
                f"{self.skipped_tag}.",
            )
        if count >= self.limit and not self.disabled:
            self.disabled = True
            if not announce:
                return
            what = cause_of(error) if error is not None else "a failure on another process"
            warnings.warn(
                f"{self.owner}: {count} measurements in a row failed with the same cause "
                f"({what}); it stops measuring for the rest of this run. Pass `strict=True` "
                "to raise the error instead.",
                UserWarning,
                stacklevel=3,
            )


def collective_decision(
    trainer: pl.Trainer, device: torch.device, error: BaseException | None
) -> Decision:
    """Every rank's failure flags, max-reduced: the same :class:`Decision` everywhere."""
    flags = torch.tensor(local_flags(error), dtype=torch.float64)
    if trainer.world_size > 1:
        reduced = trainer.strategy.reduce(flags.to(device), reduce_op="max")
        flags = torch.as_tensor(reduced).detach().cpu()
    failed, oom, code = (float(x) for x in flags.tolist())
    return Decision(failed > 0, oom > 0, int(code))


def halved_probe(probe: Probe) -> Probe:
    """The same samples in batches of half the size (the out-of-memory retry)."""
    return probe.rebatched(max(1, max(probe.sizes) // 2))


def free_memory(device: torch.device) -> None:
    """Let go of what a failed measurement held (and, on CUDA, of the cached blocks)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
