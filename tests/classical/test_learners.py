"""Closed-form learners against their definitions; properties every learner shares; bad input."""

import numpy as np
import pytest
from sklearn.covariance import ledoit_wolf
from sklearn.datasets import load_digits
from sklearn.neighbors import KNeighborsClassifier

from metrix.classical import (
    ESTIMATORS, FDA, ITML, LFDA, MMC, RCA, Covariance, MahalanobisDistance,
    pair_indices_from_labels, pairs_from_labels, triplet_indices_from_labels,
)

from . import reference as R


def blobs(seed=0, n=90, d=5, classes=3):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    X = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d)
    X[:, 0] += 3 * y
    return X, y


def target_for(name, X, y):
    return X[:, 0] if name == "MLKR" else y


def test_covariance_is_inverse_covariance():
    X, _ = blobs()
    M = Covariance(shrinkage=0).fit(X).get_mahalanobis_matrix()
    np.testing.assert_allclose(M, np.linalg.inv(np.cov(X, rowvar=False, bias=True)), rtol=1e-8)
    M_lw = Covariance().fit(X).get_mahalanobis_matrix()
    np.testing.assert_allclose(M_lw, np.linalg.inv(ledoit_wolf(X)[0]), rtol=1e-8)


def test_rca_whitens_the_within_class_covariance():
    X, y = blobs(1)
    M = RCA(regularization=0).fit(X, y).get_mahalanobis_matrix()
    C = np.zeros((X.shape[1],) * 2)
    for c in np.unique(y):  # Bar-Hillel et al.: Ĉ = (1/N) Σ_chunklets Σ (x − m_c)(x − m_c)ᵀ
        for x in X[y == c]:
            r = x - X[y == c].mean(0)
            C += np.outer(r, r) / len(X)
    np.testing.assert_allclose(M, np.linalg.inv(C), rtol=1e-7)


@pytest.mark.parametrize("k", [2, 7])
def test_lfda_solves_the_local_fisher_eigenproblem(k):
    from scipy.linalg import eigh

    X, y = blobs(2, n=30, d=4)
    S_w, S_b = R.lfda_scatters(X, y, k)
    vals, vecs = eigh(S_b, S_w)
    vals, vecs = vals[::-1][:2], vecs[:, ::-1][:, :2]
    expected = (vecs * np.sqrt(vals)).T
    ours = LFDA(n_components=2, k=k, regularization=0).fit(X, y).components_
    # same metric up to the sign of each direction
    np.testing.assert_allclose(ours.T @ ours, expected.T @ expected, rtol=1e-6, atol=1e-9)


def test_fda_difference_is_the_trace_constrained_optimum():
    X, y = blobs(3, n=40, d=4)
    d = X.shape[1]
    S_s, S_d, n_s, n_d = np.zeros((d, d)), np.zeros((d, d)), 0, 0
    for i in range(len(X)):  # mean outer products over ordered pairs
        for j in range(len(X)):
            if i == j:
                continue
            o = np.outer(X[i] - X[j], X[i] - X[j])
            if y[i] == y[j]:
                S_s, n_s = S_s + o, n_s + 1
            else:
                S_d, n_d = S_d + o, n_d + 1
    G = S_s / n_s - S_d / n_d
    fda = FDA(n_components=1).fit(X, y)
    W = fda.get_mahalanobis_matrix()
    assert np.trace(W) == pytest.approx(1.0)
    # the optimum of tr(W G) over {W ⪰ 0, tr W = 1} is the smallest eigenvalue of G
    assert np.trace(W @ G) == pytest.approx(np.linalg.eigvalsh(G)[0], rel=1e-8)
    rng = np.random.default_rng(0)
    for _ in range(50):
        B = rng.normal(size=(d, d))
        W_rand = B.T @ B / np.trace(B.T @ B)
        assert np.trace(W @ G) <= np.trace(W_rand @ G) + 1e-12
    default = FDA().fit(X, y)
    assert default.components_.shape[0] == int((np.linalg.eigvalsh(G) < 0).sum())


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_metric_is_psd_and_consistent(name):
    X, y = blobs(4)
    est = ESTIMATORS[name]().fit(X, target_for(name, X, y))
    M = est.get_mahalanobis_matrix()
    np.testing.assert_allclose(M, M.T)
    assert np.linalg.eigvalsh(M).min() > -1e-9 * max(1.0, np.abs(M).max())
    pairs = np.stack([X[:10], X[10:20]], axis=1)
    d = est.pair_distance(pairs)
    diff = X[:10] - X[10:20]
    np.testing.assert_allclose(d, np.sqrt(np.einsum("ij,jk,ik->i", diff, M, diff)), rtol=1e-8)
    metric = est.get_metric()
    assert isinstance(metric, MahalanobisDistance)
    assert metric(X[0], X[10]) == pytest.approx(d[0])
    knn = KNeighborsClassifier(3, metric=metric).fit(X, y)
    knn_t = KNeighborsClassifier(3).fit(est.transform(X), y)
    np.testing.assert_array_equal(knn.predict(X[:15]), knn_t.predict(est.transform(X[:15])))


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_rank_deficient_digits(name):
    """digits has constant pixels; metric-learn's RCA and LFDA fail on it."""
    X, y = load_digits(return_X_y=True)
    X, y = X[:400].astype(float), y[:400]
    assert (X.std(0) == 0).any()
    X = np.hstack([X, X[:, 10:11]])  # and a duplicated column
    cls = ESTIMATORS[name]
    est = cls(**({"random_state": 0} if "random_state" in cls().get_params() else {}))
    Z = est.fit(X, target_for(name, X, y)).transform(X)
    assert np.isfinite(Z).all()
    acc = KNeighborsClassifier(3).fit(Z[:300], y[:300]).score(Z[300:], y[300:])
    # unsupervised whitening and Xing et al.'s MMC objective (sum of dissimilar distances) are
    # weaker k-NN metrics on digits than the discriminative learners
    assert acc > {"MMC": 0.7, "Covariance": 0.85}.get(name, 0.9), acc


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_bad_input(name):
    X, y = blobs(5)
    cls = ESTIMATORS[name]
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cls().fit(bad, target_for(name, X, y))
    if name not in ("Covariance", "MLKR"):
        with pytest.raises(ValueError, match="two classes"):
            cls().fit(X, np.zeros(len(X)))
    est = cls().fit(X, target_for(name, X, y))
    with pytest.raises(ValueError, match="features"):
        est.transform(X[:, :3])
    with pytest.raises(ValueError, match="pairs must have shape"):
        est.pair_distance(X[:4])
    if "n_components" in est.get_params():
        with pytest.raises(ValueError, match="n_components"):
            cls(n_components=X.shape[1] + 1).fit(X, target_for(name, X, y))


