"""Offline sample-quality metrics: Frechet distance and KID over a pluggable feature extractor.

A feature extractor is any callable ``images (N, C, H, W) in [-1, 1] -> features (N, D)``. Two are provided:

- :func:`digits_feature_extractor`: the penultimate layer of a small CNN trained on scikit-learn's 8x8 digits,
  shipped as ``digits_classifier.safetensors`` (trained by ``training/train_digits_classifier.py``). The
  Frechet distance in its features is the "Frechet digit distance" (FDD).
- :func:`inception_feature_extractor`: InceptionV3 pool features through the optional ``torch-fidelity``
  (``pip install ddpm-from-scratch[metrics]``), only when its weights are already on disk: nothing is downloaded.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_F64 = torch.float64
DIGITS_CLASSIFIER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_classifier.safetensors")
INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"


# ----------------------------------------------------------------------------------------------
# Frechet distance and KID on features
# ----------------------------------------------------------------------------------------------
def _as_features(features, name: str) -> torch.Tensor:
    f = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array of features with N >= 2, got shape {tuple(f.shape)}")
    return f.detach().to(_F64).cpu()


def feature_statistics(features) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), unbiased covariance (D, D)), float64."""
    f = _as_features(features, "features")
    mu = f.mean(0)
    centered = f - mu
    return mu, centered.T @ centered / (f.shape[0] - 1)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix (negative eigenvalues from round-off set to 0)."""
    vals, vecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """d^2 = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) between N(mu1, S1) and N(mu2, S2) (Frechet 1957; FID).

    tr (S1 S2)^{1/2} is computed as tr (S1^{1/2} S2 S1^{1/2})^{1/2}, a symmetric PSD matrix (same eigenvalues)."""
    mu1, mu2 = (torch.as_tensor(np.asarray(m), dtype=_F64).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(np.asarray(s), dtype=_F64) for s in (sigma1, sigma2))
    if s1.shape != (mu1.numel(), mu1.numel()) or s2.shape != s1.shape or mu2.shape != mu1.shape:
        raise ValueError(f"mu1, mu2 must be (D,) and sigma1, sigma2 (D, D); got {tuple(mu1.shape)}, {tuple(mu2.shape)}, "
                         f"{tuple(s1.shape)}, {tuple(s2.shape)}")
    root1 = _psd_sqrt(s1)
    cross = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2.0 * cross)


def frechet_distance_features(features1, features2) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets (N1, D), (N2, D)."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def polynomial_mmd_unbiased(features1, features2, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / D + coef0)^degree (Binkowski et al. 2018, the KID kernel):
    mean_{i!=j} k(x_i, x_j) + mean_{i!=j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j)."""
    x, y = _as_features(features1, "features1"), _as_features(features2, "features2")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"features1 and features2 must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    d = x.shape[1]
    kxx = (x @ x.T / d + coef0) ** degree
    kyy = (y @ y.T / d + coef0) ** degree
    kxy = (x @ y.T / d + coef0) ** degree
    m, n = x.shape[0], y.shape[0]
    return float((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
                 - 2.0 * kxy.mean())


def kernel_inception_distance(features1, features2, num_subsets: int = 100, subset_size: int = 1000,
                              generator: torch.Generator | None = None) -> tuple[float, float]:
    """KID: (mean, std) of the unbiased polynomial MMD^2 over ``num_subsets`` random subsets of
    min(subset_size, N1, N2) rows of each set (Binkowski et al. 2018)."""
    x, y = _as_features(features1, "features1"), _as_features(features2, "features2")
    if isinstance(num_subsets, bool) or not isinstance(num_subsets, int) or num_subsets < 1:
        raise ValueError(f"num_subsets must be a positive integer, got {num_subsets!r}")
    size = min(int(subset_size), x.shape[0], y.shape[0])
    if size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size!r}")
    values = []
    for _ in range(num_subsets):
        i = torch.randperm(x.shape[0], generator=generator)[:size]
        j = torch.randperm(y.shape[0], generator=generator)[:size]
        values.append(polynomial_mmd_unbiased(x[i], y[j]))
    v = torch.tensor(values, dtype=_F64)
    return float(v.mean()), (float(v.std()) if len(values) > 1 else 0.0)


