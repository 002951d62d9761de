"""OOD detectors against their definitions, metrics against brute force, bad input."""

import numpy as np
import pytest
from sklearn.covariance import ledoit_wolf

from metrix.apps.ood import KNNDetector, MahalanobisDetector, max_softmax_score, ood_metrics


def data(seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(3, 6)) * 4
    y = np.arange(300) % 3
    x = means[y] + rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) * 0.5
    return rng, x, y


def test_mahalanobis_score_is_the_definition():
    rng, x, y = data()
    det = MahalanobisDetector().fit(x, y)
    mu = np.stack([x[y == c].mean(0) for c in range(3)])
    centred = x - mu[y]
    P = np.linalg.inv(ledoit_wolf(centred, assume_centered=True)[0])
    q = rng.normal(size=(10, 6)) * 3
    expected = [min((v - m) @ P @ (v - m) for m in mu) for v in q]
    np.testing.assert_allclose(det.score(q), expected, rtol=1e-8)
    exact = MahalanobisDetector(shrinkage=0).fit(x, y)
    P0 = np.linalg.inv(centred.T @ centred / len(x))
    np.testing.assert_allclose(exact.score(q), [min((v - m) @ P0 @ (v - m) for m in mu) for v in q], rtol=1e-8)


def test_knn_score_is_kth_neighbour_distance():
    rng, x, _ = data(1)
    q = rng.normal(size=(7, 6))
    det = KNNDetector(k=5, normalize=False).fit(x)
    expected = np.sort(np.linalg.norm(q[:, None] - x[None], axis=2), axis=1)[:, 4]
    np.testing.assert_allclose(det.score(q), expected, rtol=1e-5)
    normed = KNNDetector(k=1).fit(x)
    xn, qn = x / np.linalg.norm(x, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)
    np.testing.assert_allclose(normed.score(q), np.linalg.norm(qn[:, None] - xn[None], axis=2).min(1), rtol=1e-5, atol=1e-6)


def test_detectors_separate_and_calibrate():
    rng, x, y = data(2)
    far = rng.normal(size=(100, 6)) * 4 + 30
    for det in (MahalanobisDetector().fit(x, y), KNNDetector(k=3).fit(x)):
        m = ood_metrics(det.score(x[:150]), det.score(far))
        assert m["auroc"] > 0.95
        det.calibrate(x, tpr=0.95)
        assert np.mean(~det.predict(x)) == pytest.approx(0.95, abs=0.01)
        assert det.predict(far).mean() > 0.9


def test_ood_metrics_brute_force():
    rng = np.random.default_rng(3)
    s_in, s_out = rng.normal(0, 1, 400), rng.normal(1.5, 1, 300)
    m = ood_metrics(s_in, s_out)
    assert m["auroc"] == pytest.approx(np.mean(s_out[:, None] > s_in[None, :]))
    t = np.quantile(s_in, 0.95)
    assert m["fpr_at_95_tpr"] == pytest.approx(np.mean(s_out <= t))
    assert np.all(max_softmax_score(np.array([[10.0, 0, 0], [1, 1, 1]])) == pytest.approx([-0.99990920, -1 / 3], rel=1e-6))


def test_bad_input():
    rng, x, y = data()
    with pytest.raises(ValueError, match="NaN"):
        MahalanobisDetector().fit(np.full((4, 2), np.nan), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="labels"):
        MahalanobisDetector().fit(x, y[:10])
    with pytest.raises(ValueError, match="singular"):
        MahalanobisDetector(shrinkage=0).fit(np.c_[x, x[:, :1]], y)  # rank-deficient without shrinkage
    det = MahalanobisDetector().fit(np.c_[x, x[:, :1]], y)  # ... and with Ledoit–Wolf it works
    assert np.isfinite(det.score(np.c_[x, x[:, :1]][:5])).all()
    with pytest.raises(ValueError, match="dimension"):
        det.score(x[:3])
    with pytest.raises(ValueError, match="calibrate"):
        KNNDetector().fit(x).predict(x[:2])
    with pytest.raises(ValueError, match="k="):
        KNNDetector(k=500).fit(x)
    with pytest.raises(ValueError, match="fit"):
        KNNDetector().score(x)
    with pytest.raises(ValueError, match="need"):
        ood_metrics([], [1.0])


def test_ood_cli(tmp_path):
    import json

    from sklearn.datasets import load_digits
    from typer.testing import CliRunner

    from metrix.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["train", "--epochs", "2", "--out", str(tmp_path / "run"), "--no-progress"])
    assert r.exit_code == 0, r.output
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    np.savez(tmp_path / "fit.npz", X=X[(y < 5)][:500], y=y[y < 5][:500])
    np.savez(tmp_path / "in.npz", X=X[(y < 5)][500:], y=y[y < 5][500:])
    np.save(tmp_path / "noise.npy", np.random.default_rng(0).uniform(0, 16, size=(200, 64)).astype(np.float32))
    for detector, metric in (("mahalanobis", "euclidean"), ("knn", "euclidean"), ("knn", "cosine")):
        r = runner.invoke(app, ["ood", str(tmp_path / "run"), "--fit-data", str(tmp_path / "fit.npz"),
                                "--in-data", str(tmp_path / "in.npz"), "--ood-data", str(tmp_path / "noise.npy"),
                                "--detector", detector, "--metric", metric, "--json"])
        assert r.exit_code == 0, r.output
        out = json.loads(r.output)
        assert out["auroc"] > 0.9 and out["num_ood"] == 200
    r = runner.invoke(app, ["ood", str(tmp_path / "run"), "--fit-data", str(tmp_path / "fit.npz"),
                            "--in-data", str(tmp_path / "in.npz"), "--ood-data", str(tmp_path / "noise.npy"),
                            "--detector", "lof"])
    assert r.exit_code == 2 and "detector" in r.output
