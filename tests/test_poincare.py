"""The Poincaré ball: distance against the formula, its metric axioms, the maps in and out of the ball,
and pair losses on it against the float64 loop references."""

import math

import numpy as np

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metrix import distances as D
from metrix import losses as L
from tests.losses import reference as ref

DT = torch.float64


def ball_points(n, dim=4, seed=0, c=1.0, spread=0.8):
    g = torch.Generator().manual_seed(seed)
    return D.expmap0(spread * torch.randn(n, dim, generator=g, dtype=DT), c)


def loop_distance(x, y, c):
    out = torch.empty(len(x), len(y), dtype=DT)
    for i in range(len(x)):
        for j in range(len(y)):
            z = 2 * c * ((x[i] - y[j]) ** 2).sum() / ((1 - c * (x[i] ** 2).sum()) * (1 - c * (y[j] ** 2).sum()))
            out[i, j] = math.acosh(1 + float(z)) / math.sqrt(c)
    return out


@pytest.mark.parametrize("c", [1.0, 0.3, 2.5])
def test_matches_the_formula_and_is_a_metric_matrix(c):
    x, y = ball_points(6, c=c, seed=1), ball_points(8, c=c, seed=2)
    torch.testing.assert_close(D.poincare(x, y, c), loop_distance(x, y, c), rtol=1e-9, atol=1e-9)
    own = D.poincare(x, c=c)
    torch.testing.assert_close(own, own.T, rtol=1e-14, atol=1e-14)
    assert float(own.diagonal().abs().max()) == 0.0
    torch.testing.assert_close(own, loop_distance(x, x, c), rtol=1e-9, atol=1e-7)


def test_known_values_and_curvature_scaling():
    x = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.0, -0.5]], dtype=DT)
    d = D.poincare(x)
    assert float(d[0, 1]) == pytest.approx(math.log(3.0), rel=1e-12)  # 2·artanh(0.5)
    assert float(d[1, 2]) == pytest.approx(math.acosh(1 + 2 * 0.5 / 0.75**2), rel=1e-12)
    # d_c(x, y) = d_1(√c x, √c y) / √c
    c = 0.4
    torch.testing.assert_close(D.poincare(x, c=c), D.poincare(math.sqrt(c) * x) / math.sqrt(c))
    assert D.pairwise_distance(x, metric="poincare").equal(d)
    assert not D.is_similarity("poincare")


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), spread=st.floats(0.05, 3.0))
def test_triangle_inequality(seed, spread):
    x = ball_points(9, dim=3, seed=seed, spread=spread)
    d = D.poincare(x)
    # d_ik ≤ d_ij + d_jk for every triple
    assert bool((d[:, None, :] <= d[:, :, None] + d[None, :, :] + 1e-9 * (1 + d.max())).all())


def test_expmap0_logmap0_and_projection():
    g = torch.Generator().manual_seed(4)
    for c in (1.0, 0.5):
        v = 0.3 * torch.randn(10, 5, generator=g, dtype=DT)
        x = D.expmap0(v, c)
        torch.testing.assert_close(D.logmap0(x, c), v, rtol=1e-9, atol=1e-12)
        # the geodesic distance from the origin is twice the tangent vector's length
        origin = torch.zeros(1, 5, dtype=DT)
        torch.testing.assert_close(D.poincare(origin, x, c)[0], 2 * v.norm(dim=1), rtol=1e-9, atol=1e-12)
    huge = D.expmap0(torch.full((2, 3), 50.0))  # tanh rounds to 1 in float32: kept off the boundary
    assert bool((huge.norm(dim=1) < 1).all()) and torch.isfinite(D.poincare(huge)).all()
    inside = torch.tensor([[0.1, 0.2]])
    assert D.project_to_ball(inside).equal(inside)
    rows = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    clipped = D.clip_norm(rows, 2.0)
    torch.testing.assert_close(clipped[0], torch.tensor([1.2, 1.6]))  # scaled to norm 2, direction kept
    assert clipped[1:].equal(rows[1:])  # shorter rows (and zero) unchanged
    assert float(D.project_to_ball(torch.tensor([[3.0, 4.0]]), eps=0.01).norm()) == pytest.approx(0.99)


