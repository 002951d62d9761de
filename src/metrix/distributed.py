"""Training on several processes (torch.distributed, DDP, torchrun) with exact global-batch losses.

The rule
--------
Pair and contrastive losses get better with more negatives; with W processes ("ranks") each holding a
local batch, metrix evaluates every loss on the **global batch** — the concatenation of the ranks' batches,
in rank order — exactly as one process would:

1. :func:`all_gather` collects every rank's embeddings (batches may differ in size). Its backward pass sums
   the gathered gradient over the ranks (an all-reduce) and returns this rank's slice, so the gradient with
   respect to a rank's embeddings is the sum of what every rank's loss asks of them.
2. :class:`GlobalBatchLoss` evaluates the loss (and the miner) on the gathered batch. Every rank computes the
   same global value ``L``: the same pairs, the same miner selection, the same reduction over the global
   count of terms, each item's self pair excluded by its global position. The tensor it returns has the
   value ``L`` and carries ``1/W`` of its gradient: the ranks' losses are *shares* that sum to ``L``. With 1
   the gradient with respect to every rank's embeddings is then exactly ``∂L/∂e_rank``.
3. :func:`wrap_model` is PyTorch's ``DistributedDataParallel`` with gradients **summed** over the ranks
   (a communication hook), not averaged: a parameter's gradient is
   ``Σ_rank ∂L/∂e_rank · ∂e_rank/∂θ = ∂L/∂θ``, the single-process gradient on the global batch, and the
   loss's own parameters (proxies), which get ``1/W`` of ``∂L/∂P`` on each rank, add up to theirs.

Nothing is multiplied by the world size anywhere, and one process (W = 1, or no process group at all) is
the same code path. Plain DDP averages instead of summing: with it the step would be that of ``L/W``.

Every rank evaluates the loss on the whole global batch (a G×G matrix for G gathered items) instead of
its own rows against the global batch (B×G): W times the loss's arithmetic, bought for exactness with every
reduction, miner and memory; ``benchmarks/distributed_scaling.py`` measures what it costs. A cross-batch
memory wrapped by :class:`GlobalBatchLoss` enqueues the global batch, so it holds the same content on every
rank.

Launch with ``torchrun --nproc-per-node N -m metrix train ...`` or ``metrix train --nproc N``.

Example (one process: the same code path as W ranks)
-------
>>> import torch
>>> from metrix.losses import MultiSimilarityLoss
>>> loss = GlobalBatchLoss(MultiSimilarityLoss())
>>> value = loss(torch.randn(8, 4, requires_grad=True), torch.arange(4).repeat(2))
>>> value.backward()
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from metrix.evaluation import finish_sums, retrieval_metrics
from metrix.sampling import ClassBalancedBatchSampler

_GATHER_GROUP: list = []  # a process group of metrix's own, so its collectives never interleave with DDP's


# ------------------------------------------------------------------ process group
def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def launched_by_torchrun() -> bool:
    """True in a process started by torchrun (it sets these variables for every worker)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def init_from_env(device: str = "cpu") -> torch.device:
    """Join the process group torchrun describes in the environment (gloo for CPU, nccl for CUDA).

    Returns the device this rank trains on: ``cuda:LOCAL_RANK`` for a CUDA device, else ``device``.
    """
    if not launched_by_torchrun():
        raise RuntimeError("no torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, ...): launch with "
                           "'metrix train --nproc N' or 'torchrun --nproc-per-node N -m metrix train ...'")
    cuda = str(device).startswith("cuda")
    if cuda:
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        where = torch.device("cuda", local)
    else:
        where = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return where


def shutdown() -> None:
    """Leave the process group (after a barrier, so no rank tears it down under another)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _GATHER_GROUP.clear()


def _group():
    if not _GATHER_GROUP:
        _GATHER_GROUP.append(dist.new_group(backend=dist.get_backend()))
    return _GATHER_GROUP[0]


def broadcast_object(value, src: int = 0):
    """``value`` of rank ``src`` on every rank (a path, a setting); the value itself with one process."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, group=_group())
    return box[0]


