import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from metrix import distances as D


@pytest.fixture
def xy():
    g = torch.Generator().manual_seed(1)
    return torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)


@pytest.mark.parametrize(
    "fn,scipy_metric",
    [
        (D.euclidean, "euclidean"),
        (D.squared_euclidean, "sqeuclidean"),
        (D.cosine_distance, "cosine"),
        (lambda x, y: D.lp(x, y, p=1), "cityblock"),
        (lambda x, y: D.lp(x, y, p=3), "minkowski3"),
        (lambda x, y: D.lp(x, y, p=float("inf")), "chebyshev"),
    ],
)
def test_matches_scipy(xy, fn, scipy_metric):
    x, y = xy
    kw = {}
    if scipy_metric == "minkowski3":
        scipy_metric, kw = "minkowski", {"p": 3}
    expected = cdist(x.numpy(), y.numpy(), scipy_metric, **kw)
    np.testing.assert_allclose(fn(x, y).numpy(), expected, rtol=1e-10, atol=1e-10)
    # self-comparison: same values and an exact zero diagonal
    expected_self = cdist(x.numpy(), x.numpy(), scipy_metric, **kw)
    got_self = fn(x, None).numpy()
    np.testing.assert_allclose(got_self, expected_self, rtol=1e-10, atol=1e-7)
    assert np.all(np.abs(np.diag(got_self)) < 1e-12)


def test_similarities(xy):
    x, y = xy
    np.testing.assert_allclose(D.dot_product(x, y).numpy(), x.numpy() @ y.numpy().T)
    np.testing.assert_allclose(D.cosine_similarity(x, y).numpy(), 1 - cdist(x.numpy(), y.numpy(), "cosine"), atol=1e-12)
    assert D.is_similarity("dot") and not D.is_similarity("cosine") and not D.is_similarity("euclidean")
    np.testing.assert_allclose(D.dissimilarity(x, y, "dot").numpy(), -(x @ y.T).numpy())


def test_mahalanobis_from_L_and_M(xy):
    x, y = xy
    g = torch.Generator().manual_seed(2)
    L = torch.randn(3, 5, generator=g, dtype=torch.float64)
    M = L.T @ L
    expected = cdist(x.numpy(), y.numpy(), "mahalanobis", VI=M.numpy())
    np.testing.assert_allclose(D.mahalanobis(x, y, L=L).numpy(), expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(D.mahalanobis(x, y, M=M).numpy(), expected, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(D.mahalanobis(x, y, L=L, squared=True).numpy(), expected**2, rtol=1e-9, atol=1e-9)
    Lf = D.mahalanobis_factor(M)
    np.testing.assert_allclose((Lf.T @ Lf).numpy(), M.numpy(), atol=1e-9)


def test_mahalanobis_rejects_bad_matrices(xy):
    x, y = xy
    with pytest.raises(ValueError, match="positive semi-definite"):
        D.mahalanobis(x, y, M=-torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="symmetric"):
        D.mahalanobis(x, y, M=torch.triu(torch.ones(5, 5, dtype=torch.float64)))
    with pytest.raises(ValueError, match="exactly one"):
        D.mahalanobis(x, y)
    with pytest.raises(ValueError, match=r"\(k, 5\)"):
        D.mahalanobis(x, y, L=torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize("fn", [D.euclidean, lambda x, y: D.lp(x, y, 3.0), lambda x, y: D.lp(x, y, 1.0), D.cosine_distance])
def test_identical_points_zero_distance_finite_gradient(fn):
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.0, 1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    d = fn(x, x.clone())
    assert abs(float(d[0, 1].detach())) < 1e-7
    d.sum().backward()
    assert torch.isfinite(x.grad).all()
    x.grad = None
    fn(x, None).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_gradcheck_euclidean_and_mahalanobis(xy):
    x, y = (t.clone().requires_grad_() for t in xy)
    assert torch.autograd.gradcheck(D.euclidean, (x, y))
    L = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, l: D.mahalanobis(a, b, L=l), (x, y, L))
    assert torch.autograd.gradcheck(lambda a, b: D.lp(a, b, 3.0), (x, y))


def test_bad_input_messages():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(5, 2\)"):
        D.euclidean(x, torch.randn(5, 2))
    with pytest.raises(ValueError, match="NaN or inf"):
        D.euclidean(torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="2-D"):
        D.euclidean(torch.randn(3))
    with pytest.raises(TypeError, match="floating"):
        D.euclidean(torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="dtype"):
        D.euclidean(x, x.double())
    with pytest.raises(ValueError, match="unknown metric"):
        D.pairwise_distance(x, metric="hamming")
    with pytest.raises(ValueError, match="p must be"):
        D.lp(x, x, p=0.5)


@pytest.mark.parametrize("fn", [D.euclidean, D.squared_euclidean])
def test_gradcheck_hand_written_backward_all_paths(fn):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: fn(a), (x,))  # same set: symmetrised single GEMM
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b), (x, y))
    assert torch.autograd.gradcheck(lambda b: fn(x.detach(), b), (y,))  # only one side needs grad
    # an upstream gradient that is not symmetric and touches the diagonal
    w = torch.randn(6, 6, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: (fn(a) * w).sum(), (x,))


def test_zero_distance_gradient_is_zero_even_with_nonzero_upstream():
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [4.0, 6.0]], dtype=torch.float64, requires_grad=True)
    D.euclidean(x).sum().backward()
    # rows 0 and 1 coincide (zero subgradient between them); each pair (i, j) appears twice in the sum
    u = (x[0] - x[2]).detach() / 5.0  # unit vector, |x0 - x2| = 5
    expected = torch.stack([2 * u, 2 * u, -4 * u])
    torch.testing.assert_close(x.grad, expected)


