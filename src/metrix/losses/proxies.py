"""Classification and proxy losses: each class owns a learnable vector (a weight row or a proxy).

* ArcFace (Deng et al., CVPR 2019): target logit ``s·cos(θ_y + m)``.
* CosFace (Wang et al., CVPR 2018): target logit ``s·(cos θ_y − m)``.
* Proxy-Anchor (Kim et al., CVPR 2020):
  ``L = 1/|P⁺| Σ_{p∈P⁺} log(1 + Σ_{x∈X_p⁺} e^{−α(s(x,p)−δ)}) + 1/|P| Σ_{p∈P} log(1 + Σ_{x∈X_p⁻} e^{α(s(x,p)+δ)})``.

The functional forms take the class matrix explicitly; the modules own it as a parameter (so it
appears in ``loss.parameters()`` and must be given to the optimizer; metrix's Trainer does that).
Cosines are computed in float32 even under autocast, and parameters stay float32.
Labels must be class indices in ``[0, num_classes)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from metrix._validation import check_positive
from metrix.distances import safe_sqrt
from metrix.losses._common import log1p_sum_exp, prepare_batch


def _check_class_labels(labels: torch.Tensor, num_classes: int) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must be class indices in [0, {num_classes}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]; map them with metrix.datasets.encode_labels"
        )


def _no_reference(name, ref_embeddings, ref_labels):
    if ref_embeddings is not None or ref_labels is not None:
        raise ValueError(f"{name} compares embeddings with learned class vectors; ref_embeddings is not used")


def class_cosine(embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cosine between every embedding and every class vector, computed in float32 or wider."""
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        dtype = torch.promote_types(embeddings.dtype, torch.float32)
        return F.normalize(embeddings.to(dtype), dim=1) @ F.normalize(weight.to(dtype), dim=1).T


def _prepare_class_batch(embeddings, labels, weight):
    b = prepare_batch(embeddings, labels)
    if weight.ndim != 2 or weight.shape[1] != b.embeddings.shape[1]:
        raise ValueError(
            f"embeddings have shape {tuple(b.embeddings.shape)} but the class vectors have shape {tuple(weight.shape)}"
        )
    _check_class_labels(b.labels, weight.shape[0])
    return b


def _margin_cross_entropy(embeddings, labels, weight, scale, target_fn):
    b = _prepare_class_batch(embeddings, labels, weight)
    cos = class_cosine(b.embeddings, weight)
    idx = b.labels[:, None]
    logits = cos.scatter(1, idx, target_fn(cos.gather(1, idx))) * scale
    return F.cross_entropy(logits, b.labels)


def arcface_loss(embeddings, labels, weight, *, margin: float = 0.5, scale: float = 64.0) -> torch.Tensor:
    """Additive angular margin loss; ``margin`` in radians (pytorch-metric-learning takes degrees).

    As in the official InsightFace code, when ``θ + m`` would pass π (where ``cos(θ+m)`` stops
    decreasing) the target logit becomes ``cos θ − m·sin m`` so the penalty stays monotonic.
    """
    cos_m, sin_m = math.cos(margin), math.sin(margin)
    threshold, fallback = math.cos(math.pi - margin), math.sin(math.pi - margin) * margin

    def target(c):
        c = c.clamp(-1.0, 1.0)
        sin_t = safe_sqrt(1.0 - c * c)  # finite gradient at |cos| = 1
        return torch.where(c > threshold, c * cos_m - sin_t * sin_m, c - fallback)

    return _margin_cross_entropy(embeddings, labels, weight, scale, target)


def cosface_loss(embeddings, labels, weight, *, margin: float = 0.35, scale: float = 64.0) -> torch.Tensor:
    """Large margin cosine loss: the target logit is ``s·(cos θ_y − m)``."""
    return _margin_cross_entropy(embeddings, labels, weight, scale, lambda c: c - margin)


def proxy_anchor_loss(embeddings, labels, proxies, *, margin: float = 0.1, alpha: float = 32.0) -> torch.Tensor:
    """Proxy-Anchor loss with cosine similarity (paper defaults ``δ=0.1, α=32``)."""
    b = _prepare_class_batch(embeddings, labels, proxies)
    cos = class_cosine(b.embeddings, proxies)
    is_pos = F.one_hot(b.labels, proxies.shape[0]).to(cos.dtype)
    n_with_pos = torch.count_nonzero(is_pos.sum(dim=0))
    pos_term = log1p_sum_exp(-alpha * (cos - margin), is_pos, dim=0)
    neg_term = log1p_sum_exp(alpha * (cos + margin), 1.0 - is_pos, dim=0)
    return pos_term.sum() / n_with_pos + neg_term.sum() / proxies.shape[0]


