"""Contrastive loss (Hadsell, Chopra & LeCun, CVPR 2006), in the margin form used by
pytorch-metric-learning:

    L = mean_{(i,j) positive, ℓ>0} [d_ij − m_pos]_+  +  mean_{(i,j) negative, ℓ>0} [m_neg − d_ij]_+

``d`` is any metric of :data:`metrix.distances.METRICS` that a pair loss takes (``euclidean``, ``sqeuclidean``,
``cosine`` = 1 − cos, ``poincare``); with ``dot``, a similarity, the hinges flip: ``[m_pos − s_ij]_+`` and
``[s_ij − m_neg]_+``. (pytorch-metric-learning's ``CosineSimilarity`` margins ``p, n`` are ``1 − p, 1 − n`` on
``cosine``.)
The original paper squares the hinges and weighs each side by ½; ``squared=True`` gives that form.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from metrix._validation import check_choice
from metrix.distances import is_similarity
from metrix.losses._common import (
    REDUCTIONS, label_masks, positive_positions, prepare_batch, scratch, set_positives_and_self, write_positions,
)
from metrix.losses._matrix import RowListGrad, Terms, compute_dtype, inverse_count, matrix_loss


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
    """Contrastive loss over every positive and negative pair of the B×R matrix (or a miner's ``pairs``).

    Returns 0 (with a gradient path) when the batch has no pair with non-zero loss.
    """
    check_choice(reduction, "reduction", REDUCTIONS)
    for name, margin in (("pos_margin", pos_margin), ("neg_margin", neg_margin)):
        if not math.isfinite(margin):
            raise ValueError(f"{name} must be finite, got {margin}")
    b = prepare_batch(embeddings, labels, ref_embeddings, ref_labels)
    hinge = _Hinges(pos_margin, neg_margin, -1.0 if is_similarity(metric) else 1.0, squared, reduction)
    if pairs is not None:
        terms = _mined_terms(hinge, *label_masks(b, compute_dtype(b.embeddings), pairs, reuse=True))
    elif metric == "euclidean" and not squared:
        # works on d² and takes 1/d with one rsqrt: no sqrt of the whole matrix, no division by d
        terms, metric = _all_pairs_terms(b, hinge, on_squared_distances=True), "sqeuclidean"
    else:
        # the backward of the Euclidean distance divides by the matrix: it must come back as it was
        terms = _all_pairs_terms(b, hinge, on_squared_distances=False, restore=metric == "euclidean")
    return matrix_loss(b.embeddings, b.ref_embeddings, b.same_set, metric, terms)


class _Hinges(NamedTuple):
    """The loss's settings. ``sign`` σ is +1 for distances, −1 for similarities (the hinges flip)."""

    pos_margin: float
    neg_margin: float
    sign: float
    squared: bool
    reduction: str

    def value(self, h: torch.Tensor) -> torch.Tensor:
        return 0.5 * h * h if self.squared else h

    def scales(self, count_pos, count_neg) -> tuple[float, float]:
        """The weights of the positive and negative sums (``1/count`` of each side, or 1 for ``"sum"``)."""
        if self.reduction == "sum":
            return 1.0, 1.0
        return inverse_count(count_pos), inverse_count(count_neg)


def _all_pairs_terms(b, hinge: _Hinges, on_squared_distances: bool, restore: bool = False):
    """The negative pairs are every entry of the B×R matrix once the positive pairs (a short list from the
    sorted labels) and the self pairs are overwritten with a value that is never an active negative (the
    largest float on the far side of the margin). One reduction then tells whether any negative is active;
    only if one is do a threshold, a count and a sum run over B×R, with no label mask. ``∂loss/∂M`` is the
    "active negative" mask (``1/d`` where the matrix holds ``d²``, or the hinge itself when squared) with
    the positives written over it, times one number applied to the (B, D) result. When no negative is
    active, ``∂loss/∂M`` lives on the positive list alone and goes to the backward as that list, so the
    backward's B×R GEMM is skipped too.

    ``on_squared_distances``: the matrix holds ``d²`` of the Euclidean loss (non-squared hinge only).
    ``restore``: put the overwritten entries back (for a backward that reads the matrix).
    """
    sign, squared, margin = hinge.sign, hinge.squared, hinge.neg_margin
    dtype = compute_dtype(b.embeddings)
    shape, device = (b.labels.shape[0], b.ref_labels.shape[0]), b.embeddings.device
    flat, valid = positive_positions(b.labels, b.ref_labels, b.same_set)
    # finite, so that 0·never_active = 0 in the sums below; the margins are finite
    never_active = torch.finfo(dtype).max * (1.0 if sign > 0 else -1.0)
    # 1/d is kept above this; never below 1/√never_active, which the overwritten entries hold
    inverse_bound = max(1.0 / margin, float(torch.finfo(dtype).max) ** -0.5) if margin > 0 else 0.0
    if on_squared_distances:  # active where d < m_neg, i.e. d² < m_neg²
        bound = margin * margin if margin > 0 else -1.0
    else:  # active where σ(m_neg − M) > 0
        bound = margin

    def negative_grad(mat):
        """The part of ``∂loss/∂M`` from the negatives, up to one factor: non-zero exactly where a negative
        is active (``1/d = inf`` at coincident points is fixed later)."""
        # the gradient outlives this call (saved for backward): a fresh buffer, not scratch
        grad = torch.empty(shape, dtype=dtype, device=device)
        if on_squared_distances:  # 1/d where it exceeds 1/m_neg, else 0: one rsqrt and one threshold
            return torch.threshold_(torch.rsqrt(mat, out=grad), inverse_bound, 0.0)
        if not squared:
            return torch.lt(mat, bound, out=grad) if sign > 0 else torch.gt(mat, bound, out=grad)
        # squared hinge: the gradient is the hinge, kept as −σh = σ(M − m_neg) clamped
        neg_part = torch.sub(mat, margin, out=grad)
        return neg_part.clamp_max_(0) if sign > 0 else neg_part.clamp_min_(0)

    def negative_sums(grad, mat):
        """``(count, Σ value, factor)`` of the active negatives; ``∂loss/∂M = scale_neg · factor · grad``."""
        if squared:
            count = torch.ne(grad, 0, out=scratch("work", shape, dtype, device)).sum()
            return count, 0.5 * torch.linalg.vector_norm(grad) ** 2, 1.0
        if not on_squared_distances:
            count = grad.sum()  # a float sum of 0/1: exact below 2^24 pairs, within float rounding beyond
            return count, sign * (margin * count - torch.dot(grad.view(-1), mat.view(-1))), -sign
        count = torch.sign(grad, out=scratch("work", shape, dtype, device)).sum()  # 1/d = inf counts too
        total = torch.dot(grad.view(-1), mat.view(-1))  # Σ_active d = Σ (1/d)·d²
        if not torch.isfinite(total):  # coincident points (d = 0, 1/d = inf): active, zero subgradient
            grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            total = torch.dot(grad.view(-1), mat.view(-1))
        return count, margin * count - total, -0.5

    def terms(mat):
        # self pairs are neither positive nor negative
        m_pos, put_back = set_positives_and_self(mat, flat, valid, b.same_set, never_active)
        any_active = bool(mat.amin() < bound) if sign > 0 else bool(mat.amax() > bound)
        grad = negative_grad(mat) if any_active else None
        if restore:
            put_back()
        count_neg_active, sum_neg, factor = negative_sums(grad, mat) if any_active else (0, 0.0, 1.0)

        mask = valid.to(dtype)
        as_pos = _hinge(m_pos.sqrt() if on_squared_distances else m_pos, hinge.pos_margin, -sign)
        sum_pos = _masked_sum(hinge.value(as_pos), mask)
        nonzero_pos = torch.sign(as_pos).mul_(mask)
        if hinge.reduction == "mean_nonzero":
            count_pos, count_neg = nonzero_pos.sum(), count_neg_active
        else:  # "mean": every pair of each side ("sum" ignores the counts)
            count_pos = int(valid.sum())
            count_neg = shape[0] * shape[1] - count_pos - (shape[0] if b.same_set else 0)
        scale_pos, scale_neg = hinge.scales(count_pos, count_neg)
        loss = scale_pos * sum_pos + scale_neg * sum_neg

        # on positives ∂loss/∂M = σ·scale_pos·slope, slope = [h > 0] or h; 1/(2d) more on d²
        slope = as_pos.mul_(mask) if squared else nonzero_pos
        if on_squared_distances:
            slope.mul_(torch.rsqrt(m_pos)).nan_to_num_(nan=0.0, posinf=0.0)
        slope.mul_(sign * scale_pos * (0.5 if on_squared_distances else 1.0))
        if grad is None:  # no active negative: the gradient is the positive list alone
            return Terms(loss, RowListGrad(flat % shape[1], slope), symmetric=True)
        factor = factor * scale_neg  # one number for the whole matrix (> 0: a negative is active)
        write_positions(grad, flat, valid, slope.div_(factor))
        return Terms(loss, grad, symmetric=True, scale=factor)

    return terms


def _hinge(values: torch.Tensor, threshold: float, sign: float) -> torch.Tensor:
    """``[σ(threshold − values)]_+`` (two operations, no multiplication by σ)."""
    return (torch.rsub(values, threshold) if sign > 0 else torch.sub(values, threshold)).clamp_min_(0)


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.dot(values.view(-1), mask.view(-1))


def _mined_terms(hinge: _Hinges, pos: torch.Tensor, neg: torch.Tensor):
    """A miner's selection: each pair's own hinge under the 0/1 masks ``pos`` and ``neg``."""
    sign, squared = hinge.sign, hinge.squared

    def terms(mat):
        # positives [σ(M − m_pos)]_+, negatives [σ(m_neg − M)]_+, in one buffer
        h = torch.sub(mat, hinge.pos_margin).mul_(sign).relu_().mul_(pos)
        h.addcmul_(torch.rsub(mat, hinge.neg_margin).mul_(sign).relu_(), neg)
        value = hinge.value(h)
        sum_pos = torch.mul(value, pos).sum()
        sum_neg = torch.mul(value, neg).sum()
        slope = h if squared else torch.sign(h)
        if hinge.reduction == "mean_nonzero":
            nonzero = torch.sign(h)
            count_pos, count_neg = torch.mul(nonzero, pos).sum(), torch.mul(nonzero, neg).sum()
        else:
            count_pos, count_neg = pos.sum(), neg.sum()
        scale_pos, scale_neg = hinge.scales(count_pos, count_neg)
        loss = scale_pos * sum_pos + scale_neg * sum_neg
        # ∂loss/∂M = σ·slope·(scale_pos on positives, −scale_neg on negatives)
        grad = slope.mul_(torch.mul(pos, scale_pos).sub_(neg, alpha=scale_neg)).mul_(sign)
        return Terms(loss, grad)

    return terms


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

    geometries = ("sphere", "poincare")  # metric="poincare" compares on the ball (the registry reads this)

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
