"""Learning-to-rank losses for (query, item, relevance) data, and negative sampling.

Inputs are dense per-query lists: ``scores`` and ``relevance`` of shape (Q, L) — the model's score of each
of a query's L candidate items and their graded relevance — and an optional boolean ``mask`` (Q, L) marking
real items (lists of different lengths are padded). Pairwise losses use the (Q, L, L) comparison within each
list, which is small (L is the candidates of one query).

* pointwise: regression of scores on relevance (``mse``) or binary relevance (``bce``);
* RankNet (Burges et al., ICML 2005): ``log(1 + e^{−(s_i − s_j)})`` for every pair with ``rel_i > rel_j``;
* pairwise margin: ``[m − (s_i − s_j)]_+`` for the same pairs;
* ListNet (Cao et al., ICML 2007): cross-entropy between the top-one distributions ``softmax(rel)`` and
  ``softmax(s)``;
* ListMLE (Xia et al., ICML 2008): ``−log P(π | s)`` of the permutation ``π`` that sorts by relevance
  (Plackett–Luce; ties keep list order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metrix._validation import check_choice, check_loss_input, check_pair

def _check_lists(scores, relevance, mask):
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2 or not scores.is_floating_point():
        raise ValueError(f"scores must be a 2-D floating tensor (queries, items), got {getattr(scores, 'shape', type(scores))}")
    relevance = torch.as_tensor(relevance, device=scores.device)
    if relevance.shape != scores.shape:
        raise ValueError(f"relevance has shape {tuple(relevance.shape)} but scores has shape {tuple(scores.shape)}")
    relevance = relevance.to(scores.dtype)
    mask = torch.ones_like(scores, dtype=torch.bool) if mask is None else torch.as_tensor(mask, device=scores.device).bool()
    if mask.shape != scores.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but scores has shape {tuple(scores.shape)}")
    for name, t in (("scores", scores), ("relevance", relevance)):
        if not bool(torch.isfinite(torch.where(mask, t, torch.zeros_like(t))).all()):
            raise ValueError(f"{name} contains NaN or inf values")
    return relevance, mask


def pointwise_loss(scores, relevance, mask=None, *, objective: str = "mse") -> torch.Tensor:
    """Mean squared error to the relevance (``mse``) or binary cross-entropy with relevance in [0, 1] (``bce``)."""
    check_choice(objective, "objective", ("mse", "bce"))
    relevance, mask = _check_lists(scores, relevance, mask)
    if objective == "bce" and bool(((relevance < 0) | (relevance > 1))[mask].any()):
        raise ValueError("objective='bce' needs relevance in [0, 1]")
    per_item = (scores - relevance) ** 2 if objective == "mse" else F.binary_cross_entropy_with_logits(scores, relevance, reduction="none")
    return (per_item * mask).sum() / mask.sum().clamp_min(1)


def _ordered_pairs(relevance, mask):
    """(Q, L, L) float mask of pairs (i, j) in one list with ``rel_i > rel_j``."""
    both = mask[:, :, None] & mask[:, None, :]
    return ((relevance[:, :, None] > relevance[:, None, :]) & both).to(relevance.dtype)


def ranknet_loss(scores, relevance, mask=None) -> torch.Tensor:
    """RankNet: mean over ordered pairs of ``softplus(s_j − s_i)``; 0 if no list has two relevance levels."""
    relevance, mask = _check_lists(scores, relevance, mask)
    pairs = _ordered_pairs(relevance, mask)
    diff = scores[:, :, None] - scores[:, None, :]
    count = pairs.sum()
    return (F.softplus(-diff) * pairs).sum() / count if float(count) > 0 else scores.sum() * 0.0


def pairwise_margin_loss(scores, relevance, mask=None, *, margin: float = 1.0) -> torch.Tensor:
    """Margin ranking: mean over ordered pairs of ``[m − (s_i − s_j)]_+``."""
    relevance, mask = _check_lists(scores, relevance, mask)
    pairs = _ordered_pairs(relevance, mask)
    diff = scores[:, :, None] - scores[:, None, :]
    count = pairs.sum()
    return (torch.relu(margin - diff) * pairs).sum() / count if float(count) > 0 else scores.sum() * 0.0


def listnet_loss(scores, relevance, mask=None) -> torch.Tensor:
    """ListNet top-one cross-entropy, mean over queries."""
    relevance, mask = _check_lists(scores, relevance, mask)
    neg = torch.finfo(scores.dtype).min
    target = F.softmax(relevance.masked_fill(~mask, neg), dim=1)
    log_p = F.log_softmax(scores.masked_fill(~mask, neg), dim=1)
    return -(target * log_p.masked_fill(~mask, 0.0)).sum(dim=1).mean()


def listmle_loss(scores, relevance, mask=None) -> torch.Tensor:
    """ListMLE: Plackett–Luce negative log-likelihood of the relevance order, mean over queries.

    ``−log P = Σ_k [log Σ_{j≥k} e^{s_{π_j}} − s_{π_k}]`` over the real items of each list.
    """
    relevance, mask = _check_lists(scores, relevance, mask)
    # padded items sort last and are left out of every suffix sum
    key = relevance.masked_fill(~mask, torch.finfo(relevance.dtype).min)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    s = scores.gather(1, order)
    real = mask.gather(1, order)
    s_masked = s.masked_fill(~real, torch.finfo(scores.dtype).min)
    suffix = torch.logcumsumexp(s_masked.flip(1), dim=1).flip(1)
    return ((suffix - s) * real).sum(dim=1).mean()


class RankingLoss(nn.Module):
    """One module for the ranking losses: ``RankingLoss("ranknet")(scores, relevance, mask=None)``."""

    KINDS = {"pointwise": pointwise_loss, "ranknet": ranknet_loss, "margin": pairwise_margin_loss,
             "listnet": listnet_loss, "listmle": listmle_loss}

    def __init__(self, kind: str = "ranknet", **options):
        super().__init__()
        check_choice(kind, "kind", self.KINDS)
        self.kind, self.options = kind, options

    def forward(self, scores, relevance, mask=None):
        return self.KINDS[self.kind](scores, relevance, mask, **self.options)


def negative_sampling_loss(anchor, positive, negatives) -> torch.Tensor:
    """Negative sampling / binary NCE (Mikolov et al., "Distributed Representations of Words and Phrases",
    NeurIPS 2013): ``−log σ(a·p) − Σ_m log σ(−a·n_m)``, mean over anchors, with raw dot products.

    ``negatives`` is (B, M, D) — M sampled negatives per anchor — or (M, D) shared by all anchors.
    """
    a = check_loss_input(anchor, "anchor")
    p = check_loss_input(positive, "positive")
    check_pair(a, p, "anchor", "positive")
    if p.shape[0] != a.shape[0]:
        raise ValueError(f"anchor has shape {tuple(a.shape)} but positive has shape {tuple(p.shape)}; one positive per anchor")
    if negatives.ndim == 2:
        n = check_loss_input(negatives, "negatives")
        check_pair(a, n, "anchor", "negatives")
        neg_logits = a @ n.T
    elif negatives.ndim == 3 and negatives.shape[0] == a.shape[0] and negatives.shape[2] == a.shape[1]:
        if not bool(torch.isfinite(negatives).all()):
            raise ValueError("negatives contains NaN or inf values")
        neg_logits = torch.einsum("bd,bmd->bm", a, negatives)
    else:
        raise ValueError(f"negatives must be (M, {a.shape[1]}) or ({a.shape[0]}, M, {a.shape[1]}), got {tuple(negatives.shape)}")
    pos_logits = (a * p).sum(dim=1)
    return (F.softplus(-pos_logits) + F.softplus(neg_logits).sum(dim=1)).mean()


class NegativeSamplingLoss(nn.Module):
    """Module form of :func:`negative_sampling_loss`: ``loss(anchor, positive, negatives)``."""

    def forward(self, anchor, positive, negatives):
        return negative_sampling_loss(anchor, positive, negatives)
