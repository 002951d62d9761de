"""Pair losses written as a function of the B×R distance/similarity matrix, with a hand-written gradient.

Autograd through a chain of element-wise operations over B×R keeps every intermediate and runs a second
chain of passes backwards; on a CPU those passes, not the GEMM, dominate a pair loss. Here a loss gives a
``terms(mat) -> (loss, grad)`` function that computes its value *and* ``∂loss/∂mat`` in one no-grad sweep
of in-place operations, and one autograd Function maps ``grad`` to the embeddings with GEMMs — or with
gathers when the gradient is a few entries per row (batch-hard mining).

The matrix is computed in float32 (or float64) even under ``torch.autocast``: bfloat16 would round
distances to 2–3 significant digits, and the loss then returns a float32 value and input-dtype gradients.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from metrix.distances import ball_factor, check_metric, euclidean_backward, euclidean_matrix, half_inverse
from metrix.losses._common import (
    EXP_FLOOR, gather_positions, positive_positions, scratch, write_positions, zero_loss,
)


class SparseGrad(NamedTuple):
    """``∂loss/∂mat`` given as its few non-zero entries (``rows``, ``cols``, ``values``)."""

    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor


class RowListGrad(NamedTuple):
    """``∂loss/∂mat`` that is non-zero at a few listed columns of each row: ``values[i, s]`` at
    ``(i, cols[i, s])``, laid out (B, S) like :func:`~metrix.losses._common.positive_positions` (padding
    slots hold 0). Its backward is one (B·S, D) gather and a batched (1, S)×(S, D) product per row instead
    of a B×R GEMM. It must be symmetric over a batch compared with itself (each pair listed in both of its
    rows); anything else is written into a dense matrix first."""

    cols: torch.Tensor
    values: torch.Tensor


class Terms(NamedTuple):
    """What a loss's ``terms`` function returns: the loss and its gradient with respect to the matrix.

    ``symmetric`` promises ``grad = gradᵀ`` (only meaningful when the batch is its own reference), which
    saves one GEMM in the backward. ``scale`` multiplies ``grad``: a loss whose gradient is a mask times a
    number (known only after the mask is counted) returns the mask and the number, and the number is applied
    to the (B, D) result instead of in a pass over B×R.
    """

    loss: torch.Tensor
    grad: torch.Tensor | SparseGrad | RowListGrad
    symmetric: bool = False
    scale: float = 1.0


# The matrix a loss's terms see ("kernel") -> the GEMM behind it. Kernels are the metric names of
# metrix.distances.METRICS, plus "cos": cosine's similarity form, for losses written for similarities.
_PRODUCT = {"euclidean": "euclid", "sqeuclidean": "euclid", "cosine": "dot", "cos": "dot", "dot": "dot"}


def _matrix(x, y, same, metric):
    out = scratch("matrix", (x.shape[0], y.shape[0]), x.dtype, x.device)
    if _PRODUCT[metric] == "euclid":
        return euclidean_matrix(x, y, same, squared=metric == "sqeuclidean", out=out)
    s = torch.mm(x, y.T, out=out)
    return s.neg_().add_(1.0) if metric == "cosine" else s


def _product_grad(grad, mat, metric):
    """``∂loss/∂mat`` → gradient with respect to the GEMM's output (``d²`` or the inner product), in place."""
    if metric == "euclidean":
        # ∂d/∂d² = 1/(2d), with the ½ applied to the (B, D) result in backward: two passes instead of four.
        # d = 0 gives 0/0 or g/0; both become 0 (the zero subgradient of the distance at coincident points)
        return grad.div_(mat).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return grad.neg_() if metric == "cosine" else grad


def _entry_product_grad(values, entries: Callable[[], torch.Tensor], metric):
    """:func:`_product_grad` for a few listed entries, ``entries()`` giving the matrix there; for the
    Euclidean distance the ½ of ``∂d/∂d² = 1/(2d)`` is included (0 where ``d = 0``)."""
    if metric == "euclidean":
        return values * half_inverse(entries())
    return -values if metric == "cosine" else values


