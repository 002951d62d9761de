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
from contextlib import contextmanager
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


def rank_device(device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for a CUDA ``device`` inside a process group, else ``device``."""
    device = torch.device(device)
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def shutdown(barrier: bool = True) -> None:
    """Leave the process group; after a barrier, so that no rank tears it down under another (skipped after
    an error: the other ranks may never arrive)."""
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
    _GATHER_GROUP.clear()


def launch(nproc: int, args: list[str], module: str = "metrix") -> int:
    """Run ``python -m module *args`` on ``nproc`` processes of this machine with torchrun's launcher
    (standalone rendezvous on a free local port); returns the exit code (that of the first rank to fail).

    A failed rank has said what went wrong itself; this only passes its exit code on.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if int(nproc) < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    for name in list(logging.root.manager.loggerDict):  # the launcher would repeat what the ranks said
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    if "OMP_NUM_THREADS" not in os.environ:  # share the cores (torchrun would pick 1 and warn about it)
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(nproc)))
    parsed = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={int(nproc)}", "--module", module, *args])
    try:
        run(parsed)
    except ChildFailedError as exc:
        first = min(exc.failures.values(), key=lambda f: f.timestamp)
        return int(first.exitcode) if first.exitcode > 0 else 128 - int(first.exitcode)  # −N: killed by signal N
    except SignalException as exc:  # Ctrl-C or a kill reached the launcher; the ranks got it too and said so
        return 128 + int(exc.sigval)
    return 0


def _group(t: torch.Tensor | None = None):
    """metrix's own process groups, so that its collectives never interleave with DDP's: one of the default
    backend for tensors on the device, and a gloo one for CPU tensors and Python objects (nccl takes only
    CUDA tensors). With gloo as the default backend they are one group."""
    if not _GATHER_GROUP:
        backend = dist.get_backend()
        _GATHER_GROUP.append(dist.new_group(backend=backend))
        _GATHER_GROUP.append(_GATHER_GROUP[0] if backend == "gloo" else dist.new_group(backend="gloo"))
    return _GATHER_GROUP[0] if t is not None and t.device.type != "cpu" else _GATHER_GROUP[1]


def barrier() -> None:
    """Wait for every rank (nothing to wait for with one process)."""
    if is_distributed():
        dist.barrier(group=_group())


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
    return sum_over_ranks(t)


def rng_states() -> torch.Tensor:
    """Every rank's torch random state, one row per rank (what a checkpoint keeps for a bit-exact resume)."""
    return torch.stack(all_gather_object(torch.get_rng_state()))


def set_rng_state(states: torch.Tensor, path) -> None:
    """Restore this rank's row of :func:`rng_states` (a 1-D state: a file of one process), or refuse a
    checkpoint ``path`` written by another number of processes, naming the ``--nproc`` it needs."""
    states = states if states.dim() == 2 else states[None]
    if states.shape[0] != get_world_size():
        from metrix.io import CorruptFileError

        raise CorruptFileError(f"{path} was written by {states.shape[0]} process(es); resume with as many "
                               f"(--nproc {states.shape[0]}), not {get_world_size()}")
    torch.set_rng_state(states[get_rank()].clone())  # its own storage: a row view crashes torch


def rank_zero_first(load: Callable[[bool], object], download: bool):
    """``load(download)`` on rank 0 first (it may fetch files), then ``load(False)`` on the others once it is
    done: one process downloads, the others read what it fetched. ``load(download)`` with one process."""
    value = load(download) if get_rank() == 0 else None
    barrier()
    return value if get_rank() == 0 else load(False)


# ------------------------------------------------------------------ gathering
def _rank_order_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total


def sum_over_ranks(t: torch.Tensor, group=None) -> torch.Tensor:
    """The element-wise sum of ``t`` over the ranks, added in rank order (a new tensor).

    A ring all-reduce adds each element in an order set by where it falls in the buffer; with three or more
    ranks floating-point addition then depends on the buffer's layout (DDP re-buckets gradients after its
    first step), and a resumed run would drift from an uninterrupted one in the last bits. Two ranks add
    commutatively, so they keep the all-reduce; more gather and add in rank order.
    """
    group = group if group is not None else _group(t)
    world = dist.get_world_size(group)
    if world <= 2:
        out = t.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return _rank_order_sum(parts)


