"""``metrix train --nproc N``: torchrun's launcher, real processes, gloo on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _metrix(*args, cwd, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "metrix", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow  # three end-to-end runs (20 s): .ci/run runs it after the default suite
def test_two_processes_train_like_one_with_twice_the_batch(tmp_path):
    """Digits has 10 classes, so two processes of 10×16 make a global batch of 10×32: one process with
    --samples-per-class 32 sees the same batches, and the two runs end with the same MAP@R (within 0.005)."""
    common = ["--epochs", "3", "--no-progress"]
    two = _metrix("train", "--nproc", "2", "--out", "two", *common, cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    assert "10×32 batches over 2 processes" in two.stdout and two.stdout.count("done in") == 1
    one = _metrix("train", "--samples-per-class", "32", "--out", "one", *common, cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    after = {name: json.loads((tmp_path / name / "metrics.json").read_text())["after"]["map_at_r"]
             for name in ("one", "two")}
    assert abs(after["one"] - after["two"]) <= 0.005, after
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    # the run holds rank 0's files only, and a resume must use as many processes
    resumed = _metrix("train", "--resume", "two", cwd=tmp_path)
    assert resumed.returncode == 2 and "--nproc 2" in resumed.stderr, resumed.stderr


@pytest.mark.parametrize("args, message", [
    (["--nproc", "2", "--data", "no/such/folder"], "no/such/folder"),  # found by the ranks: said once
    (["--nproc", "0"], "--nproc must be >= 1"),  # found before launching
    (["--nproc", "2", "--epochs", "0"], "--epochs must be >= 1"),
])
def test_errors_are_one_line(tmp_path, args, message):
    result = _metrix("train", *args, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
