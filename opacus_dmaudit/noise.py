"""Gaussian noise in pixel space: adding it (the known-variance experiments) and estimating it (unknown variance).

The seed paper's second setting assumes the attacker does not know the noise level. scikit-image's wavelet
estimator (``restoration.estimate_sigma``, median absolute deviation of the finest diagonal wavelet band) gives it
from the image alone.
"""

from __future__ import annotations

import torch

__all__ = ["add_gaussian_noise", "estimate_noise_std"]


def add_gaussian_noise(
    images: torch.Tensor, noise_std: float | torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``images + noise_std * N(0, 1)``, one std for all or one per image; no clamping (the attack sees raw values).

    Raises:
        ValueError: for a negative or non-finite std.
    """
    std = torch.as_tensor(noise_std, dtype=images.dtype)
    if not torch.isfinite(std).all() or (std < 0).any():
        raise ValueError(f"noise std must be finite and non-negative, got {std.tolist()}")
    if std.ndim == 1:
        std = std.view(-1, *([1] * (images.ndim - 1)))
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
    return images + std * noise.to(images.device)


def estimate_noise_std(images: torch.Tensor) -> torch.Tensor:
    """Per-image estimate of the per-pixel Gaussian noise std (pixel units), from the image alone."""
    from skimage.restoration import estimate_sigma

    array = images.detach().double().cpu().numpy()
    estimates = [
        float(estimate_sigma(image, channel_axis=0, average_sigmas=True)) for image in array
    ]
    return torch.tensor(estimates, dtype=torch.float64)
