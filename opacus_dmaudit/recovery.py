"""Recovery: one noisy image per occupied bin from captured imprint gradients, with its noise level.

For a sample ``j`` alone in bin ``i`` with clip factor ``c_j`` and upstream derivative ``delta_j``, the released
row is ``G_W,i = c_j delta_j x_j + xi`` and the bias ``G_b,i = c_j delta_j + zeta`` (``xi, zeta ~ N(0, (sigma C)^2)``).
With a scale ``lambda ~ c_j delta_j``, ``x_hat = G_W,i / lambda`` has per-pixel noise std ``sigma C / |lambda|``.

The scale can be fixed four ways (``scale=``), and every result says which one produced it:

* ``"oracle"``: the clean clipped bias sum (``p.summed_grad``), the seed paper's worst case where the rescaling is
  known. Exact noise level.
* ``"bin-measurement"``: the attacker's estimate. The bin tells the attacker the sample's measurement (e.g. mean
  brightness) up to the bin width, so the row is rescaled until its measurement sits at the bin's centre. Sound
  under heavy noise, because the measurement averages the noise over all pixels.
* ``"noisy-bias"``: divide by the noised bias gradient. Only sound at tiny noise; once the bias noise dominates
  the clipped bias gradient the ratio is noise over noise (kept for comparison).
* ``"clip-norm"``: the attacker's estimate from the clipping norm ``C``, which DP-SGD publishes. Where the imprint
  rows take a sample's whole clipping budget (the shadow imprint: its gain puts every sample's gradient norm far
  above ``C``), the sample's clipped gradient ``lambda (x, 1)`` on each of the ``a`` rows it activates (1 for sparse
  bins, ``i + 1`` for cumulative bin ``i``) has norm ``C``: ``lambda = C / sqrt(a (||x||^2 + 1))``. The attacker
  takes ``||x||^2`` as the median over the reference images nearest the bin (``ImprintBlock.bin_norms_sq``: what
  it knows of the data distribution; the calibration images unless ``ImprintBlock.reference_norms`` was given
  others, as the sweep gives the images outside the attacked batch). No noise enters the scale, so it holds at any
  noise multiplier: through real Opacus steps of the shadow imprint on 512 Fashion-MNIST test images (128 sparse
  bins calibrated on 1,024 training images; ``benchmarks/scale_estimates.py``) it was within 6% of the oracle's for
  half the recovered images and 20% for 90%, at every sigma from 0.01 to 3, where the bin measurement's was off by a
  factor of 1.95 (median) at sigma 1 and 3.4 at sigma 3, with the wrong sign for 77 and 129 of the 296 images.
  Inline, the user's model takes part of the budget, so this scale would be too large: the auditor refuses it there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from opacus_dmaudit.capture import CapturedGradients
from opacus_dmaudit.data import denormalize
from opacus_dmaudit.imprint import ImprintBlock

__all__ = ["SCALES", "RecoveredImages", "clip_norm_scale", "recover_images"]

SCALES = ("oracle", "bin-measurement", "noisy-bias", "clip-norm")

# A bin's clean ratio differs from the image of the one sample in it by float rounding alone: in float32 at most 7e-8
# of the image's norm (sparse bins) and 2e-6 (cumulative ones, differences of rows), measured on Fashion-MNIST; TF32
# reads each pixel to 2^-11. A mixture that close to one image is that image.
ATTRIBUTION_TOLERANCE = 1e-2


@dataclass
class RecoveredImages:
    """Noisy images recovered from one step's imprint gradients.

    Attributes:
        images: ``n×C×H×W`` recovered images (pixel space when a normalisation was given), noise included.
        noise_std: per-image per-pixel noise std in the same units.
        bins: the bin each image came from.
        sample_index: the batch position of the sample each image shows (-1 when the originals are unknown).
        bin_counts: samples per bin (``K``) when the originals are known, else ``None``.
        collisions: bins that held more than one sample (their mixtures are not returned), when known.
        scale: how the scale was fixed (one of ``SCALES``).
    """

    images: torch.Tensor
    noise_std: torch.Tensor
    bins: torch.Tensor
    sample_index: torch.Tensor
    bin_counts: torch.Tensor | None
    collisions: torch.Tensor
    scale: str

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _per_bin(rows: torch.Tensor, structure: str) -> torch.Tensor:
    """Per-bin sums from per-row sums: cumulative bins are differences of adjacent rows."""
    if structure == "sparse":
        return rows
    return torch.cat([rows[:-1] - rows[1:], rows[-1:]])


def _owners_by_measurement(assignment: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each bin's sample (-1 unless exactly one) and its sample count, from the samples' measurements alone."""
    valid = (assignment >= 0) & (assignment < bins)
    counts = torch.bincount(assignment[valid], minlength=bins)
    owner = torch.full((bins,), -1, dtype=torch.long)
    positions = torch.nonzero(valid).flatten()
    owner[assignment[positions]] = positions
    owner[counts != 1] = -1
    return owner, counts


