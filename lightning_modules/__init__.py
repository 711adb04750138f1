"""One LightningModule per SAE architecture, all sharing `SAEModule`'s training loop."""

from lightning_modules.base import SAEModule
from lightning_modules.sagsae import SAGSAE

__all__ = ["SAEModule", "SAGSAE"]
