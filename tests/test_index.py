import threading

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from metrix.index import VectorIndex
from metrix.io import CorruptFileError



def has_faiss():
    try:
        import faiss  # noqa: F401
        return True
    except ImportError:
        return False


needs_faiss = pytest.mark.skipif(not has_faiss(), reason="faiss extra not installed")


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(300, 8)).astype(np.float32), rng.normal(size=(20, 8)).astype(np.float32)


@pytest.mark.parametrize("metric,scipy_metric", [("euclidean", "euclidean"), ("sqeuclidean", "sqeuclidean"), ("cosine", "cosine"), ("dot", None)])
def test_exact_search_matches_brute_force(data, metric, scipy_metric):
    x, q = data
    index = VectorIndex(8, metric=metric, max_memory_mb=0.01)
    index.add(x, ids=np.arange(300) * 7 + 3)
    dist, ids = index.search(q, k=5)
    full = -(q @ x.T) if metric == "dot" else cdist(q, x, scipy_metric)
    order = np.argsort(full, axis=1)[:, :5]
    np.testing.assert_array_equal(ids, order * 7 + 3)
    expected = np.take_along_axis(full, order, 1)
    np.testing.assert_allclose(dist, -expected if metric == "dot" else expected, rtol=1e-4, atol=1e-4)


def test_ids_metadata_and_removal(data):
    x, q = data
    index = VectorIndex(8)
    assert list(index.add(x[:3], metadata=[{"label": i} for i in "abc"])) == [0, 1, 2]
    assert list(index.add(x[3:5])) == [3, 4]  # auto ids continue after the largest
    assert index.metadata(1) == {"label": "b"} and index.metadata(4) is None
    assert index.remove([1, 3]) == 2 and len(index) == 3
    _, ids = index.search(x[:5], k=3)
    assert ids[[0, 2, 4], 0].tolist() == [0, 2, 4]  # survivors find themselves
    assert not np.isin(ids, [1, 3]).any()  # removed ids never come back
    assert 1 not in index.ids and index.metadata(2) == {"label": "c"}


def test_range_search_exact(data):
    x, q = data
    index = VectorIndex(8)
    index.add(x)
    full = cdist(q, x)
    results = index.range_search(q, radius=2.5)
    for row, (d, ids) in zip(full, results):
        assert set(ids.tolist()) == set(np.flatnonzero(row <= 2.5).tolist())
        assert np.all(np.diff(d) >= 0)


@pytest.mark.parametrize("backend", ["exact", pytest.param("faiss", marks=needs_faiss)])
def test_save_load_roundtrip(tmp_path, data, backend):
    x, q = data
    index = VectorIndex(8, metric="cosine", backend=backend, faiss_index="Flat")
    index.add(x, ids=np.arange(300) + 1000, metadata=[{"i": int(i)} for i in range(300)])
    before = index.search(q, k=4)  # builds the faiss structure, which is saved too
    index.save(tmp_path / "idx.safetensors")
    loaded = VectorIndex.load(tmp_path / "idx.safetensors")
    after = loaded.search(q, k=4)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0], atol=1e-6)
    assert loaded.metadata(1005) == {"i": 5} and loaded.config() == index.config()


def test_corrupt_and_foreign_files(tmp_path, data):
    x, _ = data
    index = VectorIndex(8)
    index.add(x)
    path = tmp_path / "idx.safetensors"
    index.save(path)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="checksum"):
        VectorIndex.load(path)
    from metrix.io import save_tensors
    import torch

    save_tensors(tmp_path / "other.safetensors", {"a": torch.zeros(1)})
    with pytest.raises(CorruptFileError, match="not a metrix vector index"):
        VectorIndex.load(tmp_path / "other.safetensors")
    save_tensors(tmp_path / "future.safetensors", {"a": torch.zeros(1)}, {"kind": "metrix.VectorIndex", "index_format": "9"})
    with pytest.raises(CorruptFileError, match="index format '9'"):
        VectorIndex.load(tmp_path / "future.safetensors")


