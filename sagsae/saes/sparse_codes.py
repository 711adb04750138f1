"""Products over the selected (token, latent) pairs only: the TopK family's training step, and the decode of codes
with a varying number of active latents per token.

A TopK code has k of H latents per token, so a dense backward (grad_π [B, H] times x or W_enc) spends H/k times
the work it needs. As in sparsify's fused encoder, the encoder's and decoder's gradients here touch the selected
pairs only: each product is an `embedding_bag` over a list of pairs, B·k·d multiply-adds instead of B·H·d.
Pairs are given as `rows` (tokens, ascending) and `cols` (latents) of equal length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pair_sums(table: Tensor, bags: Tensor, members: Tensor, weights: Tensor, bag_count: int) -> Tensor:
    """out[i] = Σ_{p: bags[p] = i} weights[p] · table[members[p]], shape [bag_count, table.shape[1]], in the
    table's dtype; `bags` must be ascending (an empty bag sums to zero). The table is made contiguous first:
    on CPU, embedding_bag over a transposed view (W_dec.T, or W_enc, cloned from one) is 40–80× slower
    (0.60–0.74 s against 9–16 ms at B 4096, k 64, H 4608, d 576; a copy costs 8 ms)."""
    counts = torch.bincount(bags, minlength=bag_count)
    offsets = counts.cumsum(0) - counts
    return F.embedding_bag(members, table.contiguous(), offsets, mode="sum",
                           per_sample_weights=weights.to(table.dtype))


def nonzero_decode(codes: Tensor, rows: Tensor, cols: Tensor, W_dec: Tensor) -> Tensor:
    """codes @ W_decᵀ from the non-zero entries alone (`rows`, `cols`: `codes.nonzero()`, rows ascending), for codes
    whose number of active latents varies per token (Gated, SA-GSAE, JumpReLU, ReLU). Reading the entries by index
    sends the codes' gradient to those entries only, and the embedding bag sends W_dec's to the active latents'
    columns: B·L0·d multiply-adds each way instead of B·H·d."""
    return pair_sums(W_dec.T, rows, cols, codes[rows, cols], len(codes))


def row_top_pairs(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(rows, cols) of the k largest scores of every row, rows ascending."""
    cols = scores.topk(k, dim=-1, sorted=False).indices.reshape(-1)
    rows = torch.arange(len(scores), device=scores.device).repeat_interleave(k)
    return rows, cols


def dense_codes(values: Tensor, rows: Tensor, cols: Tensor, like: Tensor) -> Tensor:
    """The [B, H] code (shaped and typed as `like`) holding `values` at the pairs and zero elsewhere."""
    return torch.zeros_like(like).index_put_((rows, cols), values.to(like.dtype))


class _SelectedPreActivations(torch.autograd.Function):
    """π[rows, cols] of π = centered · W_encᵀ + b_enc, read from π already computed without a graph; the
    backward differentiates those pairs only."""

    @staticmethod
    def forward(ctx, centered: Tensor, W_enc: Tensor, b_enc: Tensor, pre: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        ctx.save_for_backward(centered, W_enc, rows, cols)
        ctx.b_enc_dtype = b_enc.dtype
        return pre[rows, cols]

    @staticmethod
    def backward(ctx, grad: Tensor):
        centered, W_enc, rows, cols = ctx.saved_tensors
        grad_centered = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:  # ∂π[b, h]/∂centered[b] = W_enc[h]
            grad_centered = pair_sums(W_enc, rows, cols, grad, len(centered)).to(centered.dtype)
        if ctx.needs_input_grad[1]:  # ∂π[b, h]/∂W_enc[h] = centered[b]: bags by latent
            order = cols.argsort(stable=True)
            grad_W = pair_sums(centered, cols[order], rows[order], grad[order], len(W_enc)).to(W_enc.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(len(W_enc), dtype=ctx.b_enc_dtype, device=grad.device).index_add_(
                0, cols, grad.to(ctx.b_enc_dtype))
        return grad_centered, grad_W, grad_b, None, None, None


def selected_pre_activations(centered: Tensor, W_enc: Tensor, b_enc: Tensor, pre: Tensor, rows: Tensor,
                             cols: Tensor) -> Tensor:
    """The pre-activations of the selected pairs, with gradients to `centered`, W_enc and b_enc from those
    pairs alone (`pre` must equal centered · W_encᵀ + b_enc; it is read, not differentiated)."""
    return _SelectedPreActivations.apply(centered, W_enc, b_enc, pre, rows, cols)