def _sparse_product_grad(sg: SparseGrad, mat, metric) -> SparseGrad:
    return SparseGrad(sg.rows, sg.cols, _entry_product_grad(sg.values, lambda: mat[sg.rows, sg.cols], metric))


def _sparse_backward(sg: SparseGrad, x, y, kind, same):
    """Gradients for a gradient with few entries: per entry ``w·(x_i − y_j)·2`` (Euclidean) or ``w·y_j`` (dot)."""
    w = sg.values[:, None]
    # two gathers and in-place arithmetic: every fresh (entries, D) temporary costs page faults
    xi, yj = x.index_select(0, sg.rows), y.index_select(0, sg.cols)
    if kind == "euclid":
        gx_part = xi.sub_(yj).mul_(2 * w)
        gy_part, gy_sign = gx_part, -1.0
    else:
        gx_part, gy_part, gy_sign = yj.mul_(w), xi.mul_(w), 1.0
    gx = torch.zeros_like(x).index_add_(0, sg.rows, gx_part)
    gy = (gx if same else torch.zeros_like(y)).index_add_(0, sg.cols, gy_part, alpha=gy_sign)
    return gx, (None if same else gy)


def _densified(lg: RowListGrad, mat) -> torch.Tensor:
    """A :class:`RowListGrad` written into a zero matrix shaped like ``mat``."""
    dense = torch.zeros_like(mat)
    return dense.scatter_(1, lg.cols, lg.values.to(mat.dtype))


def _listed_product_grad(lg: RowListGrad, mat, metric) -> torch.Tensor:
    return _entry_product_grad(lg.values, lambda: mat.gather(1, lg.cols), metric)


def _listed_backward(lg: RowListGrad, x, kind, scale: float) -> torch.Tensor:
    """``scale ·`` the gradient of ``Σ w ⊙ P`` for a symmetric ``w`` listed per row and ``P = X Xᵀ``-based:
    ``4(rowsum(w)·x − w·x)`` for ``d²`` and ``2·w·x`` for the inner product."""
    cols, w = lg.cols, lg.values
    neighbours = x.index_select(0, cols.reshape(-1)).view(*cols.shape, x.shape[1])
    wx = torch.bmm(w.unsqueeze(1), neighbours).squeeze(1)  # Σ_s w_is x_{cols[i, s]}
    if kind == "euclid":
        return torch.mul(x, w.sum(dim=1, keepdim=True)).sub_(wx).mul_(4.0 * scale)
    return wx.mul_(2.0 * scale)


def _dense_backward(w, x, y, kind, same, symmetric, scale: float):
    """``scale ·`` the gradients of ``Σ w ⊙ P`` for the GEMM output ``P`` (``d²`` or ``x·y``)."""
    if kind == "euclid":
        return euclidean_backward(w, x, y, same, symmetric, scale=scale)
    if same:
        if symmetric:
            return torch.mm(w, x).mul_(2 * scale), None
        return torch.mm(w, x).addmm_(w.T, x).mul_(scale), None
    return torch.mm(w, y).mul_(scale), torch.mm(w.T, x).mul_(scale)


