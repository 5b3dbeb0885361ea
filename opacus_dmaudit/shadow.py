"""The auditor's own imprint model, run through Opacus DP-SGD: the worst case for a noise multiplier.

An imprint block followed by a frozen read-out, wrapped in Opacus's ``GradSampleModuleFastGradientClipping`` and
stepped by a ``DPOptimizerFastGradientClipping`` with the training run's noise multiplier, clipping norm, expected
batch size and loss reduction, and its own noise generator. Only the imprint rows are trainable, so each sample's
whole clipping budget goes to its row: the recovered noise sits at the floor DP allows, ``sigma * sqrt(||x||^2 + 1)``
per pixel.

Ghost clipping (Li et al. 2022; Opacus's fast gradient clipping) releases the same gradients as Opacus's standard
per-sample path (tested against ``GradSampleModule`` + ``DPOptimizer`` with the same noise draws) without ever
holding a sample's gradient: the imprint rows are one linear layer on the flattened image, so a sample's gradient
norm is ``||dL/dh_j|| * ||x_j||`` and a second backward pass of the clip-weighted loss gives the clipped sum. The
per-sample path holds ``bins x C*H*W`` floats a sample (48 MiB at 64 bins of 3×256×256 images): for 64 of those it
took 4.17 s and 6.96 GiB at peak against ghost clipping's 0.46 s and 1.15 GiB, and for 512 images of 3×32×32 at 512
bins 4.99 s against 0.10 s (``benchmarks/shadow_step.py``, 2-core CPU).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from opacus_dmaudit.capture import CapturedGradients, GradientCapture
from opacus_dmaudit.imprint import ImprintBlock

__all__ = ["ShadowImprint", "SHADOW_GAIN"]

# The shadow model's input needs no gradient, so torch notes, at each backward pass here, that no input requires one:
# expected, and harmless. Only for the passes of this module: the same note about the user's own model stays theirs.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning,
                        module=r"opacus_dmaudit\.shadow\Z")

SHADOW_GAIN = 1e6  # large enough that the imprint rows take (almost) all of each sample's clipping budget


class ShadowImprint:
    """A DP-SGD step of an imprint model on a batch, through Opacus with ghost clipping.

    Args:
        calibration: model inputs to calibrate the bins on.
        bins / structure / measurement / gain: the imprint block's settings.
        noise_multiplier / max_grad_norm / expected_batch_size / loss_reduction: the DP-SGD mechanism.
        seed: seed of the DP noise generator (the caller's global RNG is never used).
        grad_sample_mode: ``"ghost"`` (default), or ``"hooks"``, Opacus's standard ``GradSampleModule`` and
            ``DPOptimizer``, which materialise every sample's gradient (``bins x C*H*W`` floats a sample); the
            reference the ghost step is tested and benchmarked against.
    """

    def __init__(self, *, calibration: torch.Tensor, bins: int = 64, structure: str = "sparse",
                 measurement: str | torch.Tensor = "brightness", gain: float = SHADOW_GAIN,
                 noise_multiplier: float, max_grad_norm: float, expected_batch_size: int,
                 loss_reduction: str = "mean", seed: int = 0, grad_sample_mode: str = "ghost") -> None:
        from opacus import GradSampleModule
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

        if grad_sample_mode not in ("ghost", "hooks"):
            raise ValueError(f"grad_sample_mode must be 'ghost' or 'hooks', got {grad_sample_mode!r}")

        calibration = calibration.detach().float().cpu()
        self.block = ImprintBlock(image_shape=tuple(calibration.shape[1:]), bins=bins, structure=structure,
                                  measurement=measurement, gain=gain, seed=seed).calibrate(calibration)
        # skip_init: ones are written below, and a random init would move the caller's global RNG.
        readout = nn.utils.skip_init(nn.Linear, math.prod(self.block.image_shape), 1, bias=False,
                                     dtype=torch.float32)
        nn.init.ones_(readout.weight)
        readout.requires_grad_(False)  # only the imprint rows are released
        self.loss_reduction = loss_reduction
        self.ghost = grad_sample_mode == "ghost"
        network = nn.Sequential(self.block, nn.Flatten(), readout)
        if self.ghost:
            self.model = GradSampleModuleFastGradientClipping(network, loss_reduction=loss_reduction,
                                                              max_grad_norm=max_grad_norm, use_ghost_clipping=True)
        else:
            self.model = GradSampleModule(network, loss_reduction=loss_reduction)
        self.optimizer = (DPOptimizerFastGradientClipping if self.ghost else DPOptimizer)(
            torch.optim.SGD(self.block.parameters(), lr=0.0), noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size, loss_reduction=loss_reduction,
            generator=torch.Generator().manual_seed(seed))
        self.capture = GradientCapture(self.optimizer, self.block.imprint)
        self._snapshot = self.block.parameter_snapshot()

    def step(self, batch: torch.Tensor, *, noise_multiplier: float | None = None, max_grad_norm: float | None = None,
             expected_batch_size: int | None = None) -> CapturedGradients:
        """One DP-SGD step on ``batch``; returns the imprint layer's released gradients."""
        model, optimizer = self.model, self.optimizer
        if noise_multiplier is not None:
            optimizer.noise_multiplier = noise_multiplier
        if max_grad_norm is not None:
            optimizer.max_grad_norm = max_grad_norm
            if self.ghost:
                model.max_grad_norm = max_grad_norm  # ghost clipping's module computes the clip factors
        if expected_batch_size is not None:
            optimizer.expected_batch_size = expected_batch_size
        optimizer.zero_grad(set_to_none=True)
        loss_per_sample = model(batch.float()).squeeze(1)
        reduced = loss_per_sample.mean() if self.loss_reduction == "mean" else loss_per_sample.sum()
        if not self.ghost:
            reduced.backward()
            return self._release()
        # Opacus's two passes of ghost clipping, written out because their packaging differs between the opacus
        # releases supported (opacus 1.5's double_backward always reduces the first pass by the mean): the first
        # pass, reduced as the run reduces its loss, gives each sample's gradient norm; the second, of the
        # clip-weighted sum with the norm hooks off, gives the clipped sum, which the optimizer noises once.
        reduced.backward(retain_graph=True)
        optimizer.zero_grad()
        clip_factors = (model.get_clipping_coef() if hasattr(model, "get_clipping_coef")  # opacus >= 1.6
                        else model.get_coeff())
        model.disable_hooks()
        try:
            (clip_factors * loss_per_sample).sum().backward()
        finally:
            model.enable_hooks()
        return self._release()

    def _release(self) -> CapturedGradients:
        """Clip (per-sample path), noise and release the step; put the calibrated bins back."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.block.restore(self._snapshot)
        return self.capture.latest
