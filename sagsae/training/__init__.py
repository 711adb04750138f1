"""Training in torch alone: one SAE's state (`TrainingState`) and its parts, which `fit` and sweeps wrap."""

from sagsae.training.controller import TargetL0Controller
from sagsae.training.dead_latents import DeadLatentTracker
from sagsae.training.loss_spikes import LossSpikeDetector
from sagsae.training.state import TrainingPlan, TrainingSettings, TrainingState

__all__ = ["DeadLatentTracker", "LossSpikeDetector", "TargetL0Controller", "TrainingPlan", "TrainingSettings",
           "TrainingState"]
