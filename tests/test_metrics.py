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


def test_a_success_rate_comes_with_its_exact_binomial_interval():
    from scipy.stats import binom

    from opacus_dmaudit.metrics import success_interval, success_intervals, success_rates

    low, high = success_interval(2, 128)
    assert (round(low, 4), round(high, 4)) == (0.0019, 0.0553)
    # Clopper-Pearson: each limit is the rate at which the count seen is just in the outer 2.5% tail.
    assert binom.sf(1, 128, low) == pytest.approx(0.025) and binom.cdf(2, 128, high) == pytest.approx(0.025)
    assert success_interval(0, 50)[0] == 0.0 and success_interval(50, 50)[1] == 1.0
    assert success_interval(2, 128, confidence=0.8)[1] < high
    assert all(math.isnan(x) for x in success_interval(0, 0))
    with pytest.raises(ValueError, match="confidence must lie strictly between 0 and 1"):
        success_interval(1, 10, confidence=95)
    ssim_values = torch.tensor([0.9, 0.8, 0.3, 0.2, 0.6], dtype=torch.float64)  # errors 0.1 0.2 0.7 0.8 0.4
    rates, intervals = success_rates({"ssim": ssim_values}), success_intervals({"ssim": ssim_values})
    assert rates == {"ssim@0.3": 0.4, "ssim@0.5": 0.6}
    assert tuple(intervals["ssim@0.5"].values()) == success_interval(3, 5)
    assert all(ci["low"] <= rates[key] <= ci["high"] for key, ci in intervals.items())
    with pytest.raises(ValueError, match="hits must lie between 0 and the 5 images, got 6"):
        success_interval(6, 5)


def test_the_interval_is_the_one_scipys_binomial_test_gives():
    from scipy.stats import binomtest

    from opacus_dmaudit.metrics import success_interval

    for images in (1, 2, 7, 31, 128, 1000):
        for hits in sorted({0, 1, images // 3, images - 1, images}):
            for confidence in (0.5, 0.95, 0.999):
                exact = binomtest(hits, images).proportion_ci(confidence_level=confidence, method="exact")
                assert success_interval(hits, images, confidence=confidence) == pytest.approx(
                    (exact.low, exact.high), abs=1e-12), (hits, images, confidence)
