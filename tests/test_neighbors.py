import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from metrix.neighbors import knn


@pytest.mark.parametrize("metric,scipy_metric", [("euclidean", "euclidean"), ("squared_euclidean", "sqeuclidean"), ("cosine", "cosine")])
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
