"""Capturing K-FAC statistics: a forward hook per layer and a tensor hook on its output.

The forward hook sees the layer input and adds ``(1/T) Σ ā āᵀ`` to the layer's window; it then
registers a tensor hook on the *output*, which sees ``∂loss/∂output`` in the backward pass and
adds ``Σ γ γᵀ``. A tensor hook registered before an in-place operation (``ReLU(inplace=True)``)
receives the gradient of the value it was registered on, so in-place activations are fine
(full backward hooks on the module are not). Statistics are computed in the factor dtype with
autocast disabled, whatever the training precision.

Whether a forward is recorded is decided by a predicate the preconditioner supplies (training
mode, gradients enabled, not paused, a factor-update step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .factors import input_statistics, output_statistics
from .layer import KFACLayer

__all__ = ["no_autocast", "register"]


@contextlib.contextmanager
def no_autocast(device_type: str) -> Iterator[None]:
    """Disable autocast on ``device_type`` (no-op for device types without autocast)."""
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(RuntimeError):
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield


def _on_grad(layer: KFACLayer, recording: Callable[[], bool], grad: torch.Tensor) -> None:
    if not recording():  # e.g. paused between this forward and its backward
        return
    with no_autocast(grad.device.type):
        g_sum, n = output_statistics(layer.module, grad, layer.dtype)
    layer.add_output(g_sum, n)


def _on_forward(
    layer: KFACLayer,
    recording: Callable[[nn.Module], bool],
    backward_ok: Callable[[], bool],
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    output: Any,
) -> None:
    if not isinstance(output, torch.Tensor) or not output.requires_grad:
        return
    if not recording(module):
        return
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor):
        return
    with no_autocast(x.device.type):
        a_sum, n = input_statistics(module, x, layer.dtype)
    layer.add_input(a_sum, n)
    output.register_hook(partial(_on_grad, layer, backward_ok))


def register(
    layer: KFACLayer,
    recording: Callable[[nn.Module], bool],
    backward_ok: Callable[[], bool],
) -> RemovableHandle:
    """Install the statistics hooks of ``layer``.

    Args:
        layer: The layer state that receives the statistics.
        recording: ``recording(module)`` decides whether a forward is recorded.
        backward_ok: decides whether the output gradient of a recorded forward is recorded
            (grad mode is off inside backward hooks, so it cannot reuse ``recording``).
    """
    return layer.module.register_forward_hook(
        partial(_on_forward, layer, recording, backward_ok), with_kwargs=True
    )
