"""What each latent of a trained SAE responds to, gathered in one streaming pass (torch only).

`LatentStatistics.update` takes one chunk of contexts at a time (token ids [C, T], codes [C, T, H] and which
positions count), so memory is bounded by latents × examples kept, never by the tokens seen. Per latent it keeps
the firing count, how many firings were negative, a histogram of |code| on a log scale for each sign, and three
sets of examples: the top positive codes, the top negative codes (|code| largest) and a uniform sample of all
firings. An example is the token window around the firing position with the latent's code at each token, so a
browser can shade the context without keeping the corpus.

A signed SAE's latent carries two polarities, and the tools built for unsigned SAEs count only codes > 0; here
the two signs are kept apart everywhere (docs/method.md, "Looking inside a trained SAE").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# |code| histogram bins: log10 from HISTOGRAM_LOW to HISTOGRAM_HIGH (codes are in the SAE's normalized units,
# E‖x‖² = d, where firing codes are mostly 0.01–10); smaller and larger codes go to the end bins.
HISTOGRAM_LOW, HISTOGRAM_HIGH, HISTOGRAM_BINS = -3.0, 2.0, 40
SIDES = ("positive", "negative", "random")


def window_positions(context_length: int, before: int, after: int) -> Tensor:
    """[T, W]: for each position t of a context, the positions t − before … t + after (−1 outside the context)."""
    offsets = torch.arange(-before, after + 1)
    positions = torch.arange(context_length)[:, None] + offsets
    return positions.where((positions >= 0) & (positions < context_length), torch.tensor(-1))


class TopExamples:
    """For each of H latents, the k examples with the largest score seen so far, with their token windows.

    A score of −inf marks a position that does not count (not firing on this side, or not a trained position)."""

    def __init__(self, width: int, k: int, window: int) -> None:
        self.scores_HK = torch.full((width, k), -torch.inf)
        self.tokens_HKW = torch.full((width, k, window), -1, dtype=torch.long)
        self.codes_HKW = torch.zeros(width, k, window)

    @property
    def k(self) -> int:
        return self.scores_HK.shape[1]

    def offer(self, scores_NH: Tensor, tokens_NW: Tensor, codes_at: Callable[[Tensor], Tensor]) -> None:
        """Merge one chunk of N positions: `tokens_NW` is each position's token window, `codes_at(index_HK)` the
        latents' codes over the windows of the positions `index_HK` ([H, k, W])."""
        take = min(self.k, scores_NH.shape[0])
        chunk_scores_HK, index_HK = scores_NH.topk(take, dim=0, sorted=False)
        chunk_scores_HK, index_HK = chunk_scores_HK.T, index_HK.T
        scores = torch.cat([self.scores_HK, chunk_scores_HK], dim=1)
        tokens = torch.cat([self.tokens_HKW, tokens_NW[index_HK]], dim=1)
        codes = torch.cat([self.codes_HKW, codes_at(index_HK)], dim=1)
        self.scores_HK, keep_HK = scores.topk(self.k, dim=1)
        self.tokens_HKW = tokens.gather(1, keep_HK[..., None].expand(-1, -1, tokens.shape[2]))
        self.codes_HKW = codes.gather(1, keep_HK[..., None].expand(-1, -1, codes.shape[2]))

    def examples(self, latent: int, center: int) -> list[tuple[float, list[int], list[float], int]]:
        """(score, window token ids, window codes, place of the chosen token) of one latent's kept examples, best
        first, the window's padding dropped (`center` is the chosen token's place in a full window)."""
        found = []
        for score, tokens, codes in zip(self.scores_HK[latent].tolist(), self.tokens_HKW[latent].tolist(),
                                        self.codes_HKW[latent].tolist()):
            if score == -torch.inf:
                break
            kept = [i for i, token in enumerate(tokens) if token >= 0]
            found.append((score, [tokens[i] for i in kept], [codes[i] for i in kept], kept.index(center)))
        return found


@dataclass
class LatentSummary:
    """One latent's figures after the pass (codes in the SAE's normalized units)."""

    index: int
    density: float  # share of counted tokens where the code is non-zero
    negative_share: float  # share of those firings with a negative code
    max_positive: float
    max_negative: float  # the largest |code| among negative firings (0 if none)
    histogram_positive: list[int]
    histogram_negative: list[int]


