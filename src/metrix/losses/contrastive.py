"""Contrastive loss (Hadsell, Chopra & LeCun, CVPR 2006), in the margin form used by
pytorch-metric-learning:

    L = mean_{(i,j) positive, ℓ>0} [d_ij − m_pos]_+  +  mean_{(i,j) negative, ℓ>0} [m_neg − d_ij]_+

With a similarity metric the hinges flip: ``[m_pos − s_ij]_+`` and ``[s_ij − m_neg]_+``.
The original paper squares the hinges and weighs each side by ½; ``squared=True`` gives that form.
"""

from __future__ import annotations

import torch
from torch import nn

from metrix._validation import check_choice
from metrix.distances import is_similarity
from metrix.losses._common import REDUCTIONS, forward_masks, prepare_batch, scratch
from metrix.losses._matrix import Terms, compute_dtype, inverse_count, matrix_loss


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
    check_choice(reduction, "reduction", REDUCTIONS)
    b = prepare_batch(embeddings, labels, ref_embeddings, ref_labels)
    dtype = compute_dtype(b.embeddings)
    shape, device = (b.labels.shape[0], b.ref_labels.shape[0]), b.embeddings.device
    pos, neg = forward_masks(b, dtype, pairs)  # neg None: negatives are 1 − pos, applied in place below
    # a similarity flips both hinges: [m_pos − s]_+ and [s − m_neg]_+
    sign = -1.0 if is_similarity(metric) else 1.0

    def terms(mat):
        # each pair's own hinge in one buffer: positives [σ(d − m_pos)]_+, negatives [σ(m_neg − d)]_+;
        # the negative hinge is kept negated (u = −hinge) to save a pass
        u = torch.sub(mat, neg_margin, out=scratch("work", shape, dtype, device))
        if sign > 0:
            hinge, u = (mat - pos_margin).relu_(), u.clamp_max_(0)
        else:
            hinge, u = torch.rsub(mat, pos_margin).relu_(), u.clamp_min_(0).neg_()
        if neg is None:  # negatives = 1 − same; self pairs are neither
            hinge.add_(u).mul_(pos).sub_(u)
            if b.same_set:
                hinge.fill_diagonal_(0)
        else:
            hinge.mul_(pos).addcmul_(u, neg, value=-1.0)
        work = u  # scratch from here on
        value = 0.5 * hinge * hinge if squared else hinge
        on_pos = torch.mul(value, pos, out=work)
        sum_pos = on_pos.sum()
        sum_neg = torch.sub(value, on_pos, out=work).sum()
        # slope = ∂value/∂hinge; counts of non-zero terms are exact integer sums of its sign
        slope = hinge if squared else hinge.sign_()
        if reduction == "mean_nonzero":
            nonzero = torch.sign(hinge) if squared else slope
            count_all = nonzero.sum()
            count_pos = torch.mul(nonzero, pos, out=work).sum()
            count_neg = count_all - count_pos
        elif reduction == "mean":
            count_pos = float(pos.sum()) - (min(pos.shape) if b.same_set and neg is None else 0)
            count_neg = float(neg.sum()) if neg is not None else pos.numel() - float(pos.sum())
        else:
            count_pos = count_neg = 1
        scale_pos, scale_neg = inverse_count(count_pos), inverse_count(count_neg)
        loss = scale_pos * sum_pos + scale_neg * sum_neg
        # ∂loss/∂mat = σ · slope · (scale_pos on positives, −scale_neg on negatives)
        slope_pos = torch.mul(slope, pos, out=work)
        grad = slope.mul_(-scale_neg * sign).add_(slope_pos, alpha=(scale_pos + scale_neg) * sign)
        # per-pair terms with symmetric masks have a symmetric gradient when the batch is its own reference
        return Terms(loss, grad, symmetric=pairs is None)

    return matrix_loss(b.embeddings, b.ref_embeddings, b.same_set, metric, terms)


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
