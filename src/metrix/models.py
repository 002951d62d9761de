"""Embedding models: backbone → linear head → optional L2 normalisation.

Backbones come from a small registry (``mlp``, ``convnet``) or are any ``nn.Module`` you pass in.
Siamese/triplet networks need nothing special: one model embeds every input (shared weights).

Example
-------
>>> import torch
>>> model = EmbeddingModel("mlp", embedding_dim=32, input_shape=(64,))
>>> model(torch.randn(5, 64)).shape
torch.Size([5, 32])
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metrix._validation import progress_bar
from metrix.distances import check_curvature, clip_norm, expmap0
from metrix.io import (CorruptFileError, build_to_fit, file_digest, load_json, load_tagged, remove_orphan_temps,
                       save_json, save_tagged)

BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str):
    """Decorator: register ``factory(input_shape, **kwargs) -> nn.Module`` (with ``output_dim``)."""

    def wrap(factory):
        BACKBONES[name] = factory
        return factory

    return wrap


def _numel(shape) -> int:
    return int(math.prod(shape))


@register_backbone("mlp")
def mlp(input_shape, hidden_dims=(256, 256), dropout: float = 0.0) -> nn.Module:
    """Flatten → (Linear → BatchNorm → ReLU → Dropout) per hidden layer."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = _numel(input_shape)
    for h in hidden_dims:
        layers += [nn.Linear(width, int(h)), nn.BatchNorm1d(int(h)), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = int(h)
    net = nn.Sequential(*layers)
    net.output_dim = width
    return net


class _ToImage(nn.Module):
    """Reshape a batch to (B, C, H, W) (flat vectors and (H, W) images become one grey channel)."""

    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x):
        return x.reshape(x.shape[0], *self.shape)


def _image_shape(input_shape) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        return shape
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) == 1:
        side = math.isqrt(shape[0])
        if side * side == shape[0]:
            return (1, side, side)
    raise ValueError(f"convnet needs an image: input_shape (C, H, W), (H, W) or a square number of pixels, got {input_shape}")


@register_backbone("convnet")
def convnet(input_shape, channels: int = 64, blocks: int = 4) -> nn.Module:
    """Snell et al.'s 4-block conv net (3×3 conv → BatchNorm → ReLU → 2×2 max-pool).

    Works for small grey or colour images, 8×8 to 28×28 and up: a block pools only while the
    feature map is at least 2 pixels wide. ``input_shape`` is (C, H, W), (H, W), or a flat square
    number of grey pixels (64 → 8×8, 784 → 28×28).
    """
    c, h, w = _image_shape(input_shape)
    layers: list[nn.Module] = [_ToImage((c, h, w))]
    for _ in range(int(blocks)):
        layers += [nn.Conv2d(c, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()]
        if min(h, w) >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = channels
    layers.append(nn.Flatten())
    net = nn.Sequential(*layers)
    net.output_dim = c * h * w
    return net


class GlobalAveragePool(nn.Module):
    """(B, C, H, W) → (B, C): the mean over positions. With a linear head after it, an embedding is a sum of
    per-position terms, which makes a similarity decompose exactly over pairs of positions (metrix.explain)."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


@register_backbone("convnet_gap")
def convnet_gap(input_shape, channels: int = 64, blocks: int = 3, pools: int = 2) -> nn.Module:
    """Conv blocks (3×3 conv → BatchNorm → ReLU; a 2×2 max-pool after the first ``pools`` of them) and global
    average pooling: the last feature map keeps its positions (7×7 for 28×28 images), so
    ``metrix explain`` can say exactly which parts of two images make them alike.

    ``net[0]`` is the part before the pooling (it gives the feature map), ``net[1]`` the pooling.
    """
    c, h, w = _image_shape(input_shape)
    layers: list[nn.Module] = [_ToImage((c, h, w))]
    for i in range(int(blocks)):
        layers += [nn.Conv2d(c, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()]
        if i < int(pools) and min(h, w) >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = channels
    net = nn.Sequential(nn.Sequential(*layers), GlobalAveragePool())
    net.output_dim = c
    return net


def _lite(variant: str):
    def factory(input_shape, pretrained: bool = True, image_size: int | None = None) -> nn.Module:
        from metrix.vision import EfficientNetLiteFeatures

        return EfficientNetLiteFeatures(variant, input_shape, pretrained, image_size)

    factory.__doc__ = (f"EfficientNet-{variant.title()} with ImageNet weights from the packaged file (extra vision): "
                       "images in [0, 1], grey or RGB, any size (resized to image_size, default the native one).")
    return factory


for _variant in ("lite0", "lite1", "lite2"):
    register_backbone(f"efficientnet_{_variant}")(_lite(_variant))


@register_backbone("hf_vision")
def hf_vision(input_shape, path: str = "", pretrained: bool = True) -> nn.Module:
    """A Hugging Face vision encoder (ViT, DINOv2, CLIP vision) from a local folder: --backbone hf:/path."""
    from metrix.vision import HFVisionFeatures

    return HFVisionFeatures(path, input_shape, pretrained)


PRETRAINED_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "hf_vision")
"""Backbones that bring their own input normalisation (inputs: images in [0, 1]) and pretrained weights."""


class Standardize(nn.Module):
    """``(x − mean) / std`` with statistics stored as buffers (saved with the model)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        std = torch.as_tensor(std, dtype=torch.float32)
        # constant features (std 0) are centred but not scaled, instead of dividing by 0
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).clone())
        self.register_buffer("std", torch.where(std > 1e-8, std, torch.ones_like(std)).clone())

    def forward(self, x):
        return (x - self.mean) / self.std


