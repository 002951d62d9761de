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
from torch.autograd.function import once_differentiable

from metrix._validation import check_positive
from metrix.distances import safe_sqrt
from metrix.losses._common import EXP_FLOOR, log1p_sum_exp, prepare_batch


def _check_class_labels(labels: torch.Tensor, num_classes: int) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must be class indices in [0, {num_classes}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]; map them with metrix.datasets.encode_labels"
        )


def _no_reference(name, ref_embeddings, ref_labels):
    if ref_embeddings is not None or ref_labels is not None:
        raise ValueError(f"{name} compares embeddings with learned class vectors; ref_embeddings is not used")


_NORM_EPS = 1e-12  # as F.normalize: rows shorter than this are divided by it instead of their norm


def _unit_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(_NORM_EPS)
    return x / norm, norm


def _unit_rows_backward(grad: torch.Tensor, unit: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """∂/∂x of ``x/‖x‖`` applied to ``grad`` (in place): ``(g − x̂·(g·x̂)) / ‖x‖``. A row whose norm was clamped
    (a zero vector: no direction) gets a zero gradient, not ``g/eps`` (≈1e12 that would wreck the network)."""
    along = torch.linalg.vecdot(grad, unit, dim=1).unsqueeze_(1)
    return grad.addcmul_(unit, along, value=-1.0).div_(norm).mul_(norm > _NORM_EPS)


class _ClassCosine(torch.autograd.Function):
    """``normalize(x) @ normalize(w)ᵀ`` with a hand-written backward: autograd through ``F.normalize`` takes
    about twice as many (B, D) passes, which is most of a classification loss's time at B×C = 1024×64."""

    @staticmethod
    def forward(ctx, x, w):
        x_unit, x_norm = _unit_rows(x)
        w_unit, w_norm = _unit_rows(w)
        ctx.save_for_backward(x_unit, x_norm, w_unit, w_norm)
        return x_unit @ w_unit.T

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x_unit, x_norm, w_unit, w_norm = ctx.saved_tensors
        gx = _unit_rows_backward(grad @ w_unit, x_unit, x_norm) if ctx.needs_input_grad[0] else None
        gw = _unit_rows_backward(grad.T @ x_unit, w_unit, w_norm) if ctx.needs_input_grad[1] else None
        return gx, gw


def class_cosine(embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cosine between every embedding and every class vector, computed in float32 or wider."""
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        dtype = torch.promote_types(embeddings.dtype, torch.float32)
        return _ClassCosine.apply(embeddings.to(dtype), weight.to(dtype))


def _prepare_class_batch(embeddings, labels, weight, rows_per_class: int = 1, rows_name: str = "rows_per_class"):
    """Validate a batch against a class matrix holding ``rows_per_class`` consecutive rows per class."""
    b = prepare_batch(embeddings, labels)
    if weight.ndim != 2 or weight.shape[1] != b.embeddings.shape[1]:
        raise ValueError(
            f"embeddings have shape {tuple(b.embeddings.shape)} but the class vectors have shape {tuple(weight.shape)}"
        )
    if weight.shape[0] % rows_per_class:
        raise ValueError(f"the class matrix has {weight.shape[0]} rows, not a multiple of {rows_name}={rows_per_class}")
    _check_class_labels(b.labels, weight.shape[0] // rows_per_class)
    return b


def _margin_cross_entropy(embeddings, labels, weight, scale, target_fn, sub_centers: int = 1):
    """Cross-entropy over ``scale·cos`` with the target class's cosine replaced by ``target_fn(cos)``."""
    b = _prepare_class_batch(embeddings, labels, weight, sub_centers, "sub_centers")
    cos = class_cosine(b.embeddings, weight) if sub_centers == 1 else subcenter_cosine(b.embeddings, weight, sub_centers)
    idx = b.labels[:, None]
    logits = cos.scatter(1, idx, target_fn(cos.gather(1, idx))) * scale
    return F.cross_entropy(logits, b.labels)


def _arcface_target(c: torch.Tensor, margin: float) -> torch.Tensor:
    """``cos(θ + m)`` for target cosines ``c``, with InsightFace's monotonic fallback past ``θ = π − m``."""
    c = c.clamp(-1.0, 1.0)
    sin_t = safe_sqrt(1.0 - c * c)  # finite gradient at |cos| = 1
    threshold, fallback = math.cos(math.pi - margin), math.sin(math.pi - margin) * margin
    return torch.where(c > threshold, c * math.cos(margin) - sin_t * math.sin(margin), c - fallback)


def arcface_loss(embeddings, labels, weight, *, margin: float = 0.5, scale: float = 64.0) -> torch.Tensor:
    """Additive angular margin loss; ``margin`` in radians (pytorch-metric-learning takes degrees).

    As in the official InsightFace code, when ``θ + m`` would pass π (where ``cos(θ+m)`` stops
    decreasing) the target logit becomes ``cos θ − m·sin m`` so the penalty stays monotonic.
    """
    return _margin_cross_entropy(embeddings, labels, weight, scale, lambda c: _arcface_target(c, margin))


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


def _cosine_by_rank(embeddings, weight, per_class: int) -> torch.Tensor:
    """Cosines to ``per_class`` consecutive rows of ``weight`` per class, as (B, per_class, C): the k-th vector
    of every class side by side. Reducing over a class's vectors then runs over the middle axis with the
    classes contiguous, 4–8× faster on CPU than over a short last axis."""
    n_classes = weight.shape[0] // per_class
    by_rank = weight.view(n_classes, per_class, -1).transpose(0, 1).reshape(weight.shape)
    return class_cosine(embeddings, by_rank).view(-1, per_class, n_classes)


def subcenter_cosine(embeddings, weight, sub_centers: int) -> torch.Tensor:
    """Class cosine = the best of ``sub_centers`` consecutive rows of ``weight`` per class."""
    return _cosine_by_rank(embeddings, weight, sub_centers).amax(dim=1)


def subcenter_arcface_loss(embeddings, labels, weight, *, sub_centers: int = 3, margin: float = 0.5,
                           scale: float = 64.0) -> torch.Tensor:
    """Sub-center ArcFace (Deng et al., ECCV 2020): each class has ``sub_centers`` weight rows (rows
    ``c·K … c·K+K−1``); the class cosine is their maximum, then the ArcFace margin applies. Noisy samples can
    gather at a non-dominant sub-centre instead of pulling the class centre."""
    return _margin_cross_entropy(embeddings, labels, weight, scale, lambda c: _arcface_target(c, margin), sub_centers)


class _RelaxedMax(torch.autograd.Function):
    """``S = Σ_k p_k s_k`` with ``p = softmax_k(s/γ)`` over axis 1, and its backward written out:
    ``∂S/∂s_k = p_k (1 + (s_k − S)/γ)`` — a third of the passes of autograd through softmax, mul and sum."""

    @staticmethod
    def forward(ctx, s, gamma: float):
        p = (s - s.amax(dim=1, keepdim=True)).mul_(1.0 / gamma).clamp_min_(EXP_FLOOR).exp_()
        p.div_(p.sum(dim=1, keepdim=True))
        out = (p * s).sum(dim=1)
        ctx.save_for_backward(s, p, out)
        ctx.gamma = gamma
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        s, p, out = ctx.saved_tensors
        return (s - out[:, None]).mul_(1.0 / ctx.gamma).add_(1.0).mul_(p).mul_(grad[:, None]), None


def softtriple_similarity(embeddings, centers, centers_per_class: int, gamma: float) -> torch.Tensor:
    """SoftTriple's relaxed similarity to each class: ``Σ_k softmax_k(s_ck / γ) · s_ck`` over its centres."""
    return _RelaxedMax.apply(_cosine_by_rank(embeddings, centers, centers_per_class), float(gamma))


def softtriple_loss(embeddings, labels, centers, *, centers_per_class: int = 10, la: float = 20.0,
                    gamma: float = 0.1, margin: float = 0.01) -> torch.Tensor:
    """SoftTriple (Qian et al., "SoftTriple Loss: Deep Metric Learning Without Triplet Sampling", ICCV 2019):
    ``CE(λ·(S − δ·1_y))`` with ``S`` the relaxed class similarities (paper defaults λ=20, γ=0.1, δ=0.01, K=10).
    The paper's optional regulariser that merges redundant centres is not included (as in
    pytorch-metric-learning, whose values this equals)."""
    b = _prepare_class_batch(embeddings, labels, centers, centers_per_class, "centers_per_class")
    s = softtriple_similarity(b.embeddings, centers, centers_per_class, gamma)
    s = s - margin * F.one_hot(b.labels, s.shape[1]).to(s.dtype)
    return F.cross_entropy(la * s, b.labels)


class SubCenterArcFaceLoss(_ClassVectorLoss):
    """Sub-center ArcFace with ``sub_centers`` learnable vectors per class (paper defaults K=3, m=0.5, s=64)."""

    def __init__(self, num_classes: int, embedding_dim: int, sub_centers: int = 3, margin: float = 0.5, scale: float = 64.0):
        if int(sub_centers) < 1:
            raise ValueError(f"sub_centers must be >= 1, got {sub_centers}")
        super().__init__(int(num_classes) * int(sub_centers), embedding_dim)
        self.num_classes, self.sub_centers = int(num_classes), int(sub_centers)
        self.margin, self.scale = float(margin), check_positive(scale, "scale")

    def get_logits(self, embeddings):
        return subcenter_cosine(embeddings, self.weight, self.sub_centers) * self.scale

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None):
        _no_reference("SubCenterArcFaceLoss", ref_embeddings, ref_labels)
        return subcenter_arcface_loss(embeddings, labels, self.weight, sub_centers=self.sub_centers,
                                      margin=self.margin, scale=self.scale)


class SoftTripleLoss(_ClassVectorLoss):
    """SoftTriple with ``centers_per_class`` learnable centres per class (see :func:`softtriple_loss`)."""

    def __init__(self, num_classes: int, embedding_dim: int, centers_per_class: int = 10, la: float = 20.0,
                 gamma: float = 0.1, margin: float = 0.01):
        if int(centers_per_class) < 1:
            raise ValueError(f"centers_per_class must be >= 1, got {centers_per_class}")
        super().__init__(int(num_classes) * int(centers_per_class), embedding_dim)
        self.num_classes, self.centers_per_class = int(num_classes), int(centers_per_class)
        self.la, self.gamma, self.margin = float(la), check_positive(gamma, "gamma"), float(margin)

    def get_logits(self, embeddings):
        return self.la * softtriple_similarity(embeddings, self.weight, self.centers_per_class, self.gamma)

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None):
        _no_reference("SoftTripleLoss", ref_embeddings, ref_labels)
        return softtriple_loss(embeddings, labels, self.weight, centers_per_class=self.centers_per_class,
                               la=self.la, gamma=self.gamma, margin=self.margin)


