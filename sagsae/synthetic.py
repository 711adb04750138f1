"""Synthetic signed-axis data (SPEC §7, Protocol A) and its ground-truth scores.

Protocol A: K near-orthogonal unit directions v_k in R^d; each axis fires independently with probability p,
with coefficient ±|c| (random sign, |c| ~ U[0.5, 1.5]); plus Gaussian noise of std `noise` per dimension.
The 2K ground-truth *signed* features are +v_k and −v_k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SignedAxisData:
    activations: Tensor  # [n, d]
    coefficients: Tensor  # [n, K], signed
    directions: Tensor  # [K, d], unit rows

    @property
    def true_l0(self) -> float:
        return float((self.coefficients != 0).sum(1).float().mean())


def protocol_a(n: int, d: int = 64, axes: int = 48, p: float = 0.04, noise: float = 0.01, seed: int = 0) -> SignedAxisData:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(axes, d, generator=generator)
    directions /= directions.norm(dim=1, keepdim=True)
    fires = torch.rand(n, axes, generator=generator) < p
    magnitude = 0.5 + torch.rand(n, axes, generator=generator)
    sign = torch.where(torch.rand(n, axes, generator=generator) < 0.5, -1.0, 1.0)
    coefficients = fires * sign * magnitude
    activations = coefficients @ directions + noise * torch.randn(n, d, generator=generator)
    return SignedAxisData(activations, coefficients, directions)


def signed_feature_recovery(decoder: Tensor, directions: Tensor, signed_codes: bool, threshold: float = 0.9) -> float:
    """Share of the 2K signed features ±v_k whose best decoder column has cosine > threshold.

    A signed SAE's column serves both signs (|cos|); a non-negative SAE's column serves only the sign it
    points to, so −v_k needs its own column.
    """
    columns = decoder / decoder.norm(dim=0, keepdim=True)  # [d, H]
    cosines = directions @ columns  # [K, H]
    if signed_codes:
        best = cosines.abs().max(dim=1).values
        return float((best > threshold).float().mean())
    positive = cosines.max(dim=1).values > threshold
    negative = (-cosines).max(dim=1).values > threshold
    return float(torch.cat([positive, negative]).float().mean())


def bipolar_sharing(codes: Tensor, coefficients: Tensor, decoder: Tensor, directions: Tensor, agreement: float = 0.9) -> float:
    """Share of axes whose two signs are carried by one latent: the latent best aligned with v_k fires with
    the coefficient's sign (times the alignment's sign) on ≥ `agreement` of the occurrences of each sign."""
    columns = decoder / decoder.norm(dim=0, keepdim=True)
    cosines = directions @ columns
    latent = cosines.abs().argmax(dim=1)
    orientation = torch.sign(cosines.gather(1, latent[:, None]).squeeze(1))
    shared = []
    for k in range(len(directions)):
        code = codes[:, latent[k]] * orientation[k]
        ok = True
        for sign in (1.0, -1.0):
            occurrences = torch.sign(coefficients[:, k]) == sign
            if occurrences.sum() == 0:
                ok = False
                break
            ok &= bool(((torch.sign(code[occurrences]) == sign).float().mean()) >= agreement)
        shared.append(ok)
    return float(torch.tensor(shared).float().mean())
