"""Shared pieces of every loss: input checks, label masks over the B×R matrix, reductions.

Conventions (all losses):

* call ``loss(embeddings, labels, ref_embeddings=None, ref_labels=None)``; with no reference the
  batch is compared with itself and an item is never its own positive;
* a batch that gives a loss no valid term (one class, no positive pair, ...) returns an exact 0
  that still has a gradient path to the inputs (so ``backward()`` works and changes nothing);
* embeddings with NaN/inf raise ``ValueError`` instead of propagating.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import NamedTuple

import torch

from metrix._validation import check_choice, check_labels, check_loss_input, check_pair

REDUCTIONS = ("mean_nonzero", "mean", "sum")

# exp() of arguments below about −87.3 (float32 denormals and underflow) takes a slow path on x86 CPUs,
# 15–50× slower per element, and masking by −huge sends most of a row there. Arguments are clamped to
# this floor and masked entries zeroed by a multiply instead; e^−87 ≈ 1.6e−38 beside a row maximum's e^0
# changes no float32 sum.
EXP_FLOOR = -87.0


class Pairs(NamedTuple):
    """Selected anchor–positive and anchor–negative pairs as float (B, R) masks or non-negative weights.

    Miners return it; pair and triplet losses take it as ``pairs=`` and use only the label-valid pairs it
    keeps (a triplet loss forms its triplets from the kept positives × kept negatives of each anchor).
    """

    pos: torch.Tensor
    neg: torch.Tensor


class _Scratch(threading.local):
    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}


_SCRATCH = _Scratch()
SCRATCH_MAX_ELEMENTS = 1 << 22  # 16 MB of float32 per slot (B = R = 2048); larger matrices and non-CPU devices get fresh tensors


def scratch(slot: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised CPU tensor kept between calls (per thread), for B×R intermediates that die inside one
    forward pass: fresh pages cost the kernel a page fault each, ~0.7 ms per 4 MB on our 2-core VMs — as
    much as an element-wise pass. Never save one for backward or return it: the next call overwrites it."""
    n = math.prod(shape)
    if torch.device(device).type != "cpu" or n > SCRATCH_MAX_ELEMENTS:
        return torch.empty(shape, dtype=dtype, device=device)
    buf = _SCRATCH.buffers.get(slot)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        buf = _SCRATCH.buffers[slot] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def release_scratch() -> None:
    """Free the scratch buffers the pair losses keep between calls on this thread."""
    _SCRATCH.buffers.clear()


@dataclass
class Batch:
    embeddings: torch.Tensor
    labels: torch.Tensor
    ref_embeddings: torch.Tensor
    ref_labels: torch.Tensor
    same_set: bool  # ref is the batch itself: exclude the diagonal from positives


def prepare_batch(embeddings, labels, ref_embeddings=None, ref_labels=None) -> Batch:
    emb = check_loss_input(embeddings, "embeddings")
    lab = check_labels(labels, emb.shape[0], "labels", device=emb.device)
    if ref_embeddings is None:
        if ref_labels is not None:
            raise ValueError("ref_labels given without ref_embeddings")
        return Batch(emb, lab, emb, lab, True)
    ref = check_loss_input(ref_embeddings, "ref_embeddings")
    check_pair(emb, ref, "embeddings", "ref_embeddings")
    if ref_labels is None:
        raise ValueError("ref_embeddings given without ref_labels")
    ref_lab = check_labels(ref_labels, ref.shape[0], "ref_labels", device=emb.device)
    return Batch(emb, lab, ref, ref_lab, False)


