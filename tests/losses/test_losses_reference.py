"""Every loss against its brute-force float64 reference: value and gradient, several seeds and
batch shapes (uneven class counts, a separate reference set), plus gradcheck."""

import pytest
import torch
import torch.nn.functional as F

from metrix import losses as L
from tests.losses import reference as ref

DT = torch.float64


def make_batch(seed, n=13, dim=5, n_classes=4, normalize=True):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, dim, generator=g, dtype=DT)
    if normalize:
        emb = F.normalize(emb, dim=1)
    # uneven class counts, every class at least once
    labels = torch.cat([torch.arange(n_classes), torch.randint(0, n_classes, (n - n_classes,), generator=g)])
    perm = torch.randperm(n, generator=g)
    return emb[perm].clone(), labels[perm].clone()


CASES = [(0, 13, 4), (1, 10, 3), (2, 16, 6)]


def _check_pair_loss(ours, reference, kw, use_ref, seed, n, c, normalize=True):
    """Compare ``ours`` with ``reference`` on a batch, against itself or a separate reference set."""
    emb, lab = make_batch(seed, n, n_classes=c, normalize=normalize)
    if use_ref:
        r, rl = make_batch(seed + 100, n + 3, n_classes=c, normalize=normalize)
        _check(lambda e, rr: ours(e, lab, rr, rl, **kw), lambda e, rr: reference(e, lab, rr, rl, **kw), [emb, r])
    else:
        _check(lambda e: ours(e, lab, **kw), lambda e: reference(e, lab, **kw), [emb])


def _check(fn_ours, fn_ref, tensors, atol=1e-9):
    ours_in = [t.clone().requires_grad_() for t in tensors]
    ref_in = [t.clone().requires_grad_() for t in tensors]
    a, b = fn_ours(*ours_in), fn_ref(*ref_in)
    assert torch.isfinite(a)
    assert float(a.detach()) == pytest.approx(float(b.detach()), abs=1e-7, rel=1e-7)
    a.backward()
    if b.requires_grad:
        b.backward()
    for x, y in zip(ours_in, ref_in):
        gy = torch.zeros_like(y) if y.grad is None else y.grad
        torch.testing.assert_close(x.grad, gy, atol=atol, rtol=1e-6)


@pytest.mark.parametrize("seed,n,c", CASES)
@pytest.mark.parametrize("metric,margins", [("euclidean", (0.1, 1.0)), ("cosine", (0.2, 0.8))])
@pytest.mark.parametrize("use_ref", [False, True])
def test_contrastive(seed, n, c, metric, margins, use_ref):
    kw = dict(pos_margin=margins[0], neg_margin=margins[1], metric=metric)
    _check_pair_loss(L.contrastive_loss, ref.contrastive, kw, use_ref, seed, n, c)


@pytest.mark.parametrize("seed,n,c", CASES)
@pytest.mark.parametrize("use_ref", [False, True])
def test_contrastive_on_cosine_is_the_similarity_form_with_margins_one_minus(seed, n, c, use_ref):
    """The docstring's promise: margins p, n on cos(x, y) (pytorch-metric-learning's CosineSimilarity) are
    margins 1 − p, 1 − n on metric="cosine" (1 − cos): the reference hinges [p − s]_+ and [s − n]_+."""
    def ours(e, lab, *rest, pos_margin, neg_margin):
        return L.contrastive_loss(e, lab, *rest, pos_margin=1 - pos_margin, neg_margin=1 - neg_margin, metric="cosine")

    kw = dict(pos_margin=0.8, neg_margin=0.2)
    _check_pair_loss(ours, lambda *a, **k: ref.contrastive(*a, **k, metric="cosine_similarity"), kw, use_ref, seed, n, c)