# ----------------------------------------------------------------------------------------------
# Features of images
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def compute_features(extractor: Callable, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """extractor over images (N, C, H, W) in batches -> float64 (N, D) on the CPU."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise TypeError("images must be a torch.Tensor (N, C, H, W) with values in [-1, 1]")
    feats = [torch.as_tensor(extractor(images[i:i + batch_size])).detach().to(_F64).cpu()
             for i in range(0, images.shape[0], batch_size)]
    return torch.cat(feats)


def frechet_distance_images(real: torch.Tensor, fake: torch.Tensor, extractor: Callable | None = None,
                            batch_size: int = 256) -> float:
    """Frechet distance between two image sets (N, C, H, W) in [-1, 1] in the features of ``extractor``
    (default: the digits classifier, i.e. the Frechet digit distance)."""
    extractor = extractor or digits_feature_extractor()
    return frechet_distance_features(compute_features(extractor, real, batch_size), compute_features(extractor, fake, batch_size))


def kid_images(real: torch.Tensor, fake: torch.Tensor, extractor: Callable | None = None, batch_size: int = 256,
               **kid_kwargs) -> tuple[float, float]:
    """KID (mean, std) between two image sets in the features of ``extractor`` (default: digits classifier)."""
    extractor = extractor or digits_feature_extractor()
    return kernel_inception_distance(compute_features(extractor, real, batch_size),
                                     compute_features(extractor, fake, batch_size), **kid_kwargs)


# ----------------------------------------------------------------------------------------------
# The digits feature network
# ----------------------------------------------------------------------------------------------
class DigitsClassifier(nn.Module):
    """Small CNN on 8x8 grayscale digits in [-1, 1]: (N, 1, 8, 8) -> logits (N, 10); ``features`` -> (N, 128)."""

    feature_dim = 128

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.avg_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_digit_input(images: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] -> (N, 1, 8, 8) float32: channel mean, then area resize to 8x8."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise TypeError("images must be a torch.Tensor (N, C, H, W) with values in [-1, 1]")
    x = images.float().mean(dim=1, keepdim=True)
    if x.shape[-2:] != (8, 8):
        if x.shape[-2] % 8 == 0 and x.shape[-1] % 8 == 0:
            x = F.adaptive_avg_pool2d(x, 8)
        else:
            x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
    return x


def load_digits_classifier(path: str | None = None, device=None) -> DigitsClassifier:
    """The shipped classifier (or one at ``path``), in eval mode."""
    from safetensors.torch import load_file

    path = path or DIGITS_CLASSIFIER_FILE
    if not os.path.isfile(path):
        raise FileNotFoundError(f"digits classifier weights not found at {path}; run training/train_digits_classifier.py")
    net = DigitsClassifier()
    net.load_state_dict(load_file(path))
    return net.to(device).eval()


def digits_feature_extractor(path: str | None = None, device=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """images (N, C, H, W) in [-1, 1] -> (N, 128) digits-classifier features (the FDD feature space)."""
    net = load_digits_classifier(path, device)
    param_device = next(net.parameters()).device

    @torch.no_grad()
    def extract(images: torch.Tensor) -> torch.Tensor:
        return net.features(to_digit_input(images).to(param_device))

    return extract


def digits_images(resolution: int = 8, split: str = "test"):
    """(images (N, 1, R, R) float32 in [-1, 1], labels (N,)) of scikit-learn's digits, preprocessed exactly as the
    training data (data.load_digits_dataset: 8-bit, resized to R) ; split in 'train', 'test', 'all'."""
    from . import data

    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    pixels, labels = data.digits_pixels(split)
    labels = torch.as_tensor(labels, dtype=torch.long)
    out = []
    from PIL import Image

    for p in pixels:
        img = Image.fromarray(p, mode="L")
        if resolution != 8:
            img = data.resize_shorter_side(img, resolution)
        out.append(data.to_unit_range(np.asarray(img)))
    return torch.stack(out), labels


def train_digits_classifier(epochs: int = 40, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                            noise_std: float = 0.1) -> tuple[DigitsClassifier, float]:
    """Train the FDD network on the train split (deterministic; seconds on one CPU thread).
    Augmentation: Gaussian pixel noise and random 1-pixel shifts. Returns (net, held-out accuracy)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = digits_images(8, "train")
    x_test, y_test = digits_images(8, "test")
    net = DigitsClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * math.ceil(len(x_train) / batch_size))
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(x_train), batch_size):
            idx = perm[i:i + batch_size]
            x = x_train[idx] + noise_std * torch.randn(x_train[idx].shape, generator=gen)
            shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
            x = torch.roll(x, shifts=shift, dims=(2, 3)).clamp(-1, 1)
            loss = F.cross_entropy(net(x), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(x_test).argmax(1) == y_test).float().mean())
    return net, acc


