"""The public module tuples match what torch's private base classes used to cover.

``guard.BATCHNORM_TYPES`` and ``variance.CHANNELS_FIRST_TYPES`` name torch's public classes
only (the package never touches a private name of a dependency, see
``tests/test_private_api.py``). This test looks at the private bases they replaced (tests may;
the package may not): every public class torch derives from them must be covered, so a new
torch layer that the old ``isinstance`` check would have caught fails here, not silently.
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
from torch import nn

from lightning_landscape.measures.guard import BATCHNORM_TYPES
from lightning_landscape.measures.variance import CHANNELS_FIRST_TYPES

# the modules that define layers on torch's bases (imported so their subclasses register)
LAYER_MODULES = [
    "torch.ao.nn.qat",
    "torch.ao.nn.quantized",
    "torch.ao.nn.quantized.reference",
    "torch.ao.nn.intrinsic",
    "torch.ao.nn.intrinsic.qat",
    "torch.ao.nn.intrinsic.quantized",
]


def _private_base(path: str) -> type:
    module, _, name = path.rpartition(".")
    base = getattr(importlib.import_module(module), name, None)
    if base is None:
        pytest.skip(f"torch {torch.__version__} has no {path}")
    return base


def _public_subclasses(base: type) -> set[type]:
    for name in LAYER_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    out: set[type] = set()
    todo = [base]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            public = sub.__module__.startswith("torch.") and not sub.__name__.startswith("_")
            if public and sub not in out:
                out.add(sub)
    return out


BATCHNORM_BASES = ["torch.nn.modules.batchnorm._BatchNorm"]
CHANNELS_FIRST_BASES = [
    "torch.nn.modules.conv._ConvNd",
    "torch.nn.modules.batchnorm._BatchNorm",
    "torch.nn.modules.instancenorm._InstanceNorm",
    "torch.nn.modules.pooling._MaxPoolNd",
    "torch.nn.modules.pooling._AvgPoolNd",
    "torch.nn.modules.pooling._AdaptiveAvgPoolNd",
    "torch.nn.modules.pooling._AdaptiveMaxPoolNd",
]


@pytest.mark.parametrize(
    ("covered", "bases"),
    [(BATCHNORM_TYPES, BATCHNORM_BASES), (CHANNELS_FIRST_TYPES, CHANNELS_FIRST_BASES)],
    ids=["BATCHNORM_TYPES", "CHANNELS_FIRST_TYPES"],
)
def test_every_public_torch_subclass_of_the_old_bases_is_covered(covered, bases) -> None:
    for path in bases:
        base = _private_base(path)
        missing = [
            f"{c.__module__}.{c.__qualname__}"
            for c in _public_subclasses(base)
            if not issubclass(c, covered)
        ]
        assert not missing, f"subclasses of {path} not covered: {missing}"


@pytest.mark.parametrize(
    ("covered", "bases"),
    [(BATCHNORM_TYPES, BATCHNORM_BASES), (CHANNELS_FIRST_TYPES, CHANNELS_FIRST_BASES)],
    ids=["BATCHNORM_TYPES", "CHANNELS_FIRST_TYPES"],
)
def test_nothing_beyond_the_old_bases_is_covered(covered, bases) -> None:
    old = tuple(_private_base(path) for path in bases)
    extra = (nn.GroupNorm,) if covered is CHANNELS_FIRST_TYPES else ()
    assert all(issubclass(c, old + extra) for c in covered)


def test_lazy_batchnorm_is_covered_before_and_after_it_materialises() -> None:
    lazy = nn.LazyBatchNorm1d()
    assert isinstance(lazy, BATCHNORM_TYPES)
    lazy(torch.randn(4, 3))
    assert type(lazy) is nn.BatchNorm1d and isinstance(lazy, BATCHNORM_TYPES)
