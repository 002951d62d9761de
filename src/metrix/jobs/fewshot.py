"""What ``metrix fewshot train / eval`` do: prototypical networks on N-way K-shot episodes."""

from __future__ import annotations

from pathlib import Path

from metrix.apps.fewshot import PrototypicalNetwork, rotate_classes
from metrix.datasets import load_dataset, load_omniglot
from metrix.runs import MODEL_FILE, model_file, new_run_dir

def episode_data(data: str, root, download: bool = False):
    """Omniglot's background or evaluation set (``omniglot-background``), or any labelled image dataset."""
    if data.startswith("omniglot-"):
        return load_omniglot(root, data.split("-", 1)[1], download_missing=download)
    return load_dataset(data)


def train(data: str, out, root, download: bool = False, rotations: bool = True, episodes: int = 1500,
          n_way: int = 20, k_shot: int = 5, n_query: int = 5, lr: float = 1e-3, seed: int = 0, echo=print) -> Path:
    """Train a prototypical network (4-block conv net), halving the learning rate every third of the
    episodes; saves it into the run folder ``out`` (default ``runs/protonet``) and returns that folder."""
    ds = episode_data(data, root, download)
    run_dir = new_run_dir(out, "protonet")  # before training: a used --out is refused at once
    X, y = rotate_classes(ds.X, ds.y) if rotations else (ds.X, ds.y)
    net = PrototypicalNetwork(input_shape=X.shape[1:])
    net.fit(X, y, n_way, k_shot, n_query, episodes, lr, lr_halve_every=max(episodes // 3, 1), seed=seed,
            log_every=max(episodes // 10, 1), echo=echo)
    net.save(run_dir / MODEL_FILE)
    return run_dir


def evaluate(model, data: str, root, download: bool = False, n_way: int = 5, k_shot: int = 1, n_query: int = 15,
             episodes: int = 1000, seed: int = 0) -> dict:
    """Mean N-way K-shot accuracy with its 95% confidence interval on classes never trained on."""
    net = PrototypicalNetwork.load(model_file(model, "metrix fewshot train"))
    ds = episode_data(data, root, download)
    return net.evaluate(ds.X, ds.y, n_way, k_shot, n_query, episodes, seed)
