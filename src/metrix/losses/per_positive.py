"""Losses with one term per (anchor, positive) pair that sums over all of the anchor's references.

Smooth-AP needs, for every anchor a and each of its positives p, a row over the R references: a (B, Pmax, R)
block, Pmax being the most positives any anchor has (K−1 in P×K batches), built for chunks of anchors so
memory stays within ``_CHUNK_ELEMENTS`` whatever the batch size. The angular loss's sum over negatives
factorises into one (B × R) · (R × R) matrix product (see :func:`angular_loss`).

* Angular loss (Wang et al., "Deep Metric Learning with Angular Loss", ICCV 2017), per positive pair:
  ``log(1 + Σ_n e^{4 tan²α (x_a + x_p)·x_n − 2(1 + tan²α) x_a·x_p})`` on L2-normalised embeddings,
  averaged over positive pairs (α = 40°). Same values as pytorch-metric-learning's ``AngularLoss``.
* Smooth-AP (Brown et al., "Smooth-AP: Smoothing the Path Towards Large-Scale Image Retrieval", ECCV 2020):
  ``1 − mean_a AP_a`` with ``AP_a = 1/|P_a| Σ_{i∈P_a} (1 + Σ_{j∈P_a, j≠i} σ((s_j − s_i)/τ)) /
  (1 + Σ_{j∈Ω_a, j≠i} σ((s_j − s_i)/τ))``, cosine similarity ``s`` to the anchor, ``Ω_a`` all references but
  the anchor itself, τ = 0.01. (pytorch-metric-learning's ``SmoothAPLoss`` also ranks the query inside its own
  gallery and needs equal-size, grouped classes; this follows the paper.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from metrix._validation import check_positive
from metrix.losses._common import gather_positions, label_masks, mask_positions, prepare_batch, reduce, zero_loss

_CHUNK_ELEMENTS = 2**24


def _chunks(n_anchors: int, p_max: int, n_ref: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, p_max * n_ref))
    for start in range(0, n_anchors, step):
        yield slice(start, min(n_anchors, start + step))


def angular_loss(embeddings, labels, ref_embeddings=None, ref_labels=None, *, alpha_degrees: float = 40.0,
                 pairs=None) -> torch.Tensor:
    """Angular loss, mean over positive pairs; 0 (with a gradient path) when there is none.

    The sum over negatives factorises: with ``c = 4 tan²α``,
    ``Σ_n e^{c(x_a + x_p)·x_n} = Σ_n e^{c x_a·x_n} · e^{c x_p·x_n}``, so every (anchor, positive) pair's sum is
    one entry of the matrix product ``(E_ar ⊙ N) E_rrᵀ`` with ``E = e^{c(S − 1)}`` — a GEMM instead of a
    (B, Pmax, R) block of exponentials. On unit vectors ``S ∈ [−1, 1]`` bounds every exponent; above 60° the
    bounds leave float32's range and the products run in float64.
    """
    alpha = float(alpha_degrees)
    if not 0.0 < alpha <= 80.0:
        raise ValueError(f"alpha_degrees must be in (0, 80], got {alpha_degrees}")
    b = prepare_batch(embeddings, labels, ref_embeddings, ref_labels)
    t2 = math.tan(math.radians(alpha)) ** 2
    c, beta = 4.0 * t2, 2.0 * (1.0 + t2)
    # E ≥ e^{−2c}, products ≥ e^{−4c} and e^{2c+β}·R must stay finite: float32 holds them up to t² = 3 (60°)
    dtype = torch.float64 if t2 > 3.0 else torch.promote_types(b.embeddings.dtype, torch.float32)
    x = F.normalize(b.embeddings.to(dtype), dim=1)
    r = x if b.same_set else F.normalize(b.ref_embeddings.to(dtype), dim=1)
    s_ar = x @ r.T  # anchor · reference
    e_ar = torch.exp(c * (s_ar - 1.0))
    e_rr = e_ar if b.same_set else torch.exp(c * (r @ r.T - 1.0))  # positive · reference (positives are references)
    pos, neg = label_masks(b, dtype, pairs)
    flat, valid = mask_positions(pos)
    # Σ_{n ∈ neg(a)} e^{c(x_a·x_n − 1)} e^{c(x_p·x_n − 1)} for every (a, p), then each anchor's positives
    neg_sums = gather_positions((e_ar * neg) @ e_rr.T, flat)
    terms = torch.log1p(torch.exp(2.0 * c - beta * gather_positions(s_ar, flat)) * neg_sums)
    count = int(torch.count_nonzero(valid))
    if not count:
        return zero_loss(b.embeddings, b.ref_embeddings)
    return ((terms * valid).sum() / count).to(torch.promote_types(b.embeddings.dtype, torch.float32))


class AngularLoss(nn.Module):
    """Module form of :func:`angular_loss`."""

    def __init__(self, alpha_degrees: float = 40.0):
        super().__init__()
        self.alpha_degrees = float(alpha_degrees)

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, pairs=None):
        return angular_loss(embeddings, labels, ref_embeddings, ref_labels, alpha_degrees=self.alpha_degrees, pairs=pairs)


def smooth_ap_loss(embeddings, labels, ref_embeddings=None, ref_labels=None, *, temperature: float = 0.01,
                   pairs=None) -> torch.Tensor:
    """Smooth-AP loss ``1 − mean AP`` over anchors with positives; 0 (with a gradient path) if none has one."""
    temperature = check_positive(temperature, "temperature")
    b = prepare_batch(embeddings, labels, ref_embeddings, ref_labels)
    x = F.normalize(b.embeddings, dim=1)
    r = x if b.same_set else F.normalize(b.ref_embeddings, dim=1)
    s = (x @ r.T) / temperature
    pos, neg = label_masks(b, s.dtype, pairs)
    # per anchor, the references to count above each positive: Ω (all but the anchor) and its positives
    masks = torch.stack([pos + neg, pos], dim=2)  # (B, R, 2)
    flat, valid = mask_positions(pos)
    ap_sum = s.new_zeros(s.shape[0])
    for rows in _chunks(x.shape[0], flat.shape[1], r.shape[0]):
        s_i = gather_positions(s, flat[rows])  # (c, Pmax) scaled similarity of each positive i
        above = torch.sigmoid(s[rows][:, None, :] - s_i[:, :, None])  # (c, Pmax, R): σ((s_j − s_i)/τ)
        # both rank sums in one batched product; j = i is in both masks and adds σ(0) = ½ (with zero
        # gradient, as s_i − s_i is constant), so it is taken back as a number instead of masked out
        ranks = torch.bmm(above, masks[rows]) + 0.5  # 1 + Σ_{j≠i}: (c, Pmax, 2)
        ap_sum[rows] = (ranks[..., 1] / ranks[..., 0] * valid[rows]).sum(dim=1)
    n_pos = pos.sum(dim=1)
    has_pos = (n_pos > 0).to(s.dtype)
    losses = (1.0 - ap_sum / n_pos.clamp_min(1)) * has_pos
    return reduce(losses, torch.count_nonzero(has_pos), "mean", b.embeddings, b.ref_embeddings)


class SmoothAPLoss(nn.Module):
    """Module form of :func:`smooth_ap_loss`."""

    def __init__(self, temperature: float = 0.01):
        super().__init__()
        self.temperature = check_positive(temperature, "temperature")

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, pairs=None):
        return smooth_ap_loss(embeddings, labels, ref_embeddings, ref_labels, temperature=self.temperature, pairs=pairs)
