"""Lifted structure (original), N-pair, InfoNCE with explicit negatives, center loss."""

import pytest
import torch
import torch.nn.functional as F

from metrix import losses as L
from tests.losses import reference as ref
from tests.losses.test_losses_reference import CASES, _check, make_batch

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")


@pytest.mark.parametrize("seed,n,c", CASES)
def test_lifted_structure_reference_and_pml(seed, n, c):
    emb, lab = make_batch(seed, n, n_classes=c)
    _check(lambda e: L.lifted_structure_loss(e, lab, neg_margin=1.2), lambda e: ref.lifted_structure(e, lab, neg_margin=1.2), [emb])
    assert float(L.LiftedStructureLoss(1.0)(emb, lab)) == pytest.approx(float(pml_losses.LiftedStructureLoss(neg_margin=1.0)(emb, lab)), abs=1e-9)


@pytest.mark.parametrize("seed,n,c", CASES)
def test_lifted_structure_with_mined_pairs(seed, n, c):
    """A miner's selection: only the kept positive pairs, each anchor's kept negatives in its sum."""
    from tests.losses.test_losses_reference import _mined

    emb, lab = make_batch(seed, n, n_classes=c)
    pairs = _mined(seed, n, n)

    def keep(i, j, is_pos):
        return bool((pairs.pos if is_pos else pairs.neg)[i, j] > 0)

    _check(lambda e: L.lifted_structure_loss(e, lab, neg_margin=1.2, pairs=pairs),
           lambda e: ref.lifted_structure(e, lab, neg_margin=1.2, selected=keep), [emb])


def test_lifted_structure_without_negatives_sums_nothing():
    """An anchor with no negatives contributes an empty sum (log 0), not log 1: a one-class batch gives 0, and
    a pair whose first anchor lost its negatives to a miner keeps only the second's."""
    emb, _ = make_batch(3, 8, n_classes=2)
    one_class = emb.clone().requires_grad_()
    value = L.lifted_structure_loss(one_class, torch.zeros(8, dtype=torch.int64))
    value.backward()
    assert float(value) == 0.0 and torch.equal(one_class.grad, torch.zeros_like(emb))
    lab = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    same = lab[:, None] == lab[None, :]
    neg = (~same).to(emb.dtype)
    neg[0] = 0.0  # anchor 0 keeps no negative
    pairs = L.Pairs((same & ~torch.eye(8, dtype=torch.bool)).to(emb.dtype), neg)

    def keep(i, j, is_pos):
        return bool((pairs.pos if is_pos else pairs.neg)[i, j] > 0)

    _check(lambda e: L.lifted_structure_loss(e, lab, neg_margin=2.0, pairs=pairs),
           lambda e: ref.lifted_structure(e, lab, neg_margin=2.0, selected=keep), [emb])


@pytest.mark.parametrize("seed,n,c", CASES)
def test_npair_reference_and_pml(seed, n, c):
    emb, lab = make_batch(seed, n, n_classes=c, normalize=False)
    _check(lambda e: L.npair_loss(e, lab, l2_reg=0.01), lambda e: ref.npair(e, lab, l2_reg=0.01), [emb])
    unit = F.normalize(emb, dim=1)
    assert float(L.NPairLoss(l2_reg=0.0)(unit, lab)) == pytest.approx(float(pml_losses.NPairsLoss()(unit, lab)), abs=1e-9)


@pytest.mark.parametrize("shape", ["per_query", "shared"])
def test_info_nce_reference(shape):
    g = torch.Generator().manual_seed(1)
    q, p = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    negs = torch.randn(5, 3, 4, generator=g, dtype=torch.float64) if shape == "per_query" else torch.randn(6, 4, generator=g, dtype=torch.float64)
    _check(lambda a, b, c: L.info_nce_loss(a, b, c, temperature=0.5), lambda a, b, c: ref.info_nce(a, b, c, 0.5), [q, p, negs])
    assert torch.autograd.gradcheck(lambda a, b, c: L.info_nce_loss(a, b, c, temperature=0.5),
                                    (q.requires_grad_(), p.requires_grad_(), negs.requires_grad_()))


def test_info_nce_in_batch_equals_ntxent_pairs_without_query_query_terms():
    g = torch.Generator().manual_seed(2)
    q, p = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    # in-batch negatives = the other rows' positives, i.e. explicit per-query negatives p[j], j != i
    negs = torch.stack([torch.cat([p[:i], p[i + 1:]]) for i in range(6)])
    assert float(L.info_nce_loss(q, p)) == pytest.approx(float(L.info_nce_loss(q, p, negs)), abs=1e-12)


