import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from metrix.neighbors import knn


@pytest.mark.parametrize("metric,scipy_metric", [("euclidean", "euclidean"), ("sqeuclidean", "sqeuclidean"), ("cosine", "cosine")])
def test_knn_matches_brute_force(metric, scipy_metric):
    rng = np.random.default_rng(0)
    q, r = rng.normal(size=(50, 6)), rng.normal(size=(80, 6))
    d, i = knn(q, r, k=7, metric=metric, max_memory_mb=0.001)  # forces 1-row chunks
    full = cdist(q, r, scipy_metric)
    expected_idx = np.argsort(full, axis=1)[:, :7]
    np.testing.assert_array_equal(i.numpy(), expected_idx)
    np.testing.assert_allclose(d.numpy(), np.take_along_axis(full, expected_idx, 1), atol=1e-9)


def test_knn_similarity_metrics_rank_descending():
    rng = np.random.default_rng(1)
    q, r = rng.normal(size=(20, 4)), rng.normal(size=(30, 4))
    d, i = knn(q, r, k=5, metric="dot")
    full = q @ r.T
    np.testing.assert_array_equal(i.numpy(), np.argsort(-full, axis=1)[:, :5])
    np.testing.assert_allclose(d.numpy(), -np.sort(-full, axis=1)[:, :5])


def test_self_excluded_and_chunking_invariant():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 5))
    x[1] = x[0]  # a duplicate: must still be found, but never the point itself
    d1, i1 = knn(x, k=3)
    d2, i2 = knn(x, k=3, max_memory_mb=0.0001)
    np.testing.assert_array_equal(i1.numpy(), i2.numpy())
    assert (i1.numpy() != np.arange(64)[:, None]).all()
    assert i1[0, 0] == 1 and d1[0, 0] == 0
    full = cdist(x, x)
    np.fill_diagonal(full, np.inf)
    np.testing.assert_allclose(d1.numpy(), np.sort(full, 1)[:, :3], atol=1e-7)


def test_knn_bad_input():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="k must be between 1 and 4"):
        knn(x, k=5)
    with pytest.raises(ValueError, match=r"\(5, 3\).*\(6, 2\)"):
        knn(x, torch.randn(6, 2))
    with pytest.raises(ValueError, match="NaN"):
        knn(torch.full((3, 2), float("nan")))


@pytest.mark.parametrize("metric,scipy_metric", [("euclidean", "euclidean"), ("cosine", "cosine")])
def test_tiled_merge_matches_brute_force(monkeypatch, metric, scipy_metric):
    import metrix.neighbors as nb

    monkeypatch.setattr(nb, "REF_BLOCK", 7)  # many tiles, k larger than a tile
    monkeypatch.setattr(nb, "QUERY_CHUNK", 5)  # queries' own items fall in different tiles
    rng = np.random.default_rng(4)
    x = rng.normal(size=(60, 5))
    d, i = nb.knn(x, k=12, metric=metric)
    full = cdist(x, x, scipy_metric)
    np.fill_diagonal(full, np.inf)
    expected = np.argsort(full, axis=1)[:, :12]
    np.testing.assert_array_equal(i.numpy(), expected)
    np.testing.assert_allclose(d.numpy(), np.take_along_axis(full, expected, 1), atol=1e-9)
    q = rng.normal(size=(9, 5))
    d, i = nb.knn(q, x, k=10, metric=metric)
    np.testing.assert_array_equal(i.numpy(), np.argsort(cdist(q, x, scipy_metric), axis=1)[:, :10])


def test_two_level_threshold_filter_finds_exactly_the_entries_above():
    from metrix.neighbors import _above_threshold

    rng = np.random.default_rng(6)
    score = torch.from_numpy(rng.normal(size=(37, 96)))
    thr = torch.from_numpy(rng.normal(size=37) + 1.5)
    rows, cols = _above_threshold(score, thr)
    expected = torch.nonzero(score > thr[:, None], as_tuple=True)
    assert sorted(zip(rows.tolist(), cols.tolist())) == sorted(zip(expected[0].tolist(), expected[1].tolist()))
    rows, cols = _above_threshold(score[:, :95], thr)  # width not a multiple of the group: plain path
    assert len(rows) == int((score[:, :95] > thr[:, None]).sum())


def test_tiled_search_with_groups_matches_brute_force(monkeypatch):
    import metrix.neighbors as nb

    monkeypatch.setattr(nb, "REF_BLOCK", 64)  # tiles of 64 columns: the grouped filter runs
    rng = np.random.default_rng(7)
    x = rng.normal(size=(400, 6))
    d, i = nb.knn(x, k=15)
    full = cdist(x, x)
    np.fill_diagonal(full, np.inf)
    np.testing.assert_array_equal(i.numpy(), np.argsort(full, axis=1)[:, :15])


