"""Callbacks: metrics (SPEC §6), gate-collapse warning, run metadata and progress."""

from callbacks.gate_collapse import GateCollapseMonitor
from callbacks.metrics import ReconstructionMetrics, SAEMetrics
from callbacks.run_info import RunInfo, StepProgressBar

__all__ = ["GateCollapseMonitor", "ReconstructionMetrics", "RunInfo", "SAEMetrics", "StepProgressBar"]