@pytest.mark.parametrize("seed,n,c", CASES[:2])
@pytest.mark.parametrize("reduction", ["mean_nonzero", "mean", "sum"])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("metric,margins", [("sqeuclidean", (0.2, 1.5)), ("cosine", (0.1, 0.9)), ("dot", (0.5, 0.1))])
@pytest.mark.parametrize("use_ref", [False, True])
def test_contrastive_reductions_squared_and_metrics(seed, n, c, reduction, squared, metric, margins, use_ref):
    kw = dict(pos_margin=margins[0], neg_margin=margins[1], metric=metric, squared=squared, reduction=reduction)
    _check_pair_loss(L.contrastive_loss, ref.contrastive, kw, use_ref, seed, n, c, normalize=metric != "dot")


def _mined(seed, n, r):
    """Random miner output: each pair kept with probability ½ (as float weights, like a miner's masks)."""
    g = torch.Generator().manual_seed(seed + 7)
    return L.Pairs((torch.rand(n, r, generator=g) < 0.5).to(DT), (torch.rand(n, r, generator=g) < 0.5).to(DT))


@pytest.mark.parametrize("seed,n,c", CASES)
@pytest.mark.parametrize("use_ref", [False, True])
@pytest.mark.parametrize("name", ["contrastive", "batch_hard", "circle", "generalized_lifted", "triplet_all",
                                  "triplet_semihard"])
def test_matrix_losses_with_mined_pairs(seed, n, c, use_ref, name, triplet_path):
    """Losses computed through the hand-written matrix gradient, restricted to a miner's pairs."""
    emb, lab = make_batch(seed, n, n_classes=c)
    r, rl = make_batch(seed + 100, n + 3, n_classes=c) if use_ref else (None, None)
    pairs = _mined(seed, n, len(rl) if use_ref else n)

    def keep(i, j, is_pos):
        return bool((pairs.pos if is_pos else pairs.neg)[i, j] > 0)

    ours = {
        "contrastive": lambda e, rr: L.contrastive_loss(e, lab, rr, rl, pos_margin=0.1, neg_margin=1.2, pairs=pairs),
        "batch_hard": lambda e, rr: L.triplet_margin_loss(e, lab, rr, rl, margin=0.3, triplets="batch_hard", pairs=pairs),
        "triplet_all": lambda e, rr: L.triplet_margin_loss(e, lab, rr, rl, margin=0.3, pairs=pairs),
        "triplet_semihard": lambda e, rr: L.triplet_margin_loss(e, lab, rr, rl, margin=0.3, triplets="semihard",
                                                                pairs=pairs),
        "circle": lambda e, rr: L.circle_loss(e, lab, rr, rl, m=0.25, gamma=16.0, pairs=pairs),
        "generalized_lifted": lambda e, rr: L.generalized_lifted_structure_loss(e, lab, rr, rl, neg_margin=1.5, pairs=pairs),
    }[name]
    masked = {  # the references take the selection as masks over (i, j)
        "contrastive": lambda e, rr: ref.contrastive(e, lab, rr, rl, pos_margin=0.1, neg_margin=1.2, selected=keep),
        "batch_hard": lambda e, rr: ref.triplet(e, lab, rr, rl, margin=0.3, triplets="batch_hard", selected=keep),
        "triplet_all": lambda e, rr: ref.triplet(e, lab, rr, rl, margin=0.3, selected=keep),
        "triplet_semihard": lambda e, rr: ref.triplet(e, lab, rr, rl, margin=0.3, triplets="semihard", selected=keep),
        "circle": lambda e, rr: ref.circle(e, lab, rr, rl, m=0.25, gamma=16.0, selected=keep),
        "generalized_lifted": lambda e, rr: ref.generalized_lifted(e, lab, rr, rl, neg_margin=1.5, selected=keep),
    }[name]
    if use_ref:
        _check(ours, masked, [emb, r])
    else:
        _check(lambda e: ours(e, None), lambda e: masked(e, None), [emb])


