"""Small offline datamodules: scikit-learn's digits and a random tanh teacher.

Both build their tensors in memory (no download), split deterministically from ``seed`` and
can serve the whole training set as one unshuffled batch (``full_batch=True``) for full-batch
gradient descent, the setting in which the edge of stability is cleanest. Under DDP, Lightning
wraps the mini-batch loaders' samplers in a ``DistributedSampler``; with ``full_batch=True``
each rank gets a fixed shard (``DistributedSampler(shuffle=False)``) as a single batch, so one
optimizer step still sees the whole training set (padded by repeating a few samples when the
set does not divide evenly between ranks, as ``DistributedSampler`` does).

Example::

    >>> dm = DigitsDataModule(batch_size=32, num_train=100)
    >>> dm.setup("fit")
    >>> x, y = next(iter(dm.train_dataloader()))
    >>> tuple(x.shape), tuple(y.shape), x.dtype
    ((32, 64), (32,), torch.float32)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_landscape.checks import check_int, check_number
from lightning_landscape.zoo.nets import MLP

__all__ = ["DigitsDataModule", "TeacherStudentDataModule"]


def _loader(
    dataset: TensorDataset, *, batch_size: int, shuffle: bool, num_workers: int
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


def _full_batch_loader(dataset: TensorDataset, *, num_workers: int) -> DataLoader:
    """The whole dataset as one batch; under DDP each rank's fixed shard as one batch.

    Lightning would wrap a plain loader's sampler in a *shuffling* ``DistributedSampler`` (it
    always shuffles training data), re-dealing the samples between ranks every step. A
    non-shuffling ``DistributedSampler`` of our own keeps every rank's shard fixed.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        sampler: DistributedSampler[int] = DistributedSampler(dataset, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=len(sampler),
            sampler=sampler,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )
    return _loader(dataset, batch_size=len(dataset), shuffle=False, num_workers=num_workers)


