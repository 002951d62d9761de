"""Explanations of a similarity: exact decompositions sum to the distance, integrated gradients are complete up
to a quadrature error that shrinks with the steps, maps pass the sanity checks of Adebayo et al. (2018), and a
planted shared patch is found."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from metrix import explain as E
from metrix.distances import mahalanobis
from metrix.models import EmbeddingModel


def test_linear_decomposition_sums_exactly_to_the_squared_mahalanobis_distance():
    g = torch.Generator().manual_seed(0)
    for D, k in ((5, 5), (12, 3), (40, 40)):
        L = torch.randn(k, D, generator=g, dtype=torch.float64)
        x, y = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
        e = E.linear_contributions(L, x, y)
        d2 = float(mahalanobis(x[None], y[None], L=L, squared=True)[0, 0])
        assert float(e.squared_distance) == pytest.approx(d2, rel=1e-12)
        assert float(e.per_feature.sum()) == pytest.approx(d2, rel=1e-10, abs=1e-12)
        assert float(e.per_direction.sum()) == pytest.approx(d2, rel=1e-10) and bool((e.per_direction >= 0).all())
        # a feature where x and y agree contributes nothing
        y2 = y.clone()
        y2[3] = x[3]
        assert float(E.linear_contributions(L, x, y2).per_feature[3]) == 0.0
    with pytest.raises(ValueError, match="need L"):
        E.linear_contributions(torch.eye(3), torch.zeros(4), torch.zeros(4))


def _model(seed=0, input_shape=(256,), backbone="mlp"):
    torch.manual_seed(seed)
    kw = {"hidden_dims": (64,)} if backbone == "mlp" else {}
    return EmbeddingModel(backbone, 16, input_shape=input_shape, backbone_kwargs=kw).eval()


def test_integrated_gradients_are_complete_up_to_a_quadrature_error_that_shrinks():
    model = _model()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(256, generator=g), torch.rand(256, generator=g)
    errors = []
    for steps in (8, 32, 256):
        a = E.integrated_gradients(model, x, y, steps=steps)
        assert a.values.shape == x.shape
        delta = a.similarity - a.baseline_similarity
        errors.append(a.completeness_error / abs(delta))
    assert errors[-1] < 0.01 and errors[-1] < errors[0]  # stated tolerance: 1% of s(x, y) − s(x0, y) at 256 steps
    same = E.integrated_gradients(model, x, x, steps=64)
    assert same.similarity == pytest.approx(0.0, abs=1e-3)  # −d(x, x) = 0 up to the float32 embedding
    with pytest.raises(ValueError, match="steps"):
        E.integrated_gradients(model, x, y, steps=1)
    with pytest.raises(ValueError, match="finite"):
        E.integrated_gradients(model, x * float("nan"), y)


def _rank_correlation(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a.ravel())), np.argsort(np.argsort(b.ravel()))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_maps_change_with_randomised_weights_and_with_the_other_input():
    """Adebayo et al. 2018: a map that stays the same when the model's weights are randomised, or when the
    other input changes, explains nothing about the model or the pair."""
    g = torch.Generator().manual_seed(2)
    x, y, z = (torch.rand(256, generator=g) for _ in range(3))
    base = E.integrated_gradients(_model(0), x, y, steps=64).values.numpy()
    again = E.integrated_gradients(_model(0), x, y, steps=64).values.numpy()
    assert _rank_correlation(base, again) == pytest.approx(1.0)
    randomised = E.integrated_gradients(_model(7), x, y, steps=64).values.numpy()
    other = E.integrated_gradients(_model(0), x, z, steps=64).values.numpy()
    assert abs(_rank_correlation(base, randomised)) < 0.5
    assert _rank_correlation(base, other) < 0.8


def test_a_planted_shared_patch_is_where_the_similarity_comes_from():
    """Two noise images sharing one bright 3×3 patch: the similarity map of each peaks on the patch."""
    torch.manual_seed(0)
    model = EmbeddingModel("convnet", 32, input_shape=(1, 16, 16), backbone_kwargs={"channels": 16, "blocks": 2}).eval()
    g = torch.Generator().manual_seed(3)
    hits = 0
    for trial in range(5):
        a, b = 0.2 * torch.rand(1, 16, 16, generator=g), 0.2 * torch.rand(1, 16, 16, generator=g)
        r, c = torch.randint(2, 12, (2,), generator=g).tolist()
        patch = torch.zeros(1, 16, 16, dtype=torch.bool)
        patch[0, r : r + 3, c : c + 3] = True
        a[patch], b[patch] = 1.0, 1.0
        for x, y in ((a, b), (b, a)):
            m = E.integrated_gradients(model, x, y, steps=64).values
            top = torch.topk(m.reshape(-1), 5).indices
            hits += int(patch.reshape(-1)[top].float().mean() >= 0.8)
    assert hits >= 9  # of 10 maps, the 5 most "alike" pixels lie (at least 4 of 5) on the planted patch


def test_cli_explains_a_pair_a_search_and_a_linear_run(tmp_path):
    from metrix.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["train", "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress",
                               "--checkpoint-every", "0"]).exit_code == 0
    r = runner.invoke(app, ["explain", str(tmp_path / "run"), "--query", "digits#0", "--reference", "digits#10", "--json"])
    assert r.exit_code == 0, r.output
    pair = json.loads(r.output)["pairs"][0]
    assert pair["kind"] == "integrated_gradients" and len(pair["a"]["attributions"]) == 64
    for side in ("a", "b"):
        s = pair[side]
        assert s["completeness_error"] < 0.05 * abs(s["similarity"] - s["baseline_similarity"])
    r = runner.invoke(app, ["explain", str(tmp_path / "run"), "--query", "digits#0", "--data", "digits", "-k", "2",
                            "--out", str(tmp_path / "fig.png")])
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the figure needs the plots extra, and says so
        assert r.exit_code == 2 and "pip install 'metrix[plots]'" in r.output, r.output
    else:
        assert r.exit_code == 0 and (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG", r.output
        assert r.output.count(" vs digits#") == 2
    r = runner.invoke(app, ["explain", str(tmp_path / "run"), "--query", "digits#0", "--data", "digits", "-k", "2", "--json"])
    assert r.exit_code == 0 and [p["reference"].startswith("digits#") for p in json.loads(r.output)["pairs"]] == [True, True]
    # from a saved index: its items record their source, so each hit is explained from its own input
    assert runner.invoke(app, ["index", "build", str(tmp_path / "run"), "--data", "digits", "--out", str(tmp_path / "i.idx")]).exit_code == 0
    r = runner.invoke(app, ["explain", str(tmp_path / "run"), "--query", "digits#0", "--index", str(tmp_path / "i.idx"),
                            "-k", "2", "--json"])
    from_index = [p["reference"] for p in json.loads(r.output)["pairs"]]
    from_data = [p["reference"] for p in json.loads(runner.invoke(app, ["explain", str(tmp_path / "run"), "--query", "digits#0",
                                                                       "--data", "digits", "-k", "2", "--json"]).output)["pairs"]]
    assert from_index == from_data
    assert runner.invoke(app, ["fit-linear", "NCA", "--out", str(tmp_path / "nca"), "--param", "max_iter=20"]).exit_code == 0
    r = runner.invoke(app, ["explain", str(tmp_path / "nca"), "--query", "digits#0", "--reference", "digits#1", "--json"])
    pair = json.loads(r.output)["pairs"][0]
    assert pair["kind"] == "exact" and pair["sum_error"] < 1e-6 * pair["squared_distance"]
    for args, says in ((["--reference", "digits#1", "--data", "digits"], "give one of --reference"), (["--reference", "digits#x"], "sample number"),
                       (["--reference", "nowhere.txt"], "DATA#i")):
        r = runner.invoke(app, ["explain", str(tmp_path / "run"), "--query", "digits#0", *args])
        assert r.exit_code == 2 and says in r.output, r.output


def _gap_model(seed=0):
    torch.manual_seed(seed)
    model = EmbeddingModel("convnet_gap", 24, input_shape=(1, 16, 16), backbone_kwargs={"channels": 12})
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        model.train()
        model(torch.rand(64, 1, 16, 16))
    return model.eval()


def test_gap_pairwise_decomposition_sums_exactly_to_the_cosine():
    """Stylianou et al. 2019: with global average pooling and a linear head, cos(e(x), e(y)) is a sum over
    pairs of feature-map positions, bias included; each side's map and each point-specific map sum consistently."""
    model = _gap_model()
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        x, y = torch.rand(1, 16, 16, generator=g), torch.rand(1, 16, 16, generator=g)
        maps = E.gap_pairwise_maps(model, x, y)
        with torch.no_grad():
            cos = float((model(x[None]).double() * model(y[None]).double()).sum())
        assert maps.cosine == pytest.approx(cos, abs=1e-6)
        assert float(maps.map_x.sum()) == pytest.approx(cos, abs=1e-6) and float(maps.map_y.sum()) == pytest.approx(cos, abs=1e-6)
        assert maps.map_x.shape == (4, 4) and maps.pairs.shape == (16, 16)
        torch.testing.assert_close(maps.pairs.sum(1).reshape(4, 4), maps.map_x)
    with pytest.raises(ValueError, match="convnet_gap"):
        E.gap_pairwise_maps(_model(), torch.rand(256), torch.rand(256))


def test_gap_maps_pass_the_sanity_checks():
    """Adebayo et al. 2018 for the exact maps: they change when the weights are randomised (the head's bias is
    zeroed so that the maps are not dominated by its uniform share). (An untrained model embeds random images
    almost parallel, so its maps barely depend on the other input; that check runs on integrated gradients.)"""
    def model(seed):
        m = _gap_model(seed)
        with torch.no_grad():
            m.head.bias.zero_()
        return m

    g = torch.Generator().manual_seed(5)
    changed = 0
    for _ in range(5):
        x, y = (torch.rand(1, 16, 16, generator=g) for _ in range(2))
        base = E.gap_pairwise_maps(model(0), x, y).map_x.numpy()
        changed += _rank_correlation(base, E.gap_pairwise_maps(model(9), x, y).map_x.numpy()) < 0.7
    assert changed >= 4
