"""Degenerate batches give defined finite values; bad input gives clear errors; properties hold."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from metrix import losses as L

PAIR_LOSSES = {
    "contrastive": L.ContrastiveLoss(),
    "triplet_all": L.TripletMarginLoss(0.1),
    "triplet_semihard": L.TripletMarginLoss(0.1, triplets="semihard"),
    "triplet_hard": L.TripletMarginLoss(0.1, triplets="hard"),
    "triplet_batch_hard": L.TripletMarginLoss(0.1, triplets="batch_hard"),
    "multi_similarity": L.MultiSimilarityLoss(),
    "ntxent": L.NTXentLoss(),
    "circle": L.CircleLoss(),
    "generalized_lifted": L.GeneralizedLiftedStructureLoss(),
}
CLASS_LOSSES = {
    "arcface": lambda: L.ArcFaceLoss(3, 4),
    "cosface": lambda: L.CosFaceLoss(3, 4),
    "proxy_anchor": lambda: L.ProxyAnchorLoss(3, 4),
    "proxy_nca": lambda: L.ProxyNCALoss(3, 4),
    "normalized_softmax": lambda: L.NormalizedSoftmaxLoss(3, 4),
}


# losses whose other properties are tested in test_losses_more.py (batch-only or multi-centre class losses)
OTHER_LOSSES = {
    "lifted_structure": lambda: L.LiftedStructureLoss(),
    "npair": lambda: L.NPairLoss(),
    "center": lambda: L.CenterLoss(3, 4),
    "nca": lambda: L.NCALoss(),
    "subcenter_arcface": lambda: L.SubCenterArcFaceLoss(3, 4),
    "softtriple": lambda: L.SoftTripleLoss(3, 4, centers_per_class=2),
    "large_margin_softmax": lambda: L.LargeMarginSoftmaxLoss(3, 4),
    "sphereface": lambda: L.SphereFaceLoss(3, 4),
    "margin": lambda: L.MarginLoss(),
    "angular": lambda: L.AngularLoss(),
    "smooth_ap": lambda: L.SmoothAPLoss(),
}


def all_losses():
    yield from PAIR_LOSSES.items()
    for name, make in {**CLASS_LOSSES, **OTHER_LOSSES}.items():
        yield name, make()


DEGENERATE = {
    "all_equal": (torch.ones(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])),
    "zero_vectors": (torch.zeros(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])),
    "one_class": (torch.randn(6, 4), torch.zeros(6, dtype=torch.int64)),
    "no_positive_pair": (torch.randn(3, 4), torch.tensor([0, 1, 2])),
    "single_sample": (torch.randn(1, 4), torch.tensor([1])),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
@pytest.mark.parametrize("name,loss", list(all_losses()))
def test_degenerate_batches_are_finite(name, loss, case):
    emb, lab = DEGENERATE[case]
    emb = emb.clone().requires_grad_()
    value = loss(emb, lab)
    assert value.ndim == 0 and torch.isfinite(value), f"{name} on {case}: {value}"
    value.backward()
    assert torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_pair_losses_return_exact_zero_without_pairs(name):
    # no positive pair at all: documented result is 0 for every pair loss except those whose negative
    # term still applies (contrastive, multi-similarity, generalized lifted)
    emb = F.normalize(torch.randn(4, 4), dim=1).requires_grad_()
    value = PAIR_LOSSES[name](emb, torch.tensor([0, 1, 2, 3]))
    if name in ("contrastive", "multi_similarity", "generalized_lifted"):  # their negative terms still apply
        assert float(value.detach()) >= 0
    else:
        assert float(value.detach()) == 0.0
    value.backward()
    assert emb.grad is not None


@pytest.mark.parametrize("name,loss", list(all_losses()))
def test_bad_input_errors(name, loss):
    emb, lab = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="NaN or inf"):
        loss(emb.masked_fill(torch.eye(6, 4, dtype=torch.bool), float("nan")), lab)
    with pytest.raises(ValueError, match="NaN or inf"):
        loss(emb.masked_fill(torch.eye(6, 4, dtype=torch.bool), float("inf")), lab)
    with pytest.raises(ValueError, match="labels has 5 entries but the embeddings have 6 rows"):
        loss(emb, lab[:5])
    with pytest.raises(TypeError, match="integer"):
        loss(emb, lab.float())
    with pytest.raises(ValueError, match=r"2-D"):
        loss(emb[0], lab)


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_reference_shape_mismatch_names_both_shapes(name):
    emb, lab = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"\(6, 4\).*\(5, 3\)"):
        PAIR_LOSSES[name](emb, lab, torch.randn(5, 3), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="without ref_labels"):
        PAIR_LOSSES[name](emb, lab, torch.randn(5, 4))


@pytest.mark.parametrize("name", sorted(CLASS_LOSSES))
def test_class_losses_check_label_range_and_reference(name):
    loss = CLASS_LOSSES[name]()
    emb = torch.randn(4, 4)
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        loss(emb, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="ref_embeddings is not used"):
        loss(emb, torch.tensor([0, 1, 2, 0]), emb, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(3, 4\)"):
        loss(torch.randn(4, 5), torch.tensor([0, 1, 2, 0]))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8])
@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_label_dtypes_and_large_values(name, dtype):
    emb = F.normalize(torch.randn(12, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    lab = torch.tensor([0, 1, 2, 3] * 3)
    base = PAIR_LOSSES[name](emb, lab)
    torch.testing.assert_close(PAIR_LOSSES[name](emb, lab.to(dtype)), base)
    torch.testing.assert_close(PAIR_LOSSES[name](emb, lab * 10**15 + 7), base)
    torch.testing.assert_close(PAIR_LOSSES[name](emb, np.asarray(lab.numpy(), dtype=np.int32)), base)


def _dense_triplet(d, pos, neg, margin, triplets):
    """B×R×R evaluation of the definition, vectorised (an independent check of the sorted sum)."""
    dap, dan = d[:, :, None], d[:, None, :]
    gap = dan - dap
    sel = pos[:, :, None] & neg[:, None, :]
    sel = sel & {"all": gap == gap, "hard": gap <= 0, "semihard": (gap > 0) & (gap <= margin), "easy": gap > margin}[triplets]
    loss = torch.relu(dap - dan + margin)
    nz = sel & (loss > 0)
    return (loss * nz).sum() / nz.sum() if nz.any() else torch.zeros((), dtype=d.dtype)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(2, 14),
    n_classes=st.integers(1, 5),
    margin=st.sampled_from([0.0, 1.0, 2.0, 0.5]),
    triplets=st.sampled_from(["all", "hard", "semihard", "easy"]),
    loop_max=st.sampled_from([32, -1]),
)
def test_triplet_sum_equals_dense_definition_with_ties(seed, n, n_classes, margin, triplets, loop_max):
    # integer coordinates and squared distances make exact ties between d_an, d_ap and d_ap + m common;
    # both forms: one pass per positive slot (loop_max 32) and the sorted prefix sums (-1)
    import metrix.losses.triplet as triplet_module

    g = torch.Generator().manual_seed(seed)
    emb = torch.randint(-2, 3, (n, 2), generator=g).double()
    lab = torch.randint(0, n_classes, (n,), generator=g)
    saved, triplet_module._LOOP_MAX_POSITIVES = triplet_module._LOOP_MAX_POSITIVES, loop_max
    try:
        ours = L.triplet_margin_loss(emb, lab, margin=margin, triplets=triplets, metric="sqeuclidean")
    finally:
        triplet_module._LOOP_MAX_POSITIVES = saved
    d = ((emb[:, None] - emb[None]) ** 2).sum(-1)
    same = lab[:, None] == lab[None]
    pos = same & ~torch.eye(n, dtype=torch.bool)
    expected = _dense_triplet(d, pos, ~same, margin, triplets)
    assert float(ours) == pytest.approx(float(expected), abs=1e-9)


@pytest.mark.parametrize("margin", [0.0, -1.0])
@pytest.mark.parametrize("triplets", ["all", "hard", "semihard"])
@pytest.mark.parametrize("loop_max", [32, -1])
def test_triplet_windows_with_zero_or_negative_margin_and_ties(margin, triplets, loop_max, monkeypatch):
    """With m ≤ 0 the semi-hard window d_ap < d_an < d_ap + m is empty and ties d_an = d_ap are common on
    integer points: the per-positive form must count nothing there (not −1 per tie)."""
    import metrix.losses.triplet as triplet_module

    monkeypatch.setattr(triplet_module, "_LOOP_MAX_POSITIVES", loop_max)
    lab = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 1, 2])
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        emb = torch.randint(-1, 2, (12, 2), generator=g).double().requires_grad_()
        ours = L.triplet_margin_loss(emb, lab, margin=margin, triplets=triplets, metric="sqeuclidean",
                                     reduction="sum")
        d = ((emb[:, None] - emb[None]) ** 2).sum(-1)
        same = lab[:, None] == lab[None]
        gap = d[:, None, :] - d[:, :, None]  # d_an − d_ap
        sel = (same & ~torch.eye(12, dtype=torch.bool))[:, :, None] & ~same[:, None, :]
        sel = sel & {"all": gap == gap, "hard": gap <= 0, "semihard": (gap > 0) & (gap <= margin)}[triplets]
        expected = (torch.relu(-gap + margin) * sel).sum()
        assert float(ours) == pytest.approx(float(expected), abs=1e-9)
        torch.testing.assert_close(torch.autograd.grad(ours, emb)[0], torch.autograd.grad(expected, emb)[0])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.01, 100.0))
def test_losses_finite_and_nonnegative_on_random_scale(seed, scale):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(10, 4, generator=g) * scale
    lab = torch.randint(0, 3, (10,), generator=g)
    for name, loss in PAIR_LOSSES.items():
        v = loss(emb, lab)
        assert torch.isfinite(v) and float(v) >= 0, name


def test_zero_loss_has_gradient_path_and_changes_nothing():
    emb = torch.randn(4, 3, requires_grad=True)
    v = L.TripletMarginLoss(0.1)(emb, torch.tensor([0, 1, 2, 3]))
    v.backward()
    assert float(v) == 0.0 and torch.equal(emb.grad, torch.zeros_like(emb))


AUTOCAST_LOSSES = dict(CLASS_LOSSES, **{
    "center": lambda: L.CenterLoss(3, 4),
    "subcenter_arcface": lambda: L.SubCenterArcFaceLoss(3, 4),
    "softtriple": lambda: L.SoftTripleLoss(3, 4, centers_per_class=2),
    "large_margin_softmax": lambda: L.LargeMarginSoftmaxLoss(3, 4),
    "sphereface": lambda: L.SphereFaceLoss(3, 4),
})


def test_class_losses_under_bfloat16_autocast():
    emb = torch.randn(8, 4, requires_grad=True)
    lab = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for make in AUTOCAST_LOSSES.values():
        loss = make()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = loss(emb, lab)
        v.backward()
        assert torch.isfinite(v) and loss.weight.dtype == torch.float32 and torch.isfinite(loss.weight.grad).all()
        assert loss.get_logits(emb).shape == (8, 3)


def test_multiple_losses_weighted_sum_and_parameters():
    emb, lab = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    a, b = L.TripletMarginLoss(0.2), L.ProxyNCALoss(3, 4)
    combo = L.MultipleLosses([a, b], weights=[2.0, 0.5])
    torch.testing.assert_close(combo(emb, lab), 2.0 * a(emb, lab) + 0.5 * b(emb, lab))
    assert [p.shape for p in combo.parameters()] == [torch.Size([3, 4])]
    with pytest.raises(ValueError, match="2 losses but 1 weights"):
        L.MultipleLosses([a, b], weights=[1.0])
    with pytest.raises(ValueError, match="at least one"):
        L.MultipleLosses([])


def test_build_loss():
    assert isinstance(L.build_loss("triplet", margin=0.2), L.TripletMarginLoss)
    assert L.build_loss("arcface", num_classes=4, embedding_dim=8).weight.shape == (4, 8)
    with pytest.raises(ValueError, match="needs num_classes"):
        L.build_loss("proxy_anchor")
    with pytest.raises(ValueError, match="unknown loss"):
        L.build_loss("nope")
    with pytest.raises(ValueError, match="triplets must be one of"):
        L.TripletMarginLoss(triplets="hardest")


MATRIX_LOSSES = {
    "contrastive": lambda: L.ContrastiveLoss(neg_margin=1.2),
    "contrastive_cosine": lambda: L.ContrastiveLoss(pos_margin=0.1, neg_margin=0.7, metric="cosine"),
    "batch_hard": lambda: L.TripletMarginLoss(0.3, "batch_hard"),
    "circle": lambda: L.CircleLoss(m=0.25, gamma=16.0),
    "generalized_lifted": lambda: L.GeneralizedLiftedStructureLoss(neg_margin=1.5),
    "multi_similarity": lambda: L.MultiSimilarityLoss(),
}


@pytest.mark.parametrize("name", sorted(MATRIX_LOSSES))
def test_pair_losses_under_bfloat16_autocast(name):
    """bfloat16 embeddings from an autocast layer: the loss works on float32 matrices, returns a finite float32
    value equal to the float32 loss of the same (bf16-rounded) embeddings, and gives finite gradients."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4)
    x, lab = torch.randn(24, 6), torch.arange(6).repeat(4)
    loss = MATRIX_LOSSES[name]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = layer(x)
        value = loss(emb, lab)
    assert emb.dtype == torch.bfloat16 and value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    assert float(value) == pytest.approx(float(loss(emb.detach().float(), lab)), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", sorted(MATRIX_LOSSES))
def test_two_forward_passes_before_one_backward(name):
    """The losses reuse B×R scratch buffers between calls; a second call before the first's backward (two
    losses summed, or a reference-set term) must not corrupt the first one's saved gradient."""
    torch.manual_seed(1)
    emb_a, emb_b, lab = torch.randn(16, 4), torch.randn(16, 4), torch.arange(4).repeat(4)
    loss = MATRIX_LOSSES[name]()
    separate = []
    for e in (emb_a, emb_b):
        leaf = e.clone().requires_grad_()
        loss(leaf, lab).backward()
        separate.append(leaf.grad)
    a, b = emb_a.clone().requires_grad_(), emb_b.clone().requires_grad_()
    (loss(a, lab) + loss(b, lab)).backward()
    torch.testing.assert_close(a.grad, separate[0])
    torch.testing.assert_close(b.grad, separate[1])


def test_scratch_buffers_are_per_thread_and_releasable():
    import threading

    from metrix.losses._common import _SCRATCH

    emb, lab = torch.randn(16, 4), torch.arange(4).repeat(4)
    expected = L.contrastive_loss(emb, lab)
    assert _SCRATCH.buffers  # kept for the next call
    results = []
    workers = [threading.Thread(target=lambda: results.append(L.contrastive_loss(emb, lab))) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert all(float(r) == float(expected) for r in results)
    L.release_scratch()
    assert not _SCRATCH.buffers


def _dense_autograd(name, emb, lab):
    """The same losses written the plain way (dense masks, autograd through every element-wise step)."""
    same = (lab[:, None] == lab[None, :]).double()
    pos = same - torch.eye(len(lab), dtype=torch.float64)
    neg = 1.0 - same
    if name == "contrastive":
        d = torch.cdist(emb, emb)  # the diagonal is outside both masks
        hp, hn = torch.relu(d - 0.1) * pos, torch.relu(1.2 - d) * neg

        def mean_nz(h):
            n = int(torch.count_nonzero(h))
            return h.sum() / n if n else h.sum() * 0

        return mean_nz(hp) + mean_nz(hn)
    if name == "generalized_lifted":
        d = torch.cdist(emb, emb)

        def lse(x, m):
            return torch.where(m.amax(1) > 0, torch.logsumexp(x.masked_fill(m == 0, -torch.inf), 1), 0.0)

        return torch.relu(lse(d, pos) + lse(1.5 - d, neg)).mean()
    s = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(emb, dim=1).T

    def log1p(x, m):
        return torch.log1p((torch.exp(x) * m).sum(1))

    return (log1p(-2.0 * (s - 0.5), pos) / 2.0 + log1p(10.0 * (s - 0.5), neg) / 10.0).mean()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 20), n_classes=st.integers(1, 5),
       scale=st.floats(0.05, 5.0), name=st.sampled_from(["contrastive", "generalized_lifted", "multi_similarity"]))
