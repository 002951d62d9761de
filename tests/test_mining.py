"""Miners against loop references written from their definitions, and their use with the losses."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metrix import losses as L
from metrix.mining import (
    AnnealedMiner,
    DistanceWeightedMiner,
    EasyMiner,
    HardestMiner,
    MultiSimilarityMiner,
    RandomMiner,
)


def batch(seed=0, n=24, dim=6, classes=4):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    labels = torch.cat([torch.arange(classes), torch.randint(0, classes, (n - classes,), generator=g)])
    return emb, labels


def loop_masks(emb, labels):
    n = len(labels)
    d = [[float(torch.linalg.norm(emb[i] - emb[j])) for j in range(n)] for i in range(n)]
    pos = [[j for j in range(n) if j != i and labels[j] == labels[i]] for i in range(n)]
    neg = [[j for j in range(n) if labels[j] != labels[i]] for i in range(n)]
    return d, pos, neg


def as_sets(mask):
    return [set(torch.nonzero(row).flatten().tolist()) for row in mask]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_pos,n_neg", [(1, 1), (2, 3), (10, 0)])
def test_hardest_and_easiest_match_loop_reference(seed, n_pos, n_neg):
    emb, labels = batch(seed)
    d, pos, neg = loop_masks(emb, labels)
    hard, easy = HardestMiner(n_pos, n_neg)(emb, labels), EasyMiner(n_pos, n_neg)(emb, labels)
    for i in range(len(labels)):
        assert as_sets(hard.pos)[i] == set(sorted(pos[i], key=lambda j: -d[i][j])[:n_pos])
        assert as_sets(hard.neg)[i] == set(sorted(neg[i], key=lambda j: d[i][j])[:n_neg])
        assert as_sets(easy.pos)[i] == set(sorted(pos[i], key=lambda j: d[i][j])[:n_pos])
        assert as_sets(easy.neg)[i] == set(sorted(neg[i], key=lambda j: -d[i][j])[:n_neg])


def test_batch_hard_mining_with_triplet_loss_equals_batch_hard_triplets():
    emb, labels = batch(3)
    pairs = HardestMiner()(emb, labels)
    for reduction in ("mean_nonzero", "mean", "sum"):
        ours = L.TripletMarginLoss(0.3, reduction=reduction)(emb, labels, pairs=pairs)
        built_in = L.TripletMarginLoss(0.3, "batch_hard", reduction=reduction)(emb, labels)
        assert float(ours) == pytest.approx(float(built_in), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_multi_similarity_miner_matches_loop_and_ms_loss(seed):
    emb, labels = batch(seed)
    pairs = MultiSimilarityMiner(0.1)(emb, labels)
    s = (emb @ emb.T).tolist()
    _, pos, neg = loop_masks(emb, labels)
    for i in range(len(labels)):
        max_neg = max(s[i][j] for j in neg[i])
        min_pos = min(s[i][j] for j in pos[i]) if pos[i] else math.inf
        assert as_sets(pairs.pos)[i] == {j for j in pos[i] if s[i][j] - 0.1 < max_neg}
        assert as_sets(pairs.neg)[i] == {j for j in neg[i] if s[i][j] + 0.1 > min_pos}
    mined = L.MultiSimilarityLoss(mining=False)(emb, labels, pairs=pairs)
    assert float(mined) == pytest.approx(float(L.MultiSimilarityLoss(mining=True)(emb, labels)), abs=1e-12)


def test_random_miner_fraction_and_seed():
    emb, labels = batch(0, n=64)
    a = RandomMiner(pos_fraction=1.0, neg_fraction=0.25, seed=5)(emb, labels)
    b = RandomMiner(pos_fraction=1.0, neg_fraction=0.25, seed=5)(emb, labels)
    assert torch.equal(a.neg, b.neg) and torch.equal(a.pos, b.pos)
    _, neg = L._common.label_masks(L._common.prepare_batch(emb, labels))
    kept = float(a.neg.sum() / neg.sum())
    assert 0.2 < kept < 0.3 and bool((a.neg <= neg).all())
    with pytest.raises(ValueError, match=r"neg_fraction must be in \[0, 1\]"):
        RandomMiner(neg_fraction=1.5)


def test_distance_weighted_sampling_follows_inverse_density():
    # one anchor, four negatives at known distances: empirical frequencies must follow 1/q(d)
    dim = 8
    anchor = torch.tensor([[1.0] + [0.0] * (dim - 1)], dtype=torch.float64)
    angles = torch.tensor([0.6, 0.9, 1.2, 1.5], dtype=torch.float64)
    negs = torch.zeros(4, dim, dtype=torch.float64)
    negs[:, 0], negs[:, 1] = torch.cos(angles), torch.sin(angles)
    emb = torch.cat([anchor, negs])
    labels = torch.tensor([0, 1, 2, 3, 4])
    miner = DistanceWeightedMiner(n_neg=1, cutoff=0.1, nonzero_loss_cutoff=1.99, seed=0)
    counts = torch.zeros(4)
    for _ in range(4000):
        counts += miner(emb, labels).neg[0, 1:]
    d = torch.linalg.norm(negs - anchor, dim=1)
    w = 1.0 / (d ** (dim - 2) * (1 - d**2 / 4) ** ((dim - 3) / 2))
    np.testing.assert_allclose((counts / counts.sum()).numpy(), (w / w.sum()).numpy(), atol=0.03)


def test_distance_weighted_respects_cutoffs_and_counts():
    emb, labels = batch(1, n=40, dim=16)
    pairs = DistanceWeightedMiner(n_neg=3, seed=1)(emb, labels)
    assert (pairs.neg.sum(dim=1) == 3).all()  # enough negatives everywhere
    _, neg = L._common.label_masks(L._common.prepare_batch(emb, labels))
    assert bool((pairs.neg <= neg).all())
    with pytest.raises(ValueError, match="dimension >= 2"):
        DistanceWeightedMiner()(torch.ones(4, 1, dtype=torch.float64), torch.tensor([0, 0, 1, 1]))


def test_annealed_miner_moves_from_easy_to_hard():
    emb, labels = batch(2)
    d, _, neg = loop_masks(emb, labels)
    miner = AnnealedMiner(n_neg=2, start_step=0, end_step=4)
    first = miner(emb, labels)  # step 0: hardness 0 -> the two farthest negatives
    miner.set_step(4)
    last = miner(emb, labels)  # hardness 1 -> the two closest negatives
    for i in range(len(labels)):
        ranked = sorted(neg[i], key=lambda j: d[i][j])
        assert as_sets(first.neg)[i] == set(ranked[-2:])
        assert as_sets(last.neg)[i] == set(ranked[:2])
    assert miner.hardness(2) == 0.5 and miner.step == 5
    with pytest.raises(ValueError, match="end_step must be after"):
        AnnealedMiner(start_step=5, end_step=5)


@pytest.mark.parametrize("loss", [L.ContrastiveLoss(), L.TripletMarginLoss(0.1), L.MultiSimilarityLoss(mining=False),
                                  L.NTXentLoss(), L.CircleLoss(), L.GeneralizedLiftedStructureLoss(), L.NCALoss(),
                                  L.AngularLoss(), L.SmoothAPLoss(), L.MarginLoss(learn_beta=False)])
def test_every_pair_loss_accepts_mined_pairs(loss):
    emb, labels = batch(4)
    emb = emb.clone().requires_grad_()
    value = loss(emb, labels, pairs=HardestMiner(2, 2)(emb, labels))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(emb.grad).all()
    everything = L.Pairs(torch.ones(24, 24, dtype=torch.float64), torch.ones(24, 24, dtype=torch.float64))
    assert float(loss(emb, labels, pairs=everything).detach()) == pytest.approx(float(loss(emb, labels).detach()), abs=1e-12)
    with pytest.raises(ValueError, match=r"pairs.pos has shape \(3, 3\) but the batch needs \(24, 24\)"):
        loss(emb, labels, pairs=L.Pairs(torch.ones(3, 3), torch.ones(3, 3)))


def test_miners_work_with_a_reference_set_and_carry_no_gradient():
    emb, labels = batch(5)
    ref, ref_labels = batch(6, n=30)
    emb = emb.clone().requires_grad_()
    pairs = HardestMiner()(emb, labels, ref, ref_labels)
    assert pairs.pos.shape == (24, 30) and not pairs.pos.requires_grad
    assert (pairs.neg.sum(dim=1) == 1).all()
