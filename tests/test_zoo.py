"""Tests for the recipe zoo: datamodules, networks and LightningModules."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from sklearn.datasets import load_digits
from torch import nn

from lightning_landscape.zoo import (
    MLP,
    Autoencoder,
    Classifier,
    DigitsDataModule,
    DigitsReconstructionDataModule,
    Reconstruction,
    Regressor,
    SmallCNN,
    TeacherStudentDataModule,
)


def _digits(**kwargs: object) -> DigitsDataModule:
    dm = DigitsDataModule(**kwargs)  # type: ignore[arg-type]
    dm.setup("fit")
    return dm


# --------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_scaling() -> None:
    dm = _digits()
    x, y = dm.train_set.tensors
    assert x.shape == (1438, 64) and x.dtype == torch.float32
    assert y.shape == (1438,) and y.dtype == torch.int64
    assert len(dm.val_set) == 359
    images, labels = load_digits(return_X_y=True)
    expected = torch.as_tensor(images[dm.train_indices.numpy()], dtype=torch.float32) / 16.0
    assert torch.equal(x, expected)
    assert torch.equal(y, torch.as_tensor(labels[dm.train_indices.numpy()]))
    full = torch.cat([x, dm.val_set.tensors[0]])
    assert full.min().item() == 0.0 and full.max().item() == 1.0


def test_digits_unflattened_for_cnn() -> None:
    flat, img = _digits(), _digits(flatten=False)
    assert img.train_set.tensors[0].shape == (1438, 1, 8, 8)
    assert img.input_shape == (1, 8, 8) and flat.input_shape == (64,)
    assert torch.equal(img.train_set.tensors[0].reshape(-1, 64), flat.train_set.tensors[0])


def test_digits_split_is_a_seeded_partition() -> None:
    a, b, c = _digits(seed=3), _digits(seed=3), _digits(seed=4)
    assert torch.equal(a.train_indices, b.train_indices)
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    assert not torch.equal(a.train_indices, c.train_indices)
    both = torch.cat([a.train_indices, a.val_indices])
    assert torch.equal(both.sort().values, torch.arange(1797))


def test_digits_num_train_is_a_prefix_of_the_split() -> None:
    full, sub = _digits(seed=1), _digits(seed=1, num_train=100)
    assert len(sub.train_set) == 100
    assert torch.equal(sub.train_indices, full.train_indices[:100])
    assert torch.equal(sub.val_indices, full.val_indices)


def test_digits_full_batch_is_one_fixed_batch() -> None:
    dm = _digits(num_train=300, full_batch=True, batch_size=7)
    first = list(dm.train_dataloader())
    second = list(dm.train_dataloader())
    assert len(first) == 1
    x, y = first[0]
    assert torch.equal(x, dm.train_set.tensors[0]) and torch.equal(y, dm.train_set.tensors[1])
    assert torch.equal(second[0][0], x)
    assert len(list(dm.val_dataloader())) == 1


@pytest.mark.parametrize("rank", [0, 1])
def test_digits_full_batch_under_ddp_is_a_fixed_shard(
    rank: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each rank gets its own fixed, unshuffled half (Lightning would reshuffle every step)."""
    dm = _digits(num_train=101, full_batch=True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
    assert loader.sampler.shuffle is False
    batches = [b for _ in range(2) for b in loader]
    assert len(batches) == 2 and torch.equal(batches[0][0], batches[1][0])
    # DistributedSampler pads 101 -> 102 by repeating sample 0 and deals round-robin.
    indices = list(range(101)) + [0]
    expected = dm.train_set.tensors[0][indices[rank::2]]
    assert torch.equal(batches[0][0], expected)


def test_digits_minibatches_are_shuffled_and_cover_the_set() -> None:
    dm = _digits(num_train=100, batch_size=32)
    torch.manual_seed(0)
    epoch1 = list(dm.train_dataloader())
    epoch2 = list(dm.train_dataloader())
    assert [len(b[1]) for b in epoch1] == [32, 32, 32, 4]
    xs1 = torch.cat([b[0] for b in epoch1])
    xs2 = torch.cat([b[0] for b in epoch2])
    assert not torch.equal(xs1, dm.train_set.tensors[0])
    assert not torch.equal(xs1, xs2)
    key = torch.arange(64, dtype=torch.float32)
    assert torch.equal((xs1 @ key).sort().values, (dm.train_set.tensors[0] @ key).sort().values)


def test_digits_one_hot_targets() -> None:
    plain, onehot = _digits(seed=2), _digits(seed=2, one_hot=True)
    y = onehot.train_set.tensors[1]
    assert y.shape == (1438, 10) and y.dtype == torch.float32
    assert torch.equal(y.sum(dim=1), torch.ones(1438))
    assert torch.equal(y.argmax(dim=1), plain.train_set.tensors[1])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"num_train": 1439}, "num_train"),
        ({"num_train": 0}, "num_train"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_digits_rejects_bad_arguments(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        DigitsDataModule(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- teacher-student


def test_teacher_student_shapes_and_exact_targets() -> None:
    dm = TeacherStudentDataModule(
        num_train=64, num_val=16, input_dim=5, teacher_width=7, output_dim=3
    )
    dm.setup()
    x, y = dm.train_set.tensors
    assert x.shape == (64, 5) and y.shape == (64, 3) and len(dm.val_set) == 16
    assert torch.equal(y, dm.teacher(x))
    assert dm.teacher.layers[0].weight.shape == (7, 5)
    assert isinstance(dm.teacher.layers[1], nn.Tanh)


def test_teacher_student_is_deterministic_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a = TeacherStudentDataModule(seed=5, num_train=32, num_val=8)
    b = TeacherStudentDataModule(seed=5, num_train=32, num_val=8)
    c = TeacherStudentDataModule(seed=6, num_train=32, num_val=8)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    assert torch.equal(a.val_set.tensors[1], b.val_set.tensors[1])
    assert not torch.equal(a.train_set.tensors[0], c.train_set.tensors[0])


def test_teacher_student_noise_level() -> None:
    dm = TeacherStudentDataModule(num_train=8192, num_val=1, noise=0.5, seed=0)
    dm.setup()
    x, y = dm.train_set.tensors
    residual = y - dm.teacher(x)
    # 8192 Gaussian draws: the sample std is within 3% of 0.5 (about 4 standard errors).
    assert abs(residual.std().item() - 0.5) < 0.015
    assert y.std().item() > 0.5  # the teacher's signal adds to the noise


def test_teacher_student_full_batch_and_errors() -> None:
    dm = TeacherStudentDataModule(num_train=40, num_val=10, full_batch=True)
    dm.setup()
    batches = list(dm.train_dataloader())
    assert len(batches) == 1 and torch.equal(batches[0][0], dm.train_set.tensors[0])
    with pytest.raises(ValueError, match="noise"):
        TeacherStudentDataModule(noise=-1.0)
    with pytest.raises(ValueError, match="teacher_width"):
        TeacherStudentDataModule(teacher_width=0)


# --------------------------------------------------------------------------- networks


def _types(module: nn.Module) -> list[type[nn.Module]]:
    return [type(m) for m in module.modules()]


def test_mlp_depth_and_width() -> None:
    net = MLP(64, 10, depth=3, width=7)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(7, 64), (7, 7), (7, 7), (10, 7)]
    assert _types(net).count(nn.ReLU) == 3
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    linear_model = MLP(3, 2, depth=0)
    assert [type(m) for m in linear_model.layers] == [nn.Linear]


@pytest.mark.parametrize(
    ("activation", "kind"),
    [("relu", nn.ReLU), ("tanh", nn.Tanh), ("gelu", nn.GELU), ("linear", nn.Identity)],
)
def test_mlp_activation(activation: str, kind: type[nn.Module]) -> None:
    net = MLP(4, 2, depth=2, width=3, activation=activation)  # type: ignore[arg-type]
    assert _types(net).count(kind) == 2


def test_mlp_batchnorm_dropout_bias() -> None:
    net = MLP(4, 2, depth=2, width=5, batchnorm=True, dropout=0.3, bias=False)
    assert [type(m) for m in net.layers] == [
        nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout,
        nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout,
        nn.Linear,
    ]  # fmt: skip
    assert all(m.p == 0.3 for m in net.modules() if isinstance(m, nn.Dropout))
    assert all(m.bias is None for m in net.modules() if isinstance(m, nn.Linear))
    assert nn.BatchNorm1d not in _types(MLP(4, 2)) and nn.Dropout not in _types(MLP(4, 2))


@pytest.mark.parametrize(("init", "gain"), [("he", 2.0), ("xavier", None)])
def test_mlp_init_scales(init: str, gain: float | None) -> None:
    torch.manual_seed(0)
    net = MLP(400, 300, depth=1, width=500, init=init)  # type: ignore[arg-type]
    first, last = net.layers[0], net.layers[-1]
    assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
    for layer in (first, last):
        fan_in, fan_out = layer.in_features, layer.out_features
        var = gain / fan_in if gain is not None else 2.0 / (fan_in + fan_out)
        # >= 120k Gaussian draws: the sample std is within 2% of the target.
        assert layer.weight.std().item() == pytest.approx(math.sqrt(var), rel=0.02)
        assert torch.count_nonzero(layer.bias) == 0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"depth": -1}, "depth"),
        ({"width": 0}, "width"),
        ({"activation": "sigmoid"}, "activation"),
        ({"dropout": 1.0}, "dropout"),
        ({"init": "orthogonal"}, "init"),
    ],
)
def test_mlp_rejects_bad_arguments(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        MLP(4, 2, **kwargs)  # type: ignore[arg-type]


def test_small_cnn_forward_and_structure() -> None:
    net = SmallCNN()
    assert net(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    assert [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)] == [16, 32]
    deep = SmallCNN(channels=(4, 8, 8), batchnorm=True, dropout=0.2, num_classes=3)
    assert deep(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert _types(deep).count(nn.BatchNorm2d) == 3 and _types(deep).count(nn.Dropout) == 1
    head = deep.head[-1]
    assert isinstance(head, nn.Linear) and head.in_features == 8
    with pytest.raises(ValueError, match="input_size"):
        SmallCNN(channels=(4, 4, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        SmallCNN(channels=())


# --------------------------------------------------------------------------- modules


def _batch(n: int = 6, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def test_classifier_losses_match_functional_references() -> None:
    torch.manual_seed(0)
    x, y = _batch()
    onehot = F.one_hot(y, 4).float()
    net = MLP(5, 4, width=8)
    ce, mse = Classifier(net, loss="cross_entropy"), Classifier(net, loss="mse")
    out = net(x)
    assert torch.equal(ce.landscape_loss((x, y)), F.cross_entropy(out, y))
    assert torch.equal(mse.landscape_loss((x, y)), ((out - onehot) ** 2).mean())
    # one-hot float targets give the same losses as class indices
    assert torch.allclose(ce.landscape_loss((x, onehot)), F.cross_entropy(out, y), atol=1e-6)
    assert torch.equal(mse.landscape_loss((x, onehot)), mse.landscape_loss((x, y)))


def test_training_step_returns_the_landscape_loss() -> None:
    torch.manual_seed(0)
    x, y = _batch()
    for module in (Classifier(MLP(5, 4), loss="mse"), Regressor(MLP(5, 1))):
        batch = (x, y) if isinstance(module, Classifier) else (x, torch.randn(6, 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log outside a Trainer warns
            loss = module.training_step(batch, 0)
        assert torch.equal(loss, module.landscape_loss(batch))


def test_regressor_loss_and_shape_check() -> None:
    net = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    assert torch.equal(Regressor(net).landscape_loss((x, y)), F.mse_loss(net(x), y))
    with pytest.raises(ValueError, match="do not match"):
        Regressor(net).landscape_loss((x, torch.randn(4)))


def test_default_optimizer_is_sgd_with_the_modules_hyperparameters() -> None:
    opt = Classifier(nn.Linear(2, 2), lr=0.3, momentum=0.5).configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["lr"] == 0.3 and opt.param_groups[0]["momentum"] == 0.5


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"lr": 0.0}, "lr"), ({"momentum": 1.0}, "momentum"), ({"loss": "hinge"}, "loss")],
)
def test_classifier_rejects_bad_arguments(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Classifier(nn.Linear(2, 2), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("one_hot", [False, True])
def test_classifier_trains_and_logs_under_a_trainer(one_hot: bool, tmp_path: object) -> None:
    torch.manual_seed(0)
    dm = DigitsDataModule(num_train=128, batch_size=32, one_hot=one_hot, flatten=False)
    module = Classifier(
        SmallCNN(channels=(4, 8)), lr=0.1, loss="mse" if one_hot else "cross_entropy"
    )
    trainer = Trainer(
        max_steps=4,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=dm)
    metrics = trainer.callback_metrics
    assert {"train_loss", "val_loss", "val_acc"} <= set(metrics)
    assert 0.0 <= metrics["val_acc"].item() <= 1.0
    assert trainer.global_step == 4


# --------------------------------------------------------------------- autoencoder


def test_autoencoder_structure_mirrors_the_sizes() -> None:
    net = Autoencoder((64, 256, 128, 64, 16), activation="sigmoid")
    linears = [m for m in net.layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (64, 256), (256, 128), (128, 64), (64, 16), (16, 64), (64, 128), (128, 256), (256, 64),
    ]  # fmt: skip
    kinds = [type(m).__name__ for m in net.layers]
    # no activation after the code (4th Linear) and the output
    assert kinds[6:8] == ["Linear", "Linear"] and kinds[-1] == "Linear"
    assert kinds.count("Sigmoid") == 6
    assert net(torch.zeros(3, 1, 8, 8)).shape == (3, 64)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"sizes": (64,)}, "sizes"),
        ({"sizes": (64, 0)}, "sizes"),
        ({"activation": "relu"}, "activation"),
    ],
)
def test_autoencoder_rejects_bad_arguments(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Autoencoder(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"lr": 0.0}, "lr"), ({"momentum": 1.0}, "momentum"), ({"fisher": "true"}, "fisher")],
)
def test_reconstruction_rejects_bad_arguments(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Reconstruction(nn.Linear(2, 2), **kwargs)  # type: ignore[arg-type]


def test_reconstruction_data_targets_are_the_inputs_and_the_loss_sums_pixels() -> None:
    dm = DigitsReconstructionDataModule(num_train=40, batch_size=8, seed=1)
    dm.setup()
    x, y = dm.train_set.tensors
    assert x.shape == y.shape == (40, 64) and torch.equal(x, y)
    assert torch.equal(dm.train_indices, _digits(num_train=40, seed=1).train_indices)
    module = Reconstruction(nn.Identity())
    batch = (torch.ones(2, 64), torch.zeros(2, 64))
    assert float(module.landscape_loss(batch)) == 64.0
    with pytest.raises(ValueError, match="do not match"):
        module.landscape_loss((torch.ones(2, 64), torch.zeros(2, 10)))


def test_reconstruction_samples_the_fisher_for_a_kfac_callback(tmp_path: object) -> None:
    from lightning_landscape.callbacks import KFAC

    torch.manual_seed(0)
    calls: list[bool] = []
    cb = KFAC(factor_update_every=1, inverse_update_every=1)
    trainer = Trainer(
        max_steps=3, limit_val_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        callbacks=[cb],
    )  # fmt: skip
    module = Reconstruction(Autoencoder((64, 16, 4)), lr=0.05)
    original = KFAC.on_fit_start

    def spy(self: KFAC, trainer: Trainer, pl_module: object) -> None:
        original(self, trainer, pl_module)  # type: ignore[arg-type]
        pre = self.preconditioner
        assert pre is not None
        sample = pre.sample_fisher
        pre.sample_fisher = lambda *a, **k: calls.append(sample(*a, **k)) or calls[-1]  # type: ignore[method-assign]

    KFAC.on_fit_start = spy  # type: ignore[method-assign]
    try:
        trainer.fit(module, datamodule=DigitsReconstructionDataModule(num_train=64, batch_size=32))
    finally:
        KFAC.on_fit_start = original  # type: ignore[method-assign]
    assert calls == [True, True, True]
    assert cb.preconditioner is not None and cb.preconditioner.ready
    assert {"train_loss", "val_loss"} <= set(trainer.callback_metrics)
