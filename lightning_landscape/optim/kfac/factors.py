r"""Per-layer K-FAC algebra: Kronecker factor statistics, eigendecompositions, damped solves.

For a layer ``s = W ā`` (``ā = [a; 1]`` with a bias: the bias is the last column of the
gradient matrix) the Fisher block is approximated by ``A ⊗ G`` (docs/theory/kfac.md §Kronecker factors):

- ``nn.Linear``: ``A = (1/N) Σ_n ā āᵀ`` and ``G = (1/N) Σ_n g gᵀ``, ``g = ∂ℓ_n/∂s`` the
  per-example output gradient. Inputs with extra dimensions ``(N, ..., in)`` are treated like
  convolution positions (KFAC-expand).
- ``nn.Conv2d`` (KFAC-expand, arXiv:2311.00636): ``ā`` is the unfolded input patch at each of
  the ``T`` output positions, ``A = (1/(N·T)) Σ_n Σ_t ā āᵀ`` and ``G = (1/N) Σ_n Σ_t g gᵀ``.

The functions here return *sums* over a batch (``A`` already divided by ``T``) with the number
of examples ``N``; the preconditioner adds the sums of all micro-batches and ranks and divides
once. Output gradients are taken as recorded: undoing the loss reduction and the AMP loss
scale is the caller's job.

With eigendecompositions ``A = Q_A diag(d_A) Q_Aᵀ`` and ``G = Q_G diag(d_G) Q_Gᵀ`` the damped
inverse applied to a gradient matrix ``M`` (shape ``out × in[+1]``) is

.. code-block:: text

    exact:  Q_G [(Q_Gᵀ M Q_A) ⊘ (d_G d_Aᵀ + λ)] Q_Aᵀ              = (G ⊗ A + λI)⁻¹ vec M
    pi:     Q_G [(Q_Gᵀ M Q_A) ⊘ ((d_G + √λ/π)(d_A + π√λ)ᵀ)] Q_Aᵀ  = (G + √λ/π I)⁻¹ M (A + π√λ I)⁻¹

with ``π = √((tr A / dim A) / (tr G / dim G))`` (Martens & Grosse 2015, §6.3). The same
formulas with the denominator to the power ``−½`` give ``P^{-1/2}``.

Example::

    >>> import torch
    >>> layer = torch.nn.Linear(2, 3).double()
    >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    >>> a_sum, n = input_statistics(layer, x, torch.float64)
    >>> n, a_sum.tolist()   # Σ ā āᵀ with ā = [x, 1]
    (2, [[10.0, 14.0, 4.0], [14.0, 20.0, 6.0], [4.0, 6.0, 2.0]])
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "DampingMode",
    "Eigen",
    "apply_damped",
    "damped_denominator",
    "eigen",
    "pi_inverses",
    "gradient_matrix",
    "input_statistics",
    "output_statistics",
    "pi_factor",
    "set_gradient",
    "supported",
]

DampingMode = Literal["exact", "pi"]
Eigen = tuple[torch.Tensor, torch.Tensor]  # (eigenvalues d, eigenvectors Q)


def supported(module: nn.Module) -> str | None:
    """Why ``module`` cannot be handled (a short reason), or ``None`` if it can.

    Only ``nn.Linear`` and ``nn.Conv2d`` with ``groups == 1`` and a trainable weight are
    handled; callers filter other module types before asking.
    """
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"grouped convolution (groups={module.groups}) is not supported"
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.requires_grad:
        return "its weight is frozen"
    return None


def _with_bias(rows: torch.Tensor) -> torch.Tensor:
    return F.pad(rows, (0, 1), value=1.0)


def conv_padding(module: nn.Conv2d) -> list[int]:
    """``F.pad``'s amounts for ``module.padding`` (last dimension first, left then right)."""
    pad: list[int] = []
    for i in reversed(range(len(module.kernel_size))):
        if module.padding == "same":  # the odd extra goes to the right, as in torch
            total = module.dilation[i] * (module.kernel_size[i] - 1)
            pad += [total // 2, total - total // 2]
        elif module.padding == "valid":
            pad += [0, 0]
        else:
            pad += [int(module.padding[i])] * 2
    return pad


def _conv_rows(module: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Patches ``(N·T, C·kh·kw)`` (channel-major, like ``weight.reshape(out, -1)``).

    Cut with ``Tensor.unfold`` views and one copy (``F.unfold`` loops over the batch on CPU).
    """
    if x.dim() == 3:
        x = x.unsqueeze(0)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    if any(pad := conv_padding(module)):
        x = F.pad(x, pad, mode=mode)
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    patches = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    if dh > 1 or dw > 1:
        patches = patches[..., ::dh, ::dw]
    n, c, oh, ow = patches.shape[:4]
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw), n


def input_statistics(
    module: nn.Module, x: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, int]:
    """``((1/T) Σ_n Σ_t ā āᵀ, N)`` for the input ``x`` of a Linear or Conv2d ``module``.

    Computed in ``dtype`` (cast first; call it with autocast disabled).
    """
    x = x.detach().to(dtype)
    if isinstance(module, nn.Conv2d):
        rows, n = _conv_rows(module, x)
    else:
        n = x.shape[0] if x.dim() > 1 else 1
        rows = x.reshape(-1, x.shape[-1])
    if getattr(module, "bias", None) is not None:
        rows = _with_bias(rows)
    positions = rows.shape[0] // max(n, 1)
    return (rows.T @ rows) / max(positions, 1), n


def output_statistics(
    module: nn.Module, grad: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, int]:
    """``(Σ_n Σ_t γ γᵀ, N)`` for the gradient ``γ`` of the loss w.r.t. the module output."""
    grad = grad.detach().to(dtype)
    if isinstance(module, nn.Conv2d):
        n = grad.shape[0] if grad.dim() == 4 else 1
        rows = grad.movedim(-3, -1).reshape(-1, grad.shape[-3])
    else:
        n = grad.shape[0] if grad.dim() > 1 else 1
        rows = grad.reshape(-1, grad.shape[-1])
    return rows.T @ rows, n


def gradient_matrix(module: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    """``[∇W.reshape(out, -1), ∇b]`` in ``dtype``; ``None`` if a gradient is missing."""
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    bias = getattr(module, "bias", None)
    if weight.grad is None or (bias is not None and bias.grad is None):
        return None
    m = weight.grad.detach().reshape(weight.shape[0], -1).to(dtype)
    if bias is not None:
        m = torch.cat([m, bias.grad.detach().to(dtype).unsqueeze(1)], dim=1)  # type: ignore[union-attr]
    return m


def set_gradient(module: nn.Module, matrix: torch.Tensor) -> None:
    """Copy a gradient matrix back into ``weight.grad`` (and ``bias.grad``), in place."""
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    bias = getattr(module, "bias", None)
    cols = matrix.shape[1] - (1 if bias is not None else 0)
    wg = weight.grad
    assert wg is not None
    if wg.is_contiguous():  # no temporary for the non-contiguous column slice
        wg.view(matrix.shape[0], -1).copy_(matrix[:, :cols])
    else:
        wg.copy_(matrix[:, :cols].reshape(weight.shape))
    if bias is not None:
        bias.grad.copy_(matrix[:, cols])  # type: ignore[union-attr]


def eigen(matrix: torch.Tensor) -> Eigen:
    """Eigenvalues (clamped at 0) and eigenvectors of a symmetric PSD factor.

    The matrix is symmetrised first. If the solver does not converge (rare, nearly repeated
    eigenvalues in float32) or silently returns non-finite values (seen with float32 ``eigh``
    on one CPU thread for an exactly singular factor, e.g. a conv whose patches are mostly
    padding) it is retried in float64; results come back in the input dtype.
    """
    sym = 0.5 * (matrix + matrix.T)
    try:
        d, q = torch.linalg.eigh(sym)
        finite = bool(torch.isfinite(d).all()) and bool(torch.isfinite(q).all())
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        finite = False
    if not finite and sym.dtype != torch.float64:
        d, q = torch.linalg.eigh(sym.double())
        d, q = d.to(matrix.dtype), q.to(matrix.dtype)
    elif not finite:
        raise torch.linalg.LinAlgError("eigh of a K-FAC factor gave non-finite values")
    return d.clamp_min(0.0), q


def pi_factor(d_a: torch.Tensor, d_g: torch.Tensor) -> float:
    """``π = √((tr A / dim A) / (tr G / dim G))``, or 1 when a trace vanishes."""
    ta = float(d_a.sum()) / d_a.numel()
    tg = float(d_g.sum()) / d_g.numel()
    if not (ta > 0.0 and tg > 0.0 and math.isfinite(ta) and math.isfinite(tg)):
        return 1.0
    return math.sqrt(ta / tg)


def damped_denominator(
    d_a: torch.Tensor,
    d_g: torch.Tensor,
    damping: float,
    *,
    mode: DampingMode = "exact",
    pi: float = 1.0,
    power: float = -1.0,
) -> torch.Tensor:
    """The ``out × in[+1]`` eigenvalue matrix of ``P`` raised to ``power`` (see above)."""
    if mode == "exact":
        denom = torch.outer(d_g, d_a) + damping
    else:
        root = math.sqrt(damping)
        denom = torch.outer(d_g + root / pi, d_a + pi * root)
    return denom.reciprocal() if power == -1.0 else denom.pow(power)


def apply_damped(
    matrix: torch.Tensor,
    a: Eigen,
    g: Eigen,
    damping: float,
    *,
    mode: DampingMode = "exact",
    pi: float = 1.0,
    power: float = -1.0,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``P^power`` applied to a gradient-shaped ``matrix`` (``power`` −1 or −½; see above).

    Args:
        matrix: ``out × in[+1]`` matrix (the layout of :func:`gradient_matrix`).
        a: ``(d_A, Q_A)``.
        g: ``(d_G, Q_G)``.
        damping: ``λ > 0``.
        mode: ``"exact"`` (``G ⊗ A + λI``) or ``"pi"`` (factored, π-adjusted).
        pi: ``π`` of the ``"pi"`` mode (:func:`pi_factor`).
        power: exponent of ``P``.
        scale: :func:`damped_denominator` of these arguments, if already computed.
    """
    d_a, q_a = a
    d_g, q_g = g
    if scale is None:
        scale = damped_denominator(d_a, d_g, damping, mode=mode, pi=pi, power=power)
    return q_g @ ((q_g.T @ matrix @ q_a) * scale) @ q_a.T


def pi_inverses(a: Eigen, g: Eigen, damping: float, pi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``((G + √λ/π I)⁻¹, (A + π√λ I)⁻¹)``: the ``"pi"`` mode as two explicit inverses.

    With them a step costs two matrix products per layer instead of four.
    """
    root = math.sqrt(damping)
    (d_a, q_a), (d_g, q_g) = a, g
    g_inv = (q_g * (d_g + root / pi).reciprocal()) @ q_g.T
    a_inv = (q_a * (d_a + pi * root).reciprocal()) @ q_a.T
    return g_inv, a_inv
