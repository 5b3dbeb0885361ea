"""The auditor's own imprint model, run through Opacus DP-SGD: the worst case for a noise multiplier.

An imprint block followed by a frozen read-out, wrapped in Opacus's ``GradSampleModule`` and stepped by a
``DPOptimizer`` with the training run's noise multiplier, clipping norm, expected batch size and loss reduction,
and its own noise generator. Only the imprint rows are trainable, so each sample's whole clipping budget goes to its
row: the recovered noise sits at the floor DP allows, ``sigma * sqrt(||x||^2 + 1)`` per pixel.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from opacus_dmaudit.capture import CapturedGradients, GradientCapture
from opacus_dmaudit.imprint import ImprintBlock

__all__ = ["ShadowImprint", "SHADOW_GAIN"]

# The frozen read-out makes torch note that no input requires gradients; expected here, and harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)

SHADOW_GAIN = 1e6  # large enough that the imprint rows take (almost) all of each sample's clipping budget


class ShadowImprint:
    """A DP-SGD step of an imprint model on a batch, through Opacus.

    Args:
        calibration: model inputs to calibrate the bins on.
        bins / structure / measurement / gain: the imprint block's settings.
        noise_multiplier / max_grad_norm / expected_batch_size / loss_reduction: the DP-SGD mechanism.
        seed: seed of the DP noise generator (the caller's global RNG is never used).
    """

    def __init__(self, *, calibration: torch.Tensor, bins: int = 64, structure: str = "sparse",
                 measurement: str | torch.Tensor = "brightness", gain: float = SHADOW_GAIN,
                 noise_multiplier: float, max_grad_norm: float, expected_batch_size: int,
                 loss_reduction: str = "mean", seed: int = 0) -> None:
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
        out = self.model(batch.float())
        (out.mean() if self.loss_reduction == "mean" else out.sum()).backward()
        optimizer.step()
        self.block.restore(self._snapshot)
        return self.capture.latest
