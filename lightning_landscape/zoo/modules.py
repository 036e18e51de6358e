"""LightningModules for the recipes: a classifier and a regressor around any ``nn.Module``.

Both train with SGD (``lr``, ``momentum``) from their own ``configure_optimizers``. Under
LightningCLI an ``optimizer:`` entry in the config (or ``--optimizer``) replaces that method: the
CLI instantiates the optimizer on the module's parameters and patches ``configure_optimizers``
(and the module's ``lr``/``momentum`` are then unused). Both define
:meth:`landscape_loss`, the hook the measurement callbacks call to evaluate the training loss on
their probe without logging anything.

Example::

    >>> import torch
    >>> from lightning_landscape.zoo.nets import MLP
    >>> module = Classifier(MLP(4, 3, width=8), loss="mse")
    >>> batch = (torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    >>> bool(module.landscape_loss(batch) > 0)
    True
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from lightning_landscape.checks import check_number, check_that

__all__ = ["Classifier", "Regressor", "ClassificationLoss"]

ClassificationLoss = Literal["cross_entropy", "mse"]


def check_sgd_module(net: Any, lr: Any, momentum: Any) -> None:
    """The arguments every zoo module takes: a network and SGD's ``lr`` and ``momentum``."""
    check_that("net", type(net).__name__, isinstance(net, nn.Module), "a torch.nn.Module")
    check_number("lr", lr)
    check_number("momentum", momentum, high=1.0, include_low=True)


class _SupervisedModule(LightningModule):
    """``net(x)`` against targets ``y`` with a loss; SGD by default."""

    def __init__(self, net: nn.Module, *, lr: float, momentum: float) -> None:
        super().__init__()
        check_sgd_module(net, lr, momentum)
        self.net = net
        self.lr = lr
        self.momentum = momentum

    def forward(self, x: Tensor) -> Tensor:
        """The network's outputs."""
        return self.net(x)

    def _loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def landscape_loss(self, batch: Any) -> Tensor:
        """Mean training loss on ``batch`` (the same value ``training_step`` returns), no logging."""
        x, y = batch
        return self._loss(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Mean loss of the batch; logs ``train_loss``."""
        x, y = batch
        loss = self._loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(x))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD with the module's ``lr`` and ``momentum`` (replaced by a CLI ``optimizer:``)."""
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class Classifier(_SupervisedModule):
    """Classification with cross-entropy or a squared loss on one-hot targets.

    Targets may be class indices ``(N,)`` or float class-probability / one-hot vectors
    ``(N, C)`` (see ``DigitsDataModule(one_hot=True)``); both work with both losses.

    Args:
        net: Maps inputs to ``(N, C)`` logits.
        lr: SGD learning rate used by :meth:`configure_optimizers`.
        momentum: SGD (heavy-ball) momentum used by :meth:`configure_optimizers`.
        loss: ``"cross_entropy"``, or ``"mse"``: ``torch.nn.functional.mse_loss`` between the
            outputs and one-hot targets, averaged over samples *and* classes (the mean-squared
            error of Cohen et al.'s edge-of-stability experiments up to a constant factor).

    Logs ``train_loss`` (every logged step), ``val_loss`` and ``val_acc`` (per epoch).

    Example::

        >>> import torch
        >>> module = Classifier(torch.nn.Linear(2, 2), lr=0.5, momentum=0.0)
        >>> type(module.configure_optimizers()).__name__
        'SGD'
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        lr: float = 0.1,
        momentum: float = 0.9,
        loss: ClassificationLoss = "cross_entropy",
    ) -> None:
        super().__init__(net, lr=lr, momentum=momentum)
        if loss not in ("cross_entropy", "mse"):
            raise ValueError(f"`loss` must be 'cross_entropy' or 'mse', got {loss!r}")
        self.loss = loss
        self.save_hyperparameters(ignore=["net"])

    def _loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if self.loss == "cross_entropy":
            if targets.is_floating_point():
                return F.cross_entropy(outputs, targets.to(outputs.dtype))
            return F.cross_entropy(outputs, targets)
        if not targets.is_floating_point():
            targets = F.one_hot(targets, outputs.shape[-1])
        return F.mse_loss(outputs, targets.to(outputs.dtype))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Logs ``val_loss`` and ``val_acc`` (epoch means weighted by batch size)."""
        x, y = batch
        outputs = self(x)
        labels = y.argmax(dim=-1) if y.is_floating_point() else y
        acc = (outputs.argmax(dim=-1) == labels).float().mean()
        self.log(
            "val_loss", self._loss(outputs, y), prog_bar=True, sync_dist=True, batch_size=len(x)
        )
        self.log("val_acc", acc, prog_bar=True, sync_dist=True, batch_size=len(x))


class Regressor(_SupervisedModule):
    """Regression with the mean-squared error (``torch.nn.functional.mse_loss``).

    Args:
        net: Maps inputs to outputs of the targets' shape.
        lr: SGD learning rate used by :meth:`configure_optimizers`.
        momentum: SGD (heavy-ball) momentum used by :meth:`configure_optimizers`.

    Logs ``train_loss`` (every logged step) and ``val_loss`` (per epoch).

    Example::

        >>> import torch
        >>> module = Regressor(torch.nn.Linear(3, 1))
        >>> module.landscape_loss((torch.zeros(4, 3), module(torch.zeros(4, 3)).detach())).item()
        0.0
    """

    def __init__(self, net: nn.Module, *, lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__(net, lr=lr, momentum=momentum)
        self.save_hyperparameters(ignore=["net"])

    def _loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if outputs.shape != targets.shape:
            raise ValueError(
                f"Regressor: outputs of shape {tuple(outputs.shape)} do not match targets of "
                f"shape {tuple(targets.shape)}"
            )
        return F.mse_loss(outputs, targets.to(outputs.dtype))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Logs ``val_loss`` (epoch mean weighted by batch size)."""
        x, y = batch
        self.log(
            "val_loss", self._loss(self(x), y), prog_bar=True, sync_dist=True, batch_size=len(x)
        )