@pytest.fixture(params=["per_positive", "sorted"])
def triplet_path(request, monkeypatch):
    """Run a triplet test through both forms: one pass per positive slot, and the sorted prefix sums."""
    import metrix.losses.triplet as triplet_module

    monkeypatch.setattr(triplet_module, "_LOOP_MAX_POSITIVES", 32 if request.param == "per_positive" else -1)
    return request.param


@pytest.mark.parametrize("seed,n,c", CASES)
@pytest.mark.parametrize("triplets", ["all", "hard", "semihard", "easy", "batch_hard"])
@pytest.mark.parametrize("reduction", ["mean_nonzero", "mean", "sum"])
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine", "dot"])
def test_triplet(seed, n, c, triplets, reduction, metric, triplet_path):
    emb, lab = make_batch(seed, n, n_classes=c)
    kw = dict(margin=0.3, triplets=triplets, metric=metric, reduction=reduction)
    _check(lambda e: L.triplet_margin_loss(e, lab, **kw), lambda e: ref.triplet(e, lab, **kw), [emb])


@pytest.mark.parametrize("seed,n,c", CASES)
@pytest.mark.parametrize("triplets", ["all", "semihard", "hard", "batch_hard"])
def test_triplet_with_reference_set(seed, n, c, triplets, triplet_path):
    emb, lab = make_batch(seed, n, n_classes=c)
    r, rl = make_batch(seed + 50, n + 5, n_classes=c)
    kw = dict(margin=0.2, triplets=triplets)
    _check(lambda e, rr: L.triplet_margin_loss(e, lab, rr, rl, **kw), lambda e, rr: ref.triplet(e, lab, rr, rl, **kw), [emb, r])


@pytest.mark.parametrize("seed,n,c", CASES)
@pytest.mark.parametrize("mining", [True, False])
@pytest.mark.parametrize("use_ref", [False, True])
def test_multi_similarity(seed, n, c, mining, use_ref):
    kw = dict(alpha=2.0, beta=10.0, base=0.5, mining=mining, epsilon=0.3)
    _check_pair_loss(L.multi_similarity_loss, ref.multi_similarity, kw, use_ref, seed, n, c)


@pytest.mark.parametrize("seed,n,c", CASES)
@pytest.mark.parametrize("use_ref", [False, True])
def test_ntxent_supcon(seed, n, c, use_ref):
    _check_pair_loss(L.ntxent_loss, ref.supcon, dict(temperature=0.3), use_ref, seed, n, c, normalize=False)


@pytest.mark.parametrize("seed,n,c", CASES)
@pytest.mark.parametrize("use_ref", [False, True])
def test_circle(seed, n, c, use_ref):
    _check_pair_loss(L.circle_loss, ref.circle, dict(m=0.25, gamma=16.0), use_ref, seed, n, c, normalize=False)


@pytest.mark.parametrize("seed,n,c", CASES)
@pytest.mark.parametrize("use_ref", [False, True])
def test_generalized_lifted(seed, n, c, use_ref):
    kw = dict(pos_margin=0.1, neg_margin=1.2)
    _check_pair_loss(L.generalized_lifted_structure_loss, ref.generalized_lifted, kw, use_ref, seed, n, c)


CLASS_FUNCS = {
    "arcface": (L.arcface_loss, ref.arcface, dict(margin=0.5, scale=8.0)),
    "cosface": (L.cosface_loss, ref.cosface, dict(margin=0.35, scale=8.0)),
    "proxy_anchor": (L.proxy_anchor_loss, ref.proxy_anchor, dict(margin=0.1, alpha=8.0)),
    "proxy_nca": (L.proxy_nca_loss, ref.proxy_nca, dict(scale=3.0)),
    "normalized_softmax": (L.normalized_softmax_loss, ref.normalized_softmax, dict(temperature=0.2)),
}


