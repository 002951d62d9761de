"""Every loss, miner, backbone and learner of the registries is reachable from the command line, with its
parameters, and its help is generated from the registry."""

import numpy as np
import pytest
from typer.testing import CliRunner

from metrix.cli import app
from metrix.registry import REGISTRIES, TRAIN_DEFAULTS, losses, lookup


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_list_prints_one_line_per_entry(kind):
    result = CliRunner().invoke(app, ["list", kind], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(REGISTRIES[kind]())


def test_train_help_names_every_loss_and_miner():
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "2000"})
    for name in list(REGISTRIES["losses"]()) + list(REGISTRIES["miners"]()):
        assert name in result.output


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """60 samples of 6 well-separated classes and a small MLP: a whole `metrix train` in a fraction of a second."""
    folder = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(6), 10)
    np.savez(folder / "tiny.npz", X=(rng.normal(size=(6, 12))[y] + 0.3 * rng.normal(size=(60, 12))).astype(np.float32), y=y)
    (folder / "tiny.yaml").write_text("hidden_dims: [16]\nval_size: 0.2\ntest_size: 0.3\n")
    return folder


@pytest.mark.parametrize("name", sorted(losses()))
def test_every_loss_trains_from_the_command_line(name, tiny, tmp_path):
    entry = lookup("losses", name)
    args = ["train", "--config", str(tiny / "tiny.yaml"), "--data", str(tiny / "tiny.npz"), "--loss", name,
            "--epochs", "1", "--embedding-dim", "8", "--out", str(tmp_path / "run"), "--no-progress",
            "--classes-per-batch", "3", "--samples-per-class", "4"]
    if entry.takes_pairs:
        args += ["--miner", "hardest"]
    # one parameter of each loss set through --loss-param, at its own default (reaches the constructor)
    settable = [k for k, v in entry.params.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and k not in TRAIN_DEFAULTS.get(name, {})]
    if settable:
        args += ["--loss-param", f"{settable[0]}={entry.params[settable[0]]}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "map_at_r" in result.output


def test_unknown_names_and_parameters_are_refused_with_the_choices():
    runner = CliRunner()
    bad = runner.invoke(app, ["train", "--loss", "nope"])
    assert bad.exit_code == 2 and "unknown loss 'nope'; choose one of" in bad.output
    bad = runner.invoke(app, ["train", "--loss", "circle", "--loss-param", "margin=1"])
    assert bad.exit_code == 2 and "has no parameter margin; its parameters are m, gamma" in bad.output
    bad = runner.invoke(app, ["train", "--loss", "circle", "--miner", "nope"])
    assert bad.exit_code == 2 and "unknown miner 'nope'" in bad.output
    bad = runner.invoke(app, ["train", "--loss", "arcface", "--geometry", "poincare"])
    assert bad.exit_code == 2 and "contrastive, generalized_lifted, triplet" in bad.output
    bad = runner.invoke(app, ["list", "things"])
    assert bad.exit_code == 2 and "losses, miners, backbones, learners" in bad.output