class _ClassVectorLoss(nn.Module):
    def __init__(self, num_classes: int, embedding_dim: int):
        super().__init__()
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if int(embedding_dim) < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        self.num_classes, self.embedding_dim = int(num_classes), int(embedding_dim)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.embedding_dim))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Class scores for inference: ``scale · cos(embedding, class vector)``."""
        return class_cosine(embeddings, self.weight) * getattr(self, "scale", 1.0)


class ArcFaceLoss(_ClassVectorLoss):
    """ArcFace with learnable class weights (``margin`` in radians, paper defaults 0.5 and 64)."""

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 0.5, scale: float = 64.0):
        super().__init__(num_classes, embedding_dim)
        self.margin, self.scale = float(margin), check_positive(scale, "scale")

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None):
        _no_reference("ArcFaceLoss", ref_embeddings, ref_labels)
        return arcface_loss(embeddings, labels, self.weight, margin=self.margin, scale=self.scale)


class CosFaceLoss(_ClassVectorLoss):
    """CosFace with learnable class weights (paper defaults ``m=0.35, s=64``)."""

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 0.35, scale: float = 64.0):
        super().__init__(num_classes, embedding_dim)
        self.margin, self.scale = float(margin), check_positive(scale, "scale")

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None):
        _no_reference("CosFaceLoss", ref_embeddings, ref_labels)
        return cosface_loss(embeddings, labels, self.weight, margin=self.margin, scale=self.scale)


class ProxyAnchorLoss(_ClassVectorLoss):
    """Proxy-Anchor with learnable proxies (``self.weight``, one row per class).

    The paper trains proxies with a 100× larger learning rate; ``Trainer(loss_lr=...)`` sets it.
    """

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 0.1, alpha: float = 32.0):
        super().__init__(num_classes, embedding_dim)
        self.margin, self.alpha = float(margin), check_positive(alpha, "alpha")

    def get_logits(self, embeddings):
        return class_cosine(embeddings, self.weight)

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None):
        _no_reference("ProxyAnchorLoss", ref_embeddings, ref_labels)
        return proxy_anchor_loss(embeddings, labels, self.weight, margin=self.margin, alpha=self.alpha)


def proxy_nca_loss(embeddings, labels, proxies, *, scale: float = 1.0) -> torch.Tensor:
    """ProxyNCA (Movshovitz-Attias et al., ICCV 2017) in the NCA softmax form:

        L = mean_i −log( e^{−s·‖x̂_i − p̂_{y_i}‖²} / Σ_c e^{−s·‖x̂_i − p̂_c‖²} )

    on L2-normalised embeddings and proxies. The original paper leaves the positive proxy out of the
    denominator; like pytorch-metric-learning's ``ProxyNCALoss`` and ProxyNCA++ (Teh et al., 2020), it is kept
    in, which makes the loss a proper cross-entropy. ``scale`` is ProxyNCA++'s inverse temperature (they use 9).
    """
    b = _prepare_class_batch(embeddings, labels, proxies)
    # ‖x̂ − p̂‖² = 2 − 2 cos for unit vectors
    logits = -scale * (2.0 - 2.0 * class_cosine(b.embeddings, proxies))
    return F.cross_entropy(logits, b.labels)


def normalized_softmax_loss(embeddings, labels, weight, *, temperature: float = 0.05) -> torch.Tensor:
    """Normalized softmax (Zhai & Wu, "Classification is a Strong Baseline for Deep Metric Learning", BMVC
    2019): cross-entropy over ``cos(x, w_c) / T`` with L2-normalised embeddings and class weights."""
    b = _prepare_class_batch(embeddings, labels, weight)
    return F.cross_entropy(class_cosine(b.embeddings, weight) / temperature, b.labels)


class ProxyNCALoss(_ClassVectorLoss):
    """ProxyNCA with learnable proxies (see :func:`proxy_nca_loss`)."""

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 1.0):
        super().__init__(num_classes, embedding_dim)
        self.scale = check_positive(scale, "scale")

    def get_logits(self, embeddings):
        return -self.scale * (2.0 - 2.0 * class_cosine(embeddings, self.weight))

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None):
        _no_reference("ProxyNCALoss", ref_embeddings, ref_labels)
        return proxy_nca_loss(embeddings, labels, self.weight, scale=self.scale)


class NormalizedSoftmaxLoss(_ClassVectorLoss):
    """Normalized softmax with learnable class weights (see :func:`normalized_softmax_loss`)."""

    def __init__(self, num_classes: int, embedding_dim: int, temperature: float = 0.05):
        super().__init__(num_classes, embedding_dim)
        self.temperature = check_positive(temperature, "temperature")

    def get_logits(self, embeddings):
        return class_cosine(embeddings, self.weight) / self.temperature

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None):
        _no_reference("NormalizedSoftmaxLoss", ref_embeddings, ref_labels)
        return normalized_softmax_loss(embeddings, labels, self.weight, temperature=self.temperature)


def center_loss(embeddings, labels, centers) -> torch.Tensor:
    """Center loss (Wen et al., "A Discriminative Feature Learning Approach for Deep Face Recognition",
    ECCV 2016): ``L = 1/2 · mean_i ‖x_i − c_{y_i}‖²``. Centers are learned by gradient descent here (the
    paper's separate update rule with rate α is equivalent to a per-parameter learning rate, ``Trainer(loss_lr=...)``).
    Combine it with a softmax-type loss through ``MultipleLosses``, as the paper does (weight λ)."""
    b = _prepare_class_batch(embeddings, labels, centers)
    return 0.5 * (b.embeddings - centers[b.labels]).pow(2).sum(dim=1).mean()


class CenterLoss(_ClassVectorLoss):
    """Center loss with learnable class centres (``self.weight``, initialised at 0 as in the paper)."""

    def __init__(self, num_classes: int, embedding_dim: int):
        super().__init__(num_classes, embedding_dim)
        with torch.no_grad():
            self.weight.zero_()

    def get_logits(self, embeddings):
        """Negative squared distances to the centres (larger = more likely)."""
        return -torch.cdist(embeddings.float(), self.weight).pow(2)

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None):
        _no_reference("CenterLoss", ref_embeddings, ref_labels)
        return center_loss(embeddings, labels, self.weight)
