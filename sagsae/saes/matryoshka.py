"""Matryoshka nesting, for any architecture: every prefix of the latents must reconstruct the input on its own
(Bussmann et al.; Nabeshima, arXiv 2503.17547; docs/method.md, "Matryoshka SAEs").

The latents split into groups at the prefix sizes m_1 < … < m_L = H. The prefix reconstructions are cumulative
sums of the groups' decodes, x̂_l = b_dec + Σ_{g ≤ l} W_dec[:, group g] f[group g], so every level together costs
one decode of the codes, not one decode per level."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sagsae.saes.sparse_codes import pair_sums


@dataclass(frozen=True)
class Nesting:
    """The prefix sizes (increasing, the last one the width), one loss weight per prefix below the full width
    (the full width's reconstruction keeps weight 1, as without nesting), and whether each training step draws
    its own prefix sizes instead (`random_prefixes`, as in Nabeshima's original)."""

    widths: tuple[int, ...]
    weights: tuple[float, ...]
    random_prefixes: bool = False

    @classmethod
    def checked(cls, width: int, widths: Sequence[int], weights: Sequence[float] | None = None,
                random_prefixes: bool = False) -> Nesting:
        widths = tuple(int(m) for m in widths)
        if len(widths) < 2 or widths[-1] != width or any(b <= a for a, b in zip(widths, widths[1:])) or widths[0] < 1:
            raise ValueError(f"matryoshka_widths must increase from at least 1 and end at the width ({width}), with "
                             f"two levels or more, e.g. [{max(1, width // 8)}, {max(2, width // 2)}, {width}]; "
                             f"got {list(widths)}")
        weights = (1.0,) * (len(widths) - 1) if weights is None else tuple(float(w) for w in weights)
        if len(weights) != len(widths) - 1 or any(not w >= 0 for w in weights):
            raise ValueError(f"matryoshka_weights needs one non-negative weight per prefix below the full width "
                             f"({len(widths) - 1} for {list(widths)}), got {list(weights)}")
        return cls(widths, weights, bool(random_prefixes))

    def prefix_ends(self, width: int, generator: torch.Generator | None = None) -> tuple[int, ...]:
        """The prefix sizes below the full width for one step: the fixed ones, or with `random_prefixes` (and a
        generator, in training) as many distinct sizes drawn uniformly from 1 … width − 1."""
        if not self.random_prefixes or generator is None:
            return self.widths[:-1]
        drawn = torch.randperm(width - 1, generator=generator)[:len(self.widths) - 1] + 1
        return tuple(sorted(int(m) for m in drawn))


def cumulative_decodes(codes: Tensor, W_dec: Tensor, b_dec: Tensor, ends: Sequence[int],
                       pairs: tuple[Tensor, Tensor] | None = None) -> list[Tensor]:
    """[x̂ of codes[:, :m] for m in ends] + [x̂ of all codes], each with b_dec. With `pairs` (rows ascending, cols:
    the non-zero entries) the groups decode from those entries alone, as `nonzero_decode` does; else densely."""
    if pairs is not None:
        rows, cols = pairs
        return cumulative_pair_decodes(W_dec, b_dec, rows, cols, codes[rows, cols], len(codes), ends)
    bounds = [0, *ends, codes.shape[-1]]
    total = b_dec.expand(len(codes), -1)
    levels = []
    for start, end in zip(bounds, bounds[1:]):
        total = total + codes[:, start:end] @ W_dec[:, start:end].T
        levels.append(total)
    return levels


def cumulative_pair_decodes(W_dec: Tensor, b_dec: Tensor, rows: Tensor, cols: Tensor, values: Tensor,
                            batch: int, ends: Sequence[int]) -> list[Tensor]:
    """The same from selected (row, col, value) triples alone (the TopK family's training step)."""
    if not ends:  # one group: every pair, without masks
        return [pair_sums(W_dec.T, rows, cols, values, batch) + b_dec]
    group = torch.bucketize(cols, torch.tensor(list(ends), device=cols.device), right=True)
    total = b_dec.expand(batch, -1)
    levels = []
    for index in range(len(ends) + 1):
        keep = group == index
        total = total + pair_sums(W_dec.T, rows[keep], cols[keep], values[keep], batch)
        levels.append(total)
    return levels
