"""Diffusion priors: loading diffusers DDPM pipelines and denoising from a matched timestep (Algorithm 1).

Schwethelm et al. (TMLR 2025), Algorithm 1: the forward process gives ``x_t / sqrt(abar_t) = x_0 + sigma_t eps``
with ``sigma_t = sqrt((1 - abar_t) / abar_t)``. A noisy image ``x_hat = x_0 + s * eps`` (pixel units, so ``2 s`` on
the model's ``[-1, 1]`` scale) therefore *is* a forward-process sample at the ``t*`` where ``sigma_t* = 2 s``, up to
the factor ``sqrt(abar_t*)``; the reverse process runs from there to 0.

The reverse process is written against ``alphas_cumprod`` directly rather than through ``scheduler.step`` because
every image of a batch may start at its own ``t*`` (each recovered image has its own noise level): the update is
vectorised over per-image timesteps (:mod:`opacus_dmaudit.reverse_process`, which also holds the fast path).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from opacus_dmaudit.data import Adaptation, adapt_to_prior, restore_from_prior
from opacus_dmaudit.reverse_process import FastPathConfig, ReverseProcess, plan_ddim, plan_ddpm

__all__ = [
    "PriorLoadError",
    "HUB_PRIORS",
    "SHIPPED_PRIORS",
    "shipped_prior_path",
    "resolve_device",
    "DiffusionPrior",
    "ReconstructionOutput",
    "default_batch_size",
    "noise_std_to_model_sigma",
    "image_seeds",
]

SHIPPED_DIR = Path(__file__).resolve().parent / "priors"
SHIPPED_PRIORS: dict[str, str] = {"fashion-mnist": "fashion-mnist-32"}
"""Names of priors shipped inside the package, and their folder under ``opacus_dmaudit/priors``."""

HUB_PRIORS: dict[str, tuple[int, int]] = {
    "google/ddpm-cifar10-32": (32, 3),
    "google/ddpm-celebahq-256": (256, 3),
    "google/ddpm-church-256": (256, 3),
    "google/ddpm-bedroom-256": (256, 3),
    "google/ddpm-cat-256": (256, 3),
    "google/ddpm-ema-celebahq-256": (256, 3),
    "google/ddpm-ema-church-256": (256, 3),
    "google/ddpm-ema-bedroom-256": (256, 3),
    "google/ddpm-ema-cat-256": (256, 3),
}
"""Well-known diffusers DDPM pipelines on the Hugging Face hub: ``id -> (resolution, channels)``."""

_OFFLINE_OPTIONS = (
    "offline options: the shipped prior (prior='fashion-mnist'), a local DDPMPipeline folder, "
    "or train one with `opacus-dmaudit train-prior`"
)


class PriorLoadError(ValueError):
    """Raised when a prior cannot be loaded; the message names the cause and the alternatives."""


def shipped_prior_path(name: str) -> Path:
    """Folder of a prior shipped with the package.

    Raises:
        PriorLoadError: if the name is unknown or the package was installed without its prior files.
    """
    if name not in SHIPPED_PRIORS:
        raise PriorLoadError(f"no shipped prior named {name!r}; shipped: {', '.join(SHIPPED_PRIORS)}")
    path = SHIPPED_DIR / SHIPPED_PRIORS[name]
    if not (path / "unet" / "config.json").is_file():
        raise PriorLoadError(f"the shipped prior {name!r} is missing from {path}; reinstall opacus-dmaudit")
    return path


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: the one asked for, once it is known to exist here, or CUDA when available.

    Raises:
        ValueError: naming the fix, for a name torch does not know, or a device this machine lacks (torch's own
            errors come later, and speak of drivers).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {str(device)!r} is not a torch device: use 'cpu', 'cuda' or 'cuda:1' ...") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine "
                             "(torch.cuda.is_available() is False); use device 'cpu', or leave it unset")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA device(s), cuda:0 to "
                             f"cuda:{count - 1}")
    elif resolved.type == "meta":
        raise ValueError(f"device {str(device)!r} holds no data, so nothing can be reconstructed on it: use 'cpu' or "
                         "'cuda', or leave it unset")
    elif resolved.type != "cpu":
        try:
            torch.empty(0, device=resolved)
        except (RuntimeError, AssertionError) as error:  # torch's words for a backend it was built without
            # Its first sentence: torch's words for MPS on Linux run to 60 lines, listing every backend it has.
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0].rstrip(".")
            raise ValueError(f"device {str(device)!r}: torch cannot use it on this machine ({reason}); use 'cpu' or "
                             "'cuda', or leave it unset") from None
    return resolved


def default_batch_size(device: torch.device | str, resolution: int) -> int:
    """Images per UNet call when none is given: 256 on CUDA and 32 on CPU up to 64×64 images, then fewer so that
    activations stay about the size they are at 32 images of 256×256 (CUDA) or 4 (CPU), e.g. 128 at 128×128 on
    CUDA. One forward pass of the google/ddpm-celebahq-256 architecture peaks at about 0.4 GB per image in fp32
    (measured on CPU), so a flat 256 would need about 100 GB there."""
    cap, pixels = (256, 2**21) if torch.device(device).type == "cuda" else (32, 2**18)
    return max(1, min(cap, pixels // resolution**2))


def noise_std_to_model_sigma(noise_std: torch.Tensor | float, *, gain: float = 1.0) -> torch.Tensor:
    """Pixel-space noise std (images in ``[0, 1]``) to the std on the model's ``[-1, 1]`` scale."""
    return 2.0 * gain * torch.as_tensor(noise_std, dtype=torch.float64)


