"""Margin loss (Wu, Manmatha, Smola & Krähenbühl, "Sampling Matters in Deep Embedding Learning", ICCV 2017):

    ℓ(a, p, n) = [d_ap − β + α]_+ + [β − d_an + α]_+

over triplets, normalised by the number of non-zero terms, with a learnable boundary β (one, or one per
class, indexed by the anchor's label) and an optional ``ν·β`` regulariser. Pair it with
:class:`metrix.mining.DistanceWeightedMiner` (``pairs=``) as in the paper. Each triplet sum collapses to
pairs weighted by per-anchor counts, so the cost is O(B·R). Same values as pytorch-metric-learning's
``MarginLoss`` (its ``triplets_per_anchor="all"``).
"""

from __future__ import annotations

import torch
from torch import nn

from metrix.distances import pairwise_distance
from metrix.losses._common import label_masks, prepare_batch, zero_loss


class MarginLoss(nn.Module):
    """Margin loss with a learnable boundary ``beta`` (a parameter; per class if ``num_classes`` is given).

    Parameters
    ----------
    margin : α, the half-width of the margin around β
    beta : initial boundary β
    learn_beta : make β a learnable parameter (the paper learns it)
    num_classes : one β per class instead of one in total (labels must then be class indices)
    nu : weight of the ``ν·β`` regulariser
    """

    def __init__(self, margin: float = 0.2, beta: float = 1.2, learn_beta: bool = True, num_classes: int | None = None,
                 nu: float = 0.0):
        super().__init__()
        self.margin, self.nu, self.num_classes = float(margin), float(nu), num_classes
        init = torch.full((int(num_classes) if num_classes else 1,), float(beta))
        self.beta = nn.Parameter(init, requires_grad=bool(learn_beta))

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, pairs=None):
        b = prepare_batch(embeddings, labels, ref_embeddings, ref_labels)
        d = pairwise_distance(b.embeddings, None if b.same_set else b.ref_embeddings, "euclidean")
        pos, neg = label_masks(b, d.dtype, pairs)
        if self.num_classes:
            if int(b.labels.min()) < 0 or int(b.labels.max()) >= self.num_classes:
                raise ValueError(f"with a per-class beta, labels must be class indices in [0, {self.num_classes})")
            beta = self.beta[b.labels].to(d.dtype)[:, None]
        else:
            beta = self.beta.to(d.dtype)[:, None]
        n_pos, n_neg = pos.sum(dim=1, keepdim=True), neg.sum(dim=1, keepdim=True)
        triplets = n_pos * n_neg  # per anchor
        if float(triplets.sum()) == 0:
            return zero_loss(b.embeddings, b.ref_embeddings, self.beta)
        pos_loss = torch.relu(d - beta + self.margin) * pos
        neg_loss = torch.relu(beta - d + self.margin) * neg
        # each (a, p) term appears in n_neg(a) triplets, each (a, n) term in n_pos(a) triplets
        total = (pos_loss * n_neg).sum() + (neg_loss * n_pos).sum()
        divisor = ((pos_loss > 0) * n_neg).sum() + ((neg_loss > 0) * n_pos).sum()
        loss = total / divisor if float(divisor) > 0 else total * 0.0
        if self.nu and self.beta.requires_grad:
            if self.num_classes:  # ν·β_{y_a} summed over triplets, on the same divisor
                reg = (self.beta[b.labels].to(d.dtype) * triplets.squeeze(1)).sum() / divisor.clamp_min(1)
            else:
                reg = self.beta.sum().to(d.dtype)
            loss = loss + self.nu * reg
        return loss
