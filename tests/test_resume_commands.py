"""Every training command resumes: a run stopped by Ctrl-C in the middle of an epoch (or an episode run) and
continued with --resume ends with the weights of an uninterrupted run, bit for bit. (The SIGKILL test of
``metrix train`` is in test_crash_resume.py; these commands share its checkpoint file format.)"""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from metrix.cli import app
from tests.apps.test_fewshot import synthetic_images
from tests.apps.test_recommend import planted

runner = CliRunner()


def _interrupt_at(monkeypatch, module, call: int):
    """Ctrl-C (KeyboardInterrupt) at the ``call``-th optimiser step of ``module``'s training loop."""
    real, calls = module.optimizer_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "optimizer_step", step)
    return lambda: monkeypatch.setattr(module, "optimizer_step", real)


def _fewshot(tmp_path):
    X, y = synthetic_images()
    np.savez(tmp_path / "imgs.npz", X=X, y=y)
    return ["fewshot", "train", "--data", str(tmp_path / "imgs.npz"), "--episodes", "24", "--n-way", "4", "--k-shot", "2",
            "--n-query", "2", "--no-rotations", "--checkpoint-every", "5"]


def _recommend(tmp_path):
    root = tmp_path / "ml"
    root.mkdir()
    data = planted(30, 40)
    lines = [f"{u + 1}\t{i + 1}\t{int(r)}\t{t}" for u, i, r, t in zip(data.users, data.items, data.ratings, data.timestamps)]
    (root / "u.data").write_text("\n".join(lines) + "\n")
    return ["recommend", "train", "--root", str(root), "--split", "loo", "--dim", "8", "--epochs", "5", "--no-progress"]


def _selfsup(method):
    return lambda tmp_path: ["selfsup", "train", "--method", method, "--data", "digits", "--epochs", "3",
                             "--train-size", "96", "--batch-size", "32", "--queue-size", "48"]


def _weights(kind, run):
    if kind == "fewshot":
        from metrix.apps.fewshot import PrototypicalNetwork

        return PrototypicalNetwork.load(run / "model.safetensors").encoder.state_dict()
    if kind == "recommend":
        from metrix.apps.recommend import load_recommender

        return load_recommender(run / "model.safetensors")[0].state_dict()
    from metrix.apps.selfsup import ContrastiveLearner

    return ContrastiveLearner.load(run).model.state_dict()


CASES = {  # command, the module whose loop steps, the step Ctrl-C comes at (inside an epoch after a checkpoint)
    "fewshot": (_fewshot, "metrix.apps.fewshot", 13),
    "recommend": (_recommend, "metrix.apps.recommend", 3),  # one batch per epoch here: in epoch 3 of 5
    "selfsup-simclr": (_selfsup("simclr"), "metrix.apps.selfsup", 5),
    "selfsup-moco": (_selfsup("moco"), "metrix.apps.selfsup", 5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ctrl_c_then_resume_ends_with_the_uninterrupted_weights(case, tmp_path, monkeypatch):
    import importlib

    make, module_name, at = CASES[case]
    kind = case.split("-")[0]
    args = make(tmp_path)
    ref = runner.invoke(app, args + ["--out", str(tmp_path / "ref")])
    assert ref.exit_code == 0, ref.output
    restore = _interrupt_at(monkeypatch, importlib.import_module(module_name), at)
    cut = runner.invoke(app, args + ["--out", str(tmp_path / "cut")])
    restore()
    assert cut.exit_code == 130, cut.output
    assert f"resume with 'metrix {' '.join(args[:2])} --resume {tmp_path / 'cut'}'" in cut.output
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    again = runner.invoke(app, args[:2] + ["--resume", str(tmp_path / "cut")])
    assert again.exit_code == 0, again.output
    want, got = _weights(kind, tmp_path / "ref"), _weights(kind, tmp_path / "cut")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    finished = runner.invoke(app, args[:2] + ["--resume", str(tmp_path / "cut")])
    assert finished.exit_code == 2 and "finished run" in finished.output
    mixed = runner.invoke(app, args[:2] + ["--resume", str(tmp_path / "ref"), "--seed", "3"])
    assert mixed.exit_code == 2 and "drop --seed" in mixed.output


def test_a_run_is_resumed_only_by_the_command_that_started_it(tmp_path, monkeypatch):
    args = _fewshot(tmp_path)
    restore = _interrupt_at(monkeypatch, __import__("metrix.apps.fewshot", fromlist=["x"]), 8)
    runner.invoke(app, args + ["--out", str(tmp_path / "cut")])
    restore()
    wrong = runner.invoke(app, ["selfsup", "train", "--resume", str(tmp_path / "cut")])
    assert wrong.exit_code == 2 and "was started by 'metrix fewshot train'" in wrong.output
    nothing = runner.invoke(app, ["recommend", "train", "--resume", str(tmp_path)])
    assert nothing.exit_code == 2 and "no checkpoints to resume from" in nothing.output


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigint_to_a_real_process_exits_130_and_says_how_to_resume(tmp_path):
    """A real Ctrl-C (SIGINT) to `metrix fewshot train`: exit code 130, one line naming the resume command."""
    args = _fewshot(tmp_path)
    args[args.index("--episodes") + 1] = "100000"
    proc = subprocess.Popen([sys.executable, "-m", "metrix", *args, "--out", str(tmp_path / "run"), "--checkpoint-every", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    ckpt = tmp_path / "run" / "checkpoints" / "last.safetensors"
    import time

    deadline = time.monotonic() + 120
    while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "resume with 'metrix fewshot train --resume" in lines[0], err


def test_ctrl_c_between_a_checkpoint_rename_and_its_bookkeeping_still_names_the_checkpoint(tmp_path):
    """The signal can land after the file is renamed into place but before the loop notes it: the message
    reads the file on disk instead of saying there is nothing to resume."""
    from metrix.checkpoints import LoopCheckpoint, interrupted

    ckpt = LoopCheckpoint(tmp_path / "checkpoints", every=1)
    ckpt.save(7, {"w": torch.zeros(2)}, {"history": []})
    fresh = LoopCheckpoint(tmp_path / "checkpoints", every=1)  # a loop that has not noted the save yet
    message = str(interrupted(tmp_path, fresh, "epoch", 10, "metrix selfsup train"))
    assert "after epoch 7 of 10" in message and f"--resume {tmp_path}" in message
    empty = LoopCheckpoint(tmp_path / "none", every=1)
    assert "nothing to resume" in str(interrupted(tmp_path, empty, "epoch", 10, "metrix selfsup train"))