@dataclass
class ReconstructionOutput:
    """What :meth:`DiffusionPrior.reconstruct` returns.

    Attributes:
        images: reconstructions ``N×C×H×W`` in ``[0, 1]`` at the input's size and channels.
        t_start: the matched start timestep ``t*`` of each image.
        noise_std: the pixel-space noise std each image was matched with.
        from_prior: True where the noise exceeded ``sigma_T``: the chain started from pure noise and the
            image is a sample of the prior, not a reconstruction.
        adaptation: how the images were mapped onto the prior's grid.
        sampler: "ddpm" or "ddim".
        steps: reverse steps (DDIM: the ``k`` asked for, though an image with ``t* < k`` takes ``t* + 1`` steps
            of one timestep each; DDPM: the largest ``t* + 1``).
        fast_path: the speed options that ran, e.g. ``"bf16 + channels_last + compile + cuda_graphs"``.
        fallbacks: why a configured speed option was switched off (empty while all run).
        notes: what a reader of the result should know: the fallbacks, what the adaptation loses for good, and
            images that are prior samples.
    """

    images: torch.Tensor
    t_start: torch.Tensor
    noise_std: torch.Tensor
    from_prior: torch.Tensor
    adaptation: Adaptation
    sampler: str
    steps: int
    fast_path: str = ""
    fallbacks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class DiffusionPrior:
    """A pretrained diffusion model used as an image prior to denoise recovered images.

    Args:
        unet: a diffusers ``UNet2DModel`` (or any module with the same call signature returning ``.sample``).
        alphas_cumprod: the noise schedule's ``abar_t``, length T.
        prediction_type: "epsilon", "v_prediction" or "sample".
        name: where the prior came from, for reports.
        device: where to run; defaults to CUDA when available.
        clip_sample: clamp the predicted ``x_0`` to ``[-1, 1]`` at each step (as diffusers' DDPM default).
        fast_path: speed options (bf16, channels_last, torch.compile, CUDA graphs); by default all of them on
            CUDA (channels_last only with compile) and only channels_last on CPU. See
            :class:`~opacus_dmaudit.reverse_process.FastPathConfig`.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        *,
        alphas_cumprod: torch.Tensor,
        prediction_type: str = "epsilon",
        name: str = "prior",
        device: str | torch.device | None = None,
        clip_sample: bool = True,
        fast_path: FastPathConfig | None = None,
    ) -> None:
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        self.device = resolve_device(device)
        with _quiet_diffusers():
            self.unet = unet.to(self.device, dtype=torch.float32).eval().requires_grad_(False)
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float64).cpu()
        self.prediction_type = prediction_type
        self.name = name
        self.clip_sample = clip_sample
        config = getattr(unet, "config", None)
        self.resolution = int(_config_get(config, "sample_size", 32))
        self.channels = int(_config_get(config, "in_channels", 1))
        self.reverse_process = ReverseProcess(self.unet, prediction_type=prediction_type, clip_sample=clip_sample,
                                              channels=self.channels, device=self.device, config=fast_path)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        allow_pickle: bool = False,
        local_files_only: bool | None = None,
        fast_path: FastPathConfig | None = None,
    ) -> "DiffusionPrior":
        """Load a diffusers DDPM-style pipeline (a ``unet`` and a ``scheduler`` with ``alphas_cumprod``).

        Args:
            name_or_path: a shipped prior's name (``"fashion-mnist"``), a local pipeline folder, or a hub id.
            device: where to run.
            allow_pickle: also accept ``.bin`` pickle checkpoints (they can execute code when loaded; only
                for sources you trust). Safetensors only by default.
            local_files_only: never touch the network; defaults to ``HF_HUB_OFFLINE``.
            fast_path: speed options, see :class:`DiffusionPrior`.

        Raises:
            PriorLoadError: with the cause and the alternatives, for anything that is not a loadable prior.
        """
        from diffusers import DDPMScheduler, UNet2DModel

        resolve_device(device)  # a device that is not here fails now, not after the weights are loaded
        text = str(name_or_path)
        source: str | Path
        if text in SHIPPED_PRIORS:
            source = shipped_prior_path(text)
        elif Path(text).exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
            source = Path(text).expanduser()
            if not source.is_dir():
                raise PriorLoadError(f"prior {text!r} not found: no such folder (and not a shipped prior or hub id)")
            if not (source / "unet" / "config.json").is_file():
                raise PriorLoadError(
                    f"{source} is not a DDPM pipeline folder: it has no unet/config.json "
                    "(expected the layout DDPMPipeline.save_pretrained writes)"
                )
        elif "/" in text:
            source = text
        else:
            raise PriorLoadError(
                f"unknown prior {text!r}: give a shipped prior ({', '.join(SHIPPED_PRIORS)}), "
                "a local DDPMPipeline folder, or a hub id like google/ddpm-cifar10-32"
            )
        if local_files_only is None:
            local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        if isinstance(source, str) and not local_files_only and not _hub_reachable():
            # Without this, huggingface_hub retries for about 20 s before failing; the cache still serves.
            local_files_only = True
        kwargs = dict(use_safetensors=None if allow_pickle else True, local_files_only=local_files_only,
                      low_cpu_mem_usage=False, torch_dtype=torch.float32)
        try:
            with _quiet_diffusers():
                unet = UNet2DModel.from_pretrained(source, subfolder="unet", **kwargs)
                scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler",
                                                          local_files_only=local_files_only)
        except Exception as exc:  # diffusers raises OSError, EnvironmentError or hub errors depending on the cause
            raise _explain_load_failure(text, source, exc, allow_pickle=allow_pickle,
                                        offline=local_files_only) from None
        return cls(
            unet,
            alphas_cumprod=scheduler.alphas_cumprod,
            prediction_type=scheduler.config.prediction_type,
            name=text,
            device=device,
            clip_sample=bool(scheduler.config.get("clip_sample", True)),
            fast_path=fast_path,
        )

    # ------------------------------------------------------------------ schedule
    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.numel())

    @property
    def sigmas(self) -> torch.Tensor:
        """``sigma_t = sqrt((1 - abar_t) / abar_t)`` for t = 0 .. T-1 (float64)."""
        return ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    def match_timestep(self, model_sigma: torch.Tensor | float) -> torch.Tensor:
        """``t* = argmin_t |sigma_t - sigma|`` for each noise std on the model's scale."""
        sigma = torch.as_tensor(model_sigma, dtype=torch.float64).reshape(-1, 1)
        return (self.sigmas.reshape(1, -1) - sigma).abs().argmin(dim=1)

    # ------------------------------------------------------------------ reconstruction
    @property
    def default_batch_size(self) -> int:
        """Images per UNet call when none is given (:func:`default_batch_size` of this prior's device and size)."""
        return default_batch_size(self.device, self.resolution)

    @torch.no_grad()
    def reconstruct(
        self,
        noisy_images: torch.Tensor,
        noise_std: torch.Tensor | float,
        *,
        sampler: str = "ddim",
        steps: int = 50,
        seed: int | Sequence[int] | torch.Tensor | None = 0,
        batch_size: int | None = None,
        progress: bool | Callable[[int], None] = False,
        spatial: str = "auto",
    ) -> ReconstructionOutput:
        """Denoise images with the prior (Algorithm 1).

        Args:
            noisy_images: ``N×C×H×W`` noisy images in pixel units (values outside ``[0, 1]`` are expected).
            noise_std: per-pixel noise std in pixel units, one for all or one per image.
            sampler: "ddim" (deterministic, eta = 0, ``steps`` steps from ``t*``) or "ddpm" (ancestral, every
                step from ``t*``).
            steps: DDIM step count.
            seed: seed of the sampler's noise (padding noise, pure-noise starts, DDPM steps), or one seed per image.
                Start noise is drawn per image, so DDIM results do not depend on ``batch_size`` or on which
                images share a batch; DDPM's step noise is seeded per batch by its first image.
            batch_size: images per UNet call; defaults to :attr:`default_batch_size`.
            progress: show a tqdm bar (True) or call this with the number of images finished.
            spatial: how to adapt sizes, see :func:`opacus_dmaudit.data.adapt_to_prior`.

        Returns:
            A :class:`ReconstructionOutput`.

        Raises:
            ValueError: for a bad sampler, step count, shape or a negative / non-finite noise std.
        """
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
        if sampler == "ddim" and steps < 1:
            raise ValueError(f"DDIM needs at least one step, got steps={steps}")
        if noisy_images.ndim != 4:
            raise ValueError(f"noisy_images must be N×C×H×W, got shape {tuple(noisy_images.shape)}")
        count = noisy_images.shape[0]
        std = torch.as_tensor(noise_std, dtype=torch.float64).reshape(-1).cpu()
        if std.numel() == 1:
            std = std.expand(count).clone()
        if std.numel() != count:
            raise ValueError(f"got {std.numel()} noise stds for {count} images")
        if not torch.isfinite(std).all() or (std < 0).any():
            raise ValueError("noise_std must be finite and non-negative")

        adapted, adaptation = adapt_to_prior(
            noisy_images.detach().float().cpu(), resolution=self.resolution, channels=self.channels, spatial=spatial
        )
        model_sigma = noise_std_to_model_sigma(std, gain=adaptation.noise_gain)
        t_start = self.match_timestep(model_sigma)
        from_prior = model_sigma > self.sigmas[-1]
        t_start[from_prior] = self.num_timesteps - 1

        seeds = image_seeds(seed, count)
        batch_size = batch_size or self.default_batch_size
        clean = torch.empty_like(adapted)
        in_flight = None  # the last batch's (index, host copy, copy-done event): its copy overlaps the next batch
        bar = _progress_bar(count, progress)

        def finish(batch) -> None:
            index, host, done = batch
            if done is not None:
                done.synchronize()  # this batch only: the one queued after it keeps the device busy meanwhile
            clean[index] = host
            bar(len(index))

        # Sorting by t* keeps each DDPM batch's moving images a prefix and its chain short.
        order = torch.argsort(t_start, descending=True, stable=True)
        for begin in range(0, count, batch_size):
            index = order[begin : begin + batch_size]
            x_hat = adapted[index] * 2.0 - 1.0
            pure = from_prior[index]
            # Each image's start noise comes from its own seed, so a DDIM result does not depend on the batching;
            # drawn only for the images that need it (padded borders, pure-noise starts).
            needs = torch.ones_like(pure) if adaptation.spatial == "pad" else pure
            pad_noise, start_noise = _per_image_noise(seeds[index], x_hat.shape[1:], needs)
            if adaptation.spatial == "pad":
                # The prior must see noise everywhere: padded borders get noise of the image's own level.
                mask = _pad_mask(x_hat.shape[-2:], adaptation.padding)
                x_hat = torch.where(mask, x_hat, x_hat + model_sigma[index].view(-1, 1, 1, 1).float() * pad_noise)
            t = t_start[index]
            abar = self.alphas_cumprod[t].view(-1, 1, 1, 1).float()
            x_start = abar.sqrt() * x_hat
            x_start[pure] = start_noise[pure]
            if sampler == "ddim":
                plan = plan_ddim(t, steps=steps, alphas_cumprod=self.alphas_cumprod)
            else:
                plan = plan_ddpm(t, alphas_cumprod=self.alphas_cumprod)
            # The reverse process draws its noise where it runs, so DDPM steps on CUDA need no host round trip.
            generator = torch.Generator(device=self.device).manual_seed(int(seeds[index[0]]))
            result = self.reverse_process.run(x_start, plan, generator=generator, batch_size=batch_size).float()
            done = None
            if result.is_cuda:
                # Copied back without blocking, so the host plans the next batch while this one runs.
                host = torch.empty(result.shape, dtype=result.dtype, pin_memory=True)
                host.copy_(result, non_blocking=True)
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(result.device))
            else:
                host = result.cpu()
            if in_flight is not None:
                finish(in_flight)
            in_flight = (index, host, done)
        if in_flight is not None:
            finish(in_flight)
        bar(None)

        images = restore_from_prior(((clean + 1.0) / 2.0).clamp(0.0, 1.0), adaptation)
        fallbacks = list(self.reverse_process.fallbacks)
        lost = adaptation.loss_note()
        notes = fallbacks + ([lost] if lost else [])
        if from_prior.any():
            notes.append(self.prior_sample_note(int(from_prior.sum()), count))
        return ReconstructionOutput(
            images=images,
            t_start=t_start,
            noise_std=std,
            from_prior=from_prior,
            adaptation=adaptation,
            sampler=sampler,
            steps=steps if sampler == "ddim" else int(t_start.max()) + 1,
            fast_path=self.reverse_process.describe(),
            fallbacks=fallbacks,
            notes=notes,
        )

    def prior_sample_note(self, count: int, total: int) -> str:
        """The note for ``count`` of ``total`` images whose noise was above ``sigma_T``."""
        return (f"{count} of {total} images had noise above the prior's sigma_T "
                f"({float(self.sigmas[-1]) / 2:.3g} in pixel units): they are samples of the prior")

    @torch.no_grad()
    def sample(self, count: int, *, sampler: str = "ddim", steps: int = 50, seed: int | None = 0) -> torch.Tensor:
        """Unconditional samples of the prior, ``count×C×R×R`` in ``[0, 1]`` (for baseline success rates)."""
        shape = (count, self.channels, self.resolution, self.resolution)
        infinite = torch.full((count,), float("inf"), dtype=torch.float64)
        # An infinite noise level makes every chain start from pure noise: exactly unconditional sampling.
        output = self.reconstruct(torch.zeros(shape, dtype=torch.float32), infinite.clamp(max=1e6), sampler=sampler, steps=steps, seed=seed)
        return output.images


