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

import torch

from metrix._validation import check_choice, check_embeddings, check_labels, check_pair

REDUCTIONS = ("mean_nonzero", "mean", "sum")


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


def label_masks(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (B, R) masks of positive pairs (same label, not self) and negative pairs."""
    same = batch.labels[:, None] == batch.ref_labels[None, :]
    neg = ~same
    if batch.same_set:
        same = same & ~torch.eye(same.shape[0], dtype=torch.bool, device=same.device)
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


def reduce(values: torch.Tensor, mask: torch.Tensor, reduction: str, *graph: torch.Tensor) -> torch.Tensor:
    """Reduce ``values`` over ``mask``.

    ``mean_nonzero`` averages over the masked entries whose value is > 0 (the entries that carry
    gradient; pytorch-metric-learning's ``AvgNonZeroReducer``), ``mean`` over all masked entries.
    An empty selection gives :func:`zero_loss`.
    """
    check_choice(reduction, "reduction", REDUCTIONS)
    masked = torch.where(mask, values, torch.zeros_like(values))
    if reduction == "sum":
        return masked.sum() if bool(mask.any()) else zero_loss(values, *graph)
    count = (mask & (values > 0)).sum() if reduction == "mean_nonzero" else mask.sum()
    if int(count) == 0:
        return zero_loss(values, *graph)
    return masked.sum() / count


def log1p_sum_exp(x: torch.Tensor, mask: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``log(1 + Σ_{mask} exp(x))`` along ``dim``, stable and with no NaN for empty masks.

    The "1" is an implicit extra logit of 0 (as in Multi-Similarity and Proxy-Anchor losses).
    """
    x = x.masked_fill(~mask, -torch.inf)
    # shift by max(0, max x); the shift is a constant for autograd so gradients stay exact
    shift = x.amax(dim=dim, keepdim=True).clamp_min(0).detach()
    total = torch.exp(-shift) + torch.exp(x - shift).sum(dim=dim, keepdim=True)
    return (shift + torch.log(total)).squeeze(dim)
