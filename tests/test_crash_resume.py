"""A real ``metrix train`` killed with SIGKILL at random moments, many of them inside checkpoint writes,
and resumed each time, ends with exactly the weights of a run that was never interrupted."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from metrix.io import load_tagged
from metrix.training import CHECKPOINT_TAG

KILLS = int(os.environ.get("METRIX_CRASH_KILLS", "12"))  # 30 in the recorded runs (RESULTS.md)
SETTINGS = "hidden_dims: [1536, 1536]\nepochs: 10\ncheckpoint_every: 1\nprogress: false\nval_size: 0.15\n"


def _metrix(*args):
    return [sys.executable, "-c", "from metrix.cli import main; main()", *args]


def _tensors(path):
    tensors, info = load_tagged(path, "metrix_run_config", "model")
    return tensors, info


def _wait_for(predicate, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.002)
    return False


@pytest.mark.slow  # about a minute: .ci/run runs it after the default suite
def test_sigkilled_training_resumes_bit_identical(tmp_path):
    (tmp_path / "run.yaml").write_text(SETTINGS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same kernels in every process of the test
    ref = subprocess.run(_metrix("train", "--config", "run.yaml", "--name", "ref"), cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr

    run = tmp_path / "runs" / "crash"
    ckpt = run / "checkpoints"
    rng = random.Random(7)
    kills = inside_writes = resumed = 0
    last_epoch = 0
    while kills < KILLS:
        args = ("train", "--resume", str(run)) if (ckpt / "train.json").exists() else (
            "train", "--config", "run.yaml", "--out", str(run))  # a start killed before its settings: start again
        proc = subprocess.Popen(_metrix(*args), cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        mode = rng.choice(["time", "write", "write", "write", "after"])
        if mode == "time":  # anywhere: start-up, data loading, an epoch, a write
            _wait_for(lambda: False, proc, timeout=rng.uniform(0.0, 3.5))
        elif mode == "write":  # while a checkpoint's temporary file is being written
            _wait_for(lambda: any(ckpt.glob(".*.tmp")), proc)
            time.sleep(rng.uniform(0.0, 0.005))
        else:  # just after a checkpoint was renamed into place
            before = (ckpt / "last.safetensors").stat().st_mtime_ns if (ckpt / "last.safetensors").exists() else 0
            _wait_for(lambda: (ckpt / "last.safetensors").exists()
                      and (ckpt / "last.safetensors").stat().st_mtime_ns != before, proc)
        if proc.poll() is not None:  # it finished (or failed) before the kill: only an unfinished run counts
            assert proc.returncode == 0, proc.stderr.read().decode()
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        inside_writes += any(ckpt.glob(".*.tmp"))  # a temporary file left behind: killed inside a write
        proc.stderr.close()
        kills += 1
        if (ckpt / "last.safetensors").exists():  # what a kill left must load cleanly and never go back in time
            _, meta = load_tagged(ckpt / "last.safetensors", CHECKPOINT_TAG, "checkpoint")
            assert meta["next_epoch"] >= last_epoch
            last_epoch = meta["next_epoch"]
            resumed += 1
    final = subprocess.run(_metrix("train", "--resume", str(run)), cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    print(f"kills {kills}, inside checkpoint writes {inside_writes}, resumed from a checkpoint {resumed}")
    assert kills >= KILLS and inside_writes >= KILLS // 3  # a third of the kills land inside a checkpoint write

    ours, ours_info = _tensors(run / "model.safetensors")
    theirs, theirs_info = _tensors(tmp_path / "runs" / "ref" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert ours_info["best_epoch"] == theirs_info["best_epoch"]
    assert not list(ckpt.glob(".*.tmp")) and not list(run.glob(".*.tmp"))


def test_ctrl_c_says_how_to_resume_and_the_resumed_run_ends_identical(tmp_path):
    """SIGINT (Ctrl-C) in the middle of `metrix train`: exit 130, one line naming the checkpoint's epoch and the
    command to resume; resuming ends with the weights of an uninterrupted run."""
    (tmp_path / "run.yaml").write_text("hidden_dims: [512, 512]\nepochs: 6\nprogress: false\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(_metrix("train", "--config", "run.yaml", "--name", "ref"), cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "runs" / "cut"
    proc = subprocess.Popen(_metrix("train", "--config", "run.yaml", "--name", "cut"), cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: (run / "checkpoints" / "last.safetensors").exists(), proc, timeout=120)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "resume with 'metrix train --resume runs/cut'" in lines[0], err
    done = subprocess.run(_metrix("train", "--resume", str(run)), cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ours, _ = _tensors(run / "model.safetensors")
    theirs, _ = _tensors(tmp_path / "runs" / "ref" / "model.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