def _chebyshev(c: torch.Tensor, m: int) -> torch.Tensor:
    """``cos(m·θ)`` as the polynomial ``T_m(cos θ)`` (finite gradients, unlike ``cos(m·acos(c))``)."""
    prev, cur = torch.ones_like(c), c
    if m == 0:
        return prev
    for _ in range(m - 1):
        prev, cur = cur, 2 * c * cur - prev
    return cur


def _psi(c: torch.Tensor, m: int) -> torch.Tensor:
    """L-Softmax's monotonic ψ(θ) = (−1)^k cos(mθ) − 2k for θ ∈ [kπ/m, (k+1)π/m]."""
    with torch.no_grad():
        k = torch.floor(torch.acos(c.clamp(-1.0, 1.0)) * m / math.pi)
    return (1.0 - 2.0 * torch.remainder(k, 2)) * _chebyshev(c, m) - 2.0 * k


def _multiplicative_margin_loss(embeddings, labels, weight, margin, scale, unit_weights):
    b = _prepare_class_batch(embeddings, labels, weight)
    if int(margin) != margin or margin < 1:
        raise ValueError(f"margin must be a positive integer (the angle multiplier m), got {margin}")
    x = b.embeddings.to(torch.promote_types(b.embeddings.dtype, torch.float32))
    cos = class_cosine(x, weight).clamp(-1.0, 1.0)
    norms = x.norm(dim=1, keepdim=True)
    if not unit_weights:
        norms = norms * weight.to(x.dtype).norm(dim=1)[None, :]
    idx = b.labels[:, None]
    target = _psi(cos.gather(1, idx), int(margin))
    logits = cos.scatter(1, idx, target) * norms * scale
    return F.cross_entropy(logits, b.labels)


