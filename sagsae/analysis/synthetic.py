"""Synthetic signed-axis data (Protocols A–C, and the hierarchy H) and its ground-truth scores.

All protocols: K near-orthogonal unit directions v_k in R^d, magnitudes |c| ~ U[0.5, 1.5], Gaussian noise of
std `noise` per dimension. The 2K ground-truth *signed* features are +v_k and −v_k.
- A: each axis fires with probability p, with a random sign.
- B: the features +v_k and −v_k each fire with probability p; they fire together with probability
  (1 + ρ)·p², ρ ∈ [−1, 0] (ρ = −1: never together, ρ = 0: independent). The protocol's "within-pair correlation ρ"
  cannot be a Pearson correlation at small p (its minimum is −p/(1 − p)), so ρ scales the co-occurrence;
  `pair_correlation` reports the Pearson value actually reached. Both firing: (c⁺ − c⁻)·v_k.
- C: a share q of the axes is bipolar (as in A), the others fire positively only.
- H (a hierarchy, for feature absorption): `parents` axes, each with `children` axes that fire only with it. A
  parent fires with probability p; then one of its children fires with probability q. With `bipolar_parents` a
  parent takes a random sign and its child the same sign, else both are positive. `absorption` scores it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SignedAxisData:
    activations: Tensor  # [n, d]
    coefficients: Tensor  # [n, K], signed (Protocol B: the sum of both features' signed coefficients)
    directions: Tensor  # [K, d], unit rows
    positive: Tensor | None = None  # Protocol B: which samples fire +v_k
    negative: Tensor | None = None  # Protocol B: which samples fire −v_k
    parent_of: Tensor | None = None  # Protocol H: each axis's parent axis, −1 for a parent [K]

    @property
    def true_l0(self) -> float:
        return float((self.coefficients != 0).sum(1).float().mean())


def _directions(d: int, axes: int, generator: torch.Generator) -> Tensor:
    directions = torch.randn(axes, d, generator=generator)
    return directions / directions.norm(dim=1, keepdim=True)


def _magnitudes(n: int, axes: int, generator: torch.Generator) -> Tensor:
    return 0.5 + torch.rand(n, axes, generator=generator)


def _assemble(coefficients: Tensor, directions: Tensor, noise: float, generator: torch.Generator) -> SignedAxisData:
    n, d = len(coefficients), directions.shape[1]
    activations = coefficients @ directions + noise * torch.randn(n, d, generator=generator)
    return SignedAxisData(activations, coefficients, directions)


def protocol_a(n: int, d: int = 64, axes: int = 48, p: float = 0.04, noise: float = 0.01, seed: int = 0) -> SignedAxisData:
    return protocol_c(n, d, axes, p, q=1.0, noise=noise, seed=seed)


def protocol_b(n: int, rho: float, d: int = 64, axes: int = 48, p: float = 0.04, noise: float = 0.01,
               seed: int = 0) -> SignedAxisData:
    if not -1 <= rho <= 0:
        raise ValueError(f"rho must be in [-1, 0], got {rho}")
    generator = torch.Generator().manual_seed(seed)
    directions = _directions(d, axes, generator)
    both = (1 + rho) * p * p
    draw = torch.rand(n, axes, generator=generator)  # one categorical draw per pair: both, +only, −only, none
    positive = (draw < both) | ((draw >= both) & (draw < p))
    negative = (draw < both) | ((draw >= p) & (draw < 2 * p - both))
    coefficients = positive * _magnitudes(n, axes, generator) - negative * _magnitudes(n, axes, generator)
    data = _assemble(coefficients, directions, noise, generator)
    data.positive, data.negative = positive, negative
    return data


def protocol_c(n: int, d: int = 64, axes: int = 48, p: float = 0.04, q: float = 0.5, noise: float = 0.01,
               seed: int = 0) -> SignedAxisData:
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    generator = torch.Generator().manual_seed(seed)
    directions = _directions(d, axes, generator)
    fires = torch.rand(n, axes, generator=generator) < p
    magnitude = _magnitudes(n, axes, generator)
    bipolar = torch.arange(axes) < round(q * axes)
    negative = (torch.rand(n, axes, generator=generator) < 0.5) & bipolar
    coefficients = fires * torch.where(negative, -1.0, 1.0) * magnitude
    return _assemble(coefficients, directions, noise, generator)


def protocol_h(n: int, d: int = 64, parents: int = 12, children: int = 3, p: float = 0.1, q: float = 0.6,
               bipolar_parents: bool = True, noise: float = 0.01, seed: int = 0) -> SignedAxisData:
    """Axes 0 … parents − 1 are the parents; child j of parent i is axis parents + i·children + j."""
    if not (0 < p <= 1 and 0 <= q <= 1):
        raise ValueError(f"p must be in (0, 1] and q in [0, 1], got p={p}, q={q}")
    generator = torch.Generator().manual_seed(seed)
    axes = parents * (1 + children)
    directions = _directions(d, axes, generator)
    fires = torch.rand(n, parents, generator=generator) < p
    sign = torch.where((torch.rand(n, parents, generator=generator) < 0.5) & bipolar_parents, -1.0, 1.0)
    child_fires = fires & (torch.rand(n, parents, generator=generator) < q)
    child = torch.randint(children, (n, parents), generator=generator)
    magnitude = _magnitudes(n, axes, generator)
    coefficients = torch.zeros(n, axes)
    coefficients[:, :parents] = fires * sign * magnitude[:, :parents]
    child_axis = parents + torch.arange(parents) * children + child  # [n, parents]
    rows = torch.arange(n)[:, None].expand(-1, parents)
    coefficients[rows[child_fires], child_axis[child_fires]] = (sign * magnitude[:, parents:2 * parents])[child_fires]
    data = _assemble(coefficients, directions, noise, generator)
    data.parent_of = torch.cat([torch.full((parents,), -1), torch.arange(parents).repeat_interleave(children)])
    return data


def best_latents(decoder: Tensor, features: Tensor, signed_codes: bool) -> tuple[Tensor, Tensor]:
    """For each signed feature direction [F, d]: (the latent that carries it, the sign its code takes then). A
    signed SAE's latent serves both signs of its column (|cos|); a non-negative one only the sign it points to."""
    cosines = features @ (decoder / decoder.norm(dim=0, keepdim=True))  # [F, H]
    if signed_codes:
        latent = cosines.abs().argmax(dim=1)
        return latent, torch.sign(cosines.gather(1, latent[:, None]).squeeze(1))
    return cosines.argmax(dim=1), torch.ones(len(features))


