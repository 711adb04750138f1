"""SAE architectures, one per file, constructible by name through the registry."""

from sagsae.saes.base import SAE_REGISTRY, SAELoss, SparseAutoencoder, build_sae, register
from sagsae.saes.sa_gsae import SignAwareGatedSAE

__all__ = ["SAE_REGISTRY", "SAELoss", "SparseAutoencoder", "SignAwareGatedSAE", "build_sae", "register"]
