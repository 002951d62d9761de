"""Lifted structure losses.

Original (Oh Song, Xiang, Jegelka & Savarese, "Deep Metric Learning via Lifted Structured Feature
Embedding", CVPR 2016), for every ordered positive pair (i, j):

    J_ij = log( Σ_{k∈N_i} e^{m − d_ik} + Σ_{l∈N_j} e^{m − d_jl} ) + d_ij,    L = mean_{(i,j)} [J_ij]_+² / 2

computed densely from one masked log-sum-exp per row (``log(S_i + S_j) = logaddexp(lse_i, lse_j)``).
Same values as pytorch-metric-learning's ``LiftedStructureLoss`` (``pos_margin=0``).

Generalized lifted structure loss (Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for Person
Re-Identification", 2017, eq. on p. 4; a smooth relaxation of Oh Song et al.'s lifted structure, CVPR 2016):

    L_i = [ log Σ_{p∈P_i} e^{d_ip − m_pos} + log Σ_{n∈N_i} e^{m_neg − d_in} ]_+

with Euclidean distance ``d``, averaged over all anchors; an empty sum contributes 0.
Defaults ``m_pos=0, m_neg=1`` as in pytorch-metric-learning's ``GeneralizedLiftedStructureLoss``
(same values).
"""

from __future__ import annotations

import torch
from torch import nn

from metrix.losses._common import (
    gather_positions, label_masks, mask_positions, positive_positions, prepare_batch, same_label_mask, scratch,
    set_positives_and_self, write_positions, zero_loss,
)
from metrix.losses._matrix import Terms, compute_dtype, masked_row_softmax, matrix_loss, row_softmax


def generalized_lifted_structure_loss(embeddings, labels, ref_embeddings=None, ref_labels=None, *,
                                      pos_margin: float = 0.0, neg_margin: float = 1.0,
                                      metric: str = "euclidean", pairs=None) -> torch.Tensor:
    """Generalized lifted structure loss, mean over anchors.

    Without a miner's ``pairs``, the positives are a (B, Pmax) list from the sorted labels and the negatives
    every other entry of the B×R matrix: the positive and self entries are overwritten with ``+inf`` (whose
    ``e^{m − d}`` is 0), so the negatives' log-sum-exp is one row softmax with no label mask; the matrix is
    restored before the backward reads it.
    """
    b = prepare_batch(embeddings, labels, ref_embeddings, ref_labels)
    if pairs is None:
        terms = _generalized_all_pairs_terms(b, pos_margin, neg_margin)
    else:
        pos, neg = label_masks(b, compute_dtype(b.embeddings), pairs, reuse=True)

        def terms(d):
            lse_p, prob_p = masked_row_softmax(d - pos_margin, pos)
            lse_n, prob_n = masked_row_softmax(torch.rsub(d, neg_margin), neg)
            per_anchor = torch.relu(lse_p + lse_n)
            row = ((per_anchor > 0).to(d.dtype) / d.shape[0])[:, None]  # ∂mean/∂(lse_p + lse_n)
            return Terms(per_anchor.mean(), prob_p.sub_(prob_n).mul_(row))

    return matrix_loss(b.embeddings, b.ref_embeddings, b.same_set, metric, terms)


def _generalized_all_pairs_terms(b, pos_margin: float, neg_margin: float):
    flat, valid = positive_positions(b.labels, b.ref_labels, b.same_set)
    n_rows, n_cols = b.labels.shape[0], b.ref_labels.shape[0]
    has_pos = valid.any(dim=1)
    has_neg = valid.sum(dim=1) + (1 if b.same_set else 0) < n_cols

    def terms(d):
        d_pos, put_back = set_positives_and_self(d, flat, valid, b.same_set, torch.inf)
        # the gradient outlives this call (saved for backward): the softmax goes into a fresh buffer
        lse_n, prob_n = row_softmax(torch.rsub(d, neg_margin), has_neg)
        put_back()  # the matrix as it came: the backward reads it
        if b.same_set:
            prob_n.fill_diagonal_(0.0)

        logits_p = torch.where(valid, d_pos - pos_margin, -torch.inf)
        lse_p = torch.logsumexp(logits_p, dim=1).masked_fill_(~has_pos, 0.0)  # an empty sum contributes 0
        prob_p = torch.exp(logits_p - lse_p[:, None])
        per_anchor = torch.relu(lse_p + lse_n)
        row = ((per_anchor > 0).to(d.dtype) / n_rows)[:, None]  # ∂mean/∂(lse_p + lse_n)
        grad = prob_n.mul_(-row)
        write_positions(grad, flat, valid, prob_p.mul_(row))
        return Terms(per_anchor.mean(), grad)

    return terms