def test_matrix_gradients_equal_plain_autograd(seed, n, n_classes, scale, name):
    """Property: on any batch (one class, singletons, tiny or large distances) the hand-written matrix gradient
    equals autograd through the plain dense formula, and so does the value."""
    g = torch.Generator().manual_seed(seed)
    emb = (scale * torch.randn(n, 3, generator=g, dtype=torch.float64)).requires_grad_()
    lab = torch.randint(0, n_classes, (n,), generator=g)
    ours = {
        "contrastive": lambda e: L.contrastive_loss(e, lab, pos_margin=0.1, neg_margin=1.2),
        "generalized_lifted": lambda e: L.generalized_lifted_structure_loss(e, lab, neg_margin=1.5),
        "multi_similarity": lambda e: L.multi_similarity_loss(e, lab, beta=10.0, mining=False),
    }[name]
    a = ours(emb)
    (ga,) = torch.autograd.grad(a, emb)
    b = _dense_autograd(name, emb, lab)
    (gb,) = torch.autograd.grad(b, emb, allow_unused=True)
    assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(ga, torch.zeros_like(emb) if gb is None else gb, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("width", [128, 256, 96, 1000])
def test_row_argmax_matches_argmax_including_ties(width):
    from metrix.losses._matrix import row_argmax

    g = torch.Generator().manual_seed(width)
    x = torch.randint(0, 7, (50, width), generator=g).float()  # many ties: the first maximum must win
    x[3] = -torch.finfo(torch.float32).max
    assert torch.equal(row_argmax(x), x.argmax(dim=1))


@pytest.mark.parametrize("empty_rows", [[], [2], [0, 4]])
def test_row_softmax_matches_the_masked_softmax(empty_rows):
    """``row_softmax`` on logits with −inf at the excluded entries gives ``masked_row_softmax``'s log-sum-exp
    and probabilities (up to e^EXP_FLOOR at excluded entries), and an empty row gives lse 0, zero
    probabilities and no NaN."""
    from metrix.losses._matrix import masked_row_softmax, row_softmax

    g = torch.Generator().manual_seed(len(empty_rows))
    logits = 3 * torch.randn(6, 9, generator=g, dtype=torch.float64)
    mask = (torch.rand(6, 9, generator=g) < 0.6).double()
    mask[:, 0] = 1.0
    mask[empty_rows] = 0.0
    want_lse, want_probs = masked_row_softmax(logits.clone(), mask.clone())
    nonempty = mask.any(dim=1)
    lse, probs = row_softmax(logits.masked_fill(mask == 0, -torch.inf), nonempty)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(probs * mask, want_probs, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(probs).all()
    assert float(probs[~nonempty].abs().sum()) == 0.0
    assert float((probs * (1 - mask)).max()) < 1e-30


def test_batch_hard_on_a_wide_batch_matches_the_dense_definition():
    """B = 256 takes the two-level argmax path (the small reference-test batches do not)."""
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(256, 8, generator=g, dtype=torch.float64).requires_grad_()
    lab = torch.randint(0, 16, (256,), generator=g)
    ours = L.triplet_margin_loss(emb, lab, margin=0.3, triplets="batch_hard")
    d = torch.cdist(emb, emb)
    same = lab[:, None] == lab[None, :]
    pos = same & ~torch.eye(256, dtype=torch.bool)
    hardest_pos = d.masked_fill(~pos, -torch.inf).amax(1)
    hardest_neg = d.masked_fill(same, torch.inf).amin(1)
    per_anchor = torch.relu(hardest_pos - hardest_neg + 0.3)
    dense = per_anchor.sum() / torch.count_nonzero(per_anchor)
    assert float(ours.detach()) == pytest.approx(float(dense.detach()), rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, emb)[0], torch.autograd.grad(dense, emb)[0])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 30), r=st.integers(1, 30), n_classes=st.integers(1, 6),
       same_set=st.booleans())
