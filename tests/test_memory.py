import pytest
import torch
import torch.nn.functional as F

from metrix import losses as L
from metrix.memory import CrossBatchMemory, MomentumEncoder


def batch(seed, n=12, dim=5, classes=3):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1),
            torch.randint(0, classes, (n,), generator=g))


def test_fifo_keeps_the_newest_items():
    xbm = CrossBatchMemory(L.ContrastiveLoss(), embedding_dim=2, memory_size=5)
    for start in range(0, 12, 3):
        xbm.enqueue(torch.arange(start, start + 3, dtype=torch.float32)[:, None].repeat(1, 2), torch.arange(start, start + 3))
    emb, labels = xbm.contents()
    assert len(xbm) == 5 and sorted(labels.tolist()) == [7, 8, 9, 10, 11]
    assert torch.equal(emb[:, 0].long(), labels)  # each embedding stays with its label
    xbm.enqueue(torch.zeros(9, 2), torch.arange(100, 109))  # more than the memory holds: the newest 5 win
    assert sorted(xbm.contents()[1].tolist()) == [104, 105, 106, 107, 108]


@pytest.mark.parametrize("loss", [L.TripletMarginLoss(0.2), L.ContrastiveLoss(0.1, 0.9), L.NTXentLoss(0.3),
                                  L.MultiSimilarityLoss(), L.CircleLoss(), L.GeneralizedLiftedStructureLoss()])
def test_empty_memory_equals_the_in_batch_loss(loss):
    emb, labels = batch(0)
    xbm = CrossBatchMemory(loss, embedding_dim=5, memory_size=32).double()
    assert float(xbm(emb, labels)) == pytest.approx(float(loss(emb, labels)), abs=1e-12)
    assert len(xbm) == 12


def _loop_triplets(emb, labels, ref, ref_labels, margin, own_batch):
    terms = []
    for a in range(len(labels)):
        d = [float(torch.linalg.norm(emb[a] - ref[j])) for j in range(len(ref_labels))]
        cols = [j for j in range(len(ref_labels)) if not (own_batch and j == a)]
        for p in cols:
            for n in cols:
                if ref_labels[p] == labels[a] and ref_labels[n] != labels[a]:
                    terms.append(max(0.0, d[p] - d[n] + margin))
    nz = [t for t in terms if t > 0]
    return sum(nz) / len(nz)


def test_memory_adds_reference_items_like_the_loop_definition():
    xbm = CrossBatchMemory(L.TripletMarginLoss(0.3), embedding_dim=5, memory_size=20).double()
    old, old_labels = batch(1, n=8)
    xbm.enqueue(old, old_labels)
    emb, labels = batch(2)
    value = xbm(emb, labels)
    expected = _loop_triplets(emb, labels, torch.cat([emb, old]), torch.cat([labels, old_labels]), 0.3, True)
    assert float(value) == pytest.approx(expected, abs=1e-10)
    assert len(xbm) == 20  # 8 old + 12 new


def test_moco_style_keys_and_state_dict():
    queries, ids = batch(3, n=6, classes=6)
    keys, _ = batch(4, n=6, classes=6)
    xbm = CrossBatchMemory(L.NTXentLoss(0.2), embedding_dim=5, memory_size=12).double()
    xbm.enqueue(*batch(5, n=4, classes=6))
    mem, mem_labels = (t.clone() for t in xbm.contents())
    value = xbm(queries, ids, keys, ids)  # positives: the key of the same sample id (and any queued ones)
    expected = L.NTXentLoss(0.2)(queries, ids, torch.cat([keys, mem]), torch.cat([ids, mem_labels]))
    assert float(value) == pytest.approx(float(expected), abs=1e-12)
    assert len(xbm) == 10
    restored = CrossBatchMemory(L.NTXentLoss(0.2), embedding_dim=5, memory_size=12).double()
    restored.load_state_dict(xbm.state_dict())
    assert len(restored) == 10 and torch.equal(restored.contents()[0], xbm.contents()[0])


def test_bad_input():
    xbm = CrossBatchMemory(L.ContrastiveLoss(), embedding_dim=4, memory_size=8)
    with pytest.raises(ValueError, match=r"\(3, 5\).*4-d"):
        xbm.enqueue(torch.randn(3, 5), torch.arange(3))
    with pytest.raises(ValueError, match="NaN"):
        xbm(torch.full((2, 4), float("nan")), torch.arange(2))
    with pytest.raises(ValueError, match=">= 1"):
        CrossBatchMemory(L.ContrastiveLoss(), embedding_dim=4, memory_size=0)


def test_momentum_encoder_update():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = MomentumEncoder(model, momentum=0.9)
    before = [p.clone() for p in ema.encoder.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(8, 3))  # changes BatchNorm running stats
    ema.update(model)
    for b, k, q in zip(before, ema.encoder.parameters(), model.parameters()):
        torch.testing.assert_close(k, 0.9 * b + 0.1 * q)
        assert not k.requires_grad
    torch.testing.assert_close(ema.encoder[1].running_mean, model[1].running_mean)
    assert not ema(torch.randn(4, 3)).requires_grad
    with pytest.raises(ValueError, match="momentum"):
        MomentumEncoder(model, momentum=1.0)


def test_reset_empties_the_memory():
    emb, labels = batch(7)
    loss = L.TripletMarginLoss(0.2)
    xbm = CrossBatchMemory(loss, embedding_dim=5, memory_size=32).double()
    xbm.enqueue(*batch(8))
    xbm.reset()
    assert len(xbm) == 0
    assert float(xbm(emb, labels)) == pytest.approx(float(loss(emb, labels)), abs=1e-12)  # as if never filled
