import math

import pytest
import torch

from opacus_dmaudit.metrics import ImageMetrics, lpips_distance, lpips_status, mse, psnr, ssim, summarize
from opacus_dmaudit.noise import add_gaussian_noise, estimate_noise_std


def test_known_values():
    a = torch.zeros(2, 1, 8, 8)
    b = torch.full((2, 1, 8, 8), 0.1)
    assert torch.allclose(mse(a, b), torch.tensor([0.01, 0.01], dtype=torch.float64))
    assert torch.allclose(psnr(a, b), torch.tensor([20.0, 20.0], dtype=torch.float64))
    assert psnr(a, a)[0] == math.inf
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))
    assert float(ssim(x, 1 - x).max()) < 0.0  # anti-correlated images
    with pytest.raises(ValueError, match="shapes differ"):
        mse(a, x)


def test_lpips_plumbing_with_a_random_backbone():
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    same = lpips_distance(x, x, random_backbone=True)
    other = lpips_distance(x, torch.rand(2, 1, 32, 32), random_backbone=True)
    assert torch.allclose(same, torch.zeros(2, dtype=torch.float64), atol=1e-6) and (other > 0).all()


def test_lpips_is_null_without_vgg_weights_and_says_why():
    status = lpips_status()
    values = ImageMetrics()(torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16))
    if status.available:
        assert values["lpips"] is not None
    else:
        assert values["lpips"] is None and "VGG16" in status.reason
        assert summarize(values)["lpips"] is None


def test_noise_estimate_tracks_the_true_std(fashion_images):
    generator = torch.Generator().manual_seed(0)
    for std in (0.05, 0.2, 0.8):
        noisy = add_gaussian_noise(fashion_images[:16], std, generator=generator)
        estimate = estimate_noise_std(noisy)
        assert abs(float(estimate.median()) / std - 1) < 0.15, (std, estimate.median())
    with pytest.raises(ValueError, match="non-negative"):
        add_gaussian_noise(fashion_images[:2], -1.0)
