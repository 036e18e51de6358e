"""Lightning callbacks: thin shells that schedule, guard, reduce and log measurements."""

from lightning_landscape.callbacks.base import MeasureContext, MeasurementCallback
from lightning_landscape.callbacks.context import Pausable
from lightning_landscape.callbacks.gradient_flow import GradientFlowDeviation
from lightning_landscape.callbacks.hessian import HessianEigenvalues
from lightning_landscape.callbacks.kfac import KFAC
from lightning_landscape.callbacks.landscape import LossLandscape
from lightning_landscape.callbacks.observation_boost import ObservationBoost
from lightning_landscape.callbacks.options import ProbeOptions
from lightning_landscape.callbacks.sample_variance import SampleVarianceDecay
from lightning_landscape.callbacks.schedule import Schedule
from lightning_landscape.callbacks.sharpness import Sharpness

__all__ = [
    "KFAC",
    "GradientFlowDeviation",
    "HessianEigenvalues",
    "LossLandscape",
    "MeasureContext",
    "MeasurementCallback",
    "ObservationBoost",
    "Pausable",
    "ProbeOptions",
    "SampleVarianceDecay",
    "Schedule",
    "Sharpness",
]
