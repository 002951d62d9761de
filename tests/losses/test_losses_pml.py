"""Same inputs, same hyper-parameters: metrix and pytorch-metric-learning give the same value."""

import math

import pytest
import torch
import torch.nn.functional as F

from metrix import losses as L

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
from pytorch_metric_learning import miners as pml_miners  # noqa: E402

DT = torch.float64


def batch(seed, n=48, dim=16, n_classes=6):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n, dim, generator=g, dtype=DT), dim=1)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    return emb, labels


def close(a, b):
    assert float(a.detach()) == pytest.approx(float(b.detach()), abs=1e-6, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_contrastive(seed):
    e, l = batch(seed)
    close(L.ContrastiveLoss(0.2, 0.8)(e, l), pml_losses.ContrastiveLoss(pos_margin=0.2, neg_margin=0.8)(e, l))
    r, rl = batch(seed + 10, n=30)
    close(L.ContrastiveLoss(0.2, 0.8)(e, l, r, rl), pml_losses.ContrastiveLoss(pos_margin=0.2, neg_margin=0.8)(e, l, ref_emb=r, ref_labels=rl))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", ["all", "hard", "semihard", "easy"])
def test_triplet_with_pml_miner(seed, kind):
    e, l = batch(seed)
    miner = pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets=kind)
    theirs = pml_losses.TripletMarginLoss(margin=0.2)(e, l, miner(e, l))
    close(L.TripletMarginLoss(margin=0.2, triplets=kind)(e, l), theirs)


def test_triplet_all_without_miner_and_with_reference():
    e, l = batch(3)
    close(L.TripletMarginLoss(margin=0.1)(e, l), pml_losses.TripletMarginLoss(margin=0.1)(e, l))
    r, rl = batch(4, n=40)
    close(L.TripletMarginLoss(margin=0.1)(e, l, r, rl), pml_losses.TripletMarginLoss(margin=0.1)(e, l, ref_emb=r, ref_labels=rl))


def test_triplet_batch_hard():
    e, l = batch(5)
    theirs = pml_losses.TripletMarginLoss(margin=0.2)(e, l, pml_miners.BatchHardMiner()(e, l))
    close(L.TripletMarginLoss(margin=0.2, triplets="batch_hard")(e, l), theirs)


@pytest.mark.parametrize("seed", [0, 1])
def test_multi_similarity_with_and_without_miner(seed):
    e, l = batch(seed)
    theirs = pml_losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)
    close(L.MultiSimilarityLoss(mining=False)(e, l), theirs(e, l))
    mined = pml_miners.MultiSimilarityMiner(epsilon=0.1)(e, l)
    close(L.MultiSimilarityLoss(mining=True)(e, l), theirs(e, l, mined))


@pytest.mark.parametrize("seed", [0, 1])
def test_ntxent_equals_supcon_and_simclr(seed):
    e, l = batch(seed, n=40)
    close(L.NTXentLoss(0.1)(e, l), pml_losses.SupConLoss(temperature=0.1)(e, l))
    # two views per sample: PML's NTXentLoss (one positive per anchor) is the same quantity
    ids = torch.arange(20).repeat(2)
    close(L.NTXentLoss(0.07)(e, ids), pml_losses.NTXentLoss(temperature=0.07)(e, ids))


def test_arcface_cosface_proxy_anchor():
    e, l = batch(7, n=32, dim=8, n_classes=5)
    ours = L.ArcFaceLoss(5, 8, margin=0.5, scale=64).double()
    theirs = pml_losses.ArcFaceLoss(5, 8, margin=math.degrees(0.5), scale=64).double()
    theirs.W.data = ours.weight.data.T.clone()
    close(ours(e, l), theirs(e, l))

    ours = L.CosFaceLoss(5, 8, margin=0.35, scale=64).double()
    theirs = pml_losses.CosFaceLoss(5, 8, margin=0.35, scale=64).double()
    theirs.W.data = ours.weight.data.T.clone()
    close(ours(e, l), theirs(e, l))

    ours = L.ProxyAnchorLoss(5, 8, margin=0.1, alpha=32).double()
    theirs = pml_losses.ProxyAnchorLoss(5, 8, margin=0.1, alpha=32).double()
    theirs.proxies.data = ours.weight.data.clone()
    close(ours(e, l), theirs(e, l))


@pytest.mark.parametrize("seed", [0, 1])
def test_circle_and_generalized_lifted(seed):
    e, l = batch(seed)
    close(L.CircleLoss(m=0.4, gamma=80)(e, l), pml_losses.CircleLoss(m=0.4, gamma=80)(e, l))
    r, rl = batch(seed + 20, n=30)
    close(L.CircleLoss(m=0.25, gamma=32)(e, l, r, rl), pml_losses.CircleLoss(m=0.25, gamma=32)(e, l, ref_emb=r, ref_labels=rl))
    close(L.GeneralizedLiftedStructureLoss(0.1, 1.0)(e, l), pml_losses.GeneralizedLiftedStructureLoss(neg_margin=1.0, pos_margin=0.1)(e, l))


def test_proxy_nca_and_normalized_softmax():
    e, l = batch(9, n=32, dim=8, n_classes=5)
    ours = L.ProxyNCALoss(5, 8).double()
    theirs = pml_losses.ProxyNCALoss(5, 8).double()
    theirs.proxies.data = ours.weight.data.clone()
    close(ours(e, l), theirs(e, l))
    ours = L.NormalizedSoftmaxLoss(5, 8, temperature=0.05).double()
    theirs = pml_losses.NormalizedSoftmaxLoss(5, 8, temperature=0.05).double()
    theirs.W.data = ours.weight.data.T.clone()
    close(ours(e, l), theirs(e, l))
