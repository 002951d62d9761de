"""Pair mining: choose which anchor–positive and anchor–negative pairs a loss should use.

A miner is called like a loss, ``miner(embeddings, labels, ref_embeddings=None, ref_labels=None)``, and
returns :class:`~metrix.losses.Pairs` — float (B, R) masks (or sampling results) over the pair matrix,
never index lists. Give them to any pair or triplet loss as ``pairs=``; a triplet loss then forms its
triplets from each anchor's kept positives × kept negatives::

    pairs = HardestMiner()(emb, labels)                 # batch-hard: farthest positive, closest negative
    loss = TripletMarginLoss(0.2)(emb, labels, pairs=pairs)

Selection never carries gradient (it runs under ``torch.no_grad`` on detached embeddings). Triplet-level
rules that depend on the anchor–positive distance (semi-hard, hard, easy) live in
``TripletMarginLoss(triplets=...)`` instead, because they are not properties of single pairs.
"""

from __future__ import annotations

import torch

from metrix._validation import check_positive
from metrix.distances import cosine_similarity, dissimilarity, pairwise_distance
from metrix.losses._common import Pairs, label_masks, mask_logits, prepare_batch
from metrix.losses.multi_similarity import multi_similarity_pairs


# ---------------------------------------------------------------------------- selection functions
def _top_n(score: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """0/1 mask of the ``n`` largest ``score`` entries per row among ``mask`` (fewer if the row has fewer)."""
    if n <= 0 or score.shape[1] == 0:
        return torch.zeros_like(mask)
    n = min(n, score.shape[1])
    _, idx = torch.topk(mask_logits(score, mask), n, dim=1)
    picked = torch.zeros_like(mask).scatter_(1, idx, 1.0)
    return picked * mask  # rows with fewer than n valid entries picked some invalid ones: drop them


def hardest_pairs(d: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, n_pos: int = 1, n_neg: int = 1) -> Pairs:
    """The ``n_pos`` farthest positives and the ``n_neg`` closest negatives of each anchor (``d``: smaller = closer)."""
    return Pairs(_top_n(d, pos, n_pos), _top_n(-d, neg, n_neg))


def easiest_pairs(d: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, n_pos: int = 1, n_neg: int = 1) -> Pairs:
    """The ``n_pos`` closest positives and the ``n_neg`` farthest negatives of each anchor."""
    return Pairs(_top_n(-d, pos, n_pos), _top_n(d, neg, n_neg))


def random_pairs(pos: torch.Tensor, neg: torch.Tensor, pos_fraction: float, neg_fraction: float,
                 generator: torch.Generator | None = None) -> Pairs:
    """Keep each valid pair independently with probability ``pos_fraction`` / ``neg_fraction``."""
    keep_pos = (torch.rand(pos.shape, generator=generator, dtype=pos.dtype) < pos_fraction).to(pos.dtype)
    keep_neg = (torch.rand(neg.shape, generator=generator, dtype=neg.dtype) < neg_fraction).to(neg.dtype)
    return Pairs(pos * keep_pos, neg * keep_neg)


def distance_weighted_negatives(d: torch.Tensor, neg: torch.Tensor, dim: int, n_neg: int = 1, cutoff: float = 0.5,
                                nonzero_loss_cutoff: float = 1.4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample ``n_neg`` negatives per anchor with probability ∝ 1/q(d) (Wu et al., "Sampling Matters in Deep
    Embedding Learning", ICCV 2017), where ``q(d) ∝ d^{n−2} (1 − d²/4)^{(n−3)/2}`` is the density of
    distances between uniform points on the unit sphere in ``n = dim`` dimensions.

    Distances are clipped below at ``cutoff`` and negatives at ``d ≥ nonzero_loss_cutoff`` get weight 0, as in
    the paper; an anchor whose weights are all 0 samples uniformly among its negatives. Expects unit-length
    embeddings (distances in [0, 2]). Returns a 0/1 (B, R) mask.
    """
    if dim < 2:
        raise ValueError(f"distance-weighted sampling needs embeddings of dimension >= 2, got {dim}")
    dc = d.clamp(min=cutoff, max=2.0 - 1e-6)
    log_inv_q = -((dim - 2) * torch.log(dc) + (dim - 3) / 2 * torch.log1p(-0.25 * dc * dc))
    allowed = neg * (d < nonzero_loss_cutoff)
    log_w = mask_logits(log_inv_q, allowed)
    weights = torch.exp(log_w - log_w.amax(dim=1, keepdim=True)) * allowed
    empty = weights.sum(dim=1, keepdim=True) == 0
    weights = torch.where(empty, neg, weights)  # fallback: uniform over the anchor's negatives
    picked = torch.zeros_like(neg)
    rows = torch.nonzero(weights.sum(dim=1) > 0).flatten()
    if rows.numel():
        count = torch.minimum((weights[rows] > 0).sum(dim=1), torch.tensor(n_neg))
        draws = torch.multinomial(weights[rows], min(n_neg, int(count.max())), replacement=False, generator=generator)
        # rows with fewer candidates than n_neg drew some zero-weight columns last: keep only real ones
        valid = torch.arange(draws.shape[1])[None, :] < count[:, None]
        picked[rows[:, None].expand_as(draws)[valid], draws[valid]] = 1.0
    return picked * neg


# ------------------------------------------------------------------------------------- miners
class _Miner:
    """Shared call path: validate, build the detached B×R matrix and label masks, then select."""

    metric = "euclidean"

    def __call__(self, embeddings, labels, ref_embeddings=None, ref_labels=None) -> Pairs:
        with torch.no_grad():
            b = prepare_batch(embeddings.detach(), labels,
                              None if ref_embeddings is None else ref_embeddings.detach(), ref_labels)
            pos, neg = label_masks(b)
            return self.select(b, pos, neg)

    def matrix(self, b):
        return dissimilarity(b.embeddings, None if b.same_set else b.ref_embeddings, self.metric)

    def state_dict(self) -> dict:
        """What changes while mining (random generators, the annealing step), for checkpoints."""
        state = {}
        for key, value in vars(self).items():
            if isinstance(value, torch.Generator):
                state[key] = value.get_state()
            elif key == "step":
                state[key] = int(value)
        return state

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            current = getattr(self, key)
            if isinstance(current, torch.Generator):
                current.set_state(value)
            else:
                setattr(self, key, int(value))


class HardestMiner(_Miner):
    """The ``n_pos`` farthest positives and ``n_neg`` closest negatives per anchor; ``n_pos=n_neg=1`` is
    batch-hard mining (Hermans et al. 2017)."""

    def __init__(self, n_pos: int = 1, n_neg: int = 1, metric: str = "euclidean"):
        self.n_pos, self.n_neg, self.metric = int(n_pos), int(n_neg), metric

    def select(self, b, pos, neg):
        return hardest_pairs(self.matrix(b), pos, neg, self.n_pos, self.n_neg)


class EasyMiner(_Miner):
    """The ``n_pos`` closest positives and ``n_neg`` farthest negatives per anchor. With ``n_pos=1`` this is
    easy-positive mining (Xuan et al., "Improved Embeddings with Easy Positive Triplet Mining", WACV 2020)."""

    def __init__(self, n_pos: int = 1, n_neg: int = 1, metric: str = "euclidean"):
        self.n_pos, self.n_neg, self.metric = int(n_pos), int(n_neg), metric

    def select(self, b, pos, neg):
        return easiest_pairs(self.matrix(b), pos, neg, self.n_pos, self.n_neg)


class RandomMiner(_Miner):
    """Keep each positive / negative pair with probability ``pos_fraction`` / ``neg_fraction`` (seeded)."""

    def __init__(self, pos_fraction: float = 1.0, neg_fraction: float = 0.5, seed: int = 0):
        for name, value in (("pos_fraction", pos_fraction), ("neg_fraction", neg_fraction)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.pos_fraction, self.neg_fraction = float(pos_fraction), float(neg_fraction)
        self.generator = torch.Generator().manual_seed(int(seed))

    def select(self, b, pos, neg):
        return random_pairs(pos, neg, self.pos_fraction, self.neg_fraction, self.generator)


class MultiSimilarityMiner(_Miner):
    """Multi-similarity pair mining (Wang et al., CVPR 2019) on cosine similarity."""

    def __init__(self, epsilon: float = 0.1):
        self.epsilon = float(epsilon)

    def select(self, b, pos, neg):
        s = cosine_similarity(b.embeddings, None if b.same_set else b.ref_embeddings)
        return multi_similarity_pairs(s, pos, neg, self.epsilon)


class DistanceWeightedMiner(_Miner):
    """All positives, and ``n_neg`` negatives per anchor sampled ∝ 1/q(d) (Wu et al. 2017; see
    :func:`distance_weighted_negatives`). Embeddings should be L2-normalised."""

    def __init__(self, n_neg: int = 1, cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4, seed: int = 0):
        self.n_neg, self.cutoff = int(n_neg), check_positive(cutoff, "cutoff")
        self.nonzero_loss_cutoff = check_positive(nonzero_loss_cutoff, "nonzero_loss_cutoff")
        self.generator = torch.Generator().manual_seed(int(seed))

    def select(self, b, pos, neg):
        d = pairwise_distance(b.embeddings, None if b.same_set else b.ref_embeddings, "euclidean")
        picked = distance_weighted_negatives(d, neg, b.embeddings.shape[1], self.n_neg, self.cutoff,
                                             self.nonzero_loss_cutoff, self.generator)
        return Pairs(pos, picked)


class AnnealedMiner(_Miner):
    """Curriculum from easy to hard negatives over training.

    Each anchor's negatives are ranked from closest (hardest) to farthest; the miner keeps a window of
    ``n_neg`` consecutive ranks (all positives are kept). At hardness ``h`` the window starts at rank
    ``round((1 − h)·(N_a − n_neg))``: the farthest negatives at ``h = 0``, the closest at ``h = 1``.
    ``h`` rises linearly from 0 at ``start_step`` to 1 at ``end_step``; the miner counts its own calls as
    steps, or follow the trainer with :meth:`set_step`.
    """

    def __init__(self, n_neg: int = 4, start_step: int = 0, end_step: int = 1000, metric: str = "euclidean"):
        if int(end_step) <= int(start_step):
            raise ValueError(f"end_step must be after start_step, got {start_step} and {end_step}")
        self.n_neg, self.start_step, self.end_step, self.metric = int(n_neg), int(start_step), int(end_step), metric
        self.step = 0

    def set_step(self, step: int) -> None:
        self.step = int(step)

    def hardness(self, step: int | None = None) -> float:
        step = self.step if step is None else step
        return min(1.0, max(0.0, (step - self.start_step) / (self.end_step - self.start_step)))

    def select(self, b, pos, neg):
        h = self.hardness()
        self.step += 1
        d = self.matrix(b)
        big = torch.finfo(d.dtype).max
        sorted_neg, _ = torch.sort(d + (1.0 - neg) * big, dim=1)  # hardest first, non-negatives last
        n_avail = neg.sum(dim=1).to(torch.int64)
        width = torch.clamp(n_avail, max=self.n_neg)
        start = torch.round((1.0 - h) * (n_avail - width).to(d.dtype)).to(torch.int64)
        last = (start + width - 1).clamp_min(0)
        lo = sorted_neg.gather(1, start.clamp(max=d.shape[1] - 1)[:, None])
        hi = sorted_neg.gather(1, last.clamp(max=d.shape[1] - 1)[:, None])
        window = neg * (d >= lo) * (d <= hi) * (width > 0)[:, None]
        return Pairs(pos, window)


# name -> miner class: what `metrix train --miner` and `metrix list miners` offer
MINERS = {"hardest": HardestMiner, "easy": EasyMiner, "random": RandomMiner, "multi_similarity": MultiSimilarityMiner,
          "distance_weighted": DistanceWeightedMiner, "annealed": AnnealedMiner}

__all__ = [
    "MINERS", "AnnealedMiner", "DistanceWeightedMiner", "EasyMiner", "HardestMiner", "MultiSimilarityMiner", "Pairs",
    "RandomMiner", "distance_weighted_negatives", "easiest_pairs", "hardest_pairs", "multi_similarity_pairs",
    "random_pairs",
]
