"""Batch samplers for metric learning.

:class:`ClassBalancedBatchSampler` builds batches of ``classes_per_batch × samples_per_class``
(the "P×K" batches of Hermans et al. 2017), which every pair/triplet loss needs: a batch with
random labels often has no positive pair at all.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Yield batches of ``classes_per_batch`` distinct classes × ``samples_per_class`` samples each.

    Every sample is used about once per epoch: each class's samples are shuffled and cut into
    groups of ``samples_per_class`` (the last group topped up with other samples of the same class),
    and the groups are dealt into batches, always taking the classes with the most groups left so
    no class is starved at the end of the epoch. The order depends only on ``(seed, epoch)``: call
    :meth:`set_epoch` each epoch (metrix's Trainer does) for a new, reproducible order.

    Parameters
    ----------
    labels : sequence of hashable labels (ints of any size, strings)
    classes_per_batch, samples_per_class : the P and K of a P×K batch
    seed : base seed of the shuffling
    replacement : allow classes with fewer than ``samples_per_class`` samples (drawn with replacement);
        without it such classes raise ``ValueError``.

    Example
    -------
    >>> s = ClassBalancedBatchSampler([0, 0, 1, 1, 2, 2, 3, 3], classes_per_batch=2, samples_per_class=2, seed=0)
    >>> len(s), len(next(iter(s)))
    (2, 4)
    """

    def __init__(self, labels, classes_per_batch: int, samples_per_class: int, seed: int = 0, replacement: bool = False):
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {labels.shape}")
        if int(classes_per_batch) < 1 or int(samples_per_class) < 1:
            raise ValueError(
                f"classes_per_batch and samples_per_class must be >= 1, got {classes_per_batch} and {samples_per_class}"
            )
        self.classes_per_batch, self.samples_per_class = int(classes_per_batch), int(samples_per_class)
        self.seed, self.replacement, self.epoch = int(seed), bool(replacement), 0
        classes, codes = np.unique(labels, return_inverse=True)
        if len(classes) < self.classes_per_batch:
            raise ValueError(
                f"classes_per_batch={self.classes_per_batch} but the labels have only {len(classes)} classes"
            )
        self._members = [np.flatnonzero(codes == c) for c in range(len(classes))]
        too_small = [(classes[c], len(m)) for c, m in enumerate(self._members) if len(m) < self.samples_per_class]
        if too_small and not self.replacement:
            shown = ", ".join(f"{lab!r} ({n})" for lab, n in too_small[:5])
            raise ValueError(
                f"{len(too_small)} class(es) have fewer than samples_per_class={self.samples_per_class} samples: "
                f"{shown}; lower samples_per_class (--samples-per-class) or pass replacement=True"
            )
        groups = sum(self._n_groups(len(m)) for m in self._members)
        self._n_batches = groups // self.classes_per_batch
        if self._n_batches == 0:
            raise ValueError("not enough samples for a single batch")

    def _n_groups(self, n: int) -> int:
        return max(1, -(-n // self.samples_per_class))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._n_batches

    def _class_groups(self, members: np.ndarray, rng) -> list[np.ndarray]:
        k = self.samples_per_class
        if len(members) < k:
            return [rng.choice(members, size=k, replace=True)]
        order = rng.permutation(members)
        groups = [order[i : i + k] for i in range(0, len(order), k)]
        if len(groups[-1]) < k:  # top up from the rest of the class, without repeats inside the group
            rest = np.setdiff1d(members, groups[-1])
            groups[-1] = np.concatenate([groups[-1], rng.choice(rest, size=k - len(groups[-1]), replace=False)])
        return groups

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        per_class = [self._class_groups(m, rng) for m in self._members]
        left = np.array([len(g) for g in per_class], dtype=np.int64)
        for _ in range(self._n_batches):
            # classes with the most groups left first; random order among equals
            tiebreak = rng.random(len(left))
            chosen = np.lexsort((tiebreak, -left))[: self.classes_per_batch]
            batch = []
            for c in chosen:
                if left[c] == 0:  # heavily imbalanced data: a small class is reused with a fresh shuffle
                    per_class[c] = self._class_groups(self._members[c], rng)
                    left[c] = len(per_class[c])
                left[c] -= 1
                batch.extend(int(i) for i in per_class[c][left[c]])
            yield batch
