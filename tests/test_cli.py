import json

import numpy as np
import pytest
from typer.testing import CliRunner

from metrix.cli import app
from metrix.io import load_json

runner = CliRunner()


def test_help_explains_every_option():
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    for option in ["--data", "--loss", "--triplets", "--embedding-dim", "--epochs", "--classes-per-batch",
                   "--samples-per-class", "--seed", "--out", "--config"]:
        assert option in result.output


def test_train_evaluate_embed_roundtrip(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("epochs: 50\nloss: triplet\nembedding_dim: 16\n")
    # the CLI flag --epochs 2 wins over the file's 50
    result = runner.invoke(app, ["train", "--config", str(cfg), "--epochs", "2", "--out", str(tmp_path / "runs" / "t"),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "t"
    for name in ["model.safetensors", "config.json", "metrics.json", "history.csv"]:
        assert (run / name).is_file()
    config = load_json(run / "config.json")
    assert config["train"]["epochs"] == 2 and config["train"]["loss"] == "triplet" and config["model"]["embedding_dim"] == 16
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"before", "after"}
    assert {"precision_at_1", "r_precision", "map_at_r", "recall_at_1"} <= set(metrics["after"])
    assert metrics["before"]["map_at_r"] == pytest.approx(0.544, abs=0.01)  # raw digits pixels
    assert len((run / "history.csv").read_text().strip().splitlines()) == 3
    assert "map_at_r" in result.output and "raw pixels" in result.output

    result = runner.invoke(app, ["evaluate", str(run), "--json"])
    assert result.exit_code == 0, result.output
    again = json.loads(result.output)
    assert again["split"] == "test" and again["map_at_r"] == pytest.approx(metrics["after"]["map_at_r"], abs=1e-6)

    out = tmp_path / "emb.npy"
    result = runner.invoke(app, ["embed", str(run), "--data", "digits", "--out", str(out)])
    assert result.exit_code == 0, result.output
    emb = np.load(out)
    assert emb.shape == (1797, 16) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_train_on_npz_with_string_labels(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.array(["ant", "bee", "cow", "dog"]), 25)
    X = rng.normal(size=(100, 5)) + 3 * (np.searchsorted(np.unique(y), y)[:, None] == np.arange(5))
    np.savez(tmp_path / "d.npz", X=X, y=y)
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "d.npz"), "--epochs", "3", "--classes-per-batch", "4",
                                 "--samples-per-class", "4", "--loss", "proxy_anchor", "--out", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "model.safetensors").is_file()  # --out is the run folder itself


def test_cli_errors_are_clear(tmp_path):
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "missing.npz")])
    assert result.exit_code == 2 and "no dataset" in result.output
    result = runner.invoke(app, ["train", "--loss", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown loss" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("epoch: 3\n")
    result = runner.invoke(app, ["train", "--config", str(bad)])
    assert result.exit_code == 2 and "unknown setting" in result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path / "norun")])
    assert result.exit_code == 2 and "no such file" in result.output


def test_default_main_job_reaches_map_at_r_target(tmp_path):
    """Acceptance: `metrix train` with defaults lifts digits MAP@R from ~0.54 (raw) to >= 0.95."""
    from metrix.jobs.train import TrainConfig, train

    result = train(TrainConfig.from_sources(out=str(tmp_path / "run"), progress=False), echo=lambda *_: None)
    assert result["before"]["map_at_r"] == pytest.approx(0.544, abs=0.01)
    assert result["after"]["map_at_r"] >= 0.95
    assert result["after"]["precision_at_1"] >= 0.96