OUTPUTS = ("head", "features")  # what an EmbeddingModel hands on


def input_statistics(x) -> dict[str, torch.Tensor]:
    """``input_mean`` and ``input_std`` for :class:`EmbeddingModel` from training inputs ``x`` (n, ...): one mean and
    standard deviation per channel for images ((n, C, H, W) or (n, H, W)), per feature for rows of features.

    Images get per-channel statistics because per-pixel ones break transfer: a pixel the training classes never
    reach (a border around centred garments) has a standard deviation near 0 there, and dividing by it throws any
    new class that draws on that pixel far away (measured on Fashion-MNIST: benchmarks/RESULTS.md, session 11).
    """
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(torch.float64)
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"input statistics need a batch of samples (n, ...), got shape {tuple(x.shape)}")
    if x.ndim in (4, 3):  # (n, C, H, W) / (n, H, W): pool over the samples and the positions
        axes = (0, 2, 3) if x.ndim == 4 else (0, 1, 2)
        mean, std = x.mean(dim=axes, keepdim=True)[0], x.std(dim=axes, keepdim=True, correction=0)[0]
        mean, std = mean.expand(x.shape[1:]), std.expand(x.shape[1:])
    else:
        mean, std = x.mean(0), x.std(0, correction=0)
    return {"input_mean": mean.to(torch.float32).contiguous(), "input_std": std.to(torch.float32).contiguous()}


