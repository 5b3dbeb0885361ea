"""The shadow imprint's DP-SGD step: real Opacus with ghost clipping, against Opacus's per-sample-gradient step."""

import dataclasses
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from opacus_dmaudit.capture import GradientCapture
from opacus_dmaudit.imprint import ImprintBlock
from opacus_dmaudit.recovery import recover_images
from opacus_dmaudit.shadow import SHADOW_GAIN, ShadowImprint


def _shadow(images, *, loss_reduction="mean", structure="sparse", grad_sample_mode="ghost"):
    return ShadowImprint(calibration=images, bins=64, structure=structure, noise_multiplier=0.7, max_grad_norm=1.0,
                         expected_batch_size=len(images), loss_reduction=loss_reduction, seed=3,
                         grad_sample_mode=grad_sample_mode)


def _per_sample_step(shadow: ShadowImprint, batch, *, loss_reduction, max_grad_norm=1.0):
    """The same imprint model stepped by Opacus's standard path: each sample's gradient materialised, clipped,
    summed, noised once by a generator seeded as the shadow's."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    block = ImprintBlock(image_shape=shadow.block.image_shape, bins=shadow.block.bins,
                         structure=shadow.block.structure, measurement=shadow.block.measurement.clone(),
                         gain=SHADOW_GAIN)
    block.load_state_dict(shadow.block.state_dict())
    readout = nn.Linear(math.prod(block.image_shape), 1, bias=False)
    nn.init.ones_(readout.weight)
    readout.requires_grad_(False)
    model = GradSampleModule(nn.Sequential(block, nn.Flatten(), readout), loss_reduction=loss_reduction)
    optimizer = DPOptimizer(torch.optim.SGD(block.parameters(), lr=0.0), noise_multiplier=0.7,
                            max_grad_norm=max_grad_norm, expected_batch_size=len(batch),
                            loss_reduction=loss_reduction, generator=torch.Generator().manual_seed(3))
    capture = GradientCapture(optimizer, block.imprint)
    out = model(batch)
    (out.mean() if loss_reduction == "mean" else out.sum()).backward()
    optimizer.step()
    return capture.latest, block


@pytest.mark.parametrize("grad_sample_mode", ["ghost", "hooks"])
@pytest.mark.parametrize("loss_reduction, structure", [("mean", "sparse"), ("sum", "sparse"), ("mean", "cumulative")])
def test_the_shadow_step_releases_what_opacus_per_sample_step_releases(fashion_images, loss_reduction, structure,
                                                                       grad_sample_mode):
    batch = fashion_images[:23]
    shadow = _shadow(batch, loss_reduction=loss_reduction, structure=structure, grad_sample_mode=grad_sample_mode)
    ghost = shadow.step(batch)
    reference, block = _per_sample_step(shadow, batch, loss_reduction=loss_reduction)
    assert shadow.capture.steps == 1  # one released step, noise added once
    for name in ("weight", "bias", "clean_weight", "clean_bias"):
        expected, got = getattr(reference, name), getattr(ghost, name)
        # The same noise draws (one generator, one step); only the norms' and sums' order of operations differs.
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())), name
    a = recover_images(reference, block, originals=batch)
    b = recover_images(ghost, shadow.block, originals=batch)
    assert len(a) == len(b) >= 5 and torch.equal(a.sample_index, b.sample_index)
    assert float((a.images - b.images).abs().max()) < 1e-3 * float(a.noise_std.max())


@pytest.mark.parametrize("grad_sample_mode", ["ghost", "hooks"])
def test_a_changed_clipping_norm_reaches_the_clip_factors(fashion_images, grad_sample_mode):
    """The ghost-clipping module computes the clip factors from its own copy of the norm: a run that changes its
    clipping norm between steps must clip the shadow's samples at the new one."""
    batch = fashion_images[:16]
    shadow = _shadow(batch, grad_sample_mode=grad_sample_mode)
    ghost = shadow.step(batch, max_grad_norm=0.25)
    reference, _ = _per_sample_step(shadow, batch, loss_reduction="mean", max_grad_norm=0.25)
    assert torch.allclose(ghost.clean_bias, reference.clean_bias, rtol=1e-5, atol=1e-9)
    assert ghost.coordinate_noise_std == pytest.approx(reference.coordinate_noise_std)


def test_large_images_step_whole(fashion_images):
    """64 bins of 3×256×256 images: 48 MiB of per-sample gradients a sample on Opacus's standard path; ghost
    clipping steps the batch at once and the images are recovered."""
    images = torch.nn.functional.interpolate(fashion_images[:8], size=256).expand(-1, 3, -1, -1).contiguous()
    shadow = _shadow(images)
    sizes = []
    shadow.model.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    captured = shadow.step(images)
    assert sizes == [8] and captured.weight.shape == (64, 3 * 256 * 256)
    assert len(recover_images(captured, shadow.block, originals=images)) >= 4


