import pytest
import torch


from metrix.losses import MultiSimilarityLoss, ProxyAnchorLoss, TripletMarginLoss
from metrix.models import EmbeddingModel, load_model_file
from metrix.training import Trainer
from tests.conftest import clustered


def data(seed=0):
    x, y = clustered(n_classes=5, per_class=16, dim=12, spread=1.0, seed=seed, dtype=torch.float32)
    return x, y


def make(seed=0, loss=None, init_seed=None, **kw):
    torch.manual_seed(seed if init_seed is None else init_seed)
    model = EmbeddingModel("mlp", 8, input_shape=(12,), backbone_kwargs={"hidden_dims": (32,)})
    # a loss factory is called after seeding, so learnable proxies start identical across runs
    loss = loss() if callable(loss) and not isinstance(loss, torch.nn.Module) else (loss or MultiSimilarityLoss())
    opts = dict(epochs=4, classes_per_batch=4, samples_per_class=4, progress=False, seed=seed)
    opts.update(kw)
    return model, Trainer(model, loss, **opts)


def test_training_improves_validation_retrieval():
    x, y = data()
    model, trainer = make(epochs=8, lr=3e-3)
    before = trainer.evaluate(x, y)["map_at_r"]
    history = trainer.fit(x, y, val=(x, y))
    assert len(history) == 8
    assert {"loss", "lr", "samples_per_s", "map_at_r", "precision_at_1"} <= set(history[0])
    assert history[-1]["map_at_r"] > before + 0.1
    assert history[-1]["loss"] < history[0]["loss"]


def test_resume_reaches_identical_weights(tmp_path):
    x, y = data(1)
    model_a, trainer_a = make(seed=3, epochs=5, checkpoint_dir=tmp_path / "a", loss=lambda: ProxyAnchorLoss(5, 8), loss_lr=1e-2)
    trainer_a.fit(x, y, val=(x, y))

    class Interrupt(Exception):
        pass

    def stop_after_two(trainer, epoch, row):
        if epoch == 1:
            raise Interrupt

    model_b, trainer_b = make(seed=3, epochs=5, checkpoint_dir=tmp_path / "b", loss=lambda: ProxyAnchorLoss(5, 8),
                              loss_lr=1e-2, callbacks=[stop_after_two])
    with pytest.raises(Interrupt):
        trainer_b.fit(x, y, val=(x, y))
    # a brand-new process would build fresh objects: different init, then resume overwrites everything
    model_c, trainer_c = make(seed=3, init_seed=99, epochs=5, checkpoint_dir=tmp_path / "b", loss=lambda: ProxyAnchorLoss(5, 8), loss_lr=1e-2)
    trainer_c.fit(x, y, val=(x, y), resume=True)
    for (name, a), (_, c) in zip(model_a.state_dict().items(), model_c.state_dict().items()):
        assert torch.equal(a, c), name
    assert torch.equal(trainer_a.loss.weight, trainer_c.loss.weight)
    assert [r["loss"] for r in trainer_a.history] == [r["loss"] for r in trainer_c.history]


def test_early_stopping_and_best_checkpoint(tmp_path):
    x, y = data(2)
    # lr=0 for the model means validation never improves after epoch 1
    model, trainer = make(epochs=10, lr=0.0, patience=2, checkpoint_dir=tmp_path)
    history = trainer.fit(x, y, val=(x, y))
    assert len(history) == 3 and trainer.best_epoch == 1
    loaded, best = load_model_file(tmp_path / "best.safetensors")
    assert best["epoch"] == 1 and best["monitor"] == "map_at_r"
    torch.testing.assert_close(loaded.embed(x), model.embed(x))


def test_restore_best_weights():
    x, y = data(3)
    model, trainer = make(epochs=3, monitor="loss", mode="min", lr=1e-3)
    trainer.fit(x, y)
    assert trainer.best_epoch is not None


def test_trainer_bad_input():
    x, y = data()
    model, trainer = make()
    with pytest.raises(ValueError, match="at least 2 classes"):
        trainer.fit(x, torch.zeros(len(x), dtype=torch.int64))
    with pytest.raises(ValueError, match="x has 80 rows but y has 79"):
        trainer.fit(x, y[:-1])
    with pytest.raises(ValueError, match="optimizer must be one of"):
        Trainer(model, TripletMarginLoss(), optimizer="lbfgs2")
    with pytest.raises(ValueError, match="needs checkpoint_dir"):
        trainer.fit(x, y, resume=True)


def test_nan_loss_is_reported():
    x, y = data()
    model, trainer = make(lr=1e12, optimizer="sgd", loss=TripletMarginLoss(margin=1.0, metric="dot"))
    with pytest.raises((FloatingPointError, ValueError)):
        trainer.fit(x, y)


def test_cross_batch_memory_trains_and_resumes_exactly(tmp_path):
    from metrix.memory import CrossBatchMemory

    x, y = data(4)
    make_loss = lambda: CrossBatchMemory(MultiSimilarityLoss(), embedding_dim=8, memory_size=48)  # noqa: E731
    model_a, trainer_a = make(seed=2, epochs=4, checkpoint_dir=tmp_path / "a", loss=make_loss)
    history = trainer_a.fit(x, y, val=(x, y))
    assert history[-1]["map_at_r"] > history[0]["map_at_r"] and len(trainer_a.loss) == 48

    class Interrupt(Exception):
        pass

    def stop(trainer, epoch, row):
        if epoch == 1:
            raise Interrupt

    _, trainer_b = make(seed=2, epochs=4, checkpoint_dir=tmp_path / "b", loss=make_loss, callbacks=[stop])
    with pytest.raises(Interrupt):
        trainer_b.fit(x, y, val=(x, y))
    model_c, trainer_c = make(seed=2, init_seed=7, epochs=4, checkpoint_dir=tmp_path / "b", loss=make_loss)
    trainer_c.fit(x, y, val=(x, y), resume=True)
    for a, c in zip(model_a.state_dict().values(), model_c.state_dict().values()):
        assert torch.equal(a, c)
    assert torch.equal(trainer_a.loss.memory, trainer_c.loss.memory)


def test_a_features_model_trains_its_head_and_is_judged_on_its_features():
    """With output="features" the loss sees project() (the head), validation and embed() the features."""
    x, y = data()
    torch.manual_seed(0)
    model = EmbeddingModel("mlp", 8, input_shape=(12,), backbone_kwargs={"hidden_dims": (32,)}, output="features")
    head_before = model.head.weight.detach().clone()
    trainer = Trainer(model, MultiSimilarityLoss(), epochs=6, lr=3e-3, classes_per_batch=4, samples_per_class=4,
                      progress=False, restore_best=False)
    before = trainer.evaluate(x, y)["map_at_r"]
    history = trainer.fit(x, y, val=(x, y))
    assert not torch.equal(model.head.weight, head_before)  # the head is what the loss trained through
    assert model.embed(x).shape == (len(x), 32)
    assert history[-1]["map_at_r"] == trainer.evaluate(x, y)["map_at_r"] > before + 0.05

    frozen = EmbeddingModel("mlp", 8, input_shape=(12,), output="features")
    with pytest.raises(ValueError, match="training would not change what the model hands on"):
        Trainer(frozen, MultiSimilarityLoss(), freeze_backbone=True)
    Trainer(frozen, MultiSimilarityLoss(), freeze_backbone=True, unfreeze_after=1)  # the backbone trains later
