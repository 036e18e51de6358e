r"""The *true* Fisher for ``G``: output gradients of the model's own sampled log-likelihood.

By default ``G`` is built from the output gradients of the training backward (the *empirical*
Fisher), which shrinks with the residuals and is a poor curvature model on regression and on
plateaus (Kunstner et al. 2019, arXiv:1905.12558). The original K-FAC (Martens & Grosse 2015,
arXiv:1503.05671, §5) instead samples targets from the model's predictive distribution and
backpropagates their log-likelihood gradient; :func:`sampled_pass` does that, from the outputs
of the current forward, on factor-update steps only (one extra backward every ``T_cov`` steps;
the graph is kept for the training backward, weight gradients are returned, not accumulated).

For a ``"gaussian"`` likelihood ``N(f, σ²I)`` the sampled output gradient is ``ε/σ``
(``ε ~ N(0, I)``): with ``variance = ½`` it matches the Gauss–Newton matrix of ``‖f − y‖²``,
with 1 that of ``½‖f − y‖²``. For ``"categorical"`` (logits over the last dimension) it is
``softmax(z) − onehot(ŷ)`` with ``ŷ ~ softmax(z)``.

Example::

    >>> import torch
    >>> v = output_sample(torch.zeros(4, 3), "categorical", 1.0, None)
    >>> tuple(v.shape), bool(v.sum(-1).abs().max() < 1e-6)
    ((4, 3), True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

from lightning_landscape.checks import check_choice, check_that

from .layer import KFACLayer

if TYPE_CHECKING:
    from .preconditioner import KFACPreconditioner

__all__ = ["LIKELIHOODS", "output_sample", "sample_fisher", "sampled_pass"]

LIKELIHOODS = ("gaussian", "categorical")


def output_sample(
    outputs: torch.Tensor, likelihood: str, variance: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One sampled ``∂(−log p(ŷ | f))/∂f`` per output row, ``ŷ ~ p(· | f)`` (float32+)."""
    f = outputs.detach()
    f = f if f.dtype == torch.float64 else f.float()
    if likelihood == "gaussian":
        noise = torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device)
        return noise / math.sqrt(variance)
    probs = torch.softmax(f, dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    drawn = torch.multinomial(flat, 1, generator=generator).squeeze(1)
    onehot = F.one_hot(drawn, flat.shape[-1]).to(flat.dtype)
    return (flat - onehot).reshape(probs.shape)


def sampled_pass(
    layers: Sequence[KFACLayer], outputs: torch.Tensor, sample: torch.Tensor, scale: float
) -> bool:
    """Backpropagate ``scale · sample`` from ``outputs`` through the recorded layers.

    Their output hooks see these gradients (the caller makes them record); nothing is written
    to ``.grad`` and the graph is retained. ``False`` when no layer recorded this forward.
    """
    weights = [layer.params[0] for layer in layers if layer.recorded_input]
    if not weights:
        return False
    grad = (sample * scale).to(outputs.dtype)
    torch.autograd.grad(outputs, weights, grad_outputs=grad, retain_graph=True, allow_unused=True)
    return True


def sample_fisher(
    pre: KFACPreconditioner,
    outputs: torch.Tensor,
    likelihood: str,
    variance: float,
    generator: torch.Generator | None,
) -> bool:
    """:meth:`KFACPreconditioner.sample_fisher`: the sampled pass, scaled like the loss."""
    check_choice("likelihood", likelihood, LIKELIHOODS)
    ok = isinstance(variance, (int, float)) and math.isfinite(variance) and variance > 0
    check_that("variance", variance, ok, "a number > 0")
    if pre._pause_depth or not any(x.recorded_input for x in pre.layers.values()):
        return False
    n = outputs.shape[0] if outputs.dim() > 1 else 1
    scale = 1.0 / n if pre.loss_reduction == "mean" else 1.0  # the hooks undo the mean
    if pre.grad_scaler is not None:  # ... and divide by the loss scale
        scale *= float(pre.grad_scaler.get_scale() or 1.0)
    sample = output_sample(outputs, likelihood, float(variance), generator)
    pre._sampling = pre._sampled = True
    try:
        return sampled_pass(list(pre.layers.values()), outputs, sample, scale)
    finally:
        pre._sampling = False
