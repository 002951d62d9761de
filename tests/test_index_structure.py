"""The faiss structure of a VectorIndex survives removals, is built outside the lock (searches and writes
go on meanwhile, and what they changed is in the structure once it is installed), takes search parameters
per call, and is saved with its slot table."""

import threading

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from metrix import ann  # noqa: E402
from metrix.index import VectorIndex  # noqa: E402


def _brute(index, queries, k):
    vectors, ids = index.vectors(), index.ids
    d = ((queries[:, None, :] - vectors[None]) ** 2).sum(-1)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return ids[order]


@pytest.mark.parametrize("factory", ["HNSW32", "IVF8,Flat", "Flat"])
def test_removals_keep_the_structure_and_never_return_removed_ids(factory):
    rng = np.random.default_rng(0)
    index = VectorIndex(16, backend="faiss", faiss_index=factory, nprobe=8, ef_search=128)
    index.add(rng.normal(size=(2000, 16)))
    q = rng.normal(size=(50, 16)).astype(np.float32)
    index.search(q, 5)
    structure = index._ann
    removed = rng.choice(2000, 600, replace=False)
    index.remove(removed)
    _, ids = index.search(q, 10)
    assert index._ann is structure  # not rebuilt
    assert not np.isin(ids, removed).any()
    assert np.isin(ids[ids >= 0], index.ids).all()
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, _brute(index, q, 10))])
    assert recall >= 0.9
    index.remove(np.setdiff1d(index.ids, index.ids[:300]))  # most slots now dead: rebuilt at the next search
    index.search(q, 5)
    assert index._ann is not structure and index._ann.live == 300 and not index._ann.dead


def test_the_structure_is_built_outside_the_lock(monkeypatch):
    """While the first build runs, another thread searches (answered exactly), adds and removes; the
    installed structure then holds exactly the store, and searches match brute force."""
    rng = np.random.default_rng(1)
    index = VectorIndex(8, backend="faiss", faiss_index="Flat")
    index.add(rng.normal(size=(500, 8)), ids=np.arange(500))
    started, release = threading.Event(), threading.Event()
    real_build = ann.FaissStructure.build

    def slow_build(*args, **kwargs):
        started.set()
        assert release.wait(30)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(ann.FaissStructure, "build", slow_build)
    q = rng.normal(size=(20, 8)).astype(np.float32)
    builder = threading.Thread(target=index.search, args=(q, 3))
    builder.start()
    assert started.wait(30)
    _, during = index.search(q, 3)  # not blocked: exact answers while the structure is built
    np.testing.assert_array_equal(during, _brute(index, q, 3))
    index.add(rng.normal(size=(50, 8)), ids=np.arange(1000, 1050))
    index.remove(np.arange(0, 500, 5))
    index.add(rng.normal(size=(1, 8)), ids=[7777])
    index.remove([7777])
    release.set()
    builder.join(30)
    assert index._ann is not None and index._ann.live == len(index)
    _, after = index.search(q, 3)
    np.testing.assert_array_equal(after, _brute(index, q, 3))


def test_search_parameters_are_per_call():
    rng = np.random.default_rng(2)
    index = VectorIndex(16, backend="faiss", faiss_index="IVF32,Flat", nprobe=1)
    index.add(rng.normal(size=(3000, 16)))
    q = rng.normal(size=(100, 16)).astype(np.float32)
    _, narrow = index.search(q, 10)
    _, wide = index.search(q, 10, nprobe=32)
    truth = _brute(index, q, 10)
    assert np.mean(wide == truth) == 1.0 and np.mean(narrow == truth) < 1.0
    _, again = index.search(q, 10)
    np.testing.assert_array_equal(again, narrow)  # the call's nprobe did not stay on the index
    with pytest.raises(ValueError, match="nprobe"):
        index.search(q, 10, nprobe=0)


def test_save_and_load_keep_the_slot_table(tmp_path):
    rng = np.random.default_rng(3)
    index = VectorIndex(8, backend="faiss", faiss_index="HNSW16")
    index.add(rng.normal(size=(400, 8)))
    q = rng.normal(size=(10, 8)).astype(np.float32)
    index.search(q, 3)
    index.remove(np.arange(0, 400, 3))
    index.add(rng.normal(size=(20, 8)), ids=np.arange(5000, 5020))
    before = index.search(q, 5)
    index.save(tmp_path / "i.idx")
    loaded = VectorIndex.load(tmp_path / "i.idx")
    assert loaded._ann is not None and loaded._ann.dead == index._ann.dead
    after = loaded.search(q, 5)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0], rtol=1e-6)
