"""Distributed training on this machine: samples/s of 1 vs W processes, and what the global-batch loss costs.

Three parts, printed as tables:

1. **Throughput.** One training step (convnet on 1×28×28 inputs, multi-similarity loss, Adam) with a global
   batch of ``--batch`` samples: one process using every core, then W processes (gloo on CPU, one core's
   threads each) with ``batch / W`` samples each, through :mod:`metrix.distributed` (gathered loss, DDP with
   summed gradients, global BatchNorm). A third run has the W processes train on their local batches with
   no communication at all: ``1 − t_local / t_distributed`` is the share of a distributed step spent
   communicating (and on the replicated loss). Phases alternate ``--rounds`` times; the best of each counts.
2. **Gathered-loss overhead.** On W processes, forward + backward of the loss on a rank's own B embeddings
   (what a single device does) against :class:`metrix.distributed.GlobalBatchLoss` (the W·B global batch),
   for B = 256 … 4096 per rank, D = 128; the calls alternate.
3. **Exactness against pytorch-metric-learning.** The gradient that reaches one rank's embeddings with
   PML's ``DistributedLossWrapper`` and with metrix, against the one-process gradient of the same loss on
   the concatenated batch (relative error, and the ratio of the norms).

    python benchmarks/distributed_scaling.py                 # W = 2, the defaults
    python benchmarks/distributed_scaling.py --world 2 --batch 256 --rounds 3 --sizes 256,1024,4096

With ``--backend nccl`` on a GPU machine, part 1 runs one process per GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metrix import distributed
from metrix.losses import MultiSimilarityLoss
from metrix.models import EmbeddingModel

D = 128


def _images(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 16
    x = torch.randn(16, 1, 28, 28, generator=g)[labels] + 0.5 * torch.randn(n, 1, 28, 28, generator=g)
    return x, labels


def _model(device):
    torch.manual_seed(0)
    return EmbeddingModel("convnet", D, input_shape=(1, 28, 28)).to(device)


def _time_steps(step, opt, x, y, steps: int) -> float:
    """Seconds per step, after two warm-up steps."""
    for i in range(steps + 2):
        if i == 2:
            if x.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        step(x, y).backward()
        opt.step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def _one_process(batch: int, steps: int, device) -> float:
    x, y = _images(batch, 0)
    model, loss = _model(device), MultiSimilarityLoss()
    step = distributed.TrainStep(model, loss)
    return _time_steps(step, torch.optim.Adam(model.parameters(), 1e-3), x.to(device), y.to(device), steps)


def _worker(rank: int, world: int, store: str, out: str, args) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world) if args.backend == "gloo" else 1)
    dist.init_process_group(args.backend, init_method=f"file://{store}", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    results = {}
    x, y = _images(args.batch, 0)
    part = distributed.shard(range(args.batch), rank, world)
    xl, yl = x[part.start : part.stop].to(device), y[part.start : part.stop].to(device)
    if args.part in ("all", "throughput"):
        model, loss = _model(device), MultiSimilarityLoss()
        with distributed.global_batchnorm(model):
            step = distributed.wrap_model(distributed.TrainStep(model, loss), device)
            results["distributed"] = _time_steps(step, torch.optim.Adam(model.parameters(), 1e-3), xl, yl, args.steps)
        model = _model(device)  # no communication at all: each rank trains on its own batch
        local = lambda xb, yb: loss(model(xb), yb)  # noqa: E731
        results["local"] = _time_steps(local, torch.optim.Adam(model.parameters(), 1e-3), xl, yl, args.steps)
    if args.part in ("all", "overhead"):
        results["overhead"] = _overhead(rank, world, args)
    if args.part in ("all", "exactness"):
        results["exactness"] = _exactness(rank, world)
    if rank == 0:
        torch.save(results, Path(out) / "results.pt")
    distributed.shutdown()


def _overhead(rank: int, world: int, args) -> list[tuple[int, float, float]]:
    rows = []
    loss = MultiSimilarityLoss()
    wrapped = distributed.GlobalBatchLoss(loss)
    for b in args.sizes:
        g = torch.Generator().manual_seed(rank)
        emb = torch.nn.functional.normalize(torch.randn(b, D, generator=g), dim=1)
        labels = torch.arange(b) % max(2, b // 16) + rank * (b // 16)
        times = {"local": [], "global": []}
        for _ in range(args.repeats):
            for name, fn in (("local", loss), ("global", wrapped)):  # alternate
                e = emb.clone().requires_grad_(True)
                dist.barrier()
                start = time.perf_counter()
                fn(e, labels).backward()
                dist.barrier()
                times[name].append(time.perf_counter() - start)
        rows.append((b, statistics.median(times["local"]), statistics.median(times["global"])))
    return rows


def _exactness(rank: int, world: int) -> dict:
    """Relative error of the gradient on this rank's embeddings against the one-process gradient."""
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning.utils import distributed as pml_dist

    g = torch.Generator().manual_seed(123)
    n = 64 * world
    emb_all = torch.randn(n, 32, generator=g, dtype=torch.float64)
    lab_all = torch.arange(n) % 8
    mine = slice(rank * 64, (rank + 1) * 64)
    out = {}
    for name, fn in (("metrix", distributed.GlobalBatchLoss(MultiSimilarityLoss())),
                     ("pml", pml_dist.DistributedLossWrapper(pml_losses.MultiSimilarityLoss()))):
        ref = emb_all.clone().requires_grad_(True)
        single = MultiSimilarityLoss() if name == "metrix" else pml_losses.MultiSimilarityLoss()
        single(ref, lab_all).backward()
        e = emb_all[mine].clone().requires_grad_(True)
        fn(e, lab_all[mine]).backward()
        # what a DDP step applies: metrix sums the ranks' gradients, PML's recipe (plain DDP) averages them
        applied = e.grad if name == "metrix" else e.grad / world
        truth = ref.grad[mine]
        out[name] = (float((applied - truth).norm() / truth.norm()), float(applied.norm() / truth.norm()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256, help="global batch of the throughput part")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="256,512,1024,2048,4096", help="per-rank batch sizes of part 2")
    parser.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    parser.add_argument("--part", default="all", choices=("all", "throughput", "overhead", "exactness"))
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    device = torch.device("cuda" if args.backend == "nccl" else "cpu")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"backend {args.backend}, W = {args.world}")

    one, dist_runs = [], []
    for r in range(args.rounds):  # alternate one process and W processes
        if args.part in ("all", "throughput"):
            torch.set_num_threads(os.cpu_count() or 1)
            one.append(_one_process(args.batch, args.steps, device))
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(args.world, str(Path(tmp) / "store"), tmp, args), nprocs=args.world, join=True)
            dist_runs.append(torch.load(Path(tmp) / "results.pt"))
        if args.part not in ("all", "throughput"):
            break

    if one:
        t1 = min(one)
        tw = min(r["distributed"] for r in dist_runs)
        tl = min(r["local"] for r in dist_runs)
        print(f"\n## throughput: convnet 1×28×28 → {D}, multi-similarity, global batch {args.batch}")
        print("| setting | s/step | samples/s | vs 1 process |\n|---|---|---|---|")
        print(f"| 1 process, {os.cpu_count()} threads | {t1:.4f} | {args.batch / t1:.0f} | 1.00 |")
        print(f"| {args.world} processes (metrix.distributed) | {tw:.4f} | {args.batch / tw:.0f} | {t1 / tw:.2f} |")
        print(f"| {args.world} processes, local only (no communication) | {tl:.4f} | {args.batch / tl:.0f} | {t1 / tl:.2f} |")
        print(f"\ncommunication + replicated loss share of a distributed step: {1 - tl / tw:.1%}")
    last = dist_runs[-1]
    if "overhead" in last:
        print(f"\n## gathered-loss overhead (multi-similarity, D = {D}, forward + backward, median of {args.repeats})")
        print("| B per rank | local loss (s) | global-batch loss (s) | ratio |\n|---|---|---|---|")
        for b, tl, tg in last["overhead"]:
            print(f"| {b} | {tl:.4f} | {tg:.4f} | {tg / tl:.2f} |")
    if "exactness" in last:
        print("\n## gradient on rank 0's embeddings vs one process on the global batch (float64)")
        print("| library | relative error | norm ratio |\n|---|---|---|")
        for name, (err, ratio) in last["exactness"].items():
            print(f"| {name} | {err:.2e} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
