"""Callbacks: metrics, gate-collapse warning, evaluation reports, run metadata and progress, interrupt checkpoints,
a last.ckpt that ends at the final step; the logger that opens on the SAE's curves; and the Lightning plugin that
writes checkpoints atomically."""

from callbacks.checkpoint_io import AtomicCheckpointIO
from callbacks.dashboard import SAETensorBoardLogger, hide_logger_advertisements
from callbacks.gate_collapse import GateCollapseMonitor
from callbacks.interrupt import InterruptCheckpoint
from callbacks.last_checkpoint import LastCheckpoint
from callbacks.metrics import SAEMetrics
from callbacks.evaluation_report import EvaluationReport
from callbacks.run_info import RunInfo, StepProgressBar
from callbacks.spliced_loss import SplicedLMLoss

__all__ = ["AtomicCheckpointIO", "EvaluationReport", "GateCollapseMonitor", "InterruptCheckpoint", "LastCheckpoint",
           "RunInfo", "SAEMetrics", "SAETensorBoardLogger", "SplicedLMLoss", "StepProgressBar",
           "hide_logger_advertisements"]
