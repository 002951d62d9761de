"""Every command's error path ends in the one error boundary: exit code 2, one line on stderr that says what
is wrong, no traceback, nothing written; ``--debug`` shows the traceback instead."""

import subprocess
import sys

import pytest

from metrix.cli import app

MISSING = "/nonexistent/thing"
ERROR_CASES = [
    (["train", "--data", "nope"], "no dataset at"),
    (["train", "--epochs", "0"], "epochs must be >= 1"),
    (["train", "--resume", MISSING], "no checkpoints to resume"),
    (["evaluate", MISSING], "no such file"),
    (["embed", MISSING, "--data", "digits", "--out", "x.npy"], "no such file"),
    (["index", "build", MISSING, "--data", "digits", "--out", "x.idx"], "no such file"),
    (["index", "search", MISSING, MISSING, "--query", "digits"], "no such file"),
    (["fit-linear", "NOPE"], "NOPE"),
    (["transform-linear", MISSING, "--data", "digits", "--out", "o.npz"], "no such file"),
    (["gallery", "enroll", MISSING, "g.gallery", "--data", "digits"], "no such file"),
    (["gallery", "identify", MISSING, MISSING, "--data", "digits"], "no such file"),
    (["ood", MISSING, "--fit-data", "digits", "--in-data", "digits", "--ood-data", "digits"], "no such file"),
    (["recommend", "eval", MISSING], "no such file"),
    (["fewshot", "eval", MISSING], "no such file"),
    (["selfsup", "eval", MISSING], ""),
    (["text", "eval", "--task", "nope"], "nope"),
    (["text", "train"], "give --task"),
    (["fewshot", "train", "--resume", MISSING], "no checkpoints to resume"),
    (["recommend", "train", "--resume", MISSING], "no checkpoints to resume"),
    (["selfsup", "train", "--resume", MISSING], "no checkpoints to resume"),
    (["explain", MISSING, "--query", "digits#0", "--reference", "digits#1"], "no such file"),
    (["export", MISSING, "--out", "m.pt"], "no such file"),
    (["serve", MISSING, "--store", "/nonexistent/store-parent/store"], "no such file"),
    (["serve", "keys", "create", "--store", "s", "--scope", "root"], "scopes of read, write, admin"),
    (["serve", "keys", "revoke", "abc", "--store", "/nonexistent/x"], "no store at /nonexistent/x"),
    (["serve", "keys", "list", "--store", "/nonexistent/x"], "no store at"),
]


@pytest.mark.parametrize("args,message", ERROR_CASES, ids=[" ".join(a[:2]) for a, _ in ERROR_CASES])
def test_error_paths_print_one_line_and_exit_2(args, message, tmp_path):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, args, catch_exceptions=False, env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_debug_shows_the_traceback():
    out = subprocess.run([sys.executable, "-c", "from metrix.cli import main; main()", "--debug", "train", "--data", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" in out.stderr and "FileNotFoundError" in out.stderr
    plain = subprocess.run([sys.executable, "-c", "from metrix.cli import main; main()", "train", "--data", "nope"],
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    lines = plain.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no dataset at 'nope': use 'digits', fashion-mnist")


@pytest.mark.parametrize("args", [["index", "search", "r", "x.idx", "--query", "digits", "--limit", "0"],
                                  ["index", "search", "r", "x.idx", "--query", "digits", "-k", "-1"],
                                  ["gallery", "identify", "r", "g", "--data", "digits", "--limit", "-1"],
                                  ["gallery", "identify", "r", "g", "--data", "digits", "-k", "0"]])
def test_counts_below_one_are_refused_before_anything_runs(args):
    """--limit 0 used to fail inside torch.cat and --limit -1 silently searched all but one query."""
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "greater than or equal to 1" in result.output


@pytest.mark.parametrize("args", [["train", "--device", "cuda:7"], ["train", "--device", "tpu"],
                                  ["evaluate", "runs/x", "--device", "nonsense"]])
def test_devices_that_are_not_here_are_refused(args, tmp_path):
    """--device names where the model runs; one that this machine lacks is refused with what it has."""
    import torch
    from typer.testing import CliRunner

    if torch.cuda.is_available() and args[-1] == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "device" in result.output or "no such file" in result.output


def test_the_device_option_reaches_the_run():
    from metrix.runs import check_device

    assert str(check_device("cpu")) == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        check_device("nonsense")
