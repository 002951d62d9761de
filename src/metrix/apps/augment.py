"""Batched, seeded image augmentations for contrastive learning on small images (torch only).

Every transform acts on a whole batch at once — one ``affine_grid``/``grid_sample`` call for crop + flip +
rotation, one grouped convolution for a per-sample Gaussian blur — so making two views of a 512-image batch
costs a few milliseconds, not a Python loop over images. All randomness comes from a ``torch.Generator``,
so a seed reproduces the views exactly.

Example
-------
>>> import torch
>>> aug = ImageAugment(seed=0)
>>> views = aug(torch.rand(8, 1, 28, 28))
>>> views.shape, bool(views.min() >= 0), bool(views.max() <= 1)
(torch.Size([8, 1, 28, 28]), True, True)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def _check_range(value, name: str, low: float, high: float) -> tuple[float, float]:
    a, b = (float(v) for v in value)
    if not (low <= a <= b <= high):
        raise ValueError(f"{name} must be a pair low <= high within [{low}, {high}], got {value}")
    return a, b


def crop_flip_rotate_matrices(n: int, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), flip: float = 0.5,
                              degrees: float = 10.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 2, 3) affine matrices for ``F.affine_grid``: random resized crop, horizontal flip, rotation.

    A crop keeps a fraction ``scale`` of the image area with aspect ratio in ``ratio`` (log-uniform),
    placed uniformly where it fits, as in torchvision's ``RandomResizedCrop``; output coordinates are
    mapped into it (the matrix sends output pixels to input pixels, in [-1, 1] units).
    """
    gen = generator if generator is not None else torch.default_generator
    area = _uniform(n, *scale, gen)
    log_ratio = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), gen)
    w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    cx = (2 * torch.rand(n, generator=gen) - 1) * (1 - w)
    cy = (2 * torch.rand(n, generator=gen) - 1) * (1 - h)
    sign = torch.where(torch.rand(n, generator=gen) < flip, -1.0, 1.0)
    angle = torch.deg2rad(_uniform(n, -degrees, degrees, gen))
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.empty(n, 2, 3)
    # diag(w, h) · R(angle) · diag(sign, 1): rotate, flip, then shrink into the crop window
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = w * cos * sign, -w * sin, cx
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = h * sin * sign, h * cos, cy
    return theta


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int = 5) -> torch.Tensor:
    """Blur each image with its own σ (a σ near 0 leaves it unchanged): separable grouped convolutions."""
    b, c, hgt, wid = images.shape
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, dtype=images.dtype, device=images.device)
    s = sigma.to(images).clamp_min(1e-3).repeat_interleave(c)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None, :] / s) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (b·c, k)
    x = images.reshape(1, b * c, hgt, wid)
    x = F.conv2d(F.pad(x, (half, half, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, half, half), mode="replicate"), kernel[:, None, :, None], groups=b * c)
    return x.reshape(b, c, hgt, wid)


class ImageAugment:
    """Random views of a batch of images in [0, 1], shape (B, C, H, W) (or (B, H, W) for grey).

    Parameters
    ----------
    scale, ratio : random resized crop (area fraction, aspect ratio)
    flip : probability of a horizontal flip (0 where mirror images mean something else, e.g. digits)
    degrees : maximum rotation, either way
    brightness, contrast : multiplicative jitter strengths (factor drawn in [1 − s, 1 + s])
    blur : probability of a Gaussian blur with σ drawn in ``blur_sigma`` (pixels)
    noise : standard deviation of additive Gaussian pixel noise
    seed : seed of this augmenter's own generator (views are reproducible)
    """

    def __init__(self, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), flip: float = 0.5, degrees: float = 10.0,
                 brightness: float = 0.4, contrast: float = 0.4, blur: float = 0.3, blur_sigma=(0.1, 1.2),
                 noise: float = 0.03, seed: int | None = 0):
        self.scale = _check_range(scale, "scale", 1e-3, 1.0)
        self.ratio = _check_range(ratio, "ratio", 1e-2, 1e2)
        self.blur_sigma = _check_range(blur_sigma, "blur_sigma", 0.0, 1e2)
        for name, value, high in (("flip", flip, 1), ("blur", blur, 1), ("brightness", brightness, 1),
                                  ("contrast", contrast, 1), ("degrees", degrees, 180), ("noise", noise, 1)):
            if not 0.0 <= float(value) <= high:
                raise ValueError(f"{name} must be in [0, {high}], got {value}")
        self.flip, self.degrees, self.brightness, self.contrast = float(flip), float(degrees), float(brightness), float(contrast)
        self.blur, self.noise = float(blur), float(noise)
        self.generator = torch.Generator()
        self.generator.manual_seed(int(seed) if seed is not None else torch.seed())

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(images, dtype=torch.float32)
        squeeze = x.ndim == 3
        if squeeze:
            x = x[:, None]
        if x.ndim != 4 or x.shape[0] == 0:
            raise ValueError(f"images must have shape (B, C, H, W) or (B, H, W) with B >= 1, got {tuple(images.shape)}")
        gen, n = self.generator, x.shape[0]
        theta = crop_flip_rotate_matrices(n, self.scale, self.ratio, self.flip, self.degrees, gen).to(x.device)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.blur > 0:
            sigma = torch.where(torch.rand(n, generator=gen) < self.blur, _uniform(n, *self.blur_sigma, gen), torch.zeros(n))
            x = gaussian_blur(x, sigma)
        # contrast around each image's mean, then brightness (both multiplicative, as in torchvision)
        c = _uniform(n, 1 - self.contrast, 1 + self.contrast, gen).to(x)[:, None, None, None]
        b = _uniform(n, 1 - self.brightness, 1 + self.brightness, gen).to(x)[:, None, None, None]
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * c + mean) * b
        if self.noise > 0:
            x = x + self.noise * torch.randn(x.shape, generator=gen).to(x)
        x = x.clamp_(0.0, 1.0)
        return x[:, 0] if squeeze else x
