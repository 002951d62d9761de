"""A run is opened once and shared: the same embeddings from 8 threads as from one, no mode switching,
a folder holding one run accepted, clear errors for inputs that do not fit."""


import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from metrix.jobs.train import TrainConfig, train
from metrix.runs import Run, resolve_run_dir
from tests.conftest import run_threads


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    result = train(TrainConfig.from_sources(None, epochs=1, out=str(out / "r"), progress=False),
                   echo=lambda *a: None)
    return result["run_dir"]


def test_a_run_shared_by_eight_threads_embeds_as_one_thread(run_dir):
    run = Run.open(run_dir)
    x = load_digits().data.astype(np.float32)
    expected = run.embed(x, batch_size=64)
    results = [None] * 8

    def work(i):
        for _ in range(3):
            results[i] = run.embed(x, batch_size=64)

    assert run_threads(work, 8) == []
    # unit vectors from float32 GEMMs: a different split of the work between threads may move the last bits
    for r in results:
        torch.testing.assert_close(r, expected, rtol=0, atol=1e-5)
    assert not run.model.training and not any(p.requires_grad for p in run.model.parameters())


def test_a_folder_with_one_run_is_accepted_and_several_are_listed(run_dir, tmp_path):
    assert resolve_run_dir(run_dir.parent) == run_dir  # `metrix train --out X` then `metrix embed X`
    assert Run.open(run_dir.parent).path == run_dir
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"holds 2 runs \(a, b\)"):
        resolve_run_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no run"):
        resolve_run_dir(_empty(tmp_path))


def _empty(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def test_inputs_that_do_not_fit_get_a_clear_error(run_dir):
    run = Run.open(run_dir)
    x = load_digits().data[:4].astype(np.float32)
    torch.testing.assert_close(run.embed(x.reshape(4, 8, 8)), run.embed(x))  # same values, another layout
    with pytest.raises(ValueError, match=r"takes samples of shape \(64,\)"):
        run.embed(np.zeros((3, 10)))
    with pytest.raises(ValueError, match="NaN"):
        run.embed(np.full((2, 64), np.nan))
    with pytest.raises(ValueError, match="empty"):
        run.embed(np.zeros((0, 64)))
    with pytest.raises(ValueError, match="numeric"):
        run.embed(np.array([["a"] * 64]))


def test_the_cli_takes_the_folder_that_holds_the_run(run_dir, tmp_path):
    from typer.testing import CliRunner

    from metrix.cli import app

    result = CliRunner().invoke(app, ["embed", str(run_dir.parent), "--data", "digits", "--out", str(tmp_path / "e.npy")])
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "e.npy").shape == (1797, 64)
