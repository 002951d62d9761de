"""Triplet margin loss (Weinberger & Saul 2009; Schroff et al., FaceNet, CVPR 2015):

    ℓ(a, p, n) = [d(a, p) − d(a, n) + m]_+

over triplets with ``labels[p] == labels[a] != labels[n]`` (p ≠ a), selected by ``triplets``:

* ``"all"``: every triplet;
* ``"hard"``: d(a, n) ≤ d(a, p) (the negative is closer than the positive);
* ``"semihard"``: d(a, p) < d(a, n) ≤ d(a, p) + m (FaceNet);
* ``"easy"``: d(a, n) > d(a, p) + m (all have zero loss; useful only for statistics);
* ``"batch_hard"``: per anchor, the farthest positive and the closest negative (Hermans et al. 2017).

These are the type definitions of pytorch-metric-learning's ``TripletMarginMiner``.

How it is fast: the sum over all (p, n) of one anchor is computed *without* the B×R×R tensor.
With ``a_p = d(a, p) + m`` and the anchor's negative distances sorted,
``Σ_n [a_p − d_n]_+ = cnt_p · a_p − (sum of the cnt_p smallest d_n)``, where ``cnt_p`` comes from
``searchsorted`` and the sum from a prefix sum. Time O(B·R log R), memory O(B·R), exact, and
autograd-differentiable (gradients flow through ``sort`` and ``cumsum``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metrix._validation import check_choice
from metrix.distances import dissimilarity, is_similarity
from metrix.losses._common import REDUCTIONS, forward_masks, label_masks, prepare_batch, scratch, zero_loss
from metrix.losses._matrix import SparseGrad, Terms, compute_dtype, inverse_count, matrix_loss, row_argmax

TRIPLET_SELECTIONS = ("all", "hard", "semihard", "easy", "batch_hard")


def _batch_hard(b, margin, reduction, metric, pairs):
    """Per anchor, the farthest positive against the closest negative; the gradient is two entries per row,
    so the backward gathers them instead of running B×R GEMMs."""
    sign = -1.0 if is_similarity(metric) else 1.0  # d = sign · matrix
    dtype = compute_dtype(b.embeddings)
    shape, device = (b.labels.shape[0], b.ref_labels.shape[0]), b.embeddings.device
    big = torch.finfo(dtype).max
    pos, neg = forward_masks(b, dtype, pairs)  # neg None: negatives are 1 − pos, applied in place below

    def terms(mat):
        rows = torch.arange(mat.shape[0], device=mat.device)
        # −d over the negatives, −huge elsewhere → argmax = closest negative
        if neg is None:  # negatives = different label: −huge exactly where the label is the same
            near_neg = torch.mul(pos, -big, out=scratch("work", shape, dtype, device)).sub_(mat, alpha=sign)
        else:
            near_neg = neg.sub_(1.0).mul_(big).sub_(mat, alpha=sign)
        # d over the positives, −huge elsewhere (built in the mask's buffer) → argmax = hardest positive
        far_pos = pos.sub_(1.0).mul_(big).add_(mat, alpha=sign)
        if b.same_set:
            far_pos.fill_diagonal_(-big)
        i_pos, i_neg = row_argmax(far_pos), row_argmax(near_neg)
        valid = (far_pos[rows, i_pos] > -big / 2) & (near_neg[rows, i_neg] > -big / 2)
        d_pos, d_neg = sign * mat[rows, i_pos], sign * mat[rows, i_neg]
        losses = torch.where(valid, torch.relu(d_pos - d_neg + margin), torch.zeros_like(d_pos))
        if reduction == "mean_nonzero":
            count = torch.count_nonzero(losses)
        else:
            count = torch.count_nonzero(valid) if reduction == "mean" else 1
        scale = inverse_count(count)
        active = torch.nonzero(losses > 0).squeeze(1)
        step = torch.full((active.numel(),), sign * scale, dtype=mat.dtype, device=mat.device)
        grad = SparseGrad(active.repeat(2), torch.cat([i_pos[active], i_neg[active]]), torch.cat([step, -step]))
        return Terms(losses.sum() * scale, grad)

    return matrix_loss(b.embeddings, b.ref_embeddings, b.same_set, metric, terms)


def _pack_positives(d, pos):
    """The positives of each anchor as a dense (B, Pmax) block: distances and a 0/1 validity mask.

    ``topk`` over the 0/1 mask puts each row's positives first (Pmax = the most positives any anchor
    has, K−1 for P×K batches), so everything after this works on B×Pmax instead of B×R.
    """
    p_max = int(pos.sum(dim=1).max())
    valid, idx = torch.topk(pos, max(p_max, 1), dim=1, sorted=False)
    return d.gather(1, idx), valid


def _sorted_sum(d, pos, neg, margin, triplets, reduction, graph):
    n_neg = neg.sum(dim=1, keepdim=True).to(torch.int64)
    # non-negatives sort to the end as +huge; searches below never pass n_neg because a_p is finite
    sorted_neg, _ = torch.sort(d + (1.0 - neg) * torch.finfo(d.dtype).max, dim=1)
    key = sorted_neg.detach()
    prefix = F.pad(torch.cumsum(sorted_neg, dim=1), (1, 0))  # prefix[k] = sum of the k smallest

    d_pos, valid = _pack_positives(d, pos)
    a = d_pos + margin
    a_key, d_key = a.detach().contiguous(), d_pos.detach().contiguous()
    below_a = torch.searchsorted(key, a_key)  # #{n : d_n < a_p}  -> these have loss > 0
    if triplets == "all":
        lo, hi = torch.zeros_like(below_a), below_a
    elif triplets == "hard":  # d_n <= d_p
        lo, hi = torch.zeros_like(below_a), torch.minimum(torch.searchsorted(key, d_key, right=True), below_a)
    elif triplets == "semihard":  # d_p < d_n < a_p (d_n == a_p is selected but has zero loss)
        lo = torch.searchsorted(key, d_key, right=True)
        hi = torch.maximum(below_a, lo)
    else:  # easy: d_n > a_p, zero loss by definition
        lo = hi = torch.zeros_like(below_a)

    cnt = (hi - lo).to(d.dtype) * valid
    neg_sum = prefix.gather(1, hi) - prefix.gather(1, lo)
    total = ((cnt * a - neg_sum) * valid).sum()

    if reduction == "sum":
        return total
    if reduction == "mean_nonzero":
        count = cnt.sum()
    else:  # "mean": every selected triplet counts, zero-loss ones included
        if triplets == "all":
            selected = n_neg.expand_as(a_key)
        elif triplets == "hard":
            selected = torch.searchsorted(key, d_key, right=True)
        elif triplets == "semihard":
            selected = (torch.searchsorted(key, a_key, right=True) - torch.searchsorted(key, d_key, right=True)).clamp_min(0)
        else:
            selected = n_neg - torch.searchsorted(key, a_key, right=True)
        count = (selected.to(d.dtype) * valid).sum()
    if int(count) == 0:
        return zero_loss(*graph)
    return total / count


def triplet_margin_loss(
    embeddings,
    labels,
    ref_embeddings=None,
    ref_labels=None,
    *,
    margin: float = 0.05,
    triplets: str = "all",
    metric: str = "euclidean",
    reduction: str = "mean_nonzero",
    pairs=None,
) -> torch.Tensor:
    """Triplet margin loss over the triplets chosen by ``triplets`` (see module docstring).

    ``reduction="mean_nonzero"`` (default) averages over triplets with positive loss,
    ``"mean"`` over all selected triplets, ``"sum"`` sums. For ``batch_hard`` the unit is one
    triplet per anchor. With a similarity metric, ``d = −s``.
    """
    check_choice(triplets, "triplets", TRIPLET_SELECTIONS)
    check_choice(reduction, "reduction", REDUCTIONS)
    b = prepare_batch(embeddings, labels, ref_embeddings, ref_labels)
    if triplets == "batch_hard":
        return _batch_hard(b, float(margin), reduction, metric, pairs)
    d = dissimilarity(b.embeddings, None if b.same_set else b.ref_embeddings, metric)
    pos, neg = label_masks(b, pairs=pairs)
    graph = (b.embeddings, b.ref_embeddings)
    return _sorted_sum(d, pos, neg, float(margin), triplets, reduction, graph)


class TripletMarginLoss(nn.Module):
    """Module form of :func:`triplet_margin_loss`.

    Example
    -------
    >>> import torch, torch.nn.functional as F
    >>> loss = TripletMarginLoss(margin=0.1, triplets="semihard")
    >>> emb = F.normalize(torch.randn(16, 8), dim=1); lab = torch.arange(4).repeat(4)
    >>> float(loss(emb, lab)) >= 0
    True
    """

    def __init__(self, margin: float = 0.05, triplets: str = "all", metric: str = "euclidean",
                 reduction: str = "mean_nonzero"):
        super().__init__()
        check_choice(triplets, "triplets", TRIPLET_SELECTIONS)
        check_choice(reduction, "reduction", REDUCTIONS)
        self.margin, self.triplets, self.metric, self.reduction = float(margin), triplets, metric, reduction

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, pairs=None):
        return triplet_margin_loss(
            embeddings, labels, ref_embeddings, ref_labels, margin=self.margin,
            triplets=self.triplets, metric=self.metric, reduction=self.reduction, pairs=pairs,
        )