def _ratio_error(weight: torch.Tensor, bias: torch.Tensor, originals: torch.Tensor) -> torch.Tensor:
    """``||weight / bias - original|| / ||original||`` row by row: how far a bin's clean image is from a sample (float
    rounding alone for the sample that made it). The difference is taken as ``weight - bias * original``, in the
    gradients' own precision: for the matching sample it is the rounding of each pixel, not a cancellation of sums."""
    difference = torch.linalg.vector_norm(torch.addcmul(weight, bias[:, None], originals, value=-1), dim=1)
    return difference / (bias.abs() * torch.linalg.vector_norm(originals, dim=1)).clamp_min(torch.finfo(bias.dtype).tiny)


def _attribute_bins(clean_weight: torch.Tensor, clean_bias: torch.Tensor, originals: torch.Tensor,
                    assignment: torch.Tensor, settled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each bin's sample (-1 unless it shows exactly one) and its sample count, checked against the clean sums.

    The float64 measurement of a sample can put it in another bin than the imprint rows did: the rows compute
    ``(w.x - tau_i) / width_i`` in float32 (TF32 on a GPU that allows it), and a sample within rounding of an edge
    lands in the neighbouring row, or in both, or in neither. A bin's clean clipped sums show which: alone in it, a
    sample's ``clean_weight / clean_bias`` is its image. So each bin that holds gradient is matched with the sample,
    among those the measurement puts in it or beside it (rounding moves a sample by a sliver of a bin), whose image its
    clean ratio is to ``ATTRIBUTION_TOLERANCE``; matching none, it holds a mixture. A sample shown by two rows is
    returned once, from the row with the larger clean bias (its lower noise). ``settled`` samples (farther from every
    edge than the rows' rounding) are in their measured bin for certain: a bin with two of them is a mixture
    unsearched, and none of them is a candidate for a neighbouring bin.
    """
    bins = clean_bias.numel()
    originals = originals.to(clean_weight.dtype)
    owner, counts = _owners_by_measurement(assignment, bins)
    holding = clean_bias != 0
    index = torch.nonzero(holding & (owner >= 0)).flatten()
    error = _ratio_error(clean_weight[index], clean_bias[index], originals[owner[index]])
    owner[index[error > ATTRIBUTION_TOLERANCE]] = -1
    owner[~holding] = -1
    counts[~holding] = 0
    settled_counts = torch.bincount(assignment[settled & (assignment >= 0) & (assignment < bins)], minlength=bins)
    for i in torch.nonzero(holding & (owner < 0) & (settled_counts < 2)).flatten().tolist():
        near = torch.nonzero((assignment == i) | (((assignment - i).abs() == 1) & ~settled)).flatten()
        if near.numel() == 0:
            continue  # rounding residue of a row difference: no sample is near enough to have made it
        error = _ratio_error(clean_weight[i].expand(near.numel(), -1), clean_bias[i].expand(near.numel()),
                             originals[near])
        best = int(torch.argmin(error))
        if float(error[best]) <= ATTRIBUTION_TOLERANCE:
            owner[i] = near[best]
        elif near.numel() > 1:
            counts[i] = max(int(counts[i]), 2)  # a mixture of the samples near it
    counts[owner >= 0] = 1
    # A sample shown by several rows: keep the row with the largest clean bias (its lowest noise), the first on ties.
    strength = torch.where(owner >= 0, clean_bias.abs(), -1.0)
    for sample in torch.unique(owner[owner >= 0]).tolist():
        rows = torch.nonzero(owner == sample).flatten()
        if rows.numel() > 1:
            owner[rows[rows != rows[torch.argmax(strength[rows])]]] = -1
    return owner, counts


def clip_norm_scale(block: ImprintBlock, max_grad_norm: float) -> torch.Tensor:
    """Each bin's ``lambda = C / sqrt(a (||x||^2 + 1))`` for a sample whose whole clipping budget went to the imprint
    (the ``"clip-norm"`` scale; module docstring), float64, ``K``.

    Raises:
        ValueError: for a block that was never calibrated on data (its ``bin_norms_sq`` is ``None``).
    """
    if block.bin_norms_sq is None:
        raise ValueError("the clip-norm scale needs the typical image norm of each bin; calibrate the imprint "
                         "block on data (ImprintBlock.calibrate), or give it reference images "
                         "(ImprintBlock.reference_norms), after setting its edges")
    active = torch.ones(block.bins, dtype=torch.float64)
    if block.structure == "cumulative":
        active = torch.arange(1, block.bins + 1, dtype=torch.float64)  # bin i activates rows 0..i
    return float(max_grad_norm) / torch.sqrt(active * (block.bin_norms_sq.double().cpu() + 1.0))


def recover_images(
    captured: CapturedGradients,
    block: ImprintBlock,
    *,
    scale: str = "oracle",
    originals: torch.Tensor | None = None,
    input_mean: Sequence[float] | float | None = None,
    input_std: Sequence[float] | float | None = None,
    detection_threshold: float = 4.0,
) -> RecoveredImages:
    """Recover one image per singly-occupied bin.

    Args:
        captured: the step's captured gradients.
        block: the imprint block that produced them (for its bins, measurement and structure).
        scale: one of ``SCALES``.
        originals: the step's batch as the model saw it (model-input space). When given, each bin's samples are
            those whose measurement falls in it, collisions are known and each image is matched to its sample;
            with the clean sums captured too, each match is checked against the bin's clean ratio, which shows the
            sample the float32 rows really put there (see ``_attribute_bins``). Otherwise occupied bins are
            detected from the bias gradient.
        input_mean / input_std: the model's input normalisation, to map images and noise back to pixel space.
        detection_threshold: without originals, a bin counts as occupied when its bias gradient exceeds this
            many noise stds (or is non-zero, when the clean sum is known).

    Raises:
        ValueError: for an unknown scale, missing clean sums with the oracle, a missing clipping norm or an
            uncalibrated block with the clip-norm scale, or mismatched shapes.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if scale == "oracle" and captured.clean_bias is None:
        raise ValueError("the oracle scale needs the clean clipped sums; capture with keep_clean=True")
    if scale == "clip-norm" and captured.max_grad_norm is None:
        raise ValueError("the clip-norm scale needs the step's clipping norm; pass captured gradients that carry "
                         "max_grad_norm (GradientCapture records it)")
    bins = block.bins
    if captured.weight.shape != (bins, math.prod(block.image_shape)):
        raise ValueError(f"captured weight gradient has shape {tuple(captured.weight.shape)}, the block expects "
                         f"({bins}, {math.prod(block.image_shape)})")
    structure = block.structure
    weight = _per_bin(captured.weight.double(), structure)
    bias = _per_bin(captured.bias.double(), structure)
    clean_bias = None if captured.clean_bias is None else _per_bin(captured.clean_bias.double(), structure)
    coordinate_std = torch.full((bins,), captured.coordinate_noise_std, dtype=torch.float64)
    if structure == "cumulative":
        coordinate_std[:-1] *= math.sqrt(2.0)  # the difference of two independently noised rows

    if originals is not None:
        if tuple(originals.shape[1:]) != block.image_shape:
            raise ValueError(f"originals have shape {tuple(originals.shape)}, the block expects N×{block.image_shape}")
        originals = originals.detach().cpu()
        measured = block.measure(originals)
        assignment = block.bins_of(measured)
        if clean_bias is not None:
            owner, counts = _attribute_bins(_per_bin(captured.clean_weight, structure).cpu(),
                                            _per_bin(captured.clean_bias, structure).cpu(), originals.flatten(1),
                                            assignment, block.settled(measured))
        else:
            owner, counts = _owners_by_measurement(assignment, bins)
        occupied = owner >= 0
        collisions = torch.nonzero(counts > 1).flatten()
    else:
        counts = None
        collisions = torch.zeros(0, dtype=torch.long)
        owner = torch.full((bins,), -1, dtype=torch.long)
        if clean_bias is not None:
            occupied = clean_bias.cpu() != 0
        else:
            occupied = bias.abs().cpu() > detection_threshold * coordinate_std

    if scale == "oracle":
        lam = clean_bias
    elif scale == "noisy-bias":
        lam = bias
    elif scale == "clip-norm":
        lam = clip_norm_scale(block, captured.max_grad_norm)
    else:
        centres = ((block.edges[:-1] + block.edges[1:]) / 2).double().to(weight.device)
        lam = (weight @ block.measurement.double().to(weight.device)) / centres
    lam = lam.cpu()
    occupied &= lam != 0
    index = torch.nonzero(occupied).flatten()
    images = (weight.cpu()[index] / lam[index, None]).float().view(-1, *block.image_shape)
    noise_std = (coordinate_std[index] / lam[index].abs()).double()

    if input_std is not None or input_mean is not None:
        mean = 0.0 if input_mean is None else input_mean
        std = 1.0 if input_std is None else input_std
        images = denormalize(images, mean=mean, std=std)
        std_t = torch.as_tensor(std, dtype=torch.float64).reshape(-1)
        noise_std = noise_std * float(std_t.pow(2).mean().sqrt())  # RMS over channels: one level per image
    return RecoveredImages(
        images=images,
        noise_std=noise_std,
        bins=index,
        sample_index=owner[index],
        bin_counts=counts,
        collisions=collisions,
        scale=scale,
    )
