"""A fixed probe set: the samples every measurement is computed on.

Measuring on the current mini-batch makes successive points incomparable (each batch has its
own curvature). A :class:`Probe` holds a fixed set of training samples, captured once, re-cut
into batches of (nearly) equal size and kept on the model's device. Every average over a probe
is weighted by the number of samples in each batch, never by the number of batches.

Under data parallelism each rank captures its own shard (``probe_size / world_size`` samples);
a measurement then reduces *sums* over ranks and divides by the global sample count, so the
result equals one process on the union of all shards, also when the shards are unequal.

**Batch structure.** A batch is a tensor or any nesting of dicts (mappings), lists, tuples,
namedtuples and dataclass instances. Its size ``n`` is the leading dimension of its first
tensor with a dimension (:func:`batch_size_of`). Slicing, indexing and concatenation walk the
structure and cut, at every node:

- a tensor with a dimension: along its first dimension (a 0-dim tensor is shared, kept whole);
- a **per-sample field**: a list or plain tuple (not a namedtuple) of exactly ``n`` entries,
  none of which holds a tensor at any depth: the tuple of ``str`` ids a default collate
  makes, a custom collate's list of ``int`` ids or of per-sample dicts. It is cut entry by
  entry and keeps its type. One exception: when *every* entry is itself a list or tuple of
  ``n`` entries, the node is read as default collate's transposition of nested fields
  (``[ids, names]``) and walked instead;
- every other list, tuple, namedtuple, mapping or dataclass is *structural* and walked, so a
  list that holds a tensor anywhere (``[x, y]``, ``(x, {"mask": m})``) is never cut as samples;
- anything else (``str``, numbers, ``None``, other objects) is shared and kept as it is.

The rule reads shapes, so it can guess wrong: a shared list whose length happens to equal the
batch size (class names, say) is cut as samples; a per-sample list of ``n``-long entries (pairs
in a batch of two) is taken for transposed fields; a ragged list of per-sample *tensors* is
structural. Dataclasses are rebuilt with :func:`dataclasses.replace`: ``__post_init__`` runs
again and ``init=False`` fields are computed again (one it leaves unset gets the cut value).
Mappings and sequences keep their type where its constructor takes the new items, and become
a plain ``dict``, ``list`` or ``tuple`` otherwise.

Example::

    >>> import torch
    >>> data = [(torch.randn(3, 2), torch.arange(3)) for _ in range(4)]
    >>> probe = Probe.capture(data, size=10, batch_size=4)
    >>> probe.sizes
    [4, 3, 3]
    >>> probe.num_samples
    10
    >>> rows = (torch.arange(5.0), ["a", "b", "c", "d", "e"])  # a per-sample list of ids
    >>> [b[1] for b in Probe.from_samples(rows, batch_size=3)]
    [['a', 'b', 'c'], ['d', 'e']]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_landscape.checks import check_int

__all__ = [
    "Probe",
    "batch_size_of",
    "batch_tensors",
    "cat_batches",
    "index_batch",
    "move_batch",
    "slice_batch",
]


def _is_namedtuple(obj: object) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


def _is_dataclass_instance(obj: object) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _init_fields(obj: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(obj) if f.init]


def _children(obj: Any) -> Iterable[Any]:
    """The values a structural node holds (empty for a leaf)."""
    if isinstance(obj, Mapping):
        return obj.values()
    if isinstance(obj, (list, tuple)):
        return obj
    if _is_dataclass_instance(obj):
        return [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    return ()


def _has_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    return any(_has_tensor(child) for child in _children(obj))


def _is_per_sample(obj: Any, n: int | None) -> bool:
    """Whether ``obj`` is a per-sample field of a batch of ``n`` samples (see the module doc)."""
    if n is None or not isinstance(obj, (list, tuple)) or _is_namedtuple(obj) or len(obj) != n:
        return False
    if _has_tensor(obj):
        return False
    transposed = all(
        isinstance(e, (list, tuple)) and not _is_namedtuple(e) and len(e) == n for e in obj
    )
    return not transposed


def _remake(like: Any, items: Any) -> Any:
    """A container of ``like``'s type holding ``items`` (a plain one if the type refuses)."""
    try:
        return type(like)(items)
    except Exception:  # noqa: BLE001 - a subclass with another constructor
        if isinstance(like, Mapping):
            return dict(items)
        return list(items) if isinstance(like, list) else tuple(items)


