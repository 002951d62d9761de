import numpy as np
import pytest
import torch

from metrix.evaluation import clustering_metrics, knn_accuracy, retrieval_metrics

pml_calc = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
from pytorch_metric_learning.distances import LpDistance  # noqa: E402
from pytorch_metric_learning.utils.inference import CustomKNN  # noqa: E402


def _pml(query, ql, ref=None, rl=None):
    calc = pml_calc.AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=CustomKNN(LpDistance(normalize_embeddings=False)),
    )
    return calc.get_accuracy(
        torch.as_tensor(query), torch.as_tensor(ql), None if ref is None else torch.as_tensor(ref),
        None if rl is None else torch.as_tensor(rl),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pml_query_is_reference(seed):
    rng = np.random.default_rng(seed)
    n_classes = 5 + seed
    labels = rng.integers(0, n_classes, size=300)
    x = rng.normal(size=(300, 8)) + labels[:, None] * 0.4  # partial structure
    ours = retrieval_metrics(x.astype(np.float32), labels)
    theirs = _pml(x.astype(np.float32), labels)
    assert ours["precision_at_1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)


def test_matches_pml_separate_reference():
    rng = np.random.default_rng(5)
    rl = rng.integers(0, 6, size=400)
    ql = rng.integers(0, 6, size=150)
    r = (rng.normal(size=(400, 12)) + rl[:, None] * 0.3).astype(np.float32)
    q = (rng.normal(size=(150, 12)) + ql[:, None] * 0.3).astype(np.float32)
    ours = retrieval_metrics(q, ql, r, rl, max_memory_mb=0.01)
    theirs = _pml(q, ql, r, rl)
    assert ours["precision_at_1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)


def test_brute_force_definitions_small():
    # hand-checkable: query 0's neighbours by distance are 1 (same), 2 (other), 3 (same)
    x = np.array([[0.0], [1.0], [2.5], [2.6], [10.0]])
    y = np.array(["a", "a", "b", "a", "b"])  # string labels work
    m = retrieval_metrics(x, y, ks=(1, 2))
    # per query (R, ranked hits):
    # q0 a R=2: 1(a) 2(b) -> rp=1/2, ap=(1)/2
    # q1 a R=2: 0(a) 2(b) -> rp=1/2, ap=1/2
    # q2 b R=1: 3(a)      -> rp=0, ap=0
    # q3 a R=2: 2(b) 1(a) -> rp=1/2, ap=(1/2)/2=1/4
    # q4 b R=1: 3(a)      -> rp=0, ap=0
    assert m["precision_at_1"] == pytest.approx(2 / 5)
    assert m["r_precision"] == pytest.approx((0.5 + 0.5 + 0 + 0.5 + 0) / 5)
    assert m["map_at_r"] == pytest.approx((0.5 + 0.5 + 0 + 0.25 + 0) / 5)
    # recall@2 (hit rate): q0 [1a,2b] yes, q1 [0a,2b] yes, q2 [3a,1a] no, q3 [2b,1a] yes, q4 [3a,2b] yes
    assert m["recall_at_2"] == pytest.approx(4 / 5)
    assert m["precision_at_2"] == pytest.approx((0.5 + 0.5 + 0 + 0.5 + 0.5) / 5)
    assert m["num_queries"] == 5


def test_lone_queries_excluded_and_label_types():
    x = np.array([[0.0], [0.1], [5.0], [9.0]])
    y = np.array([7, 7, 10**12, 3], dtype=np.int64)  # two lone classes, huge label values
    m = retrieval_metrics(x, y)
    assert m["num_queries"] == 2 and m["map_at_r"] == 1.0
    with pytest.raises(ValueError, match="no query has a same-label item"):
        retrieval_metrics(x, np.array([1, 2, 3, 4]))


def test_retrieval_bad_input():
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match="query has 4 rows but query_labels has 3"):
        retrieval_metrics(x, [0, 0, 1])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.full((4, 2), np.nan), [0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"\(4, 2\).*\(4, 3\)"):
        retrieval_metrics(x, [0, 0, 1, 1], np.zeros((4, 3)), [0, 0, 1, 1])


def test_knn_accuracy_and_ties():
    x = np.array([[0.0], [1.0], [2.0], [3.0], [100.0]])
    y = np.array([0, 1, 1, 0, 1])
    # query 0 (k=2): neighbours 1 (label 1), 2 (label 1) -> predicts 1 -> wrong
    # query 3 (k=2): neighbours 2 (1), 1 (1) -> wrong; query 4: 3(0),2(1) tie -> nearest (0) -> wrong
    # query 1: 0(0) and 2(1) tie at equal distance -> whichever is first ranked; query 2: 1(1),3(0) tie
    acc = knn_accuracy(x[:1], y[:1], x[1:], y[1:], k=2)
    assert acc == 0.0
    acc = knn_accuracy(np.array([[2.9]]), [0], x, y, k=2)  # neighbours 3 (0) then 2 (1): tie -> 0
    assert acc == 1.0
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 3, 200)
    emb = rng.normal(size=(200, 4)) + 10 * lab[:, None]
    assert knn_accuracy(emb, lab, k=5) == 1.0


def test_clustering_metrics():
    rng = np.random.default_rng(0)
    lab = np.repeat(np.arange(4), 30)
    emb = rng.normal(size=(120, 5)) * 0.1 + 5 * np.eye(5)[lab]
    m = clustering_metrics(emb, lab)
    assert m["nmi"] == pytest.approx(1.0) and m["ami"] == pytest.approx(1.0)
    noise = clustering_metrics(rng.normal(size=(120, 5)), lab)
    assert noise["nmi"] < 0.3
    with pytest.raises(ValueError, match="at least 2"):
        clustering_metrics(emb, np.zeros(120, dtype=int))


def test_approximate_evaluation_matches_exact_on_easy_data():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(20), 30)
    x = (rng.normal(size=(600, 16)) * 0.3 + rng.normal(size=(20, 16))[labels] * 3).astype(np.float32)
    exact = retrieval_metrics(x, labels)
    for spec, opts in [("Flat", {}), ("HNSW16", {"ef_search": 256}), ("IVF16,Flat", {"nprobe": 16})]:
        approx = retrieval_metrics(x, labels, approximate=spec, approximate_options=opts)
        for key in ("precision_at_1", "r_precision", "map_at_r"):
            assert approx[key] == pytest.approx(exact[key], abs=1e-6), (spec, key)
    q = x[::7]
    sep = retrieval_metrics(q, labels[::7], x, labels, approximate="Flat")
    assert sep["precision_at_1"] == pytest.approx(retrieval_metrics(q, labels[::7], x, labels)["precision_at_1"])


def test_progress_labels_change_nothing_but_the_display():
    """A progress label shows a bar with a total on a terminal; off a terminal (logs, pipes, tests) and without
    a label there is none, and the results are the same either way."""
    from metrix._validation import progress_bar

    assert progress_bar(10, None).disable and progress_bar(10, "phase").disable  # not a terminal here
    x, y = np.random.default_rng(0).normal(size=(200, 8)), np.arange(200) % 5
    assert retrieval_metrics(x, y, progress="retrieval") == retrieval_metrics(x, y)