def test_positive_positions_lists_every_positive_once_and_pads_off_the_positives(seed, n, r, n_classes, same_set):
    from metrix.losses._common import positive_positions

    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=g) * 7 - 5  # arbitrary, negative label values too
    ref_labels = labels if same_set else torch.randint(0, n_classes, (r,), generator=g) * 7 - 5
    r = ref_labels.shape[0]
    flat, valid = positive_positions(labels, ref_labels, same_set)
    positive = labels[:, None] == ref_labels[None, :]
    if same_set:
        positive &= ~torch.eye(n, dtype=torch.bool)
    assert sorted(flat[valid].tolist()) == sorted(positive.view(-1).nonzero().view(-1).tolist())
    assert (flat // r == torch.arange(n)[:, None]).all()  # every slot stays in its own row
    for row in range(n):  # no position twice in a row (scatter is then deterministic), padding never positive
        assert len(set(flat[row].tolist())) == flat.shape[1]
    assert not positive.view(-1)[flat[~valid]].any()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 20), r=st.integers(1, 20), density=st.floats(0.0, 1.0))
def test_mask_positions_and_the_write_back_keep_the_positions_contract(seed, n, r, density):
    """A miner's mask in positive_positions' layout: every kept pair once, padding off the mask and distinct
    per row; write_positions changes exactly the valid slots."""
    from metrix.losses._common import gather_positions, mask_positions, write_positions

    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, r, generator=g) < density).float()
    flat, valid = mask_positions(mask)
    assert sorted(flat[valid].tolist()) == mask.view(-1).nonzero().view(-1).tolist()
    assert (flat // r == torch.arange(n)[:, None]).all()
    assert all(len(set(row.tolist())) == flat.shape[1] for row in flat)
    assert not mask.view(-1)[flat[~valid]].any()
    target = torch.randn(n, r, generator=g)
    before = target.clone()
    write_positions(target, flat, valid, torch.full(flat.shape, 7.0))
    torch.testing.assert_close(gather_positions(target, flat)[valid], torch.full((int(valid.sum()),), 7.0))
    torch.testing.assert_close(target[mask == 0], before[mask == 0])


@pytest.mark.parametrize("metric,margins", [("euclidean", (0.1, 1.5)), ("sqeuclidean", (0.1, 1.5)),
                                            ("cosine", (0.2, 0.8))])
@pytest.mark.parametrize("use_ref", [False, True])
def test_contrastive_with_coincident_points(metric, margins, use_ref):
    """Duplicated embeddings (d = 0 inside and across classes): the value is the reference's and the gradient
    is the zero subgradient at d = 0, i.e. autograd of the formula with those pairs held constant."""
    from tests.losses import reference as ref

    g = torch.Generator().manual_seed(5)
    emb = torch.randn(8, 3, generator=g, dtype=torch.float64)
    emb[3], emb[5], emb[6] = emb[0], emb[0], emb[1]  # 0~3 same class, 0~5 and 1~6 across classes
    lab = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    r, rl = (emb[[0, 1, 2, 4, 6]].clone(), lab[[0, 1, 2, 4, 6]]) if use_ref else (None, None)
    kw = dict(pos_margin=margins[0], neg_margin=margins[1], metric=metric)
    x = emb.clone().requires_grad_()
    ours = L.contrastive_loss(x, lab, r, rl, **kw)
    (grad,) = torch.autograd.grad(ours, x)
    assert float(ours.detach()) == pytest.approx(float(ref.contrastive(emb, lab, r, rl, **kw)), rel=1e-12)

    y = emb.clone().requires_grad_()
    other, other_lab, same = (y, lab, True) if r is None else (r, rl, False)
    pos, neg = [], []
    for i in range(len(lab)):
        for j in range(len(other_lab)):
            if same and i == j:
                continue
            d = ref.dist(y[i], other[j], metric)
            if torch.equal(emb[i], other[j].detach()):
                d = d.detach()  # coincident: value kept, no gradient through this pair
            h = torch.relu(d - margins[0]) if lab[i] == other_lab[j] else torch.relu(margins[1] - d)
            (pos if lab[i] == other_lab[j] else neg).append(h)
    expected = sum(ref._mean_nonzero(t) for t in (pos, neg))
    (expected_grad,) = torch.autograd.grad(expected, y)
    assert float(expected) == pytest.approx(float(ours.detach()), rel=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)


def _separated_batch(normalize: bool):
    """Three tight classes around orthogonal centres: no negative pair comes near any margin below."""
    g = torch.Generator().manual_seed(11)
    lab = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 0, 2])
    emb = 3.0 * torch.eye(6, dtype=torch.float64)[lab] + 0.1 * torch.randn(10, 6, generator=g, dtype=torch.float64)
    return (F.normalize(emb, dim=1) if normalize else emb), lab


