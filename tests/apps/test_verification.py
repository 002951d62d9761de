"""Verification metrics against brute-force definitions; the Gallery's enrol/verify/identify/save."""

import numpy as np
import pytest

from metrix.apps.verification import Gallery, calibrate_threshold, plot_roc, roc_curve, verification_metrics
from metrix.io import CorruptFileError


def scored_pairs(seed=0, n_genuine=300, n_impostor=3000):
    rng = np.random.default_rng(seed)
    d = np.r_[rng.normal(1.0, 0.4, n_genuine), rng.normal(2.0, 0.5, n_impostor)]
    same = np.r_[np.ones(n_genuine, bool), np.zeros(n_impostor, bool)]
    return d, same


def brute_rates(d, same, t):
    return np.mean(d[~same] <= t), np.mean(d[same] <= t)  # FAR, TAR


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_brute_force(seed):
    d, same = scored_pairs(seed)
    d = np.round(d, 2)  # ties
    m = verification_metrics(d, same)
    # AUC = P(genuine distance < impostor distance) + ½ P(tie)
    g, i = d[same][:, None], d[~same][None, :]
    assert m["roc_auc"] == pytest.approx(np.mean(g < i) + 0.5 * np.mean(g == i), abs=1e-12)
    for target in (1e-1, 1e-2, 1e-3):
        best = max((brute_rates(d, same, t)[1] for t in np.r_[d.min() - 1, np.unique(d)]
                    if brute_rates(d, same, t)[0] <= target), default=0.0)
        assert m[f"tar_at_far_{target:g}"] == pytest.approx(best)
    candidates = [(abs(brute_rates(d, same, t)[0] - (1 - brute_rates(d, same, t)[1])), t) for t in np.unique(d)]
    t_eer = min(candidates)[1]
    far, tar = brute_rates(d, same, t_eer)
    assert m["eer"] == pytest.approx((far + 1 - tar) / 2, abs=1e-3)


def test_roc_and_threshold_calibration():
    d, same = scored_pairs(3)
    far, tar, thr = roc_curve(d, same)
    assert far[0] == tar[0] == 0 and far[-1] == tar[-1] == 1
    assert (np.diff(far) >= 0).all() and (np.diff(tar) >= 0).all()
    t = calibrate_threshold(d, same)
    acc = np.mean((d <= t) == same)
    for other in np.linspace(d.min(), d.max(), 200):
        assert np.mean((d <= other) == same) <= acc + 1e-12
    t01 = calibrate_threshold(d, same, target_far=0.01)
    assert np.mean(d[~same] <= t01) <= 0.01
    assert np.mean(d[~same] <= np.nextafter(d[d > t01].min(), np.inf)) > 0.01  # largest such threshold


def test_bad_scores():
    with pytest.raises(ValueError, match="both"):
        verification_metrics([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="NaN"):
        verification_metrics([np.nan, 0.2], [True, False])
    with pytest.raises(ValueError, match="flags"):
        roc_curve([0.1, 0.2, 0.3], [True, False])
    with pytest.raises(ValueError, match="target_far"):
        calibrate_threshold([0.1, 0.2], [True, False], target_far=2)


def test_plot_roc(tmp_path):
    pytest.importorskip("matplotlib")
    d, same = scored_pairs()
    far, tar, _ = roc_curve(d, same)
    assert plot_roc({"x": (far, tar)}, tmp_path / "roc.png").stat().st_size > 1000


def test_gallery_enrol_verify_identify(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 8)) * 3
    g = Gallery(threshold=2.0)
    for i, c in enumerate(centres):
        g.enroll(f"p{i}", c + 0.3 * rng.normal(size=(3, 8)))
    g.enroll("p0", centres[0] + 0.3 * rng.normal(size=(2, 8)))  # appended
    assert len(g) == 5 and g.dim == 8
    probes = centres + 0.3 * rng.normal(size=(5, 8))
    out = g.identify(probes, k=3)
    assert [o["identity"] for o in out] == [f"p{i}" for i in range(5)]
    assert all(len(o["candidates"]) == 3 for o in out)
    stranger = rng.normal(size=(1, 8)) * 3 + 20
    assert g.identify(stranger)[0]["identity"] is None  # open set: unknown
    ok, dist = g.verify(probes[:2], "p1")
    assert ok.tolist() == [False, True]
    # nearest-sample distance is the minimum over that identity's enrolled samples
    D, names = g.distance_matrix(probes[:2])
    assert names == g.identities and D.shape == (2, 5)
    np.testing.assert_allclose(D[:, 1], dist)
    enrolled = g.samples("p1")
    assert dist[0] == pytest.approx(np.linalg.norm(enrolled - probes[0], axis=1).min(), rel=1e-5)
    cos = Gallery(metric="cosine")
    cos.enroll("a", enrolled)
    unit = enrolled / np.linalg.norm(enrolled, axis=1, keepdims=True)
    expected = (1 - unit @ (probes[0] / np.linalg.norm(probes[0]))).min()
    assert cos.distance(probes[:1], "a")[0] == pytest.approx(expected, abs=1e-6)
    mean = Gallery(match="mean")
    mean.enroll("a", enrolled)
    assert mean.distance(probes[:1], "a")[0] == pytest.approx(np.linalg.norm(enrolled.mean(0) - probes[0]), rel=1e-5)
    path = g.save(tmp_path / "g.safetensors")
    loaded = Gallery.load(path)
    assert loaded.identities == g.identities and loaded.threshold == 2.0
    assert [o["identity"] for o in loaded.identify(probes)] == [f"p{i}" for i in range(5)]
    g.remove("p4")
    assert "p4" not in g.identities
    with pytest.raises(KeyError):
        g.remove("p4")
    data = bytearray(path.read_bytes())
    data[-2] ^= 0xFF
    (tmp_path / "bad").write_bytes(bytes(data))
    with pytest.raises(CorruptFileError):
        Gallery.load(tmp_path / "bad")