def test_info_nce_bad_input():
    q = torch.randn(4, 3)
    with pytest.raises(ValueError, match="one positive per query"):
        L.info_nce_loss(q, torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"negatives must be"):
        L.info_nce_loss(q, torch.randn(4, 3), torch.randn(4, 2, 2))
    with pytest.raises(ValueError, match="NaN"):
        L.info_nce_loss(q, torch.randn(4, 3), torch.full((4, 2, 3), float("nan")))


@pytest.mark.parametrize("seed,n,c", CASES)
def test_center_loss_reference(seed, n, c):
    emb, lab = make_batch(seed, n, n_classes=c, normalize=False)
    centers = torch.randn(c, emb.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    _check(lambda e, cc: L.center_loss(e, lab, cc), lambda e, cc: ref.center(e, lab, cc), [emb, centers])
    assert torch.autograd.gradcheck(lambda e, cc: L.center_loss(e, lab, cc), (emb.requires_grad_(), centers.requires_grad_()))


def test_gradcheck_lifted_and_npair():
    emb, lab = make_batch(4, 8, dim=3, n_classes=3, normalize=False)
    assert torch.autograd.gradcheck(lambda e: L.lifted_structure_loss(e, lab, neg_margin=2.0), (emb.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(lambda e: L.npair_loss(e, lab, l2_reg=0.1), (emb.clone().requires_grad_(),))


def test_batch_only_losses_reject_reference_and_bad_input():
    emb, lab = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    for loss in (L.LiftedStructureLoss(), L.NPairLoss()):
        with pytest.raises(ValueError, match="not supported"):
            loss(emb, lab, emb, lab)
        with pytest.raises(ValueError, match="NaN"):
            loss(torch.full((6, 4), float("nan")), lab)
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        L.CenterLoss(3, 4)(emb, torch.tensor([0, 1, 2, 3, 0, 1]))


@pytest.mark.parametrize("seed,n,c", CASES)
@pytest.mark.parametrize("use_ref", [False, True])
def test_nca_reference(seed, n, c, use_ref):
    from tests.losses.test_losses_reference import _check_pair_loss

    _check_pair_loss(L.nca_loss, ref.nca, dict(softmax_scale=2.0), use_ref, seed, n, c, normalize=False)


def test_nca_pml_and_gradcheck():
    emb, lab = make_batch(6, 20, n_classes=4)
    assert float(L.NCALoss()(emb, lab)) == pytest.approx(float(pml_losses.NCALoss()(emb, lab)), abs=1e-9)
    small, small_lab = make_batch(7, 8, dim=3, n_classes=3, normalize=False)
    assert torch.autograd.gradcheck(lambda e: L.nca_loss(e, small_lab, softmax_scale=2.0), (small.requires_grad_(),))


@pytest.mark.parametrize("seed,n,c", CASES)
def test_subcenter_arcface_and_softtriple_reference(seed, n, c):
    emb, lab = make_batch(seed, n, n_classes=c, normalize=False)
    g = torch.Generator().manual_seed(seed + 3)
    w = torch.randn(c * 3, emb.shape[1], dtype=torch.float64, generator=g)
    _check(lambda e, ww: L.subcenter_arcface_loss(e, lab, ww, sub_centers=3, margin=0.4, scale=6.0),
           lambda e, ww: ref.subcenter_arcface(e, lab, ww, 3, 0.4, 6.0), [emb, w])
    centers = torch.randn(c * 4, emb.shape[1], dtype=torch.float64, generator=g)
    _check(lambda e, cc: L.softtriple_loss(e, lab, cc, centers_per_class=4, la=5.0, gamma=0.2, margin=0.05),
           lambda e, cc: ref.softtriple(e, lab, cc, 4, 5.0, 0.2, 0.05), [emb, centers])


def test_subcenter_arcface_and_softtriple_pml_and_gradcheck():
    import math

    emb, lab = make_batch(8, 24, dim=8, n_classes=5)
    ours = L.SubCenterArcFaceLoss(5, 8, sub_centers=3).double()
    theirs = pml_losses.SubCenterArcFaceLoss(num_classes=5, embedding_size=8, sub_centers=3, margin=math.degrees(0.5), scale=64).double()
    theirs.W.data = ours.weight.data.T.clone()
    assert float(ours(emb, lab)) == pytest.approx(float(theirs(emb, lab)), abs=1e-6)
    ours = L.SoftTripleLoss(5, 8, centers_per_class=10).double()
    theirs = pml_losses.SoftTripleLoss(5, 8, centers_per_class=10, la=20, gamma=0.1, margin=0.01).double()
    theirs.fc.data = ours.weight.data.T.clone()
    assert float(ours(emb, lab)) == pytest.approx(float(theirs(emb, lab)), abs=1e-6)
    small, small_lab = make_batch(9, 6, dim=3, n_classes=2, normalize=False)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e, ww: L.softtriple_loss(e, small_lab, ww, centers_per_class=2, la=2.0, gamma=0.5), (small.requires_grad_(), w))
    assert torch.autograd.gradcheck(lambda e, ww: L.subcenter_arcface_loss(e, small_lab, ww, sub_centers=2, scale=2.0), (small.detach().requires_grad_(), w))


def test_multi_center_losses_check_shapes_and_labels():
    with pytest.raises(ValueError, match="not a multiple of sub_centers=3"):
        L.subcenter_arcface_loss(torch.randn(2, 4), torch.tensor([0, 1]), torch.randn(7, 4), sub_centers=3)
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\)"):
        L.SoftTripleLoss(2, 4, centers_per_class=3)(torch.randn(2, 4), torch.tensor([0, 2]))


@pytest.mark.parametrize("seed,n,c", CASES)
@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("unit", [False, True])
def test_lsoftmax_and_sphereface_reference(seed, n, c, m, unit):
    emb, lab = make_batch(seed, n, n_classes=c, normalize=False)
    w = torch.randn(c, emb.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 5))
    fn = L.sphereface_loss if unit else L.large_margin_softmax_loss
    _check(lambda e, ww: fn(e, lab, ww, margin=m, scale=0.7),
           lambda e, ww: ref.large_margin_softmax(e, lab, ww, m, 0.7, unit), [emb, w])