class _MatrixLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, metric: str, terms: Callable[[torch.Tensor], Terms]):
        same = y is None
        in_dtype = x.dtype
        work = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xw = x.to(work)
            yw = xw if same else y.to(work)
            mat = _matrix(xw, yw, same, metric)
            out = terms(mat)
            grad = out.grad
            if isinstance(grad, RowListGrad) and not (same and out.symmetric):
                grad = _densified(grad, mat)
            if isinstance(grad, SparseGrad):
                grad = _sparse_product_grad(grad, mat, metric)
                ctx.save_for_backward(xw, yw, grad.rows, grad.cols, grad.values)
            elif isinstance(grad, RowListGrad):
                ctx.save_for_backward(xw, yw, grad.cols, _listed_product_grad(grad, mat, metric))
            else:
                ctx.save_for_backward(xw, yw, _product_grad(grad, mat, metric))
        ctx.form = type(grad)
        ctx.metric, ctx.same, ctx.symmetric = metric, same, out.symmetric
        ctx.grad_scale = out.scale
        ctx.dtypes = (in_dtype, None if same else y.dtype)
        return out.loss.detach()

    @staticmethod
    @once_differentiable  # the saved ∂loss/∂M carries no graph: a second derivative would be silently wrong
    def backward(ctx, grad_out):
        xw, yw, *g = ctx.saved_tensors
        kind = _PRODUCT[ctx.metric]
        with torch.autocast(xw.device.type, enabled=False):
            if ctx.form is SparseGrad:
                gx, gy = _sparse_backward(SparseGrad(*g), xw, yw, kind, ctx.same)
                gx.mul_(ctx.grad_scale)
                gy = None if gy is None else gy.mul_(ctx.grad_scale)
            elif ctx.form is RowListGrad:
                gx, gy = _listed_backward(RowListGrad(*g), xw, kind, ctx.grad_scale), None
            else:
                half = 0.5 if ctx.metric == "euclidean" else 1.0  # the ½ of ∂d/∂d² = 1/(2d)
                gx, gy = _dense_backward(g[0], xw, yw, kind, ctx.same, ctx.symmetric and ctx.same,
                                         ctx.grad_scale * half)
        return (*_input_grads(gx, gy, grad_out, ctx.dtypes), None, None)


class _PoincareMatrixLoss(torch.autograd.Function):
    """A pair loss on the Poincaré-ball distance ``d = arcosh(1 + z)``, ``z = 2s/(f_x f_y)``, ``s = ‖x − y‖²``,
    ``f = 1 − ‖·‖²``, with the GEMM backward of ``s`` plus one row scaling per side:

        ∂L/∂s = g · 2/(f_x f_y),   ∂L/∂x_i += x_i · (2/f_i) Σ_j g_ij z_ij   (likewise y_j over i),

    where ``g = ∂L/∂d / sinh d`` and ``sinh(arcosh(1 + z)) = √(z(z + 2))``; ``g = 0`` at coincident points (the
    zero subgradient, as for the Euclidean distance).
    """

    @staticmethod
    def forward(ctx, x, y, terms: Callable[[torch.Tensor], Terms]):
        same = y is None
        in_dtype, work = x.dtype, compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xw = x.to(work)
            yw = xw if same else y.to(work)
            fx = ball_factor(xw, 1.0, "embeddings")
            fy = fx if same else ball_factor(yw, 1.0, "ref_embeddings")
            shape, device = (xw.shape[0], yw.shape[0]), xw.device
            z = euclidean_matrix(xw, yw, same, squared=True, out=scratch("poincare_z", shape, work, device))
            z.mul_(2.0).div_(fx[:, None]).div_(fy[None, :])
            sinh = torch.add(z, 2.0, out=scratch("poincare_sinh", shape, work, device)).mul_(z).sqrt_()
            out = terms(torch.add(sinh, z, out=scratch("matrix", shape, work, device)).log1p_())
            g = _dense_grad(out, shape, work, device).div_(sinh).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            weighted = torch.mul(g, z, out=scratch("work", shape, work, device))
            row, col = weighted.sum(dim=1).mul_(2.0 / fx), weighted.sum(dim=0).mul_(2.0 / fy)
            w = g.mul_(2.0).div_(fx[:, None]).div_(fy[None, :])  # ∂L/∂s
        ctx.save_for_backward(xw, yw, w, row, col)
        ctx.same, ctx.symmetric = same, same and out.symmetric
        ctx.dtypes = (in_dtype, None if same else y.dtype)
        return out.loss.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        xw, yw, w, row, col = ctx.saved_tensors
        with torch.autocast(xw.device.type, enabled=False):
            gx, gy = euclidean_backward(w, xw, yw, ctx.same, ctx.symmetric)
            gx.addcmul_(xw, (row + col)[:, None] if ctx.same else row[:, None])
            if gy is not None:
                gy.addcmul_(yw, col[:, None])
        return (*_input_grads(gx, gy, grad_out, ctx.dtypes), None)


def _input_grads(gx, gy, grad_out, dtypes):
    """The working-precision gradients times the upstream gradient, in the inputs' dtypes."""
    grad_out = grad_out.to(gx.dtype)
    gx = gx.mul_(grad_out).to(dtypes[0])
    return gx, (None if gy is None else gy.mul_(grad_out).to(dtypes[1]))


