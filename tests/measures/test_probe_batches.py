"""Per-sample non-tensor fields, dataclass / namedtuple batches and re-cutting a probe."""

from __future__ import annotations

import dataclasses
from collections import namedtuple
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_landscape.measures.probe import (
    Probe,
    batch_size_of,
    cat_batches,
    index_batch,
    move_batch,
    slice_batch,
)

SOURCE_SIZES = [3, 5, 2, 4, 6]  # uneven source batches: 20 rows


def _rows(sizes: list[int] = SOURCE_SIZES) -> list[torch.Tensor]:
    """Consecutive row indices, cut into ``sizes``."""
    return list(torch.arange(float(sum(sizes))).split(sizes))


def _source(make: Any) -> list[Any]:
    return [make(r) for r in _rows()]


def _ids(r: torch.Tensor) -> list[str]:
    return [str(int(v)) for v in r]


def _check_tuple_probe(probe: Probe, size: int) -> None:
    assert probe.num_samples == size
    for x, _y, ids in probe:
        assert ids == _ids(x)
    assert torch.equal(torch.cat([b[0] for b in probe]), torch.arange(float(size)))


def test_list_of_string_ids_follows_its_rows_through_capture():
    source = _source(lambda r: (r, r.long() % 3, _ids(r)))
    probe = Probe.capture(source, size=17, batch_size=5)
    assert probe.sizes == [5, 4, 4, 4]
    _check_tuple_probe(probe, 17)


def test_list_of_int_ids():
    source = _source(lambda r: (r, [int(v) * 10 for v in r]))
    probe = Probe.capture(source, size=20, batch_size=6)
    for x, ids in probe:
        assert ids == [int(v) * 10 for v in x]
    assert sum(len(b[1]) for b in probe) == 20


def test_default_collate_ids():
    class Rows(Dataset):
        def __len__(self) -> int:
            return 11

        def __getitem__(self, i: int) -> tuple[torch.Tensor, str, tuple[str, int]]:
            return torch.tensor([float(i)]), f"s{i}", (f"n{i}", i)

    loader = DataLoader(Rows(), batch_size=4)  # last batch has 3 samples
    probe = Probe.capture(loader, size=11, batch_size=2)
    assert probe.sizes == [2, 2, 2, 2, 2, 1]
    for x, ids, (names, numbers) in probe:
        rows = [int(v) for v in x[:, 0]]
        assert ids == tuple(f"s{i}" for i in rows)  # default collate makes tuples of str
        assert names == tuple(f"n{i}" for i in rows)  # and transposes the (name, i) pairs
        assert torch.equal(numbers, torch.tensor(rows))


def test_nested_dict_of_tensors_and_lists():
    def make(r: torch.Tensor) -> dict:
        return {
            "inputs": {"x": r[:, None], "mask": r > 3},
            "ids": _ids(r),
            "meta": [_ids(r), [f"n{s}" for s in _ids(r)]],  # transposed nested fields
            "tag": "train",
            "temperature": torch.tensor(2.0),  # 0-dim: shared
        }

    probe = Probe.capture(_source(make), size=14, batch_size=4)
    assert probe.sizes == [4, 4, 3, 3]
    for batch in probe:
        rows = [int(v) for v in batch["inputs"]["x"][:, 0]]
        assert batch["ids"] == [str(i) for i in rows]
        assert batch["meta"] == [[str(i) for i in rows], [f"n{i}" for i in rows]]
        assert torch.equal(batch["inputs"]["mask"], torch.tensor(rows) > 3)
        assert batch["tag"] == "train"
        assert float(batch["temperature"]) == 2.0


def test_meta_fields_with_a_two_sample_batch_are_walked_not_cut():
    x = torch.arange(2.0)
    batch = (x, [["a", "b"], ["c", "d"]])  # two per-sample fields, two samples
    assert slice_batch(batch, 1, 2)[1] == [["b"], ["d"]]


@dataclasses.dataclass
class Batch:
    x: torch.Tensor
    ids: list[str]
    tag: str = "t"
    count: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.count = len(self.ids)


@dataclasses.dataclass(frozen=True)
class FrozenBatch:
    x: torch.Tensor
    ids: tuple[int, ...]


