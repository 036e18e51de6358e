"""Small models and datamodules the recipes use: digits, a tanh teacher, an MLP and a CNN.

Everything here is small enough to train and measure on a laptop CPU in minutes:

- :class:`DigitsDataModule` (scikit-learn's bundled 8x8 digits, offline) and
  :class:`TeacherStudentDataModule` (regression on a random tanh teacher);
- :class:`MLP` and :class:`SmallCNN`;
- :class:`Autoencoder`, :class:`Reconstruction` and :class:`DigitsReconstructionDataModule`
  (a deep autoencoder on digits, the badly conditioned problem of the K-FAC paper);
- :class:`Classifier` and :class:`Regressor`, LightningModules that wrap any network and expose
  ``landscape_loss(batch)`` for the measurement callbacks.

Example::

    >>> from lightning_landscape.zoo import MLP, Classifier, DigitsDataModule
    >>> module = Classifier(MLP(64, 10, width=32), lr=0.1)
    >>> dm = DigitsDataModule(batch_size=16)
    >>> dm.setup()
    >>> len(dm.train_set), len(dm.val_set)
    (1438, 359)
"""

from __future__ import annotations

from lightning_landscape.zoo.autoencoder import (
    Autoencoder,
    DigitsReconstructionDataModule,
    Reconstruction,
)
from lightning_landscape.zoo.data import DigitsDataModule, TeacherStudentDataModule
from lightning_landscape.zoo.modules import Classifier, Regressor
from lightning_landscape.zoo.nets import MLP, SmallCNN

__all__ = [
    "MLP",
    "Autoencoder",
    "Classifier",
    "DigitsDataModule",
    "DigitsReconstructionDataModule",
    "Reconstruction",
    "Regressor",
    "SmallCNN",
    "TeacherStudentDataModule",
]
