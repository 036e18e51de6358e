"""The state of one K-FAC layer: the current window's statistics, running factors, eigenbases.

A :class:`KFACLayer` accumulates, between two factor updates, the sums of
:func:`~lightning_landscape.optim.kfac.factors.input_statistics` and
:func:`~lightning_landscape.optim.kfac.factors.output_statistics` over every recorded
micro-batch together with their example counts. :meth:`KFACLayer.update` folds a batch
estimate into the running averages (the first one initialises them); :meth:`KFACLayer.decompose`
refreshes the eigenbases. The preconditioner drives these calls; nothing here communicates.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from .factors import (
    DampingMode,
    Eigen,
    apply_damped,
    damped_denominator,
    eigen,
    gradient_matrix,
    pi_factor,
    pi_inverses,
    set_gradient,
    supported,
)
from .sharing import describe, holders

__all__ = ["KFACLayer", "select_layers", "unwrap"]


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``⟨x, y⟩`` accumulated in float32 (``torch.dot`` on bf16 is a slow scalar loop)."""
    return torch.mul(x, y).sum(dtype=torch.float32)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def select_layers(
    model: nn.Module,
    include: re.Pattern[str] | None,
    exclude: re.Pattern[str] | None,
    dtype: torch.dtype | None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[dict[str, KFACLayer], dict[str, str], dict[str, str]]:
    """The ``nn.Linear``/``nn.Conv2d`` modules to register, the unsupported ones with why, and
    the ones holding a parameter another module also holds (:mod:`.sharing`) with which.

    A module is considered when ``include`` (if given) matches its name and ``exclude`` does
    not (``re.search``). Factors are float64 for float64 weights, else float32, unless
    ``dtype`` is given; the per-step products run in ``compute_dtype`` (default: the factors').
    """
    layers: dict[str, KFACLayer] = {}
    skipped: dict[str, str] = {}
    tied: dict[str, str] = {}
    shared = holders(model)
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if (include is not None and not include.search(name)) or (
            exclude is not None and exclude.search(name)
        ):
            continue
        reason = supported(module)
        if reason is not None:
            skipped[name] = reason
            continue
        own = [p for p in (module.weight, module.bias) if p is not None]
        sharing = describe(name, own, shared)
        if sharing is not None:
            tied[name] = sharing
            continue
        wide = module.weight.dtype == torch.float64
        factor = dtype or (torch.float64 if wide else torch.float32)
        layers[name] = KFACLayer(name, module, factor, compute_dtype)
    return layers, skipped, tied


class KFACLayer:
    """One registered ``nn.Linear`` / ``nn.Conv2d`` and its K-FAC state.

    Args:
        name: The module's qualified name in the (unwrapped) model.
        module: The module.
        dtype: dtype of statistics, factors and eigenbases.
        compute_dtype: dtype of the eigenbasis copies and products of the per-step solve
            (default ``dtype``; ``torch.bfloat16`` trades ~3 digits for 2-3× faster products
            on CPUs with bf16 matrix units).
    """

    def __init__(
        self, name: str, module: nn.Module, dtype: torch.dtype, compute_dtype: Any = None
    ) -> None:
        self.name = name
        self.module = module
        self.dtype = dtype
        self.cdtype: torch.dtype = compute_dtype or dtype
        self._buffers: dict[str, torch.Tensor] = {}  # per-step work space, reused
        weight: torch.Tensor = module.weight  # type: ignore[assignment]
        self.device = weight.device
        bias = getattr(module, "bias", None)
        self.params: list[torch.Tensor] = [weight] + ([bias] if bias is not None else [])
        self._cast = self.cdtype != weight.dtype  # (refreshed by set_eigen)
        self.dim_a = weight[0].numel() + (1 if bias is not None else 0)
        self.dim_g = weight.shape[0]
        self.fired = False  # a hook fired at least once
        self.a_sum: torch.Tensor | None = None
        self.g_sum: torch.Tensor | None = None
        self.a_count = 0  # Σ N over the recorded calls (the A normaliser N·calls)
        self.g_count = 0  # Σ N over the recorded passes (examples; the G normaliser)
        self._open = False  # a call was recorded since the last output gradient
        self._pass_n = 0  # largest N among the output gradients of the current pass
        self.A: torch.Tensor | None = None
        self.G: torch.Tensor | None = None
        self.eigen_a: Eigen | None = None
        self.eigen_g: Eigen | None = None
        self.pi = 1.0
        self._scales: dict[tuple[float, str, float], Any] = {}  # per eigenbasis

    # -- statistics of the current window ---------------------------------------------------
    def add_input(self, a_sum: torch.Tensor, n: int) -> None:
        self.fired = True
        self.a_sum = a_sum if self.a_sum is None else self.a_sum.add_(a_sum)
        self.a_count += n
        self._open = True

    def add_output(self, g_sum: torch.Tensor, n: int) -> None:
        """Add ``Σ γγᵀ`` of one call; its ``N`` examples count once per pass.

        A *pass* is the run of output gradients after recorded calls: a module called ``T``
        times in one forward gets its ``T`` output gradients in one backward with no recorded
        call in between, so they are ``T`` positions of the same examples (KFAC-expand over
        the calls), not ``T·N`` examples.
        """
        self.fired = True
        self.g_sum = g_sum if self.g_sum is None else self.g_sum.add_(g_sum)
        if self._open:  # the first output gradient after a call: a new pass
            self._open, self._pass_n = False, n
            self.g_count += n
        elif n > self._pass_n:
            self.g_count += n - self._pass_n
            self._pass_n = n

    @property
    def recorded_input(self) -> bool:
        """Whether a call was recorded and its output gradient has not arrived yet."""
        return self._open

    def clear(self) -> None:
        """Forget the current window's statistics."""
        self.a_sum = self.g_sum = None
        self.a_count = self.g_count = 0
        self._open, self._pass_n = False, 0

    def window(self, g_scale: float) -> list[torch.Tensor]:
        """``[Σ A, g_scale · Σ G, counts]`` of the window (zeros where nothing was recorded)."""
        zeros_a = torch.zeros(self.dim_a, self.dim_a, dtype=self.dtype, device=self.device)
        zeros_g = torch.zeros(self.dim_g, self.dim_g, dtype=self.dtype, device=self.device)
        a = zeros_a if self.a_sum is None else self.a_sum
        g = zeros_g if self.g_sum is None else self.g_sum * g_scale
        counts = torch.tensor(
            [float(self.a_count), float(self.g_count)], dtype=self.dtype, device=self.device
        )
        return [a, g, counts]

    # -- running factors --------------------------------------------------------------------
    def update(self, a_batch: torch.Tensor, g_batch: torch.Tensor, decay: float) -> None:
        """``F ← ξF + (1−ξ)F_batch`` for both factors; the first call copies the batch."""
        if self.A is None or self.G is None:
            self.A, self.G = a_batch.clone(), g_batch.clone()
            return
        self.A.mul_(decay).add_(a_batch, alpha=1.0 - decay)
        self.G.mul_(decay).add_(g_batch, alpha=1.0 - decay)

    def decompose(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eigendecompositions of the running factors, as ``(d_A, Q_A, d_G, Q_G)``."""
        assert self.A is not None and self.G is not None
        d_a, q_a = eigen(self.A)
        d_g, q_g = eigen(self.G)
        return d_a, q_a, d_g, q_g

    def set_eigen(
        self, d_a: torch.Tensor, q_a: torch.Tensor, d_g: torch.Tensor, q_g: torch.Tensor
    ) -> None:
        self.eigen_a, self.eigen_g = (d_a, q_a), (d_g, q_g)
        self.pi = pi_factor(d_a, d_g)
        self._scales.clear()
        # Q_A split into weight rows and the bias row; every copy contiguous, in the compute
        # dtype and in the layout its product wants (no transposed views, no per-step casts)
        bias, cd = len(self.params) > 1, self.cdtype
        # a compute dtype other than the gradients' (bf16): the gradient is cast anyway, so it
        # is cast into one [∇W | ∇b] work matrix and every product is one GEMM (rank-1 bias
        # updates and reductions are slow in bf16); otherwise no copy of the gradient at all
        self._cast = cd != self.params[0].dtype
        q_aw = q_a if self._cast or not bias else q_a[:-1]
        self._qa_w = q_aw.to(cd).contiguous()
        self._qa_wt = self._qa_w.T.contiguous()
        self._qa_b = q_a[-1].to(cd).contiguous() if bias and not self._cast else None
        self._qg = q_g.to(cd).contiguous()
        self._qg_t = self._qg.T.contiguous()

    def eigen_cost(self) -> float:
        """Relative cost of :meth:`decompose` (cubic in the factor sizes)."""
        return float(self.dim_a**3 + self.dim_g**3)

    # -- preconditioning --------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.eigen_a is not None and self.eigen_g is not None

    def apply(
        self, matrix: torch.Tensor, damping: float, mode: DampingMode, power: float = -1.0
    ) -> torch.Tensor:
        """``P^power`` (``P`` the damped ``G ⊗ A``) applied to a gradient-shaped matrix."""
        assert self.eigen_a is not None and self.eigen_g is not None
        cached = self._cached(damping, mode, power)
        if isinstance(cached, tuple):
            return (cached[0] @ matrix.to(cached[0].dtype) @ cached[1]).to(self.dtype)
        return apply_damped(matrix, self.eigen_a, self.eigen_g, damping, scale=cached)

    def _buffer(self, key: str, rows: int, cols: int) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != (rows, cols):
            buf = torch.empty(rows, cols, dtype=self.cdtype, device=self.device)
            self._buffers[key] = buf
        return buf

    def _cast_gradient(self) -> torch.Tensor | None:
        """``[∇W | ∇b]`` cast into a reused work matrix of the compute dtype."""
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            return None
        m = self._buffer("m", self.dim_g, self.dim_a)
        cols = self.dim_a - (len(grads) - 1)
        m[:, :cols].copy_(grads[0].reshape(self.dim_g, -1))  # type: ignore[union-attr]
        if len(grads) > 1:
            m[:, cols].copy_(grads[1])  # type: ignore[arg-type]
        return m

    def _times_a(self, right: torch.Tensor, bias_row: torch.Tensor | None) -> torch.Tensor | None:
        """``[∇W | ∇b] @ R`` for ``R = [right; bias_row]`` without concatenating the gradient."""
        weight = self.params[0]
        if weight.grad is None or (len(self.params) > 1 and self.params[1].grad is None):
            return None
        if self._cast:  # right is the whole R
            m = self._cast_gradient()
            assert m is not None
            return torch.mm(m, right, out=self._buffer("t", self.dim_g, right.shape[1]))
        w = weight.grad.reshape(self.dim_g, -1).to(self.cdtype)
        out = torch.mm(w, right, out=self._buffer("t", self.dim_g, right.shape[1]))
        if bias_row is not None:
            out.addr_(self.params[1].grad.to(self.cdtype), bias_row)  # type: ignore[union-attr]
        return out

    def solve(self, damping: float, mode: DampingMode) -> tuple[Any, torch.Tensor] | None:
        """First half of a step: ``P⁻¹∇`` in a form :meth:`write` finishes, and ``⟨P⁻¹∇, ∇⟩``.

        ``"exact"`` stays in the eigenbasis (``X = (Q_Gᵀ ∇ Q_A) ⊘ (d_G d_Aᵀ + λ)``, where
        ``⟨P⁻¹∇, ∇⟩ = ⟨X, Q_Gᵀ ∇ Q_A⟩``); ``"pi"`` uses the two explicit inverses. ``None``
        when a gradient is missing.
        """
        if mode == "pi":
            g_inv, a_inv = self._cached(damping, mode, -1.0)
            bias_row = a_inv[-1] if len(self.params) > 1 and not self._cast else None
            right = a_inv[:-1] if bias_row is not None else a_inv
            t = self._times_a(right, bias_row)
            if t is None:
                return None
            if self._cast:
                delta = torch.mm(g_inv, t, out=self._buffer("x", self.dim_g, self.dim_a))
                return delta, _dot(delta, self._buffers["m"])
            delta = g_inv @ t
            grad = gradient_matrix(self.module, self.cdtype)
            assert grad is not None
            return delta, torch.vdot(delta.reshape(-1), grad.reshape(-1))
        t = self._times_a(self._qa_w, self._qa_b)
        if t is None:
            return None
        v0 = torch.mm(self._qg_t, t, out=self._buffer("v0", self.dim_g, self.dim_a))
        x = torch.mul(v0, self._cached(damping, mode, -1.0), out=self._buffer("x", *v0.shape))
        if self._cast:
            return x, _dot(x, v0)
        return x, torch.vdot(x.reshape(-1), v0.reshape(-1))

    def write(self, solved: Any, nu: float, mode: DampingMode) -> None:
        """Second half: the gradients become ``ν · P⁻¹∇`` (in place)."""
        if nu != 1.0:
            solved = solved.mul_(nu)  # our own work space (exact) or a fresh product (pi)
        if mode == "pi":
            set_gradient(self.module, solved)
            return
        left = torch.mm(self._qg, solved, out=self._buffer("left", self.dim_g, self.dim_a))
        if self._cast:  # one GEMM into the work matrix, one cast-copy per parameter
            set_gradient(self.module, torch.mm(left, self._qa_wt, out=self._buffers["m"]))
            return
        weight = self.params[0]
        wg = weight.grad
        assert wg is not None
        if wg.dtype == self.cdtype and wg.is_contiguous():
            torch.mm(left, self._qa_wt, out=wg.view(self.dim_g, -1))
        else:
            wg.copy_((left @ self._qa_wt).view(wg.shape))
        if self._qa_b is not None:
            bg = self.params[1].grad
            assert bg is not None
            if bg.dtype == self.cdtype and bg.is_contiguous():
                torch.mv(left, self._qa_b, out=bg)
            else:
                bg.copy_(left @ self._qa_b)

    def _cached(self, damping: float, mode: DampingMode, power: float) -> Any:
        """The damped eigenvalue matrix (or, for ``"pi"`` with power −1, the two inverses)."""
        assert self.eigen_a is not None and self.eigen_g is not None
        key = (float(damping), mode, float(power))
        cached = self._scales.get(key)
        if cached is None:  # per eigenbasis: a constant damping costs nothing per step
            if len(self._scales) > 4:  # a damping schedule: keep the cache small
                self._scales.clear()
            if mode == "pi" and power == -1.0:
                inverses = pi_inverses(self.eigen_a, self.eigen_g, damping, self.pi)
                cached = tuple(t.to(self.cdtype) for t in inverses)
            else:
                d_a, d_g = self.eigen_a[0], self.eigen_g[0]
                cached = damped_denominator(d_a, d_g, damping, mode=mode, pi=self.pi, power=power)
                cached = cached.to(self.cdtype) if power == -1.0 else cached
            self._scales[key] = cached
        return cached

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Factors, eigenbases and π (copies)."""
        out: dict[str, Any] = {"A": self.A, "G": self.G, "pi": self.pi}
        if self.eigen_a is not None and self.eigen_g is not None:
            out.update(d_a=self.eigen_a[0], q_a=self.eigen_a[1])
            out.update(d_g=self.eigen_g[0], q_g=self.eigen_g[1])
        return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in out.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def to(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(device=self.device, dtype=self.dtype)

        a, g = to(state.get("A")), to(state.get("G"))
        for label, t, dim in (("A", a, self.dim_a), ("G", g, self.dim_g)):
            if t is not None and tuple(t.shape) != (dim, dim):
                raise ValueError(
                    f"state of layer {self.name!r}: factor {label} has shape "
                    f"{tuple(t.shape)}, expected {(dim, dim)}"
                )
        self.A, self.G = a, g
        self.eigen_a = self.eigen_g = None
        self._scales.clear()
        if "q_a" in state:
            self.set_eigen(to(state["d_a"]), to(state["q_a"]), to(state["d_g"]), to(state["q_g"]))  # type: ignore[arg-type]
        self.pi = float(state.get("pi", self.pi))
        self.fired = self.fired or self.A is not None
