"""Saving/loading fitted learners (no pickle) and the fit-linear / transform-linear commands."""

import numpy as np
import pytest
from typer.testing import CliRunner

from metrix.classical import ESTIMATORS, ITML, NCA, load_estimator, save_estimator
from metrix.cli import app
from metrix.io import CorruptFileError

from .test_learners import blobs, target_for

runner = CliRunner()


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_round_trip(tmp_path, name):
    X, y = blobs(7)
    est = ESTIMATORS[name]().fit(X, target_for(name, X, y))
    path = save_estimator(est, tmp_path / "m.safetensors", extra={"note": "x"})
    loaded, extra = load_estimator(path, return_extra=True)
    assert type(loaded) is type(est) and extra == {"note": "x"}
    assert loaded.get_params() == est.get_params()
    np.testing.assert_array_equal(loaded.transform(X), est.transform(X))
    if hasattr(est, "threshold_"):
        np.testing.assert_array_equal(loaded.predict(np.stack([X[:5], X[5:10]], 1)),
                                      est.predict(np.stack([X[:5], X[5:10]], 1)))


def test_array_hyper_parameters_survive(tmp_path):
    X, y = blobs(8)
    init = np.random.default_rng(0).normal(size=(2, X.shape[1]))
    est = NCA(n_components=2, init=init, max_iter=3).fit(X, y)
    loaded = load_estimator(save_estimator(est, tmp_path / "n.safetensors"))
    np.testing.assert_array_equal(loaded.init, init)
    itml = ITML(bounds=(1.0, 9.0), random_state=0).fit(X, y)
    assert load_estimator(save_estimator(itml, tmp_path / "i.safetensors")).bounds == (1.0, 9.0)


def test_corrupt_and_foreign_files_fail_loudly(tmp_path):
    X, y = blobs(9)
    path = save_estimator(NCA(max_iter=2).fit(X, y), tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError):
        load_estimator(bad)
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    with pytest.raises(CorruptFileError):
        load_estimator(tmp_path / "junk.safetensors")
    from metrix.io import save_tensors
    import torch

    save_tensors(tmp_path / "other.safetensors", {"w": torch.zeros(2)})
    with pytest.raises(CorruptFileError, match="not a metrix classical"):
        load_estimator(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        load_estimator(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError):
        from sklearn.decomposition import PCA

        save_estimator(PCA().fit(X), tmp_path / "pca.safetensors")


def test_fit_linear_and_transform_cli(tmp_path):
    model = tmp_path / "lfda"  # --out is the run folder
    result = runner.invoke(app, ["fit-linear", "LFDA", "--data", "digits", "--out", str(model),
                                 "--n-components", "12", "--param", "k=5"])
    assert result.exit_code == 0, result.output
    assert "3-NN test accuracy" in result.output and "learned metric" in result.output
    est, extra = load_estimator(model / "model.safetensors", return_extra=True)
    assert est.k == 5 and est.components_.shape == (12, 64)
    assert extra["knn_accuracy_after"] > 0.9
    out = tmp_path / "z.npz"
    result = runner.invoke(app, ["transform-linear", str(model), "--data", "digits", "--out", str(out)])
    assert result.exit_code == 0, result.output
    z = np.load(out)
    assert z["embeddings"].shape == (1797, 12) and len(z["labels"]) == 1797
    # the saved model works on raw pixels: same neighbours as the standardised pipeline it was fitted in
    from sklearn.datasets import load_digits
    from sklearn.neighbors import KNeighborsClassifier

    from metrix.datasets import stratified_split

    X, y = load_digits(return_X_y=True)
    train, test = stratified_split(y, 0.3, 0)
    acc = KNeighborsClassifier(3).fit(z["embeddings"][train], y[train]).score(z["embeddings"][test], y[test])
    assert acc == pytest.approx(extra["knn_accuracy_after"], abs=2e-3)
    # the run folder is not written over: a second fit into it is refused before fitting
    again = runner.invoke(app, ["fit-linear", "NCA", "--data", "digits", "--out", str(model)])
    assert again.exit_code == 2 and "is not an empty folder" in again.output


def test_fit_linear_errors():
    result = runner.invoke(app, ["fit-linear", "nope"])
    assert result.exit_code == 2 and "unknown algorithm" in result.output
    result = runner.invoke(app, ["fit-linear", "nca", "--param", "bad"])
    assert result.exit_code == 2 and "key=value" in result.output
    result = runner.invoke(app, ["fit-linear", "itml", "--n-components", "5"])
    assert result.exit_code == 2 and "ITML has no parameter 'n_components'" in result.output
    result = runner.invoke(app, ["fit-linear", "nca", "--param", "colour=1"])
    assert result.exit_code == 2 and "no parameter 'colour'" in result.output
    result = runner.invoke(app, ["fit-linear", "nca", "--data", "/no/such/file.npz"])
    assert result.exit_code == 2