def test_an_unknown_grad_sample_mode_is_refused(fashion_images):
    with pytest.raises(ValueError, match="grad_sample_mode must be 'ghost' or 'hooks'"):
        _shadow(fashion_images[:4], grad_sample_mode="functorch")


def test_torchs_note_on_the_shadow_backward_is_silenced_and_the_users_own_is_not():
    # In a process of its own: the test modules' warning filters are not a user's. torch 2.6 has no such note.
    code = """
import warnings, torch, torch.nn as nn

def users_backward():
    mine = nn.Linear(3, 1)
    mine.register_full_backward_hook(lambda *args: None)
    mine(torch.ones(2, 3)).sum().backward()

def notes(caught):
    return sorted({w.filename.rsplit('/', 1)[-1] for w in caught if 'Full backward hook' in str(w.message)})

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    users_backward()
print(notes(caught))
from opacus_dmaudit.shadow import ShadowImprint
images = torch.rand(16, 1, 8, 8)
with warnings.catch_warnings(record=True) as caught:  # keeps the filters as they are
    ShadowImprint(calibration=images, bins=8, structure="sparse", noise_multiplier=1.0, max_grad_norm=1.0,
                  expected_batch_size=16, loss_reduction="mean", seed=0).step(images)
    users_backward()
print(notes(caught))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    torch_notes, after_a_shadow_step = result.stdout.split()
    assert after_a_shadow_step == torch_notes  # the user's note, and no shadow.py
    if torch.__version__ >= (2, 14):  # TorchVersion compares as a version; torch 2.14 notes the user's model
        assert torch_notes == "['<string>']"


@pytest.mark.parametrize("structure", ["sparse", "cumulative"])
def test_the_clip_norm_scale_stays_near_the_oracles_under_heavy_noise(fashion_images, structure):
    # Calibrated on other images than those attacked, as an attacker's knowledge of the data would be.
    shadow = ShadowImprint(calibration=fashion_images[128:], bins=64, structure=structure, noise_multiplier=3.0,
                           max_grad_norm=2.0, expected_batch_size=64, seed=5)
    batch = fashion_images[:64]
    captured = shadow.step(batch)
    oracle = recover_images(captured, shadow.block, scale="oracle", originals=batch)
    estimate = recover_images(captured, shadow.block, scale="clip-norm", originals=batch)
    assert len(oracle) >= 15 and torch.equal(estimate.bins, oracle.bins)
    assert torch.equal(estimate.sample_index, oracle.sample_index)
    # Its scale, C / sqrt(a (||x||^2 + 1)) with the bin's median norm, is the oracle's up to how far this image's norm
    # is from that median, whatever the noise: the bin measurement's is mostly noise at sigma 3.
    error = (estimate.noise_std / oracle.noise_std).log().abs()
    assert float(error.median()) < 0.15 and float(error.max()) < 0.7
    measured = recover_images(captured, shadow.block, scale="bin-measurement", originals=batch)
    assert float((measured.noise_std / oracle.noise_std).log().abs().median()) > 0.5
    # The images are the oracle's, rescaled by the ratio of the scales.
    ratio = (estimate.noise_std / oracle.noise_std).float().view(-1, 1, 1, 1)
    assert torch.allclose(estimate.images, oracle.images * ratio, rtol=1e-4, atol=1e-4)


def test_the_clip_norm_scale_needs_the_clipping_norm_and_calibrated_bins(fashion_images):
    shadow = ShadowImprint(calibration=fashion_images, bins=16, noise_multiplier=1.0, max_grad_norm=1.0,
                           expected_batch_size=8)
    captured = shadow.step(fashion_images[:8])
    assert captured.max_grad_norm == 1.0
    block = shadow.block
    # Each bin's norm is the median squared norm of the 16 calibration images measured nearest its centre; 256
    # images in 16 bins put 16 in each, so those are the bin's own.
    bins = block.assign_bins(fashion_images)
    squared = fashion_images.flatten(1).double().pow(2).sum(dim=1)
    inner = torch.stack([squared[bins == i].median() for i in range(1, 15)])
    assert torch.allclose(block.bin_norms_sq[1:15], inner)
    assert torch.equal(block.cpu_copy().bin_norms_sq, block.bin_norms_sq)
    # Reference images of the attacker's own: the nearest few stand in for a bin none of them falls in.
    block.reference_norms(fashion_images[:3])
    assert torch.equal(block.bin_norms_sq, squared[:3].median().expand(16))
    with pytest.raises(ValueError, match="reference images must be N×1×28×28"):
        block.reference_norms(fashion_images[:0])
    block.calibrate(fashion_images)
    with pytest.raises(ValueError, match="clipping norm"):
        recover_images(dataclasses.replace(captured, max_grad_norm=None), block, scale="clip-norm")
    block.set_edges(block.edges.clone())  # hand-set edges: no calibration images behind them
    with pytest.raises(ValueError, match=r"calibrate the imprint block on data \(ImprintBlock.calibrate\)"):
        recover_images(captured, block, scale="clip-norm")