# ----------------------------------------------------------------------------------------------
# Inception (optional: torch-fidelity, local weights only)
# ----------------------------------------------------------------------------------------------
def inception_weights_path() -> str:
    """Where torch-fidelity keeps its InceptionV3 weights (the torch hub checkpoint folder)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS_NAME)


def inception_available() -> tuple[bool, str]:
    """(available, reason): torch-fidelity importable AND its weights present locally (never downloads)."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return False, "torch-fidelity is not installed (pip install 'ddpm-from-scratch[metrics]')"
    if not os.path.isfile(inception_weights_path()):
        return False, f"InceptionV3 weights not found at {inception_weights_path()} (this package never downloads them)"
    return True, "ok"


def inception_feature_extractor(device=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """images (N, C, H, W) in [-1, 1] -> (N, 2048) InceptionV3 pool3 features (torch-fidelity), for FID / KID.
    Raises RuntimeError when torch-fidelity or its local weights are missing."""
    ok, reason = inception_available()
    if not ok:
        raise RuntimeError(f"Inception features unavailable: {reason}")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=inception_weights_path())
    net = net.to(device).eval()
    param_device = next(net.parameters()).device

    @torch.no_grad()
    def extract(images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)  # torch-fidelity takes uint8 images
        return net(x.to(param_device))[0]

    return extract


def digits_for_unet(unet, split: str = "test") -> torch.Tensor:
    """The digits of ``split`` (default: the 359 held out) shaped for ``unet`` (its sample_size, in_channels),
    in [-1, 1]."""
    size = unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0]
    images, _ = digits_images(size, split)
    if unet.config.in_channels != 1:
        images = images.expand(-1, unet.config.in_channels, -1, -1).contiguous()
    return images


def digits_report(unet, scheduler, *, num_inference_steps=None, num_images=None, num_samples: int = 0,
                  variance_type=None, batch_size: int = 128, generator=None, progress: bool = False) -> dict:
    """Bits/dim bound on the held-out digits and, with num_samples > 0, the Frechet digit distance of that many
    samples to them. Returns BoundResult.to_dict() (+ num_images, fdd, num_samples)."""
    from . import likelihood

    images = digits_for_unet(unet)
    if num_images is not None:
        images = images[:num_images]
    bound = likelihood.bits_per_dim(unet, scheduler, images, num_inference_steps=num_inference_steps,
                                    batch_size=batch_size, generator=generator, progress=progress,
                                    variance_type=variance_type)
    out = bound.to_dict()
    out["num_images"] = int(images.shape[0])
    if num_samples:
        samples = likelihood.sample_images(unet, scheduler, num_samples, num_inference_steps,
                                           variance_type=variance_type, batch_size=batch_size, generator=generator,
                                           progress=progress)
        out["fdd"] = frechet_distance_images(digits_for_unet(unet), samples)
        out["num_samples"] = int(num_samples)
    return out
