"""Distributed training on real processes (torch.distributed, gloo on CPU, world sizes 2 and 3).

Each world runs once (spawning costs seconds); its workers evaluate every case and write what they saw, and
the test compares it with one process on the concatenated batch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metrix import distributed
from metrix.evaluation import retrieval_metrics
from metrix.losses import LOSSES, build_loss
from metrix.memory import CrossBatchMemory
from metrix.mining import MINERS
from metrix.registry import losses as loss_entries

# uneven per-rank batches; each global batch has 4 classes, every class at least 3 samples
SIZES = {2: (7, 5), 3: (4, 6, 5)}
DIM, CLASSES = 8, 4
TRIPLET_SELECTIONS = ("all", "hard", "semihard", "easy", "batch_hard")
STEP_CASES = ("multi_similarity", "proxy_anchor", "batchnorm")  # a pair loss, a proxy loss, a BatchNorm model


def _cases() -> list[tuple[str, dict, str | None]]:
    cases = [(name, {}, None) for name in LOSSES if name != "triplet"]
    cases += [("triplet", {"triplets": t, "margin": 0.3}, None) for t in TRIPLET_SELECTIONS]
    takes_pairs = sorted(n for n, e in loss_entries().items() if e.takes_pairs)
    for miner in MINERS:  # every miner, with a pair loss and a triplet loss
        cases += [("contrastive", {}, miner), ("triplet", {"triplets": "all", "margin": 5.0 if miner == "easy" else 0.3}, miner)]
    assert "contrastive" in takes_pairs and "triplet" in takes_pairs
    return cases


CASES = _cases()


def _global_batch(world: int, case: int):
    g = torch.Generator().manual_seed(1000 * world + case)
    n = sum(SIZES[world])
    labels = torch.arange(n) % CLASSES
    labels = labels[torch.randperm(n, generator=g)]
    emb = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    return emb, labels


def _build(name, params, miner):
    torch.manual_seed(7)  # proxies start equal on every rank and in the reference
    loss = build_loss(name, num_classes=CLASSES, embedding_dim=DIM, **params).double()
    return loss, None if miner is None else MINERS[miner]()


def _slice(world: int, rank: int) -> slice:
    start = sum(SIZES[world][:rank])
    return slice(start, start + SIZES[world][rank])


def _init(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


# ------------------------------------------------------------------ workers (run in spawned processes)
def _loss_worker(rank: int, world: int, store: str, out: str) -> None:
    _init(rank, world, store)
    results = []
    for case, (name, params, miner) in enumerate(CASES):
        emb, labels = _global_batch(world, case)
        loss, mine = _build(name, params, miner)
        local = emb[_slice(world, rank)].clone().requires_grad_(True)
        value = distributed.GlobalBatchLoss(loss, mine)(local, labels[_slice(world, rank)])
        value.backward()
        results.append({"value": value.detach(), "grad": local.grad,
                        "params": [p.grad.clone() if p.grad is not None else None for p in loss.parameters()]})
    results.append(_batchnorm2d(world, slice_=_slice(world, rank)))
    # sharded evaluation
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(103, 6, generator=g), torch.randint(0, 5, (103,), generator=g)
    results.append({"self": distributed.sharded_retrieval_metrics(x, y),
                    "ref": distributed.sharded_retrieval_metrics(x[:40], y[:40], x[40:], y[40:])})
    torch.save(results, Path(out) / f"losses{rank}.pt")
    distributed.shutdown()


def _batchnorm2d(world: int, slice_: slice | None = None) -> dict:
    """BatchNorm2d in training mode on (a rank's share of) a fixed batch, the objective a fixed random weighting
    of its output (each rank's share sums to the global objective): output, input gradient, parameter
    gradients and running statistics. ``slice_=None``: one process on the whole batch."""
    g = torch.Generator().manual_seed(9)
    n = sum(SIZES[world])
    x, weights = torch.randn(n, 3, 4, 5, generator=g, dtype=torch.float64) * 3 + 1, torch.randn(n, 3, 4, 5, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3).double()
    net = torch.nn.Sequential(bn)  # global_batchnorm swaps the layers inside a model
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    rows = slice(0, n) if slice_ is None else slice_
    xs = x[rows].clone().requires_grad_(True)
    with distributed.global_batchnorm(net):
        out = net(xs)
    (out * weights[rows]).sum().backward()
    return {"out": out.detach(), "grad": xs.grad, "weight": bn.weight.grad, "bias": bn.bias.grad,
            "running": torch.cat([bn.running_mean, bn.running_var])}


def _model(seed: int = 3, batchnorm: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    norm = [torch.nn.BatchNorm1d(16)] if batchnorm else []
    return torch.nn.Sequential(torch.nn.Linear(10, 16), *norm, torch.nn.Tanh(), torch.nn.Linear(16, DIM)).double()


def _inputs(world: int):
    g = torch.Generator().manual_seed(11)
    n = sum(SIZES[world])
    return torch.randn(n, 10, generator=g, dtype=torch.float64), torch.arange(n) % CLASSES


def _step_worker(rank: int, world: int, store: str, out: str) -> None:
    """One optimiser step of a model and a proxy loss under DDP; then five steps of a cross-batch memory."""
    _init(rank, world, store)
    x, y = _inputs(world)
    saved = {}
    for name in STEP_CASES:
        model = _model(batchnorm=name == "batchnorm")
        loss, _ = _build("multi_similarity" if name == "batchnorm" else name, {}, None)
        with distributed.global_batchnorm(model):
            step = distributed.wrap_model(distributed.TrainStep(model, loss))
            opt = torch.optim.SGD(list(model.parameters()) + list(loss.parameters()), lr=0.5)
            opt.zero_grad()
            step(x[_slice(world, rank)], y[_slice(world, rank)]).backward()
            opt.step()
        assert all(type(m) is not distributed.GlobalBatchNorm for m in model.modules())
        saved[name] = [t.detach().clone() for t in [*model.parameters(), *loss.parameters(), *model.buffers()]]
    xbm = CrossBatchMemory(build_loss("contrastive"), DIM, memory_size=20).double()
    model = _model()
    step = distributed.wrap_model(distributed.TrainStep(model, xbm))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(5):
        opt.zero_grad()
        xi = x.roll(i, 0)
        step(xi[_slice(world, rank)], y.roll(i, 0)[_slice(world, rank)]).backward()
        opt.step()
    saved["xbm"] = [t.clone() for t in xbm.contents()]
    torch.save(saved, Path(out) / f"step{rank}.pt")
    distributed.shutdown()


def _trainer(checkpoint_dir, classes_per_batch: int, epochs: int = 3, callbacks=()):
    from metrix.losses import MultiSimilarityLoss
    from metrix.models import EmbeddingModel
    from metrix.training import Trainer

    torch.manual_seed(0)
    model = EmbeddingModel("mlp", 8, input_shape=(10,), backbone_kwargs={"hidden_dims": (32,)})  # has BatchNorm
    return Trainer(model, MultiSimilarityLoss(), epochs=epochs, classes_per_batch=classes_per_batch,
                   samples_per_class=4, checkpoint_dir=checkpoint_dir, progress=False, seed=0, callbacks=callbacks)


def _train_data():
    g = torch.Generator().manual_seed(2)
    y = torch.arange(120) % 6
    x = torch.randn(6, 10, generator=g)[y] + 0.8 * torch.randn(120, 10, generator=g)
    return x.numpy(), y.numpy()


class _Stop:
    def __init__(self, after: int):
        self.after = after

    def __call__(self, trainer, epoch, row):
        if epoch + 1 == self.after:
            raise KeyboardInterrupt


def _trainer_worker(rank: int, world: int, store: str, out: str) -> None:
    """Trainer.fit on W ranks: uninterrupted; interrupted after epoch 1 then resumed; a validation split."""
    _init(rank, world, store)
    x, y = _train_data()
    val = (x[:30], y[:30])
    full = _trainer(Path(out) / "full", 6 // world)  # the global batch: all 6 classes
    history = full.fit(x, y, val=val)
    cut = _trainer(Path(out) / "cut", full.classes_per_batch, callbacks=[_Stop(1)])
    try:
        cut.fit(x, y, val=val)
    except KeyboardInterrupt:
        pass
    resumed = _trainer(Path(out) / "cut", full.classes_per_batch)
    resumed.fit(x, y, val=val, resume=True)
    torch.save({"full": full.model.state_dict(), "resumed": resumed.model.state_dict(), "history": history,
                "files": sorted(p.name for p in (Path(out) / "full").iterdir())}, Path(out) / f"trainer{rank}.pt")
    distributed.shutdown()


def _spawn(worker, world: int, tmp_path: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True)


# ------------------------------------------------------------------ tests
def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    scale = max(float(b.abs().max()), 1e-300) if b.numel() else 1.0
    return float((a - b).abs().max()) <= rel * scale if b.numel() else True


@pytest.mark.parametrize("world", [2, 3])
def test_global_batch_losses_equal_one_process(world, tmp_path):
    """Every loss and miner: the value on every rank and the gradient w.r.t. every rank's embeddings equal one
    process on the concatenated batch (float64, relative 1e-9); the loss's own parameters' gradients, summed
    over the ranks (what DDP does), equal the one-process gradient."""
    _spawn(_loss_worker, world, tmp_path)
    per_rank = [torch.load(tmp_path / f"losses{r}.pt") for r in range(world)]
    failures = []
    for case, (name, params, miner) in enumerate(CASES):
        emb, labels = _global_batch(world, case)
        loss, mine = _build(name, params, miner)
        ref_emb = emb.clone().requires_grad_(True)
        value = loss(ref_emb, labels) if mine is None else loss(ref_emb, labels, pairs=mine(ref_emb, labels))
        value.backward()
        label = f"{name} {params} miner={miner}"
        inert = float(value.detach()) == 0.0 and float(ref_emb.grad.abs().max()) == 0.0
        if inert and params.get("triplets") != "easy":  # easy triplets have zero loss by definition
            failures.append(f"{label}: the case tests nothing (zero loss)")
        for r, got in enumerate(per_rank):
            if not _close(got[case]["value"], value.detach(), 1e-9):
                failures.append(f"{label}: rank {r} value {float(got[case]['value'])} != {float(value)}")
        grads = torch.cat([got[case]["grad"] for got in per_rank])
        if not _close(grads, ref_emb.grad, 1e-9):
            failures.append(f"{label}: embedding gradient differs by {float((grads - ref_emb.grad).abs().max()):.3g}")
        for i, p in enumerate(loss.parameters()):
            summed = sum(got[case]["params"][i] for got in per_rank)
            if not _close(summed, p.grad, 1e-9):
                failures.append(f"{label}: parameter {i} gradient differs")
    assert not failures, "\n".join(failures)
    # BatchNorm2d with the global batch's statistics: the one-process output and gradients
    one = _batchnorm2d(world)
    for key in ("out", "grad"):
        assert _close(torch.cat([got[-2][key] for got in per_rank]), one[key], 1e-9), key
    for key in ("weight", "bias"):  # each rank holds its share; DDP sums them
        assert _close(sum(got[-2][key] for got in per_rank), one[key], 1e-9), key
    for got in per_rank:
        assert _close(got[-2]["running"], one["running"], 1e-9)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(103, 6, generator=g), torch.randint(0, 5, (103,), generator=g)
    expected = {"self": retrieval_metrics(x, y), "ref": retrieval_metrics(x[:40], y[:40], x[40:], y[40:])}
    for got in per_rank:
        for key in ("self", "ref"):
            assert got[-1][key].keys() == expected[key].keys()
            for metric, v in expected[key].items():
                assert got[-1][key][metric] == pytest.approx(v, rel=1e-12), (key, metric)


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_step_equals_one_process_step(world, tmp_path):
    """A full optimiser step under DDP (model + proxies; BatchNorm statistics of the global batch, running
    statistics included) equals the one-process step on the global batch;
    a cross-batch memory holds the same content on every rank after 5 steps, and the one-process content."""
    _spawn(_step_worker, world, tmp_path)
    per_rank = [torch.load(tmp_path / f"step{r}.pt") for r in range(world)]
    x, y = _inputs(world)
    for name in STEP_CASES:
        model = _model(batchnorm=name == "batchnorm")
        loss, _ = _build("multi_similarity" if name == "batchnorm" else name, {}, None)
        params = list(model.parameters()) + list(loss.parameters())
        before = [p.detach().clone() for p in [*params, *model.buffers()]]
        opt = torch.optim.SGD(params, lr=0.5)
        loss(model(x), y).backward()
        opt.step()
        after = [*params, *model.buffers()]
        assert all(not torch.equal(a, p.detach()) for a, p in zip(before, after))  # every tensor moved
        assert len(got := per_rank[0][name]) == len(after)
        for got in per_rank:
            for mine, ref in zip(got[name], after):
                assert _close(mine.double(), ref.detach().double(), 1e-6), name
    first = per_rank[0]["xbm"]
    for got in per_rank[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got["xbm"], first))
    xbm = CrossBatchMemory(build_loss("contrastive"), DIM, memory_size=20).double()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(5):
        opt.zero_grad()
        xbm(model(x.roll(i, 0)), y.roll(i, 0)).backward()
        opt.step()
    assert len(xbm) == 20
    for mine, ref in zip(first, xbm.contents()):
        assert _close(mine.double(), ref.double(), 1e-6)


def test_one_process_is_the_plain_loss():
    """Without a process group (and at world size 1) the wrapper is the loss itself: no gather, no scaling."""
    emb, labels = _global_batch(2, 0)
    loss = build_loss("multi_similarity")
    assert torch.equal(distributed.GlobalBatchLoss(loss)(emb, labels), loss(emb, labels))
    assert distributed.all_gather(emb) is emb and distributed.get_world_size() == 1


def test_distributed_sampler_shares_the_global_batch():
    labels = np.repeat(np.arange(12), 7)
    single = distributed.DistributedClassBalancedBatchSampler(labels, 6, 4, seed=3, rank=0, world_size=1)
    ranks = [distributed.DistributedClassBalancedBatchSampler(labels, 2, 4, seed=3, rank=r, world_size=3)
             for r in range(3)]
    for s in [single, *ranks]:
        s.set_epoch(2)
    assert len({len(s) for s in ranks}) == 1 and len(ranks[0]) == len(single)
    seen = []
    for batch, *shares in zip(single, *ranks):
        assert [i for share in shares for i in share] == batch  # rank order concatenates to the global batch
        assert all(len(share) == 8 for share in shares)
        seen += batch
    assert len(set(seen)) >= 0.9 * len(labels)  # about every sample once per epoch
    with pytest.raises(ValueError, match="rank must be"):
        distributed.DistributedClassBalancedBatchSampler(labels, 2, 4, rank=3, world_size=3)


def test_distributed_episode_sampler_is_disjoint():
    from metrix.apps.fewshot import EpisodeSampler

    labels = np.repeat(np.arange(10), 6)
    make = lambda: EpisodeSampler(labels, n_way=3, k_shot=1, n_query=2, episodes=7, seed=1)  # noqa: E731
    shares = [list(distributed.DistributedEpisodeSampler(make(), rank=r, world_size=2)) for r in range(2)]
    everything = list(make())
    assert [len(s) for s in shares] == [3, 3]
    assert [e[0].tolist() for e in shares[0]] == [everything[i][0].tolist() for i in (0, 2, 4)]
    assert [e[0].tolist() for e in shares[1]] == [everything[i][0].tolist() for i in (1, 3, 5)]


@pytest.mark.parametrize("world", [2, 3])
def test_trainer_under_ddp(world, tmp_path):
    """Trainer.fit on W processes: the same training as one process on the global batches (weights to
    float32 rounding, validation metrics alike), identical weights on every rank, rank-0 checkpoints, and an
    interrupted run resumed on as many processes ends bit-identical to the uninterrupted one."""
    x, y = _train_data()
    _spawn(_trainer_worker, world, tmp_path)
    per_rank = [torch.load(tmp_path / f"trainer{r}.pt", weights_only=False) for r in range(world)]
    one = _trainer(tmp_path / "one", 6)  # the global batch of the W processes
    one_history = one.fit(x, y, val=(x[:30], y[:30]))
    for got in per_rank:
        for key, value in per_rank[0]["full"].items():
            assert torch.equal(got["full"][key], value), key  # every rank holds the same model
            assert torch.equal(got["resumed"][key], value), key  # resume is bit-exact
    # float32 embeddings of a share and of the whole batch differ in their last bits; Adam passes that on
    # scaled by lr/√v, which stays near rounding because weight decay (1e-4·w, identical in both runs) dominates
    # the gradients of the parameters whose true gradient is 0 (biases feeding BatchNorm), so no update sign
    # is left to rounding
    for key, value in one.model.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(per_rank[0]["full"][key], value, rtol=1e-4, atol=1e-5), key
    for mine, ref in zip(per_rank[0]["history"], one_history):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-4)
        assert mine["map_at_r"] == pytest.approx(ref["map_at_r"], abs=0.02)
    assert per_rank[0]["files"] == ["best.safetensors", "last.safetensors"]
    # a different world size cannot continue the run bit-exactly, and says so
    from metrix.io import CorruptFileError

    with pytest.raises(CorruptFileError, match=f"written by {world} process"):
        _trainer(tmp_path / "cut", 6 // world).fit(x, y, resume=True)


def _selfsup_fit(method: str, checkpoint_dir=None, epochs: int = 2, stop_after: int | None = None, resume=False,
                 lr: float = 1e-3):
    from metrix.apps.selfsup import ContrastiveLearner
    from metrix.checkpoints import LoopCheckpoint

    X = np.random.default_rng(0).random((48, 1, 8, 8), dtype=np.float32)
    learner = ContrastiveLearner(method, input_shape=(1, 8, 8), queue_size=40, momentum=0.9, seed=0)
    ckpt = None if checkpoint_dir is None else LoopCheckpoint(checkpoint_dir, 1)
    if stop_after is not None:  # Ctrl-C right after the checkpoint of epoch `stop_after`
        save = ckpt.save

        def save_then_stop(done, state, meta=None):
            save(done, state, meta)
            if done == stop_after:
                raise KeyboardInterrupt
        ckpt.save = save_then_stop
    try:
        history = learner.fit(X, epochs=epochs, batch_size=16, lr=lr, checkpoint=ckpt, resume=resume)
    except KeyboardInterrupt:
        return None
    return {"model": learner.model.state_dict(), "history": history,
            "grads": [p.grad.clone() for p in learner.model.parameters()],
            "queue": [t.clone() for t in learner.queue_.contents()] if method == "moco" else None}


def _selfsup_worker(rank: int, world: int, store: str, out: str) -> None:
    _init(rank, world, store)
    saved = {method: _selfsup_fit(method, lr=0.0) for method in ("simclr", "moco")}
    saved["trained"] = _selfsup_fit("moco")
    _selfsup_fit("moco", Path(out) / "cut", stop_after=1)
    saved["resumed"] = _selfsup_fit("moco", Path(out) / "cut", resume=True)
    torch.save(saved, Path(out) / f"selfsup{rank}.pt")
    distributed.shutdown()


def test_selfsup_on_two_processes(tmp_path):
    """SimCLR and MoCo on 2 processes (8 images each of a 16-image global batch). With the weights held still
    (lr = 0), every step's loss, the summed gradient and MoCo's queue equal one process's on the global batch
    (float32 rounding apart). Training keeps both ranks' weights identical, and a resumed run ends bit-identical."""
    _spawn(_selfsup_worker, 2, tmp_path)
    per_rank = [torch.load(tmp_path / f"selfsup{r}.pt", weights_only=False) for r in range(2)]
    for method in ("simclr", "moco"):
        one, got = _selfsup_fit(method, lr=0.0), per_rank[0][method]
        assert got["history"] == pytest.approx(one["history"], rel=1e-5)
        # float32 rounding is relative to the gradient's overall scale (a bias feeding BatchNorm has a true
        # gradient of 0: what is computed there is rounding alone)
        scale = max(float(g.abs().max()) for g in one["grads"])
        assert scale > 0
        for mine, ref in zip(got["grads"], one["grads"]):
            assert torch.allclose(mine, ref, rtol=1e-4, atol=1e-5 * scale), method
        if method == "moco":
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got["queue"], one["queue"]))
            assert all(torch.equal(a, b) for a, b in zip(got["queue"], per_rank[1][method]["queue"]))
    for key, value in per_rank[0]["trained"]["model"].items():
        assert torch.equal(per_rank[1]["trained"]["model"][key], value), key  # the ranks stay in step
        assert torch.equal(per_rank[0]["resumed"]["model"][key], value), key  # resume is bit-exact


