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

When every anchor has few positives (P×K batches: K − 1), sorting B×R costs more than one pass per positive
slot: for slot k, the negatives inside the selection window of ``(d_ap, a_p)`` are one comparison over B×R,
their count and distance sum two row reductions, and ``∂loss/∂d`` (the number of positives each negative
is active for, and of negatives each positive is) is accumulated on the way, so one autograd Function maps
it to the embeddings with GEMMs. Same values, with the window bounds chosen so ties fall as in the sorted form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metrix._validation import check_choice
from metrix.distances import dissimilarity, is_similarity
from metrix.losses._common import (
    REDUCTIONS, forward_masks, gather_positions, label_masks, mask_positions, positive_positions, prepare_batch,
    same_label_mask, scratch, write_positions, zero_loss,
)
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


def _sorted_sum(d, flat, valid, neg, margin, triplets, reduction, graph):
    """The sorted form (see module docstring); ``(flat, valid)``: each anchor's positives, as from
    :func:`~metrix.losses._common.positive_positions`, so everything after the sort works on B×Pmax."""
    n_neg = neg.sum(dim=1, keepdim=True).to(torch.int64)
    # non-negatives sort to the end as +huge; searches below never pass n_neg because a_p is finite
    sorted_neg, _ = torch.sort(d + (1.0 - neg) * torch.finfo(d.dtype).max, dim=1)
    key = sorted_neg.detach()
    prefix = F.pad(torch.cumsum(sorted_neg, dim=1), (1, 0))  # prefix[k] = sum of the k smallest

    d_pos, valid = gather_positions(d, flat), valid.to(d.dtype)
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


_LOOP_MAX_POSITIVES = 32  # above this many positives per anchor, sorting each row's negatives once is cheaper


def _window_thresholds(v, a, triplets):
    """Per positive ``(d_ap = v, a_p = v + m)``, the selection as comparisons of ``d_an``:
    ``lo < d_an <= hi`` with ``lo`` = None for no lower bound (strict bounds turned into ``<=`` by
    ``nextafter``, so ties fall exactly as in the sorted form)."""
    below_a = torch.nextafter(a, torch.full_like(a, -torch.inf))  # d < a_p  ⟺  d ≤ below_a
    if triplets == "all":
        return None, below_a
    if triplets == "hard":  # d ≤ d_ap and d < a_p
        return None, torch.minimum(v, below_a)
    return torch.minimum(v, below_a), below_a  # semihard: d_ap < d < a_p (empty when a_p ≤ d_ap)


def _per_positive(b, flat, valid, not_negative, margin, triplets, reduction, metric):
    """Triplet sum with one B×R pass per positive slot and a hand-written gradient (see module docstring).

    ``not_negative``: float (B, R), 1 where a reference is not a negative of the anchor (it may be scratch)."""
    sign = -1.0 if is_similarity(metric) else 1.0  # d = sign · matrix
    dtype = compute_dtype(b.embeddings)
    shape, device = (b.labels.shape[0], b.ref_labels.shape[0]), b.embeddings.device
    big = torch.finfo(dtype).max
    n_slots = flat.shape[1]

    def terms(mat):
        # d on the negatives, +huge elsewhere: no window holds a non-negative
        masked = torch.mul(not_negative, big, out=scratch("work", shape, dtype, device)).add_(mat, alpha=sign)
        v = torch.where(valid, sign * gather_positions(mat, flat), torch.full_like(flat, -big, dtype=dtype))
        a = v + margin  # an invalid slot's window lies below every distance
        lo, hi = _window_thresholds(v, a, triplets)
        in_window = scratch("window", shape, dtype, device)
        spare = scratch("below", shape, dtype, device) if lo is not None or reduction == "mean" else None
        # ∂(Σ loss)/∂d_an = −(active positives of n); accumulated here, positives written at the end
        grad = torch.zeros(shape, dtype=dtype, device=device)
        total = mat.new_zeros(())
        counts = torch.empty((shape[0], n_slots), dtype=dtype, device=device)
        selected = mat.new_zeros(())
        for k in range(n_slots):
            torch.le(masked, hi[:, k, None], out=in_window)
            if lo is not None:
                in_window.sub_(torch.le(masked, lo[:, k, None], out=spare))
            count = in_window.sum(dim=1)
            total = total + (count * a[:, k] - torch.linalg.vecdot(in_window, masked, dim=1)).sum()
            counts[:, k] = count
            grad.add_(in_window)
            if reduction == "mean" and triplets != "all":
                selected = selected + _selected_count(masked, v[:, k, None], a[:, k, None], triplets, spare)
        if reduction == "mean_nonzero":
            n_terms = counts.sum()
        elif reduction == "mean":
            n_neg = shape[1] - not_negative.sum(dim=1)
            n_terms = (valid.sum(dim=1) * n_neg).sum() if triplets == "all" else selected
        else:
            n_terms = 1
        scale = inverse_count(n_terms)
        write_positions(grad, flat, valid, -counts)
        # ∂loss/∂M = sign · scale · (count at positives − count at negatives)
        return Terms(total * scale, grad, scale=-sign * scale)

    return matrix_loss(b.embeddings, b.ref_embeddings, b.same_set, metric, terms)


def _selected_count(masked, v, a, triplets, buffer):
    """For ``reduction="mean"``: triplets the selection holds, zero-loss ones included (as the sorted form)."""
    at_most_v = torch.le(masked, v, out=buffer).sum(dim=1)
    if triplets == "hard":  # d_an ≤ d_ap
        return at_most_v.sum()
    # semihard: d_ap < d_an ≤ a_p
    return (torch.le(masked, a, out=buffer).sum(dim=1) - at_most_v).clamp_min(0).sum()


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
    positions = None
    if triplets != "easy":  # easy triplets have zero loss by definition: the sorted form counts them
        dtype = compute_dtype(b.embeddings)
        shape = (b.labels.shape[0], b.ref_labels.shape[0])
        if pairs is None:
            flat, valid = positive_positions(b.labels, b.ref_labels, b.same_set)
            not_negative = same_label_mask(b.labels, b.ref_labels, dtype,
                                           out=scratch("neg", shape, dtype, b.embeddings.device))
        else:
            pos, neg = label_masks(b, dtype, pairs, reuse=True)
            (flat, valid), not_negative = mask_positions(pos), neg.sub_(1.0).neg_()
        if flat.shape[1] <= _LOOP_MAX_POSITIVES:
            return _per_positive(b, flat, valid, not_negative, float(margin), triplets, reduction, metric)
        positions = flat, valid
    d = dissimilarity(b.embeddings, None if b.same_set else b.ref_embeddings, metric)
    pos, neg = label_masks(b, pairs=pairs)
    flat, valid = positions or mask_positions(pos)
    graph = (b.embeddings, b.ref_embeddings)
    return _sorted_sum(d, flat, valid, neg, float(margin), triplets, reduction, graph)


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

    geometries = ("sphere", "poincare")  # metric="poincare" compares on the ball (the registry reads this)

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
