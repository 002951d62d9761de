"""Weak supervision from labels: similar/dissimilar pairs and (anchor, positive, negative) triplets.

Pair learners (ITML, MMC) learn from pairs labelled +1 (similar) / −1 (dissimilar). When only
class labels are available these helpers sample such pairs at random, as the original papers
did (e.g. Davis et al. 2007 draw 20·c² constraints for c classes).
"""

from __future__ import annotations

import numpy as np
from sklearn.utils import check_random_state

from metrix.classical._base import encode_classes


def _partners(codes: np.ndarray, anchors: np.ndarray, same: bool, rng) -> np.ndarray:
    """For each anchor, a random other sample of the same (or a different) class."""
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    c = codes[anchors]
    if same:
        # draw among the n_c − 1 others, skipping the anchor's own slot
        pos_in_class = np.empty(len(codes), dtype=np.int64)
        pos_in_class[order] = np.arange(len(codes)) - np.repeat(starts, counts)
        r = rng.integers(0, counts[c] - 1)
        r = r + (r >= pos_in_class[anchors])
        return order[starts[c] + r]
    n = len(codes)
    r = rng.integers(0, n - counts[c])  # draw among the samples outside the anchor's class
    r = r + counts[c] * (r >= starts[c])
    return order[r]


def pair_indices_from_labels(y, n_similar: int, n_dissimilar: int | None = None, random_state=None):
    """Random index pairs ``(n_pairs, 2)`` and their labels (+1 same class, −1 different class).

    Parameters
    ----------
    y : array of shape (n_samples,)
        Class labels; at least two classes, and one class with two samples for similar pairs.
    n_similar, n_dissimilar : int
        How many pairs of each kind to draw (``n_dissimilar`` defaults to ``n_similar``).
    random_state : int, Generator or None

    Returns
    -------
    pairs : int array (n_pairs, 2); labels : int array (n_pairs,) of ±1

    Example
    -------
    >>> idx, lab = pair_indices_from_labels([0, 0, 1, 1], 2, random_state=0)
    >>> idx.shape, sorted(set(lab.tolist()))
    ((4, 2), [-1, 1])
    """
    _, codes = encode_classes(y)
    n_dissimilar = n_similar if n_dissimilar is None else n_dissimilar
    if n_similar < 0 or n_dissimilar < 0:
        raise ValueError("the numbers of pairs must be non-negative")
    rng = np.random.default_rng(check_random_state(random_state).randint(2**31 - 1))
    counts = np.bincount(codes)
    eligible = np.flatnonzero(counts[codes] >= 2)
    if n_similar and len(eligible) == 0:
        raise ValueError("no class has two samples: similar pairs cannot be formed")
    a_sim = eligible[rng.integers(0, len(eligible), n_similar)] if n_similar else np.empty(0, np.int64)
    b_sim = _partners(codes, a_sim, True, rng) if n_similar else np.empty(0, np.int64)
    a_dis = rng.integers(0, len(codes), n_dissimilar)
    b_dis = _partners(codes, a_dis, False, rng) if n_dissimilar else np.empty(0, np.int64)
    pairs = np.stack([np.concatenate([a_sim, a_dis]), np.concatenate([b_sim, b_dis])], axis=1)
    labels = np.concatenate([np.ones(n_similar, np.int64), -np.ones(n_dissimilar, np.int64)])
    return pairs.astype(np.int64), labels


def pairs_from_labels(X, y, n_similar: int, n_dissimilar: int | None = None, random_state=None):
    """Like :func:`pair_indices_from_labels` but returns the vectors, shape ``(n_pairs, 2, n_features)``."""
    X = np.asarray(X)
    idx, labels = pair_indices_from_labels(y, n_similar, n_dissimilar, random_state)
    return X[idx], labels


def triplet_indices_from_labels(y, n_triplets: int, random_state=None) -> np.ndarray:
    """Random ``(anchor, positive, negative)`` index triplets, shape ``(n_triplets, 3)``."""
    _, codes = encode_classes(y)
    rng = np.random.default_rng(check_random_state(random_state).randint(2**31 - 1))
    eligible = np.flatnonzero(np.bincount(codes)[codes] >= 2)
    if len(eligible) == 0:
        raise ValueError("no class has two samples: triplets cannot be formed")
    anchors = eligible[rng.integers(0, len(eligible), n_triplets)]
    return np.stack([anchors, _partners(codes, anchors, True, rng),
                     _partners(codes, anchors, False, rng)], axis=1)