def lifted_structure_loss(embeddings, labels, *, neg_margin: float = 1.0, pairs=None) -> torch.Tensor:
    """Original lifted structure loss over the positive pairs of the batch (no reference set: the loss
    needs each positive's own negatives within the batch). 0 when the batch has no positive pair.

    Each row's ``lse_i = log Σ_{k∈N_i} e^{m − d_ik}`` comes from one masked softmax over B×R; the positive
    pairs are a (B, Pmax) list, so ``J_ij`` and its derivatives are small arrays. ``∂loss/∂d`` is the
    negatives' softmax scaled per row by the weight its ``lse_i`` carries, with ``[J_ij]_+/|P|`` written at
    the positives; one autograd Function maps it to the embeddings with GEMMs.
    """
    b = prepare_batch(embeddings, labels)
    dtype = compute_dtype(b.embeddings)
    n = b.labels.shape[0]
    if pairs is None:
        flat, valid = positive_positions(b.labels, b.labels, True)
        neg = same_label_mask(b.labels, b.labels, dtype, out=scratch("neg", (n, n), dtype, b.embeddings.device),
                              equal=False)
    else:
        pos, neg = label_masks(b, dtype, pairs, reuse=True)
        flat, valid = mask_positions(pos)
    n_pairs = int(valid.sum())
    if not n_pairs:
        return zero_loss(b.embeddings)

    def terms(d):
        # the gradient outlives this call (saved for backward): the softmax goes into a fresh buffer
        lse, prob = masked_row_softmax(torch.rsub(d, neg_margin), neg)
        lse = lse.masked_fill(neg.amax(dim=1) == 0, -torch.inf)  # no negatives: an empty sum, log 0
        lse_j = lse[flat % n]
        joint = torch.logaddexp(lse[:, None], lse_j)
        slack = torch.where(valid, joint + gather_positions(d, flat), -torch.inf).clamp_min_(0)  # [J_ij]_+
        loss = (slack * slack).sum() / (2 * n_pairs)
        upstream = slack / n_pairs  # ∂loss/∂J_ij
        share = torch.sigmoid(lse[:, None] - lse_j).nan_to_num_(nan=0.5)  # ∂ logaddexp / ∂lse_i
        weight = (upstream * share).sum(dim=1)  # what lse_i carries, as the first of a pair ...
        weight.scatter_add_(0, (flat % n).view(-1), (upstream * (1.0 - share)).view(-1))  # ... and the second
        grad = prob.mul_(-weight[:, None])  # ∂lse_i/∂d_ik = −softmax_ik over i's negatives
        write_positions(grad, flat, valid, upstream)
        return Terms(loss, grad)

    return matrix_loss(b.embeddings, None, True, "euclidean", terms)


class LiftedStructureLoss(nn.Module):
    """Module form of :func:`lifted_structure_loss`."""

    def __init__(self, neg_margin: float = 1.0):
        super().__init__()
        self.neg_margin = float(neg_margin)

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, pairs=None):
        if ref_embeddings is not None or ref_labels is not None:
            raise ValueError("LiftedStructureLoss needs each positive's negatives within the batch; ref_embeddings is not supported")
        return lifted_structure_loss(embeddings, labels, neg_margin=self.neg_margin, pairs=pairs)


class GeneralizedLiftedStructureLoss(nn.Module):
    """Module form of :func:`generalized_lifted_structure_loss`."""

    geometries = ("sphere", "poincare")  # metric="poincare" compares on the ball (the registry reads this)

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, metric: str = "euclidean"):
        super().__init__()
        self.pos_margin, self.neg_margin, self.metric = float(pos_margin), float(neg_margin), metric

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, pairs=None):
        return generalized_lifted_structure_loss(embeddings, labels, ref_embeddings, ref_labels,
                                                 pos_margin=self.pos_margin, neg_margin=self.neg_margin,
                                                 metric=self.metric, pairs=pairs)
