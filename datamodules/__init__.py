"""LightningDataModules that feed SAEs with LM activations."""

from datamodules.lm_activations import LMActivationDataModule

__all__ = ["LMActivationDataModule"]