def _dense_grad(out: Terms, shape, dtype, device) -> torch.Tensor:
    """``∂loss/∂M`` of any :class:`Terms` form as a (B, R) matrix, its ``scale`` applied (a buffer of its own)."""
    grad = out.grad
    if isinstance(grad, RowListGrad):
        dense = _densified(grad, torch.empty(shape, dtype=dtype, device=device))
    elif isinstance(grad, SparseGrad):
        dense = torch.zeros(shape, dtype=dtype, device=device)
        dense.index_put_((grad.rows, grad.cols), grad.values.to(dtype), accumulate=True)
    else:
        dense = grad
    return dense.mul_(out.scale) if out.scale != 1.0 else dense


def matrix_loss(embeddings, ref_embeddings, same_set: bool, metric: str, terms: Callable[[torch.Tensor], Terms],
                similarity: bool = False):
    """``terms(M)[0]`` for ``M`` = the ``metric`` matrix between the batch and the reference set.

    ``similarity=True`` is for losses written for similarities: ``M`` is then ``cos(x, y)`` for
    ``metric="cosine"`` (its similarity form) and ``x·y`` for ``dot``; other metrics are refused.

    ``terms`` receives ``M`` without a graph and must return the loss with ``∂loss/∂M`` (:class:`Terms`).
    It may use ``M`` as scratch space except with ``metric="euclidean"``, whose backward divides by ``M``.
    Cosine metrics normalise the rows first, under autograd (B×D work); ``poincare`` (curvature −1) takes
    :class:`_PoincareMatrixLoss`.
    """
    if similarity:
        metric = {"cosine": "cos", "dot": "dot"}[check_metric(metric, ("cosine", "dot"), "a similarity loss")]
    elif check_metric(metric, ("euclidean", "sqeuclidean", "cosine", "dot", "poincare"), "a pair loss") == "poincare":
        return _PoincareMatrixLoss.apply(embeddings, None if same_set else ref_embeddings, terms)
    x, y = embeddings, None if same_set else ref_embeddings
    if metric in ("cosine", "cos"):
        # normalise in the working precision: bfloat16 unit vectors would carry its rounding into the matrix
        x = x.to(compute_dtype(x))
        y = None if y is None else y.to(compute_dtype(y))
        x = F.normalize(x, dim=1, eps=1e-12)
        y = None if y is None else F.normalize(y, dim=1, eps=1e-12)
    return _MatrixLoss.apply(x, y, metric, terms)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matrix loss works in for inputs of ``t``'s dtype (float32 for half precisions)."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def inverse_count(count) -> float:
    """``1/count`` for a reduction's denominator, 0 for an empty selection (the loss is then an exact 0)."""
    count = int(count)
    return 1.0 / count if count else 0.0