@pytest.mark.parametrize("seed,n,c", CASES)
@pytest.mark.parametrize("name", sorted(CLASS_FUNCS))
def test_class_vector_losses(seed, n, c, name):
    emb, lab = make_batch(seed, n, n_classes=c, normalize=False)
    w = torch.randn(c + 1, emb.shape[1], dtype=DT, generator=torch.Generator().manual_seed(seed + 9))
    fn, rf, kw = CLASS_FUNCS[name]
    _check(lambda e, ww: fn(e, lab, ww, **kw), lambda e, ww: rf(e, lab, ww, **kw), [emb, w])


def test_arcface_fallback_region_matches_reference():
    # a target angle beyond pi - m exercises the monotonic fallback branch
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=DT)
    emb = torch.tensor([[-1.0, 0.05], [0.3, 1.0]], dtype=DT)
    lab = torch.tensor([0, 1])
    _check(lambda e, ww: L.arcface_loss(e, lab, ww, margin=0.5, scale=4.0), lambda e, ww: ref.arcface(e, lab, ww, margin=0.5, scale=4.0), [emb, w])


GRADCHECK = {
    "contrastive": lambda e, l: L.contrastive_loss(e, l, pos_margin=0.1, neg_margin=2.0),
    "triplet_all": lambda e, l: L.triplet_margin_loss(e, l, margin=0.5),
    "triplet_semihard": lambda e, l: L.triplet_margin_loss(e, l, margin=0.5, triplets="semihard"),
    "triplet_batch_hard": lambda e, l: L.triplet_margin_loss(e, l, margin=0.5, triplets="batch_hard"),
    "multi_similarity": lambda e, l: L.multi_similarity_loss(e, l, beta=5.0),
    "ntxent": lambda e, l: L.ntxent_loss(e, l, temperature=0.5),
    # circle loss is absent on purpose: its weights α are constants by definition (stop-gradient), so its
    # gradient is not the derivative of its value; test_circle compares it with the reference's instead
    "generalized_lifted": lambda e, l: L.generalized_lifted_structure_loss(e, l, neg_margin=2.0),
    "contrastive_squared_mean": lambda e, l: L.contrastive_loss(e, l, neg_margin=2.0, squared=True, reduction="mean"),
    "contrastive_dot_sum": lambda e, l: L.contrastive_loss(e, l, pos_margin=1.0, neg_margin=-0.5, metric="dot", reduction="sum"),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK))
def test_gradcheck(name):
    emb, lab = make_batch(4, 8, dim=3, n_classes=3, normalize=False)
    assert torch.autograd.gradcheck(lambda e: GRADCHECK[name](e, lab), (emb.requires_grad_(),))


@pytest.mark.parametrize("name", ["contrastive", "generalized_lifted", "multi_similarity", "batch_hard"])
def test_gradcheck_with_reference_set(name):
    """Gradients reach both the batch and a separate reference set (the hand-written matrix backward)."""
    emb, lab = make_batch(6, 7, dim=3, n_classes=3, normalize=False)
    r, rl = make_batch(9, 9, dim=3, n_classes=3, normalize=False)
    fn = {
        "contrastive": lambda e, rr: L.contrastive_loss(e, lab, rr, rl, neg_margin=2.0, metric="sqeuclidean"),
        "generalized_lifted": lambda e, rr: L.generalized_lifted_structure_loss(e, lab, rr, rl, neg_margin=2.0),
        "multi_similarity": lambda e, rr: L.multi_similarity_loss(e, lab, rr, rl, beta=5.0, mining=False),
        "batch_hard": lambda e, rr: L.triplet_margin_loss(e, lab, rr, rl, margin=0.5, triplets="batch_hard"),
    }[name]
    assert torch.autograd.gradcheck(fn, (emb.requires_grad_(), r.requires_grad_()))


@pytest.mark.parametrize("name", sorted(CLASS_FUNCS))
def test_gradcheck_class_losses(name):
    fn, _, kw = CLASS_FUNCS[name]
    emb, lab = make_batch(5, 6, dim=3, n_classes=3, normalize=False)
    w = torch.randn(3, 3, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e, ww: fn(e, lab, ww, **kw), (emb.requires_grad_(), w))