def test_bad_input(data):
    x, q = data
    index = VectorIndex(8)
    with pytest.raises(ValueError, match="empty"):
        index.search(q, k=1)
    with pytest.raises(ValueError, match=r"shape \(n, 8\).*\(4, 7\)"):
        index.add(np.zeros((4, 7), dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        index.add(np.full((2, 8), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="duplicate ids"):
        index.add(x[:2], ids=[5, 5])
    index.add(x[:3], ids=[1, 2, 3])
    with pytest.raises(ValueError, match=r"already in the index: \[2\]"):
        index.add(x[3:5], ids=[2, 9])
    assert len(index) == 3  # the failed add changed nothing
    with pytest.raises(ValueError, match="k must be between 1 and the index size 3"):
        index.search(q, k=4)
    with pytest.raises(KeyError, match=r"\[42\]"):
        index.remove([1, 42])
    assert len(index) == 3  # nothing removed
    with pytest.raises(ValueError, match=r"\(n, 8\).*\(2, 3\)"):
        index.search(np.zeros((2, 3)), k=1)
    with pytest.raises(ValueError, match="unknown metric .hamming. for a vector index; choose one of euclidean, sqeuclidean"):
        VectorIndex(8, metric="hamming")


def test_concurrent_add_and_search_is_safe(data):
    x, q = data
    index = VectorIndex(8)
    index.add(x[:10])
    errors = []

    def writer():
        try:
            for i in range(10, 300, 10):
                index.add(x[i : i + 10])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader():
        try:
            for _ in range(50):
                d, ids = index.search(q, k=5)
                assert (ids >= 0).all() and np.isfinite(d).all()
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(index) == 300


@needs_faiss
@pytest.mark.parametrize("spec", ["Flat", "HNSW16", "IVF8,Flat", "IVF8,PQ4x4"])
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine", "dot"])
def test_faiss_backends_agree_with_exact(data, spec, metric):
    x, q = data
    exact = VectorIndex(8, metric=metric)
    approx = VectorIndex(8, metric=metric, backend="faiss", faiss_index=spec, nprobe=8, ef_search=200)
    for idx in (exact, approx):
        idx.add(x, ids=np.arange(300) + 50)
    d_e, i_e = exact.search(q, k=5)
    d_a, i_a = approx.search(q, k=5)
    recall = np.mean([len(set(a) & set(e)) / 5 for a, e in zip(i_a, i_e)])
    assert recall >= (0.5 if "PQ" in spec else 0.99)
    if "PQ" not in spec:
        np.testing.assert_allclose(d_a, d_e, rtol=1e-3, atol=1e-3)


@needs_faiss
def test_faiss_remove_add_and_range(data):
    x, q = data
    idx = VectorIndex(8, backend="faiss", faiss_index="HNSW16", ef_search=300)
    idx.add(x[:200])
    idx.search(q, k=3)
    idx.remove(list(range(0, 200, 2)))  # HNSW cannot remove: rebuilt on the next search
    idx.add(x[200:], ids=np.arange(1000, 1100))
    exact = VectorIndex(8)
    exact.add(np.concatenate([x[1:200:2], x[200:]]), ids=np.concatenate([np.arange(1, 200, 2), np.arange(1000, 1100)]))
    np.testing.assert_array_equal(idx.search(q, k=3)[1], exact.search(q, k=3)[1])
    for (d1, i1), (d2, i2) in zip(idx.range_search(q, 2.5), exact.range_search(q, 2.5)):
        assert set(i1.tolist()) == set(i2.tolist())


@needs_faiss
def test_faiss_errors():
    with pytest.raises(ValueError, match="faiss cannot build"):
        VectorIndex(8, backend="faiss", faiss_index="NotAnIndex")
    idx = VectorIndex(8, backend="faiss", faiss_index="IVF64,Flat")
    idx.add(np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32))
    with pytest.raises(ValueError, match="needs at least 64 vectors"):
        idx.search(np.zeros((1, 8), dtype=np.float32), k=1)


def test_vectors_and_ids_are_copies_in_insertion_order(data):
    x, _ = data
    index = VectorIndex(8)
    index.add(x[:5], ids=[9, 3, 7, 1, 5])
    index.remove([7])
    np.testing.assert_array_equal(index.vectors(), x[[0, 1, 3, 4]])
    np.testing.assert_array_equal(index.ids, [9, 3, 1, 5])
    index.vectors()[0] = 99.0
    index.ids[0] = -1
    np.testing.assert_array_equal(index.vectors()[0], x[0])  # the store is not writable through them
    assert index.ids[0] == 9


def test_the_exact_search_cache_follows_every_write():
    """The prepared store is kept between searches and dropped by every add and remove."""
    from metrix.index import VectorIndex

    rng = np.random.default_rng(4)
    index = VectorIndex(6)
    index.add(rng.normal(size=(300, 6)), ids=np.arange(300))
    q = rng.normal(size=(1, 6)).astype(np.float32)
    index.search(q, 1)
    kept = index._prepared
    index.search(q, 1)
    assert index._prepared is kept
    index.add(q, ids=[999])
    assert index.search(q, 1)[1][0, 0] == 999
    index.remove([999])
    assert index.search(q, 1)[1][0, 0] != 999


def test_inputs_are_scanned_for_nan_once_at_the_boundary(monkeypatch):
    """A gallery checks its probes and samples itself and tells its index so; the index checks its own
    callers' vectors and never re-scans its store (validated when added) when it prepares a search."""
    import metrix.neighbors as neighbors_module
    from metrix.apps.verification import Gallery

    rng = np.random.default_rng(0)
    gallery = Gallery(threshold=1.0)
    for name in "abc":
        gallery.enroll(name, rng.normal(size=(5, 8)).astype(np.float32))
    scans = []
    real_isfinite, real_check = np.isfinite, neighbors_module.check_embeddings
    monkeypatch.setattr(np, "isfinite", lambda a: scans.append(a.shape) or real_isfinite(a))
    monkeypatch.setattr(neighbors_module, "check_embeddings", lambda x, n: scans.append(n) or real_check(x, n))
    probes = rng.normal(size=(4, 8)).astype(np.float32)
    expected = gallery.identify(probes, k=2)
    assert scans == [(4, 8)]  # the probes, once; not the store
    gallery.enroll("d", rng.normal(size=(2, 8)).astype(np.float32))
    gallery.identify(probes, k=2)
    assert scans == [(4, 8), (2, 8), (4, 8)]  # after a write the store is prepared again without a scan
    bad = probes.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="probes contain NaN"):
        gallery.identify(bad)
    scans.clear()
    index = VectorIndex(8)
    index.add(rng.normal(size=(10, 8)).astype(np.float32))
    index.search(probes, k=3)
    assert scans == [(10, 8), (4, 8)]  # a direct caller's vectors and queries are checked by the index, once each
    with pytest.raises(ValueError, match="NaN or inf"):
        index.search(bad, k=1)
    assert len(expected) == 4