def large_margin_softmax_loss(embeddings, labels, weight, *, margin: int = 4, scale: float = 1.0) -> torch.Tensor:
    """L-Softmax (Liu et al., "Large-Margin Softmax Loss for Convolutional Neural Networks", ICML 2016): the
    target logit ``‖w_y‖‖x‖cos θ_y`` becomes ``‖w_y‖‖x‖ψ(θ_y)`` with an integer angle multiplier ``m`` (paper:
    2–4). The paper's λ-annealing from plain softmax is not built in (as in pytorch-metric-learning)."""
    return _multiplicative_margin_loss(embeddings, labels, weight, margin, scale, unit_weights=False)


def sphereface_loss(embeddings, labels, weight, *, margin: int = 4, scale: float = 1.0) -> torch.Tensor:
    """SphereFace / A-Softmax (Liu et al., CVPR 2017): L-Softmax with unit-norm class weights, so the margin
    acts on angles only: target logit ``‖x‖ψ(θ_y)``, others ``‖x‖cos θ_j``."""
    return _multiplicative_margin_loss(embeddings, labels, weight, margin, scale, unit_weights=True)


class LargeMarginSoftmaxLoss(_ClassVectorLoss):
    """L-Softmax with learnable class weights (see :func:`large_margin_softmax_loss`)."""

    unit_weights = False

    def __init__(self, num_classes: int, embedding_dim: int, margin: int = 4, scale: float = 1.0):
        super().__init__(num_classes, embedding_dim)
        if int(margin) != margin or margin < 1:
            raise ValueError(f"margin must be a positive integer, got {margin}")
        self.margin, self.scale = int(margin), check_positive(scale, "scale")

    def get_logits(self, embeddings):
        norms = embeddings.float().norm(dim=1, keepdim=True)
        if not self.unit_weights:
            norms = norms * self.weight.norm(dim=1)[None, :]
        return class_cosine(embeddings, self.weight) * norms * self.scale

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None):
        _no_reference(type(self).__name__, ref_embeddings, ref_labels)
        return _multiplicative_margin_loss(embeddings, labels, self.weight, self.margin, self.scale, self.unit_weights)


class SphereFaceLoss(LargeMarginSoftmaxLoss):
    """SphereFace (A-Softmax) with learnable class weights (see :func:`sphereface_loss`)."""

    unit_weights = True
