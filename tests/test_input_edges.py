"""Inputs at the edges get a clear error or a bounded answer, never a silent prefix, a wrapped id, an empty
result for a NaN, or a gradient of 1e12."""

import numpy as np
import pytest
import torch

import metrix.losses as L


def test_npz_with_more_samples_than_labels_is_refused(tmp_path):
    from metrix.datasets import load_dataset

    path = tmp_path / "bad.npz"
    np.savez(path, X=np.zeros((100, 4), np.float32), y=np.arange(50) % 2)
    with pytest.raises(ValueError, match="100 samples but y has 50 labels"):
        load_dataset(str(path))
    np.savez(path, X=np.zeros((0, 4), np.float32), y=np.zeros(0))
    with pytest.raises(ValueError, match="empty"):
        load_dataset(str(path))


def test_cli_train_and_fit_linear_refuse_mismatched_npz(tmp_path):
    from typer.testing import CliRunner

    from metrix.cli import app

    path = tmp_path / "bad.npz"
    np.savez(path, X=np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32), y=np.arange(50) % 2)
    for args in (["train", "--data", str(path), "--epochs", "1", "--out", str(tmp_path / "run")],
                 ["fit-linear", "NCA", "--data", str(path)]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code != 0 and "100 samples but y has 50 labels" in result.output, result.output


@pytest.mark.parametrize("ids", [np.array([2**63, 5], dtype=np.uint64), np.array([-1, 5]), np.array([3, -7])])
def test_index_refuses_ids_that_would_wrap_or_mean_missing(ids):
    from metrix.index import VectorIndex

    index = VectorIndex(3)
    with pytest.raises(ValueError, match="between 0 and 2\\*\\*63"):
        index.add(np.ones((2, 3)), ids=ids)
    assert len(index) == 0
    index.add(np.ones((2, 3)), ids=np.array([0, 2**63 - 1], dtype=np.uint64))
    assert sorted(index.ids.tolist()) == [0, 2**63 - 1]


@pytest.mark.parametrize("radius", [float("nan"), float("inf"), -float("inf")])
def test_range_search_refuses_a_non_finite_radius(radius):
    from metrix.index import VectorIndex

    index = VectorIndex(3)
    index.add(np.eye(3))
    with pytest.raises(ValueError, match="radius must be a finite number"):
        index.range_search(np.ones((1, 3)), radius)


PROXY_LOSSES = [lambda: L.ArcFaceLoss(4, 16), lambda: L.CosFaceLoss(4, 16), lambda: L.ProxyAnchorLoss(4, 16),
                lambda: L.ProxyNCALoss(4, 16), lambda: L.NormalizedSoftmaxLoss(4, 16),
                lambda: L.SubCenterArcFaceLoss(4, 16), lambda: L.SoftTripleLoss(4, 16)]


@pytest.mark.parametrize("make", PROXY_LOSSES)
def test_a_zero_embedding_gets_a_bounded_gradient(make):
    """A zero vector has no direction: its gradient through the normalisation is 0 (was g/1e-12 ≈ 1e12),
    and the other rows' gradients are those of the same batch without it."""
    torch.manual_seed(0)
    emb, lab = torch.randn(8, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    emb[0] = 0
    loss = make().double()
    x = emb.clone().requires_grad_()
    loss(x, lab).backward()
    assert bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().max()) < 1e3
    assert float(x.grad[0].abs().max()) == 0.0


@pytest.mark.parametrize("make", [lambda: L.NPairLoss(), lambda: L.CenterLoss(4, 16), lambda: L.MarginLoss(4),
                                  lambda: L.TripletMarginLoss(triplets="easy"), lambda: L.ContrastiveLoss()])
def test_float16_inputs_of_large_magnitude_stay_finite(make):
    """Squared norms of float16 values near 1e4 overflow float16 (max 65504): losses compute in float32."""
    torch.manual_seed(0)
    x = (torch.randn(8, 16) * 1e4).half().requires_grad_()
    value = make()(x, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    value.backward()
    assert bool(torch.isfinite(value)) and bool(torch.isfinite(x.grad).all())


def _empty_cases():
    from metrix.evaluation import knn_accuracy, retrieval_metrics
    from metrix.index import VectorIndex
    from metrix.neighbors import knn

    e, lab = torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)
    ref, ref_lab = np.random.default_rng(0).normal(size=(5, 8)), np.arange(5)
    index = VectorIndex(8)
    index.add(np.eye(8))
    return [
        (lambda: knn(e, torch.randn(5, 8), k=1), "query set is empty"),
        (lambda: retrieval_metrics(np.zeros((0, 8)), np.zeros(0), ref, ref_lab), "query set is empty"),
        (lambda: retrieval_metrics(ref, ref_lab, np.zeros((0, 8)), np.zeros(0)), "reference set is empty"),
        (lambda: knn_accuracy(np.zeros((0, 8)), np.zeros(0), ref, ref_lab), "query set is empty"),
        (lambda: index.search(np.zeros((0, 8)), 1), "queries is empty"),
        *[(lambda make=make: make()(e, lab), "embeddings is empty")
          for make in (L.TripletMarginLoss, L.ContrastiveLoss, L.NTXentLoss, L.MultiSimilarityLoss, L.NPairLoss,
                       lambda: L.ArcFaceLoss(3, 8), lambda: L.CenterLoss(3, 8))],
    ]


def test_empty_inputs_say_what_is_empty():
    for call, message in _empty_cases():
        with pytest.raises(ValueError, match=message):
            call()