@pytest.mark.parametrize("metric,margins", [("euclidean", (0.05, 1.0)), ("sqeuclidean", (0.001, 1.5)),
                                            ("cosine", (0.001, 0.5)), ("cosine", (0.0001, 0.5)),
                                            ("dot", (20.0, 1.0))])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("reduction", ["mean_nonzero", "mean"])
@pytest.mark.parametrize("use_ref", [False, True])
def test_contrastive_without_active_negatives_takes_the_positive_list(metric, margins, squared, reduction, use_ref,
                                                                     monkeypatch):
    """No negative within its margin: the gradient goes to the backward as the positive list (against
    itself) or is written into a zero matrix (separate reference). Value and gradient are the reference's,
    and the list path is the one taken."""
    from metrix.losses import _matrix
    from tests.losses import reference as ref

    emb, lab = _separated_batch(normalize=metric != "dot")
    r, rl = (emb[[0, 1, 2, 4, 5, 7]] + 0.01, lab[[0, 1, 2, 4, 5, 7]]) if use_ref else (None, None)
    kw = dict(pos_margin=margins[0], neg_margin=margins[1], metric=metric, squared=squared, reduction=reduction)
    calls = []
    for name in ("_listed_backward", "_densified"):
        original = getattr(_matrix, name)
        monkeypatch.setattr(_matrix, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    inputs = [emb.clone().requires_grad_()] + ([r.clone().requires_grad_()] if use_ref else [])
    ours = L.contrastive_loss(inputs[0], lab, *(inputs[1:] + [rl] if use_ref else []), **kw)
    ours.backward()
    expected_in = [t.detach().clone().requires_grad_() for t in inputs]
    expected = ref.contrastive(expected_in[0], lab, *(expected_in[1:] + [rl] if use_ref else []), **kw)
    expected.backward()
    assert calls == ["_densified" if use_ref else "_listed_backward"]
    assert float(ours.detach()) == pytest.approx(float(expected.detach()), rel=1e-10)
    assert float(ours.detach()) > 0  # the positives are active: the gradient is not trivially zero
    for got, want in zip(inputs, expected_in):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("metric,margins", [("euclidean", (0.05, 1.0)), ("cosine", (0.0001, 0.5))])
@pytest.mark.parametrize("use_ref", [False, True])
def test_gradcheck_contrastive_without_active_negatives(metric, margins, use_ref):
    emb, lab = _separated_batch(normalize=True)
    kw = dict(pos_margin=margins[0], neg_margin=margins[1], metric=metric)
    if use_ref:
        r, rl = emb[[0, 1, 2, 4]] + 0.01, lab[[0, 1, 2, 4]]
        assert torch.autograd.gradcheck(lambda e, rr: L.contrastive_loss(e, lab, rr, rl, **kw),
                                        (emb.clone().requires_grad_(), r.clone().requires_grad_()))
    else:
        assert torch.autograd.gradcheck(lambda e: L.contrastive_loss(e, lab, **kw), (emb.clone().requires_grad_(),))


def test_matrix_losses_refuse_a_second_derivative():
    """The hand-written backward has no graph: asking for a second derivative raises instead of being wrong."""
    emb, lab = _separated_batch(normalize=True)
    x = emb.clone().requires_grad_()
    (grad,) = torch.autograd.grad(L.contrastive_loss(x, lab, neg_margin=1.9), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


@pytest.mark.parametrize("margins", [(float("nan"), 1.0), (0.0, float("inf"))])
def test_contrastive_rejects_non_finite_margins(margins):
    emb, lab = _separated_batch(normalize=True)
    with pytest.raises(ValueError, match="finite"):
        L.contrastive_loss(emb, lab, pos_margin=margins[0], neg_margin=margins[1])


@pytest.mark.parametrize("name", ["generalized_lifted", "contrastive"])
def test_rows_without_negatives_next_to_rows_with_them(name):
    """A reference set of one class: the batch's rows of that class have no negative, the others no positive.
    Each row's empty sum is handled on its own (the reference's value and gradient)."""
    from tests.losses import reference as ref

    g = torch.Generator().manual_seed(3)
    emb = F.normalize(torch.randn(7, 4, generator=g, dtype=torch.float64), dim=1)
    lab = torch.tensor([0, 1, 0, 1, 1, 0, 0])
    r = F.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    rl = torch.zeros(5, dtype=torch.int64)
    ours_fn, ref_fn = {
        "generalized_lifted": (L.generalized_lifted_structure_loss, ref.generalized_lifted),
        "contrastive": (L.contrastive_loss, ref.contrastive),
    }[name]
    kw = dict(neg_margin=1.8)
    x, y = emb.clone().requires_grad_(), r.clone().requires_grad_()
    xe, ye = emb.clone().requires_grad_(), r.clone().requires_grad_()
    ours, expected = ours_fn(x, lab, y, rl, **kw), ref_fn(xe, lab, ye, rl, **kw)
    ours.backward()
    expected.backward()
    assert float(ours.detach()) == pytest.approx(float(expected.detach()), rel=1e-10)
    torch.testing.assert_close(x.grad, xe.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(y.grad, ye.grad, rtol=1e-8, atol=1e-12)
