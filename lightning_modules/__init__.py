"""One LightningModule per SAE architecture, all sharing `SAEModule`'s training loop."""

from lightning_modules.base import SAEModule
from lightning_modules.gated import GatedSAE
from lightning_modules.jumprelu import JumpReLUSAE
from lightning_modules.relu import ReLUSAE
from lightning_modules.sagsae import SAGSAE
from lightning_modules.topk import AbsTopKSAE, BatchTopKSAE, TopKSAE

__all__ = ["AbsTopKSAE", "BatchTopKSAE", "GatedSAE", "JumpReLUSAE", "ReLUSAE", "SAEModule", "SAGSAE", "TopKSAE"]
