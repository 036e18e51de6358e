import random

import numpy as np
import pytest
import torch
from torch import nn

from lightning_landscape.measures.guard import guard


def model_with_state() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2)
    )
    net.train()
    net(torch.randn(16, 4)).sum().backward()  # non-trivial buffers and grads
    return net


def snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in net.state_dict().items()}
    out.update({f"{n}.grad": p.grad.clone() for n, p in net.named_parameters()})
    return out


@pytest.mark.parametrize("bn", ["eval", "batch"])
def test_everything_observable_is_restored(bn):
    net = model_with_state()
    net[4].weight.requires_grad_(False)
    net[2].eval()  # an odd mode that must be kept
    before = snapshot(net)
    grad_objects = [p.grad for p in net.parameters()]
    torch.manual_seed(123)
    np.random.seed(1)
    random.seed(2)
    expected = (torch.rand(3), np.random.rand(), random.random())
    torch.manual_seed(123)
    np.random.seed(1)
    random.seed(2)
    with guard(net, bn=bn, seed=7):
        assert not net[3].training  # dropout off
        assert net[1].training == (bn == "batch")
        for p in net.parameters():
            p.requires_grad_(True)
        loss = net(torch.randn(16, 4)).pow(2).mean()
        loss.backward()  # even a stray backward into .grad is undone
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(3.0).add_(0.1)
        torch.rand(100)
        np.random.rand(10)
        random.random()
    after = snapshot(net)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert [p.grad for p in net.parameters()] == grad_objects
    assert not net[4].weight.requires_grad
    assert net.training and net[1].training and not net[2].training and net[3].training
    got = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_batch_mode_uses_batch_statistics():
    net = model_with_state()
    x = torch.randn(16, 4) * 5 + 3
    with guard(net, bn="batch"):
        h = net[1](net[0](x))
    assert h.mean(0).abs().max() < 1e-5  # normalised by this batch's own statistics


def test_dropout_can_stay_on():
    net = model_with_state()
    with guard(net, dropout=True):
        assert net[3].training


def test_gradients_enabled_inside_inference_mode():
    net = nn.Linear(2, 1)
    with torch.inference_mode(), guard(net):
        x = torch.randn(3, 2)
        (g,) = torch.autograd.grad(net(x).sum(), [net.bias])
    assert g.item() == 3.0


def test_restores_on_exception():
    net = model_with_state()
    before = snapshot(net)
    with pytest.raises(RuntimeError), guard(net):
        with torch.no_grad():
            net[0].weight.zero_()
        raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in snapshot(net).items())


def test_bad_bn_mode():
    with pytest.raises(ValueError, match="`bn`"), guard(nn.Linear(1, 1), bn="train"):  # type: ignore[arg-type]
        pass


def _bn_pair(momentum: float | None) -> tuple[nn.Module, nn.Module]:
    """The same network with ``nn.BatchNorm1d`` and with ``nn.SyncBatchNorm``."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=momentum), nn.Linear(6, 2))
    synced = nn.Sequential(nn.Linear(4, 6), nn.SyncBatchNorm(6, momentum=momentum), nn.Linear(6, 2))
    plain.train()(torch.randn(8, 4) * 2 + 1)  # non-trivial running statistics
    synced.load_state_dict(plain.state_dict())
    return plain.double(), synced.double()


def _outputs(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    out = net(x)
    (g,) = torch.autograd.grad(out.square().sum(), [net[1].weight], create_graph=True)
    (hv,) = torch.autograd.grad(g.sum(), [net[1].weight])  # SyncBatchNorm has no double backward
    return out, g, hv, net[1].running_mean.clone(), net[1].num_batches_tracked.clone()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sync_batchnorm_in_batch_mode_computes_like_batchnorm(momentum):
    plain, synced = _bn_pair(momentum)
    before = {k: v.clone() for k, v in synced.state_dict().items()}
    x = torch.randn(10, 4, dtype=torch.float64)
    with guard(plain, bn="batch"):
        want = [_outputs(plain, x) for _ in range(2)]
    with guard(synced, bn="batch"):
        got = [_outputs(synced, x) for _ in range(2)]
    for w, g in zip(want, got):
        assert all(torch.equal(a, b) for a, b in zip(w, g))  # bit-identical, buffers included
    assert "forward" not in vars(synced[1])  # the local forward is removed on exit
    assert all(torch.equal(before[k], v) for k, v in synced.state_dict().items())
    with pytest.raises(ValueError, match="at least 2D"), guard(synced, bn="batch"):
        synced[1](torch.randn(3, dtype=torch.float64))


def test_sync_batchnorm_in_batch_mode_does_not_synchronise(tmp_path):
    # in a process group a training SyncBatchNorm would synchronise (and refuses CPU input);
    # under the guard it normalises with this rank's batch only
    import torch.distributed as dist

    plain, synced = _bn_pair(0.1)
    x = torch.randn(10, 4, dtype=torch.float64)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        with pytest.raises(ValueError, match="GPU"):
            synced.train()(x)
        synced.load_state_dict(plain.state_dict())
        with guard(plain, bn="batch"):
            want = _outputs(plain, x)
        with guard(synced, bn="batch"):
            got = _outputs(synced, x)
    finally:
        dist.destroy_process_group()
    assert all(torch.equal(a, b) for a, b in zip(want, got))