def test_gallery_bad_input():
    g = Gallery()
    with pytest.raises(ValueError, match="empty"):
        g.identify(np.zeros((1, 3)))
    g.enroll("a", np.zeros((2, 3)))
    with pytest.raises(ValueError, match="dimension"):
        g.enroll("b", np.zeros((1, 4)))
    with pytest.raises(ValueError, match="NaN"):
        g.identify(np.full((1, 3), np.nan))
    with pytest.raises(ValueError, match="threshold"):
        g.verify(np.zeros((1, 3)), "a")
    with pytest.raises(KeyError):
        g.distance(np.zeros((1, 3)), "nobody")
    with pytest.raises(ValueError, match="metric"):
        Gallery(metric="manhattan")


def test_gallery_cli(tmp_path):
    import json

    from typer.testing import CliRunner

    from metrix.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["train", "--epochs", "2", "--out", str(tmp_path / "run"), "--no-progress"])
    assert r.exit_code == 0, r.output
    run, gal = str(tmp_path / "run"), str(tmp_path / "g.safetensors")
    r = runner.invoke(app, ["gallery", "identify", run, gal, "--data", "digits"])
    assert r.exit_code == 2 and "no gallery" in r.output
    r = runner.invoke(app, ["gallery", "enroll", run, gal, "--data", "digits"])
    assert r.exit_code == 0 and "enrolled 10 identities (1797 samples)" in r.output, r.output
    r = runner.invoke(app, ["gallery", "calibrate", run, gal, "--data", "digits", "--far", "0.01"])
    assert r.exit_code == 0 and "threshold" in r.output, r.output
    assert Gallery.load(gal).threshold is not None
    r = runner.invoke(app, ["gallery", "identify", run, gal, "--data", "digits", "-k", "2", "--limit", "20", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert len(out) == 20 and all(len(o["candidates"]) == 2 for o in out)
    assert np.mean([str(o["label"]) == o["identity"] for o in out]) > 0.8
    x = tmp_path / "probe.npy"
    from sklearn.datasets import load_digits

    np.save(x, load_digits().data[:3].astype(np.float32))
    r = runner.invoke(app, ["gallery", "verify", run, gal, "--data", str(x), "--identity", "0", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)[0]["accepted"] is True  # digits[0] is a 0
    r = runner.invoke(app, ["gallery", "enroll", run, gal, "--data", str(x)])
    assert r.exit_code == 2 and "--identity" in r.output
    # a new gallery takes --metric; an existing one keeps its own and says so
    cos = str(tmp_path / "cos.safetensors")
    r = runner.invoke(app, ["gallery", "enroll", run, cos, "--data", str(x), "--identity", "a", "--metric", "cosine"])
    assert r.exit_code == 0 and Gallery.load(cos).metric == "cosine", r.output
    r = runner.invoke(app, ["gallery", "enroll", run, gal, "--data", str(x), "--identity", "a", "--metric", "cosine"])
    assert r.exit_code == 2 and "compares with 'euclidean', not 'cosine'" in r.output
    r = runner.invoke(app, ["gallery", "enroll", run, str(tmp_path / "new.safetensors"), "--data", str(x),
                            "--identity", "a", "--metric", "dot"])
    assert r.exit_code == 2 and "unknown metric 'dot' for a gallery; choose one of euclidean, cosine" in r.output


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_identify_through_the_index_ranks_as_the_full_distance_matrix(metric):
    """Nearest-sample identification searches the gallery's index for k × (most samples of one identity)
    samples; its ranking and distances equal those of the full probe × identity matrix."""
    from metrix.apps.verification import Gallery

    rng = np.random.default_rng(5)
    g = Gallery(metric=metric)
    for i in range(60):
        g.enroll(f"p{i}", rng.normal(size=(1 + i % 7, 12)))
    probes = rng.normal(size=(25, 12)).astype(np.float32)
    D, names = g.distance_matrix(probes)
    with pytest.warns(UserWarning):
        got = g.identify(probes, k=5)
    for row, result in zip(D, got):
        order = np.argsort(row, kind="stable")[:5]
        assert [c["identity"] for c in result["candidates"]] == [names[j] for j in order]
        np.testing.assert_allclose([c["distance"] for c in result["candidates"]], row[order], rtol=1e-5, atol=1e-5)
