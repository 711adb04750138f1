"""LightningDataModules that feed SAEs with LM activations (live, cached on disk, or in memory), and the pieces
they are made of: the hooked LM, text sources, the activation stream and the cache writer.

The DataModules load on first use, so that the torch-only pieces (hookpoint names for `export`) import without
Lightning."""

from __future__ import annotations

import importlib

_MODULES = {"ActivationFileDataModule": "datamodules.activation_files",
            "LMActivationDataModule": "datamodules.lm_activations",
            "TensorActivationDataModule": "datamodules.tensor_data"}

__all__ = list(_MODULES)


def __getattr__(name: str):
    if name in _MODULES:
        return getattr(importlib.import_module(_MODULES[name]), name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
