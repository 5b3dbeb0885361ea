"""The auditor's own imprint model, run through Opacus DP-SGD: the worst case for a noise multiplier.

An imprint block followed by a frozen read-out, wrapped in Opacus's ``GradSampleModule`` and stepped by a
``DPOptimizer`` with the training run's noise multiplier, clipping norm, expected batch size and loss reduction,
and its own noise generator. Only the imprint rows are trainable, so each sample's whole clipping budget goes to its
row: the recovered noise sits at the floor DP allows, ``sigma * sqrt(||x||^2 + 1)`` per pixel.

Opacus materialises each sample's gradient of every imprint row, ``bins x C*H*W`` floats a sample (50 MB at 64 bins
of 3×256×256 images), so a batch is stepped in physical batches that fit :data:`GRAD_SAMPLE_BUDGET_BYTES`, with
Opacus's own virtual steps (``signal_skip_step``, as its ``BatchMemoryManager`` does): every physical batch is
clipped and summed, and noise is added once, at the last. The released gradients are those of one step on the whole
batch.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from opacus_dmaudit.capture import CapturedGradients, GradientCapture
from opacus_dmaudit.imprint import ImprintBlock

__all__ = ["ShadowImprint", "SHADOW_GAIN", "GRAD_SAMPLE_BUDGET_BYTES"]

# The frozen read-out makes torch note that no input requires gradients; expected here, and harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)

SHADOW_GAIN = 1e6  # large enough that the imprint rows take (almost) all of each sample's clipping budget
# Per-sample gradients held at once by one physical batch of the shadow step. In one physical batch, 128 images of
# 3×256×256 at 64 bins peaked at 13.0 GiB resident beside the user's training; with this cap, 1.55 GiB
# (benchmarks/shadow_step_memory.py, 2-core CPU). Images up to 3×32×32 still take a batch of 256 in one.
GRAD_SAMPLE_BUDGET_BYTES = 256 * 2**20


class ShadowImprint:
    """A DP-SGD step of an imprint model on a batch, through Opacus.

    Args:
        calibration: model inputs to calibrate the bins on.
        bins / structure / measurement / gain: the imprint block's settings.
        noise_multiplier / max_grad_norm / expected_batch_size / loss_reduction: the DP-SGD mechanism.
        seed: seed of the DP noise generator (the caller's global RNG is never used).
        grad_sample_budget: bytes of per-sample gradients one physical batch may hold (at least one sample's).

    Attributes:
        physical_batch_size: samples per physical batch, from ``grad_sample_budget``.
    """

    def __init__(self, *, calibration: torch.Tensor, bins: int = 64, structure: str = "sparse",
                 measurement: str | torch.Tensor = "brightness", gain: float = SHADOW_GAIN,
                 noise_multiplier: float, max_grad_norm: float, expected_batch_size: int,
                 loss_reduction: str = "mean", seed: int = 0,
                 grad_sample_budget: int = GRAD_SAMPLE_BUDGET_BYTES) -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        calibration = calibration.detach().float().cpu()
        self.block = ImprintBlock(image_shape=tuple(calibration.shape[1:]), bins=bins, structure=structure,
                                  measurement=measurement, gain=gain, seed=seed).calibrate(calibration)
        # skip_init: ones are written below, and a random init would move the caller's global RNG.
        readout = nn.utils.skip_init(nn.Linear, math.prod(self.block.image_shape), 1, bias=False)
        nn.init.ones_(readout.weight)
        readout.requires_grad_(False)  # only the imprint rows are released
        self.loss_reduction = loss_reduction
        self.model = GradSampleModule(nn.Sequential(self.block, nn.Flatten(), readout), loss_reduction=loss_reduction)
        self.optimizer = DPOptimizer(torch.optim.SGD(self.block.parameters(), lr=0.0),
                                     noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                     expected_batch_size=expected_batch_size, loss_reduction=loss_reduction,
                                     generator=torch.Generator().manual_seed(seed))
        self.capture = GradientCapture(self.optimizer, self.block.imprint)
        self._snapshot = self.block.parameter_snapshot()
        per_sample = sum(p.numel() * p.element_size() for p in self.block.parameters())
        self.physical_batch_size = max(1, int(grad_sample_budget) // per_sample)

    def step(self, batch: torch.Tensor, *, noise_multiplier: float | None = None, max_grad_norm: float | None = None,
             expected_batch_size: int | None = None) -> CapturedGradients:
        """One DP-SGD step on ``batch``; returns the imprint layer's released gradients."""
        optimizer = self.optimizer
        if noise_multiplier is not None:
            optimizer.noise_multiplier = noise_multiplier
        if max_grad_norm is not None:
            optimizer.max_grad_norm = max_grad_norm
        if expected_batch_size is not None:
            optimizer.expected_batch_size = expected_batch_size
        optimizer.zero_grad(set_to_none=True)
        physical = batch.float().split(self.physical_batch_size)
        for i, part in enumerate(physical):
            out = self.model(part)
            # Opacus scales a mean's per-sample gradients by the physical batch's size: each is one sample's.
            (out.mean() if self.loss_reduction == "mean" else out.sum()).backward()
            if i < len(physical) - 1:
                optimizer.signal_skip_step(do_skip=True)  # clip and add to the clipped sum; no noise, no hook
            optimizer.step()
            # Frees this physical batch's per-sample gradients; after a skipped step the clipped sum stays.
            optimizer.zero_grad(set_to_none=True)
        self.block.restore(self._snapshot)
        return self.capture.latest
