import json

import pytest
import torch
from torch import nn

from metrix.io import CorruptFileError
from metrix.models import BACKBONES, EmbeddingModel, build_model, load_model, register_backbone, save_model


@pytest.mark.parametrize("shape", [(64,), (8, 8), (1, 8, 8), (1, 28, 28), (784,), (3, 12, 12)])
def test_convnet_shapes(shape):
    m = EmbeddingModel("convnet", 16, input_shape=shape)
    out = m(torch.randn(3, *shape))
    assert out.shape == (3, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_mlp_and_unnormalized():
    m = EmbeddingModel("mlp", 8, normalize=False, input_shape=(10,), backbone_kwargs={"hidden_dims": (32,)})
    out = m(torch.randn(4, 10))
    assert out.shape == (4, 8) and not torch.allclose(out.norm(dim=1), torch.ones(4))


def test_custom_module_backbone_probe_and_attribute():
    m = EmbeddingModel(nn.Sequential(nn.Linear(5, 7), nn.Tanh()), 3, input_shape=(5,))
    assert m(torch.randn(2, 5)).shape == (2, 3)
    bb = nn.Linear(5, 11)
    bb.output_dim = 11
    assert EmbeddingModel(bb, 4)(torch.randn(2, 5)).shape == (2, 4)
    with pytest.raises(ValueError, match="cannot infer"):
        EmbeddingModel(nn.Linear(5, 11), 4)


def test_registry_accepts_user_backbones():
    @register_backbone("tiny_test")
    def tiny(input_shape, width=6):
        net = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), width))
        net.output_dim = width
        return net

    try:
        m = EmbeddingModel("tiny_test", 2, input_shape=(3,), backbone_kwargs={"width": 5})
        assert m(torch.randn(2, 3)).shape == (2, 2)
        assert build_model(m.config()).backbone[1].out_features == 5
    finally:
        BACKBONES.pop("tiny_test")


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="unknown backbone"):
        EmbeddingModel("resnet999", 8, input_shape=(4,))
    with pytest.raises(ValueError, match="needs input_shape"):
        EmbeddingModel("mlp", 8)
    m = EmbeddingModel("mlp", 8, input_shape=(4,))
    with pytest.raises(ValueError, match=r"expected inputs of shape \(batch, 4\), got \(2, 5\)"):
        m(torch.randn(2, 5))
    with pytest.raises(ValueError, match="square"):
        EmbeddingModel("convnet", 8, input_shape=(10,))


