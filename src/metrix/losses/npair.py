"""N-pair and InfoNCE losses: softmax cross-entropy over one positive and many negatives.

* N-pair (Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss Objective", NeurIPS 2016): from a
  batch, one (anchor, positive) pair per class — the class's first two samples — and
  ``L = mean_i −log( e^{f_i·f_i⁺} / Σ_j e^{f_i·f_j⁺} ) + λ · mean(‖f‖²)`` over the anchors and positives,
  with raw dot products as in the paper (λ = ``l2_reg``). With L2-normalised inputs and ``l2_reg=0`` it equals
  pytorch-metric-learning's ``NPairsLoss``.
* InfoNCE with explicit negatives (van den Oord et al., "Representation Learning with Contrastive Predictive
  Coding", 2018): ``L = mean_i −log( e^{s(q_i,p_i)/τ} / (e^{s(q_i,p_i)/τ} + Σ_m e^{s(q_i,n_im)/τ}) )`` with
  cosine similarity; negatives per query (B, M, D), shared (M, D), or ``None`` for in-batch negatives (the
  other queries' positives — "multiple negatives ranking" in sentence embedding work).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metrix._validation import check_loss_input, check_pair, check_positive
from metrix.losses._common import prepare_batch, zero_loss


def _first_two_per_class(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the first and second sample of every class that has two (dense scatter, no loops)."""
    codes = torch.unique(labels, return_inverse=True)[1]
    n_cls, n = int(codes.max()) + 1, labels.shape[0]
    pos = torch.arange(n, device=labels.device)
    big = torch.full((n_cls,), n, device=labels.device)
    first = big.scatter_reduce(0, codes, pos, "amin")
    second = big.scatter_reduce(0, codes, torch.where(pos == first[codes], n, pos), "amin")
    keep = second < n
    return first[keep], second[keep]


def npair_loss(embeddings, labels, *, l2_reg: float = 0.002) -> torch.Tensor:
    """N-pair loss with the paper's L2 regulariser; 0 if no class has two samples in the batch."""
    b = prepare_batch(embeddings, labels)
    anchor_idx, positive_idx = _first_two_per_class(b.labels)
    if anchor_idx.numel() == 0:
        return zero_loss(b.embeddings)
    anchors, positives = b.embeddings[anchor_idx], b.embeddings[positive_idx]
    logits = anchors @ positives.T
    loss = F.cross_entropy(logits, torch.arange(len(anchor_idx), device=logits.device))
    if l2_reg:
        loss = loss + l2_reg * torch.cat([anchors, positives]).pow(2).sum(dim=1).mean()
    return loss


class NPairLoss(nn.Module):
    """Module form of :func:`npair_loss` (no reference set: pairs are formed inside the batch)."""

    def __init__(self, l2_reg: float = 0.002):
        super().__init__()
        self.l2_reg = float(l2_reg)

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None):
        if ref_embeddings is not None or ref_labels is not None:
            raise ValueError("NPairLoss forms its pairs inside the batch; ref_embeddings is not supported")
        return npair_loss(embeddings, labels, l2_reg=self.l2_reg)


def info_nce_loss(query, positive, negatives=None, *, temperature: float = 0.07) -> torch.Tensor:
    """InfoNCE over explicit (query, positive, negatives) triples; see the module docstring."""
    temperature = check_positive(temperature, "temperature")
    q = F.normalize(check_loss_input(query, "query"), dim=1)
    p = check_loss_input(positive, "positive")
    check_pair(q, p, "query", "positive")
    if p.shape[0] != q.shape[0]:
        raise ValueError(f"query has shape {tuple(q.shape)} but positive has shape {tuple(p.shape)}; one positive per query")
    p = F.normalize(p, dim=1)
    if negatives is None:  # in-batch: every other query's positive is a negative
        logits = q @ p.T / temperature
        return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))
    if negatives.ndim == 2:  # shared negatives (M, D)
        n = F.normalize(check_loss_input(negatives, "negatives"), dim=1)
        check_pair(q, n, "query", "negatives")
        neg_logits = q @ n.T
    elif negatives.ndim == 3 and negatives.shape[0] == q.shape[0] and negatives.shape[2] == q.shape[1]:
        if not bool(torch.isfinite(negatives).all()):
            raise ValueError("negatives contains NaN or inf values")
        n = F.normalize(negatives, dim=2)
        neg_logits = torch.einsum("bd,bmd->bm", q, n)
    else:
        raise ValueError(f"negatives must be (M, {q.shape[1]}) or ({q.shape[0]}, M, {q.shape[1]}), got {tuple(negatives.shape)}")
    logits = torch.cat([(q * p).sum(dim=1, keepdim=True), neg_logits], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.int64, device=q.device))


class InfoNCELoss(nn.Module):
    """Module form of :func:`info_nce_loss`: ``loss(query, positive, negatives=None)``."""

    def __init__(self, temperature: float = 0.07):
        super().__init__()
        self.temperature = check_positive(temperature, "temperature")

    def forward(self, query, positive, negatives=None):
        return info_nce_loss(query, positive, negatives, temperature=self.temperature)
