"""Retrieval, clustering and classification metrics for embeddings.

Definitions follow Musgrave et al., "A Metric Learning Reality Check" (ECCV 2020) and
pytorch-metric-learning's ``AccuracyCalculator``:

* ``precision_at_1``: the nearest reference item has the query's label.
* ``recall_at_k``: hit rate, 1 if any of the ``k`` nearest has the query's label
  (what deep-metric-learning papers report as "Recall@K").
* ``precision_at_k``: fraction of the ``k`` nearest with the query's label.
* ``r_precision``: with ``R`` = number of reference items sharing the query's label,
  the fraction of the ``R`` nearest that share it.
* ``map_at_r``: ``1/R · Σ_{i≤R} P(i)·rel(i)``, average precision cut at ``R``.

Queries whose label has no other item in the reference set cannot be answered; as in
pytorch-metric-learning they are left out of every average (``num_queries`` says how many remain).

Everything is streamed over chunks of queries (:func:`metrix.neighbors.iter_knn`), so memory
is bounded by ``chunk · (R + k)`` whatever the number of items.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from metrix._validation import label_codes, progress_bar
from metrix.neighbors import DEFAULT_MAX_MEMORY_MB, as_float_tensor, iter_knn


def encode_label_tensors(*label_arrays) -> list[torch.Tensor]:
    """Labels of any type as int64 tensors of codes shared across the arrays (:func:`label_codes`)."""
    return [torch.from_numpy(c) for c in label_codes(*label_arrays)[0]]


def _check_lengths(x, labels, name):
    if x.shape[0] != len(labels):
        raise ValueError(f"{name} has {x.shape[0]} rows but {name}_labels has {len(labels)} entries")
    if x.shape[0] == 0:
        raise ValueError(f"the {name} set is empty: there is nothing to evaluate")


def _prepare(query, query_labels, reference, reference_labels):
    """Validate inputs; returns ``(q, q_lab, r, r_lab, same)`` with labels as shared int64 codes."""
    q = as_float_tensor(query, "query")
    same = reference is None
    if same:
        if reference_labels is not None:
            raise ValueError("reference_labels given without reference")
        (q_lab,) = encode_label_tensors(query_labels)
        r, r_lab = q, q_lab
    else:
        if reference_labels is None:
            raise ValueError("reference given without reference_labels")
        r = as_float_tensor(reference, "reference")
        q_lab, r_lab = encode_label_tensors(query_labels, reference_labels)
    _check_lengths(q, q_lab, "query")
    _check_lengths(r, r_lab, "reference")
    return q, q_lab, r, r_lab, same


def _neighbours(q, r, same, k, metric, max_memory_mb, approximate, approximate_options, rows):
    """Yield ``(start, indices)`` chunks of the k nearest references (−1 = not found) of the queries
    ``rows = (first, last)``."""
    first, last = rows
    if approximate is None and (first, last) == (0, q.shape[0]):
        for start, _, idx in iter_knn(q, None if same else r, k, metric, same, max_memory_mb):
            yield start, idx
        return
    if approximate is None:  # a shard of the queries against the whole reference
        part = q[first:last]
        for start, _, idx in iter_knn(part, r, min(k + int(same), r.shape[0]), metric, False, max_memory_mb):
            if same:
                idx = _drop_own(idx, first + start)
            yield first + start, idx
        return
    from metrix.index import VectorIndex

    index = VectorIndex(q.shape[1], metric=metric, backend="faiss", faiss_index=approximate,
                        **(approximate_options or {}))
    index.add(r.numpy())  # ids are row positions
    chunk = 4096
    for start in range(first, last, chunk):
        qc = q[start : min(start + chunk, last)].numpy()
        _, ids = index.search(qc, min(k + int(same), len(index)))
        ids = torch.from_numpy(ids)
        yield start, _drop_own(ids, start) if same else ids


def _drop_own(idx: torch.Tensor, start: int) -> torch.Tensor:
    """Each row's own index (row i is query ``start + i``) removed from its k + 1 neighbours; where the
    search did not return it (a tie at distance 0), the last neighbour goes instead."""
    own = idx == torch.arange(start, start + idx.shape[0])[:, None]
    own[~own.any(dim=1), -1] = True
    return idx[~own].reshape(idx.shape[0], -1)


def retrieval_metrics(
    query,
    query_labels,
    reference=None,
    reference_labels=None,
    ks: Sequence[int] = (1, 2, 4, 8),
    metric: str = "euclidean",
    max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
    approximate: str | None = None,
    approximate_options: dict | None = None,
    progress: str | None = None,
    rows: tuple[int, int] | None = None,
) -> dict[str, float]:
    """Retrieval metrics of ``query`` against ``reference`` (or itself, self excluded).

    Parameters
    ----------
    query : (Q, D) array or tensor
    query_labels : (Q,) labels of any type (ints of any size, strings)
    reference, reference_labels : the gallery; ``None`` means query = reference with self excluded
    ks : cut-offs for ``recall_at_k`` and ``precision_at_k``
    metric : distance used for ranking (see :mod:`metrix.distances`)
    max_memory_mb : bound on the working memory of exact search (see :mod:`metrix.neighbors`)
    approximate : a faiss index factory string (e.g. ``"HNSW32"``, ``"IVF1024,Flat"``) to rank with an
        approximate index instead of exact search (needs the ``faiss`` extra); ``approximate_options``
        are passed to :class:`metrix.index.VectorIndex` (``nprobe``, ``ef_search``)
    progress : a label for a progress bar over the queries, shown when stderr is a terminal (None: none)
    rows : ``(start, stop)``: score only these queries (a shard; the reference stays whole). The result then
        holds each metric's *sum* over the shard's answerable queries and their count ``num_queries``:
        shards add up, and :func:`finish_sums` turns the total into means (:mod:`metrix.distributed`)

    Returns
    -------
    dict with ``precision_at_1``, ``recall_at_{k}``, ``precision_at_{k}`` for each k,
    ``r_precision``, ``map_at_r`` and ``num_queries`` (queries that have at least one relevant item).

    Example
    -------
    >>> import numpy as np
    >>> x = np.array([[0.0], [0.1], [5.0], [5.1]]); y = np.array([0, 0, 1, 1])
    >>> retrieval_metrics(x, y)["map_at_r"]
    1.0
    """
    q, q_lab, r, r_lab, same = _prepare(query, query_labels, reference, reference_labels)
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")

    n_classes = int(max(int(q_lab.max()), int(r_lab.max()))) + 1
    ref_counts = torch.bincount(r_lab, minlength=n_classes)
    relevant = ref_counts[q_lab] - int(same)  # R for each query
    answerable = relevant > 0
    if not bool(answerable.any()):
        raise ValueError("no query has a same-label item in the reference set; retrieval metrics are undefined")
    n_avail = r.shape[0] - int(same)
    k_max = min(max(ks[-1], int(relevant.max())), n_avail)
    first, last = (0, q.shape[0]) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= first <= last <= q.shape[0]:
        raise ValueError(f"rows must lie within the {q.shape[0]} queries, got {rows}")

    sums = {"r_precision": 0.0, "map_at_r": 0.0}
    precision_ks = sorted(set(ks) | {1})  # precision_at_1 is always reported
    for k in ks:
        sums[f"recall_at_{k}"] = 0.0
    for k in precision_ks:
        sums[f"precision_at_{k}"] = 0.0
    bar = progress_bar(last - first, progress, "query")
    for start, idx in _neighbours(q, r, same, k_max, metric, max_memory_mb, approximate, approximate_options,
                                  (first, last)):
        bar.update(idx.shape[0])
        stop = start + idx.shape[0]
        keep = answerable[start:stop]
        found = r_lab[idx.clamp_min(0)].masked_fill(idx < 0, -1)  # a missing neighbour never matches
        hits = (found == q_lab[start:stop, None])[keep].to(torch.float64)
        R = relevant[start:stop][keep].to(torch.float64)
        for k in ks:
            sums[f"recall_at_{k}"] += float(hits[:, : min(k, k_max)].amax(dim=1).sum())
        for k in precision_ks:
            kk = min(k, k_max)
            sums[f"precision_at_{k}"] += float(hits[:, :kk].sum() / kk)
        rank = torch.arange(1, k_max + 1, dtype=torch.float64)
        within_r = rank[None, :] <= R[:, None]
        hits_r = hits * within_r
        sums["r_precision"] += float((hits_r.sum(1) / R).sum())
        precision_at_i = torch.cumsum(hits_r, dim=1) / rank
        sums["map_at_r"] += float(((precision_at_i * hits_r).sum(1) / R).sum())
    bar.close()
    sums["num_queries"] = int(answerable[first:last].sum())
    return sums if rows is not None else finish_sums(sums)


def finish_sums(sums: dict) -> dict[str, float]:
    """Means from the per-query sums of :func:`retrieval_metrics` with ``rows`` (added over shards)."""
    n = int(sums["num_queries"])
    out = {key: value / n for key, value in sums.items() if key != "num_queries"}
    out["num_queries"] = n
    return out


def knn_accuracy(
    query,
    query_labels,
    reference=None,
    reference_labels=None,
    k: int = 5,
    metric: str = "euclidean",
    max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
    progress: str | None = None,
) -> float:
    """Accuracy of a majority vote among the ``k`` nearest references.

    Ties between labels are broken in favour of the label seen at the nearest rank. ``progress``: a label for
    a progress bar over the queries (shown on a terminal).
    """
    q, q_lab, r, r_lab, same = _prepare(query, query_labels, reference, reference_labels)
    n_classes = int(max(int(q_lab.max()), int(r_lab.max()))) + 1
    correct = 0
    bar = progress_bar(len(q), progress, "query")
    for start, _, idx in iter_knn(q, None if same else r, k, metric, same, max_memory_mb):
        bar.update(idx.shape[0])
        lab = r_lab[idx]
        kk = lab.shape[1]
        counts = torch.zeros(lab.shape[0], n_classes, dtype=torch.int64).scatter_add_(1, lab, torch.ones_like(lab))
        ranks = torch.arange(kk).expand_as(lab)
        first = torch.full((lab.shape[0], n_classes), kk, dtype=torch.int64).scatter_reduce_(1, lab, ranks, "amin")
        # more votes wins; among equal votes the label met first (nearest) wins
        score = counts * (kk + 1) + (kk - first)
        pred = score.argmax(dim=1)
        correct += int((pred == q_lab[start : start + lab.shape[0]]).sum())
    bar.close()
    return correct / q.shape[0]


def clustering_metrics(embeddings, labels, n_clusters: int | None = None, random_state: int = 0) -> dict[str, float]:
    """NMI and AMI between the labels and a k-means clustering of ``embeddings``.

    ``n_clusters`` defaults to the number of distinct labels.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    x = as_float_tensor(embeddings, "embeddings").detach().cpu().numpy()
    (lab,) = encode_label_tensors(labels)
    lab = lab.numpy()
    _check_lengths(x, lab, "embeddings")
    n_clusters = int(n_clusters or len(np.unique(lab)))
    if n_clusters < 2:
        raise ValueError("clustering metrics need at least 2 clusters (labels with at least 2 classes)")
    if n_clusters > x.shape[0]:
        raise ValueError(f"n_clusters={n_clusters} exceeds the number of samples {x.shape[0]}")
    pred = KMeans(n_clusters=n_clusters, n_init=10, random_state=random_state).fit_predict(x)
    return {
        "nmi": float(normalized_mutual_info_score(lab, pred)),
        "ami": float(adjusted_mutual_info_score(lab, pred)),
    }
