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
from metrix.distances import cosine_similarity
from metrix.losses._common import label_masks, masked_logsumexp, prepare_batch, reduce


def circle_loss(embeddings, labels, ref_embeddings=None, ref_labels=None, *, m: float = 0.4, gamma: float = 80.0,
                pairs=None):
    """Circle loss over all pairs of the B×R matrix; 0 (with a gradient path) if no anchor qualifies."""
    gamma = check_positive(gamma, "gamma")
    b = prepare_batch(embeddings, labels, ref_embeddings, ref_labels)
    s = cosine_similarity(b.embeddings, None if b.same_set else b.ref_embeddings)
    pos, neg = label_masks(b, s.dtype, pairs)
    sd = s.detach()
    logit_p = -gamma * torch.relu(1.0 + m - sd) * (s - (1.0 - m))
    logit_n = gamma * torch.relu(sd + m) * (s - m)
    valid = pos.amax(dim=1) * neg.amax(dim=1)  # anchors with at least one positive and one negative
    losses = F.softplus(masked_logsumexp(logit_p, pos) + masked_logsumexp(logit_n, neg)) * valid
    return reduce(losses, torch.count_nonzero(valid), "mean", b.embeddings, b.ref_embeddings)


class CircleLoss(nn.Module):
    """Module form of :func:`circle_loss`."""

    def __init__(self, m: float = 0.4, gamma: float = 80.0):
        super().__init__()
        self.m, self.gamma = float(m), check_positive(gamma, "gamma")

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, pairs=None):
        return circle_loss(embeddings, labels, ref_embeddings, ref_labels, m=self.m, gamma=self.gamma, pairs=pairs)
