"""LightningDataModules that feed SAEs with LM activations."""

from datamodules.lm_activations import LMActivationDataModule
from datamodules.tensor_data import TensorActivationDataModule

__all__ = ["LMActivationDataModule", "TensorActivationDataModule"]