def absorption(codes: Tensor, coefficients: Tensor, decoder: Tensor, directions: Tensor, parent_of: Tensor,
               signed_codes: bool) -> float:
    """Feature absorption (Protocol H): of the samples where a parent fires together with one of its children, the
    share on which the parent's latent stays silent (or takes the wrong sign) while the child's latent fires.
    Each signed feature ±v is matched to its latent by `best_latents`."""
    missed, counted = 0, 0
    for child in (parent_of >= 0).nonzero().flatten().tolist():
        parent = int(parent_of[child])
        together = (coefficients[:, child] != 0) & (coefficients[:, parent] != 0)
        for sign in (1.0, -1.0):
            rows = together & (torch.sign(coefficients[:, parent]) == sign)
            if not rows.any():
                continue
            latents, code_signs = best_latents(decoder, sign * directions[[parent, child]], signed_codes)
            parent_code, child_code = codes[rows][:, latents[0]], codes[rows][:, latents[1]]
            parent_missed = torch.sign(parent_code) != code_signs[0]
            child_fired = torch.sign(child_code) == code_signs[1]
            missed += int((parent_missed & child_fired).sum())
            counted += int(rows.sum())
    return missed / counted if counted else float("nan")


def pair_correlation(data: SignedAxisData) -> float:
    """Mean Pearson correlation between the +v_k and −v_k firing indicators (Protocol B)."""
    plus, minus = data.positive.double(), data.negative.double()
    plus, minus = plus - plus.mean(0), minus - minus.mean(0)
    return float(((plus * minus).mean(0) / (plus.std(0, unbiased=False) * minus.std(0, unbiased=False))).mean())


def signed_feature_recovery(decoder: Tensor, directions: Tensor, signed_codes: bool, threshold: float = 0.9,
                            coefficients: Tensor | None = None) -> float:
    """Share of the signed features ±v_k whose best decoder column has cosine > threshold: all 2K, or, given
    the coefficients, those that occur in them (Protocol C's unipolar axes have no −v_k).

    A signed SAE's column serves both signs (|cos|); a non-negative SAE's column serves only the sign it
    points to, so −v_k needs its own column.
    """
    columns = decoder / decoder.norm(dim=0, keepdim=True)  # [d, H]
    cosines = directions @ columns  # [K, H]
    if signed_codes:
        found = cosines.abs().max(dim=1).values > threshold
        found = torch.cat([found, found])
    else:
        found = torch.cat([cosines.max(dim=1).values > threshold, (-cosines).max(dim=1).values > threshold])
    if coefficients is None:
        return float(found.float().mean())
    occurs = torch.cat([(coefficients > 0).any(0), (coefficients < 0).any(0)])
    return float(found[occurs].float().mean())


def bipolar_sharing(codes: Tensor, coefficients: Tensor, decoder: Tensor, directions: Tensor, agreement: float = 0.9) -> float:
    """Share of bipolar axes (both signs occur) whose two signs are carried by one latent: the latent best
    aligned with v_k fires with the coefficient's sign (times the alignment's sign) on ≥ `agreement` of the
    occurrences of each sign."""
    bipolar = (coefficients > 0).any(0) & (coefficients < 0).any(0)
    if not bipolar.any():
        return float("nan")
    coefficients, directions = coefficients[:, bipolar], directions[bipolar]
    columns = decoder / decoder.norm(dim=0, keepdim=True)
    cosines = directions @ columns
    latent = cosines.abs().argmax(dim=1)
    orientation = torch.sign(cosines.gather(1, latent[:, None]).squeeze(1))
    shared = []
    for k in range(len(directions)):
        code = codes[:, latent[k]] * orientation[k]
        shared.append(all(bool((torch.sign(code[torch.sign(coefficients[:, k]) == sign]) == sign).float().mean()
                               >= agreement) for sign in (1.0, -1.0)))
    return float(torch.tensor(shared).float().mean())


def score_against_truth(sae, activations: Tensor, coefficients: Tensor, directions: Tensor,
                        parent_of: Tensor | None = None) -> dict[str, float]:
    """Ground-truth scores of a trained SAE (`sagsae.saes`) on held-out synthetic samples (docs/method.md), with
    the absorption score where the protocol has a hierarchy (`parent_of`)."""
    with torch.no_grad():
        codes = sae.encode(sae.normalize(activations))
    decoder = sae.W_dec.detach()
    scores = {"recovery": signed_feature_recovery(decoder, directions, sae.signed_codes, coefficients=coefficients),
              "bipolar_sharing": bipolar_sharing(codes, coefficients, decoder, directions),
              "true_l0": float((coefficients != 0).sum(1).float().mean())}
    if parent_of is not None:
        scores["absorption"] = absorption(codes, coefficients, decoder, directions, parent_of, sae.signed_codes)
    return scores
