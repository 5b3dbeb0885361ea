"""The shadow imprint's DP-SGD step: real Opacus, its per-sample gradients held to a memory budget."""

import pytest
import torch

from opacus_dmaudit.recovery import recover_images
from opacus_dmaudit.shadow import ShadowImprint


def _shadow(images, *, budget_samples=None, loss_reduction="mean"):
    kwargs = {}
    if budget_samples is not None:
        per_sample = (64 * images[0].numel() + 64) * 4  # the imprint rows' weight and bias, float32
        kwargs["grad_sample_budget"] = budget_samples * per_sample
    return ShadowImprint(calibration=images, bins=64, noise_multiplier=0.7, max_grad_norm=1.0,
                         expected_batch_size=len(images), loss_reduction=loss_reduction, seed=3, **kwargs)


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_a_batch_stepped_in_physical_batches_releases_the_gradients_of_one_step(fashion_images, loss_reduction):
    batch = fashion_images[:23]
    whole = _shadow(batch, loss_reduction=loss_reduction)
    split = _shadow(batch, budget_samples=5, loss_reduction=loss_reduction)
    sizes = []
    split.model.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    assert whole.physical_batch_size >= 23 and split.physical_batch_size == 5
    one, parts = whole.step(batch), split.step(batch)
    assert sizes == [5, 5, 5, 5, 3]
    assert split.capture.steps == 1  # one released step (the accountant's view), noise added once
    for name in ("weight", "bias", "clean_weight", "clean_bias"):
        expected, got = getattr(one, name), getattr(parts, name)
        # The same noise draws (one generator, one real step); only the clipped sum's order of addition differs.
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())), name
    a = recover_images(one, whole.block, originals=batch)
    b = recover_images(parts, split.block, originals=batch)
    assert len(a) == len(b) >= 10 and torch.equal(a.sample_index, b.sample_index)
    assert float((a.images - b.images).abs().max()) < 1e-3 * float(a.noise_std.max())


def test_large_images_are_stepped_a_few_at_a_time(fashion_images):
    """64 bins of 3×256×256 images: 50 MB of per-sample gradients a sample, so 5 fit the default 256 MiB budget."""
    images = torch.nn.functional.interpolate(fashion_images[:6], size=256).expand(-1, 3, -1, -1).contiguous()
    shadow = _shadow(images)
    assert shadow.physical_batch_size == 5
    sizes = []
    shadow.model.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    captured = shadow.step(images)
    assert sizes == [5, 1] and captured.weight.shape == (64, 3 * 256 * 256)
    assert len(recover_images(captured, shadow.block, originals=images)) >= 3
