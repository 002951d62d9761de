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
QUERY_CHUNK = 256  # query rows per chunk (fewer if max_memory_mb is small)


def _chunk_rows(tile: int, k: int, max_memory_mb: float, itemsize: int) -> int:
    # per query row: one score tile, its top-k, and the running best (values + int64 indices)
    per_row = (2 * tile + 3 * k) * itemsize + 3 * k * 8
    return max(1, min(QUERY_CHUNK, int(max_memory_mb * 2**20 // per_row)))


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
    r_sq = (rs * rs).sum(1) if metric in ("euclidean", "squared_euclidean") else None
    n_ref = r.shape[0]
    tile = min(REF_BLOCK, n_ref)
    chunk = _chunk_rows(tile, k, max_memory_mb, q.element_size())
    with torch.no_grad():
        for start in range(0, q.shape[0], chunk):
            qc = qs[start : start + chunk]
            rows = torch.arange(qc.shape[0], device=q.device)
            best_val = best_idx = None
            for r0 in range(0, n_ref, tile):
                score = qc @ rs[r0 : r0 + tile].T
                if r_sq is not None:
                    # -‖q − r‖² up to the per-row constant ‖q‖², which does not change the ranking
                    score.mul_(2).sub_(r_sq[None, r0 : r0 + tile])
                if exclude_self:
                    own = rows + start - r0  # column of each query's own item in this tile
                    inside = (own >= 0) & (own < score.shape[1])
                    score[rows[inside], own[inside]] = -torch.inf
                top, idx = torch.topk(score, min(k, score.shape[1]), dim=1, largest=True, sorted=False)
                idx += r0
                if best_val is None:
                    best_val, best_idx = top, idx
                else:
                    merged_val = torch.cat([best_val, top], dim=1)
                    merged_idx = torch.cat([best_idx, idx], dim=1)
                    best_val, pick = torch.topk(merged_val, min(k, merged_val.shape[1]), dim=1, sorted=False)
                    best_idx = merged_idx.gather(1, pick)
            top, order = torch.sort(best_val, dim=1, descending=True)
            idx = best_idx.gather(1, order)
            if metric in ("euclidean", "squared_euclidean"):
                sq = ((qc * qc).sum(1, keepdim=True) - top).clamp_min(0)
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
