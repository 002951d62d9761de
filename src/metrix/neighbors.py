"""Exact k-nearest-neighbour search in chunks, so memory stays bounded for large sets.

Each chunk of queries is compared with the whole reference set by one matrix product
(``chunk × R``), then ``topk`` keeps ``k`` columns. Peak memory is about
``chunk · R`` floats, and the chunk size is chosen from ``max_memory_mb``.

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

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from metrix._validation import check_embeddings, check_pair
from metrix.distances import is_similarity, safe_sqrt

DEFAULT_MAX_MEMORY_MB = 256


def _as_tensor(x, name):
    if isinstance(x, np.ndarray):
        if x.dtype.kind in "iub":
            x = x.astype(np.float32)
        x = torch.from_numpy(np.ascontiguousarray(x))
    x = check_embeddings(x, name)
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


REF_BLOCK = 4096  # reference rows per tile: the (chunk × tile) score block stays in cache
QUERY_CHUNK = 1024  # query rows per chunk (fewer if max_memory_mb is small)


def _chunk_rows(tile: int, k: int, max_memory_mb: float, itemsize: int) -> int:
    # per query row: one score tile and its mask, the running best-k and a merge buffer (values + int64)
    per_row = 2 * tile * itemsize + 6 * k * (itemsize + 8)
    return max(1, min(QUERY_CHUNK, int(max_memory_mb * 2**20 // per_row)))


GROUP = 32  # columns per group in the two-level threshold filter


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
    hit_group, within = torch.nonzero(groups[g_rows, g_cols] > threshold[g_rows][:, None], as_tuple=True)
    return g_rows[hit_group], g_cols[hit_group] * GROUP + within


def _merge_candidates(score, threshold, best_val, best_idx, offset, k):
    """Merge the entries of ``score`` above each row's current k-th best into the running best-k.

    Only entries beating ``threshold`` can enter the top-k, and after the first tiles they are a few per
    row, so this costs a comparison pass instead of a ``topk`` over the whole tile.
    """
    rows, cols = _above_threshold(score, threshold)
    if rows.numel() == 0:
        return best_val, best_idx
    counts = torch.bincount(rows, minlength=score.shape[0])
    slot = torch.arange(rows.numel(), device=score.device) - (torch.cumsum(counts, 0) - counts)[rows]
    width = int(counts.max())
    pad_val = torch.full((score.shape[0], width), -torch.inf, dtype=score.dtype, device=score.device)
    pad_idx = torch.zeros((score.shape[0], width), dtype=torch.int64, device=score.device)
    pad_val[rows, slot] = score[rows, cols]
    pad_idx[rows, slot] = cols + offset
    merged_val, pick = torch.topk(torch.cat([best_val, pad_val], 1), k, dim=1, sorted=False)
    return merged_val, torch.cat([best_idx, pad_idx], 1).gather(1, pick)


def iter_knn(
    query,
    reference=None,
    k: int = 1,
    metric: str = "euclidean",
    exclude_self: bool | None = None,
    max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(start, distances, indices)`` for consecutive chunks of queries.

    ``distances`` are in the metric's own units (similarities for ``cosine_similarity``/``dot``,
    sorted descending; distances sorted ascending otherwise). ``exclude_self`` defaults to True
    when ``reference`` is None (query i is never its own neighbour).
    """
    q = _as_tensor(query, "query")
    same = reference is None
    r = q if same else _as_tensor(reference, "reference")
    if not same:
        check_pair(q, r, "query", "reference")
    if exclude_self is None:
        exclude_self = same
    if exclude_self and not same and q.shape[0] != r.shape[0]:
        raise ValueError(
            f"exclude_self needs query and reference of equal length, got {tuple(q.shape)} and {tuple(r.shape)}"
        )
    n_avail = r.shape[0] - int(exclude_self)
    if r.shape[0] == 0:
        raise ValueError("the reference set is empty")
    if not 1 <= k <= n_avail:
        raise ValueError(f"k must be between 1 and {n_avail} (reference size{' minus self' if exclude_self else ''}), got {k}")
    sim = is_similarity(metric)
    # rank on a cheap score (larger = closer), then convert only the k kept values
    if metric in ("cosine", "cosine_similarity"):
        qs, rs = F.normalize(q, dim=1), F.normalize(r, dim=1)
    else:
        qs, rs = q, r
    euclid = metric in ("euclidean", "squared_euclidean")
    if euclid:  # larger = closer: 2q·r − ‖r‖² = [q, 1]·[2r, −‖r‖²] (the per-query ‖q‖² does not change ranks)
        ra = torch.cat([2 * rs, -(rs * rs).sum(1, keepdim=True)], dim=1)
        qa = torch.cat([qs, torch.ones(qs.shape[0], 1, dtype=qs.dtype, device=qs.device)], dim=1)
    else:
        ra, qa = rs, qs
    n_ref = r.shape[0]
    tile = min(REF_BLOCK, n_ref)
    first = min(n_ref, max(tile, k + 1))  # the first block must hold k candidates besides the query itself
    chunk = _chunk_rows(first, k, max_memory_mb, q.element_size())
    with torch.no_grad():
        for start in range(0, q.shape[0], chunk):
            qc = qa[start : start + chunk]
            rows = torch.arange(qc.shape[0], device=q.device)
            best_val = best_idx = None
            r0 = 0
            while r0 < n_ref:
                width = first if r0 == 0 else tile
                score = qc @ ra[r0 : r0 + width].T
                if exclude_self:
                    own = rows + start - r0  # column of each query's own item in this tile
                    inside = (own >= 0) & (own < score.shape[1])
                    score[rows[inside], own[inside]] = -torch.inf
                if best_val is None:
                    best_val, best_idx = torch.topk(score, k, dim=1, sorted=False)
                else:
                    best_val, best_idx = _merge_candidates(score, best_val.amin(1), best_val, best_idx, r0, k)
                r0 += width
            top, order = torch.sort(best_val, dim=1, descending=True)
            idx = best_idx.gather(1, order)
            if euclid:
                q_rows = qs[start : start + chunk]
                sq = ((q_rows * q_rows).sum(1, keepdim=True) - top).clamp_min(0)
                top = sq if metric == "squared_euclidean" else safe_sqrt(sq)
            elif metric == "cosine":
                top = 1.0 - top
            elif not sim:
                raise ValueError(f"metric {metric!r} is not supported by knn")
            yield start, top, idx


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
    metric : ``euclidean``, ``squared_euclidean``, ``cosine``, ``cosine_similarity`` or ``dot``
    exclude_self : drop the query itself (defaults to True when ``reference`` is None)
    max_memory_mb : bound on the working memory of one chunk

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
