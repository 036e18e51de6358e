"""Pins the hessian-eigenthings API the suite relies on (see measures/_compat.py)."""

import inspect

import torch

from lightning_landscape.measures import _compat


def params(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def test_version_is_a_supported_alpha():
    assert _compat.HESSIAN_EIGENTHINGS_VERSION.startswith("1.0.0a")


def test_signatures_we_call():
    assert {"model", "param_filter"} <= params(_compat.select_parameters)
    assert {"num_matvecs", "seed"} <= params(_compat.hutch_plus_plus)
    assert {"num_runs", "lanczos_steps", "num_grid_points", "grid_padding", "seed"} <= params(
        _compat.spectral_density
    )
    assert {"matvec_fn", "size", "dtype"} <= params(_compat.LambdaOperator.__init__)


def test_operator_interface_we_implement():
    # ProbeHessian implements exactly the abstract public members of CurvatureOperator
    abstract = set(_compat.CurvatureOperator.__abstractmethods__)
    assert abstract == {"size", "device", "dtype", "matvec"}


def test_probe_hessian_is_a_curvature_operator_on_public_members_only():
    from lightning_landscape.measures.operators import ProbeHessian
    from lightning_landscape.measures.probe import Probe

    assert ProbeHessian.__mro__[1] is _compat.CurvatureOperator  # no library operator in between
    net = torch.nn.Linear(3, 1).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    probe = Probe.from_samples((x, torch.zeros(5, 1, dtype=torch.float64)), batch_size=2)
    op = ProbeHessian(net, probe, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    assert isinstance(op, _compat.CurvatureOperator)
    assert (op.size, op.device, op.dtype) == (4, torch.device("cpu"), torch.float64)
    v = torch.ones(4, dtype=torch.float64)
    assert torch.equal(op(v), op.matvec(v)) and torch.equal(op @ v, op.rmatvec(v))


def test_curvature_operator_protocol():
    op = _compat.LambdaOperator(lambda v: 2 * v, size=3, dtype=torch.float64)
    assert isinstance(op, _compat.CurvatureOperator)
    assert torch.equal(
        op.matvec(torch.ones(3, dtype=torch.float64)), torch.full((3,), 2.0, dtype=torch.float64)
    )
