"""The LightningModules: `SAEModule` trains any registered SAE; `SweepModule` trains many from one stream."""

from lightning_modules.sae_module import SAEModule
from lightning_modules.sweep_module import SweepModule

__all__ = ["SAEModule", "SweepModule"]
