"""Few-shot classification with prototypical networks (Snell, Swersky & Zemel, NeurIPS 2017).

An N-way K-shot *episode* draws N classes, K labelled support samples and Q query samples per
class. Each class is represented by its prototype, the mean support embedding; a query is
classified by a softmax over minus its squared Euclidean distances to the prototypes. Training
runs the same episodes on the training classes and minimises the query cross-entropy.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from metrix.checkpoints import LoopCheckpoint, capture, restore
from metrix.io import CorruptFileError, build_to_fit, load_tagged, save_tagged
from metrix.models import MAX_INPUT_ELEMENTS
from metrix.training import optimizer_step


class EpisodeSampler:
    """Seeded N-way K-shot episodes over ``labels``.

    Iterating yields ``(support, query)`` index arrays: ``support`` has ``n_way·k_shot`` indices
    (class-major: the first ``k_shot`` belong to episode class 0, ...) and ``query`` has
    ``n_way·n_query``, in the same class order.

    Example
    -------
    >>> s = EpisodeSampler([0] * 5 + [1] * 5 + [2] * 5, n_way=2, k_shot=1, n_query=2, episodes=3, seed=0)
    >>> [(len(a), len(b)) for a, b in s]
    [(2, 4), (2, 4), (2, 4)]
    """

    def __init__(self, labels, n_way: int, k_shot: int, n_query: int, episodes: int, seed: int = 0):
        labels = np.asarray(labels).ravel()
        for name, value in (("n_way", n_way), ("k_shot", k_shot), ("n_query", n_query), ("episodes", episodes)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        classes, codes = np.unique(labels, return_inverse=True)
        counts = np.bincount(codes)
        self.eligible = np.flatnonzero(counts >= k_shot + n_query)
        if len(self.eligible) < n_way:
            raise ValueError(
                f"{n_way}-way {k_shot}-shot episodes with {n_query} queries need {n_way} classes with at least "
                f"{k_shot + n_query} samples; only {len(self.eligible)} of {len(classes)} classes have that many"
            )
        self.members = [np.flatnonzero(codes == c) for c in range(len(classes))]
        self.n_way, self.k_shot, self.n_query, self.episodes, self.seed = int(n_way), int(k_shot), int(n_query), int(episodes), seed

    def __len__(self) -> int:
        return self.episodes

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rng = np.random.default_rng(self.seed)
        per = self.k_shot + self.n_query
        for _ in range(self.episodes):
            chosen = rng.choice(self.eligible, self.n_way, replace=False)
            picks = np.stack([rng.choice(self.members[c], per, replace=False) for c in chosen])
            yield picks[:, : self.k_shot].ravel(), picks[:, self.k_shot :].ravel()


def prototype_logits(support: torch.Tensor, query: torch.Tensor, n_way: int) -> torch.Tensor:
    """Logits ``−||q − c_k||²`` with ``c_k`` the mean of the class-major ``support`` rows."""
    prototypes = support.reshape(n_way, -1, support.shape[-1]).mean(1)
    sq = (query * query).sum(1, keepdim=True) - 2 * query @ prototypes.T + (prototypes * prototypes).sum(1)
    return -sq


def rotate_classes(X: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add the 90°, 180° and 270° rotations of every image as new classes (Vinyals et al. / Snell et al.)."""
    X = np.asarray(X)
    labels = np.asarray(labels).astype(str)
    xs, ys = [X], [labels]
    for k in (1, 2, 3):
        xs.append(np.rot90(X, k, axes=(-2, -1)).copy())
        ys.append(np.char.add(labels, f"@rot{90 * k}"))
    return np.concatenate(xs), np.concatenate(ys)


MAX_SIDE = int(MAX_INPUT_ELEMENTS ** 0.5)  # an image side no real few-shot set comes near