@pytest.mark.parametrize("kind", ["dataclass", "frozen"])
def test_dataclass_batches(kind):
    if kind == "dataclass":
        source = _source(lambda r: Batch(r, _ids(r)))
    else:
        source = _source(lambda r: FrozenBatch(r, tuple(int(v) for v in r)))
    assert batch_size_of(source[1]) == 5
    probe = Probe.capture(source, size=13, batch_size=5)
    assert probe.sizes == [5, 4, 4]
    for b, n in probe.weighted():
        assert type(b) is type(source[0])
        if kind == "dataclass":
            assert b.ids == _ids(b.x) and b.count == n and b.tag == "t"
        else:
            assert b.ids == tuple(int(v) for v in b.x)
    assert torch.equal(torch.cat([b.x for b in probe]), torch.arange(13.0))


def test_move_batch_walks_dataclasses():
    b = move_batch(Batch(torch.arange(3.0), ["0", "1", "2"]), dtype=torch.float64)
    assert b.x.dtype == torch.float64 and b.ids == ["0", "1", "2"]


Pair = namedtuple("Pair", ["x", "ids"])


def test_namedtuple_batches():
    probe = Probe.capture(_source(lambda r: Pair(r, _ids(r))), size=20, batch_size=7)
    assert probe.sizes == [7, 7, 6]
    for b in probe:
        assert isinstance(b, Pair) and b.ids == _ids(b.x)


def test_index_and_cat_cut_per_sample_fields():
    x = torch.arange(6.0)
    batch = {"x": x, "ids": tuple(_ids(x)), "names": ["a", "b"]}  # names: shared (length 2)
    picked = index_batch(batch, torch.tensor([4, 0, 5]))
    assert picked["ids"] == ("4", "0", "5") and picked["names"] == ["a", "b"]
    joined = cat_batches([slice_batch(batch, 0, 1), slice_batch(batch, 1, 4), batch])
    assert joined["ids"] == tuple(_ids(x)[:4] + _ids(x))
    assert torch.equal(joined["x"], torch.cat([x[:4], x]))
    assert joined["names"] == ["a", "b"]


def test_structural_lists_of_tensors_are_never_cut_as_samples():
    x, y = torch.arange(2.0), torch.arange(2) + 10  # a list [x, y] of length == batch size
    part = slice_batch([x, y], 1, 2)
    assert len(part) == 2 and torch.equal(part[0], x[1:]) and torch.equal(part[1], y[1:])
    joined = cat_batches([[x, y], [x, y]])
    assert len(joined) == 2 and joined[0].shape == (4,)


def test_cat_rejects_empty_and_mismatched_batches():
    with pytest.raises(ValueError, match="`batches`"):
        cat_batches([])
    with pytest.raises(ValueError, match="'y'"):
        cat_batches([{"x": torch.ones(2), "y": torch.ones(2)}, {"x": torch.ones(2)}])
    with pytest.raises(ValueError, match="structure"):
        cat_batches([(torch.ones(2), torch.ones(2)), (torch.ones(2),)])


def test_rebatched_keeps_samples_and_order_in_smaller_batches():
    source = _source(lambda r: (r, r.long(), _ids(r)))
    probe = Probe.capture(source, size=19, batch_size=7)
    assert probe.sizes == [7, 6, 6]
    half = probe.rebatched(-(-max(probe.sizes) // 2))
    assert half.sizes == [4, 3, 3, 3, 3, 3]
    assert half.num_samples == probe.num_samples
    _check_tuple_probe(half, 19)
    assert half.batches[1][0].untyped_storage().data_ptr() == (
        probe.batches[0][0].untyped_storage().data_ptr()
    )  # views, not copies
    assert probe.rebatched(100).batches == probe.batches
    assert probe.rebatched(1).sizes == [1] * 19


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, None])
def test_rebatched_rejects_bad_sizes(bad):
    probe = Probe.from_samples(torch.ones(4, 1), batch_size=2)
    with pytest.raises(ValueError, match=f"`batch_size` must be a positive integer, got {bad!r}"):
        probe.rebatched(bad)


def test_from_samples_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="`batch_size`"):
        Probe.from_samples(torch.ones(4, 1), batch_size=0)
