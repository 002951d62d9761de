"""Multi-Similarity loss (Wang et al., "Multi-Similarity Loss with General Pair Weighting", CVPR 2019):

    L = 1/B Σ_i [ 1/α · log(1 + Σ_{p∈P_i} e^{−α(S_ip − λ)}) + 1/β · log(1 + Σ_{n∈N_i} e^{β(S_in − λ)}) ]

with cosine similarity ``S``, ``α=2, β=50, λ=0.5`` (the paper's defaults). With ``mining=True``
the pairs are first selected by the paper's MS mining rule with margin ``ε=0.1``:
a negative is kept if ``S_in + ε > min_p S_ip``, a positive if ``S_ip − ε < max_n S_in``.
Same values as pytorch-metric-learning's ``MultiSimilarityLoss`` + ``MultiSimilarityMiner``.
"""

from __future__ import annotations

import torch
from torch import nn

from metrix.distances import check_metric
from metrix.losses._common import Pairs, label_masks, mask_logits, prepare_batch
from metrix.losses._matrix import Terms, compute_dtype, masked_row_softmax, matrix_loss


def multi_similarity_pairs(s: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, epsilon: float = 0.1) -> Pairs:
    """Wang et al.'s MS mining on similarities: a negative is kept if ``s_n + ε > min_p s_p``, a positive if
    ``s_p − ε < max_n s_n`` (nothing is kept for an anchor without positives or without negatives)."""
    hardest_neg = mask_logits(s, neg).amax(dim=1, keepdim=True)  # −huge when there is no negative
    hardest_pos = (-mask_logits(-s, pos)).amin(dim=1, keepdim=True)  # +huge when there is no positive
    return Pairs(pos * (s - epsilon < hardest_neg), neg * (s + epsilon > hardest_pos))


def multi_similarity_loss(
    embeddings,
    labels,
    ref_embeddings=None,
    ref_labels=None,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    mining: bool = True,
    epsilon: float = 0.1,
    metric: str = "cosine",
    pairs=None,
) -> torch.Tensor:
    """Multi-Similarity loss; anchors with no selected pair contribute 0 to the mean."""
    check_metric(metric, ("cosine", "dot"), "multi_similarity_loss (it compares similarities: cos or x·y)")
    b = prepare_batch(embeddings, labels, ref_embeddings, ref_labels)
    pos, neg = label_masks(b, compute_dtype(b.embeddings), pairs, reuse=True)

    def terms(s):
        p, n = multi_similarity_pairs(s, pos, neg, epsilon) if mining else (pos, neg)
        # ∂/∂s of (1/α)·log(1 + Σ_p e^{−α(s−λ)}) is −softmax_p; of (1/β)·log(1 + Σ_n e^{β(s−λ)}) is +softmax_n
        lse_p, prob_p = masked_row_softmax((s - base).mul_(-alpha), p, zero_logit=True)
        lse_n, prob_n = masked_row_softmax((s - base).mul_(beta), n, zero_logit=True)
        loss = (lse_p / alpha + lse_n / beta).mean()
        return Terms(loss, prob_n.sub_(prob_p).div_(s.shape[0]))

    return matrix_loss(b.embeddings, b.ref_embeddings, b.same_set, metric, terms, similarity=True)


class MultiSimilarityLoss(nn.Module):
    """Module form of :func:`multi_similarity_loss`."""

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, mining: bool = True,
                 epsilon: float = 0.1, metric: str = "cosine"):
        super().__init__()
        self.alpha, self.beta, self.base = float(alpha), float(beta), float(base)
        self.mining, self.epsilon, self.metric = bool(mining), float(epsilon), metric

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, pairs=None):
        return multi_similarity_loss(
            embeddings, labels, ref_embeddings, ref_labels, alpha=self.alpha, beta=self.beta,
            base=self.base, mining=self.mining, epsilon=self.epsilon, metric=self.metric, pairs=pairs,
        )
