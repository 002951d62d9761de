import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def clustered(n_classes=6, per_class=8, dim=16, spread=0.6, seed=0, dtype=torch.float64):
    """Gaussian blobs around random centres: realistic labels with overlap."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g, dtype=dtype)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    x = centres[labels] + spread * torch.randn(len(labels), dim, generator=g, dtype=dtype)
    perm = torch.randperm(len(labels), generator=g)
    return x[perm], labels[perm]


def run_threads(work, n: int) -> list:
    """Run ``work(i)`` for i in range(n) on n threads at once; returns the exceptions they raised."""
    import threading

    errors = []

    def guarded(i):
        try:
            work(i)
        except Exception as exc:  # noqa: BLE001 - handed back to the test
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def flip_byte(path, offset: int = -3) -> None:
    """Damage a saved file in place (one byte inverted), as a disk or a bad copy would."""
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 0xFF
    Path(path).write_bytes(bytes(data))
