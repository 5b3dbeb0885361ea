"""Evaluating a prior as an attacker: noise known images at several levels, reconstruct, and score.

This is the experiment behind ``opacus-dmaudit reconstruct`` and the seed paper's Table 1: Gaussian noise of a
known per-pixel std is added to images, the prior reconstructs them from the matched timestep, and the noisy and
reconstructed images are scored against the originals.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from opacus_dmaudit.metrics import ImageMetrics, summarize
from opacus_dmaudit.noise import add_gaussian_noise, estimate_noise_std
from opacus_dmaudit.prior import DiffusionPrior

__all__ = ["LevelResult", "PriorEvaluation", "evaluate_prior"]


@dataclass
class LevelResult:
    """One noise level of an evaluation.

    Attributes:
        noise_std: the true per-pixel std added (pixel units).
        estimated_noise_std: mean estimate when the attacker estimated it from the images, else ``None``.
        t_start: median matched timestep.
        noisy / reconstructed: mean metrics (``lpips`` is ``None`` when unavailable).
        from_prior: images whose chain started from pure noise.
        seconds: wall time of the reconstruction.
    """

    noise_std: float
    t_start: int
    noisy: dict[str, float | None]
    reconstructed: dict[str, float | None]
    seconds: float
    estimated_noise_std: float | None = None
    from_prior: int = 0
    per_image: dict[str, dict[str, list[float] | None]] = field(default_factory=dict, repr=False)


@dataclass
class PriorEvaluation:
    """All levels of an evaluation, plus what produced them; ``to_json()`` gives the CLI's JSON."""

    prior: str
    n_images: int
    sampler: str
    steps: int
    seed: int
    estimate_noise: bool
    adaptation: str
    lpips: str
    device: str
    levels: list[LevelResult]
    adaptation_loss: str | None = None  # what the adaptation loses for good (caps every score), if anything
    examples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)

    def to_json(self, *, per_image: bool = False) -> dict:
        levels = []
        for level in self.levels:
            entry = asdict(level)
            if not per_image:
                entry.pop("per_image")
            levels.append(entry)
        payload = {k: v for k, v in asdict(self).items() if k not in ("levels", "examples")}
        payload["levels"] = levels
        return payload


def evaluate_prior(
    prior: DiffusionPrior,
    images: torch.Tensor,
    noise_stds: Sequence[float],
    *,
    sampler: str = "ddim",
    steps: int = 50,
    seed: int = 0,
    estimate_noise: bool = False,
    metrics: ImageMetrics | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    keep_examples: int = 8,
) -> PriorEvaluation:
    """Add noise at each std, reconstruct with the prior, and score noisy and reconstructed images.

    Args:
        prior: the diffusion prior.
        images: clean ``N×C×H×W`` images in ``[0, 1]``.
        noise_stds: per-pixel noise stds in pixel units.
        sampler / steps / seed / batch_size: as in :meth:`DiffusionPrior.reconstruct`.
        estimate_noise: the attacker does not know the std and estimates it per image from the noisy image.
        metrics: the metric set; all four by default.
        keep_examples: how many (original, noisy, reconstructed) examples to keep per level for grids.

    Raises:
        ValueError: for negative or non-finite stds.
    """
    stds = [float(s) for s in noise_stds]
    if not stds:
        raise ValueError("give at least one noise std")
    for s in stds:
        if not s >= 0 or s == float("inf"):
            raise ValueError(f"noise std must be a finite number >= 0, got {s}")
    metrics = metrics or ImageMetrics()
    generator = torch.Generator().manual_seed(seed)
    levels, examples, adaptation, adaptation_loss = [], [], "none", None
    for level_index, std in enumerate(stds):
        noisy = add_gaussian_noise(images, std, generator=generator)
        estimate = estimate_noise_std(noisy) if estimate_noise else None
        started = time.perf_counter()
        output = prior.reconstruct(
            noisy,
            estimate if estimate is not None else std,
            sampler=sampler,
            steps=steps,
            seed=seed + level_index,
            batch_size=batch_size,
            progress=progress,
        )
        if prior.device.type == "cuda":
            torch.cuda.synchronize(prior.device)
        seconds = time.perf_counter() - started
        adaptation, adaptation_loss = output.adaptation.describe(), output.adaptation.loss_note()
        noisy_values = metrics(noisy, images)
        recon_values = metrics(output.images, images)
        levels.append(
            LevelResult(
                noise_std=std,
                t_start=int(output.t_start.median()),
                noisy=summarize(noisy_values),
                reconstructed=summarize(recon_values),
                seconds=round(seconds, 3),
                estimated_noise_std=None if estimate is None else float(estimate.mean()),
                from_prior=int(output.from_prior.sum()),
                per_image={
                    "noisy": {k: (None if v is None else v.tolist()) for k, v in noisy_values.items()},
                    "reconstructed": {k: (None if v is None else v.tolist()) for k, v in recon_values.items()},
                },
            )
        )
        k = min(keep_examples, images.shape[0])
        examples.append((images[:k], noisy[:k].clamp(0, 1), output.images[:k]))
    return PriorEvaluation(
        prior=prior.name,
        n_images=int(images.shape[0]),
        sampler=sampler,
        steps=steps,
        seed=seed,
        estimate_noise=estimate_noise,
        adaptation=adaptation,
        lpips=metrics.lpips_reason,
        device=str(prior.device) if prior.device.type == "cpu" else torch.cuda.get_device_name(prior.device),
        levels=levels,
        adaptation_loss=adaptation_loss,
        examples=examples,
    )
