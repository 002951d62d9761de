"""Per-query latency of ``VectorIndex.search`` and ``Gallery.identify`` on 100,000 enrolled vectors, at two git
revisions of metrix in one process, calls alternating (the VM's speed swings; separate runs mislead).

The index and gallery are built once per revision; each call answers one probe (a service's request).
Vectors: unit-length float32, 128-d; the gallery holds 20,000 identities × 5 samples.

    python benchmarks/gallery_latency.py 9f3552a WORKTREE
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_ab import import_revision  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--per-identity", type=int, default=5)
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    probes = x[rng.choice(args.n, args.reps)] + 0.05 * rng.standard_normal((args.reps, args.dim)).astype(np.float32)
    owners = np.arange(args.n) // args.per_identity

    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, tmp)
        built = {}
        for i, rev in enumerate((args.before, args.after)):
            index_mod = import_revision(rev, f"metrix_{i}", Path(tmp), "index")
            verification = importlib.import_module(f"metrix_{i}.apps.verification")
            index = index_mod.VectorIndex(args.dim)
            index.add(x)
            gallery = verification.Gallery(threshold=0.5)
            for start in range(0, args.n, args.per_identity):
                gallery.enroll(f"id{owners[start]}", x[start : start + args.per_identity])
            built[rev] = (index, gallery)
        times = {(rev, what): [] for rev in built for what in ("search", "identify")}
        answers = {}
        for r in range(args.reps):
            for rev, (index, gallery) in built.items():
                t0 = time.perf_counter()
                _, ids = index.search(probes[r : r + 1], 10)
                t1 = time.perf_counter()
                got = gallery.identify(probes[r : r + 1], k=5)
                t2 = time.perf_counter()
                times[(rev, "search")].append(t1 - t0)
                times[(rev, "identify")].append(t2 - t1)
                answers.setdefault(r, []).append((ids.tolist(), [c["identity"] for c in got[0]["candidates"]]))
        same = all(a == b for a, b in answers.values())
        print(f"{args.n} vectors of dimension {args.dim}, {args.n // args.per_identity} identities; "
              f"one probe per call, median of {args.reps}; same answers at both revisions: {same}")
        for what in ("search", "identify"):
            row = "  ".join(f"{rev}: {1e3 * statistics.median(times[(rev, what)]):8.2f} ms" for rev in built)
            print(f"{what:>9}  {row}")


if __name__ == "__main__":
    main()