def _sizes(n: int, device) -> list[int]:
    size = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size, group=_group(size))
    return [int(s) for s in sizes]


def _gather_padded(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's ``t`` (first dimensions ``sizes``): padded to the largest, then trimmed."""
    largest = max(sizes)
    padded = t.new_zeros((largest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=_group(padded))
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
        grad = sum_over_ranks(grad)
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

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, ref_embeddings: torch.Tensor | None = None,
                ref_labels: torch.Tensor | None = None) -> torch.Tensor:
        """``ref_embeddings``/``ref_labels`` (e.g. MoCo's keys) are gathered as well and passed on."""
        emb, lab = all_gather(embeddings), all_gather(labels)
        if ref_embeddings is not None:
            if self.miner is not None:
                raise ValueError("a miner selects pairs within one batch: give no ref_embeddings with a miner")
            value = self.loss(emb, lab, all_gather(ref_embeddings), all_gather(ref_labels))
        else:
            value = self.loss(emb, lab) if self.miner is None else self.loss(emb, lab, pairs=self.miner(emb, lab))
        return share_of(value)


def share_of(value: torch.Tensor) -> torch.Tensor:
    """A loss every rank computed alike on the global batch, as this rank's share: the same value, ``1/W`` of
    the gradient (the module's rule). ``value`` itself with one process."""
    if not is_distributed():
        return value
    return _ShareGradient.apply(value, 1.0 / get_world_size())


def sum_gradients(parameters) -> None:
    """Sum the gradients of ``parameters`` over the ranks, in place (in rank order from three ranks on), for
    loops that do not run their model through :func:`wrap_model`: with :func:`share_of` losses the result is
    the one-process gradient on the global batch. Nothing to do with one process."""
    if not is_distributed():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        total = sum_over_ranks(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for g in grads:
            g.copy_(total[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def _global_moments(x: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-channel mean and (biased) variance of the global batch, and its size: each rank's mean and sum of
    squared deviations, combined in rank order by Chan et al.'s pairwise rule (no cancellation), in float64."""
    n = x.numel() // x.shape[1]
    var, mean = torch.var_mean(x, dims, correction=0)
    local = torch.cat([torch.tensor([float(n)], dtype=torch.float64, device=x.device), mean.double(), var.double() * n])
    parts = [torch.empty_like(local) for _ in range(get_world_size())]
    dist.all_gather(parts, local, group=_group(local))
    channels = x.shape[1]
    count, mean, m2 = parts[0][0], parts[0][1 : 1 + channels], parts[0][1 + channels :]
    for part in parts[1:]:
        n_b, mean_b, m2_b = part[0], part[1 : 1 + channels], part[1 + channels :]
        total = count + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + delta * delta * (count * n_b / total)
        count = total
    return mean.to(x.dtype), (m2 / count).to(x.dtype), float(count)


class _GlobalBatchNormFunction(torch.autograd.Function):
    """BatchNorm's training forward and backward with the statistics of the global batch: one small gather in
    the forward pass, one all-reduce of two per-channel sums in the backward pass. The element-wise work is
    the native kernels' (BatchNorm in eval mode, given the global statistics), plus one per-channel affine
    pass in the backward for the terms through the statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        dims = [0, *range(2, x.dim())]
        mean, var, count = _global_moments(x, dims)
        out = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.count, ctx.eps = count, eps
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var, torch.tensor(count)

    @staticmethod
    def backward(ctx, dy, _mean, _var, _count):
        x, weight, mean, var = ctx.saved_tensors
        shape = [1, -1] + [1] * (x.dim() - 2)
        w = weight if weight is not None else torch.ones_like(mean)
        # with fixed statistics: dx0 = dy·w·invstd, and this rank's Σdy·x̂ and Σdy (the affine gradients)
        dx, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy.contiguous(), x, w, mean, var, None, None, False, ctx.eps, [True, True, True])
        total = sum_over_ranks(torch.cat([sum_dy, sum_dy_xhat])) / ctx.count
        mean_dy, mean_dy_xhat = total.split(mean.shape[0])
        # the statistics' terms: − w·invstd·(mean(dy) + x̂·mean(dy·x̂)), an affine map of x per channel
        invstd = torch.rsqrt(var + ctx.eps)
        slope = -w * invstd * invstd * mean_dy_xhat
        offset = -w * invstd * mean_dy - slope * mean
        dx = dx.addcmul_(x, slope.view(shape)).add_(offset.view(shape))
        # this rank's share of the affine parameters' gradients: DDP sums the shares
        return dx, None if weight is None else sum_dy_xhat, None if weight is None else sum_dy, None


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, on any backend (PyTorch's
    ``SyncBatchNorm`` needs a GPU). Outside a process group, or in eval mode, it is plain BatchNorm.

    The forward pass and its gradient are those of BatchNorm on the concatenated batch (the statistics
    through the global mean and variance included); the running statistics follow the global batch too.
    """

    def _check_input_dim(self, x):  # any of 1-d, 2-d and 3-d: it replaces all three
        if x.dim() < 2:
            raise ValueError(f"expected a batch with a channel dimension, got shape {tuple(x.shape)}")

    @classmethod
    def sharing(cls, bn: nn.modules.batchnorm._BatchNorm) -> "GlobalBatchNorm":
        """A GlobalBatchNorm holding ``bn``'s very parameters and buffers (same tensors, same state-dict keys)."""
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        for name, p in bn.named_parameters(recurse=False):
            setattr(new, name, p)
        for name, b in bn.named_buffers(recurse=False):
            new.register_buffer(name, b)
        return new.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        out, mean, var, count = _GlobalBatchNormFunction.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                n = float(count)
                self.running_mean.mul_(1 - m).add_(mean, alpha=m)
                self.running_var.mul_(1 - m).add_(var * (n / max(n - 1.0, 1.0)), alpha=m)
        return out


@contextmanager
def global_batchnorm(model: nn.Module):
    """Within the block, in a process group, every BatchNorm1d/2d/3d inside ``model`` is a
    :class:`GlobalBatchNorm` sharing its parameters and buffers (so optimisers, checkpoints and state dicts
    see no difference); afterwards the original modules are back, holding what training wrote. Other
    normalisation layers (and anything outside a process group) are left alone."""
    plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    found = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) in plain] if is_distributed() else []
    for parent, name, child in found:
        setattr(parent, name, GlobalBatchNorm.sharing(child))
    try:
        yield model
    finally:
        for parent, name, child in found:
            child.train(getattr(parent, name).training)
            setattr(parent, name, child)


# ------------------------------------------------------------------ DDP
def _sum_hook(process_group, bucket):
    """DDP communication hook: the bucket's gradients summed over the ranks (DDP's default averages), in
    rank order from three ranks on (see :func:`sum_over_ranks`)."""
    group = process_group if process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    world = dist.get_world_size(group)
    if world <= 2:
        future = dist.all_reduce(buffer, group=group, async_op=True).get_future()
        return future.then(lambda fut: fut.value()[0])
    parts = [torch.empty_like(buffer) for _ in range(world)]
    future = dist.all_gather(parts, buffer, group=group, async_op=True).get_future()
    return future.then(lambda fut: _rank_order_sum(parts))


class TrainStep(nn.Module):
    """The model and the global-batch loss as one module, so that DDP synchronises the loss's parameters
    (proxies) with the model's. ``step(x, labels)`` returns the loss. ``autocast``: a dtype (bfloat16,
    float16) the model's forward pass runs in (mixed precision); the loss always sees float32 embeddings."""

    def __init__(self, model: nn.Module, loss: nn.Module, miner: Callable | None = None,
                 autocast: torch.dtype | None = None):
        super().__init__()
        self.model, self.objective, self.autocast = model, GlobalBatchLoss(loss, miner), autocast

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # a model may hand on another output than it trains (EmbeddingModel(output="features")): the loss
        # sees the trained one, its project()
        embed = getattr(self.model, "project", self.model)
        if self.autocast is None:
            return self.objective(embed(x), labels)
        with torch.autocast(x.device.type, dtype=self.autocast):
            emb = embed(x)
        return self.objective(emb.float(), labels)


def wrap_model(module: nn.Module, device: torch.device | None = None) -> nn.Module:
    """``module`` under ``DistributedDataParallel`` with gradients summed over the ranks (see the rule);
    ``module`` itself with one process."""
    if not is_distributed():
        return module
    device = device or next(module.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(module, device_ids=ids)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


# ------------------------------------------------------------------ evaluation
def embed_sharded(model: nn.Module, x) -> torch.Tensor:
    """``model.embed(x)`` with each rank embedding its share of the rows, gathered on every rank."""
    if not is_distributed():
        return model.embed(x)
    rows = my_share(range(len(x)))
    device = next(model.parameters()).device  # nccl gathers device tensors only
    return all_gather(model.embed(x[rows.start : rows.stop]).to(device)).cpu()


def sharded_retrieval_metrics(query, query_labels, reference=None, reference_labels=None, **kwargs) -> dict:
    """:func:`metrix.evaluation.retrieval_metrics` with each rank searching its share of the queries (the
    reference whole on every rank); the shards' sums are added over the ranks, so every rank gets the
    metrics of all queries."""
    if not is_distributed():
        return retrieval_metrics(query, query_labels, reference, reference_labels, **kwargs)
    rows = my_share(range(len(query)))
    sums = retrieval_metrics(query, query_labels, reference, reference_labels, rows=(rows.start, rows.stop), **kwargs)
    keys = list(sums)  # the same order on every rank
    total = all_reduce_sum(torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64))
    return finish_sums({k: (int(v) if k == "num_queries" else float(v)) for k, v in zip(keys, total.tolist())})


# ------------------------------------------------------------------ samplers
def my_share(batch):
    """This rank's contiguous share of a global batch (a list, array or range of indices); all of it with one
    process. Every rank plans the same global batches; the shares concatenate to them in rank order."""
    return shard(batch, get_rank(), get_world_size())


def shard(items, part: int, parts: int):
    """Part ``part`` of ``parts`` contiguous, near-equal pieces of ``items`` (a list or a range; sizes
    differ by at most 1)."""
    bounds = np.linspace(0, len(items), parts + 1).round().astype(int)
    return items[bounds[part] : bounds[part + 1]]


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """A sampler's rank and world size (default: the process group's), checked."""
    rank = get_rank() if rank is None else int(rank)
    world_size = get_world_size() if world_size is None else int(world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return rank, world_size


def global_batch_shape(classes_per_batch: int, samples_per_class: int, n_classes: int, world_size: int) -> tuple[int, int]:
    """The P×K of the global batch when each of W ranks takes a P×K share: ``(W·P, K)``, or, with fewer
    than W·P classes, every class with K scaled so that the global batch still holds about W·P·K samples.

    >>> global_batch_shape(10, 16, 100, 2), global_batch_shape(10, 16, 10, 2)
    ((20, 16), (10, 32))
    """
    p, k, w = int(classes_per_batch), int(samples_per_class), int(world_size)
    if p * w <= n_classes or p > n_classes:
        return p * w, k
    return n_classes, max(k, round(p * k * w / n_classes))


class DistributedClassBalancedBatchSampler(ClassBalancedBatchSampler):
    """P×K batches for W ranks: each rank's share is a P×K batch, the global batch W times that.

    Every rank draws the same seeded global batch (:class:`~metrix.sampling.ClassBalancedBatchSampler` of
    :func:`global_batch_shape`: ``W·P`` classes, or every class with more samples each) and takes its
    contiguous share, so the ranks' batches are disjoint, their concatenation in rank order is the global
    batch, and every sample is used about once per epoch. Call :meth:`set_epoch` each epoch. ``rank`` and
    ``world_size`` default to the process group's. Shares differ by at most one sample.

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
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        n_classes = len(np.unique(np.asarray(labels)))
        p, k = global_batch_shape(classes_per_batch, samples_per_class, n_classes, self.world_size)
        super().__init__(labels, p, k, seed=seed, replacement=replacement)

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
        self.rank, self.world_size = _rank_and_world(rank, world_size)
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
