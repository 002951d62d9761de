"""Pairwise distance and similarity matrices between ``x`` (B, D) and ``y`` (R, D).

All Euclidean-family work is a matrix product (``‖x‖² + ‖y‖² − 2·x·yᵀ``), so it runs at GEMM
speed. The expansion loses up to ``γ·(‖x‖² + ‖y‖²)`` to rounding, so the few entries within that bound
of 0 are recomputed as ``Σ(x − y)²`` (:func:`exact_near_zero_`): identical points get distance exactly
0 on every CPU and BLAS, and small distances keep full accuracy. The square root is "safe": identical
points get a finite (zero) gradient, where a plain ``sqrt`` would return ``inf · 0 = NaN`` in backward.

``y=None`` means "compare ``x`` with itself"; the diagonal is then exactly 0 (distance) or the
self-similarity.

Example
-------
>>> import torch
>>> from metrix.distances import pairwise_distance
>>> x = torch.randn(4, 8)
>>> pairwise_distance(x, metric="euclidean").shape
torch.Size([4, 4])
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from metrix._validation import check_embeddings, check_pair


class _SafeSqrt(torch.autograd.Function):
    """``sqrt(max(x, 0))`` whose gradient at 0 is 0 instead of inf (a valid subgradient)."""

    @staticmethod
    def forward(ctx, x):
        out = x.clamp_min(0).sqrt()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return torch.where(out > 0, grad / (2 * out), torch.zeros_like(grad))


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """Square root with a finite gradient everywhere (0 at 0)."""
    return _SafeSqrt.apply(x)


def _prepare(x, y):
    x = check_embeddings(x, "x")
    if y is None:
        return x, x, True
    y = check_embeddings(y, "y")
    check_pair(x, y, "x", "y")
    return x, y, False


def expansion_error_factor(dim: int, dtype: torch.dtype) -> float:
    """``γ`` with ``|fl(‖x‖² + ‖y‖² − 2x·y) − ‖x − y‖²| ≤ γ·(‖x‖² + ‖y‖²)`` for any summation order.

    Each of the three length-``dim`` sums is within ``γ_dim = dim·u/(1 − dim·u)`` of its value relative to
    the sum of its absolute terms (Higham, *Accuracy and Stability*, §3.1; any order, blocking or FMA),
    and ``2|x·y| ≤ ‖x‖² + ‖y‖²``; the two additions and the rounding of the result add ``3u``. Sums of
    half-precision inputs accumulate in float32 on every backend, so ``u`` of the sums is float32's there.
    """
    u_out = torch.finfo(dtype).eps / 2
    u_acc = min(u_out, torch.finfo(torch.float32).eps / 2)
    gamma = dim * u_acc / (1 - dim * u_acc)
    return 2 * gamma + 3 * u_out


EXACT_CHUNK = 1 << 22  # elements of (entries, D) differences per chunk of the exact recomputation


def exact_sq_distances(x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``Σ_k (x[rows] − y[cols])_k²`` entry by entry, in chunks of bounded memory: exactly 0 for identical
    rows and accurate to a few ulps elsewhere (no cancellation, unlike the GEMM expansion)."""
    step = max(1, EXACT_CHUNK // max(1, x.shape[1]))
    parts = [(x[rows[s : s + step]] - y[cols[s : s + step]]).square_().sum(dim=1) for s in range(0, len(rows), step)]
    return torch.cat(parts) if parts else x.new_zeros(0)


def exact_near_zero_(sq: torch.Tensor, x: torch.Tensor, y: torch.Tensor, x_sq: torch.Tensor,
                     y_sq: torch.Tensor, cols: torch.Tensor | None = None, extra_terms: int = 2) -> torch.Tensor:
    """Entries of a GEMM-expanded ``‖x_i − y_j‖²`` that rounding could have moved by their own size (those
    within :func:`expansion_error_factor` of 0) recomputed directly, in place.

    This makes identical points exactly 0 and small distances accurate by construction, on any BLAS, CPU
    and thread count: the expansion alone leaves up to ``γ·(‖x‖² + ‖y‖²)`` (a distance of ``√γ·‖x‖``).
    Entries are few unless points nearly coincide, and every negative rounding result is among them.
    ``cols`` (same shape as ``sq``) names the column of ``y`` behind each entry (a kNN result); without
    it, entry ``(i, j)`` is ``x_i`` against ``y_j``. ``extra_terms`` widens the bound for products over
    augmented rows (2: the norms inside the product, as kNN does).
    """
    if sq.numel() == 0:
        return sq
    gamma = expansion_error_factor(x.shape[1] + extra_terms, sq.dtype)
    bound = gamma * (x_sq + y_sq.max())
    # one read-only row minimum finds the rows with any entry near 0; only those are compared entry-wise
    rows = torch.nonzero(sq.amin(dim=1) <= bound).squeeze(1)
    if len(rows):
        sub, pos = torch.nonzero(sq[rows] <= bound[rows, None], as_tuple=True)
        rows = rows[sub]
        sq[rows, pos] = exact_sq_distances(x, y, rows, pos if cols is None else cols[rows, pos]).to(sq.dtype)
    return sq


def euclidean_matrix(x: torch.Tensor, y: torch.Tensor, same: bool, squared: bool,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """No-grad (squared) Euclidean matrix: one GEMM, then the entries near 0 recomputed exactly
    (:func:`exact_near_zero_`: identical points give exactly 0, nothing is negative) and an in-place sqrt.
    ``out`` is an optional (B, R) buffer to write into."""
    x_sq = (x * x).sum(dim=1)
    y_sq = x_sq if same else (y * y).sum(dim=1)
    out = torch.add(x_sq[:, None], y_sq[None, :], out=out)  # one B×R buffer: the GEMM accumulates into it
    out.addmm_(x, y.T, alpha=-2.0)
    if same:  # the diagonal is 0 by definition; kept out of the search for entries near 0
        out.fill_diagonal_(float("inf"))
    exact_near_zero_(out, x, y, x_sq, y_sq)
    if same:
        out.fill_diagonal_(0.0)
    return out if squared else out.sqrt_()


def half_inverse(d: torch.Tensor) -> torch.Tensor:
    """``1 / (2d)`` with 0 where ``d = 0``: turns ∂L/∂d into ∂L/∂d² (a zero subgradient at d = 0)."""
    inv = d.reciprocal()
    inv.nan_to_num_(posinf=0.0)
    return inv.mul_(0.5)


def euclidean_backward(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, same: bool, symmetric: bool = False,
                       need_y: bool = True, scale: float = 1.0):
    """Gradients of ``scale · Σ w ⊙ ‖x_i − y_j‖²`` with respect to ``x`` and ``y`` as GEMMs.

    ``∂/∂x = 2(rowsum(w)·x − w·y)``, ``∂/∂y = 2(colsum(w)·y − wᵀ·x)``; with ``same`` (``y is x``) the two are
    summed into one gradient, and ``symmetric`` (``w = wᵀ``) halves that to a single GEMM. Each result is
    one ``addmm`` into the row-scaled input (no (B, D) temporaries beyond it).
    """
    c = 2.0 * scale
    if same:
        if symmetric:
            return torch.addmm(x * w.sum(dim=1, keepdim=True), w, x, beta=2 * c, alpha=-2 * c), None
        # two GEMMs (wᵀ·x reads w transposed for free) beat materialising w + wᵀ, a cache-hostile pass
        gx = torch.addmm(x * (w.sum(dim=1) + w.sum(dim=0))[:, None], w, x, beta=c, alpha=-c)
        return gx.addmm_(w.T, x, alpha=-c), None
    gx = torch.addmm(x * w.sum(dim=1, keepdim=True), w, y, beta=c, alpha=-c)
    gy = torch.addmm(y * w.sum(dim=0)[:, None], w.T, x, beta=c, alpha=-c) if need_y else None
    return gx, gy


class _Euclidean(torch.autograd.Function):
    """Pairwise (squared) Euclidean distance with a hand-written GEMM backward.

    Autograd through ``addmm → clamp → sqrt`` would make ~10 passes over the B×R matrix; here the
    forward is one GEMM plus in-place clamp/sqrt, and the backward is
    ``∂L/∂x = 2(rowsum(W)·x − W·y)``, ``∂L/∂y = 2(colsum(W)·y − Wᵀ·x)`` with ``W = ∂L/∂d ⊘ 2d``
    (``W = ∂L/∂d²`` for the squared form). At d = 0 the gradient is 0 (a valid subgradient).
    """

    @staticmethod
    def forward(ctx, x, y, same: bool, squared: bool):
        yy = x if same else y
        out = euclidean_matrix(x, yy, same, squared)
        ctx.same, ctx.squared = same, squared
        ctx.save_for_backward(x, yy, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, y, out = ctx.saved_tensors
        w = grad if ctx.squared else grad * half_inverse(out)
        gx, gy = euclidean_backward(w, x, y, ctx.same, need_y=ctx.needs_input_grad[1])
        return (gx if ctx.needs_input_grad[0] or ctx.same else None), gy, None, None


def squared_euclidean(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """``‖x_i − y_j‖²`` for all pairs, clamped at 0 against rounding."""
    x, y, same = _prepare(x, y)
    return _Euclidean.apply(x, None if same else y, same, True)


def euclidean(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """``‖x_i − y_j‖₂`` for all pairs; 0 with a finite gradient for identical points."""
    x, y, same = _prepare(x, y)
    return _Euclidean.apply(x, None if same else y, same, False)


def lp(x: torch.Tensor, y: torch.Tensor | None = None, p: float = 2.0) -> torch.Tensor:
    """Minkowski distance ``‖x_i − y_j‖_p`` for ``p >= 1`` (``p=inf`` allowed)."""
    p = float(p)
    if not p >= 1:
        raise ValueError(f"p must be >= 1 for a metric, got {p}")
    if p == 2.0:
        return euclidean(x, y)
    x, y, same = _prepare(x, y)
    if p == 1.0 or p == float("inf"):
        # these have well-defined subgradients in torch.cdist (sign / argmax)
        return torch.cdist(x, y, p=p)
    # general p: |diff|^p summed then ^(1/p), with the root made safe at 0.
    # Chunked over rows of x to keep memory at O(chunk · R · D).
    rows = []
    chunk = max(1, int(2**24 // max(1, y.shape[0] * y.shape[1])))
    for start in range(0, x.shape[0], chunk):
        diff = (x[start : start + chunk, None, :] - y[None, :, :]).abs()
        s = diff.pow(p).sum(dim=-1)
        rows.append(torch.where(s > 0, s.clamp_min(torch.finfo(s.dtype).tiny).pow(1.0 / p), 0.0))
    return torch.cat(rows, dim=0)


def cosine_similarity(x: torch.Tensor, y: torch.Tensor | None = None, eps: float = 1e-12) -> torch.Tensor:
    """Cosine similarity in [-1, 1]; a zero vector has similarity 0 to everything."""
    x, y, same = _prepare(x, y)
    xn = F.normalize(x, dim=1, eps=eps)
    yn = xn if same else F.normalize(y, dim=1, eps=eps)
    return xn @ yn.T


def cosine_distance(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """``1 − cos(x_i, y_j)`` in [0, 2]."""
    return 1.0 - cosine_similarity(x, y)


def dot_product(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Inner product ``x_i · y_j`` (a similarity: larger is closer)."""
    x, y, _ = _prepare(x, y)
    return x @ y.T


def mahalanobis_factor(M: torch.Tensor, tol: float = 1e-8) -> torch.Tensor:
    """Return ``L`` with ``LᵀL = M`` for a symmetric positive semi-definite ``M``.

    Raises ``ValueError`` if ``M`` is not square, not symmetric, or has a clearly negative eigenvalue.
    """
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"M must be a square matrix, got shape {tuple(M.shape)}")
    scale = M.abs().max().clamp_min(1e-30)
    if not torch.allclose(M, M.T, atol=1e-6 * float(scale), rtol=0):
        raise ValueError("M must be symmetric")
    evals, evecs = torch.linalg.eigh(M)
    if float(evals.min()) < -tol * max(1.0, float(evals.abs().max())) - 1e-6 * float(scale):
        raise ValueError(f"M must be positive semi-definite; smallest eigenvalue is {float(evals.min()):.3g}")
    return evals.clamp_min(0).sqrt()[:, None] * evecs.T


def mahalanobis(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    L: torch.Tensor | None = None,
    M: torch.Tensor | None = None,
    squared: bool = False,
) -> torch.Tensor:
    """Mahalanobis distance ``sqrt((x − y)ᵀ M (x − y))`` with ``M = LᵀL``.

    Give either ``L`` (k, D), the linear map, or ``M`` (D, D), a PSD matrix. Computed as the
    Euclidean distance between ``x Lᵀ`` and ``y Lᵀ``, so it costs two small GEMMs plus one.
    """
    if (L is None) == (M is None):
        raise ValueError("give exactly one of L (the linear map) or M (the PSD matrix)")
    x, y, same = _prepare(x, y)
    if L is None:
        L = mahalanobis_factor(M.to(x.dtype))
    if L.ndim != 2 or L.shape[1] != x.shape[1]:
        raise ValueError(f"L must have shape (k, {x.shape[1]}) to match x of shape {tuple(x.shape)}, got {tuple(L.shape)}")
    L = L.to(x.dtype)
    xl = x @ L.T
    yl = None if same else y @ L.T
    sq = squared_euclidean(xl, yl)
    return sq if squared else safe_sqrt(sq)


def check_curvature(c: float) -> float:
    """``c`` as a float, or ``ValueError`` unless it is finite and > 0 (the ball has curvature −c)."""
    c = float(c)
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"the curvature c must be a finite number > 0 (the ball has curvature −c), got {c}")
    return c


def ball_factor(x: torch.Tensor, c: float, name: str) -> torch.Tensor:
    """``1 − c‖x_i‖²`` for each row, which must be > 0 (the point is inside the ball)."""
    factor = 1.0 - c * (x * x).sum(dim=1)
    outside = int((factor <= 0).sum())
    if outside:
        raise ValueError(
            f"{outside} row(s) of {name} lie on or outside the Poincaré ball of radius 1/√c = {c ** -0.5:.4g}; "
            "map Euclidean vectors into it with metrix.distances.expmap0"
        )
    return factor


def arcosh1p(z: torch.Tensor) -> torch.Tensor:
    """``arcosh(1 + z)`` for ``z ≥ 0``, accurate near 0 (``log1p``) and with a finite gradient at 0."""
    return torch.log1p(z + safe_sqrt(z * (z + 2.0)))


def poincare(x: torch.Tensor, y: torch.Tensor | None = None, c: float = 1.0) -> torch.Tensor:
    """Geodesic distance in the Poincaré ball of curvature −c (Nickel & Kiela, "Poincaré Embeddings for
    Learning Hierarchical Representations", NeurIPS 2017; ``c = 1`` there):

        d(x, y) = (1/√c) · arcosh(1 + 2c‖x − y‖² / ((1 − c‖x‖²)(1 − c‖y‖²)))

    Rows must lie inside the ball, ``‖x‖ < 1/√c``; :func:`expmap0` maps Euclidean vectors (a network's
    output) there. ``‖x − y‖²`` comes from the GEMM of :func:`squared_euclidean`, so the matrix costs one
    matrix product plus element-wise work; identical points get 0 with a zero gradient.

    Example
    -------
    >>> x = torch.tensor([[0.0, 0.0], [0.5, 0.0]])
    >>> round(float(poincare(x)[0, 1]), 6)  # 2·artanh(0.5) = ln 3
    1.098612
    """
    c = check_curvature(c)
    x, y, same = _prepare(x, y)
    fx = ball_factor(x, c, "x")
    fy = fx if same else ball_factor(y, c, "y")
    z = squared_euclidean(x, None if same else y) * (2.0 * c) / (fx[:, None] * fy[None, :])
    return arcosh1p(z) / math.sqrt(c)


def expmap0(v: torch.Tensor, c: float = 1.0, eps: float | None = None) -> torch.Tensor:
    """Exponential map at the origin of the Poincaré ball: ``tanh(√c‖v‖) · v / (√c‖v‖)``, row-wise.

    It sends any Euclidean vector into the ball of radius ``1/√c`` (geodesic distance from the origin
    ``2‖v‖`` for c = 1, since the ball's metric is twice the Euclidean one there). ``tanh`` rounds to 1
    for ``√c‖v‖`` above ~9 in float32, which would put a point on the boundary (infinite distance): rows
    are kept within ``(1 − eps)/√c`` (``eps`` 1e-5 for float64, 4e-3 otherwise, as in geoopt).
    """
    c = check_curvature(c)
    if eps is None:
        eps = 1e-5 if v.dtype == torch.float64 else 4e-3
    sc = math.sqrt(c)
    norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-15)
    x = v * (torch.tanh(sc * norm) / (sc * norm))
    return project_to_ball(x, c, eps)


def logmap0(x: torch.Tensor, c: float = 1.0) -> torch.Tensor:
    """Inverse of :func:`expmap0`: ``artanh(√c‖x‖) · x / (√c‖x‖)`` for points inside the ball."""
    c = check_curvature(c)
    sc = math.sqrt(c)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-15)
    if bool((sc * norm >= 1).any()):
        raise ValueError("logmap0 needs points inside the Poincaré ball (‖x‖ < 1/√c)")
    return x * (torch.atanh(sc * norm) / (sc * norm))


def project_to_ball(x: torch.Tensor, c: float = 1.0, eps: float = 4e-3) -> torch.Tensor:
    """Rows scaled back to norm ``(1 − eps)/√c`` where they reach beyond it; others unchanged."""
    return clip_norm(x, (1.0 - eps) / math.sqrt(check_curvature(c)))


def clip_norm(x: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Rows longer than ``max_norm`` scaled down to it; others unchanged (differentiable)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-15)
    return torch.where(norm > max_norm, x * (max_norm / norm), x)


@dataclass(frozen=True)
class Metric:
    """One entry of metrix's metric vocabulary (:data:`METRICS`).

    ``similarity``: larger values mean closer (only ``dot``); every other metric is a distance.
    ``needs``: a parameter the function must be given (``mahalanobis`` needs ``L`` or ``M``).
    """

    name: str
    function: Callable[..., torch.Tensor]
    similarity: bool
    description: str
    needs: str = ""


# The one vocabulary of metric names: losses, kNN, the index, evaluation, galleries, OOD and the CLI all take
# these names unchanged. Losses written for similarities use cosine's similarity form (cos) themselves.
METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("euclidean", euclidean, False, "‖x − y‖₂"),
    Metric("sqeuclidean", squared_euclidean, False, "‖x − y‖₂²"),
    Metric("cosine", cosine_distance, False, "1 − cos(x, y), in [0, 2]"),
    Metric("dot", dot_product, True, "x · y, a similarity (larger is closer)"),
    Metric("mahalanobis", mahalanobis, False, "‖L(x − y)‖₂ with W = LᵀL", needs="L or M"),
    Metric("poincare", poincare, False, "Poincaré-ball distance (curvature −1; poincare(x, y, c) for another)"),
)}


def check_metric(metric: str, allowed=None, where: str = "") -> str:
    """``metric`` if it is one of :data:`METRICS` (and of ``allowed`` when given), else a ``ValueError``
    that lists the names that would work."""
    choices = list(METRICS) if allowed is None else [m for m in METRICS if m in allowed]
    if metric not in choices:
        at = f" for {where}" if where else ""
        raise ValueError(f"unknown metric {metric!r}{at}; choose one of {', '.join(choices)}")
    return metric


def is_similarity(metric: str) -> bool:
    """True when larger values of ``metric`` mean closer (the dot product)."""
    return METRICS[check_metric(metric)].similarity


def pairwise_distance(x: torch.Tensor, y: torch.Tensor | None = None, metric: str = "euclidean",
                      **params) -> torch.Tensor:
    """The ``metric`` matrix between ``x`` and ``y`` (``params`` go to its function: ``L=`` for mahalanobis)."""
    entry = METRICS[check_metric(metric)]
    if entry.needs and not params:
        raise ValueError(f"metric {metric!r} needs {entry.needs} (e.g. pairwise_distance(x, y, {metric!r}, L=L))")
    return entry.function(x, y, **params)


def dissimilarity(x: torch.Tensor, y: torch.Tensor | None = None, metric: str = "euclidean",
                  **params) -> torch.Tensor:
    """A "smaller is closer" matrix for any metric: similarities are negated.

    Losses written for distances (triplet, contrastive) work unchanged on similarities this way:
    ``d_ap − d_an + m`` with ``d = −s`` is exactly ``s_an − s_ap + m``.
    """
    mat = pairwise_distance(x, y, metric, **params)
    return -mat if is_similarity(metric) else mat