def all_gather_object(value) -> list:
    """Every rank's ``value``, in rank order (``[value]`` with one process)."""
    if not is_distributed():
        return [value]
    out = [None] * get_world_size()
    dist.all_gather_object(out, value, group=_group())
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``t`` over the ranks (a copy; ``t`` itself with one process)."""
    if not is_distributed():
        return t
    out = t.clone()
    dist.all_reduce(out, group=_group())
    return out


# ------------------------------------------------------------------ gathering
def _sizes(n: int, device) -> list[int]:
    size = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size, group=_group())
    return [int(s) for s in sizes]


def _gather_padded(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's ``t`` (first dimensions ``sizes``): padded to the largest, then trimmed."""
    largest = max(sizes)
    padded = t.new_zeros((largest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=_group())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _AllGather(torch.autograd.Function):
    """Forward: every rank's rows, in rank order. Backward: the gathered gradient summed over the ranks,
    then this rank's rows — each rank's loss may use every rank's rows, and the chain rule adds those uses."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, sizes: tuple[int, ...], me: int):
        ctx.sizes, ctx.me = sizes, me
        return _gather_padded(t, list(sizes))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=_group())
        start = sum(ctx.sizes[: ctx.me])
        return grad[start : start + ctx.sizes[ctx.me]], None, None


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` concatenated in rank order (first dimensions may differ), differentiable.

    With one process it returns ``t`` itself. Gradients flow back to every rank's own rows (see the module's
    rule). Integer tensors (labels) gather the same way, without gradient.
    """
    if not is_distributed():
        return t
    sizes = _sizes(t.shape[0], t.device)
    if t.requires_grad:
        return _AllGather.apply(t, tuple(sizes), get_rank())
    return _gather_padded(t, sizes)


def all_gather_with_offset(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """:func:`all_gather` and where this rank's rows start in the result."""
    if not is_distributed():
        return t, 0
    sizes = _sizes(t.shape[0], t.device)
    gathered = _AllGather.apply(t, tuple(sizes), get_rank()) if t.requires_grad else _gather_padded(t, sizes)
    return gathered, sum(sizes[: get_rank()])


class _ShareGradient(torch.autograd.Function):
    """The value unchanged; the gradient scaled by ``share`` (this rank's share of a replicated loss)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, share: float):
        ctx.share = share
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.share, None


class GlobalBatchLoss(nn.Module):
    """Evaluate ``loss`` (and ``miner``) on the global batch gathered from every rank.

    Parameters
    ----------
    loss : any metrix loss called as ``loss(embeddings, labels)`` (pair, triplet, contrastive, proxy, a
        :class:`~metrix.memory.CrossBatchMemory`, ...)
    miner : optional ``miner(embeddings, labels) -> Pairs``; it runs on the global batch and its pairs go to
        the loss as ``pairs=`` (a seeded random miner makes the same choice on every rank)

    Returns the global loss ``L`` on every rank, carrying ``1/W`` of its gradient (the module's rule). With
    one process it is ``loss(embeddings, labels)`` exactly.
    """

    def __init__(self, loss: nn.Module, miner: Callable | None = None):
        super().__init__()
        self.loss, self.miner = loss, miner

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb, lab = all_gather(embeddings), all_gather(labels)
        value = self.loss(emb, lab) if self.miner is None else self.loss(emb, lab, pairs=self.miner(emb, lab))
        if not is_distributed():
            return value
        return _ShareGradient.apply(value, 1.0 / get_world_size())


# ------------------------------------------------------------------ DDP
def _sum_hook(process_group, bucket):
    """DDP communication hook: the bucket's gradients summed over the ranks (DDP's default averages)."""
    group = process_group if process_group is not None else dist.group.WORLD
    future = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return future.then(lambda fut: fut.value()[0])


class TrainStep(nn.Module):
    """The model and the global-batch loss as one module, so that DDP synchronises the loss's parameters
    (proxies) with the model's. ``step(x, labels)`` returns the loss."""

    def __init__(self, model: nn.Module, loss: nn.Module, miner: Callable | None = None):
        super().__init__()
        self.model, self.objective = model, GlobalBatchLoss(loss, miner)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.objective(self.model(x), labels)


def wrap_model(module: nn.Module, device: torch.device | None = None) -> nn.Module:
    """``module`` under ``DistributedDataParallel`` with gradients summed over the ranks (see the rule);
    ``module`` itself with one process."""
    if not is_distributed():
        return module
    device = device or next(module.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=True)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


# ------------------------------------------------------------------ evaluation
def embed_sharded(model: nn.Module, x) -> torch.Tensor:
    """``model.embed(x)`` with each rank embedding its share of the rows, gathered on every rank."""
    if not is_distributed():
        return model.embed(x)
    rows = shard(range(len(x)), get_rank(), get_world_size())
    device = next(model.parameters()).device  # nccl gathers device tensors only
    return all_gather(model.embed(x[rows.start : rows.stop]).to(device)).cpu()


def sharded_retrieval_metrics(query, query_labels, reference=None, reference_labels=None, **kwargs) -> dict:
    """:func:`metrix.evaluation.retrieval_metrics` with each rank searching its share of the queries (the
    reference whole on every rank); the shards' sums are added over the ranks, so every rank gets the
    metrics of all queries."""
    if not is_distributed():
        return retrieval_metrics(query, query_labels, reference, reference_labels, **kwargs)
    rows = shard(range(len(query)), get_rank(), get_world_size())
    sums = retrieval_metrics(query, query_labels, reference, reference_labels, rows=(rows.start, rows.stop), **kwargs)
    keys = sorted(sums)
    total = all_reduce_sum(torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64))
    return finish_sums({k: (int(v) if k == "num_queries" else float(v)) for k, v in zip(keys, total.tolist())})


# ------------------------------------------------------------------ samplers
def shard(items, part: int, parts: int):
    """Part ``part`` of ``parts`` contiguous, near-equal pieces of ``items`` (a list or a range; sizes
    differ by at most 1)."""
    bounds = np.linspace(0, len(items), parts + 1).round().astype(int)
    return items[bounds[part] : bounds[part + 1]]


class DistributedClassBalancedBatchSampler(ClassBalancedBatchSampler):
    """P×K batches for W ranks: the global batch has ``classes_per_batch × world_size`` classes.

    Every rank draws the same seeded global batch (:class:`~metrix.sampling.ClassBalancedBatchSampler` with
    ``W·P`` classes) and takes its contiguous share, so the ranks' batches are disjoint, their concatenation
    in rank order is the global batch, and every sample is used about once per epoch. Call :meth:`set_epoch`
    each epoch. ``rank`` and ``world_size`` default to the process group's. With fewer classes than ``W·P``
    the global batch takes every class (shares then differ by at most one sample).

    Example
    -------
    >>> labels = [c for c in range(8) for _ in range(4)]
    >>> a = DistributedClassBalancedBatchSampler(labels, 2, 2, rank=0, world_size=2)
    >>> b = DistributedClassBalancedBatchSampler(labels, 2, 2, rank=1, world_size=2)
    >>> set(next(iter(a))).isdisjoint(next(iter(b)))
    True
    """

    def __init__(self, labels, classes_per_batch: int, samples_per_class: int, seed: int = 0,
                 replacement: bool = False, rank: int | None = None, world_size: int | None = None):
        self.rank = get_rank() if rank is None else int(rank)
        self.world_size = get_world_size() if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        n_classes = len(np.unique(np.asarray(labels)))
        total = min(int(classes_per_batch) * self.world_size, max(n_classes, int(classes_per_batch)))
        super().__init__(labels, total, samples_per_class, seed=seed, replacement=replacement)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in super().__iter__():
            yield shard(batch, self.rank, self.world_size)


class DistributedEpisodeSampler:
    """Few-shot episodes for W ranks: episode ``e`` of the seeded stream goes to rank ``e mod W``.

    ``sampler`` is an :class:`~metrix.apps.fewshot.EpisodeSampler` (every rank builds it with the same seed);
    each rank iterates over its own episodes, disjoint from the other ranks', ``len(sampler) // W`` of them
    (the remainder is dropped so that every rank takes the same number of steps).
    """

    def __init__(self, sampler, rank: int | None = None, world_size: int | None = None):
        self.sampler = sampler
        self.rank = get_rank() if rank is None else int(rank)
        self.world_size = get_world_size() if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if len(sampler) < self.world_size:
            raise ValueError(f"{len(sampler)} episodes cannot be shared among {self.world_size} ranks")

    def __len__(self) -> int:
        return len(self.sampler) // self.world_size

    def __iter__(self):
        stop = len(self) * self.world_size
        for e, episode in enumerate(self.sampler):
            if e >= stop:
                return
            if e % self.world_size == self.rank:
                yield episode
