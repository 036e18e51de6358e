"""Sample-variance decay: how much of each layer's signal still tells the samples apart.

For one layer's outputs h on the probe (N samples × units; for a convolution a unit is a
channel and every spatial position counts as a sample), per unit u over the samples:

- sample mean ``m_u = (1/N) Σ_i h_iu``;
- sample variance, *population* form over the union of all samples,
  ``v_u = (1/N) Σ_i (h_iu − m_u)²``, so that ``v_u + m_u² = (1/N) Σ_i h_iu²`` is exactly the
  unit's second moment;
- the fraction ``f = mean_u(v_u) / mean_u(v_u + m_u²)``: the share of the total second moment
  that distinguishes samples (docs/theory/sample_variance.md §Definition). ``f`` lies in ``[0, 1]``; ``f = 0`` when every
  sample gives the same output (and, by convention, when the outputs are all zero).

At He initialisation a deep ReLU MLP keeps the second moment but ``f`` decays with depth
(arXiv:1902.04942); BatchNorm (with batch statistics) keeps it near ``1 − 1/π``.

:func:`sample_variance` registers forward hooks on every ``nn.Linear`` / ``nn.Conv1d/2d/3d``
(or on the named modules), runs one forward pass over the probe under ``torch.no_grad`` (the
caller guards the model: train/eval flags, BatchNorm buffers) and accumulates Σh, Σh² and the
sample count per unit in float64. Under ``torch.distributed`` these sums are reduced over the
processes (a torchmetrics :class:`~torchmetrics.Metric` with ``dist_reduce_fx="sum"`` states),
so every rank gets the result of one process on the union of the shards, also when the shards
differ in size. Cost: one forward pass on the probe; under DDP three small all-gathers
(torchmetrics' ``gather_all_tensors``: a barrier and a shape exchange each).

Example::

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> res = sample_variance(net, [torch.randn(64, 4)])
    >>> res.names
    ('0', '2')
    >>> all(0.0 <= f <= 1.0 for f in res.fractions), res.num_samples
    (True, (64, 64))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from .guard import BATCHNORM_TYPES
from .operators import NonFiniteError

__all__ = [
    "CHANNELS_FIRST_TYPES",
    "LAYER_TYPES",
    "LayerMoments",
    "SampleVariance",
    "default_forward",
    "sample_variance",
    "select_modules",
]

#: Modules measured by default: the layers whose outputs are pre-activations.
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: Modules whose outputs hold units (channels) along dim 1; every other module's outputs hold
#: them along the last dim (``nn.Linear`` on ``(N, L, F)`` sequences: positions are samples).
#: torch's public classes only (every subclass of its private bases ``_ConvNd``, ``_BatchNorm``,
#: ``_InstanceNorm``, ``_MaxPoolNd``, ... is one of these or derives from one; lazy ones too).
CHANNELS_FIRST_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    *BATCHNORM_TYPES,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LazyInstanceNorm1d,
    nn.LazyInstanceNorm2d,
    nn.LazyInstanceNorm3d,
    nn.GroupNorm,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)


@dataclass(frozen=True)
class SampleVariance:
    """Per-layer sample-variance fractions, in forward order.

    Attributes:
        names: module names (as in ``model.named_modules()``), in the order they first ran.
        fractions: ``f = mean_u(v_u) / mean_u(v_u + m_u²)`` per layer.
        variance: ``mean_u(v_u)`` per layer (population variance over the samples).
        second_moment: ``mean_u(v_u + m_u²) = mean_u(mean_i h_iu²)`` per layer.
        num_samples: samples per unit per layer (probe samples × positions; union over ranks).
    """

    names: tuple[str, ...]
    fractions: tuple[float, ...]
    variance: tuple[float, ...]
    second_moment: tuple[float, ...]
    num_samples: tuple[int, ...]

    @property
    def last_over_first(self) -> float:
        """Fraction of the last layer over that of the first (NaN if the first is 0)."""
        first = self.fractions[0]
        return self.fractions[-1] / first if first > 0 else float("nan")

    def as_dict(self) -> dict[str, float]:
        """``{module name: fraction}`` in forward order."""
        return dict(zip(self.names, self.fractions))


class LayerMoments(Metric):
    """Σh, Σh² per unit and the sample count per layer, summed over processes on sync.

    The states are three flat float64 tensors (units of all layers concatenated, and one count
    per layer), declared in a fixed order, so every rank gathers the same states in the same
    order; ``compute()`` returns the sums over all ranks (or the local ones without
    ``torch.distributed``).

    Args:
        units: number of units of each layer.
        kwargs: passed to :class:`torchmetrics.Metric` (``process_group``, ...).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None
    sums: Tensor
    squares: Tensor
    counts: Tensor

    def __init__(self, units: Sequence[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not units or any(not isinstance(u, int) or u < 1 for u in units):
            raise ValueError(f"`units` must be a non-empty list of positive ints, got {units!r}")
        self.units = list(units)
        total = sum(self.units)
        f64 = torch.float64
        self.add_state("sums", torch.zeros(total, dtype=f64), dist_reduce_fx="sum")
        self.add_state("squares", torch.zeros(total, dtype=f64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(len(self.units), dtype=f64), dist_reduce_fx="sum")

    def update(self, sums: Tensor, squares: Tensor, counts: Tensor) -> None:
        """Add local sums (flat over units), sums of squares and per-layer counts."""
        self.sums += sums.to(self.sums)
        self.squares += squares.to(self.squares)
        self.counts += counts.to(self.counts)

    def compute(self) -> tuple[Tensor, Tensor, Tensor]:
        """The (synchronised) ``(sums, squares, counts)``."""
        return self.sums.clone(), self.squares.clone(), self.counts.clone()


def select_modules(model: nn.Module, modules: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The modules to hook: every :data:`LAYER_TYPES` module, or the named ones.

    Raises:
        ValueError: if ``modules`` names unknown modules, or nothing is selected.
    """
    named = dict(model.named_modules())
    if modules is None:
        chosen = {n: m for n, m in named.items() if isinstance(m, LAYER_TYPES)}
        if not chosen:
            raise ValueError(
                f"model {type(model).__name__} has no nn.Linear or nn.Conv1d/2d/3d module; "
                "name the modules to measure with `modules`"
            )
        return chosen
    if isinstance(modules, str) or not modules:
        raise ValueError(f"`modules` must be a non-empty list of module names, got {modules!r}")
    unknown = [n for n in modules if n not in named]
    if unknown:
        raise ValueError(f"`modules` names modules the model does not have: {unknown}")
    return {n: named[n] for n in modules}


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(batch)`` for a tensor, ``model(batch[0])`` for a tuple/list ``(inputs, ...)``."""
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return model(batch[0])
    raise TypeError(
        f"cannot find the inputs in a batch of type {type(batch).__name__}; "
        "pass `forward(model, batch)`"
    )


class _Accumulator:
    """Forward hooks summing each hooked module's outputs per unit, in float64."""

    def __init__(self, chosen: Mapping[str, nn.Module]) -> None:
        self.order: list[str] = []
        self.sums: dict[str, Tensor] = {}
        self.squares: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self.handles = [m.register_forward_hook(self._hook(n, m)) for n, m in chosen.items()]

    def _hook(self, name: str, module: nn.Module) -> Callable[..., None]:
        channels_first = isinstance(module, CHANNELS_FIRST_TYPES)

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if not isinstance(output, Tensor) or output.dim() < 1:
                raise ValueError(
                    f"`modules`: module {name!r} returned {type(output).__name__}, "
                    "not a tensor with a sample dimension"
                )
            h = output.detach()
            if h.dim() == 1:
                h = h[:, None]  # one unit per sample
            elif channels_first and h.dim() > 2:
                h = h.movedim(1, -1)
            h = h.reshape(-1, h.shape[-1])
            device = h.device if h.device.type != "mps" else torch.device("cpu")  # no float64
            h = h.to(device=device, dtype=torch.float64)
            total, square = h.sum(0), (h * h).sum(0)
            if name not in self.sums:
                self.order.append(name)
                self.sums[name], self.squares[name], self.counts[name] = total, square, h.shape[0]
                return
            if self.sums[name].shape != total.shape:
                raise ValueError(
                    f"module {name!r} changed its number of units between calls: "
                    f"{self.sums[name].numel()} then {total.numel()}"
                )
            self.sums[name] += total
            self.squares[name] += square
            self.counts[name] += h.shape[0]

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def sample_variance(
    model: nn.Module,
    probe: Iterable[Any],
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    modules: Sequence[str] | None = None,
    process_group: Any = None,
) -> SampleVariance:
    """Sample-variance fraction of every layer's outputs on the probe (see the module docs).

    The model is run as it is (train/eval flags untouched): the caller chooses the mode, e.g.
    with :func:`~lightning_landscape.measures.guard.guard` (``bn="batch"`` for BatchNorm with
    batch statistics). A module that runs several times per forward pools all its calls'
    outputs as samples. With ``modules=None`` hooked layers that never run are left out.

    Args:
        model: the network (not a DDP wrapper).
        probe: a :class:`~lightning_landscape.measures.probe.Probe` or any iterable of batches.
        forward: ``forward(model, batch)`` runs the model on a batch (default:
            :func:`default_forward`); a loss function ``loss_fn(model, batch)`` works too.
        modules: names of the modules to hook (default: every ``nn.Linear`` / ``nn.Conv*d``).
            Units are along dim 1 for :data:`CHANNELS_FIRST_TYPES` and the last dim otherwise.
        process_group: group the sums are reduced over (default: the whole world when
            ``torch.distributed`` is initialised; nothing otherwise). Every rank must call.

    Returns:
        A :class:`SampleVariance`, identical on every rank.

    Raises:
        ValueError: if ``modules`` is invalid or a named module never ran, or nothing ran.
        NonFiniteError: if the activations hold NaN/inf on any rank (all ranks raise).
    """
    chosen = select_modules(model, modules)
    run = forward if forward is not None else default_forward
    acc = _Accumulator(chosen)
    try:
        with torch.no_grad():
            for batch in probe:
                run(model, batch)
    finally:
        acc.remove()
    if modules is not None:
        missing = [n for n in modules if n not in acc.sums]
        if missing:
            raise ValueError(f"`modules` names modules that did not run in forward: {missing}")
    if not acc.order:
        raise ValueError("none of the hooked modules ran during the forward pass over the probe")
    names = acc.order
    device = acc.sums[names[0]].device
    metric = LayerMoments([acc.sums[n].numel() for n in names], process_group=process_group)
    metric = metric.to(device)
    metric.update(
        torch.cat([acc.sums[n].to(device) for n in names]),
        torch.cat([acc.squares[n].to(device) for n in names]),
        torch.tensor([float(acc.counts[n]) for n in names], dtype=torch.float64),
    )
    # compute() squeezes one-element results: flatten them again
    sums, squares, counts = (t.reshape(-1) for t in metric.compute())
    if not (bool(torch.isfinite(sums).all()) and bool(torch.isfinite(squares).all())):
        raise NonFiniteError("non-finite activations on the probe")
    variance, second, fractions = [], [], []
    for s, q, n in zip(sums.split(metric.units), squares.split(metric.units), counts):
        mean = s / n
        moment = q / n
        var = (moment - mean * mean).clamp_min(0.0)
        v, total = float(var.mean()), float(moment.mean())
        variance.append(v)
        second.append(total)
        fractions.append(min(v / total, 1.0) if total > 0 else 0.0)
    return SampleVariance(
        names=tuple(names),
        fractions=tuple(fractions),
        variance=tuple(variance),
        second_moment=tuple(second),
        num_samples=tuple(int(n) for n in counts.tolist()),
    )
