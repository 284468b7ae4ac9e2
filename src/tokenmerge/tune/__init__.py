"""Fitting reductions to the user's data and hardware: calibration of data-dependent methods
(:mod:`.calibration`) and the autotuner (:mod:`.autotune`), which searches the input size and a
per-layer schedule for a speed or FLOPs target and returns a :class:`~.plan.Plan`."""

from .autotune import autotune
from .calibration import Calibrated, calibrate
from .plan import Plan

__all__ = ["Calibrated", "Plan", "autotune", "calibrate"]
