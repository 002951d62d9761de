"""Shared pieces of every loss: input checks, label masks over the B×R matrix, reductions.

Conventions (all losses):

* call ``loss(embeddings, labels, ref_embeddings=None, ref_labels=None)``; with no reference the
  batch is compared with itself and an item is never its own positive;
* a batch that gives a loss no valid term (one class, no positive pair, ...) returns an exact 0
  that still has a gradient path to the inputs (so ``backward()`` works and changes nothing);
* embeddings with NaN/inf raise ``ValueError`` instead of propagating.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from metrix._validation import check_choice, check_embeddings, check_labels, check_pair

REDUCTIONS = ("mean_nonzero", "mean", "sum")


class Pairs(NamedTuple):
    """Selected anchor–positive and anchor–negative pairs as float (B, R) masks or non-negative weights.

    Miners return it; pair and triplet losses take it as ``pairs=`` and use only the label-valid pairs it
    keeps (a triplet loss forms its triplets from the kept positives × kept negatives of each anchor).
    """

    pos: torch.Tensor
    neg: torch.Tensor


@dataclass
class Batch:
    embeddings: torch.Tensor
    labels: torch.Tensor
    ref_embeddings: torch.Tensor
    ref_labels: torch.Tensor
    same_set: bool  # ref is the batch itself: exclude the diagonal from positives


def prepare_batch(embeddings, labels, ref_embeddings=None, ref_labels=None) -> Batch:
    emb = check_embeddings(embeddings, "embeddings")
    lab = check_labels(labels, emb.shape[0], "labels", device=emb.device)
    if ref_embeddings is None:
        if ref_labels is not None:
            raise ValueError("ref_labels given without ref_embeddings")
        return Batch(emb, lab, emb, lab, True)
    ref = check_embeddings(ref_embeddings, "ref_embeddings")
    check_pair(emb, ref, "embeddings", "ref_embeddings")
    if ref_labels is None:
        raise ValueError("ref_embeddings given without ref_labels")
    ref_lab = check_labels(ref_labels, ref.shape[0], "ref_labels", device=emb.device)
    return Batch(emb, lab, ref, ref_lab, False)


def label_masks(batch: Batch, dtype: torch.dtype | None = None, pairs: Pairs | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float 0/1 (B, R) masks of positive pairs (same label, not self) and negative pairs.

    Float masks on purpose: multiplying by a 0/1 matrix is ~15× faster on CPU than ``torch.where``
    or ``masked_fill`` with a boolean mask, and the losses' hot paths are element-wise over B×R.
    With ``pairs`` (from a miner), only the pairs it selects are kept (``> 0`` counts as selected).
    """
    dtype = dtype or batch.embeddings.dtype
    same = (batch.labels[:, None] == batch.ref_labels[None, :]).to(dtype)
    neg = 1.0 - same
    if batch.same_set:
        same.fill_diagonal_(0)
    if pairs is not None:
        shape = tuple(same.shape)
        for name, mask in (("pos", pairs.pos), ("neg", pairs.neg)):
            if tuple(mask.shape) != shape:
                raise ValueError(f"pairs.{name} has shape {tuple(mask.shape)} but the batch needs {shape}")
        same = same * (pairs.pos > 0).to(dtype)
        neg = neg * (pairs.neg > 0).to(dtype)
    return same, neg


def zero_loss(*tensors: torch.Tensor) -> torch.Tensor:
    """An exact 0 connected to the graph of ``tensors`` (gradient 0, backward() works)."""
    out = None
    for t in tensors:
        if t is not None and t.requires_grad:
            term = t.sum() * 0.0
            out = term if out is None else out + term
    if out is None:
        ref = next(t for t in tensors if t is not None)
        out = torch.zeros((), dtype=ref.dtype, device=ref.device)
    return out


def reduce(masked: torch.Tensor, n_selected, reduction: str, *graph: torch.Tensor) -> torch.Tensor:
    """Reduce non-negative per-term losses that are already 0 outside the selection.

    ``mean_nonzero`` averages over the terms > 0 (the ones that carry gradient; pytorch-metric-learning's
    ``AvgNonZeroReducer``), ``mean`` over the ``n_selected`` selected terms, ``sum`` sums.
    An empty selection gives :func:`zero_loss`.
    """
    check_choice(reduction, "reduction", REDUCTIONS)
    count = int(torch.count_nonzero(masked)) if reduction == "mean_nonzero" else int(n_selected)
    if count == 0:
        return zero_loss(masked, *graph)
    total = masked.sum()
    return total if reduction == "sum" else total / count


def mask_logits(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` where ``mask`` is 1, a huge negative number where it is 0 (exp → exactly 0).

    Additive, so it is one fused float pass instead of a slow boolean ``masked_fill``; the value
    ``-finfo.max`` absorbs any finite ``x`` without overflowing to ``-inf``.
    """
    return x + (mask - 1.0) * torch.finfo(x.dtype).max


def masked_logsumexp(x: torch.Tensor, mask: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``log Σ_{mask} exp(x)`` along ``dim`` (float 0/1 ``mask``); an empty selection gives 0, not −inf."""
    return torch.logsumexp(mask_logits(x, mask), dim=dim) * mask.amax(dim=dim)


def log1p_sum_exp(x: torch.Tensor, mask: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``log(1 + Σ_{mask} exp(x))`` along ``dim`` (float 0/1 ``mask``), stable, 0 for empty masks.

    The "1" is an implicit extra logit of 0 (as in Multi-Similarity and Proxy-Anchor losses).
    """
    x = mask_logits(x, mask)
    # shift by max(0, max x); the shift is a constant for autograd so gradients stay exact
    shift = x.amax(dim=dim, keepdim=True).clamp_min(0).detach()
    total = torch.exp(-shift) + torch.exp(x - shift).sum(dim=dim, keepdim=True)
    return (shift + torch.log(total)).squeeze(dim)