def test_gradients_are_finite_and_correct_including_coincident_points():
    x = ball_points(5, dim=3, seed=3)
    x = torch.cat([x, x[:1]]).requires_grad_()  # rows 0 and 5 coincide
    d = D.poincare(x)
    (grad,) = torch.autograd.grad(d.sum(), x)
    assert torch.isfinite(grad).all()
    y = ball_points(4, dim=3, seed=5)
    assert torch.autograd.gradcheck(lambda a, b: D.poincare(a, b, 0.7), (y[:2].clone().requires_grad_(),
                                                                         y[2:].clone().requires_grad_()))
    assert torch.autograd.gradcheck(lambda a: D.poincare(a, c=0.7), (y.clone().requires_grad_(),))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="outside the Poincaré ball"):
        D.poincare(torch.tensor([[0.6, 0.8], [0.1, 0.0]]))
    with pytest.raises(ValueError, match="outside the Poincaré ball"):
        D.poincare(torch.tensor([[0.1, 0.0]]), torch.tensor([[2.0, 0.0]]), c=0.5)
    with pytest.raises(ValueError, match="curvature"):
        D.poincare(torch.zeros(2, 2), c=0.0)
    with pytest.raises(ValueError, match="inside the Poincaré ball"):
        D.logmap0(torch.tensor([[1.0, 0.0]]))


def _labels(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.arange(3), torch.randint(0, 3, (n - 3,), generator=g)])


LOSSES = {
    "contrastive": (lambda e, l, r, rl: L.contrastive_loss(e, l, r, rl, neg_margin=2.0, metric="poincare"),
                    lambda e, l, r, rl: ref.contrastive(e, l, r, rl, neg_margin=2.0, metric="poincare")),
    # no negative within 0.05: the gradient comes as the positive list
    "contrastive_no_active_negative": (
        lambda e, l, r, rl: L.contrastive_loss(e, l, r, rl, neg_margin=0.05, metric="poincare"),
        lambda e, l, r, rl: ref.contrastive(e, l, r, rl, neg_margin=0.05, metric="poincare")),
    "triplet_all": (lambda e, l, r, rl: L.triplet_margin_loss(e, l, r, rl, margin=0.5, metric="poincare"),
                    lambda e, l, r, rl: ref.triplet(e, l, r, rl, margin=0.5, metric="poincare")),
    "triplet_batch_hard": (
        lambda e, l, r, rl: L.triplet_margin_loss(e, l, r, rl, margin=0.5, triplets="batch_hard", metric="poincare"),
        lambda e, l, r, rl: ref.triplet(e, l, r, rl, margin=0.5, triplets="batch_hard", metric="poincare")),
    "generalized_lifted": (
        lambda e, l, r, rl: L.generalized_lifted_structure_loss(e, l, r, rl, neg_margin=2.0, metric="poincare"),
        lambda e, l, r, rl: ref.generalized_lifted(e, l, r, rl, neg_margin=2.0, metric="poincare")),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("use_ref", [False, True])
def test_pair_losses_on_the_ball_match_the_references(name, use_ref):
    ours, expected = LOSSES[name]
    emb, lab = ball_points(11, seed=7), _labels(11, 7)
    r, rl = (ball_points(8, seed=8), _labels(8, 8)) if use_ref else (None, None)
    inputs = [emb.clone().requires_grad_()] + ([r.clone().requires_grad_()] if use_ref else [])
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    a = ours(inputs[0], lab, inputs[1] if use_ref else None, rl)
    b = expected(ref_inputs[0], lab, ref_inputs[1] if use_ref else None, rl)
    a.backward()
    b.backward()
    assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-9, abs=1e-12)
    for got, want in zip(inputs, ref_inputs):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-7, atol=1e-10)