class EmbeddingModel(nn.Module):
    """Backbone + linear head (+ L2 normalisation): maps inputs to ``embedding_dim`` vectors.

    Parameters
    ----------
    backbone : registry name (``"mlp"``, ``"convnet"``) or any ``nn.Module`` mapping a batch to (B, F)
    embedding_dim : output size
    normalize : L2-normalise outputs (cosine geometry; most losses expect it)
    input_shape : shape of one input (without batch); needed for registry backbones, and for a
        module without an ``output_dim`` attribute (its output size is then probed)
    backbone_kwargs : options of a registry backbone (e.g. ``hidden_dims=(512,)``)
    input_mean, input_std : optional statistics of the shape of one input; inputs are standardised inside the
        model, so a saved model works on raw data (:func:`input_statistics` computes them: per channel for
        images, per feature for rows)
    head_hidden_dim : if given, the head is an MLP (Linear → BatchNorm → ReLU → Linear), the projection
        head of SimCLR/MoCo v2; downstream tasks then use :meth:`features` (the backbone's output)
    ball_curvature : if given (c > 0), outputs are mapped into the Poincaré ball of curvature −c by
        :func:`~metrix.distances.expmap0` (hyperbolic geometry); excludes ``normalize``. The losses, kNN and
        index compare with ``metric="poincare"``, which is curvature −1: use ``ball_curvature=1`` with them
        (``distances.poincare(x, y, c)`` takes any c)
    output : what the model hands on (``forward``, :meth:`embed`, a run, an export): ``"head"`` (default), the
        embedding the loss trains, or ``"features"``, the backbone's output (L2-normalised with ``normalize``).
        With ``"features"`` the head is a projection used in training only, as in SupCon and SimCLR: the loss
        trains on :meth:`project`; the features before it keep what tells apart classes the training set never
        had, which a head trained on a few classes squeezes out
    ball_clip : with ``ball_curvature``, head outputs longer than this are scaled down to it before the map
        (feature clipping, Guo et al., "Clipped Hyperbolic Classifiers Are Super-Hyperbolic Classifiers",
        CVPR 2022): unclipped, a freshly initialised head sends points next to the boundary, where ``tanh``
        saturates and training crawls (on digits, contrastive MAP@R after 10 epochs 0.36 unclipped, 0.89
        at 1.0). ``None`` turns it off
    """

    def __init__(
        self,
        backbone: str | nn.Module,
        embedding_dim: int,
        normalize: bool = True,
        input_shape: tuple[int, ...] | None = None,
        backbone_kwargs: dict | None = None,
        input_mean: torch.Tensor | None = None,
        input_std: torch.Tensor | None = None,
        head_hidden_dim: int | None = None,
        ball_curvature: float | None = None,
        ball_clip: float | None = 1.0,
        output: str = "head",
    ):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        if output == "features" and ball_curvature is not None:
            raise ValueError("output='features' hands on the backbone's features; the Poincaré ball needs the head")
        self.output = output
        if int(embedding_dim) < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        if ball_curvature is not None and normalize:
            raise ValueError("normalize (the unit sphere) and ball_curvature (the Poincaré ball) exclude each other")
        self.ball_curvature = None if ball_curvature is None else check_curvature(ball_curvature)
        if ball_clip is not None and not float(ball_clip) > 0:
            raise ValueError(f"ball_clip must be > 0 or None, got {ball_clip}")
        self.ball_clip = None if ball_clip is None else float(ball_clip)
        self.embedding_dim, self.normalize = int(embedding_dim), bool(normalize)
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        self.backbone_kwargs = dict(backbone_kwargs or {})
        if isinstance(backbone, str):
            if backbone not in BACKBONES:
                raise ValueError(f"unknown backbone {backbone!r}; registered: {sorted(BACKBONES)}")
            if self.input_shape is None:
                raise ValueError(f"backbone {backbone!r} needs input_shape")
            self.backbone_name = backbone
            self.backbone = BACKBONES[backbone](self.input_shape, **self.backbone_kwargs)
        elif isinstance(backbone, nn.Module):
            self.backbone_name = None
            self.backbone = backbone
        else:
            raise TypeError(f"backbone must be a registry name or an nn.Module, got {type(backbone).__name__}")
        features = self.features_dim = self._backbone_dim()
        self.preprocess = None
        if input_mean is not None or input_std is not None:
            if input_mean is None or input_std is None:
                raise ValueError("give both input_mean and input_std")
            self.preprocess = Standardize(input_mean, input_std)
        self.head_hidden_dim = None if head_hidden_dim is None else int(head_hidden_dim)
        if self.head_hidden_dim is None:
            self.head = nn.Linear(features, self.embedding_dim)
        else:
            if self.head_hidden_dim < 1:
                raise ValueError(f"head_hidden_dim must be >= 1, got {head_hidden_dim}")
            h = self.head_hidden_dim
            self.head = nn.Sequential(nn.Linear(features, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, self.embedding_dim))

    def _backbone_dim(self) -> int:
        dim = getattr(self.backbone, "output_dim", None)
        if dim is not None:
            return int(dim)
        if self.input_shape is None:
            raise ValueError("cannot infer the backbone's output size: give it an output_dim attribute or pass input_shape")
        was_training = self.backbone.training
        self.backbone.eval()
        with torch.no_grad():
            out = self.backbone(torch.zeros(2, *self.input_shape))
        self.backbone.train(was_training)
        if out.ndim != 2:
            raise ValueError(f"the backbone must return (batch, features), got shape {tuple(out.shape)}")
        return int(out.shape[1])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's output (before the head): the representation self-supervised models hand on."""
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected inputs of shape (batch, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        if self.preprocess is not None:
            x = self.preprocess(x)
        return self.backbone(x)

    @property
    def output_dim(self) -> int:
        """The size of what the model hands on: ``embedding_dim``, or the backbone's with ``output="features"``."""
        return self.embedding_dim if self.output == "head" else self.features_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output (see ``output``): what runs, indexes and exports use."""
        if self.output == "features":
            f = self.features(x)
            return F.normalize(f, dim=1) if self.normalize else f
        return self.project(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The head's embedding: what the loss trains on (the same as ``forward`` with ``output="head"``)."""
        e = self.head(self.features(x))
        if self.ball_curvature is not None:
            if self.ball_clip is not None:
                e = clip_norm(e, self.ball_clip)
            return expmap0(e, self.ball_curvature)
        return F.normalize(e, dim=1) if self.normalize else e

    @torch.no_grad()
    def embed(self, x, batch_size: int = 1024, features: bool = False, progress: str | None = None) -> torch.Tensor:
        """Embed a large array in eval mode, batch by batch; returns a float32 CPU tensor.

        ``features=True`` returns the backbone's output (:meth:`features`) instead of the embedding.
        ``progress``: a label for a progress bar over the samples (shown on a terminal).
        """
        x = torch.as_tensor(x, dtype=torch.float32)
        fn = self.features if features else self
        was_training = self.training
        if was_training:  # a model already in eval mode is never switched, so threads may share it
            self.eval()
        try:
            device = next(self.parameters()).device
            bar = progress_bar(len(x), progress, "sample")
            parts = []
            with torch.no_grad():  # plain tensors out (inference-mode ones refuse later in-place use)
                for i in range(0, len(x), batch_size):
                    parts.append(fn(x[i : i + batch_size].to(device)).cpu())
                    bar.update(parts[-1].shape[0])
            bar.close()
            return torch.cat(parts)
        finally:
            if was_training:
                self.train(True)

    def config(self) -> dict:
        """JSON-able description that :func:`build_model` turns back into the same architecture."""
        if self.backbone_name is None:
            raise ValueError("a model with a custom backbone module cannot be described by config; save its state_dict")
        return {
            "backbone": self.backbone_name,
            "embedding_dim": self.embedding_dim,
            "normalize": self.normalize,
            "input_shape": list(self.input_shape),
            "backbone_kwargs": self.backbone_kwargs,
            "standardize": self.preprocess is not None,
            "head_hidden_dim": self.head_hidden_dim,
            "ball_curvature": self.ball_curvature,
            "ball_clip": self.ball_clip,
            "output": self.output,
        }


MAX_INPUT_ELEMENTS = 2**28  # per sample: far above any image a backbone here takes, far below a forged header


def _checked_shape(shape) -> tuple[int, ...]:
    if (not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= 4
            or not all(type(s) is int and s > 0 for s in shape) or math.prod(shape) > MAX_INPUT_ELEMENTS):
        raise ValueError(f"input_shape must be 1 to 4 positive integers with at most {MAX_INPUT_ELEMENTS} "
                         f"elements in all, got {shape!r}")
    return tuple(shape)


def build_model(config: dict) -> EmbeddingModel:
    """Rebuild an :class:`EmbeddingModel` from :meth:`EmbeddingModel.config` (weights not loaded)."""
    shape = _checked_shape(config["input_shape"])
    placeholder = {}
    if config.get("standardize"):
        placeholder = {"input_mean": torch.zeros(shape), "input_std": torch.ones(shape)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.get("backbone_kwargs", {}).items()}
    if config["backbone"] in PRETRAINED_BACKBONES:
        kwargs["pretrained"] = False  # the run's own weights replace them: no package weights to read
    return EmbeddingModel(
        config["backbone"], config["embedding_dim"], config.get("normalize", True), shape, kwargs, **placeholder,
        head_hidden_dim=config.get("head_hidden_dim"), ball_curvature=config.get("ball_curvature"),
        ball_clip=config.get("ball_clip", 1.0), output=config.get("output", "head"),
    )


MODEL_TAG = "metrix_run_config"


def save_model(model: EmbeddingModel, folder, extra_config: dict | None = None) -> Path:
    """Write ``config.json`` (``{"model": ..., **extra_config}``), then ``model.safetensors``, both atomically.

    The weights file carries the same config in its checksummed header and is written last, so it is
    the commit point: a crash between the two writes leaves a ``config.json`` that does not match, which
    :func:`load_model` refuses instead of pairing new settings with old weights.
    """
    folder = Path(folder)
    config = {"model": model.config(), **(extra_config or {})}
    remove_orphan_temps(folder)
    save_json(folder / "config.json", config)
    save_tagged(folder / "model.safetensors", model.state_dict(), MODEL_TAG, config)
    return folder


def load_model(folder) -> tuple[EmbeddingModel, dict]:
    """Load a model written by :func:`save_model`; returns ``(model, config)``. Fails loudly if damaged."""
    folder = Path(folder)
    path = folder / "model.safetensors"
    model, config = load_model_file(path)
    readable = folder / "config.json"
    if not readable.is_file() or load_json(readable) != config:
        raise CorruptFileError(f"{readable} is missing or does not match {path}: the run was interrupted while "
                               "saving or one of its files was edited; train it again or restore both files")
    return model, config


def load_model_file(path) -> tuple[EmbeddingModel, dict]:
    """Load one weights file whose header holds ``{"model": config, ...}`` (a run's model, a best
    checkpoint); returns ``(model in eval mode, header)``."""
    tensors, config = load_tagged(path, MODEL_TAG, "model")
    if not isinstance(config.get("model"), dict):
        raise CorruptFileError(f"{path} has no 'model' section")
    model = build_to_fit(lambda: build_model(config["model"]), tensors, path, "model")
    return model.eval(), config


def run_fingerprint(folder) -> str:
    """SHA-256 of a run's weights file (weights and config): what an index or gallery built from the run
    records, so that searching it with the embeddings of another run is refused."""
    return file_digest(Path(folder) / "model.safetensors")
