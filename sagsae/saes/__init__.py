"""SAE architectures, one per file, constructible by name through the registry."""

from sagsae.saes.abstopk import AbsTopKSparseAutoencoder
from sagsae.saes.base import (SAE_REGISTRY, SAELoss, SparseAutoencoder, build_sae, register, sae_class,
                              sae_class_for_saelens)
from sagsae.saes.batchtopk import BatchTopKSparseAutoencoder
from sagsae.saes.gated import GatedSparseAutoencoder
from sagsae.saes.jumprelu import JumpReLUSparseAutoencoder
from sagsae.saes.relu import ReLUSparseAutoencoder
from sagsae.saes.sa_gsae import SignAwareGatedSAE
from sagsae.saes.topk import TopKSparseAutoencoder

__all__ = [
    "SAE_REGISTRY", "SAELoss", "SparseAutoencoder", "build_sae", "register", "sae_class", "sae_class_for_saelens",
    "AbsTopKSparseAutoencoder", "BatchTopKSparseAutoencoder", "GatedSparseAutoencoder",
    "JumpReLUSparseAutoencoder", "ReLUSparseAutoencoder", "SignAwareGatedSAE", "TopKSparseAutoencoder",
]
