"""A signed SAE (SA-GSAE, AbsTopK) as an exactly equivalent unsigned SAE of twice the width.

Tools built for unsigned SAEs count a latent as firing only when its code is > 0 (SAEBench does), so they miss
every negative firing of a signed SAE. Split, latent i's positive part is latent i and its negative part latent
H + i, both ≥ 0, with decoder columns W_i and −W_i: the reconstruction is unchanged, since at most one half of
each pair is non-zero and (−f)(−W) = fW. `sagsae export --split_signs` writes this form; sagsae.formats.saelens
registers it with SAELens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sagsae.saes import SparseAutoencoder

SPLIT_SUFFIX = "_split"  # the SAELens `architecture` of a split export: "sagsae_split", "abstopk_split"


def split_codes(codes: Tensor) -> Tensor:
    """[…, H] signed codes → [..., 2H]: the positive parts, then the negative parts' magnitudes."""
    return torch.cat([codes.clamp(min=0), (-codes).clamp(min=0)], dim=-1)


def split_decoder(W_dec: Tensor, dim: int) -> Tensor:
    """The decoder's latent vectors W followed by −W along `dim` (1 in our [d, H] layout, 0 in SAELens's)."""
    return torch.cat([W_dec, -W_dec], dim=dim)


class SplitSigns(nn.Module):
    """The signed SAE `sae` as an unsigned one of width 2H (encode → codes ≥ 0, decode, forward)."""

    def __init__(self, sae: SparseAutoencoder) -> None:
        super().__init__()
        if not sae.signed_codes:
            raise ValueError(f"A {sae.architecture} SAE's codes are already ≥ 0: there is nothing to split")
        self.sae = sae
        self.d_in, self.width = sae.d_in, 2 * sae.width

    @property
    def W_dec(self) -> Tensor:
        return split_decoder(self.sae.W_dec, dim=1)

    def normalize(self, raw: Tensor) -> Tensor:
        return self.sae.normalize(raw)

    def encode(self, x: Tensor) -> Tensor:
        return split_codes(self.sae.encode(x))

    def decode(self, codes: Tensor) -> Tensor:
        return codes @ self.W_dec.T + self.sae.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))
