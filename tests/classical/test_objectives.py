"""Objectives against loop references from the papers, gradients against finite differences,
and optimisation: the objective decreases, ITML reaches the paper's Bregman-projection optimum."""

import numpy as np
import pytest

from metrix.classical import ITML, LMNN, MLKR, MMC, NCA
from metrix.classical.itml import itml_objective
from metrix.classical.lmnn import lmnn_objective, target_neighbors
from metrix.classical.mlkr import mlkr_objective
from metrix.classical.mmc import mmc_objective
from metrix.classical.nca import nca_objective
from metrix.classical._optimize import lbfgs

from . import reference as R


def numeric_gradient(f, L, eps=1e-6):
    g = np.zeros_like(L)
    for idx in np.ndindex(L.shape):
        step = np.zeros_like(L)
        step[idx] = eps
        g[idx] = (f(L + step) - f(L - step)) / (2 * eps)
    return g


def problem(seed, n=24, d=4, classes=3):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = np.arange(n) % classes
    y[:3] = 0  # uneven class sizes
    rng.shuffle(y)
    return rng, X, y


def pairs_of(rng, X, y, m=30):
    idx = rng.integers(0, len(X), (m, 2))
    idx = idx[idx[:, 0] != idx[:, 1]]
    return X[idx[:, 0]] - X[idx[:, 1]], np.where(y[idx[:, 0]] == y[idx[:, 1]], 1, -1)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(4, 4), (2, 4)])
