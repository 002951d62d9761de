"""Exact k-nearest-neighbour search in tiles, so memory stays bounded for large sets.

Scores are matrix products over (query chunk × reference tile) blocks, larger = closer (for Euclidean
distance ``2q·r − ‖r‖²``, which ranks like the distance). Three paths, all exact:

* small references, or ``k`` close to their size: each tile's entries above the running k-th best are
  merged into it (:func:`_chunk_topk_merging`);
* large references: each query's final k-th best score is estimated from an evenly spread sample, and
  only entries above that guess are collected (:func:`_chunk_topk_threshold`); a query with fewer than
  ``k`` entries above its guess is searched again tile by tile, so the guess only costs time;
* a set searched against itself (``reference=None``): the score is made symmetric
  (``−‖x − y‖²``), each pair of rows is scored once and filtered for both of its rows, halving the
  matrix products (:func:`_iter_symmetric_topk`). Its candidate lists hold about ``1.5·k`` entries for
  every row, so it runs when they fit in ``max_memory_mb``.

Example
-------
>>> import torch
>>> from metrix.neighbors import knn
>>> x = torch.randn(100, 16)
>>> dist, idx = knn(x, k=5)          # self-matches excluded
>>> bool((idx != torch.arange(100)[:, None]).all())
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from metrix._validation import check_embeddings, check_pair
from metrix.distances import arcosh1p, ball_factor, check_metric, exact_near_zero_, safe_sqrt

DEFAULT_MAX_MEMORY_MB = 1024  # 200k × k=199 self-search: ~460 MB of candidate lists


def as_float_tensor(x, name: str, check_input: bool = True) -> torch.Tensor:
    """``x`` (array or tensor) as a validated float32/float64 (n, d) tensor (integer arrays become float32).
    ``check_input=False`` is for callers that validated ``x`` already (an index's own store): no scan."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind in "iub":
            x = x.astype(np.float32)
        x = torch.from_numpy(np.ascontiguousarray(x))
    if check_input:
        x = check_embeddings(x, name)
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


REF_BLOCK = 4096  # reference rows per tile: the (chunk × tile) score block stays in cache
QUERY_CHUNK = 1024  # query rows per chunk (fewer if max_memory_mb is small)


def _chunk_rows(tile: int, k: int, max_memory_mb: float, itemsize: int) -> int:
    # per query row: one score tile and its mask, the running best-k and a merge buffer (values + int64)
    per_row = 2 * tile * itemsize + 6 * k * (itemsize + 8)
    return max(1, min(QUERY_CHUNK, int(max_memory_mb * 2**20 // per_row)))


GROUP = 32  # columns per group in the two-level threshold filter
COLUMN_GROUP = 8  # rows per group in its column-wise twin


def _above_threshold(score: torch.Tensor, threshold: torch.Tensor):
    """``(rows, cols)`` of the entries of ``score`` greater than their row's ``threshold``.

    Two levels: the max of each group of 32 columns is compared first, and only groups that can hold a
    candidate are scanned. One reduction pass replaces a full comparison pass plus a full ``nonzero``.
    """
    m, width = score.shape
    if width % GROUP:
        return torch.nonzero(score > threshold[:, None], as_tuple=True)
    groups = score.view(m, width // GROUP, GROUP)
    g_rows, g_cols = torch.nonzero(groups.amax(-1) > threshold[:, None], as_tuple=True)
    # index_select of whole groups of the flat view is 4x faster than 2-d advanced indexing here
    hit_values = score.view(-1, GROUP).index_select(0, g_rows * (width // GROUP) + g_cols)
    hit_group, within = torch.nonzero(hit_values > threshold[g_rows][:, None], as_tuple=True)
    return g_rows[hit_group], g_cols[hit_group] * GROUP + within


def _merge_candidates(score, threshold, best_val, best_idx, offset, k):
    """Merge the entries of ``score`` above each row's current k-th best into the running best-k.

    Only entries beating ``threshold`` can enter the top-k, and after the first tiles they are a few per
    row, so this costs a comparison pass instead of a ``topk`` over the whole tile.
    """
    rows, cols = _above_threshold(score, threshold)
    if rows.numel() == 0:
        return best_val, best_idx
    return _merge_pending(best_val, best_idx, rows, cols + offset, score[rows, cols], k)


def _merge_pending(best_val, best_idx, rows, idx, val, k):
    """Best ``k`` per row of the running best-k and the candidate entries ``(rows, idx, val)``.

    ``rows`` must be grouped by row in ascending order (as ``nonzero`` returns them); the candidates are laid
    out in a padded (rows × widest row) block so that one ``topk`` merges every row at once.
    """
    m = best_val.shape[0]
    counts = torch.bincount(rows, minlength=m)
    slot = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
    width = int(counts.max())
    pad_val = torch.full((m, width), -torch.inf, dtype=val.dtype, device=val.device)
    pad_idx = torch.full((m, width), -1, dtype=torch.int64, device=val.device)
    pad_val[rows, slot] = val
    pad_idx[rows, slot] = idx
    merged_val, pick = torch.topk(torch.cat([best_val, pad_val], 1), k, dim=1, sorted=False)
    return merged_val, torch.cat([best_idx, pad_idx], 1).gather(1, pick)


def _mask_own(score, ids, r0, step=1):
    """Set to −inf each query's own item (reference row ``ids[i]``) among the columns ``r0, r0+step, …``."""
    rows = torch.arange(score.shape[0], device=score.device)
    pos = ids - r0
    own = torch.div(pos, step, rounding_mode="floor")
    inside = (pos >= 0) & (pos % step == 0) & (own < score.shape[1])
    score[rows[inside], own[inside]] = -torch.inf


def _chunk_topk_merging(qc, ra, ids, k, exclude_self, tile):
    """Top-k of one query chunk: tile by tile, each tile's entries above the running k-th best merged in."""
    n_ref = ra.shape[0]
    first = min(n_ref, max(tile, k + 1))  # the first block must hold k candidates besides the query itself
    best_val = best_idx = None
    r0 = 0
    while r0 < n_ref:
        width = first if r0 == 0 else tile
        score = qc @ ra[r0 : r0 + width].T
        if exclude_self:
            _mask_own(score, ids, r0)
        if best_val is None:
            best_val, best_idx = torch.topk(score, k, dim=1, sorted=False)
        else:
            best_val, best_idx = _merge_candidates(score, best_val.amin(1), best_val, best_idx, r0, k)
        r0 += width
    return best_val, best_idx


def _contiguous_part(buffer, rows, cols):
    """A contiguous ``(rows, cols)`` matrix over the start of a flat scratch ``buffer``."""
    return buffer[: rows * cols].view(rows, cols)


SAMPLE = 4096  # reference rows sampled to estimate each query's final k-th best score
SAMPLE_MARGIN = 2.0  # the estimated threshold admits about this many times k candidates per query
PENDING_ROWS = 2048  # candidates one query may hold before its pending entries are merged
# below this k, a query searched against other references merges tile by tile instead: its running k-th best
# tightens within a few tiles (measured at 200k references: k = 10 merging 5-10 % faster, k = 64 slower)
THRESHOLD_MIN_K = 32


def _sample_threshold(qc, sample, step, ids, k, n_ref, exclude_self):
    """A score that about ``SAMPLE_MARGIN · k`` references of each query beat, estimated from a sample.

    The j-th best of ``s`` evenly spread references is beaten by about ``j · n_ref / s`` of all references,
    with a relative spread of about 1/√j; for j ≈ 10 fewer than 1 % of queries get fewer than ``k`` (their
    count is a Gamma(j) variable). It is only a guess: the caller checks that ``k`` references beat it.
    """
    score = qc @ sample.T
    if exclude_self:
        _mask_own(score, ids, 0, step)
    j = min(sample.shape[0], int(SAMPLE_MARGIN * k * sample.shape[0] / n_ref) + 3)
    return torch.topk(score, j, dim=1, sorted=False).values.amin(1)


def _chunk_topk_threshold(qc, ra, sample, step, ids, k, exclude_self, tile):
    """Top-k of one query chunk with a fixed threshold estimated up front, so tiles need no ``topk``.

    Every tile's entries above the threshold are collected; they are merged into the best-k only when a query
    has gathered ``PENDING_ROWS`` of them (its threshold then rises to its k-th best so far) and at the end.
    Returns ``(values, indices, short)``: ``short`` marks queries with fewer than ``k`` entries above the guess,
    which the caller searches again exactly.
    """
    m, n_ref = qc.shape[0], ra.shape[0]
    threshold = _sample_threshold(qc, sample, step, ids, k, n_ref, exclude_self)
    best_val = torch.full((m, k), -torch.inf, dtype=qc.dtype, device=qc.device)
    best_idx = torch.full((m, k), -1, dtype=torch.int64, device=qc.device)
    pending, held = [], torch.zeros(m, dtype=torch.int64, device=qc.device)

    def merge():
        nonlocal best_val, best_idx, threshold, pending
        rows, idx, val = (torch.cat(parts) for parts in zip(*pending))
        order = torch.sort(rows, stable=True).indices  # group by row, as _merge_pending needs
        best_val, best_idx = _merge_pending(best_val, best_idx, rows[order], idx[order], val[order], k)
        threshold = torch.maximum(threshold, best_val.amin(1))  # −inf while a row has fewer than k
        pending = []
        held.zero_()

    buffer = torch.empty(m * tile, dtype=qc.dtype, device=qc.device)  # reused: a fresh 16 MB tile costs page faults
    for r0 in range(0, n_ref, tile):
        block = ra[r0 : r0 + tile]
        score = torch.mm(qc, block.T, out=_contiguous_part(buffer, m, block.shape[0]))
        if exclude_self:
            _mask_own(score, ids, r0)
        rows, cols = _above_threshold(score, threshold)
        if rows.numel():
            pending.append((rows, cols + r0, score[rows, cols]))
            held += torch.bincount(rows, minlength=m)
            if int(held.max()) > PENDING_ROWS:
                merge()
    if pending:
        merge()
    short = torch.isinf(best_val).any(1)
    return best_val, best_idx, short


def _above_threshold_columns(score, threshold):
    """``(rows, cols)`` of the entries of ``score`` greater than their column's ``threshold``.

    The column-wise twin of :func:`_above_threshold`: groups of ``COLUMN_GROUP`` rows are reduced first (a
    reduction over the middle axis, which vectorises along the contiguous columns). The groups are short
    because gathering a group reads one cache line per row (8 measured fastest; 32 was 1.4x slower).
    """
    m, width = score.shape
    if m % COLUMN_GROUP:
        return torch.nonzero(score > threshold[None, :], as_tuple=True)
    groups = score.view(m // COLUMN_GROUP, COLUMN_GROUP, width)
    g_rows, g_cols = torch.nonzero(groups.amax(1) > threshold[None, :], as_tuple=True)
    hit, within = torch.nonzero(groups[g_rows, :, g_cols] > threshold[g_cols][:, None], as_tuple=True)
    return g_rows[hit] * COLUMN_GROUP + within, g_cols[hit]


class _CandidateBuffer:
    """Per-row candidate lists for all N rows of a query = reference search, ``width`` slots each.

    Rows are filled in any order (from row-wise and column-wise tile filters); a full row is compacted to its
    best ``k`` and its threshold raised to its k-th best, which is then a proven bound.
    """

    def __init__(self, n, k, width, threshold):
        self.k, self.width = k, width
        device = threshold.device
        self.val = torch.full((n, width), -torch.inf, dtype=threshold.dtype, device=device)
        self.idx = torch.full((n, width), -1, dtype=torch.int32 if n < 2**31 else torch.int64, device=device)
        self.count = torch.zeros(n, dtype=torch.int64, device=device)
        self.threshold = threshold

    def add(self, rows, idx, val, grouped=False):
        """Append candidates ``(rows, idx, val)``; ``grouped``: ``rows`` is already sorted."""
        if not grouped:  # slots are ranks within a row, so entries of a row must be consecutive
            order = torch.argsort(rows, stable=True)
            rows, idx, val = rows[order], idx[order], val[order]
        idx = idx.to(self.idx.dtype)
        while rows.numel():
            uniq, counts = torch.unique_consecutive(rows, return_counts=True)
            first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts, output_size=rows.numel())
            slot = self.count[rows] + torch.arange(rows.numel(), device=rows.device) - first
            total = self.count[uniq] + counts
            if int(total.max()) <= self.width:  # the usual case: everything fits
                self.val.index_put_((rows, slot), val)
                self.idx.index_put_((rows, slot), idx)
                self.count[uniq] = total
                return
            fits = slot < self.width
            self.val[rows[fits], slot[fits]] = val[fits]
            self.idx[rows[fits], slot[fits]] = idx[fits]
            self.count[uniq] = total.clamp_max(self.width)
            full = uniq[self.count[uniq] == self.width]
            self._compact(full)
            over = ~fits  # place the rest, dropping what the raised thresholds now exclude
            rows, idx, val = rows[over], idx[over], val[over]
            keep = val > self.threshold[rows]
            rows, idx, val = rows[keep], idx[keep], val[keep]

    def _compact(self, rows):
        top, pick = torch.topk(self.val[rows], self.k, dim=1)
        self.idx[rows, : self.k] = self.idx[rows].gather(1, pick)
        self.val[rows, : self.k] = top
        self.val[rows, self.k :] = -torch.inf
        self.count[rows] = self.k
        self.threshold[rows] = torch.maximum(self.threshold[rows], top[:, -1])

    def take(self, start, stop):
        """Best ``k`` (values, int64 indices, short) of rows ``start:stop``; ``short`` rows found fewer than k."""
        top, pick = torch.topk(self.val[start:stop], self.k, dim=1, sorted=False)
        idx = self.idx[start:stop].gather(1, pick).to(torch.int64)
        return top, idx, torch.isinf(top).any(1)


def _symmetric_state_width(k):
    return k + max(64, k // 2)


def _iter_symmetric_topk(a, b, k, exclude_self, chunk, tile):
    """Yield ``(start, values, indices, short)`` for chunks of a search of a set against itself.

    ``a[i] · b[j]`` must be symmetric in i and j. Each pair of rows is scored once: chunk c's rows meet the
    rows after the chunk in (chunk × tile) blocks, whose entries are filtered row-wise for chunk c and
    column-wise for the later rows, against thresholds estimated up front (:func:`_sample_threshold`), so the
    matrix products are half of a one-sided search. Candidates wait in a :class:`_CandidateBuffer`; chunk c
    is complete once its own block and its row-wise pass are done.
    """
    n = a.shape[0]
    step = max(1, n // SAMPLE)
    sample = b[::step][:SAMPLE].contiguous()
    threshold = torch.empty(n, dtype=a.dtype, device=a.device)
    for start in range(0, n, chunk):
        ids = torch.arange(start, min(n, start + chunk), device=a.device)
        threshold[start : start + chunk] = _sample_threshold(a[start : start + chunk], sample, step, ids, k, n, exclude_self)
    state = _CandidateBuffer(n, k, _symmetric_state_width(k), threshold)
    buffer = torch.empty(chunk * tile, dtype=a.dtype, device=a.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        ac = a[start:stop]
        own = ac @ b[start:stop].T  # the chunk against itself: every ordered pair, row-wise
        if exclude_self:
            own.fill_diagonal_(-torch.inf)
        rows, cols = _above_threshold(own, state.threshold[start:stop])
        state.add(rows + start, cols + start, own[rows, cols], grouped=True)
        for c0 in range(stop, n, tile):
            block = b[c0 : c0 + tile]
            score = torch.mm(ac, block.T, out=_contiguous_part(buffer, ac.shape[0], block.shape[0]))
            rows, cols = _above_threshold(score, state.threshold[start:stop])
            state.add(rows + start, cols + c0, score[rows, cols], grouped=True)
            rows, cols = _above_threshold_columns(score, state.threshold[c0 : c0 + block.shape[0]])
            state.add(cols + c0, rows + start, score[rows, cols])
        yield (start, *state.take(start, stop))


@dataclass(frozen=True)
class PreparedReference:
    """A reference set made ready for one-sided search once, for many queries (an index between writes):
    the validated vectors in search space (normalised for cosine), the score rows every query multiplies
    with, and the squared norms behind the exact recomputation of distances near 0. Building these is most of
    the cost of a single-query search over a large set; a caller that keeps them pays it once."""

    metric: str
    vectors: torch.Tensor
    rows: torch.Tensor
    sq_norms: torch.Tensor | None


# kNN compares raw vectors: a Mahalanobis metric is the Euclidean distance after its linear map L
KNN_METRICS = ("euclidean", "sqeuclidean", "cosine", "dot", "poincare")


def _check_metric(metric: str) -> None:
    if metric == "mahalanobis":
        raise ValueError("kNN compares with the Euclidean distance after the learned map: transform the data with "
                         "L first (learner.transform(X), or x @ L.T) and use metric='euclidean'")
    check_metric(metric, KNN_METRICS, "kNN")


def _search_vectors(x: torch.Tensor, metric: str) -> torch.Tensor:
    return F.normalize(x, dim=1) if metric == "cosine" else x


def _reference_rows(rs: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The one-sided score rows of a reference set (larger = closer) and its squared norms where needed."""
    if metric == "poincare":  # −w_x·w_y·‖x − y‖², w = 1/(1 − ‖x‖²)
        return poincare_rows(rs, left=False), (rs * rs).sum(1)
    if metric in ("euclidean", "sqeuclidean"):  # 2q·r − ‖r‖² = [q, 1]·[2r, −‖r‖²] ranks like −‖q − r‖²
        sq = (rs * rs).sum(1)
        return torch.cat([2 * rs, -sq[:, None]], dim=1), sq
    return rs, None


def prepare_reference(reference, metric: str = "euclidean", check_input: bool = True) -> PreparedReference:
    """Validate ``reference`` (unless ``check_input=False``) and build what :func:`iter_knn` needs of it for
    one-sided search, once."""
    _check_metric(metric)
    r = as_float_tensor(reference, "reference", check_input)
    if r.shape[0] == 0:
        raise ValueError("the reference set is empty")
    rs = _search_vectors(r, metric)
    rows, sq = _reference_rows(rs, metric)
    return PreparedReference(metric, rs, rows, sq)


def iter_knn(
    query,
    reference=None,
    k: int = 1,
    metric: str = "euclidean",
    exclude_self: bool | None = None,
    max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
    prepared: PreparedReference | None = None,
    check_input: bool = True,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(start, distances, indices)`` for consecutive chunks of queries.

    ``distances`` are in the metric's own units (similarities for ``dot``, sorted descending;
    distances sorted ascending otherwise). ``exclude_self`` defaults to True
    when ``reference`` is None (query i is never its own neighbour). ``prepared`` (from
    :func:`prepare_reference`, with the same ``metric``) replaces ``reference`` and skips its preparation.
    ``check_input=False``: the caller validated ``query`` and ``reference`` already (no second scan).
    """
    q = as_float_tensor(query, "query", check_input)
    if prepared is not None:
        if prepared.metric != metric:
            raise ValueError(f"the prepared reference is for metric {prepared.metric!r}, not {metric!r}")
        reference = prepared.vectors
    same = reference is None
    r = q if same else (reference if prepared is not None else as_float_tensor(reference, "reference", check_input))
    if not same:
        check_pair(q, r, "query", "reference")
    if exclude_self is None:
        exclude_self = same
    if exclude_self and not same and q.shape[0] != r.shape[0]:
        raise ValueError(
            f"exclude_self needs query and reference of equal length, got {tuple(q.shape)} and {tuple(r.shape)}"
        )
    if q.shape[0] == 0:
        raise ValueError("the query set is empty: give at least one query")
    n_avail = r.shape[0] - int(exclude_self)
    if r.shape[0] == 0:
        raise ValueError("the reference set is empty")
    if not 1 <= k <= n_avail:
        raise ValueError(f"k must be between 1 and {n_avail} (reference size{' minus self' if exclude_self else ''}), got {k}")
    _check_metric(metric)
    # rank on a cheap score (larger = closer), then convert only the k kept values
    qs = _search_vectors(q, metric)
    rs = qs if same else (r if prepared is not None else _search_vectors(r, metric))
    euclid = metric in ("euclidean", "sqeuclidean")
    n_ref = r.shape[0]
    tile = min(REF_BLOCK, n_ref)
    chunk = _chunk_rows(max(tile, k + 1), k, max_memory_mb, q.element_size())
    # the estimated-threshold paths pay one sample tile per chunk; they need many tiles and k well below n_ref
    sampled = n_ref >= 4 * SAMPLE and SAMPLE_MARGIN * k * SAMPLE / n_ref + 8 < SAMPLE / 4
    state_mb = n_ref * _symmetric_state_width(k) * (q.element_size() + 4) / 2**20
    symmetric = same and sampled and state_mb <= max_memory_mb
    if symmetric and euclid:  # a symmetric score: [2x, −‖x‖², 1]·[y, 1, −‖y‖²] = −‖x − y‖²
        r_sq = (qs * qs).sum(1)
        sq_norm, one = r_sq[:, None], torch.ones_like(r_sq[:, None])
        qa, ra = torch.cat([2 * qs, -sq_norm, one], 1), torch.cat([qs, one, -sq_norm], 1)
    else:  # one-sided rows (Poincaré's score is symmetric and serves both paths)
        ra, r_sq = (prepared.rows, prepared.sq_norms) if prepared is not None else _reference_rows(rs, metric)
        if metric == "poincare":
            qa = poincare_rows(qs, left=True)
        elif euclid:
            qa = torch.cat([qs, torch.ones(qs.shape[0], 1, dtype=qs.dtype, device=qs.device)], dim=1)
        else:
            qa = qs
    with torch.no_grad():
        if symmetric:
            chunks = _iter_symmetric_topk(qa, ra, k, exclude_self, chunk, tile)
        else:
            chunks = _iter_one_sided_topk(qa, ra, k, exclude_self, chunk, tile, sampled and k >= THRESHOLD_MIN_K)
        for start, best_val, best_idx, short in chunks:
            ids = torch.arange(start, start + best_val.shape[0], device=q.device)
            if bool(short.any()):  # the estimated threshold was too high for these queries: search them exactly
                redo = torch.nonzero(short).squeeze(1)
                best_val[redo], best_idx[redo] = _chunk_topk_merging(qa[ids[redo]], ra, ids[redo], k, exclude_self, tile)
            top, order = torch.sort(best_val, dim=1, descending=True)
            idx = best_idx.gather(1, order)
            if euclid:
                q_sq = (qs[ids] * qs[ids]).sum(1)
                sq = -top if symmetric else q_sq[:, None] - top
                exact_near_zero_(sq, qs[ids], rs, q_sq, r_sq, cols=idx)  # duplicates exactly 0, none negative
                top = sq if metric == "sqeuclidean" else safe_sqrt(sq)
            elif metric == "cosine":
                top = 1.0 - top
            elif metric == "poincare":
                top = _exact_poincare(top, qs[ids], rs, idx, r_sq)
            yield start, top, idx


def poincare_rows(x, left: bool):
    """Rows whose products give ``−w_x·w_y·‖x − y‖²`` (``w = 1/(1 − ‖x‖²)``, the Poincaré ball of curvature
    −1): ``[2x·w, −‖x‖²·w, −w]`` on the left, ``[y·w, w, ‖y‖²·w]`` on the right. ``arcosh`` is increasing,
    so ranking by it ranks by distance, and ``d = arcosh(1 − 2·score)``."""
    sq = (x * x).sum(1, keepdim=True)
    w = 1.0 / ball_factor(x, 1.0, "the vectors")[:, None]
    if left:
        return torch.cat([2 * x * w, -sq * w, -w], dim=1)
    return torch.cat([x * w, w, sq * w], dim=1)


def _exact_poincare(score, q, r, idx, r_sq):
    """Poincaré distances of the kept neighbours from their :func:`poincare_rows` scores, with the entries
    that rounding could have moved by their own size recomputed from ``Σ(x − y)²`` (duplicates exactly 0).
    The score is ``−w_x·w_y·‖x − y‖²``, so ``‖x − y‖²`` carries the expansion's usual error bound plus a few
    ulps from forming the rows (``extra_terms``)."""
    q_sq = (q * q).sum(1)
    ww = (1.0 / (1.0 - q_sq))[:, None] / (1.0 - r_sq[idx])
    sq = -score / ww
    exact_near_zero_(sq, q, r, q_sq, r_sq, cols=idx, extra_terms=8)
    return arcosh1p(sq.mul_(ww).mul_(2.0))


def poincare_from_score(score: torch.Tensor) -> torch.Tensor:
    """The Poincaré distance ``arcosh(1 + z)`` from a :func:`poincare_rows` score ``−z/2``."""
    return arcosh1p((-2.0 * score).clamp_min(0))


def _iter_one_sided_topk(qa, ra, k, exclude_self, chunk, tile, sampled):
    """Yield ``(start, values, indices, short)`` for chunks of queries searched against all references."""
    n_ref = ra.shape[0]
    step = max(1, n_ref // SAMPLE)
    sample = ra[::step][:SAMPLE].contiguous() if sampled else None
    for start in range(0, qa.shape[0], chunk):
        qc = qa[start : start + chunk]
        ids = torch.arange(start, start + qc.shape[0], device=qa.device)
        if sampled:
            yield (start, *_chunk_topk_threshold(qc, ra, sample, step, ids, k, exclude_self, tile))
        else:
            best_val, best_idx = _chunk_topk_merging(qc, ra, ids, k, exclude_self, tile)
            yield start, best_val, best_idx, torch.zeros(qc.shape[0], dtype=torch.bool, device=qa.device)


def knn(
    query,
    reference=None,
    k: int = 1,
    metric: str = "euclidean",
    exclude_self: bool | None = None,
    max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``k`` nearest neighbours of each query row.

    Parameters
    ----------
    query : (Q, D) tensor or array
    reference : (R, D) tensor or array, or None to search ``query`` against itself
    k : number of neighbours
    metric : one of :data:`KNN_METRICS` (names of :data:`metrix.distances.METRICS`)
    exclude_self : drop the query itself (defaults to True when ``reference`` is None)
    max_memory_mb : bound on the working memory (tiles, and the candidate lists of a search against itself)

    Returns
    -------
    distances : (Q, k) tensor, nearest first
    indices : (Q, k) int64 tensor into ``reference``
    """
    dists, idxs = [], []
    for _, d, i in iter_knn(query, reference, k, metric, exclude_self, max_memory_mb):
        dists.append(d)
        idxs.append(i)
    return torch.cat(dists), torch.cat(idxs)
