"""The one place that imports hessian-eigenthings.

hessian-eigenthings is pre-1.0 (alphas) and its API moves between releases (the next alpha
changes ``GGNOperator``'s constructor). Everything the suite uses from it is imported here, and
``tests/measures/test_compat.py`` pins the signatures we rely on, so an upgrade that breaks them
fails one obvious test instead of a measurement deep inside a training run. Only its public
API is used: the ``CurvatureOperator`` interface (``size``, ``device``, ``dtype``, ``matvec``),
which :class:`~.operators.ProbeHessian` implements itself, and the public solvers.
"""

from __future__ import annotations

from hessian_eigenthings import __version__ as HESSIAN_EIGENTHINGS_VERSION
from hessian_eigenthings.algorithms import hutch_plus_plus, spectral_density
from hessian_eigenthings.operators import CurvatureOperator, LambdaOperator
from hessian_eigenthings.param_utils import select_parameters

__all__ = [
    "HESSIAN_EIGENTHINGS_VERSION",
    "CurvatureOperator",
    "LambdaOperator",
    "hutch_plus_plus",
    "select_parameters",
    "spectral_density",
]