def row_argmax(x: torch.Tensor, group: int = 32) -> torch.Tensor:
    """``x.argmax(dim=1)`` (first maximum of each row) in two levels: the max of each group of ``group``
    columns, then one group per row. ``argmax`` over B×R is ~20× slower than ``amax`` on CPU."""
    n, width = x.shape
    if width % group or width < 4 * group:
        return x.argmax(dim=1)
    groups = x.view(n, width // group, group)
    best_group = groups.amax(dim=2).argmax(dim=1)
    rows = torch.arange(n, device=x.device)
    return best_group * group + groups[rows, best_group].argmax(dim=1)


def masked_row_softmax(logits: torch.Tensor, mask: torch.Tensor, zero_logit: bool = False):
    """Per row: ``log Σ_mask e^logits`` and the softmax over the mask, computed in place.

    ``logits`` is overwritten with the probabilities (exactly 0 outside the mask); ``mask`` (float 0/1) is
    used as scratch space and restored. An empty row gives ``lse = 0`` and no probabilities.
    ``zero_logit=True`` adds an implicit logit 0 to every row (``log(1 + Σ e^x)``, as in Multi-Similarity).
    """
    big = torch.finfo(logits.dtype).max
    top = logits.add_(mask.sub_(1.0).mul_(big)).amax(dim=1, keepdim=True)  # max over the mask only
    mask.div_(big).add_(1.0)
    empty = top < -big / 2
    top = top.clamp_min(0.0) if zero_logit else top.masked_fill(empty, 0.0)  # empty row: any finite shift
    probs = logits.sub_(top).clamp_min_(EXP_FLOOR).exp_().mul_(mask)
    total = probs.sum(dim=1, keepdim=True)
    if zero_logit:
        total += torch.exp(-top)
        lse = top + torch.log(total)
    else:
        lse = torch.where(empty, torch.zeros_like(top), top + torch.log(total.masked_fill(empty, 1.0)))
        total = total.masked_fill(empty, 1.0)
    return lse.squeeze(1), probs.div_(total)


def row_softmax(logits: torch.Tensor, nonempty: torch.Tensor | None = None):
    """Per row: ``log Σ e^logits`` and the softmax, in place, for logits whose excluded entries already hold
    ``−inf`` (no mask pass). Excluded entries come out as ``e^EXP_FLOOR`` relative to the row's top, not 0:
    the caller overwrites or zeroes them. Rows marked False in ``nonempty`` (all excluded) give ``lse = 0``
    and zero probabilities, as :func:`masked_row_softmax` does for an empty row.
    """
    top = logits.amax(dim=1, keepdim=True)
    if nonempty is not None:
        top = top.masked_fill(~nonempty[:, None], 0.0)  # any finite shift for an empty row
    probs = logits.sub_(top).clamp_min_(EXP_FLOOR).exp_()
    total = probs.sum(dim=1, keepdim=True)
    lse = top + torch.log(total)
    probs.mul_(total.reciprocal_())
    if nonempty is not None and not bool(nonempty.all()):
        lse = lse.masked_fill(~nonempty[:, None], 0.0)
        probs.mul_(nonempty[:, None].to(probs.dtype))
    return lse.squeeze(1), probs


def positive_softmax_loss(batch, logit_scale: float, anchor_loss) -> torch.Tensor:
    """A loss over each anchor's softmax of ``logit_scale · cos`` across the references (itself excluded),
    as a function of its positives' log-probabilities, averaged over the anchors that have positives.

    ``anchor_loss(picked, valid) -> (per_anchor, g)`` receives the positives' log-probabilities laid out
    (B, Pmax) with a validity mask (invalid slots may hold −inf) and returns each anchor's loss and
    ``g = ∂per_anchor/∂picked``, which must sum to −1 over an anchor's positives (true of a mean or a
    log-sum-exp of ``−picked``). Then ``∂loss/∂logits = softmax + g`` on the positives — one log-softmax
    kernel, one exp and a scatter over B×R, and the GEMM backward of :func:`matrix_loss`.
    """
    flat, valid = positive_positions(batch.labels, batch.ref_labels, batch.same_set)
    has_pos = valid.any(dim=1)
    n_anchors = int(torch.count_nonzero(has_pos))
    if not n_anchors:
        return zero_loss(batch.embeddings, batch.ref_embeddings)
    dtype = compute_dtype(batch.embeddings)
    shape, device = (batch.labels.shape[0], batch.ref_labels.shape[0]), batch.embeddings.device

    def terms(mat):
        logits = torch.mul(mat, logit_scale, out=scratch("work", shape, dtype, device))
        if batch.same_set:
            logits.fill_diagonal_(-torch.inf)
        # log-probabilities in one fused kernel; they become the gradient in place (fresh: saved for backward)
        log_prob = torch.log_softmax(logits, dim=1)
        picked = gather_positions(log_prob, flat)
        per_anchor, g = anchor_loss(picked, valid)
        loss = per_anchor[has_pos].sum() / n_anchors
        grad = log_prob.exp_()
        if n_anchors < shape[0]:
            grad[~has_pos] = 0.0
        write_positions(grad, flat, valid, picked.exp() + g)  # the softmax there, plus g
        return Terms(loss, grad, scale=logit_scale / n_anchors)

    return matrix_loss(batch.embeddings, batch.ref_embeddings, batch.same_set, "cosine", terms, similarity=True)