def _assemble(like: Any, values: list[Any]) -> Any:
    """A node like ``like`` whose children (in :func:`_children` order) are ``values``."""
    if isinstance(like, Mapping):
        new = dict(zip(like.keys(), values))
        return new if type(like) is dict else _remake(like, new)
    if _is_namedtuple(like):
        return type(like)(*values)
    if isinstance(like, (list, tuple)):
        return _remake(like, values)
    if _is_dataclass_instance(like):
        new = dict(zip([f.name for f in dataclasses.fields(like)], values))
        out = dataclasses.replace(like, **{k: new[k] for k in _init_fields(like)})
        for name in new.keys() - set(_init_fields(like)):
            if not hasattr(out, name):  # an init=False field neither defaulted nor computed
                object.__setattr__(out, name, new[name])
        return out
    return like


def _rebuild(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """``obj`` with ``fn`` applied to each child (``obj`` itself if it is a leaf)."""
    children = list(_children(obj))
    return _assemble(obj, [fn(c) for c in children]) if children else obj


def _size_or_none(batch: Any) -> int | None:
    try:
        return batch_size_of(batch)
    except (TypeError, ValueError):
        return None


def _map(
    batch: Any, n: int | None, on_tensor: Callable[[torch.Tensor], Any], on_samples: Callable
) -> Any:
    if isinstance(batch, torch.Tensor):
        return on_tensor(batch) if batch.dim() > 0 else batch
    if _is_per_sample(batch, n):
        return on_samples(batch)
    return _rebuild(batch, lambda child: _map(child, n, on_tensor, on_samples))


def batch_size_of(batch: Any) -> int:
    """Number of samples in a batch: the leading dimension of its first tensor.

    0-dim tensors inside a structure are skipped; a batch that *is* a 0-dim tensor raises
    ``ValueError``, one without any tensor ``TypeError``.
    """
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            raise ValueError("a batch tensor must have a leading sample dimension, got a scalar")
        return int(batch.shape[0])
    for value in _children(batch):
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            continue
        try:
            return batch_size_of(value)
        except TypeError:
            continue
    raise TypeError(
        f"cannot find a tensor with a sample dimension in batch of type {type(batch).__name__}"
    )


def batch_tensors(batch: Any) -> list[torch.Tensor]:
    """Every tensor of a batch, depth first."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    return [t for child in _children(batch) for t in batch_tensors(child)]


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a batch: its tensors and its per-sample fields."""
    return _map(
        batch, _size_or_none(batch), lambda t: t[start:stop], lambda s: _remake(s, s[start:stop])
    )


def index_batch(batch: Any, index: torch.Tensor) -> Any:
    """Samples ``index`` (a 1-D index tensor) of a batch."""
    return _map(
        batch,
        _size_or_none(batch),
        lambda t: t[index.to(t.device)],
        lambda s: _remake(s, [s[int(i)] for i in index.tolist()]),
    )


def _cat(batches: Sequence[Any], sizes: Sequence[int | None]) -> Any:
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(batches), dim=0) if first.dim() > 0 else first
    if all(_is_per_sample(b, n) for b, n in zip(batches, sizes)):
        return _remake(first, [item for b in batches for item in b])
    if isinstance(first, Mapping):
        missing = [k for b in batches for k in first if k not in b]
        if missing:
            raise ValueError(f"batches differ in structure: key {missing[0]!r} is missing")
        columns = [[b[k] for k in first] for b in batches]
    else:
        columns = [list(_children(b)) for b in batches]
    if not columns[0]:
        return first
    if any(len(c) != len(columns[0]) for c in columns):
        if any(_has_tensor(b) for b in batches):
            raise ValueError(
                f"batches differ in structure: {type(first).__name__} of lengths "
                f"{sorted({len(c) for c in columns})}"
            )
        return first
    return _assemble(first, [_cat([c[i] for c in columns], sizes) for i in range(len(columns[0]))])


def cat_batches(batches: Sequence[Any]) -> Any:
    """Concatenate batches of the same structure along the sample dimension.

    Tensors and per-sample fields are joined; shared leaves come from the first batch.

    Raises:
        ValueError: if ``batches`` is empty or the batches hold tensors in different structures.
    """
    if len(batches) == 0:
        raise ValueError("`batches` must hold at least one batch, got an empty sequence")
    return _cat(batches, [_size_or_none(b) for b in batches])