def test_bad_hyper_parameters():
    X, y = blobs()
    from metrix.classical import LMNN, NCA

    with pytest.raises(ValueError, match="init"):
        NCA(init="nonsense").fit(X, y)
    with pytest.raises(ValueError, match="shape"):
        NCA(init=np.eye(3)).fit(X, y)
    with pytest.raises(ValueError, match="regularization"):
        LMNN(regularization=2).fit(X, y)
    with pytest.raises(ValueError, match="bounds"):
        ITML(bounds=(5, 1)).fit(X, y)
    with pytest.raises(ValueError, match="prior"):
        ITML(prior=-np.eye(5)).fit(X, y)
    with pytest.raises(ValueError, match="objective"):
        FDA(objective="x").fit(X, y)
    with pytest.raises(ValueError, match="shrinkage"):
        Covariance(shrinkage=2).fit(X)
    with pytest.raises(ValueError, match="constant"):
        Covariance().fit(np.ones((10, 3)))


@pytest.mark.parametrize("cls", [ITML, MMC])
def test_pair_learner_from_explicit_pairs(cls):
    X, y = blobs(6, n=120)
    pairs, labels = pairs_from_labels(X, y, 300, random_state=0)
    est = cls(random_state=0).fit_pairs(pairs, labels)
    assert est.n_features_in_ == X.shape[1]
    test_pairs, test_labels = pairs_from_labels(X, y, 200, random_state=1)
    from sklearn.metrics import roc_auc_score

    euclidean = np.linalg.norm(test_pairs[:, 0] - test_pairs[:, 1], axis=1)
    assert est.score(test_pairs, test_labels) > roc_auc_score(test_labels, -euclidean) + 0.03
    pred = est.predict(test_pairs)
    assert set(np.unique(pred)) <= {-1, 1}
    np.testing.assert_array_equal(pred == 1, est.pair_distance(test_pairs) <= est.threshold_)
    np.testing.assert_allclose(est.decision_function(test_pairs), -est.pair_distance(test_pairs))
    # calibration: accuracy-optimal threshold, then a false-accept-rate target
    est.calibrate_threshold(test_pairs, test_labels)
    best = np.mean(est.predict(test_pairs) == test_labels)
    for t in np.linspace(0, est.pair_distance(test_pairs).max(), 50):
        assert np.mean(np.where(est.pair_distance(test_pairs) <= t, 1, -1) == test_labels) <= best + 1e-12
    est.calibrate_threshold(test_pairs, test_labels, strategy="fpr", max_fpr=0.05)
    accepted_negatives = np.mean(est.predict(test_pairs)[test_labels == -1] == 1)
    assert accepted_negatives <= 0.05
    with pytest.raises(ValueError, match="pair labels"):
        est.fit_pairs(pairs, (labels > 0).astype(int))
    with pytest.raises(ValueError, match="both"):
        est.fit_pairs(pairs[labels == 1], labels[labels == 1])
    bad = pairs.copy()
    bad[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinity"):
        est.fit_pairs(bad, labels)
    with pytest.raises(ValueError, match="features"):
        est.predict(test_pairs[:, :, :2])


def test_pair_and_triplet_helpers():
    y = np.array(["a"] * 5 + ["b"] * 2 + ["c"])
    idx, lab = pair_indices_from_labels(y, 500, 300, random_state=0)
    assert len(idx) == 800 and (lab == 1).sum() == 500
    assert (y[idx[lab == 1, 0]] == y[idx[lab == 1, 1]]).all() and (idx[:, 0] != idx[:, 1]).all()
    assert (y[idx[lab == -1, 0]] != y[idx[lab == -1, 1]]).all()
    assert "c" not in set(y[idx[lab == 1, 0]])  # a singleton class has no similar pair
    again, _ = pair_indices_from_labels(y, 500, 300, random_state=0)
    np.testing.assert_array_equal(idx, again)
    t = triplet_indices_from_labels(y, 200, random_state=0)
    assert (y[t[:, 0]] == y[t[:, 1]]).all() and (y[t[:, 0]] != y[t[:, 2]]).all() and (t[:, 0] != t[:, 1]).all()
    with pytest.raises(ValueError, match="two classes"):
        pair_indices_from_labels(np.zeros(5), 3)
    with pytest.raises(ValueError, match="no class has two samples"):
        pair_indices_from_labels(np.arange(5), 3)
