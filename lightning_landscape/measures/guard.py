"""A context manager that makes a measurement unobservable to training.

Inside :func:`guard` a measurement may run forward and double-backward passes, perturb the
parameters and draw random numbers; on exit everything training can observe is as it was:

- parameters are *copied back* from a snapshot (bit-identical, never add-then-subtract);
- every buffer (BatchNorm running statistics, ``num_batches_tracked``, ...) is copied back;
- ``.grad`` of every parameter is restored (same object, same values) and ``requires_grad``
  flags are restored;
- each module's ``training`` flag is restored;
- the RNG states of torch (CPU and every initialised CUDA device), NumPy and ``random`` are
  restored.

During the measurement the model is in eval mode (dropout off, BatchNorm on running statistics)
unless ``bn="batch"`` (BatchNorm normalises with the probe batch's statistics; its buffers are
still restored) or ``dropout=True``. Gradients are enabled even when the caller runs under
``torch.inference_mode`` or ``torch.no_grad``, and autocast is disabled so the measurement runs
in the parameters' own precision.

Two things make second-order measurements possible on models whose training path cannot be
differentiated twice, and both are undone on exit:

- ``F.scaled_dot_product_attention`` runs on its *math* backend
  (``torch.nn.attention.sdpa_kernel``): the fused flash / memory-efficient kernels that
  ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` and most transformers use have no
  double-backward formula, the math backend is plain differentiable torch;
- code compiled with ``torch.compile`` runs eagerly (``torch.compiler.set_stance("force_eager")``): the
  compiled graph does not support double backward, the eager module has the same parameters
  and computes the same function.

Example::

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    >>> before = [t.clone() for t in net.state_dict().values()]
    >>> with guard(net, bn="batch", seed=0):
    ...     net(torch.randn(8, 2)).sum().backward()
    ...     _ = net[0].weight.data.add_(1.0)
    >>> all(torch.equal(a, b) for a, b in zip(before, net.state_dict().values()))
    True
    >>> net.training, net[0].weight.grad is None
    (True, True)
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_landscape.checks import check_choice

__all__ = [
    "guard",
    "preserved_rng",
    "second_order_mode",
    "BNMode",
    "BATCHNORM_TYPES",
    "DROPOUT_TYPES",
]

BNMode = Literal["eval", "batch"]

#: BatchNorm layers (torch's public classes: everything torch derives from its private base).
BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
    torch.ao.nn.quantized.BatchNorm2d,
    torch.ao.nn.quantized.BatchNorm3d,
)
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def _rng_states() -> dict[str, object]:
    states: dict[str, object] = {
        "torch": torch.random.get_rng_state(),
        "numpy": np.random.get_state(),
        "random": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng(states: dict[str, object]) -> None:
    torch.random.set_rng_state(states["torch"])  # type: ignore[arg-type]
    np.random.set_state(states["numpy"])  # type: ignore[arg-type]
    random.setstate(states["random"])  # type: ignore[arg-type]
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])  # type: ignore[arg-type]


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the torch (CPU and CUDA), NumPy and ``random`` RNG states on exit."""
    states = _rng_states()
    try:
        yield
    finally:
        _restore_rng(states)


@contextlib.contextmanager
def second_order_mode() -> Iterator[None]:
    """Math SDPA backend and eager ``torch.compile`` regions, so double backward works."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        stack.enter_context(torch.compiler.set_stance("force_eager"))
        yield


def _local_batch_norm(module: nn.SyncBatchNorm, input: Tensor) -> Tensor:
    """``module``'s forward without synchronisation: ``F.batch_norm`` on its own buffers and
    parameters, the computation ``nn.BatchNorm*d`` does (and ``SyncBatchNorm`` outside a
    process group), running statistics updated as in training."""
    if input.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
    factor = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:  # cumulative moving average
            factor = 1.0 / float(module.num_batches_tracked)
    no_stats = module.running_mean is None and module.running_var is None
    tracked = not module.training or module.track_running_stats
    return F.batch_norm(
        input,
        module.running_mean if tracked else None,
        module.running_var if tracked else None,
        module.weight,
        module.bias,
        module.training or no_stats,
        factor,
        module.eps,
    )


@contextlib.contextmanager
def guard(
    model: nn.Module,
    *,
    bn: BNMode = "eval",
    dropout: bool = False,
    seed: int | None = None,
    pauses: Sequence[AbstractContextManager[object]] = (),
) -> Iterator[nn.Module]:
    """Run a measurement on ``model`` without any observable effect on training.

    Args:
        model: the module to measure (not a DDP wrapper: pass ``ddp.module``).
        bn: ``"eval"`` uses BatchNorm running statistics; ``"batch"`` uses the statistics of
            each probe batch (buffers are restored afterwards either way).
        dropout: keep dropout active during the measurement (off by default).
        seed: if given, torch/NumPy/``random`` are seeded with it inside the guard, so every
            rank draws the same random vectors.
        pauses: further context managers entered for the duration (e.g. a K-FAC
            preconditioner's ``paused()`` so measurement forwards do not reach its factors).

    Yields:
        ``model``, switched to measurement mode.
    """
    check_choice("bn", bn, ("eval", "batch"))
    params = list(model.parameters())
    param_data = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    grad_data = [None if g is None else g.detach().clone() for g in grads]
    flags = [p.requires_grad for p in params]
    buffers = list(model.buffers())
    buffer_data = [b.detach().clone() for b in buffers]
    modes = [(m, m.training) for m in model.modules()]
    device_type = params[0].device.type if params else "cpu"
    rng = _rng_states()
    patched: list[nn.Module] = []
    try:
        model.eval()
        for m in model.modules():
            if bn == "batch" and isinstance(m, BATCHNORM_TYPES):
                m.train()
                if isinstance(m, nn.SyncBatchNorm):
                    # normalise with this rank's probe batch only: a synchronised forward would
                    # pair collectives across ranks holding different numbers of probe batches
                    # (and SyncBatchNorm has no double backward)
                    m.forward = functools.partial(_local_batch_norm, m)  # type: ignore[method-assign]
                    patched.append(m)
            if dropout and isinstance(m, DROPOUT_TYPES):
                m.train()
        if seed is not None:
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            with contextlib.suppress(RuntimeError):  # device types without autocast support
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            stack.enter_context(second_order_mode())
            for pause in pauses:
                stack.enter_context(pause)
            yield model
    finally:
        with torch.no_grad():
            for p, data in zip(params, param_data):
                p.copy_(data)
            for b, data in zip(buffers, buffer_data):
                b.copy_(data)
            for p, g, g_data in zip(params, grads, grad_data):
                if g is not None and g_data is not None:
                    g.copy_(g_data)
                p.grad = g
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
        for m in patched:
            del m.forward
        _restore_rng(rng)