def move_batch(
    batch: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Any:
    """Move every tensor of a batch to ``device``; floating tensors are also cast to ``dtype``.

    Tensors are cloned into ordinary (non-inference) tensors so they can enter autograd later.
    """

    def move(t: torch.Tensor) -> torch.Tensor:
        cast = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        with torch.inference_mode(False):
            return t.to(device=device, dtype=cast).clone()

    if isinstance(batch, torch.Tensor):
        return move(batch)
    return _rebuild(batch, lambda child: move_batch(child, device, dtype))


def _cuts(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` consecutive ranges covering ``0:n`` whose lengths differ by at most one."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


@dataclass
class Probe:
    """A fixed set of samples held in equal-size batches.

    Attributes:
        batches: the batches, each with the structure the model's loss expects.
        sizes: number of samples in each batch.
    """

    batches: list[Any]
    sizes: list[int]

    @property
    def num_samples(self) -> int:
        """Samples held by this process (its shard under DDP)."""
        return sum(self.sizes)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)

    def weighted(self) -> Iterator[tuple[Any, int]]:
        """Yield ``(batch, num_samples)`` pairs."""
        return zip(self.batches, self.sizes)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Probe:
        """A copy on ``device`` with floating tensors cast to ``dtype``."""
        return Probe([move_batch(b, device, dtype) for b in self.batches], list(self.sizes))

    def rebatched(self, batch_size: int) -> Probe:
        """The same samples, in the same order, in batches of at most ``batch_size``.

        Each batch is split on its own into ``ceil(n_b / batch_size)`` pieces whose sizes
        differ by at most one; the pieces are slices, so their tensors are views (no copy) and
        a new batch never mixes samples of two old ones. Halving the batches after an
        out-of-memory error: ``probe.rebatched(-(-max(probe.sizes) // 2))``.

        Raises:
            ValueError: if ``batch_size`` is not a positive integer.
        """
        check_int("batch_size", batch_size)
        batches: list[Any] = []
        sizes: list[int] = []
        for batch, n in self.weighted():
            parts = -(-n // batch_size)
            if parts == 1:
                batches.append(batch)
                sizes.append(n)
                continue
            for start, stop in _cuts(n, parts):
                batches.append(slice_batch(batch, start, stop))
                sizes.append(stop - start)
        return Probe(batches, sizes)

    @classmethod
    def capture(
        cls,
        source: Iterable[Any],
        *,
        size: int,
        batch_size: int = 256,
        device: torch.device | str | None = None,
    ) -> Probe:
        """Take the first ``size`` samples of ``source`` and re-cut them into equal batches.

        Args:
            source: an iterable of batches (a DataLoader, a list of batches, ...).
            size: number of samples to keep (this process's share). If the source holds fewer,
                all of them are kept.
            batch_size: largest batch of the probe; the samples are split into
                ``ceil(size / batch_size)`` batches whose sizes differ by at most one.
            device: where to keep the probe (the model's device).

        Raises:
            ValueError: if ``size`` or ``batch_size`` is not a positive integer, or the source
                yields no samples.
        """
        check_int("size", size)
        check_int("batch_size", batch_size)
        pieces: list[Any] = []
        taken = 0
        for batch in source:
            n = batch_size_of(batch)
            keep = min(n, size - taken)
            pieces.append(move_batch(slice_batch(batch, 0, keep), device))
            taken += keep
            if taken >= size:
                break
        if taken == 0:
            raise ValueError("the probe source yielded no samples")
        return cls.from_samples(
            cat_batches(pieces) if len(pieces) > 1 else pieces[0], batch_size=batch_size
        )

    @classmethod
    def from_samples(cls, samples: Any, *, batch_size: int = 256) -> Probe:
        """Split one batch holding all samples into ``ceil(n / batch_size)`` near-equal batches."""
        check_int("batch_size", batch_size)
        n = batch_size_of(samples)
        cuts = _cuts(n, -(-n // batch_size))
        return cls([slice_batch(samples, a, b) for a, b in cuts], [b - a for a, b in cuts])
