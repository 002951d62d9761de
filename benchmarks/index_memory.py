"""Peak memory of saving and loading a large VectorIndex, at two git revisions of metrix.

Each measurement runs in a fresh process (peak RSS only grows, so one process per number): it builds or
loads the index, then reports how far the peak rose during ``save`` or ``load``, in MB and in copies of
the stored vectors. The two revisions' packages come from ``git archive`` of ``src/metrix``.

    python benchmarks/index_memory.py 9f3552a WORKTREE --n 1000000 --dim 64
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from metrix.index import VectorIndex
op, path, n, dim = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if op == "save":
    index = VectorIndex(dim)
    rng = np.random.default_rng(0)
    for start in range(0, n, 100_000):
        index.add(rng.standard_normal((min(100_000, n - start), dim), dtype=np.float32))
    import gc; gc.collect()
    base = peak(); t = time.perf_counter(); index.save(path); seconds = time.perf_counter() - t
else:
    base = peak(); t = time.perf_counter(); index = VectorIndex.load(path); seconds = time.perf_counter() - t
    assert len(index) == n
print(json.dumps({"rise_mb": peak() - base, "seconds": seconds}))
"""


def _package(rev: str, into: Path) -> Path:
    if rev == "WORKTREE":
        return ROOT / "src"
    data = subprocess.run(["git", "archive", rev, "src/metrix"], cwd=ROOT, check=True, capture_output=True).stdout
    tarfile.open(fileobj=io.BytesIO(data)).extractall(into / rev, filter="data")
    return into / rev / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revs", nargs="+", help="git revisions, or WORKTREE for the working tree")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args()
    store_mb = args.n * args.dim * 4 / 2**20
    print(f"store: {args.n} x {args.dim} float32 = {store_mb:.0f} MB")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for rev in args.revs:
            src, path = _package(rev, tmp), tmp / f"{rev}.idx"
            row = {}
            for op in ("save", "load"):
                out = subprocess.run([sys.executable, "-c", CHILD, str(src), op, str(path), str(args.n), str(args.dim)],
                                     check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                row[op] = r
            print(f"{rev:>10}: save +{row['save']['rise_mb']:.0f} MB ({row['save']['rise_mb'] / store_mb:.2f} copies, "
                  f"{row['save']['seconds']:.2f} s)   load +{row['load']['rise_mb']:.0f} MB "
                  f"({row['load']['rise_mb'] / store_mb:.2f} copies, {row['load']['seconds']:.2f} s)")


if __name__ == "__main__":
    main()
