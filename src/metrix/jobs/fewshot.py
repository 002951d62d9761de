"""What ``metrix fewshot train / eval`` do: prototypical networks on N-way K-shot episodes."""

from __future__ import annotations

from pathlib import Path

import torch

from metrix.apps.fewshot import PrototypicalNetwork, rotate_classes
from metrix.datasets import load_dataset, load_omniglot
from metrix.checkpoints import CHECKPOINTS, LoopCheckpoint, interrupted, start_or_resume
from metrix.runs import MODEL_FILE, model_file

def episode_data(data: str, root, download: bool = False):
    """Omniglot's background or evaluation set (``omniglot-background``), or any labelled image dataset."""
    if data.startswith("omniglot-"):
        return load_omniglot(root, data.split("-", 1)[1], download_missing=download)
    return load_dataset(data)


COMMAND = "metrix fewshot train"


def train(data: str = "omniglot-background", out=None, root="data/omniglot", download: bool = False,
          rotations: bool = True, episodes: int = 1500, n_way: int = 20, k_shot: int = 5, n_query: int = 5,
          lr: float = 1e-3, seed: int = 0, checkpoint_every: int = 100, resume=None, echo=print) -> Path:
    """Train a prototypical network (4-block conv net), halving the learning rate every third of the
    episodes; saves it into the run folder ``out`` (default ``runs/protonet``) and returns that folder.

    A checkpoint is written every ``checkpoint_every`` episodes into ``<run>/checkpoints/``; ``resume`` (an
    interrupted run folder) continues it with its own settings to the weights an uninterrupted run has."""
    settings = dict(data=data, root=str(root), download=download, rotations=rotations, episodes=int(episodes),
                    n_way=int(n_way), k_shot=int(k_shot), n_query=int(n_query), lr=float(lr), seed=int(seed),
                    checkpoint_every=int(checkpoint_every))
    run_dir, s, resuming = start_or_resume(COMMAND, out, "protonet", settings, resume)
    if resuming:
        echo(f"resuming {run_dir} from its last checkpoint")
    ds = episode_data(s["data"], s["root"], s["download"])
    X, y = rotate_classes(ds.X, ds.y) if s["rotations"] else (ds.X, ds.y)
    torch.manual_seed(s["seed"])  # the initial weights too: the same settings give the same network
    net = PrototypicalNetwork(input_shape=X.shape[1:])
    ckpt = LoopCheckpoint(run_dir / CHECKPOINTS, s["checkpoint_every"])
    try:
        net.fit(X, y, s["n_way"], s["k_shot"], s["n_query"], s["episodes"], s["lr"],
                lr_halve_every=max(s["episodes"] // 3, 1), seed=s["seed"], log_every=max(s["episodes"] // 10, 1),
                echo=echo, checkpoint=ckpt, resume=resuming)
    except KeyboardInterrupt:
        raise interrupted(run_dir, ckpt, "episode", s["episodes"], COMMAND) from None
    net.save(run_dir / MODEL_FILE)
    return run_dir


def evaluate(model, data: str, root, download: bool = False, n_way: int = 5, k_shot: int = 1, n_query: int = 15,
             episodes: int = 1000, seed: int = 0) -> dict:
    """Mean N-way K-shot accuracy with its 95% confidence interval on classes never trained on."""
    net = PrototypicalNetwork.load(model_file(model, "metrix fewshot train"))
    ds = episode_data(data, root, download)
    return net.evaluate(ds.X, ds.y, n_way, k_shot, n_query, episodes, seed)
