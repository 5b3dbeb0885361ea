"""Images in and out: loading, adapting to a prior's resolution and channels, undoing normalisation.

Every loader returns a float32 tensor ``N×C×H×W`` with values in ``[0, 1]``; that is the pixel space all
noise levels in this package are expressed in.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ImageLoadError",
    "FASHION_MNIST_DIR",
    "fashion_mnist_path",
    "load_images",
    "sample_image",
    "read_idx",
    "Adaptation",
    "adapt_to_prior",
    "restore_from_prior",
    "denormalize",
    "to_grayscale",
    "to_rgb",
]

FASHION_MNIST_DIR = Path(os.environ.get("OPACUS_DMAUDIT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
"""Where Debian's ``dataset-fashion-mnist`` package puts the IDX files (overridable by environment)."""

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# torchvision's folders of the CIFAR datasets, the usual DP-SGD benchmarks, and their torchvision classes.
_CIFAR_FOLDERS = {"cifar-10-batches-py": "CIFAR10", "cifar-100-python": "CIFAR100"}
_SPLITS = ("train", "test")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class ImageLoadError(ValueError):
    """Raised when an image source cannot be read; the message names the source and the fix."""


def fashion_mnist_path(split: str = "test") -> Path:
    """Path of the Fashion-MNIST images of ``split`` ("train" or "test") from Debian's package.

    Raises:
        ImageLoadError: if the split is unknown or the package is not installed.
    """
    names = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}
    if split not in names:
        raise ImageLoadError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    path = FASHION_MNIST_DIR / names[split]
    if not path.is_file():
        raise ImageLoadError(
            f"Fashion-MNIST not found at {path}; install it with `apt-get install dataset-fashion-mnist` "
            "or set OPACUS_DMAUDIT_FASHION_MNIST to the folder holding the IDX files"
        )
    return path


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not, into a numpy array.

    Raises:
        ImageLoadError: if the file is missing, truncated or not IDX.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise ImageLoadError(f"image file not found: {path}") from None
    except (OSError, EOFError) as exc:
        raise ImageLoadError(f"cannot read {path} as an IDX file ({exc}); is it a complete download?") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ImageLoadError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ImageLoadError(f"{path} is truncated: its IDX header is incomplete")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ImageLoadError(
            f"{path} is truncated or corrupt: header promises shape {shape} ({expected} bytes), "
            f"file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).copy()


def _array_to_images(array: np.ndarray | torch.Tensor, *, source: str) -> torch.Tensor:
    """Turn N×H×W, N×H×W×C or N×C×H×W arrays (uint8 or float) into float N×C×H×W in [0, 1]."""
    tensor = torch.as_tensor(np.asarray(array) if not isinstance(array, torch.Tensor) else array)
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim == 3:
        tensor = tensor[:, None]
    if tensor.ndim != 4:
        raise ImageLoadError(f"{source}: expected images shaped N×H×W or N×C×H×W, got shape {tuple(tensor.shape)}")
    if tensor.shape[1] not in (1, 3) and tensor.shape[-1] in (1, 3):
        tensor = tensor.permute(0, 3, 1, 2)  # channels-last arrays, as image libraries write them
    if tensor.shape[1] not in (1, 3):
        raise ImageLoadError(f"{source}: images need 1 or 3 channels, got shape {tuple(tensor.shape)}")
    if tensor.dtype == torch.uint8:
        return tensor.float().div_(255.0).contiguous()
    tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise ImageLoadError(f"{source}: images contain NaN or infinite values")
    low, high = float(tensor.min()), float(tensor.max())
    if low < 0.0 or high > 1.0:
        if low >= 0.0 and high <= 255.0:
            return (tensor / 255.0).contiguous()
        raise ImageLoadError(
            f"{source}: float images must lie in [0, 1] (or [0, 255]); found values in [{low:.3g}, {high:.3g}]. "
            "Undo the normalisation first (opacus_dmaudit.data.denormalize)"
        )
    return tensor.contiguous()


def _load_folder(folder: Path) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise ImageLoadError(f"{folder} holds no image files ({', '.join(sorted(_IMAGE_SUFFIXES))})")
    arrays = []
    for file in files:
        try:
            with Image.open(file) as img:
                arrays.append(np.asarray(img.convert("RGB" if img.mode not in ("L", "I;16") else "L")))
        except (UnidentifiedImageError, OSError) as exc:
            raise ImageLoadError(f"cannot read image {file}: {exc}") from None
    if any(a.ndim == 3 for a in arrays):
        # Colour folders often hold a few grayscale files (ImageNet does): gray to RGB loses nothing.
        arrays = [np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a for a in arrays]
    sizes = sorted({a.shape[:2] for a in arrays})
    if len(sizes) > 1:
        raise ImageLoadError(f"images in {folder} differ in size ({', '.join(f'{h}x{w}' for h, w in sizes[:3])}"
                             f"{', ...' if len(sizes) > 3 else ''}); resize them to one size")
    return _array_to_images(np.stack(arrays), source=str(folder))


def _cifar_folder(path: Path) -> tuple[str, Path] | None:
    """``(torchvision class, folder)`` when ``path`` is torchvision's CIFAR-10 / CIFAR-100 folder or the root above."""
    for folder, name in _CIFAR_FOLDERS.items():
        if path.name == folder:
            return name, path
        if (path / folder).is_dir():
            return name, path / folder
    return None


def _load_cifar(name: str, folder: Path, *, split: str, allow_pickle: bool) -> torch.Tensor:
    """A CIFAR split read by torchvision (its md5 check included), ``download=False``: nothing is fetched."""
    if not allow_pickle:
        raise ImageLoadError(
            f"{folder} is torchvision's {name} folder, whose batches are Python pickles, and reading a pickle can "
            "run code: pass allow_pickle=True to load_images (CLI: --allow-pickle) if you trust these files, or save "
            "the images as .npy first")
    import torchvision

    root = folder.parent
    try:
        dataset = getattr(torchvision.datasets, name)(str(root), train=split == "train", download=False)
    except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted."
        raise ImageLoadError(f"torchvision could not read {name} under {root} ({exc}); download it there once "
                             f"(torchvision.datasets.{name}(root, download=True)) where there is network") from None
    return _array_to_images(dataset.data, source=f"{name} {split} split")  # N×32×32×3 uint8


def load_images(
    source: str | os.PathLike | torch.utils.data.Dataset | np.ndarray | torch.Tensor,
    *,
    limit: int | None = None,
    allow_pickle: bool = False,
) -> torch.Tensor:
    """Load images as a float tensor ``N×C×H×W`` in ``[0, 1]``, in file order.

    Args:
        source: an IDX file (``.gz`` or not), a ``.npy``/``.npz`` array, a folder of image files, a single
            image file, ``"fashion-mnist"`` / ``"fashion-mnist:train"`` for the embedded default data,
            torchvision's CIFAR-10 / CIFAR-100 folder (``cifar-10-batches-py``, ``cifar-100-python``, or the root
            above it; the test split, or ``PATH:train``), a torch ``Dataset`` whose items are images,
            ``(image, label)`` pairs or dicts with one C×H×W image tensor, or an array.
        limit: keep only the first ``limit`` images.
        allow_pickle: read CIFAR's batches, which are Python pickles (reading one can run code): for files you
            trust.

    Raises:
        ImageLoadError: for missing, corrupt or wrongly shaped sources.
    """
    if limit is not None and limit < 1:
        raise ImageLoadError(f"limit must be a positive number of images, got {limit}")
    if isinstance(source, (np.ndarray, torch.Tensor)):
        images = _array_to_images(source, source="array")
    elif isinstance(source, torch.utils.data.Dataset):
        images = _load_dataset(source, limit=limit)
    else:
        text = str(source)
        split = None  # of a source with splits, named as PATH:train / PATH:test
        if text.startswith("fashion-mnist"):
            source = fashion_mnist_path(text.partition(":")[2] or "test")
        elif text.rpartition(":")[2] in _SPLITS and not Path(text).exists():
            source, _, split = text.rpartition(":")
        path = Path(source)
        if not path.exists():
            raise ImageLoadError(f"image source not found: {path}")
        cifar = _cifar_folder(path) if path.is_dir() else None
        if cifar is not None:
            images = _load_cifar(*cifar, split=split or "test", allow_pickle=allow_pickle)
        elif split is not None:
            raise ImageLoadError(f"{path} has no splits: ':{split}' is for fashion-mnist and torchvision's CIFAR "
                                 "folders; pass the path alone")
        elif path.is_dir():
            images = _load_folder(path)
        elif path.suffix == ".npy":
            images = _array_to_images(_load_numpy(path), source=str(path))
        elif path.suffix == ".npz":
            archive = _load_numpy(path)
            if not archive.files:
                raise ImageLoadError(f"{path} holds no arrays")
            key = "images" if "images" in archive.files else ("x" if "x" in archive.files else archive.files[0])
            images = _array_to_images(archive[key], source=f"{path}[{key}]")
        elif path.suffix.lower() in _IMAGE_SUFFIXES:
            images = _load_single_image(path)
        else:
            images = _array_to_images(read_idx(path), source=str(path))
    if images.shape[0] == 0:
        raise ImageLoadError(f"{source}: holds no images")
    return images[:limit] if limit is not None else images


def _load_numpy(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ImageLoadError(f"cannot read {path} as a numpy array ({exc})") from None


def _load_single_image(path: Path) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB" if img.mode not in ("L", "I;16") else "L"))
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageLoadError(f"cannot read image {path}: {exc}") from None
    return _array_to_images(array[None], source=str(path))


def sample_image(item: Any) -> Any:
    """The image of one dataset sample: the sample itself, the first element of a (image, label) pair, or the only
    C×H×W tensor of a dict sample (Hugging Face style ``{"pixel_values": ..., "labels": ...}``)."""
    if isinstance(item, (tuple, list)):
        return item[0]
    if isinstance(item, Mapping):
        images = [value for value in item.values() if isinstance(value, torch.Tensor) and value.ndim == 3]
        if len(images) != 1:
            raise ValueError(f"a dict sample needs exactly one C×H×W image tensor, found {len(images)} among keys "
                             f"{', '.join(map(repr, item))}")
        return images[0]
    return item


def _load_dataset(dataset: torch.utils.data.Dataset, *, limit: int | None) -> torch.Tensor:
    try:
        count = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise ImageLoadError("the Dataset must define __len__") from None
    count = count if limit is None else min(count, limit)
    items = []
    for index in range(count):
        try:
            item = sample_image(dataset[index])
        except ValueError as exc:  # a dict sample without its one image tensor
            raise ImageLoadError(f"{type(dataset).__name__}[{index}]: {exc}") from None
        items.append(item if isinstance(item, torch.Tensor) else torch.as_tensor(np.asarray(item)))  # PIL images too
    if not items:
        raise ImageLoadError("the Dataset is empty")
    stacked = torch.stack(items)
    if stacked.ndim == 4 and stacked.shape[-1] in (1, 3) and stacked.shape[1] not in (1, 3):
        stacked = stacked.permute(0, 3, 1, 2)
    return _array_to_images(stacked, source=type(dataset).__name__)


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of RGB images (the weights PIL uses); gray images pass through."""
    if images.shape[1] == 1:
        return images
    weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """Repeat a gray channel three times; RGB images pass through."""
    return images if images.shape[1] == 3 else images.expand(-1, 3, -1, -1).contiguous()


@dataclass(frozen=True)
class Adaptation:
    """How images were mapped onto a prior's grid, so the mapping can be undone and reported.

    Attributes:
        original_size: (H, W) of the images before adaptation.
        original_channels: channel count before adaptation.
        prior_size: the prior's square resolution.
        prior_channels: the prior's channel count.
        spatial: "none", "pad" (centred, filled with ``pad_value``) or "resize" (bilinear, antialiased).
        channel: "none", "gray->rgb" or "rgb->gray".
        padding: (left, right, top, bottom) pixels added when ``spatial == "pad"``.
        pad_value: the pixel value of padded borders (0 is black, what the shipped prior was trained with).
        noise_gain: factor by which per-pixel noise std changes under the adaptation (1 for pad and
            gray->rgb; measured on white noise otherwise), so the timestep match uses the right level.
    """

    original_size: tuple[int, int]
    original_channels: int
    prior_size: int
    prior_channels: int
    spatial: str
    channel: str
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    pad_value: float = 0.0
    noise_gain: float = 1.0

    def describe(self) -> str:
        parts = []
        if self.spatial == "pad":
            parts.append(f"padded {self.original_size[0]}x{self.original_size[1]} to {self.prior_size}x{self.prior_size}")
        elif self.spatial == "resize":
            parts.append(f"resized {self.original_size[0]}x{self.original_size[1]} to {self.prior_size}x{self.prior_size}")
        if self.channel != "none":
            parts.append(self.channel)
        return ", ".join(parts) or "none"

    def loss_note(self) -> str | None:
        """What this adaptation loses for good (``None`` when nothing): the reconstructions cannot hold it, so every
        score against the originals is capped, whatever the noise."""
        lost = []
        if self.channel == "rgb->gray":
            lost.append("colour (the prior has 1 channel, the images 3)")
        if self.spatial == "resize":
            # Either way: resampling up and back down blurs too (28x28 via 64x64: PSNR 24 dB with no noise at all).
            height, width = self.original_size
            lost.append(f"detail (the images are resized from {height}x{width} to the prior's "
                        f"{self.prior_size}x{self.prior_size} and back)")
        if not lost:
            return None
        return (f"reconstructions lose {' and '.join(lost)}, which caps their scores even without noise; a prior "
                "trained on images like these avoids that (opacus-dmaudit train-prior)")


def _map_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    return to_rgb(images) if channels == 3 else to_grayscale(images)


def _resize(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    size = (size, size) if isinstance(size, int) else size
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


def adapt_to_prior(
    images: torch.Tensor,
    *,
    resolution: int,
    channels: int,
    spatial: str = "auto",
    pad_value: float = 0.0,
) -> tuple[torch.Tensor, Adaptation]:
    """Map images onto a prior's square grid and channel count.

    Args:
        images: ``N×C×H×W`` in ``[0, 1]``.
        resolution: the prior's side length.
        channels: the prior's channel count (1 or 3).
        spatial: "auto" pads when the images fit inside the grid by at most a quarter of its side (the way
            28×28 MNIST-like data is padded to 32×32), and resizes otherwise; or force "pad" / "resize".
        pad_value: fill value of padded borders, in pixel units.

    Returns:
        The adapted images and an :class:`Adaptation` that :func:`restore_from_prior` undoes.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be N×C×H×W with 1 or 3 channels, got shape {tuple(images.shape)}")
    if channels not in (1, 3):
        raise ValueError(f"prior channels must be 1 or 3, got {channels}")
    if spatial not in ("auto", "pad", "resize"):
        raise ValueError(f"spatial must be 'auto', 'pad' or 'resize', got {spatial!r}")
    height, width = images.shape[-2:]
    channel = "none" if images.shape[1] == channels else ("gray->rgb" if channels == 3 else "rgb->gray")
    adapted = _map_channels(images, channels)
    fits = height <= resolution and width <= resolution
    if spatial == "auto":
        spatial = "pad" if fits and min(height, width) * 4 >= resolution * 3 else "resize"
    if (height, width) == (resolution, resolution):
        spatial = "none"
    padding = (0, 0, 0, 0)
    if spatial == "pad":
        if not fits:
            raise ValueError(f"cannot pad {height}x{width} images into a {resolution}x{resolution} prior; use resize")
        top, left = (resolution - height) // 2, (resolution - width) // 2
        padding = (left, resolution - width - left, top, resolution - height - top)
        adapted = F.pad(adapted, padding, value=pad_value)
    elif spatial == "resize":
        adapted = _resize(adapted, resolution)
    gain = 1.0
    if spatial == "resize" or channel == "rgb->gray":
        # Measure rather than derive: antialiased resampling and luma weights shrink white noise by amounts
        # that depend on the scale factor, and t* must match the noise the prior actually sees.
        probe = torch.randn((16, images.shape[1], height, width), generator=torch.Generator().manual_seed(0),
                            dtype=torch.float32)
        mapped = _map_channels(probe, channels)
        if spatial == "resize":
            mapped = _resize(mapped, resolution)
        gain = float(mapped.std())
    adaptation = Adaptation(original_size=(height, width), original_channels=images.shape[1], prior_size=resolution,
                            prior_channels=channels, spatial=spatial, channel=channel, padding=padding,
                            pad_value=pad_value, noise_gain=gain)
    return adapted, adaptation


def restore_from_prior(images: torch.Tensor, adaptation: Adaptation) -> torch.Tensor:
    """Undo :func:`adapt_to_prior`: crop or resize back, and map channels back."""
    if adaptation.spatial == "pad":
        left, right, top, bottom = adaptation.padding
        images = images[..., top : images.shape[-2] - bottom, left : images.shape[-1] - right]
    elif adaptation.spatial == "resize":
        images = _resize(images, adaptation.original_size)
    return _map_channels(images, adaptation.original_channels)


def denormalize(
    images: torch.Tensor, *, mean: Sequence[float] | float, std: Sequence[float] | float
) -> torch.Tensor:
    """Map model inputs normalised as ``(x - mean) / std`` back to pixel space ``[0, 1]`` (not clamped).

    Raises:
        ValueError: if a std is not positive or the lengths do not match the channels.
    """
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).reshape(-1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).reshape(-1)
    if (std_t <= 0).any():
        raise ValueError(f"normalisation std must be positive, got {std_t.tolist()}")
    channels = images.shape[-3]
    for name, value in (("mean", mean_t), ("std", std_t)):
        if value.numel() not in (1, channels):
            raise ValueError(f"normalisation {name} has {value.numel()} values for {channels} channels")
    shape = (-1, 1, 1)
    return images * std_t.view(shape) + mean_t.view(shape)