def test_nca_value_and_gradient(seed, shape):
    rng, X, y = problem(seed)
    L = rng.normal(size=shape) * 0.7
    value, grad = nca_objective(L, X, y)
    assert value == pytest.approx(R.nca_loss(L, X, y), rel=1e-10)
    np.testing.assert_allclose(grad, numeric_gradient(lambda M: nca_objective(M, X, y)[0], L), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mu", [0.5, 0.2])
def test_lmnn_value_and_gradient(seed, mu):
    rng, X, y = problem(seed)
    targets = target_neighbors(X, y, 3)
    L = rng.normal(size=(3, 4)) * 0.6
    value, grad = lmnn_objective(L, X, y, targets, mu)
    assert value == pytest.approx(R.lmnn_loss(L, X, y, targets, mu), rel=1e-10)
    np.testing.assert_allclose(grad, numeric_gradient(lambda M: lmnn_objective(M, X, y, targets, mu)[0], L),
                               rtol=1e-5, atol=1e-6)


def test_lmnn_target_neighbors_are_nearest_same_class():
    rng, X, y = problem(0)
    y[0] = 7  # a singleton class has no target neighbours
    T = target_neighbors(X, y, 3)
    assert (T[0] == -1).all()
    for i in range(1, len(X)):
        same = [j for j in range(len(X)) if y[j] == y[i] and j != i]
        expected = sorted(same, key=lambda j: np.sum((X[i] - X[j]) ** 2))[: len(T[i][T[i] >= 0])]
        assert sorted(T[i][T[i] >= 0].tolist()) == sorted(expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_mlkr_value_and_gradient(seed):
    rng, X, _ = problem(seed)
    y = X[:, 0] * 2 + rng.normal(size=len(X)) * 0.1
    L = rng.normal(size=(2, 4)) * 0.5
    value, grad = mlkr_objective(L, X, y)
    assert value == pytest.approx(R.mlkr_loss(L, X, y), rel=1e-10)
    np.testing.assert_allclose(grad, numeric_gradient(lambda M: mlkr_objective(M, X, y)[0], L), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1])
def test_itml_value_and_gradient(seed):
    rng, X, y = problem(seed)
    V, labels = pairs_of(rng, X, y)
    A0 = np.eye(4) + 0.3 * np.ones((4, 4))
    L = np.linalg.cholesky(A0).T + 0.2 * rng.normal(size=(4, 4))
    args = (V, labels, np.linalg.inv(A0), 1.5, 5.0, 0.7)
    value, grad = itml_objective(L, *args)
    assert value == pytest.approx(R.itml_loss(L, V, labels, A0, 1.5, 5.0, 0.7), rel=1e-10)
    np.testing.assert_allclose(grad, numeric_gradient(lambda M: itml_objective(M, *args)[0], L), rtol=1e-5, atol=1e-6)


def test_itml_reaches_the_bregman_projection_optimum():
    """The smooth reformulation has the same minimiser as the paper's Algorithm 1."""
    rng, X, y = problem(3, n=20, d=3, classes=2)
    V, labels = pairs_of(rng, X, y, 30)
    A0 = np.eye(3)
    expected = R.itml_bregman(V, labels, A0, 1.0, 4.0, 1.0, sweeps=1500)
    result = lbfgs(lambda L: itml_objective(L, V, labels, A0, 1.0, 4.0, 1.0), np.eye(3), max_iter=2000, tol=1e-13)
    np.testing.assert_allclose(result.L.T @ result.L, expected, atol=1e-6)


@pytest.mark.parametrize("diagonal", [False, True])
def test_mmc_value_and_gradient(diagonal):
    rng, X, y = problem(0)
    V, labels = pairs_of(rng, X, y)
    param = rng.uniform(0.5, 1.5, size=4) if diagonal else rng.normal(size=(4, 4))
    L = np.diag(np.sqrt(param)) if diagonal else param
    value, grad = mmc_objective(param, V, labels, diagonal, eps=0.0)
    assert value == pytest.approx(-np.log(R.mmc_ratio(L, V, labels)), rel=1e-10)
    np.testing.assert_allclose(grad, numeric_gradient(lambda p: mmc_objective(p, V, labels, diagonal, 0.0)[0], param),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("make", [lambda: NCA(max_iter=30), lambda: LMNN(max_iter=30), lambda: MLKR(max_iter=30),
                                  lambda: ITML(random_state=0), lambda: MMC(random_state=0),
                                  lambda: MMC(diagonal=True, random_state=0)])
def test_objective_decreases(make):
    rng, X, y = problem(5, n=60, d=5)
    X[:, 0] += 2 * y  # something to learn
    est = make()
    est.fit(X, X[:, 0] if isinstance(est, MLKR) else y)
    h = np.asarray(est.objective_history_)
    assert len(h) >= 2 and np.isfinite(h).all()
    assert h[-1] < h[0]
    assert (np.diff(h) <= 1e-9 * np.abs(h[:-1]) + 1e-12).all()  # L-BFGS accepts only decreasing steps


def test_mmc_meets_xings_constraint_and_beats_identity():
    rng, X, y = problem(6, n=60, d=5)
    X[:, 1] += 3 * y
    mmc = MMC(n_constraints=300, random_state=0).fit(X, y)
    # the pairs fit used are reproducible from random_state
    from metrix.classical import pair_indices_from_labels

    idx, labels = pair_indices_from_labels(np.unique(y, return_inverse=True)[1], 300, random_state=0)
    V = X[idx[:, 0]] - X[idx[:, 1]]
    Z = V[labels == 1] @ mmc.components_.T
    assert (Z * Z).sum() == pytest.approx(1.0, rel=1e-9)
    assert R.mmc_ratio(mmc.components_, V, labels) > R.mmc_ratio(np.eye(5), V, labels)


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("rotated", [False, True])
def test_mmc_ignores_directions_only_dissimilar_pairs_vary_along(diagonal, rotated):
    """A direction with no spread inside any similar pair but some across dissimilar pairs makes Xing et al.'s
    objective unbounded (M scaled along it raises Σ_D d alone): the fit warns, leaves it out of the metric and
    optimises the rest, instead of returning entries of 1e50 and more."""
    rng = np.random.default_rng(3)
    n = 120
    V = rng.normal(size=(n, 4))
    labels = np.where(np.arange(n) % 2 == 0, 1, -1)
    V[labels == 1, 3] = 0.0  # feature 3: similar pairs never differ on it, dissimilar pairs do
    basis = np.linalg.qr(rng.normal(size=(4, 4)))[0] if rotated and not diagonal else np.eye(4)
    V = V @ basis.T  # rotated: the unbounded direction is basis[:, 3], not a feature axis
    pairs = np.stack([V, np.zeros_like(V)], axis=1)
    with pytest.warns(RuntimeWarning, match="1 direction"):
        mmc = MMC(diagonal=diagonal, random_state=0).fit_pairs(pairs, labels)
    M = mmc.get_mahalanobis_matrix()
    assert np.isfinite(M).all() and np.abs(M).max() < 1e3
    np.testing.assert_allclose(M @ basis[:, 3], 0.0, atol=1e-10)
    Z = V[labels == 1] @ mmc.components_.T
    assert (Z * Z).sum() == pytest.approx(1.0, rel=1e-9)  # Xing et al.'s constraint on the rest
    kept = np.delete(basis, 3, axis=1)  # on the bounded directions it still beats their identity metric
    assert R.mmc_ratio(mmc.components_, V, labels) > R.mmc_ratio(kept.T, V, labels)


def test_nca_matches_scikit_learn():
    from sklearn.datasets import load_iris
    from sklearn.neighbors import NeighborhoodComponentsAnalysis
    from sklearn.preprocessing import StandardScaler

    X, y = load_iris(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    ours = NCA(n_components=2, init="pca", max_iter=50, tol=1e-5, random_state=0).fit(X, y)
    theirs = NeighborhoodComponentsAnalysis(n_components=2, init="pca", random_state=0).fit(X, y)
    np.testing.assert_allclose(ours.components_, theirs.components_, rtol=1e-5, atol=1e-6)