class _TensorDataModule(LightningDataModule):
    """Shared loaders for datamodules that hold ``train_set`` / ``val_set`` in memory."""

    train_set: TensorDataset
    val_set: TensorDataset

    def __init__(self, *, batch_size: int, full_batch: bool, num_workers: int) -> None:
        super().__init__()
        check_int("batch_size", batch_size)
        check_int("num_workers", num_workers, low=0)
        self.batch_size = batch_size
        self.full_batch = full_batch
        self.num_workers = num_workers
        self._built = False

    def _build(self) -> None:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Build the in-memory datasets (once; every rank builds the same ones)."""
        if not self._built:
            self._build()
            self._built = True

    def train_dataloader(self) -> DataLoader:
        """Shuffled mini-batches, or the whole training set as one fixed batch."""
        self.setup()
        if self.full_batch:
            return _full_batch_loader(self.train_set, num_workers=self.num_workers)
        return _loader(
            self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        """Validation set, in order (one batch when ``full_batch``)."""
        self.setup()
        size = len(self.val_set) if self.full_batch else self.batch_size
        return _loader(self.val_set, batch_size=size, shuffle=False, num_workers=self.num_workers)


class DigitsDataModule(_TensorDataModule):
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), offline.

    Pixel intensities (integers 0..16) are divided by 16, so inputs lie in ``[0, 1]``
    (float32; not standardised). The split into training and validation sets is a fixed
    permutation drawn from ``seed``; ``num_train`` then keeps the first ``num_train`` samples of
    the training split, so a smaller subset is always contained in a larger one. After
    :meth:`setup`, ``train_indices`` / ``val_indices`` hold the rows of ``load_digits()`` used.

    Args:
        batch_size: Mini-batch size (ignored for training when ``full_batch``).
        val_fraction: Fraction of the 1797 samples held out for validation, in ``(0, 1)``.
        seed: Seed of the split permutation.
        num_train: Keep only this many training samples (``None`` = the whole split).
        flatten: Inputs of shape ``(N, 64)``; ``False`` gives ``(N, 1, 8, 8)`` for a CNN.
        one_hot: Targets as one-hot float32 vectors ``(N, 10)`` (for a squared loss) instead of
            int64 class indices ``(N,)``.
        full_batch: Serve the training set as one unshuffled batch (full-batch GD).
        num_workers: DataLoader worker processes.

    Example::

        >>> dm = DigitsDataModule(flatten=False, one_hot=True, full_batch=True, num_train=50)
        >>> dm.setup()
        >>> batches = list(dm.train_dataloader())
        >>> len(batches), tuple(batches[0][0].shape), tuple(batches[0][1].shape)
        (1, (50, 1, 8, 8), (50, 10))
    """

    num_classes = 10
    num_samples = 1797
    train_indices: Tensor
    val_indices: Tensor

    def __init__(
        self,
        *,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        seed: int = 0,
        num_train: int | None = None,
        flatten: bool = True,
        one_hot: bool = False,
        full_batch: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, full_batch=full_batch, num_workers=num_workers)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction!r}")
        num_val = round(val_fraction * self.num_samples)
        if not 1 <= num_val < self.num_samples:
            raise ValueError(f"`val_fraction`={val_fraction!r} leaves an empty split")
        if num_train is not None:
            check_int("num_train", num_train)
            if num_train > self.num_samples - num_val:
                raise ValueError(
                    f"`num_train` must be <= {self.num_samples - num_val} (the training split for "
                    f"`val_fraction`={val_fraction!r}), got {num_train!r}"
                )
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_train = num_train
        self.flatten = flatten
        self.one_hot = one_hot
        self.save_hyperparameters()

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample."""
        return (64,) if self.flatten else (1, 8, 8)

    def _build(self) -> None:
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        x = torch.as_tensor(images, dtype=torch.float32) / 16.0
        y = torch.as_tensor(labels, dtype=torch.int64)
        if not self.flatten:
            x = x.reshape(-1, 1, 8, 8)
        targets: Tensor = y
        if self.one_hot:
            targets = torch.nn.functional.one_hot(y, self.num_classes).to(torch.float32)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        num_val = round(self.val_fraction * len(x))
        val_idx, train_idx = perm[:num_val], perm[num_val:]
        if self.num_train is not None:
            train_idx = train_idx[: self.num_train]
        self.train_indices, self.val_indices = train_idx, val_idx
        self.train_set = TensorDataset(x[train_idx], targets[train_idx])
        self.val_set = TensorDataset(x[val_idx], targets[val_idx])


class TeacherStudentDataModule(_TensorDataModule):
    """Regression targets from a random two-layer tanh teacher network.

    Inputs are standard Gaussian, ``x ~ N(0, I_d)``. The teacher is an
    :class:`~lightning_landscape.zoo.nets.MLP` with one hidden tanh layer of ``teacher_width``
    units and no biases, weights drawn from ``N(0, 1/fan_in)``; targets are
    ``teacher(x) + noise * N(0, 1)``. Everything is drawn from one generator seeded by ``seed``,
    so two datamodules with the same arguments hold identical data (on every rank).

    Args:
        num_train: Training samples.
        num_val: Validation samples.
        input_dim: Input dimension ``d``.
        teacher_width: Hidden units of the teacher.
        output_dim: Outputs of the teacher (targets have shape ``(N, output_dim)``).
        noise: Standard deviation of the Gaussian label noise (``>= 0``).
        seed: Seed of the generator.
        batch_size: Mini-batch size (ignored for training when ``full_batch``).
        full_batch: Serve the training set as one unshuffled batch (full-batch GD).
        num_workers: DataLoader worker processes.

    Example::

        >>> dm = TeacherStudentDataModule(num_train=8, num_val=4, input_dim=3, output_dim=2)
        >>> dm.setup()
        >>> tuple(dm.train_set.tensors[0].shape), tuple(dm.train_set.tensors[1].shape)
        ((8, 3), (8, 2))
    """

    def __init__(
        self,
        *,
        num_train: int = 1024,
        num_val: int = 256,
        input_dim: int = 16,
        teacher_width: int = 32,
        output_dim: int = 1,
        noise: float = 0.0,
        seed: int = 0,
        batch_size: int = 64,
        full_batch: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, full_batch=full_batch, num_workers=num_workers)
        for name, value in [
            ("num_train", num_train),
            ("num_val", num_val),
            ("input_dim", input_dim),
            ("teacher_width", teacher_width),
            ("output_dim", output_dim),
        ]:
            check_int(name, value)
        check_number("noise", noise, include_low=True)
        self.num_train = num_train
        self.num_val = num_val
        self.input_dim = input_dim
        self.teacher_width = teacher_width
        self.output_dim = output_dim
        self.noise = noise
        self.seed = seed
        self.save_hyperparameters()

    def _build(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):  # MLP's default init must not touch global RNG
            teacher = MLP(
                self.input_dim,
                self.output_dim,
                depth=1,
                width=self.teacher_width,
                activation="tanh",
                bias=False,
            )
        with torch.no_grad():
            for layer in (teacher.layers[0], teacher.layers[-1]):
                assert isinstance(layer, torch.nn.Linear)
                fan_in = layer.in_features
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) / fan_in**0.5)
            n = self.num_train + self.num_val
            x = torch.randn(n, self.input_dim, generator=gen)
            y = teacher(x)
            if self.noise > 0:
                y = y + self.noise * torch.randn(y.shape, generator=gen)
        self.teacher = teacher.requires_grad_(False)
        self.train_set = TensorDataset(x[: self.num_train], y[: self.num_train])
        self.val_set = TensorDataset(x[self.num_train :], y[self.num_train :])