def test_lsoftmax_sphereface_pml_and_gradcheck():
    emb, lab = make_batch(11, 20, dim=8, n_classes=5, normalize=False)
    for ours_cls, pml_cls in ((L.LargeMarginSoftmaxLoss, pml_losses.LargeMarginSoftmaxLoss), (L.SphereFaceLoss, pml_losses.SphereFaceLoss)):
        ours = ours_cls(5, 8, margin=4, scale=1.0).double()
        theirs = pml_cls(num_classes=5, embedding_size=8, margin=4, scale=1).double()
        theirs.W.data = ours.weight.data.T.clone()
        assert float(ours(emb, lab)) == pytest.approx(float(theirs(emb, lab)), abs=1e-6, rel=1e-6)
    small, small_lab = make_batch(12, 6, dim=3, n_classes=3, normalize=False)
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e, ww: L.large_margin_softmax_loss(e, small_lab, ww, margin=3), (small.requires_grad_(), w))
    with pytest.raises(ValueError, match="positive integer"):
        L.LargeMarginSoftmaxLoss(3, 4, margin=1.5)


@pytest.mark.parametrize("seed,n,c", CASES)
@pytest.mark.parametrize("per_class", [False, True])
def test_margin_loss_reference(seed, n, c, per_class):
    emb, lab = make_batch(seed, n, n_classes=c)
    loss = L.MarginLoss(margin=0.2, beta=1.0, num_classes=c if per_class else None).double()
    with torch.no_grad():
        loss.beta.copy_(torch.linspace(0.9, 1.3, len(loss.beta), dtype=torch.float64))
    _check(lambda e: loss(e, lab), lambda e: ref.margin(e, lab, loss.beta.detach(), 0.2, per_class), [emb])


@pytest.mark.parametrize("num_classes", [None, 4])
def test_margin_loss_pml_and_beta_gradient(num_classes):
    emb, lab = make_batch(13, 24, n_classes=4)
    ours = L.MarginLoss(margin=0.2, beta=1.2, learn_beta=True, num_classes=num_classes, nu=0.1).double()
    theirs = pml_losses.MarginLoss(margin=0.2, nu=0.1, beta=1.2, learn_beta=True, num_classes=num_classes).double()
    value = ours(emb, lab)
    assert float(value) == pytest.approx(float(theirs(emb, lab)), abs=1e-9)
    value.backward()
    assert ours.beta.grad is not None and torch.isfinite(ours.beta.grad).all()
    small, small_lab = make_batch(14, 8, dim=3, n_classes=3)
    fixed = L.MarginLoss(margin=0.3, beta=1.0, learn_beta=False).double()
    assert torch.autograd.gradcheck(lambda e: fixed(e, small_lab), (small.requires_grad_(),))


@pytest.mark.parametrize("seed,n,c", CASES)
@pytest.mark.parametrize("use_ref", [False, True])
def test_angular_and_smooth_ap_reference(seed, n, c, use_ref):
    from tests.losses.test_losses_reference import _check_pair_loss

    _check_pair_loss(L.angular_loss, ref.angular, dict(alpha_degrees=35.0), use_ref, seed, n, c, normalize=False)
    _check_pair_loss(L.smooth_ap_loss, ref.smooth_ap, dict(temperature=0.1), use_ref, seed, n, c, normalize=False)