def label_masks(batch: Batch, dtype: torch.dtype | None = None, pairs: Pairs | None = None,
                reuse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Float 0/1 (B, R) masks of positive pairs (same label, not self) and negative pairs.

    Float masks on purpose: multiplying by a 0/1 matrix is ~15× faster on CPU than ``torch.where``
    or ``masked_fill`` with a boolean mask, and the losses' hot paths are element-wise over B×R.
    With ``pairs`` (from a miner), only the pairs it selects are kept (``> 0`` counts as selected).
    ``reuse=True`` writes them into :func:`scratch` buffers (for masks that die inside one forward pass).
    """
    dtype = dtype or batch.embeddings.dtype
    shape = (batch.labels.shape[0], batch.ref_labels.shape[0])
    if pairs is not None:
        for name, mask in (("pos", pairs.pos), ("neg", pairs.neg)):
            if tuple(mask.shape) != shape:
                raise ValueError(f"pairs.{name} has shape {tuple(mask.shape)} but the batch needs {shape}")
    device = batch.embeddings.device
    same = same_label_mask(batch.labels, batch.ref_labels, dtype,
                           out=scratch("pos", shape, dtype, device) if reuse else None)
    neg = torch.sub(same, 1.0, out=scratch("neg", shape, dtype, device) if reuse else None).neg_()
    if batch.same_set:
        same.fill_diagonal_(0)
    if pairs is not None:
        same.mul_((pairs.pos > 0).to(dtype))
        neg.mul_((pairs.neg > 0).to(dtype))
    return same, neg


def forward_masks(batch: Batch, dtype: torch.dtype, pairs: Pairs | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masks for a loss that uses them only inside its forward pass, in :func:`scratch` buffers.

    Without a miner's ``pairs``: ``(same-label mask including self, None)`` — the negatives are then exactly
    ``1 − same`` and the caller applies that in place, saving a B×R buffer (self pairs are its to exclude).
    With ``pairs``: :func:`label_masks` ``(pos, neg)``.
    """
    if pairs is not None:
        return label_masks(batch, dtype, pairs=pairs, reuse=True)
    shape = (batch.labels.shape[0], batch.ref_labels.shape[0])
    out = scratch("pos", shape, dtype, batch.embeddings.device)
    return same_label_mask(batch.labels, batch.ref_labels, dtype, out=out), None


def same_label_mask(labels: torch.Tensor, ref_labels: torch.Tensor, dtype: torch.dtype,
                    out: torch.Tensor | None = None, equal: bool = True) -> torch.Tensor:
    """Float (B, R) matrix, 1 where ``labels[i] == ref_labels[j]`` (``equal=False``: where they differ), else 0.

    One comparison of the labels as ``dtype`` floats (re-coded to 0..C−1 when they are not exact in it)
    written straight into a float buffer: comparing int64 labels into a float output takes ~7× longer on
    CPU, and comparing into a bool mask then copying ~4×.
    """
    compare = torch.eq if equal else torch.ne
    exact = 2.0 / torch.finfo(dtype).eps  # every integer below this is exact in dtype
    both = torch.cat([labels, ref_labels])
    if both.numel() and (int(both.min()) <= -exact or int(both.max()) >= exact):
        both = torch.unique(both, return_inverse=True)[1]
        if int(both.max()) >= exact:  # more classes than dtype can count (bfloat16: 256)
            mask = compare(labels[:, None], ref_labels[None, :])
            return mask.to(dtype) if out is None else out.copy_(mask)
    codes = both.to(dtype)
    a, b = codes[: labels.shape[0]], codes[labels.shape[0]:]
    if out is None:
        out = torch.empty((a.shape[0], b.shape[0]), dtype=dtype, device=a.device)
    return compare(a[:, None], b[None, :], out=out)


def positive_positions(labels: torch.Tensor, ref_labels: torch.Tensor, same_set: bool):
    """Every positive pair as a flat index ``i·R + j`` (``labels[i] == ref_labels[j]``, not self when
    ``same_set``), laid out (B, Pmax) with a validity mask — from the sorted labels, no B×R pass.

    Row i's slots run through the reference columns in label order starting at its own class, so a padding
    slot lands on a column of another class (or, for the self pair, on the row's own column): no two slots
    of a row share a position and none of them is a positive, so gathering there is harmless and
    scattering back the values read there changes nothing. Returns ``(flat, valid)``.

    Example
    -------
    >>> flat, valid = positive_positions(torch.tensor([0, 1, 0]), torch.tensor([0, 1, 0]), same_set=True)
    >>> sorted(flat[valid].tolist())
    [2, 6]
    """
    n_rows, n_cols = labels.shape[0], ref_labels.shape[0]
    device = labels.device
    order = torch.argsort(ref_labels)  # reference columns grouped by class
    ordered = ref_labels.index_select(0, order)
    start = torch.searchsorted(ordered, labels)  # row i's class occupies order[start_i : start_i + count_i]
    count = torch.searchsorted(ordered, labels, right=True) - start
    width = max(int(count.max()), 1)  # ≤ R, so a row's run of slots never wraps back into its class
    slot = torch.arange(width, device=device)
    wrapped = torch.cat([order, order[:width]])  # slots past the last column continue from the first
    cols = wrapped.index_select(0, (start[:, None] + slot).view(-1)).view(n_rows, width)
    valid = slot < count[:, None]
    rows = torch.arange(n_rows, device=device)[:, None]
    if same_set:
        valid &= cols != rows
    return rows * n_cols + cols, valid


def mask_positions(pos: torch.Tensor):
    """:func:`positive_positions`' ``(flat, valid)`` layout for an arbitrary 0/1 (B, R) mask of positives (a
    miner's selection): ``topk`` puts each row's positives first; padding slots are distinct columns the
    mask leaves out."""
    width = max(int(pos.sum(dim=1).max()), 1) if pos.numel() else 1
    chosen, cols = torch.topk(pos, width, dim=1)
    return torch.arange(pos.shape[0], device=pos.device)[:, None] * pos.shape[1] + cols, chosen > 0


def gather_positions(t: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """The entries of a contiguous (B, R) tensor at the flat positions ``flat`` (any shape)."""
    return t.view(-1).index_select(0, flat.view(-1)).view(flat.shape)


def write_positions(t: torch.Tensor, flat: torch.Tensor, valid: torch.Tensor, values: torch.Tensor) -> None:
    """``t`` at the valid slots of ``flat`` set to ``values``, in place. Padding slots write back what they
    hold (their positions are distinct and not positives: see :func:`positive_positions`)."""
    keep = gather_positions(t, flat)
    t.view(-1).scatter_(0, flat.view(-1), torch.where(valid, values, keep).view(-1))


def set_positives_and_self(mat: torch.Tensor, flat: torch.Tensor, valid: torch.Tensor, same_set: bool, value: float):
    """Overwrite the positive pairs (the valid slots of ``flat``) and, when ``same_set``, the self pairs of
    ``mat`` with ``value``, so that a pass over the whole matrix sees only negatives.

    Returns ``(at_positives, restore)``: what the slots held, (B, Pmax), and a function that puts the
    positives and the diagonal back as they were.
    """
    at_positives = gather_positions(mat, flat)
    diagonal = mat.diagonal().clone() if same_set else None
    write_positions(mat, flat, valid, value)
    if same_set:
        mat.fill_diagonal_(value)

    def restore() -> None:
        write_positions(mat, flat, valid, at_positives)
        if diagonal is not None:
            mat.diagonal().copy_(diagonal)

    return at_positives, restore


def zero_loss(*tensors: torch.Tensor) -> torch.Tensor:
    """An exact 0 connected to the graph of ``tensors`` (gradient 0, backward() works)."""
    out = None
    for t in tensors:
        if t is not None and t.requires_grad:
            term = t.sum() * 0.0
            out = term if out is None else out + term
    if out is None:
        ref = next(t for t in tensors if t is not None)
        out = torch.zeros((), dtype=ref.dtype, device=ref.device)
    return out


def reduce(masked: torch.Tensor, n_selected, reduction: str, *graph: torch.Tensor) -> torch.Tensor:
    """Reduce non-negative per-term losses that are already 0 outside the selection.

    ``mean_nonzero`` averages over the terms > 0 (the ones that carry gradient; pytorch-metric-learning's
    ``AvgNonZeroReducer``), ``mean`` over the ``n_selected`` selected terms, ``sum`` sums.
    An empty selection gives :func:`zero_loss`.
    """
    check_choice(reduction, "reduction", REDUCTIONS)
    count = int(torch.count_nonzero(masked)) if reduction == "mean_nonzero" else int(n_selected)
    if count == 0:
        return zero_loss(masked, *graph)
    total = masked.sum()
    return total if reduction == "sum" else total / count


def mask_logits(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` where ``mask`` is 1, a huge negative number where it is 0 (exp → exactly 0).

    Additive, so it is one fused float pass instead of a slow boolean ``masked_fill``; the value
    ``-finfo.max`` absorbs any finite ``x`` without overflowing to ``-inf``.
    """
    return x + (mask - 1.0) * torch.finfo(x.dtype).max


def log1p_sum_exp(x: torch.Tensor, mask: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``log(1 + Σ_{mask} exp(x))`` along ``dim`` (float 0/1 ``mask``), stable, 0 for empty masks.

    The "1" is an implicit extra logit of 0 (as in Multi-Similarity and Proxy-Anchor losses).
    """
    # shift by max(0, max x over the mask); the shift is a constant for autograd so gradients stay exact
    shift = mask_logits(x.detach(), mask).amax(dim=dim, keepdim=True).clamp_min(0)
    terms = torch.exp((x - shift).clamp_min(EXP_FLOOR)) * mask
    total = torch.exp(-shift) + terms.sum(dim=dim, keepdim=True)
    return (shift + torch.log(total)).squeeze(dim)
