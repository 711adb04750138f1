"""Files and formats: the SAELens-layout export and `sagsae.load`, the SAELens plugin, the split-sign form of a
signed SAE, and folders written whole or not at all."""