def test_save_load_roundtrip_and_corruption(tmp_path):
    torch.manual_seed(0)
    m = EmbeddingModel("mlp", 8, input_shape=(6,), input_mean=torch.randn(6), input_std=torch.rand(6) + 0.5)
    m.eval()
    x = torch.randn(5, 6)
    save_model(m, tmp_path / "run", {"note": "hi"})
    loaded, config = load_model(tmp_path / "run")
    assert config["note"] == "hi"
    torch.testing.assert_close(loaded(x), m(x))
    # flip one byte in the weights: loading must fail loudly
    path = tmp_path / "run" / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="checksum"):
        load_model(tmp_path / "run")
    # a hand-edited config fails too
    save_model(m, tmp_path / "run2")
    cfg = tmp_path / "run2" / "config.json"
    data = json.loads(cfg.read_text())
    data["model"]["embedding_dim"] = 9
    cfg.write_text(json.dumps(data))
    with pytest.raises(CorruptFileError, match="checksum"):
        load_model(tmp_path / "run2")
    # a truncated file
    (tmp_path / "run2" / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises((CorruptFileError, ValueError)):
        load_model(tmp_path / "run2")


def test_embed_batches_in_eval_mode():
    m = EmbeddingModel("mlp", 4, input_shape=(3,))
    m.train()
    x = torch.randn(10, 3)
    e = m.embed(x, batch_size=3)
    assert m.training  # mode restored
    m.eval()
    torch.testing.assert_close(e, m(x))


def test_projection_head_and_features(tmp_path):
    torch.manual_seed(0)
    model = EmbeddingModel("mlp", 8, input_shape=(6,), backbone_kwargs={"hidden_dims": (12,)}, head_hidden_dim=16,
                           input_mean=torch.full((6,), 2.0), input_std=torch.full((6,), 4.0))
    model.eval()
    x = torch.randn(5, 6)
    feats = model.features(x)
    assert torch.allclose(feats, model.backbone((x - 2.0) / 4.0))   # standardise, then the backbone; no head
    head = model.head  # Linear -> BatchNorm -> ReLU -> Linear
    assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU", "Linear"] and head[0].out_features == 16
    assert torch.allclose(model(x), torch.nn.functional.normalize(head(feats), dim=1))
    assert torch.allclose(model.embed(x.numpy(), batch_size=2, features=True), feats, atol=1e-6)
    save_model(model, tmp_path / "m")
    again, config = load_model(tmp_path / "m")
    assert config["model"]["head_hidden_dim"] == 16
    assert torch.allclose(again(x), model(x), atol=1e-6)
    with pytest.raises(ValueError, match="head_hidden_dim"):
        EmbeddingModel("mlp", 8, input_shape=(6,), head_hidden_dim=0)


def test_embed_never_switches_a_model_in_eval_mode():
    """A model in eval mode is shared safely: embed does not toggle it (a training model is restored)."""
    import threading

    from metrix.models import EmbeddingModel

    model = EmbeddingModel("mlp", 8, input_shape=(6,)).eval()
    seen = []
    model.register_forward_pre_hook(lambda m, inp: seen.append(m.training))
    x = torch.randn(50, 6)
    threads = [threading.Thread(target=model.embed, args=(x, 7)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen and not any(seen) and not model.training
    model.train()
    model.embed(x)
    assert model.training


def test_a_missing_vision_package_says_how_to_install_it(monkeypatch):
    import importlib

    from metrix import vision

    real = importlib.import_module

    def missing(name, *args, **kwargs):
        if name.startswith("efficientnet"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(vision.importlib, "import_module", missing)
    with pytest.raises(ImportError, match=r"pip install 'metrix\[vision\]'"):
        EmbeddingModel("efficientnet_lite0", 8, input_shape=(1, 16, 16))


def test_a_features_model_hands_on_its_features_and_trains_through_its_head(tmp_path):
    """output="features": forward, embed, a saved model and its size are the L2-normalised backbone features;
    project() is the head's embedding, the one the loss trains."""
    torch.manual_seed(0)
    model = EmbeddingModel("mlp", 8, input_shape=(6,), backbone_kwargs={"hidden_dims": (12,)}, head_hidden_dim=16,
                           output="features").eval()
    x = torch.randn(5, 6)
    feats = model.features(x)
    assert torch.allclose(model(x), torch.nn.functional.normalize(feats, dim=1))
    assert torch.allclose(model.project(x), torch.nn.functional.normalize(model.head(feats), dim=1))
    assert model.output_dim == 12 and model.project(x).shape == (5, 8)
    assert torch.allclose(model.embed(x.numpy(), batch_size=2), model(x), atol=1e-6)
    save_model(model, tmp_path / "m")
    again, config = load_model(tmp_path / "m")
    assert config["model"]["output"] == "features" and again.output_dim == 12
    assert torch.allclose(again(x), model(x), atol=1e-6)
    plain = EmbeddingModel("mlp", 8, input_shape=(6,))
    assert plain.output_dim == 8 and torch.equal(plain.eval()(x), plain.project(x))
    with pytest.raises(ValueError, match="output must be one of head, features"):
        EmbeddingModel("mlp", 8, input_shape=(6,), output="neck")
    with pytest.raises(ValueError, match="Poincaré ball needs the head"):
        EmbeddingModel("mlp", 8, input_shape=(6,), normalize=False, ball_curvature=1.0, output="features")


def test_input_statistics_are_per_channel_for_images_and_per_feature_for_rows():
    """Per-pixel statistics would divide a pixel the training images never use by ~0 (see input_statistics)."""
    from metrix.models import input_statistics

    g = torch.Generator().manual_seed(0)
    images = torch.zeros(50, 2, 6, 5)
    images[:, 0, 1:-1, 1:-1] = torch.rand(50, 4, 3, generator=g)  # channel 0: a blank border
    images[:, 1] = 3 + 2 * torch.rand(50, 6, 5, generator=g)
    stats = input_statistics(images.numpy())
    assert stats["input_mean"].shape == stats["input_std"].shape == (2, 6, 5)
    for c in range(2):  # one value per channel, the channel's mean and deviation over samples and positions
        chan = images[:, c].double()
        torch.testing.assert_close(stats["input_mean"][c], torch.full((6, 5), chan.mean().item()), rtol=1e-6, atol=0)
        torch.testing.assert_close(stats["input_std"][c], torch.full((6, 5), chan.std(correction=0).item()),
                                   rtol=1e-6, atol=0)
    model = EmbeddingModel("convnet", 4, input_shape=(2, 6, 5), **stats)
    new_class = images[:1].clone()
    new_class[:, 0, 0, 0] = 1.0  # ink on the border: as far from the mean as ink anywhere else
    assert model.preprocess(new_class)[0, 0, 0, 0] <= (1 - stats["input_mean"][0, 0, 0]) / stats["input_std"][0, 0, 0]
    grey = input_statistics(images[:, 0].numpy())  # (n, H, W): one grey channel
    assert grey["input_mean"].shape == (6, 5) and torch.allclose(grey["input_mean"], stats["input_mean"][0])
    rows = torch.randn(40, 3, generator=g).double() * torch.tensor([1.0, 10.0, 0.1]).double()
    stats = input_statistics(rows)
    torch.testing.assert_close(stats["input_mean"], rows.mean(0).float())
    torch.testing.assert_close(stats["input_std"], rows.std(0, correction=0).float())
    with pytest.raises(ValueError, match="batch of samples"):
        input_statistics(torch.zeros(5))
