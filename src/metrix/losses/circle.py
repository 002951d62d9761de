"""Circle loss (Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization", CVPR 2020):

    L_i = softplus( log Σ_{n∈N_i} e^{γ α_n (s_n − Δ_n)} + log Σ_{p∈P_i} e^{−γ α_p (s_p − Δ_p)} )

with cosine similarity ``s``, ``α_p = [1 + m − s_p]_+``, ``α_n = [s_n + m]_+`` (treated as constants, as in
the paper), ``Δ_p = 1 − m``, ``Δ_n = m``. Defaults ``m=0.4, γ=80`` are the paper's setting for deep metric
learning (fine-grained retrieval); face recognition used ``m=0.25, γ=256``. Averaged over the anchors that
have at least one positive and one negative. Same values as pytorch-metric-learning's ``CircleLoss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metrix._validation import check_positive
from metrix.losses._common import label_masks, prepare_batch
from metrix.losses._matrix import Terms, compute_dtype, inverse_count, masked_row_softmax, matrix_loss


def circle_loss(embeddings, labels, ref_embeddings=None, ref_labels=None, *, m: float = 0.4, gamma: float = 80.0,
                pairs=None):
    """Circle loss over all pairs of the B×R matrix; 0 (with a gradient path) if no anchor qualifies."""
    gamma = check_positive(gamma, "gamma")
    b = prepare_batch(embeddings, labels, ref_embeddings, ref_labels)
    pos, neg = label_masks(b, compute_dtype(b.embeddings), pairs, reuse=True)
    valid = pos.amax(dim=1) * neg.amax(dim=1)  # anchors with at least one positive and one negative
    scale = inverse_count(torch.count_nonzero(valid))

    def terms(s):
        # logits γ·α·(s − Δ) with the weights α constant, so ∂logit/∂s = ±γ·α
        alpha_p = (1.0 + m - s).relu_()
        alpha_n = (s + m).relu_()
        lse_p, prob_p = masked_row_softmax((s - (1.0 - m)).mul_(alpha_p).mul_(-gamma), pos)
        lse_n, prob_n = masked_row_softmax((s - m).mul_(alpha_n).mul_(gamma), neg)
        z = lse_p + lse_n
        loss = (F.softplus(z) * valid).sum() * scale
        row = (torch.sigmoid(z) * valid * (gamma * scale))[:, None]  # ∂loss/∂z per anchor, × γ
        grad = prob_n.mul_(alpha_n).sub_(prob_p.mul_(alpha_p)).mul_(row)
        return Terms(loss, grad)

    return matrix_loss(b.embeddings, b.ref_embeddings, b.same_set, "cosine", terms, similarity=True)


class CircleLoss(nn.Module):
    """Module form of :func:`circle_loss`."""

    def __init__(self, m: float = 0.4, gamma: float = 80.0):
        super().__init__()
        self.m, self.gamma = float(m), check_positive(gamma, "gamma")

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, pairs=None):
        return circle_loss(embeddings, labels, ref_embeddings, ref_labels, m=self.m, gamma=self.gamma, pairs=pairs)