def _tiny_text_encoder(folder: str):
    from metrix.apps.text import SentenceEncoder

    return SentenceEncoder.from_pretrained(folder)


def _text_fits(folder: str) -> dict:
    """One step of each objective (16 items, one batch) from the same start; the loss and the gradient."""
    from metrix.apps.text import fit_labelled, fit_pairs

    words = ["red", "green", "blue", "cat", "dog", "big", "small", "the"]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 4)) for _ in range(16)]
    second = [" ".join(rng.choice(words, 4)) for _ in range(16)]
    labels = np.arange(16) % 4
    scores = rng.random(16) * 5
    out = {}
    for name, fit in (("supcon", lambda e: fit_labelled(e, texts, labels, "supcon", batch_size=16, samples_per_class=4)),
                      ("infonce", lambda e: fit_pairs(e, texts, second, loss="infonce", batch_size=16)),
                      ("ranknet", lambda e: fit_pairs(e, texts, second, scores, loss="ranknet", batch_size=16))):
        torch.manual_seed(0)
        encoder = _tiny_text_encoder(folder)
        history = fit(encoder)
        out[name] = {"loss": history[0], "steps": len(history),
                     "grads": [p.grad.clone() for p in encoder.parameters() if p.grad is not None]}
    return out


def _text_worker(rank: int, world: int, store: str, out: str, folder: str) -> None:
    _init(rank, world, store)
    torch.save(_text_fits(folder), Path(out) / f"text{rank}.pt")
    distributed.shutdown()


def test_text_fine_tuning_on_two_processes(tmp_path):
    """Text fine-tuning on 2 processes (8 texts or pairs each): the first step's loss and the summed gradient
    equal one process's on the 16-item batch, for a labelled loss and for in-batch-negative and pairwise ones."""
    pytest.importorskip("transformers")
    from tests.apps.test_text import make_tiny_model

    folder = make_tiny_model(tmp_path / "tiny-bert")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_text_worker, args=(2, str(tmp_path / "store"), str(tmp_path), str(folder)), nprocs=2, join=True)
    one = _text_fits(str(folder))
    for r in range(2):
        got = torch.load(tmp_path / f"text{r}.pt", weights_only=False)
        for name, ref in one.items():
            assert got[name]["loss"] == pytest.approx(ref["loss"], rel=1e-5), name
            scale = max(float(g.abs().max()) for g in ref["grads"])
            assert len(got[name]["grads"]) == len(ref["grads"]) and scale > 0
            for mine, g in zip(got[name]["grads"], ref["grads"]):
                assert torch.allclose(mine, g, rtol=1e-4, atol=1e-5 * scale), name
