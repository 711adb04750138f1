"""LightningDataModules that feed SAEs with LM activations (live, cached on disk, or in memory), and the pieces
they are made of: the hooked LM, text sources, the activation stream and the cache writer."""

from datamodules.activation_files import ActivationFileDataModule
from datamodules.lm_activations import LMActivationDataModule
from datamodules.tensor_data import TensorActivationDataModule

__all__ = ["ActivationFileDataModule", "LMActivationDataModule", "TensorActivationDataModule"]
