"""ReLU-L1 (the standard SAE) on the shared loop."""

from __future__ import annotations

from lightning_modules.base import SAEModule


class ReLUSAE(SAEModule):
    """Decoder-norm-weighted L1 on ReLU codes. **kwargs: the shared training arguments of `SAEModule`."""

    architecture = "relu"