def _config_get(config, key: str, default):
    if config is None:
        return default
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub endpoint accepts a TCP connection (no request is sent)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _quiet_diffusers():
    """Silence diffusers' load-time advice (accelerate, dtype casts) without changing the user's setting."""
    from diffusers.utils import logging as diffusers_logging

    import warnings

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # huggingface_hub deprecation notices
            yield
    finally:
        diffusers_logging.set_verbosity(level)


def image_seeds(seed: int | Sequence[int] | torch.Tensor | None, count: int) -> torch.Tensor:
    """One seed per image: ``seed`` mixed with the image's index, or the given per-image seeds (checked)."""
    if seed is None:
        seed = 0
    if isinstance(seed, int):
        # A fixed odd multiplier spreads (seed, index) pairs apart; Generator.manual_seed takes any 64-bit value.
        return (torch.arange(count, dtype=torch.int64) + (int(seed) * 0x9E3779B1) % 2**62) & (2**63 - 1)
    seeds = torch.as_tensor(seed, dtype=torch.int64).reshape(-1)
    if seeds.numel() != count:
        raise ValueError(f"got {seeds.numel()} seeds for {count} images")
    return seeds


def _per_image_noise(seeds: torch.Tensor, shape: torch.Size,
                     needs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two standard normal draws of ``shape`` (padding noise, pure-noise start) from each needing image's own
    seed; zeros for the others."""
    stacked = torch.zeros((len(seeds), 2, *shape), dtype=torch.float32)
    generator = torch.Generator()
    for i in needs.nonzero().flatten().tolist():
        generator.manual_seed(int(seeds[i]))
        stacked[i] = torch.randn((2, *shape), generator=generator, dtype=torch.float32)
    return stacked[:, 0], stacked[:, 1]


def _pad_mask(size: tuple[int, int], padding: tuple[int, int, int, int]) -> torch.Tensor:
    height, width = size
    left, right, top, bottom = padding
    mask = torch.zeros((1, 1, height, width), dtype=torch.bool)
    mask[..., top : height - bottom, left : width - right] = True
    return mask


def _progress_bar(total: int, progress: bool | Callable[[int], None]) -> Callable[[int | None], None]:
    if callable(progress):
        return lambda n: None if n is None else progress(n)
    if not progress:
        return lambda n: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="img", desc="reconstruct", leave=False)
    return lambda n: bar.close() if n is None else bar.update(n)


def _explain_load_failure(text: str, source, exc: Exception, *, allow_pickle: bool, offline: bool) -> PriorLoadError:
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(source, Path):
        if not allow_pickle and any(source.glob("unet/*.bin")) and not any(source.glob("unet/*.safetensors")):
            return PriorLoadError(
                f"{source} holds only a pickle checkpoint (unet/*.bin); pass allow_pickle=True "
                "(CLI: --allow-pickle) if you trust its source"
            )
        return PriorLoadError(f"cannot load the prior in {source}: {message}")
    from huggingface_hub import constants

    cause = "offline and not in the cache" if offline else f"the hub answered: {message}"
    return PriorLoadError(
        f"cannot load hub prior {text!r}: {cause}. The cache is {constants.HF_HUB_CACHE}: download the prior "
        f"once where there is network (or copy that cache here); HF_HUB_OFFLINE=1 skips network attempts. "
        f"Or use the {_OFFLINE_OPTIONS}"
    )
