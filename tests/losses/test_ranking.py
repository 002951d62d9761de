"""Ranking losses and negative sampling against loops written from the papers' formulas."""

import math

import pytest
import torch

from metrix import losses as L

DT = torch.float64


def lists(seed, q=4, n=6, levels=3):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(q, n, generator=g, dtype=DT)
    rel = torch.randint(0, levels, (q, n), generator=g).to(DT)
    mask = torch.ones(q, n, dtype=torch.bool)
    mask[0, -2:] = False  # a shorter list
    return scores, rel, mask


def ref_pairwise(scores, rel, mask, term):
    out = []
    for q in range(scores.shape[0]):
        items = [i for i in range(scores.shape[1]) if mask[q, i]]
        for i in items:
            for j in items:
                if rel[q, i] > rel[q, j]:
                    out.append(term(scores[q, i] - scores[q, j]))
    return torch.stack(out).mean()


def ref_listnet(scores, rel, mask):
    losses = []
    for q in range(scores.shape[0]):
        items = [i for i in range(scores.shape[1]) if mask[q, i]]
        z_rel = sum(math.exp(float(rel[q, i])) for i in items)
        z_s = sum(torch.exp(scores[q, i]) for i in items)
        losses.append(-sum(math.exp(float(rel[q, i])) / z_rel * torch.log(torch.exp(scores[q, i]) / z_s) for i in items))
    return torch.stack(losses).mean()


def ref_listmle(scores, rel, mask):
    losses = []
    for q in range(scores.shape[0]):
        items = [i for i in range(scores.shape[1]) if mask[q, i]]
        order = sorted(items, key=lambda i: -float(rel[q, i]))  # stable: ties keep list order
        nll = 0.0
        for k, i in enumerate(order):
            nll = nll - scores[q, i] + torch.log(sum(torch.exp(scores[q, j]) for j in order[k:]))
        losses.append(nll)
    return torch.stack(losses).mean()


def _compare(ours, reference, inputs):
    a_in = [t.clone().requires_grad_() for t in inputs]
    b_in = [t.clone().requires_grad_() for t in inputs]
    a, b = ours(*a_in), reference(*b_in)
    assert float(a.detach()) == pytest.approx(float(b.detach()), abs=1e-10)
    a.backward()
    b.backward()
    for x, y in zip(a_in, b_in):
        torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pairwise_and_listwise_match_loops(seed):
    scores, rel, mask = lists(seed)
    _compare(lambda s: L.ranknet_loss(s, rel, mask), lambda s: ref_pairwise(s, rel, mask, lambda d: torch.log1p(torch.exp(-d))), [scores])
    _compare(lambda s: L.pairwise_margin_loss(s, rel, mask, margin=0.5), lambda s: ref_pairwise(s, rel, mask, lambda d: torch.relu(0.5 - d)), [scores])
    _compare(lambda s: L.listnet_loss(s, rel, mask), lambda s: ref_listnet(s, rel, mask), [scores])
    _compare(lambda s: L.listmle_loss(s, rel, mask), lambda s: ref_listmle(s, rel, mask), [scores])


def test_pointwise_and_gradcheck():
    scores, rel, mask = lists(3)
    expected = ((scores - rel) ** 2)[mask].mean()
    assert float(L.pointwise_loss(scores, rel, mask)) == pytest.approx(float(expected))
    binary = (rel > 0).to(DT)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(scores[mask], binary[mask])
    assert float(L.RankingLoss("pointwise", objective="bce")(scores, binary, mask)) == pytest.approx(float(expected))
    for fn in (L.ranknet_loss, L.listnet_loss, L.listmle_loss):
        assert torch.autograd.gradcheck(lambda s: fn(s, rel, mask), (scores.clone().requires_grad_(),))


def test_perfect_ranking_scores_better_than_reversed():
    rel = torch.tensor([[3.0, 2.0, 1.0, 0.0]], dtype=DT)
    good, bad = rel * 3, -rel * 3
    for kind in ("ranknet", "margin", "listnet", "listmle"):
        loss = L.RankingLoss(kind)
        assert float(loss(good, rel)) < float(loss(bad, rel)), kind


def test_ranking_bad_input_and_degenerate():
    scores = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"relevance has shape \(2, 2\) but scores has shape \(2, 3\)"):
        L.ranknet_loss(scores, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="NaN"):
        L.listnet_loss(torch.full((2, 3), float("nan")), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"relevance in \[0, 1\]"):
        L.pointwise_loss(scores, torch.full((2, 3), 2.0), objective="bce")
    with pytest.raises(ValueError, match="kind must be one of"):
        L.RankingLoss("lambdamart")
    s = scores.clone().requires_grad_()
    flat = L.ranknet_loss(s, torch.ones(2, 3))  # one relevance level: no ordered pair
    flat.backward()
    assert float(flat) == 0.0 and torch.isfinite(s.grad).all()


def test_negative_sampling_matches_formula_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    a, p = torch.randn(4, 3, generator=g, dtype=DT), torch.randn(4, 3, generator=g, dtype=DT)
    negs = torch.randn(4, 5, 3, generator=g, dtype=DT)
    expected = torch.stack([
        -torch.log(torch.sigmoid(a[i] @ p[i])) - sum(torch.log(torch.sigmoid(-(a[i] @ n))) for n in negs[i]) for i in range(4)
    ]).mean()
    assert float(L.NegativeSamplingLoss()(a, p, negs)) == pytest.approx(float(expected), abs=1e-10)
    shared = negs[0]
    expected_shared = torch.stack([
        -torch.log(torch.sigmoid(a[i] @ p[i])) - sum(torch.log(torch.sigmoid(-(a[i] @ n))) for n in shared) for i in range(4)
    ]).mean()
    assert float(L.negative_sampling_loss(a, p, shared)) == pytest.approx(float(expected_shared), abs=1e-10)
    assert torch.autograd.gradcheck(L.negative_sampling_loss, (a.requires_grad_(), p.requires_grad_(), negs.requires_grad_()))
    with pytest.raises(ValueError, match="negatives must be"):
        L.negative_sampling_loss(a, p, torch.randn(3, 5, 3))


@pytest.mark.parametrize("fn", [L.pointwise_loss, L.ranknet_loss, L.pairwise_margin_loss, L.listnet_loss, L.listmle_loss])
def test_float32_with_padding_equals_float64(fn):
    scores, rel, mask = lists(4)
    ours = fn(scores.float(), rel.float(), mask)
    assert float(ours) == pytest.approx(float(fn(scores, rel, mask)), rel=1e-5, abs=1e-6)
