"""Memories of past embeddings: cross-batch memory (XBM) and MoCo's momentum encoder + queue.

``CrossBatchMemory`` (Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020) wraps any pair or
triplet loss: each batch is compared with itself *and* with the embeddings of the last ``memory_size``
samples, so the loss sees far more negatives than one batch holds, at the cost of slightly stale features.

For MoCo (He et al., CVPR 2020), keep a :class:`MomentumEncoder` of the model, embed the second view with it,
and pass those keys as ``ref_embeddings``: the queue then holds momentum-encoder keys.

Example
-------
>>> import torch
>>> from metrix.losses import NTXentLoss
>>> xbm = CrossBatchMemory(NTXentLoss(0.1), embedding_dim=8, memory_size=64)
>>> loss = xbm(torch.randn(16, 8), torch.arange(4).repeat(4))   # then the batch is enqueued
>>> len(xbm)
16
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from metrix._validation import check_embeddings, check_labels
from metrix.losses._common import Pairs


class CrossBatchMemory(nn.Module):
    """A FIFO memory of embeddings and labels used as extra reference items for ``loss``.

    Parameters
    ----------
    loss : a pair or triplet loss taking ``(embeddings, labels, ref_embeddings, ref_labels, pairs=...)``
    embedding_dim : width of the embeddings
    memory_size : number of past samples kept
    enqueue : add each batch (or its ``ref_embeddings`` keys) to the memory after computing the loss

    Calling ``xbm(embeddings, labels)`` evaluates ``loss`` on the batch against batch ∪ memory (an item
    is never its own positive); ``xbm(queries, labels, keys, key_labels)`` uses keys ∪ memory instead and
    enqueues the keys (MoCo). The memory is held in buffers, so it is saved and restored with the loss's
    ``state_dict`` (metrix's Trainer checkpoints it).
    """

    def __init__(self, loss: nn.Module, embedding_dim: int, memory_size: int = 1024, enqueue: bool = True):
        super().__init__()
        if int(memory_size) < 1 or int(embedding_dim) < 1:
            raise ValueError(f"memory_size and embedding_dim must be >= 1, got {memory_size} and {embedding_dim}")
        self.loss, self.enqueue_batches = loss, bool(enqueue)
        self.register_buffer("memory", torch.zeros(int(memory_size), int(embedding_dim)))
        self.register_buffer("memory_labels", torch.zeros(int(memory_size), dtype=torch.int64))
        self.register_buffer("_next", torch.zeros((), dtype=torch.int64))
        self.register_buffer("_filled", torch.zeros((), dtype=torch.int64))

    def __len__(self) -> int:
        return int(self._filled)

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored embeddings and labels (oldest slots first once the ring has wrapped)."""
        n = len(self)
        return self.memory[:n], self.memory_labels[:n]

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels) -> None:
        """Write a batch into the ring buffer, overwriting the oldest entries."""
        emb = check_embeddings(embeddings.detach(), "embeddings")
        if emb.shape[1] != self.memory.shape[1]:
            raise ValueError(f"embeddings have shape {tuple(emb.shape)} but the memory holds {self.memory.shape[1]}-d vectors")
        lab = check_labels(labels, emb.shape[0], device=self.memory.device)
        size = self.memory.shape[0]
        if emb.shape[0] > size:  # only the newest `size` items can be kept
            emb, lab = emb[-size:], lab[-size:]
        slots = (int(self._next) + torch.arange(emb.shape[0], device=self.memory.device)) % size
        self.memory[slots] = emb.to(self.memory.dtype)
        self.memory_labels[slots] = lab
        self._next.fill_((int(self._next) + emb.shape[0]) % size)
        self._filled.fill_(min(size, int(self._filled) + emb.shape[0]))

    def reset(self) -> None:
        self._next.zero_()
        self._filled.zero_()

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None) -> torch.Tensor:
        emb = check_embeddings(embeddings, "embeddings")
        lab = check_labels(labels, emb.shape[0], device=emb.device)
        own = ref_embeddings is None
        keys = emb if own else check_embeddings(ref_embeddings, "ref_embeddings")
        key_labels = lab if own else check_labels(ref_labels, keys.shape[0], "ref_labels", device=emb.device)
        mem, mem_labels = self.contents()
        ref = torch.cat([keys, mem.to(keys.dtype)])
        ref_lab = torch.cat([key_labels, mem_labels])
        allowed = torch.ones(emb.shape[0], ref.shape[0], dtype=emb.dtype, device=emb.device)
        if own:  # the batch appears in its own reference set: an item is not its own positive
            allowed[:, : emb.shape[0]].fill_diagonal_(0)
        value = self.loss(emb, lab, ref, ref_lab, pairs=Pairs(allowed, allowed))
        if self.enqueue_batches:
            self.enqueue(keys, key_labels)
        return value


class MomentumEncoder(nn.Module):
    """An exponential moving average copy of a model (MoCo's key encoder): ``θ_k ← m·θ_k + (1 − m)·θ_q``.

    Its parameters never receive gradients; buffers (e.g. BatchNorm statistics) are copied from the model.
    """

    def __init__(self, model: nn.Module, momentum: float = 0.999):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.encoder = copy.deepcopy(model)
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, q in zip(self.encoder.parameters(), model.parameters()):
            k.mul_(self.momentum).add_(q.detach(), alpha=1.0 - self.momentum)
        for k, q in zip(self.encoder.buffers(), model.buffers()):
            k.copy_(q)

    @torch.no_grad()
    def forward(self, x):
        return self.encoder(x)