def test_index_build_and_search(tmp_path):
    result = runner.invoke(app, ["train", "--epochs", "2", "--out", str(tmp_path / "r"), "--no-progress"])
    assert result.exit_code == 0, result.output
    run, idx = tmp_path / "r", tmp_path / "gallery.idx"
    result = runner.invoke(app, ["index", "build", str(run), "--data", "digits", "--out", str(idx)])
    assert result.exit_code == 0, result.output
    assert "indexed 1797 vectors of dimension 64" in result.output
    result = runner.invoke(app, ["index", "search", str(run), str(idx), "--query", "digits", "-k", "3",
                                 "--limit", "4", "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)
    assert len(hits) == 4 and all(len(h["neighbours"]) == 3 for h in hits)
    # each gallery item is its own nearest neighbour (distance 0), and labels come from the metadata
    for h in hits:
        first = h["neighbours"][0]
        assert first["id"] == h["query"] and first["distance"] < 1e-3 and first["label"] == h["label"]
    # plain-text output and raw .npy queries without labels
    from sklearn.datasets import load_digits

    np.save(tmp_path / "q.npy", load_digits().data[:2])
    result = runner.invoke(app, ["index", "search", str(run), str(idx), "--query", str(tmp_path / "q.npy"), "-k", "2"])
    assert result.exit_code == 0 and "query 1" in result.output and "distance" in result.output
    # --metric takes the vocabulary's names: a cosine index reports 1 − cos; names from elsewhere are refused
    cos_idx = tmp_path / "cos.idx"
    result = runner.invoke(app, ["index", "build", str(run), "--data", "digits", "--out", str(cos_idx), "--metric", "cosine"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["index", "search", str(run), str(cos_idx), "--query", "digits", "-k", "2", "--limit", "3", "--json"])
    euclid = json.loads(runner.invoke(app, ["index", "search", str(run), str(idx), "--query", "digits", "-k", "2",
                                           "--limit", "3", "--json"]).output)
    for h, e in zip(json.loads(result.output), euclid):  # unit vectors: ‖x − y‖² = 2(1 − cos)
        assert h["neighbours"][1]["distance"] == pytest.approx(e["neighbours"][1]["distance"] ** 2 / 2, abs=1e-4)
    for bad, says in (("l2", "unknown metric 'l2'"), ("poincare", "index it with --metric euclidean")):
        result = runner.invoke(app, ["index", "build", str(run), "--data", "digits", "--out", str(cos_idx), "--metric", bad])
        assert result.exit_code == 2 and says in result.output and len(result.output.strip().splitlines()) == 1
    # a damaged index fails clearly
    raw = bytearray(idx.read_bytes())
    raw[-5] ^= 0xFF
    idx.write_bytes(bytes(raw))
    result = runner.invoke(app, ["index", "search", str(run), str(idx), "--query", "digits"])
    assert result.exit_code == 2 and "checksum" in result.output


def test_out_is_the_run_folder_and_a_used_one_is_refused(tmp_path, monkeypatch):
    """--out names the run folder itself (as it names the file of embed and index build); a folder that
    already holds something is refused, pointing at --resume; without --out the run goes to runs/<name>."""
    run = tmp_path / "exp"
    args = ["train", "--epochs", "1", "--no-progress", "--checkpoint-every", "0"]
    assert runner.invoke(app, args + ["--out", str(run)]).exit_code == 0
    assert (run / "model.safetensors").is_file()
    again = runner.invoke(app, args + ["--out", str(run)])
    assert again.exit_code == 2 and f"--out {run} is not an empty folder" in again.output and "--resume" in again.output
    monkeypatch.chdir(tmp_path)
    for expected in ("runs/digits-ntxent", "runs/digits-ntxent-2"):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        assert (tmp_path / expected / "model.safetensors").is_file()
    assert runner.invoke(app, args + ["--name", "mine"]).exit_code == 0
    assert (tmp_path / "runs" / "mine" / "config.json").is_file()


def test_a_run_killed_before_its_settings_landed_can_be_started_again_into_the_same_folder(tmp_path):
    """A kill in the first moments leaves the run folder with an empty checkpoints/ (or only a temporary file):
    that run never started, so --out accepts the folder again; anything more is refused."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / ".train.json.abc123.tmp").write_bytes(b"{partial")
    args = ["train", "--epochs", "1", "--no-progress", "--checkpoint-every", "0", "--out", str(run)]
    assert runner.invoke(app, args).exit_code == 0 and (run / "model.safetensors").is_file()
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "train.json").write_text("{}")
    refused = runner.invoke(app, args[:-1] + [str(other)])
    assert refused.exit_code == 2 and "is not an empty folder" in refused.output


def test_class_disjoint_split_trains_and_tests_on_different_classes(tmp_path):
    """--split classes: no class on both sides (test or validation), retrieval among the unseen test classes
    before and after, the protocol recorded in the run and used again by evaluate."""
    from sklearn.datasets import load_digits

    from metrix.datasets import class_split
    from metrix.evaluation import retrieval_metrics

    X, y = load_digits(return_X_y=True)
    for seed in range(5):
        train_idx, test_idx = class_split(y, 0.3, seed)
        assert not set(y[train_idx]) & set(y[test_idx]) and len(set(y[test_idx])) == 3
        assert len(train_idx) + len(test_idx) == len(y)
    r = runner.invoke(app, ["train", "--split", "classes", "--epochs", "3", "--out", str(tmp_path / "run"),
                            "--no-progress", "--checkpoint-every", "0"])
    assert r.exit_code == 0, r.output
    assert "class-disjoint, 3 unseen test classes" in r.output
    config = load_json(tmp_path / "run" / "config.json")
    test_classes = config["split"]["test_classes"]
    assert config["split"]["protocol"] == "classes" and len(test_classes) == 3
    assert not set(test_classes) & set(config["classes"])  # the model never saw a test class
    _, test_idx = class_split(y, 0.3, 0)
    before = load_json(tmp_path / "run" / "metrics.json", checksum=False)["before"]
    assert before["map_at_r"] == pytest.approx(retrieval_metrics(X[test_idx].astype(np.float32), y[test_idx])["map_at_r"])
    again = json.loads(runner.invoke(app, ["evaluate", str(tmp_path / "run"), "--json"]).output)
    after = load_json(tmp_path / "run" / "metrics.json", checksum=False)["after"]
    assert again["map_at_r"] == pytest.approx(after["map_at_r"], abs=1e-6)
    bad = runner.invoke(app, ["train", "--split", "people"])
    assert bad.exit_code == 2 and "--split must be 'samples' or 'classes'" in bad.output


def test_image_size_trains_evaluates_and_embeds_at_that_size(tmp_path):
    """--image-size resizes the training images; evaluate, embed and index read image data at the run's size."""
    from tests.test_datasets import _write_idx

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 12)
    images = rng.integers(0, 60, size=(48, 12, 12))
    for c in range(4):  # each class draws a bright square in its own corner
        images[labels == c, 6 * (c // 2):6 * (c // 2) + 6, 6 * (c % 2):6 * (c % 2) + 6] += 150
    _write_idx(tmp_path / "toy-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "toy-labels-idx1-ubyte.gz", labels)
    data, out = str(tmp_path / "toy-images-idx3-ubyte.gz"), tmp_path / "run"
    r = runner.invoke(app, ["train", "--data", data, "--image-size", "8", "8", "--backbone", "convnet", "--epochs", "1",
                            "--classes-per-batch", "4", "--samples-per-class", "4", "--out", str(out), "--no-progress",
                            "--checkpoint-every", "0"])
    assert r.exit_code == 0, r.output
    assert load_json(out / "config.json")["model"]["input_shape"] == [1, 8, 8]
    again = runner.invoke(app, ["evaluate", str(out), "--json"])
    assert again.exit_code == 0, again.output
    after = load_json(out / "metrics.json", checksum=False)["after"]
    assert json.loads(again.output)["map_at_r"] == pytest.approx(after["map_at_r"], abs=1e-6)
    emb = runner.invoke(app, ["embed", str(out), "--data", data, "--out", str(tmp_path / "e.npy")])
    assert emb.exit_code == 0, emb.output
    assert np.load(tmp_path / "e.npy").shape == (48, 64)
    flat = tmp_path / "flat.npy"  # rows of the run's 8×8 = 64 values are reshaped by the run, not resized
    np.save(flat, rng.random((3, 64), dtype=np.float32))
    idx = runner.invoke(app, ["index", "build", str(out), "--data", str(flat), "--out", str(tmp_path / "g.idx")])
    assert idx.exit_code == 0, idx.output
    why = runner.invoke(app, ["explain", str(out), "--query", f"{data}#0", "--data", data, "-k", "1", "--json"])
    assert why.exit_code == 0, why.output
    bad = runner.invoke(app, ["train", "--image-size", "8", "8", "--epochs", "1"])
    assert bad.exit_code == 2 and "not images: an image size applies to image data only" in bad.output


def test_a_run_can_hand_on_its_backbone_features(tmp_path):
    """--model-output features --head-hidden-dim: the MLP head trains, the run embeds, evaluates and exports
    with the backbone's L2-normalised features."""
    from metrix.jobs.export import export
    from metrix.runs import Run

    out = tmp_path / "run"
    r = runner.invoke(app, ["train", "--backbone", "mlp", "--model-output", "features", "--head-hidden-dim", "32",
                            "--split", "classes", "--epochs", "2", "--out", str(out), "--no-progress",
                            "--checkpoint-every", "0"])
    assert r.exit_code == 0, r.output
    assert "the run embeds with the backbone's 256-d features" in r.output
    run = Run.open(out)
    config = load_json(out / "config.json")
    assert config["model"]["output"] == "features" and config["model"]["head_hidden_dim"] == 32
    x = np.random.default_rng(0).random((5, 64), dtype=np.float32) * 16
    e = run.embed(x)
    assert run.embedding_dim == e.shape[1] == 256
    np.testing.assert_allclose(e.norm(dim=1).numpy(), 1.0, rtol=1e-5)
    again = json.loads(runner.invoke(app, ["evaluate", str(out), "--json"]).output)
    after = load_json(out / "metrics.json", checksum=False)["after"]
    assert again["map_at_r"] == pytest.approx(after["map_at_r"], abs=1e-6)
    assert export(run, tmp_path / "m.pt")["embedding_dim"] == 256
    bad = runner.invoke(app, ["train", "--model-output", "neck"])
    assert bad.exit_code == 2 and "--model-output must be one of head, features" in bad.output
    bad = runner.invoke(app, ["train", "--model-output", "features", "--freeze-backbone"])
    assert bad.exit_code == 2 and "training would not change what the model hands on" in bad.output


@pytest.mark.parametrize("backbone", ["mlp", "convnet_gap"])
def test_export_matches_the_run_without_metrix(tmp_path, backbone):
    """The exported file holds standardisation, network and normalisation: plain torch (no metrix import), or
    ONNX Runtime, gives the run's embeddings."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from metrix.runs import Run

    args = ["train", "--epochs", "1", "--backbone", backbone, "--out", str(tmp_path / "run"), "--no-progress",
            "--checkpoint-every", "0"]
    assert runner.invoke(app, args).exit_code == 0
    r = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "m.pt")])
    assert r.exit_code == 0 and "matches the run" in r.output, r.output
    x = load_digits().data[:20].astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy as np, torch; m = torch.jit.load(sys.argv[1]); "
            "np.save(sys.argv[3], m(torch.from_numpy(np.load(sys.argv[2]))).detach().numpy()); "
            "assert 'metrix' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.pt"), str(tmp_path / "x.npy"), str(tmp_path / "e.npy")],
                   check=True, timeout=120)
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), Run.open(tmp_path / "run").embed(x).numpy(), atol=1e-5, rtol=0)
    bad = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "m.x"), "--format", "tflite"])
    assert bad.exit_code == 2 and "--format must be one of torchscript, onnx" in bad.output
    # ONNX, run by ONNX Runtime (any batch size), gives the same embeddings
    ort = pytest.importorskip("onnxruntime")
    r = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "m.onnx"), "--format", "onnx"])
    assert r.exit_code == 0 and "(onnx)" in r.output, r.output
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"inputs": x})[0], Run.open(tmp_path / "run").embed(x).numpy(),
                               atol=1e-5, rtol=0)
