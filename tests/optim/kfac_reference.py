"""Explicit float64 K-FAC references: per-example loops, slicing-based patches, dense Kroneckers.

Nothing here shares code with the package: patches are cut by slicing (no ``unfold``),
per-example output gradients come from one backward per example, and preconditioned gradients
from a dense solve of ``(kron(G, A) + λI) vec Δ = vec ∇W``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from lightning_landscape.optim.kfac import KFACPreconditioner

DT = torch.float64
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ce_sum(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="sum")


def per_example_output_grads(
    model: nn.Module, layer: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: Loss = ce_sum
) -> torch.Tensor:
    """``∂ℓ_n/∂(layer output)`` for each example ``n``, stacked (one backward per example)."""
    grads = []
    for n in range(x.shape[0]):
        box: list[torch.Tensor] = []
        handle = layer.register_forward_hook(lambda m, i, o, box=box: box.append(o))
        out = model(x[n : n + 1])
        handle.remove()
        (g,) = torch.autograd.grad(loss(out, y[n : n + 1]), box[0])
        grads.append(g[0])
    return torch.stack(grads)


def layer_inputs(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    box: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, i, o: box.append(i[0].detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return box[0]


def conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Patches ``(N, T, C·kh·kw)`` cut by slicing the padded input."""
    if conv.padding_mode == "zeros":
        xp = F.pad(x, conv._reversed_padding_repeated_twice)
    else:
        xp = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    oh = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for n in range(x.shape[0]):
        per = []
        for i in range(oh):
            for j in range(ow):
                patch = xp[n, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh,
                           j * sw : j * sw + dw * (kw - 1) + 1 : dw]  # fmt: skip
                per.append(patch.reshape(-1))
        rows.append(torch.stack(per))
    return torch.stack(rows)


def with_ones(rows: torch.Tensor) -> torch.Tensor:
    return torch.cat([rows, torch.ones(*rows.shape[:-1], 1, dtype=rows.dtype)], dim=-1)


def linear_factors(
    model: nn.Module, layer: nn.Linear, x: torch.Tensor, y: torch.Tensor, loss: Loss = ce_sum
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = (1/N) Σ ā āᵀ``, ``G = (1/N) Σ g gᵀ`` with per-example ``g``."""
    a = layer_inputs(model, layer, x)
    if layer.bias is not None:
        a = with_ones(a)
    g = per_example_output_grads(model, layer, x, y, loss)
    n = x.shape[0]
    return a.T @ a / n, g.T @ g / n


def conv_factors(
    model: nn.Module, conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor, loss: Loss = ce_sum
) -> tuple[torch.Tensor, torch.Tensor]:
    """KFAC-expand: ``A = (1/(N·T)) Σ_n Σ_t ā āᵀ``, ``G = (1/N) Σ_n Σ_t g gᵀ``."""
    patches = conv_patches(conv, layer_inputs(model, conv, x))  # (N, T, D)
    if conv.bias is not None:
        patches = with_ones(patches)
    n, t, _ = patches.shape
    flat = patches.reshape(n * t, -1)
    g = per_example_output_grads(model, conv, x, y, loss)  # (N, out, H', W')
    g = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
    return flat.T @ flat / (n * t), g.T @ g / n


def grad_matrix(layer: nn.Module) -> torch.Tensor:
    m = layer.weight.grad.reshape(layer.weight.shape[0], -1)
    if layer.bias is not None:
        m = torch.cat([m, layer.bias.grad[:, None]], dim=1)
    return m


def exact_solve(a: torch.Tensor, g: torch.Tensor, m: torch.Tensor, damping: float) -> torch.Tensor:
    """``(kron(G, A) + λI)⁻¹ vec M`` reshaped like ``M`` (row-major vec)."""
    k = torch.kron(g, a) + damping * torch.eye(a.shape[0] * g.shape[0], dtype=a.dtype)
    return torch.linalg.solve(k, m.reshape(-1)).reshape(m.shape)


def pi_solve(a: torch.Tensor, g: torch.Tensor, m: torch.Tensor, damping: float) -> torch.Tensor:
    """``(G + √λ/π I)⁻¹ M (A + π√λ I)⁻¹`` with ``π² = (tr A / dim A) / (tr G / dim G)``."""
    pi = math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0]))
    root = math.sqrt(damping)
    ga = g + root / pi * torch.eye(g.shape[0], dtype=g.dtype)
    aa = a + pi * root * torch.eye(a.shape[0], dtype=a.dtype)
    return torch.linalg.solve(ga, m) @ torch.linalg.inv(aa)


def dense_p(a: torch.Tensor, g: torch.Tensor, damping: float, mode: str = "exact") -> torch.Tensor:
    """The dense ``P`` of one layer in row-major vec order."""
    if mode == "exact":
        return torch.kron(g, a) + damping * torch.eye(a.shape[0] * g.shape[0], dtype=a.dtype)
    pi = math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0]))
    root = math.sqrt(damping)
    return torch.kron(
        g + root / pi * torch.eye(g.shape[0], dtype=g.dtype),
        a + pi * root * torch.eye(a.shape[0], dtype=a.dtype),
    )


def sym_inverse_sqrt(p: torch.Tensor) -> torch.Tensor:
    d, q = torch.linalg.eigh(p)
    return q @ torch.diag(d.rsqrt()) @ q.T


def dense_preconditioner(pre: KFACPreconditioner, params: list[torch.Tensor]) -> torch.Tensor:
    """The dense ``P`` of the stability rule in the flat order of ``params``.

    Damped ``kron(G, A)`` blocks on the registered layers; ``ν·I`` elsewhere (``ν`` the last KL
    scale: K-FAC hands those raw gradients to the optimizer without scaling them by ``ν``).
    """
    sizes = [p.numel() for p in params]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    where = {id(p): o for p, o in zip(params, offsets)}
    p_full = pre.kl_scale * torch.eye(sum(sizes), dtype=DT)
    for layer in pre.layers.values():
        d_a, q_a = layer.eigen_a  # type: ignore[misc]
        d_g, q_g = layer.eigen_g  # type: ignore[misc]
        a, g = q_a @ torch.diag(d_a) @ q_a.T, q_g @ torch.diag(d_g) @ q_g.T
        block = dense_p(a, g, pre.last_damping, pre.damping_mode)  # type: ignore[arg-type]
        weight, *bias = layer.params
        out, cols = layer.dim_g, layer.dim_a
        index = []  # flat parameter index of each row-major entry of [W | b]
        for o in range(out):
            for i in range(cols):
                if i < cols - len(bias):
                    index.append(where[id(weight)] + o * (cols - len(bias)) + i)
                else:
                    index.append(where[id(bias[0])] + o)
        idx = torch.tensor(index)
        p_full[idx[:, None], idx[None, :]] = block
    return p_full