def test_gradcheck_pair_losses_on_the_ball():
    emb, lab = ball_points(7, dim=3, seed=9), _labels(7, 9)
    r, rl = ball_points(5, dim=3, seed=10), _labels(5, 10)
    assert torch.autograd.gradcheck(lambda e: L.contrastive_loss(e, lab, neg_margin=2.0, metric="poincare"),
                                    (emb.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(
        lambda e, rr: L.generalized_lifted_structure_loss(e, lab, rr, rl, neg_margin=2.0, metric="poincare"),
        (emb.clone().requires_grad_(), r.clone().requires_grad_()))


@pytest.mark.parametrize("n,k,use_ref", [(300, 5, False), (300, 5, True), (20_000, 40, False), (20_000, 40, True)])
def test_exact_knn_on_the_ball_matches_brute_force(n, k, use_ref):
    """All of knn's paths (small, sampled-threshold, symmetric) rank by the Poincaré distance and return it."""
    from metrix.neighbors import knn

    g = torch.Generator().manual_seed(n + k)
    x = D.expmap0(1.5 * torch.randn(n, 8, generator=g))
    q = D.expmap0(1.5 * torch.randn(60, 8, generator=g)) if use_ref else x[:60]
    dist, idx = knn(q, x, k=k, metric="poincare") if use_ref else knn(x, None, k=k, metric="poincare")
    if not use_ref:
        dist, idx = dist[:60], idx[:60]
    full = D.poincare(q.double(), x.double())
    if not use_ref:
        full[torch.arange(60), torch.arange(60)] = torch.inf
    want_d, want_i = full.topk(k, largest=False)
    torch.testing.assert_close(dist.double(), want_d, rtol=2e-3, atol=2e-3)
    # float32 ranks: a swapped pair must be a near-tie of the exact distances
    got_exact = full.gather(1, idx)
    torch.testing.assert_close(got_exact, want_d, rtol=2e-3, atol=2e-3)


def test_retrieval_metrics_on_the_ball():
    from metrix.evaluation import retrieval_metrics

    g = torch.Generator().manual_seed(2)
    centres = 1.2 * torch.randn(5, 6, generator=g, dtype=DT)
    labels = torch.arange(5).repeat_interleave(30)
    x = D.expmap0(centres[labels] + 0.3 * torch.randn(150, 6, generator=g, dtype=DT))
    got = retrieval_metrics(x, labels, metric="poincare")
    d = D.poincare(x).fill_diagonal_(torch.inf)
    first = d.argmin(dim=1)
    assert got["precision_at_1"] == pytest.approx(float((labels[first] == labels).double().mean()))
    # the index speaks the same metric names: approximate (faiss Flat) search on the ball gives the exact result
    pytest.importorskip("faiss")
    approx = retrieval_metrics(x, labels, metric="poincare", approximate="Flat")
    assert approx["precision_at_1"] == got["precision_at_1"] and approx["map_at_r"] == pytest.approx(got["map_at_r"])
    with pytest.raises(ValueError, match="HNSW graphs"):  # refused by name, as the index refuses it
        retrieval_metrics(x, labels, metric="poincare", approximate="HNSW32")


def test_ball_model_outputs_stay_inside_and_survive_save_load(tmp_path):
    from metrix.models import EmbeddingModel, load_model, save_model

    torch.manual_seed(0)
    model = EmbeddingModel("mlp", 6, normalize=False, input_shape=(10,), ball_curvature=0.5, ball_clip=1.5)
    x = torch.randn(20, 10)
    with torch.no_grad():
        model.head.weight.mul_(1e4)  # head outputs far beyond the clip radius
    out = model(x)
    assert bool((out.norm(dim=1) < 0.5**-0.5).all())
    # the clip bounds the tangent vector: every row reaches ‖logmap0(out)‖ = ball_clip exactly
    torch.testing.assert_close(D.logmap0(out, 0.5).norm(dim=1), torch.full((20,), 1.5), rtol=1e-4, atol=0)
    save_model(model, tmp_path / "run")
    loaded, config = load_model(tmp_path / "run")
    assert (config["model"]["ball_curvature"], config["model"]["ball_clip"]) == (0.5, 1.5)
    torch.testing.assert_close(loaded.embed(x), model.embed(x))
    with pytest.raises(ValueError, match="exclude each other"):
        EmbeddingModel("mlp", 6, normalize=True, input_shape=(10,), ball_curvature=1.0)
    with pytest.raises(ValueError, match="curvature"):
        EmbeddingModel("mlp", 6, normalize=False, input_shape=(10,), ball_curvature=-1.0)


def test_train_evaluate_on_the_ball(tmp_path):
    """``metrix train --geometry poincare``: the model embeds into the ball, validation and the report rank by
    the Poincaré distance, ``evaluate`` and the index read the geometry back, the gallery refuses the run."""
    from metrix.jobs.train import TrainConfig, build_index, evaluate, search_index, train
    from metrix.models import load_model

    cfg = TrainConfig.from_sources(None, loss="triplet", geometry="poincare", epochs=2, out=str(tmp_path / "ball"),
                                   progress=False)
    result = train(cfg, echo=lambda *a: None)
    model, config = load_model(result["run_dir"])
    assert config["train"]["geometry"] == "poincare" and model.ball_curvature == 1.0
    import metrix.jobs.train as experiment

    used = []
    real = experiment.retrieval_metrics
    experiment.retrieval_metrics = lambda *a, **kw: used.append(kw.get("metric")) or real(*a, **kw)
    try:
        again = evaluate(result["run_dir"])
    finally:
        experiment.retrieval_metrics = real
    assert used == ["poincare"]
    assert again["map_at_r"] == pytest.approx(result["after"]["map_at_r"])
    index = build_index(result["run_dir"], "digits", tmp_path / "idx")
    assert index.metric == "poincare"
    hits = search_index(tmp_path / "idx", result["run_dir"], "digits", k=3, limit=5)
    # itself first, at 0 up to float32: √ of a GEMM residual, as for the Euclidean distance
    assert [h["neighbours"][0]["distance"] for h in hits] == pytest.approx([0.0] * 5, abs=5e-3)
    sphere = train(TrainConfig.from_sources(None, loss="triplet", epochs=1, out=str(tmp_path / "sphere"), progress=False),
                   echo=lambda *a: None)
    with pytest.raises(ValueError, match="build the index with the same run"):
        search_index(tmp_path / "idx", sphere["run_dir"], "digits", k=3)
    from metrix.jobs.verification import enroll

    with pytest.raises(ValueError, match="Poincaré ball"):
        enroll(tmp_path / "gallery", result["run_dir"], "digits")
    with pytest.raises(ValueError, match="needs a loss on distances"):
        TrainConfig.from_sources(None, loss="ntxent", geometry="poincare")
    with pytest.raises(ValueError, match="geometry must be one of"):
        TrainConfig.from_sources(None, geometry="sphre")


@pytest.mark.parametrize("backend,faiss_index", [("exact", "Flat"), ("faiss", "Flat"), ("faiss", "IVF8,Flat")])
def test_vector_index_on_the_ball(backend, faiss_index, tmp_path):
    """A Poincaré index: exact and faiss (inner product over the augmented coordinates) return the brute-force
    neighbours and distances, range search agrees, save/load keeps the metric, points outside are refused."""
    from metrix.index import VectorIndex

    if backend == "faiss":
        pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(1)
    x = D.expmap0(torch.randn(400, 6, generator=g)).numpy()
    q = D.expmap0(torch.randn(12, 6, generator=g)).numpy()
    index = VectorIndex(6, metric="poincare", backend=backend, faiss_index=faiss_index, nprobe=8, ef_search=128)
    index.add(x[:300], ids=np.arange(1000, 1300))
    index.add(x[300:], ids=np.arange(1300, 1400))  # added after the faiss structure may exist
    full = D.poincare(torch.from_numpy(q).double(), torch.from_numpy(x).double())
    want_d, want_i = full.topk(5, largest=False)
    dist, ids = index.search(q, 5)
    np.testing.assert_array_equal(ids, want_i.numpy() + 1000)
    np.testing.assert_allclose(dist, want_d.numpy(), rtol=2e-3, atol=2e-3)
    radius = float(want_d[:, 2].median())
    for (d_row, id_row), f_row in zip(index.range_search(q, radius), full):
        inside = torch.nonzero(f_row <= radius).flatten()
        near_edge = (f_row - radius).abs() < 2e-3
        assert set(id_row.tolist()) ^ set((inside + 1000).tolist()) <= set((torch.nonzero(near_edge).flatten() + 1000).tolist())
        assert list(d_row) == sorted(d_row)
    index.save(tmp_path / "ball.idx")
    loaded = VectorIndex.load(tmp_path / "ball.idx")
    assert loaded.metric == "poincare"
    np.testing.assert_array_equal(loaded.search(q, 5)[1], ids)
    with pytest.raises(ValueError, match="outside the Poincaré ball"):
        index.add(np.array([[1.0, 0, 0, 0, 0, 0]], dtype=np.float32))
    if backend == "faiss":
        with pytest.raises(ValueError, match="HNSW"):
            VectorIndex(6, metric="poincare", backend="faiss", faiss_index="HNSW32")
