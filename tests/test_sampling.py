import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from metrix.sampling import ClassBalancedBatchSampler


def test_batches_have_p_classes_k_samples_and_cover_every_sample():
    labels = np.repeat(np.arange(10), [7, 8, 9, 10, 11, 12, 13, 14, 15, 16])
    s = ClassBalancedBatchSampler(labels, classes_per_batch=4, samples_per_class=4, seed=3)
    seen = []
    for batch in s:
        assert len(batch) == 16
        lab, counts = np.unique(labels[batch], return_counts=True)
        assert len(lab) == 4 and (counts == 4).all()
        assert len(set(batch)) == 16  # no repeats inside a batch
        seen.extend(batch)
    assert len(list(iter(s))) == len(s)
    assert set(seen) == set(range(len(labels)))  # every sample at least once
    # "about once": total draws within one batch of the dataset size
    assert len(seen) <= len(labels) + 16 * 2


def test_deterministic_under_seed_and_epoch():
    labels = np.repeat(np.arange(6), 9)
    a = ClassBalancedBatchSampler(labels, 3, 3, seed=1)
    b = ClassBalancedBatchSampler(labels, 3, 3, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(ClassBalancedBatchSampler(labels, 3, 3, seed=2)) != first


def test_string_and_large_labels():
    labels = ["cat", "dog", "eel"] * 4
    s = ClassBalancedBatchSampler(labels, 2, 2, seed=0)
    for batch in s:
        assert len({labels[i] for i in batch}) == 2
    big = np.array([10**15, 10**15, 3, 3, -7, -7])
    assert len(ClassBalancedBatchSampler(big, 3, 2)) == 1


def test_too_few_samples_error_and_replacement():
    labels = [0, 0, 0, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match=r"fewer than samples_per_class=3.*1 \(2\), 2 \(2\)|fewer than samples_per_class=3"):
        ClassBalancedBatchSampler(labels, 2, 3)
    s = ClassBalancedBatchSampler(labels, 2, 3, replacement=True)
    for batch in s:
        assert len(batch) == 6
    with pytest.raises(ValueError, match="only 3 classes"):
        ClassBalancedBatchSampler(labels, 4, 1)
    with pytest.raises(ValueError, match=">= 1"):
        ClassBalancedBatchSampler(labels, 0, 1)


def test_imbalanced_classes_never_break_a_batch():
    labels = np.array([0] * 40 + [1] * 2 + [2] * 2)
    s = ClassBalancedBatchSampler(labels, 2, 2, seed=0)
    for batch in s:
        assert len(set(labels[batch])) == 2 and len(batch) == 4


def test_works_as_dataloader_batch_sampler():
    x, y = torch.randn(40, 3), torch.arange(5).repeat(8)
    loader = DataLoader(TensorDataset(x, y), batch_sampler=ClassBalancedBatchSampler(y.numpy(), 5, 4, seed=0))
    xb, yb = next(iter(loader))
    assert xb.shape == (20, 3) and torch.bincount(yb).tolist() == [4] * 5
