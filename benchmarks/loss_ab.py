"""Time one loss at two git revisions of metrix in the same process, calls alternating.

The VM's speed swings up to 2x within minutes, so before/after numbers taken in separate runs mislead; this
script imports the package of each revision (``git archive`` into a temporary folder, the package renamed
``metrix_<n>``) and alternates their forward+backward calls on the same inputs (B=1024, D=128, 64 classes x 16,
unit vectors, as in ``losses_vs_pml.py``). It prints the value and gradient difference first.

    python benchmarks/loss_ab.py 8c8f30e HEAD contrastive_loss
    python benchmarks/loss_ab.py 8c8f30e HEAD contrastive_loss --kwargs "dict(neg_margin=1.4)"
    python benchmarks/loss_ab.py HEAD~1 WORKTREE generalized_lifted_structure_loss   # WORKTREE: files on disk
"""

from __future__ import annotations

import argparse
import importlib
import io
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def import_revision(rev: str, name: str, into: Path, module: str = "losses"):
    """``metrix.<module>`` of ``rev`` (or the working tree for ``WORKTREE``), imported as ``<name>.<module>``."""
    target = into / name
    if rev == "WORKTREE":
        shutil.copytree(ROOT / "src" / "metrix", target)
    else:
        data = subprocess.run(["git", "archive", rev, "src/metrix"], cwd=ROOT, check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(into / "_extract", filter="data")
        shutil.move(into / "_extract" / "src" / "metrix", target)
    for path in target.rglob("*.py"):  # absolute imports of the package point at the renamed copy
        text = path.read_text()
        path.write_text(re.sub(r"\b(from|import) metrix\b", rf"\1 {name}", text))
    return importlib.import_module(f"{name}.{module}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("loss", help="a function of metrix.losses, e.g. contrastive_loss")
    parser.add_argument("--kwargs", default="dict()", help="keyword arguments, as a Python dict expression")
    parser.add_argument("--reps", type=int, default=40)
    args = parser.parse_args()
    kwargs = eval(args.kwargs, {"dict": dict})  # a command-line expression written by the user running it

    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, tmp)
        modules = {rev: import_revision(rev, f"metrix_{i}", Path(tmp)) for i, rev in enumerate((args.before, args.after))}
        torch.manual_seed(0)
        n = 1024
        labels = torch.arange(64).repeat_interleave(16)[torch.randperm(n)]
        x = F.normalize(torch.randn(n, 128), dim=1).requires_grad_()

        def call(module):
            x.grad = None
            t0 = time.perf_counter()
            loss = getattr(module, args.loss)(x, labels, **kwargs)
            t1 = time.perf_counter()
            loss.backward()
            return loss.item(), x.grad.clone(), t1 - t0, time.perf_counter() - t1

        (va, ga, *_), (vb, gb, *_) = (call(m) for m in modules.values())
        print(f"# {args.loss}({args.kwargs}): loss {va:.7g} vs {vb:.7g}, max gradient difference "
              f"{float((ga - gb).abs().max()):.2e}")
        times = {rev: [] for rev in modules}
        for _ in range(args.reps):
            for rev, module in modules.items():
                times[rev].append(call(module)[2:])
        for rev, ts in times.items():
            fwd, bwd = (statistics.median(t) * 1e3 for t in zip(*ts))
            total = statistics.median(f + b for f, b in ts) * 1e3
            print(f"{rev:>12}: forward {fwd:6.2f} ms, backward {bwd:6.2f} ms, total {total:6.2f} ms")


if __name__ == "__main__":
    main()