class LatentStatistics:
    """The streaming accumulator of one pass (see the module docstring).

    Args:
        width: latents H.
        top_k: examples kept per latent for each sign.
        random_k: firing examples sampled uniformly per latent.
        before, after: tokens shown before and after the firing token.
        seed: the sample's random keys.
    """

    def __init__(self, width: int, top_k: int = 20, random_k: int = 5, before: int = 12, after: int = 4,
                 seed: int = 0) -> None:
        self.width, self.before, self.after = width, before, after
        window = before + after + 1
        self.top = {"positive": TopExamples(width, top_k, window), "negative": TopExamples(width, top_k, window),
                    "random": TopExamples(width, random_k, window)}
        self.tokens_counted = 0
        self.fires_H = torch.zeros(width, dtype=torch.long)
        self.negative_fires_H = torch.zeros(width, dtype=torch.long)
        self.histogram_H2B = torch.zeros(width, 2, HISTOGRAM_BINS, dtype=torch.long)
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def update(self, tokens_CT: Tensor, codes_CTH: Tensor, counted_CT: Tensor) -> None:
        """One chunk of C contexts of T tokens: their token ids, the SAE's codes and the positions that count
        (positions that do not count are shown in windows but never chosen, counted or binned)."""
        contexts, length, width = codes_CTH.shape
        codes_CTH = codes_CTH.float() * counted_CT[..., None]
        codes_NH = codes_CTH.reshape(-1, width)
        counted_N = counted_CT.reshape(-1)
        windows_TW = window_positions(length, self.before, self.after)
        offsets_C = torch.arange(contexts)[:, None, None] * length
        flat_CTW = (windows_TW[None] + offsets_C).where(windows_TW[None] >= 0, torch.tensor(-1))
        flat_NW = flat_CTW.reshape(-1, windows_TW.shape[1])  # each position's window, as flat positions
        tokens_N = tokens_CT.reshape(-1)
        tokens_NW = tokens_N[flat_NW.clamp(min=0)].where(flat_NW >= 0, torch.tensor(-1))
        latent_H11 = torch.arange(width)[:, None, None]

        def codes_at(index_HK: Tensor) -> Tensor:
            positions_HKW = flat_NW[index_HK]
            return codes_NH[positions_HKW.clamp(min=0), latent_H11] * (positions_HKW >= 0)

        firing_NH = codes_NH != 0
        negative_NH = codes_NH < 0
        never = torch.tensor(-torch.inf)
        self.top["positive"].offer(codes_NH.where(codes_NH > 0, never), tokens_NW, codes_at)
        self.top["negative"].offer((-codes_NH).where(negative_NH, never), tokens_NW, codes_at)
        keys_NH = torch.rand(codes_NH.shape, generator=self.generator)
        self.top["random"].offer(keys_NH.where(firing_NH, never), tokens_NW, codes_at)

        self.tokens_counted += int(counted_N.sum())
        self.fires_H += firing_NH.sum(0)
        self.negative_fires_H += negative_NH.sum(0)
        position, latent = firing_NH.nonzero(as_tuple=True)
        values = codes_NH[position, latent]
        bins = histogram_bin(values.abs())
        flat = (latent * 2 + (values < 0).long()) * HISTOGRAM_BINS + bins
        self.histogram_H2B += torch.bincount(flat, minlength=self.histogram_H2B.numel()).view_as(self.histogram_H2B)

    def summary(self, latent: int) -> LatentSummary:
        fires = int(self.fires_H[latent])
        best = {side: self.top[side].scores_HK[latent, 0].item() for side in ("positive", "negative")}
        return LatentSummary(
            index=latent, density=fires / max(self.tokens_counted, 1),
            negative_share=int(self.negative_fires_H[latent]) / fires if fires else 0.0,
            max_positive=max(best["positive"], 0.0), max_negative=max(best["negative"], 0.0),
            histogram_positive=self.histogram_H2B[latent, 0].tolist(),
            histogram_negative=self.histogram_H2B[latent, 1].tolist())


def histogram_bin(magnitudes: Tensor) -> Tensor:
    """The log10 bin of each |code| (clamped into the end bins)."""
    position = (magnitudes.log10() - HISTOGRAM_LOW) / (HISTOGRAM_HIGH - HISTOGRAM_LOW) * HISTOGRAM_BINS
    return position.floor().long().clamp(0, HISTOGRAM_BINS - 1)


def histogram_edges() -> list[float]:
    """The |code| at each bin edge (HISTOGRAM_BINS + 1 values)."""
    return torch.logspace(HISTOGRAM_LOW, HISTOGRAM_HIGH, HISTOGRAM_BINS + 1).tolist()


@torch.no_grad()
def logit_effects(directions_HD: Tensor, to_logits: Callable[[Tensor], Tensor], k: int = 10,
                  chunk: int = 256) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each latent's direct effect on the next-token logits (its decoder direction through the LM's final norm
    and unembedding, `to_logits`): the k most promoted and k most suppressed tokens, as (promoted ids [H, k],
    their logit changes, suppressed ids, their logit changes). A negative code swaps the two lists."""
    promoted, promoted_values, suppressed, suppressed_values = [], [], [], []
    for start in range(0, len(directions_HD), chunk):
        logits = to_logits(directions_HD[start:start + chunk]).float()
        logits = logits - logits.mean(-1, keepdim=True)  # a uniform shift changes no probability
        top = logits.topk(k, dim=-1)
        bottom = logits.topk(k, dim=-1, largest=False)
        promoted.append(top.indices), promoted_values.append(top.values)
        suppressed.append(bottom.indices), suppressed_values.append(bottom.values)
    return torch.cat(promoted), torch.cat(promoted_values), torch.cat(suppressed), torch.cat(suppressed_values)
