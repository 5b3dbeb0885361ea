"""The imprint block: a linear binning layer that makes single training images readable from one layer's gradient.

Fowl et al. 2022, "Robbing the Fed". A linear layer ``d -> K`` whose rows share one measurement vector ``w``
(scaled per row), with biases at thresholds ``tau_1 < ... < tau_K`` calibrated from data quantiles, so that each
sample activates rows according to its measurement ``w . x``. For a sample ``j`` alone in bin ``i``:
``dL_j/dW_i = delta_ij x_j`` and ``dL_j/db_i = delta_ij``, so ``row gradient / bias gradient = x_j``.

Two bin structures:

* ``"sparse"`` (default): row ``i`` is ``clamp((w.x - tau_i) / width_i, 0, 1)``. Only the row whose interval holds
  the sample has a non-zero derivative, so each sample spends its whole clipping budget on one row and the
  ratio needs no difference of rows.
* ``"cumulative"``: row ``i`` is ``relu(w.x - tau_i)``; a sample activates every row below its measurement and bin
  ``i`` is the difference of rows ``i`` and ``i + 1`` (noise grows by sqrt(2), and the sample's gradient norm is
  spread over all active rows).

Read-out: the block returns ``x + gain * (r - stopgrad(r))`` with ``r = mean_i a_i`` broadcast over the image. Its
value is exactly ``x``, so the downstream model trains on unchanged inputs, while the backward pass carries
``gain * sum_k dL/dx'_k / K`` into every active row. Opacus clips and noises these per-sample gradients like any
others (the DP mechanism is unchanged); the gain only decides how much of each sample's clipping budget the imprint
rows take, and so how close the recovered noise gets to the floor ``sigma * sqrt(||x||^2 + 1)``. Equal read-out
weights give every row the same ``delta``, which is what makes cumulative differences exact.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["ImprintBlock", "ImprintedModel", "cuda_matmul_allows_tf32", "image_argument", "measurement_vector",
           "MEASUREMENTS", "tf32_rows_note"]

MEASUREMENTS = ("brightness", "random", "dct")

MEASURE_CHUNK_PIXELS = 1 << 18  # float64 copies of at most this many pixels at a time (2 MiB: ×5 faster than 128)
# How far the rows' float32 rounding can move a measurement, in float32 ulps of the largest one: at most 6.3 measured
# (every row of 2,000 Fashion-MNIST images, and of 512 3×64×64 ones, against float64).
ROW_ROUNDING_ULPS = 8
# The reference images nearest a bin's centre whose median norm the clip-norm attacker expects of the bin's sample:
# about a bin's worth at DMAuditor's defaults (1,024 calibration images, 64 bins), and a smooth estimate where the
# bins outnumber the images.
NORM_NEIGHBOURS = 16


def image_argument(args: tuple, kwargs: dict) -> int | str | None:
    """Where a model's forward call has its image batch, as a position in ``args`` or a name in ``kwargs``.

    The first positional argument when it is a floating-point ``N×C×H×W`` tensor; else the only such tensor among all
    arguments (Hugging Face style ``model(pixel_values=x, labels=y)``, or ``model(token_ids, images)``); else, so that
    a caller can name what is wrong with it, the first positional argument when it is a tensor at all, or the only
    tensor keyword argument. ``None`` when there is none of these.
    """
    def is_image_batch(value) -> bool:
        return isinstance(value, torch.Tensor) and value.ndim == 4 and value.is_floating_point()

    if args and is_image_batch(args[0]):
        return 0
    batches = [i for i, value in enumerate(args) if is_image_batch(value)]
    batches += [name for name, value in kwargs.items() if is_image_batch(value)]
    if len(batches) == 1:
        return batches[0]
    if args:
        return 0 if isinstance(args[0], torch.Tensor) else None
    names = [name for name, value in kwargs.items() if isinstance(value, torch.Tensor)]
    return names[0] if len(names) == 1 else None


def row_rounding(largest_measurement: float) -> float:
    """How far the imprint rows' float32 rounding can move a measurement: ``ROW_ROUNDING_ULPS`` float32 ulps of the
    largest one (more under TF32, where only the clean ratio check in recovery tells)."""
    return ROW_ROUNDING_ULPS * torch.finfo(torch.float32).eps * abs(largest_measurement)


def cuda_matmul_allows_tf32() -> bool:
    """Whether float32 matrix products on CUDA may run in TF32, by whichever of torch's APIs it was set: the generic
    ``torch.backends.fp32_precision`` that ``"none"`` inherits, ``torch.backends.cuda.matmul.fp32_precision``
    (torch >= 2.9), or ``allow_tf32`` and ``torch.set_float32_matmul_precision`` before it. False where torch
    refuses to answer (it does once the legacy and new APIs were mixed)."""
    matmul = torch.backends.cuda.matmul
    try:
        precision = getattr(matmul, "fp32_precision", None)
        if precision is None:
            return bool(matmul.allow_tf32)
        if precision == "none":
            precision = getattr(torch.backends, "fp32_precision", "none")
        return precision == "tf32"
    except RuntimeError:
        return False


def tf32_rows_note(device: torch.device | str) -> str | None:
    """What TF32 costs an inline audit whose imprint rows compute on ``device``, or ``None`` where they compute in
    float32 (any device but CUDA, or CUDA with TF32 off, torch's default)."""
    if torch.device(device).type != "cuda" or not cuda_matmul_allows_tf32():
        return None
    return ("float32 matrix products on the GPU run in TF32 here (torch.set_float32_matmul_precision('high') or "
            "torch.backends.cuda.matmul), so the imprint rows read each image's measurement to 10 mantissa bits and "
            "move images near a bin's edge into a neighbouring row, both or neither; those that then share a row, "
            "or are in none, are lost to the audit, never scored as another image (emulated on Fashion-MNIST, bins "
            "calibrated on 1,024 training images: 1.1% of test images moved at 64 bins, 8.7% at 512, against 0.02% "
            "and 0.03% in float32); for the full audit, "
            "torch.set_float32_matmul_precision('highest') while auditing, or mode='shadow' (its step runs on the CPU)")


def _off_measured_values(edges: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``edges``, each one that lies within the float32 rows' rounding of one of ``values`` moved to the middle of the
    first gap above it wider than that rounding.

    On such an edge the rows' rounding, not the measurement, decides the image's bin, and a quantile of tied values
    (8-bit images share brightnesses) is one of them: with edges at the quantiles of 4,000 Fashion-MNIST images, the
    rows put 22 of them in another bin at 512 bins. Only those edges move: the middle of a gap between 8-bit
    measurements can be where an unseen image's lies (moving every edge put 28 of 9,728 unseen test images in another
    row, against 3, at 512 bins calibrated on 1,024 training images).
    """
    ordered = torch.sort(values).values
    resolution = row_rounding(float(ordered.abs().max()))
    below = torch.searchsorted(ordered, edges).clamp(1, ordered.numel() - 1)
    on_value = torch.minimum((ordered[below] - edges).abs(), (ordered[below - 1] - edges).abs()) <= resolution
    gaps = torch.nonzero(ordered.diff() > resolution).flatten()  # between ordered[g] and ordered[g + 1]
    gap = torch.searchsorted(ordered[gaps + 1], edges, right=True)  # the first gap that ends above the edge
    move = on_value & (gap < gaps.numel())
    moved = edges.clone()
    moved[move] = (ordered[gaps[gap[move]]] + ordered[gaps[gap[move]] + 1]) / 2
    return moved


def _per_image(images: torch.Tensor, reduce) -> torch.Tensor:
    """``reduce`` of each image's float64 pixels (``rows: n×d -> n``), a quarter million pixels at a time so that a
    large batch is never copied whole in float64."""
    flat = images.flatten(1)
    rows = max(1, MEASURE_CHUNK_PIXELS // max(1, flat.shape[1]))
    return torch.cat([reduce(flat[i:i + rows].double()) for i in range(0, flat.shape[0], rows)]
                     or [flat.new_zeros(0, dtype=torch.float64)])


def measurement_vector(kind: str | torch.Tensor, *, image_shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """The shared measurement vector ``w`` (length ``C*H*W``), scaled to unit norm.

    Args:
        kind: "brightness" (mean intensity), "random" (a Gaussian random projection), "dct" (the lowest
            horizontal DCT-II mode: left-right brightness difference), or a tensor of ``C*H*W`` values.
    """
    channels, height, width = image_shape
    size = channels * height * width
    if isinstance(kind, torch.Tensor):
        vector = kind.detach().float().reshape(-1)
        if vector.numel() != size:
            raise ValueError(f"measurement vector has {vector.numel()} values, images have {size} pixels")
    elif kind == "brightness":
        vector = torch.ones(size, dtype=torch.float32)
    elif kind == "random":
        vector = torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    elif kind == "dct":
        columns = torch.arange(width, dtype=torch.float64)
        mode = torch.cos(torch.pi * (columns + 0.5) / width)
        vector = mode.view(1, 1, width).expand(channels, height, width).reshape(-1).float()
    else:
        raise ValueError(f"unknown measurement {kind!r}; choose from {', '.join(MEASUREMENTS)} or pass a tensor")
    norm = vector.norm()
    if not norm > 0:
        raise ValueError("measurement vector must not be zero")
    return vector / norm


class ImprintBlock(nn.Module):
    """Linear binning block placed in front of an image model.

    Args:
        image_shape: ``(C, H, W)`` of the model's input.
        bins: number of bins K.
        structure: "sparse" or "cumulative" (see the module docstring).
        measurement: see :func:`measurement_vector`.
        gain: scale of the gradient that reaches the imprint rows (their share of each sample's clipping budget).
        seed: seed of a random measurement vector.

    Attributes:
        imprint: the ``nn.Linear(C*H*W, K)`` whose gradients leak the images.
        edges: ``K + 1`` bin edges in measurement units (bin ``i`` is ``[edges[i], edges[i+1])``).
        bin_norms_sq: after :meth:`calibrate` or :meth:`reference_norms`, what an attacker who knows the data
            distribution expects of the squared norm ``||x||^2`` of a sample found in each bin (float64, ``K``), for
            recovery's ``"clip-norm"`` scale; else ``None``. A plain attribute, not a buffer, so that the state
            dicts of models holding the block keep their keys.
    """

    def __init__(
        self,
        *,
        image_shape: Sequence[int],
        bins: int = 64,
        structure: str = "sparse",
        measurement: str | torch.Tensor = "brightness",
        gain: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        if bins < 1:
            raise ValueError(f"bins must be positive, got {bins}")
        if structure not in ("sparse", "cumulative"):
            raise ValueError(f"structure must be 'sparse' or 'cumulative', got {structure!r}")
        if not gain > 0:
            raise ValueError(f"gain must be positive, got {gain}")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.bins = bins
        self.structure = structure
        self.gain = float(gain)
        size = self.image_shape[0] * self.image_shape[1] * self.image_shape[2]
        # skip_init: the parameters are set below, and drawing them would move the caller's global RNG. float32
        # whatever torch's default dtype (a process-wide setting of the user's; inline mode follows a float64 model).
        self.imprint = nn.utils.skip_init(nn.Linear, size, bins, dtype=torch.float32)
        self.register_buffer("measurement", measurement_vector(measurement, image_shape=self.image_shape, seed=seed))
        # Until calibrated, bins split the range a unit-norm measurement of [0, 1] images can take.
        top = float(self.measurement.clamp(min=0).sum())
        bottom = float(self.measurement.clamp(max=0).sum())
        self.register_buffer("edges", torch.linspace(bottom, top, bins + 1, dtype=torch.float32))
        self.bin_norms_sq: torch.Tensor | None = None
        self._set_parameters()

    @property
    def widths(self) -> torch.Tensor:
        return self.edges[1:] - self.edges[:-1]

    @torch.no_grad()
    def _set_parameters(self) -> None:
        w = self.measurement.to(self.imprint.weight)
        edges = self.edges.to(self.imprint.weight)
        if self.structure == "sparse":
            scale = 1.0 / (edges[1:] - edges[:-1])
            self.imprint.weight.copy_(scale[:, None] * w[None, :])
            self.imprint.bias.copy_(-edges[:-1] * scale)
        else:
            self.imprint.weight.copy_(w.expand(self.bins, -1))
            self.imprint.bias.copy_(-edges[:-1])

    @torch.no_grad()
    def set_edges(self, edges: torch.Tensor) -> "ImprintBlock":
        """Use these ``K + 1`` strictly increasing bin edges (in measurement units)."""
        edges = torch.as_tensor(edges).reshape(-1)
        if edges.numel() != self.bins + 1 or not bool((edges[1:] > edges[:-1]).all()):
            raise ValueError(f"edges must be {self.bins + 1} strictly increasing values, got {edges.numel()}")
        self.edges.copy_(edges.to(self.edges))
        self.bin_norms_sq = None  # the calibration's statistics were for the old bins
        self._set_parameters()
        return self

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor, *, margin: float = 0.5) -> "ImprintBlock":
        """Set bin edges at the quantiles of the measurement over a data sample (equal-mass bins).

        Args:
            images: ``N×C×H×W`` sample of model inputs (in the same space the model sees, normalised or not).
            margin: outermost bins extend by this fraction of their neighbour's width, for unseen extremes.
        """
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"calibration images must be N×{'×'.join(map(str, self.image_shape))}, "
                             f"got {tuple(images.shape)}")
        values = self.measure(images)
        if values.numel() < 2:
            raise ValueError("calibration needs at least two images")
        quantiles = torch.linspace(0, 1, self.bins + 1, dtype=torch.float64)
        edges = torch.quantile(values, quantiles)
        edges[1:-1] = _off_measured_values(edges[1:-1], values)
        # Ties (constant images) would give empty, zero-width bins: keep edges strictly increasing.
        span = float(values.max() - values.min()) or 1.0
        minimum_gap = span * 1e-6
        for i in range(1, edges.numel()):
            edges[i] = torch.maximum(edges[i], edges[i - 1] + minimum_gap)
        edges[0] -= margin * (edges[1] - edges[0]) + minimum_gap
        edges[-1] += margin * (edges[-1] - edges[-2]) + minimum_gap
        self.set_edges(edges)
        return self.reference_norms(images, measured=values)

    @torch.no_grad()
    def reference_norms(self, images: torch.Tensor, *, measured: torch.Tensor | None = None) -> "ImprintBlock":
        """Set :attr:`bin_norms_sq` from reference images: for each bin, the median ``||x||^2`` of the
        ``NORM_NEIGHBOURS`` images whose measurement lies nearest the bin's centre (all of them when fewer).

        :meth:`calibrate` uses its calibration images. Pass images other than those attacked, for an attacker whose
        knowledge of the data does not include its targets.

        Args:
            images: ``N×C×H×W`` model inputs, ``N >= 1``.
            measured: their measurements, when already at hand.
        """
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape or images.shape[0] < 1:
            raise ValueError(f"reference images must be N×{'×'.join(map(str, self.image_shape))} with N >= 1, "
                             f"got {tuple(images.shape)}")
        measured = (self.measure(images) if measured is None else measured).cpu()
        norms_sq = _per_image(images, lambda rows: rows.pow(2).sum(dim=1)).cpu()
        centres = ((self.edges[:-1] + self.edges[1:]) / 2).double().cpu()
        neighbours = min(NORM_NEIGHBOURS, measured.numel())
        chunk = max(1, MEASURE_CHUNK_PIXELS // measured.numel())  # bins × images distances at a time
        nearest = torch.cat([(centres[i:i + chunk, None] - measured[None, :]).abs().topk(
            neighbours, dim=1, largest=False).indices for i in range(0, centres.numel(), chunk)])
        self.bin_norms_sq = norms_sq[nearest].median(dim=1).values
        return self

    def measure(self, images: torch.Tensor) -> torch.Tensor:
        """The measurement ``w . x`` of each image, in float64 (bin edges are placed between measurements that
        float32 would blur)."""
        vector = self.measurement.to(device=images.device, dtype=torch.float64)
        return _per_image(images, lambda rows: rows @ vector)

    def assign_bins(self, images: torch.Tensor) -> torch.Tensor:
        """Bin index of each image (-1 below the first edge, K at or above the last)."""
        return self.bins_of(self.measure(images))

    def bins_of(self, measured: torch.Tensor) -> torch.Tensor:
        """Bin index of each measurement (-1 below the first edge, K at or above the last)."""
        return torch.bucketize(measured, self.edges.double().contiguous(), right=True) - 1

    def settled(self, measured: torch.Tensor) -> torch.Tensor:
        """Whether each measurement's bin is certain: it lies farther from every edge than the float32 rows' rounding
        can move it (:func:`row_rounding`), so the rows put its image in the bin :meth:`bins_of` gives."""
        distance = (measured[:, None] - self.edges.double()[None, :]).abs().min(dim=1).values
        return distance > row_rounding(float(self.edges.abs().max()))

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        # The rows keep their own dtype (float32, float64 beside a float64 model) whatever the model's (bfloat16, or
        # autocast around it): the image is read back from their gradients, and an attacker who plants them would
        # not give up that precision.
        with torch.autocast(x.device.type, enabled=False):
            h = self.imprint(x.flatten(1).to(self.imprint.weight.dtype))
        return h.clamp(0.0, 1.0) if self.structure == "sparse" else torch.relu(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise TypeError(f"the imprint block needs float inputs (its gradient reaches them through a float shift), "
                            f"got {x.dtype}: convert the images to float before the model")
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"the imprint block was made for inputs N×{'×'.join(map(str, self.image_shape))}, got "
                             f"{tuple(x.shape)}: its rows have one weight per pixel, so inline auditing needs one input "
                             "size, the size of the samples it was calibrated on (the data loader's, or "
                             "calibration_images); pass calibration_images=... shaped as the model's inputs when a "
                             "transform between loader and model resizes them, or use mode='shadow' for inputs of "
                             "several sizes")
        level = self.activations(x).mean(dim=1)
        # Zero in value, gain * d(level) in gradient: the model's inputs stay bit-identical.
        shift = self.gain * (level - level.detach())
        return x + shift.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)

    def cpu_copy(self) -> "ImprintBlock":
        """A separate block on the CPU with the same bins and parameters (hooks and wrappers are not copied)."""
        copy = ImprintBlock(image_shape=self.image_shape, bins=self.bins, structure=self.structure,
                            measurement=self.measurement.detach().cpu(), gain=self.gain)
        copy.load_state_dict({k: v.detach().cpu() for k, v in self.state_dict().items()})
        copy.bin_norms_sq = None if self.bin_norms_sq is None else self.bin_norms_sq.clone()
        return copy

    def parameter_snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of the imprint parameters, to restore the calibrated bins after a training step."""
        return {name: p.detach().clone() for name, p in self.imprint.named_parameters()}

    @torch.no_grad()
    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        for name, p in self.imprint.named_parameters():
            p.copy_(snapshot[name])

    def extra_repr(self) -> str:
        return f"image_shape={self.image_shape}, bins={self.bins}, structure={self.structure!r}, gain={self.gain}"


class ImprintedModel(nn.Module):
    """``model(imprint(x))``: an imprint block in front of any image model; the model trains as before.

    Args:
        model: the user's image model.
        imprint: the block; its ``image_shape`` must be the model's input shape.

    Under Opacus's ``make_private(..., wrap_model=False)`` the training loop calls ``model`` itself, never this
    wrapper, which then only holds the block and the model for Opacus's hooks: the block is run by a forward pre-hook
    on ``model`` instead (``imprints_in_model_hook``), so the images pass through it once either way.
    """

    def __init__(self, model: nn.Module, imprint: ImprintBlock) -> None:
        super().__init__()
        self.imprint_block = imprint
        self.model = model
        self.imprints_in_model_hook = False

    def imprint_arguments(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The forward call's arguments with the image batch run through the block (same values, imprinted)."""
        where = image_argument(args, kwargs)
        if where is None:
            raise TypeError("ImprintedModel needs the image batch in the forward call: as its first positional "
                            "argument, its only floating-point N×C×H×W argument, or its only tensor keyword argument")
        if isinstance(where, int):
            return (*args[:where], self.imprint_block(args[where]), *args[where + 1:]), kwargs
        return args, {**kwargs, where: self.imprint_block(kwargs[where])}

    def forward(self, *args, **kwargs):
        if not self.imprints_in_model_hook:
            args, kwargs = self.imprint_arguments(args, kwargs)
        return self.model(*args, **kwargs)
