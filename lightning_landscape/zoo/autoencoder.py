"""A deep autoencoder on the bundled digits: the badly conditioned problem K-FAC was made for.

- :class:`Autoencoder` — the network: ``Linear`` layers through ``sizes`` and back again
  (default ``64-256-128-64-16-64-128-256-64``, as the K-FAC paper's deep autoencoders, scaled to
  8x8 digits), ``tanh`` or ``sigmoid`` between them, a linear code layer and a linear output;
- :class:`Reconstruction` — the LightningModule: squared reconstruction error
  ``Σ_pixels (f(x) − x)²`` averaged over the batch (``train_loss``, ``val_loss``). With a
  ``KFAC`` callback in the trainer and ``fisher="sampled"`` it asks the preconditioner for the
  true Fisher (:meth:`~lightning_landscape.optim.kfac.KFACPreconditioner.sample_fisher`, a
  Gaussian likelihood matching this loss) instead of the empirical one;
- :class:`DigitsReconstructionDataModule` — :class:`~lightning_landscape.zoo.DigitsDataModule`
  whose targets are the (flattened) inputs.

Example::

    >>> import torch
    >>> net = Autoencoder(sizes=(64, 32, 8), activation="sigmoid")
    >>> net(torch.zeros(5, 64)).shape, [m.out_features for m in net.layers if hasattr(m, "out_features")]
    (torch.Size([5, 64]), [32, 8, 32, 64])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_landscape.checks import check_choice
from lightning_landscape.zoo.data import DigitsDataModule
from lightning_landscape.zoo.modules import check_sgd_module

__all__ = ["Autoencoder", "DigitsReconstructionDataModule", "Reconstruction"]

_ACTIVATIONS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class Autoencoder(nn.Module):
    """``sizes[0] → … → sizes[-1]`` (the code, linear) ``→ … → sizes[0]`` (linear output).

    Args:
        sizes: Widths from the input to the code, at least two entries, each ``>= 1``.
        activation: ``"tanh"`` or ``"sigmoid"`` after every hidden layer but the code.
    """

    def __init__(
        self,
        sizes: Sequence[int] = (64, 256, 128, 64, 16),
        *,
        activation: Literal["tanh", "sigmoid"] = "tanh",
    ) -> None:
        super().__init__()
        sizes = tuple(sizes)
        if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                                 for s in sizes):  # fmt: skip
            raise ValueError(f"`sizes` must hold at least two ints >= 1, got {sizes!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"`activation` must be one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        widths = sizes + sizes[-2::-1]
        code = len(sizes) - 2  # index of the layer producing the code
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i != code and i != len(widths) - 2:
                layers.append(_ACTIVATIONS[activation]())
        self.sizes = sizes
        self.layers = nn.Sequential(*layers)
        self.flatten = nn.Flatten()

    def forward(self, x: Tensor) -> Tensor:
        """Reconstructions of shape ``(N, sizes[0])`` for inputs ``(N, ...)``."""
        return self.layers(self.flatten(x))


class Reconstruction(LightningModule):
    """Train ``net`` to reproduce its input: ``mean_n Σ_pixels (net(x_n) − y_n)²``.

    Args:
        net: Maps inputs to reconstructions of the targets' shape.
        lr: SGD learning rate of :meth:`configure_optimizers` (a CLI ``optimizer:`` replaces it).
        momentum: SGD (heavy-ball) momentum, in ``[0, 1)``.
        fisher: ``"sampled"``: with a ``KFAC`` callback, ``G`` is the true Fisher of the
            Gaussian likelihood of this loss (variance ½); ``"empirical"``: the default K-FAC.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        lr: float = 0.1,
        momentum: float = 0.9,
        fisher: Literal["sampled", "empirical"] = "sampled",
    ) -> None:
        super().__init__()
        check_sgd_module(net, lr, momentum)
        check_choice("fisher", fisher, ("sampled", "empirical"))
        self.net, self.lr, self.momentum, self.fisher = net, lr, momentum, fisher
        self.save_hyperparameters(ignore=["net"])

    def forward(self, x: Tensor) -> Tensor:
        """The reconstructions."""
        return self.net(x)

    @staticmethod
    def _loss(outputs: Tensor, targets: Tensor) -> Tensor:
        if outputs.shape != targets.shape:
            raise ValueError(
                f"Reconstruction: outputs of shape {tuple(outputs.shape)} do not match targets "
                f"of shape {tuple(targets.shape)}"
            )
        return (outputs - targets.to(outputs.dtype)).pow(2).flatten(1).sum(1).mean()

    def landscape_loss(self, batch: Any) -> Tensor:
        """Mean reconstruction error of ``batch`` (what ``training_step`` returns), no logging."""
        x, y = batch
        return self._loss(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Mean reconstruction error; logs ``train_loss``."""
        x, y = batch
        outputs = self(x)
        if self.fisher == "sampled":
            from lightning_landscape.optim.kfac import KFACPreconditioner

            trainer = self._trainer
            for callback in trainer.callbacks if trainer is not None else []:  # type: ignore[attr-defined]
                pre = getattr(callback, "preconditioner", None)
                if isinstance(pre, KFACPreconditioner):
                    pre.sample_fisher(outputs, "gaussian", variance=0.5)
        loss = self._loss(outputs, y)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(x))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Logs ``val_loss`` (epoch mean weighted by batch size)."""
        x, y = batch
        self.log("val_loss", self._loss(self(x), y), prog_bar=True, batch_size=len(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD with the module's ``lr`` and ``momentum`` (replaced by a CLI ``optimizer:``)."""
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class DigitsReconstructionDataModule(DigitsDataModule):
    """Digits whose targets are the flattened inputs (``(N, 64)`` in ``[0, 1]``).

    Takes :class:`~lightning_landscape.zoo.DigitsDataModule`'s arguments but ``flatten`` and
    ``one_hot`` (inputs are flattened, there are no labels).

    Example::

        >>> dm = DigitsReconstructionDataModule(batch_size=8, num_train=16)
        >>> dm.setup()
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> bool((x == y).all()), tuple(x.shape)
        (True, (8, 64))
    """

    def __init__(
        self,
        *,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        seed: int = 0,
        num_train: int | None = None,
        full_batch: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size, val_fraction=val_fraction, seed=seed, num_train=num_train,
            full_batch=full_batch, num_workers=num_workers,
        )  # fmt: skip

    def _build(self) -> None:
        super()._build()
        self.train_set = TensorDataset(self.train_set.tensors[0], self.train_set.tensors[0])
        self.val_set = TensorDataset(self.val_set.tensors[0], self.val_set.tensors[0])