def test_angular_pml_gradcheck_and_smooth_ap_chunking(monkeypatch):
    import metrix.losses.per_positive as pp

    emb, lab = make_batch(15, 24, n_classes=4)
    assert float(L.AngularLoss(40)(emb, lab)) == pytest.approx(float(pml_losses.AngularLoss(alpha=40)(emb, lab)), abs=1e-9)
    full_s = L.smooth_ap_loss(emb, lab)
    monkeypatch.setattr(pp, "_CHUNK_ELEMENTS", 30)  # one anchor per chunk
    assert float(L.smooth_ap_loss(emb, lab)) == pytest.approx(float(full_s), abs=1e-12)
    small, small_lab = make_batch(16, 8, dim=3, n_classes=3, normalize=False)
    assert torch.autograd.gradcheck(lambda e: L.angular_loss(e, small_lab, alpha_degrees=30.0), (small.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(lambda e: L.smooth_ap_loss(e, small_lab, temperature=0.5), (small.clone().requires_grad_(),))


def test_smooth_ap_is_one_minus_exact_ap_when_sharp():
    # well separated classes and a tiny temperature: Smooth-AP -> 1 - AP, and AP = 1 here
    emb = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]], dtype=torch.float64)
    lab = torch.tensor([0, 0, 1, 1])
    assert float(L.smooth_ap_loss(emb, lab, temperature=1e-4)) == pytest.approx(0.0, abs=1e-6)


def test_nca_keeps_anchors_whose_probability_underflows():
    # far-apart positives and a huge scale: the softmax probability of the positives underflows in float32;
    # the loss must stay finite and equal the float64 value instead of dropping those anchors
    emb = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.9, 0.1], [-0.9, 0.1]])
    lab = torch.tensor([0, 0, 1, 1])
    ours = L.nca_loss(emb, lab, softmax_scale=60.0)
    exact = L.nca_loss(emb.double(), lab, softmax_scale=60.0)
    assert torch.isfinite(ours) and float(ours) == pytest.approx(float(exact), rel=1e-4)
    assert float(ours) > 100  # the positives really are improbable: a large, honest loss


@pytest.mark.parametrize("weight_grad", [True, False])
def test_class_cosine_backward_equals_autograd_through_normalize(weight_grad):
    """The hand-written backward of the class cosine matches autograd through ``F.normalize`` for every row
    longer than the 1e-12 norm floor; a zero row and a row shorter than the floor have no direction and get
    a zero gradient (autograd's g/1e-12 is ~1e12, which wrecks training); their values are F.normalize's."""
    from metrix.losses.proxies import class_cosine

    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    x[2], x[3] = 0.0, x[3] * 1e-13
    w = torch.randn(4, 5, generator=g, dtype=torch.float64)
    w[1] = 0.0
    upstream = torch.randn(7, 4, generator=g, dtype=torch.float64)
    ours_x, ours_w = x.clone().requires_grad_(), w.clone().requires_grad_(weight_grad)
    plain_x, plain_w = x.clone().requires_grad_(), w.clone().requires_grad_(weight_grad)
    ours = class_cosine(ours_x, ours_w)
    plain = F.normalize(plain_x, dim=1) @ F.normalize(plain_w, dim=1).T
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-14)
    ours.backward(upstream)
    plain.backward(upstream)
    directionless = lambda t: (torch.linalg.vector_norm(t, dim=1) <= 1e-12)[:, None]  # noqa: E731
    assert float(plain_x.grad[3].abs().max()) > 1e6  # what autograd gives the short row
    torch.testing.assert_close(ours_x.grad, plain_x.grad.masked_fill(directionless(x), 0.0), rtol=1e-10, atol=1e-12)
    if weight_grad:
        torch.testing.assert_close(ours_w.grad, plain_w.grad.masked_fill(directionless(w), 0.0), rtol=1e-10,
                                   atol=1e-12)
    else:
        assert ours_w.grad is None
    pair = (torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(class_cosine, pair)


@pytest.mark.parametrize("alpha", [20.0, 55.0, 70.0, 80.0])
@pytest.mark.parametrize("use_ref", [False, True])
def test_angular_factorised_sum_at_wide_angles(alpha, use_ref):
    """The negatives' sum taken as a matrix product stays exact where its exponentials are large (up to 80°,
    float64 above 60°) — checked against the per-triplet reference, from float32 input too."""
    emb, lab = make_batch(4, 12, n_classes=3)
    r, rl = make_batch(5, 9, n_classes=3) if use_ref else (None, None)
    expected = float(ref.angular(emb, lab, r, rl, alpha_degrees=alpha))
    assert float(L.angular_loss(emb, lab, r, rl, alpha_degrees=alpha)) == pytest.approx(expected, rel=1e-10)
    single = L.angular_loss(emb.float(), lab, None if r is None else r.float(), rl, alpha_degrees=alpha)
    assert single.dtype == torch.float32 and float(single) == pytest.approx(expected, rel=1e-4)
    for bad in (0.0, -5.0, 85.0):
        with pytest.raises(ValueError, match="alpha_degrees"):
            L.angular_loss(emb, lab, alpha_degrees=bad)
