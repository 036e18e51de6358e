"""Small networks for the recipes: a configurable MLP and a CNN for 8x8 digits.

Both are plain :class:`torch.nn.Module` s (no Lightning), small enough that a Hessian
measurement on a CPU takes a fraction of a second.

Example::

    >>> import torch
    >>> net = MLP(64, 10, depth=2, width=32, activation="tanh")
    >>> net(torch.zeros(5, 64)).shape
    torch.Size([5, 10])
    >>> SmallCNN()(torch.zeros(5, 1, 8, 8)).shape
    torch.Size([5, 10])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from torch import Tensor, nn

from lightning_landscape.checks import check_choice, check_number

__all__ = ["MLP", "SmallCNN", "Activation", "Init"]

Activation = Literal["relu", "tanh", "gelu", "linear"]
Init = Literal["default", "he", "xavier"]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "linear": nn.Identity,
}
_INITS = ("default", "he", "xavier")


class MLP(nn.Module):
    """A fully connected network: ``depth`` hidden layers of ``width`` units.

    Each hidden block is ``Linear -> [BatchNorm1d] -> activation -> [Dropout]``; the output
    layer is a plain ``Linear``. Inputs are flattened first, so ``(N, 1, 8, 8)`` works too.
    ``depth=0`` is a linear (or affine) model.

    Args:
        in_features: Number of input features (after flattening).
        out_features: Number of outputs (classes or regression targets).
        depth: Number of hidden layers (``>= 0``).
        width: Units per hidden layer (``>= 1``).
        activation: ``"relu"``, ``"tanh"``, ``"gelu"`` or ``"linear"`` (identity).
        batchnorm: Insert ``BatchNorm1d`` after every hidden ``Linear``.
        dropout: Dropout probability after every hidden activation (``0`` = none).
        bias: Whether the ``Linear`` layers have biases.
        init: ``"default"`` keeps PyTorch's initialisation; ``"he"`` draws weights from
            Kaiming-normal (fan-in, ReLU gain) and ``"xavier"`` from Xavier-normal, both with
            zero biases.

    Example::

        >>> net = MLP(4, 2, depth=1, width=3, batchnorm=True, dropout=0.1)
        >>> [type(m).__name__ for m in net.layers]
        ['Linear', 'BatchNorm1d', 'ReLU', 'Dropout', 'Linear']
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        depth: int = 2,
        width: int = 64,
        activation: Activation = "relu",
        batchnorm: bool = False,
        dropout: float = 0.0,
        bias: bool = True,
        init: Init = "default",
    ) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"`in_features` must be >= 1, got {in_features!r}")
        if out_features < 1:
            raise ValueError(f"`out_features` must be >= 1, got {out_features!r}")
        if depth < 0:
            raise ValueError(f"`depth` must be >= 0, got {depth!r}")
        if width < 1:
            raise ValueError(f"`width` must be >= 1, got {width!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"`activation` must be one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        check_number("dropout", dropout, high=1.0, include_low=True)
        check_choice("init", init, list(_INITS))
        self.depth = depth
        self.width = width
        layers: list[nn.Module] = []
        fan_in = in_features
        for _ in range(depth):
            layers.append(nn.Linear(fan_in, width, bias=bias))
            if batchnorm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(_ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            fan_in = width
        layers.append(nn.Linear(fan_in, out_features, bias=bias))
        self.flatten = nn.Flatten()
        self.layers = nn.Sequential(*layers)
        if init != "default":
            for module in self.layers:
                if isinstance(module, nn.Linear):
                    if init == "he":
                        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                    else:
                        nn.init.xavier_normal_(module.weight)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Outputs of shape ``(N, out_features)`` for inputs of shape ``(N, ...)``."""
        return self.layers(self.flatten(x))


class SmallCNN(nn.Module):
    """A small convolutional network for 8x8 images (scikit-learn digits).

    One stage per entry of ``channels``: ``Conv2d(3x3, padding 1) -> [BatchNorm2d] -> ReLU ->
    MaxPool2d(2)``, then ``Flatten -> [Dropout] -> Linear``. Each stage halves the spatial size,
    so an ``input_size`` of 8 allows up to three stages.

    Args:
        in_channels: Input channels (1 for digits).
        num_classes: Number of outputs.
        channels: Output channels of each convolutional stage.
        batchnorm: Insert ``BatchNorm2d`` after every convolution.
        dropout: Dropout probability before the final ``Linear``.
        input_size: Height (= width) of the input images.

    Example::

        >>> import torch
        >>> SmallCNN(channels=(4, 8, 8), batchnorm=True)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        *,
        channels: Sequence[int] = (16, 32),
        batchnorm: bool = False,
        dropout: float = 0.0,
        input_size: int = 8,
    ) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"`in_channels` must be >= 1, got {in_channels!r}")
        if num_classes < 1:
            raise ValueError(f"`num_classes` must be >= 1, got {num_classes!r}")
        channels = tuple(channels)
        if not channels or any(c < 1 for c in channels):
            raise ValueError(
                f"`channels` must be a non-empty sequence of ints >= 1, got {channels!r}"
            )
        if input_size < 1 or input_size >> len(channels) < 1:
            raise ValueError(
                f"`input_size`={input_size!r} is too small for {len(channels)} stages "
                f"(each halves it); got `channels`={channels!r}"
            )
        check_number("dropout", dropout, high=1.0, include_low=True)
        stages: list[nn.Module] = []
        prev = in_channels
        for out in channels:
            stages.append(nn.Conv2d(prev, out, kernel_size=3, padding=1))
            if batchnorm:
                stages.append(nn.BatchNorm2d(out))
            stages.append(nn.ReLU())
            stages.append(nn.MaxPool2d(2))
            prev = out
        side = input_size >> len(channels)
        self.features = nn.Sequential(*stages)
        head: list[nn.Module] = [nn.Flatten()]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(prev * side * side, num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)`` for images of shape ``(N, C, H, W)``."""
        return self.head(self.features(x))
