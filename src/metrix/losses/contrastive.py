"""Contrastive loss (Hadsell, Chopra & LeCun, CVPR 2006), in the margin form used by
pytorch-metric-learning:

    L = mean_{(i,j) positive, ℓ>0} [d_ij − m_pos]_+  +  mean_{(i,j) negative, ℓ>0} [m_neg − d_ij]_+

With a similarity metric the hinges flip: ``[m_pos − s_ij]_+`` and ``[s_ij − m_neg]_+``.
The original paper squares the hinges and weighs each side by ½; ``squared=True`` gives that form.
"""

from __future__ import annotations

import torch
from torch import nn

from metrix.distances import is_similarity, pairwise_distance
from metrix.losses._common import label_masks, prepare_batch, reduce


def contrastive_loss(
    embeddings,
    labels,
    ref_embeddings=None,
    ref_labels=None,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    metric: str = "euclidean",
    squared: bool = False,
    reduction: str = "mean_nonzero",
    pairs=None,
) -> torch.Tensor:
    """Contrastive loss over every positive and negative pair of the B×R matrix.

    Returns 0 (with a gradient path) when the batch has no pair with non-zero loss.
    """
    b = prepare_batch(embeddings, labels, ref_embeddings, ref_labels)
    mat = pairwise_distance(b.embeddings, None if b.same_set else b.ref_embeddings, metric)
    pos, neg = label_masks(b, pairs=pairs)
    if is_similarity(metric):
        pos_loss, neg_loss = torch.relu(pos_margin - mat), torch.relu(mat - neg_margin)
    else:
        pos_loss, neg_loss = torch.relu(mat - pos_margin), torch.relu(neg_margin - mat)
    if squared:
        pos_loss, neg_loss = 0.5 * pos_loss**2, 0.5 * neg_loss**2
    graph = (b.embeddings, b.ref_embeddings)
    n_pos, n_neg = (int(torch.count_nonzero(m)) for m in (pos, neg)) if reduction == "mean" else (0, 0)
    return reduce(pos_loss * pos, n_pos, reduction, *graph) + reduce(neg_loss * neg, n_neg, reduction, *graph)


class ContrastiveLoss(nn.Module):
    """Module form of :func:`contrastive_loss`.

    Example
    -------
    >>> import torch, torch.nn.functional as F
    >>> loss = ContrastiveLoss(pos_margin=0.0, neg_margin=1.0)
    >>> emb = F.normalize(torch.randn(8, 4), dim=1); lab = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    >>> loss(emb, lab).ndim
    0
    """

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, metric: str = "euclidean",
                 squared: bool = False, reduction: str = "mean_nonzero"):
        super().__init__()
        self.pos_margin, self.neg_margin = float(pos_margin), float(neg_margin)
        self.metric, self.squared, self.reduction = metric, squared, reduction

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, pairs=None):
        return contrastive_loss(
            embeddings, labels, ref_embeddings, ref_labels, pos_margin=self.pos_margin,
            neg_margin=self.neg_margin, metric=self.metric, squared=self.squared, reduction=self.reduction,
            pairs=pairs,
        )