def _brute_force(q, r, k, metric, exclude_self):
    scipy_metric = {"euclidean": "euclidean", "cosine": "cosine"}.get(metric)
    full = cdist(q, r, scipy_metric) if scipy_metric else -(q @ r.T)
    if exclude_self:
        np.fill_diagonal(full, np.inf)
    order = np.argsort(full, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(full, order, 1)


@pytest.fixture
def small_blocks(monkeypatch):
    """Shrink the search's blocks so that a few hundred rows take the estimated-threshold paths."""
    import metrix.neighbors as nb

    monkeypatch.setattr(nb, "SAMPLE", 64)
    monkeypatch.setattr(nb, "REF_BLOCK", 96)
    monkeypatch.setattr(nb, "QUERY_CHUNK", 40)
    monkeypatch.setattr(nb, "THRESHOLD_MIN_K", 1)
    return nb


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "dot"])
@pytest.mark.parametrize("exclude_self", [True, False])
def test_symmetric_search_matches_brute_force(small_blocks, metric, exclude_self):
    """query = reference: each pair is scored once and filtered for both of its rows."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(700, 6))
    d, i = small_blocks.knn(x, k=9, metric=metric, exclude_self=exclude_self)
    expected, dist = _brute_force(x, x, 9, metric, exclude_self)
    np.testing.assert_array_equal(i.numpy(), expected)
    sign = -1 if metric == "dot" else 1
    # a self-distance comes from ‖x‖² + ‖x‖² − 2x·x, whose float64 rounding the square root lifts to ~1e-8
    np.testing.assert_allclose(sign * d.numpy(), dist, atol=1e-7)


def test_symmetric_search_is_the_path_taken_and_its_buffers_compact(small_blocks, monkeypatch):
    """Candidate lists far narrower than a row's candidates force repeated compaction; results are unchanged."""
    calls = []
    real = small_blocks._iter_symmetric_topk
    monkeypatch.setattr(small_blocks, "_iter_symmetric_topk", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(small_blocks, "_symmetric_state_width", lambda k: k + 3)
    compacted = []
    real_compact = small_blocks._CandidateBuffer._compact
    monkeypatch.setattr(small_blocks._CandidateBuffer, "_compact", lambda self, rows: compacted.append(len(rows)) or real_compact(self, rows))
    rng = np.random.default_rng(12)
    x = rng.normal(size=(600, 5))
    d, i = small_blocks.knn(x, k=12)
    expected, dist = _brute_force(x, x, 12, "euclidean", True)
    assert calls and sum(compacted) > 600  # the symmetric path ran, and rows were compacted more than once
    np.testing.assert_array_equal(i.numpy(), expected)
    np.testing.assert_allclose(d.numpy(), dist, atol=1e-9)


def test_symmetric_search_respects_the_memory_bound(small_blocks, monkeypatch):
    calls = []
    real = small_blocks._iter_symmetric_topk
    monkeypatch.setattr(small_blocks, "_iter_symmetric_topk", lambda *a: calls.append(1) or real(*a))
    x = np.random.default_rng(13).normal(size=(500, 4))
    small_blocks.knn(x, k=5, max_memory_mb=1e-3)  # its candidate lists need more: the one-sided search runs
    assert not calls


@pytest.mark.parametrize("same", [True, False])
def test_a_threshold_estimate_that_is_too_high_falls_back_to_exact_search(small_blocks, monkeypatch, same):
    """With a margin far below 1 most queries find fewer than k entries above the estimate; they are redone."""
    monkeypatch.setattr(small_blocks, "SAMPLE_MARGIN", 0.05)
    rng = np.random.default_rng(14)
    x, q = rng.normal(size=(640, 5)), rng.normal(size=(50, 5))
    d, i = small_blocks.knn(x, k=20)
    expected, _ = _brute_force(x, x, 20, "euclidean", True)
    np.testing.assert_array_equal(i.numpy(), expected)
    d, i = small_blocks.knn(q, x, k=20)
    np.testing.assert_array_equal(i.numpy(), _brute_force(q, x, 20, "euclidean", False)[0])


def test_one_sided_threshold_search_merges_pending_candidates(small_blocks, monkeypatch):
    """query ≠ reference with an estimated threshold, merging whenever a query holds a few pending entries."""
    monkeypatch.setattr(small_blocks, "PENDING_ROWS", 5)
    rng = np.random.default_rng(15)
    x, q = rng.normal(size=(900, 6)), rng.normal(size=(130, 6))
    for metric in ("euclidean", "cosine", "dot"):
        d, i = small_blocks.knn(q, x, k=11, metric=metric)
        expected, dist = _brute_force(q, x, 11, metric, False)
        np.testing.assert_array_equal(i.numpy(), expected)
        np.testing.assert_allclose((-1 if metric == "dot" else 1) * d.numpy(), dist, atol=1e-9)


def test_column_threshold_filter_finds_exactly_the_entries_above():
    from metrix.neighbors import _above_threshold_columns

    rng = np.random.default_rng(16)
    score = torch.from_numpy(rng.normal(size=(48, 37)))
    thr = torch.from_numpy(rng.normal(size=37) + 1.5)
    for rows in (48, 45):  # a multiple of the group, and not (plain path)
        r, c = _above_threshold_columns(score[:rows], thr)
        e = torch.nonzero(score[:rows] > thr[None, :], as_tuple=True)
        assert sorted(zip(r.tolist(), c.tolist())) == sorted(zip(e[0].tolist(), e[1].tolist()))


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine", "dot", "poincare"])
def test_a_prepared_reference_gives_the_same_neighbours(metric):
    from metrix.distances import expmap0
    from metrix.neighbors import iter_knn, knn, prepare_reference

    g = torch.Generator().manual_seed(3)
    ref, query = torch.randn(5000, 16, generator=g), torch.randn(40, 16, generator=g)
    if metric == "poincare":
        ref, query = expmap0(0.3 * ref), expmap0(0.3 * query)
    expected = knn(query, ref, k=7, metric=metric)
    prepared = prepare_reference(ref, metric)
    got = [(d, i) for _, d, i in iter_knn(query, None, 7, metric, False, prepared=prepared)]
    torch.testing.assert_close(torch.cat([d for d, _ in got]), expected[0], rtol=0, atol=0)
    assert torch.equal(torch.cat([i for _, i in got]), expected[1])
    with pytest.raises(ValueError, match="prepared reference is for metric"):
        next(iter_knn(query, None, 7, "dot" if metric != "dot" else "euclidean", False, prepared=prepared))
