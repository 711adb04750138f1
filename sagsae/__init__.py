"""sagsae: Sign-Aware Gated sparse autoencoders. The core (this package) needs torch alone."""

from sagsae.formats.serialization import load
from sagsae.saes import SAE_REGISTRY, SparseAutoencoder, build_sae

__version__ = "0.1.0"
__all__ = ["SAE_REGISTRY", "SparseAutoencoder", "build_sae", "load", "__version__"]