class PrototypicalNetwork:
    """Train and evaluate an encoder with prototypical episodes.

    Parameters
    ----------
    encoder : nn.Module mapping images to vectors (default: Snell et al.'s 4-block conv net for
        28×28 grey images, 64-d output).
    """

    def __init__(self, encoder: nn.Module | None = None, input_shape=(1, 28, 28)):
        from metrix.models import convnet

        self.input_shape = tuple(int(s) for s in input_shape)
        self.encoder = encoder if encoder is not None else convnet(self.input_shape)

    def _episode_loss(self, X, support, query, n_way, n_query):
        x = torch.from_numpy(np.concatenate([X[support], X[query]]).astype(np.float32, copy=False))
        z = self.encoder(x)
        logits = prototype_logits(z[: len(support)], z[len(support) :], n_way)
        target = torch.arange(n_way).repeat_interleave(n_query)
        return nn.functional.cross_entropy(logits, target), logits, target

    def fit(self, X, labels, n_way: int = 20, k_shot: int = 5, n_query: int = 5, episodes: int = 1000,
            lr: float = 1e-3, lr_halve_every: int | None = None, seed: int = 0, log_every: int = 0, echo=print,
            checkpoint: LoopCheckpoint | None = None, resume: bool = False):
        """Episodic training (Adam; optionally halve the learning rate every ``lr_halve_every`` episodes).

        ``checkpoint`` saves the encoder, optimiser, scheduler, generator state and losses every
        ``checkpoint.every`` episodes; ``resume=True`` continues from its last one to the weights an
        uninterrupted run ends with (the episodes already done are drawn again, not trained on)."""
        X = np.asarray(X, dtype=np.float32)
        if not np.isfinite(X).all():
            raise ValueError("X contains NaN or infinity")
        torch.manual_seed(seed)
        opt = torch.optim.Adam(self.encoder.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, lr_halve_every, 0.5) if lr_halve_every else None
        history, done = [], 0
        objects = {"encoder": self.encoder, "optimizer": opt, "scheduler": sched}
        saved = restore(checkpoint, objects) if resume else None
        if saved is not None:
            done, history = saved[0], list(saved[2]["history"])
        self.encoder.train()
        start = time.perf_counter()
        for step, (support, query) in enumerate(EpisodeSampler(labels, n_way, k_shot, n_query, episodes, seed), 1):
            if step <= done:
                continue  # drawn again so that the sampler's generator stands where it stood
            loss, logits, target = self._episode_loss(X, support, query, n_way, n_query)
            history.append(optimizer_step(loss, opt, f"episode {step}"))
            if sched is not None:
                sched.step()
            if checkpoint is not None and checkpoint.due(step, episodes):
                capture(checkpoint, step, objects, {"history": history})
            if log_every and step % log_every == 0:
                acc = float((logits.argmax(1) == target).float().mean())
                echo(f"episode {step:5d}  loss {np.mean(history[-log_every:]):.4f}  acc {acc:.3f}  "
                     f"{time.perf_counter() - start:.0f} s")
        self.encoder.eval()
        return history

    @torch.no_grad()
    def evaluate(self, X, labels, n_way: int = 5, k_shot: int = 1, n_query: int = 15, episodes: int = 1000,
                 seed: int = 0) -> dict:
        """Mean query accuracy over episodes with its 95% confidence interval (1.96·σ/√episodes)."""
        X = np.asarray(X, dtype=np.float32)
        self.encoder.eval()
        accs = []
        for support, query in EpisodeSampler(labels, n_way, k_shot, n_query, episodes, seed):
            _, logits, target = self._episode_loss(X, support, query, n_way, n_query)
            accs.append(float((logits.argmax(1) == target).float().mean()))
        accs = np.asarray(accs)
        return {"accuracy": float(accs.mean()), "ci95": float(1.96 * accs.std(ddof=1) / math.sqrt(len(accs))) if len(accs) > 1 else float("nan"),
                "episodes": len(accs), "n_way": n_way, "k_shot": k_shot, "n_query": n_query}

    def save(self, path) -> Path:
        """Encoder weights (safetensors, checksummed); only the default conv net can be rebuilt on load."""
        state = {k: v for k, v in self.encoder.state_dict().items()}
        return save_tagged(path, state, "metrix_fewshot", {"input_shape": list(self.input_shape), "encoder": "convnet"})

    @classmethod
    def load(cls, path) -> "PrototypicalNetwork":
        tensors, info = load_tagged(path, "metrix_fewshot", "few-shot model")
        shape = info.get("input_shape")
        if (not isinstance(shape, list) or len(shape) != 3 or not all(type(s) is int and 1 <= s <= MAX_SIDE for s in shape)
                or info.get("encoder") != "convnet"):
            raise CorruptFileError(f"{path}: invalid few-shot header (input_shape {shape!r}: (C, H, W), each "
                                   f"1..{MAX_SIDE}; encoder {info.get('encoder')!r})")
        from metrix.models import convnet

        encoder = build_to_fit(lambda: convnet(tuple(shape)), tensors, path, "few-shot conv net")
        return cls(encoder=encoder.eval(), input_shape=tuple(shape))