# --- identical points are exactly 0 on any BLAS, CPU and thread count (the GEMM expansion alone is not) ---
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [3, 33, 512])
def test_identical_points_are_exactly_zero_in_every_euclidean_matrix(dtype, dim):
    from metrix.distances import euclidean, poincare, expmap0, squared_euclidean

    g = torch.Generator().manual_seed(dim)
    x = torch.randn(300, dim, generator=g, dtype=dtype) * 3 + 1
    x[150:] = x[:150]  # every row has a twin 150 rows away (before the fix, dozens were 1e-14..1e-3 here)
    i = torch.arange(150)
    for fn in (euclidean, squared_euclidean):
        assert bool((fn(x)[i, i + 150] == 0).all())
        assert bool((fn(x[:150], x[150:]).diagonal() == 0).all())
        assert bool((fn(x) >= 0).all())
    ball = expmap0(x * 0.1)
    assert bool((poincare(ball)[i, i + 150] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_expansion_error_factor_bounds_the_gemm_error(dtype):
    """The bound behind the exact recomputation: |GEMM form − exact| ≤ γ·(‖x‖² + ‖y‖²) on adversarial
    inputs (large common offset, so the expansion cancels badly)."""
    from metrix.distances import expansion_error_factor

    g = torch.Generator().manual_seed(1)
    x = 50 + torch.randn(200, 64, generator=g, dtype=dtype)
    y = 50 + torch.randn(150, 64, generator=g, dtype=dtype)
    gemm = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    exact = ((x.double()[:, None] - y.double()[None]) ** 2).sum(-1)
    bound = expansion_error_factor(64, dtype) * ((x.double() ** 2).sum(1)[:, None] + (y.double() ** 2).sum(1)[None])
    assert bool(((gemm.double() - exact).abs() <= bound).all())


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "poincare"])
@pytest.mark.parametrize("n", [300, 40_000])  # merging path, and the sampled / symmetric paths
def test_knn_gives_duplicates_distance_exactly_zero(metric, n):
    from metrix.distances import expmap0
    from metrix.neighbors import knn

    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 24, generator=g)
    if metric == "poincare":
        x = expmap0(0.3 * x)
    x[n // 2:] = x[: n // 2]
    dist, idx = knn(x, k=3, metric=metric)
    twin = (torch.arange(n) + n // 2) % n
    assert bool((idx[:, 0] == twin).all()) and bool((dist[:, 0] == 0).all())
    d1, _ = knn(x[:50], x, k=2, metric=metric)  # one-sided: the query's own row and its twin, both exactly 0
    assert bool((d1 == 0).all())


def test_one_metric_vocabulary_everywhere():
    """The six names are defined once in distances and accepted unchanged by kNN, the index, evaluation,
    galleries, OOD and the losses; a name from elsewhere is refused with the list of valid ones."""
    from metrix.apps.ood import KNNDetector
    from metrix.apps.verification import Gallery
    from metrix.evaluation import retrieval_metrics
    from metrix.index import VectorIndex
    from metrix.neighbors import knn

    assert list(D.METRICS) == ["euclidean", "sqeuclidean", "cosine", "dot", "mahalanobis", "poincare"]
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(12, 4, generator=g, dtype=torch.float64), dim=1) * 0.5
    y = torch.arange(12) % 3
    for metric in ("euclidean", "sqeuclidean", "cosine", "dot", "poincare"):
        want = D.pairwise_distance(x, metric=metric).fill_diagonal_(-torch.inf if D.is_similarity(metric) else torch.inf)
        dist, idx = knn(x, k=2, metric=metric)
        torch.testing.assert_close(dist, want.sort(dim=1, descending=D.is_similarity(metric)).values[:, :2])
        index = VectorIndex(4, metric=metric)
        index.add(x.float().numpy())
        d_index, _ = index.search(x.float().numpy(), k=1)  # itself first, at its own distance
        torch.testing.assert_close(torch.from_numpy(d_index[:, 0]).double(), D.pairwise_distance(x, metric=metric).diagonal(),
                                   atol=1e-5, rtol=1e-5)
        assert 0 <= retrieval_metrics(x, y, metric=metric)["map_at_r"] <= 1
    for metric in ("euclidean", "cosine"):
        assert Gallery(threshold=1.0, metric=metric).metric == metric
    assert KNNDetector(k=2, metric="cosine").fit(x.numpy()).score(x.numpy()).shape == (12,)
    for bad in ("l2", "ip", "cosine_similarity", "squared_euclidean"):
        for call in (lambda: D.pairwise_distance(x, metric=bad), lambda: knn(x, k=1, metric=bad),
                     lambda: VectorIndex(4, metric=bad), lambda: Gallery(metric=bad),
                     lambda: KNNDetector(metric=bad).fit(x.numpy())):
            with pytest.raises(ValueError, match=f"unknown metric '{bad}'.*choose one of euclidean"):
                call()


def test_mahalanobis_by_name_needs_its_map_and_is_refused_where_it_cannot_be_indexed():
    from metrix.index import VectorIndex
    from metrix.neighbors import knn

    g = torch.Generator().manual_seed(1)
    x, L = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(D.pairwise_distance(x, metric="mahalanobis", L=L), D.euclidean(x @ L.T))
    with pytest.raises(ValueError, match="needs L or M"):
        D.pairwise_distance(x, metric="mahalanobis")
    for call in (lambda: knn(x, k=1, metric="mahalanobis"), lambda: VectorIndex(3, metric="mahalanobis")):
        with pytest.raises(ValueError, match="L.T"):
            call()
