"""Training diffusion priors: a diffusers ``UNet2DModel`` + ``DDPMScheduler``, saved as a ``DDPMPipeline`` folder.

No pretrained diffusion model can be downloaded offline, so priors are trained here with this module
(``opacus-dmaudit train-prior``). The whole data set lives on the training device and batches are drawn by
index, so a small 32×32 model is limited by the GPU, not by a data loader.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from opacus_dmaudit.data import adapt_to_prior, load_images
from opacus_dmaudit.prior import resolve_device

__all__ = ["MODEL_SIZES", "PriorTrainingConfig", "PriorTrainingOutput", "PriorTrainingDiverged", "build_unet", "train_prior"]

MODEL_SIZES: dict[str, dict] = {
    # For tests and CPU smoke runs: about 0.1M parameters.
    "tiny": dict(
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    ),
    # The shipped prior's architecture: about 6.5M parameters, 13 MB in fp16.
    "small": dict(
        block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        norm_num_groups=32,
        attention_head_dim=8,
    ),
    # google/ddpm-cifar10-32's layout, about 36M parameters at 32×32.
    "base": dict(
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        norm_num_groups=32,
        attention_head_dim=None,
    ),
}

CHECKPOINT_NAME = "training_checkpoint.pt"


@dataclass
class PriorTrainingConfig:
    """Settings of :func:`train_prior`; saved next to the pipeline as ``training_config.json``.

    Attributes:
        resolution: side of the square images the prior models (data are padded or resized to it). ``None``: from
            the data (32 for images up to 32×32, padded as the shipped prior's were; otherwise their larger side,
            rounded up to a multiple of the UNet's downsampling), so that the prior can hold the images' detail.
        channels: 1 (gray) or 3 (RGB). ``None``: the data's, so that a prior for colour images keeps the colour.
        model_size: "tiny", "small" or "base" (see ``MODEL_SIZES``).
        epochs: passes over the data; ignored when ``minutes`` is given.
        minutes: wall-clock budget for the optimisation steps instead of a number of epochs.
        batch_size: images per step.
        learning_rate: AdamW peak learning rate.
        warmup_steps: linear warm-up steps of the learning rate.
        weight_decay: AdamW weight decay.
        ema_decay: maximum decay of the EMA weights (the saved model); warms up from 0.
        flips: random horizontal flips.
        seed: seed of initialisation, batches, noise and flips.
        compile: ``torch.compile`` the UNet for training (CUDA only; falls back to eager if it fails).
        checkpoint_every: steps between resumable checkpoints (0: only at the end).
        save_fp16: store the saved UNet weights in float16 (half the size; loads as float32 for use).
    """

    resolution: int | None = None
    channels: int | None = None
    model_size: str = "small"
    epochs: float = 1.0
    minutes: float | None = None
    batch_size: int = 128
    learning_rate: float = 2e-4
    warmup_steps: int = 500
    weight_decay: float = 0.0
    ema_decay: float = 0.9995
    flips: bool = True
    seed: int = 0
    compile: bool = False
    checkpoint_every: int = 2000
    save_fp16: bool = True

    @property
    def downsampling(self) -> int:
        """The factor by which the UNet shrinks its input: the resolution must be a multiple of it."""
        return 2 ** (len(MODEL_SIZES[self.model_size]["block_out_channels"]) - 1)

    def for_images(self, images: torch.Tensor) -> "PriorTrainingConfig":
        """A copy with the resolution and channels left at ``None`` taken from ``images`` (``N×C×H×W``)."""
        side = max(int(images.shape[-2]), int(images.shape[-1]))
        resolution = self.resolution
        if resolution is None:
            resolution = 32 if side <= 32 else -(-side // self.downsampling) * self.downsampling
        return replace(self, resolution=resolution, channels=self.channels or int(images.shape[1]))

    def validate(self) -> None:
        if self.model_size not in MODEL_SIZES:
            raise ValueError(f"model_size must be one of {', '.join(MODEL_SIZES)}, got {self.model_size!r}")
        if self.channels is not None and self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % self.downsampling):
            raise ValueError(f"resolution {self.resolution} is too small or not divisible by the UNet's downsampling "
                             f"({self.downsampling})")
        if self.minutes is None and not self.epochs > 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"minutes must be positive, got {self.minutes}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        # A decay of 1 or more never lets the EMA weights (the saved prior) leave their random initialisation.
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup_steps < 0 or self.checkpoint_every < 0:
            raise ValueError(f"warmup_steps and checkpoint_every must be >= 0, got {self.warmup_steps} and "
                             f"{self.checkpoint_every}")


@dataclass
class PriorTrainingOutput:
    """What :func:`train_prior` returns: where the pipeline is and how training went."""

    path: Path
    steps: int
    seconds: float
    images_seen: int
    final_loss: float
    parameters: int
    device: str
    losses: list[float] = field(default_factory=list)
    config: PriorTrainingConfig | None = None  # as trained: resolution and channels resolved from the data


def build_unet(*, resolution: int, channels: int, model_size: str):
    """A fresh diffusers ``UNet2DModel`` of one of the ``MODEL_SIZES``."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=resolution, in_channels=channels, out_channels=channels, **MODEL_SIZES[model_size])


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def train_prior(
    images,
    out_dir: str | os.PathLike,
    *,
    config: PriorTrainingConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    data_description: str | None = None,
) -> PriorTrainingOutput:
    """Train a DDPM prior on images and save it as a diffusers ``DDPMPipeline`` folder with a model card.

    Args:
        images: any source :func:`opacus_dmaudit.data.load_images` accepts, or a loaded ``N×C×H×W`` tensor.
        out_dir: the pipeline folder to write.
        config: training settings.
        resume: continue from ``out_dir``'s checkpoint (the budget counts from the original start).
        overwrite: allow replacing an existing pipeline folder that is not being resumed.
        device: where to train; CUDA when available by default.
        progress: show a tqdm bar with the loss.
        data_description: what the data are, for the model card (defaults to the source's name).

    Returns:
        A :class:`PriorTrainingOutput`.

    Raises:
        FileExistsError: if ``out_dir`` holds files and neither ``resume`` nor ``overwrite`` is set.
        FileNotFoundError: if ``resume`` is set and there is no checkpoint.
    """
    from diffusers import DDPMPipeline, DDPMScheduler
    from diffusers.optimization import get_constant_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    config = config or PriorTrainingConfig()
    config.validate()
    device = resolve_device(device)
    out = Path(out_dir)
    checkpoint_path = out / CHECKPOINT_NAME
    if resume and not checkpoint_path.is_file():
        raise FileNotFoundError(f"nothing to resume: {checkpoint_path} does not exist")
    if not resume and out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass resume=True (--resume) or overwrite=True (--overwrite)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    data = images if isinstance(images, torch.Tensor) else load_images(images)
    config = config.for_images(data)
    config.validate()
    data, adaptation = adapt_to_prior(data, resolution=config.resolution, channels=config.channels)
    data = (data * 2.0 - 1.0).to(device)  # the DM's [-1, 1] scale, padded borders at -1
    count = data.shape[0]

    torch.manual_seed(config.seed)
    unet = build_unet(resolution=config.resolution, channels=config.channels, model_size=config.model_size).to(device)
    # NHWC only where inductor lowers GroupNorm: eager CUDA GroupNorm (forward and backward) computes in NCHW, so
    # each GroupNorm -> conv pair would transpose the activations twice.
    channels_last = config.compile and device.type == "cuda"
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              prediction_type="epsilon", clip_sample=True, variance_type="fixed_small")
    # Fused AdamW and a multi-tensor EMA update: a handful of kernels per step instead of a few per parameter tensor.
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                                  fused=device.type == "cuda")
    lr_schedule = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=config.warmup_steps)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=3 / 4, foreach=True)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    step, elapsed, losses = 0, 0.0, []
    if resume:
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        unet.load_state_dict(state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        ema.load_state_dict(state["ema"])
        generator.set_state(state["generator"].cpu() if device.type == "cpu" else state["generator"].cpu())
        step, elapsed, losses = state["step"], state["seconds"], list(state["losses"])
    ema.to(device)

    steps_per_epoch = max(1, math.ceil(count / config.batch_size))
    total_steps = None if config.minutes is not None else int(round(config.epochs * steps_per_epoch))
    budget = None if config.minutes is None else config.minutes * 60.0
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    forward = unet
    if config.compile and device.type == "cuda":
        forward = torch.compile(unet)

    def loss_of_batch(model) -> torch.Tensor:
        index = torch.randint(0, count, (config.batch_size,), device=device, generator=generator)
        clean = data[index]
        if config.flips:
            flip = torch.rand(clean.shape[0], device=device, generator=generator) < 0.5
            clean = torch.where(flip.view(-1, 1, 1, 1), clean.flip(-1), clean)
        noise = torch.randn(clean.shape, device=device, generator=generator, dtype=clean.dtype)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), device=device, generator=generator)
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = abar.sqrt() * clean + (1 - abar).sqrt() * noise
        if channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            prediction = model(noisy, t).sample
        return F.mse_loss(prediction.float(), noise)

    def save_checkpoint() -> None:
        state = dict(unet=unet.state_dict(), optimizer=optimizer.state_dict(), lr_schedule=lr_schedule.state_dict(),
                     ema=ema.state_dict(), generator=generator.get_state(), step=step, seconds=elapsed,
                     losses=losses, config=json.dumps(asdict(config)))
        tmp = checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, checkpoint_path)  # never leave a half-written checkpoint behind

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, unit="step", desc="train-prior")
    unet.train()
    started = time.perf_counter() - elapsed
    running = None
    while True:
        elapsed = time.perf_counter() - started
        if total_steps is not None and step >= total_steps:
            break
        if budget is not None and elapsed >= budget:
            break
        optimizer.zero_grad(set_to_none=True)
        try:
            loss = loss_of_batch(forward)
            loss.backward()
        except Exception as exc:
            if forward is unet:
                raise
            # torch.compile failed on this platform: train eagerly rather than not at all.
            print(f"train-prior: torch.compile failed ({type(exc).__name__}); training eagerly")
            forward = unet
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of_batch(forward)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.step(unet.parameters())
        step += 1
        if step % 50 == 0 or step == 1:
            value = float(loss.detach())
            if not math.isfinite(value):
                if bar is not None:
                    bar.close()
                raise PriorTrainingDiverged(_diverged(f"the loss is {value} at step {step}", config))
            running = value if running is None else 0.9 * running + 0.1 * value
            losses.append(round(value, 5))
            if bar is not None:
                bar.set_postfix(loss=f"{running:.4f}")
        if bar is not None:
            bar.update(1)
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            elapsed = time.perf_counter() - started
            save_checkpoint()
    if bar is not None:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started

    ema_unet = build_unet(resolution=config.resolution, channels=config.channels, model_size=config.model_size)
    ema.copy_to(ema_unet.parameters())
    # .half(), not .to(dtype): diffusers' to() warns about float32-only modules even when there are none.
    ema_unet = ema_unet.cpu().half() if config.save_fp16 else ema_unet.cpu()
    if not all(bool(torch.isfinite(p).all()) for p in ema_unet.parameters()):
        # Weights past float16's range (65504) become infinite when saved: a prior that only samples NaN.
        raise PriorTrainingDiverged(_diverged("the trained weights are not finite"
                                              + (" in float16" if config.save_fp16 else ""), config))
    save_checkpoint()  # not before the check: a diverged run's state is not worth resuming
    DDPMPipeline(unet=ema_unet, scheduler=scheduler).save_pretrained(out, safe_serialization=True)
    (out / "training_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    final_loss = float(sum(losses[-20:]) / max(1, len(losses[-20:]))) if losses else float("nan")
    result = PriorTrainingOutput(
        path=out,
        steps=step,
        seconds=elapsed,
        images_seen=step * config.batch_size,
        final_loss=final_loss,
        parameters=sum(p.numel() for p in ema_unet.parameters()),
        device=_device_name(device),
        losses=losses,
        config=config,
    )
    _write_model_card(out, result, config, count=count, source=data_description or _describe_source(images),
                      adaptation=adaptation.describe())
    return result


class PriorTrainingDiverged(ValueError):
    """Training ran away (a non-finite loss or non-finite weights): no prior and no final checkpoint were written."""


def _diverged(what: str, config: PriorTrainingConfig) -> str:
    return (f"training diverged ({what}), so no prior was written: lower the learning rate (now "
            f"{config.learning_rate:g}; the default is {PriorTrainingConfig.learning_rate:g})")


def _describe_source(images) -> str:
    if isinstance(images, torch.Tensor):
        return f"a tensor of {images.shape[0]} images"
    return str(images)


def _write_model_card(out: Path, result: PriorTrainingOutput, config: PriorTrainingConfig, *, count: int,
                      source: str, adaptation: str) -> None:
    """README.md of the pipeline folder plus a grid of unconditional samples (``samples.png``)."""
    from opacus_dmaudit.prior import DiffusionPrior
    from opacus_dmaudit.report import save_image_grid

    prior = DiffusionPrior.from_pretrained(out, device="cuda" if torch.cuda.is_available() else "cpu")
    samples = prior.sample(64 if prior.device.type == "cuda" else 16, sampler="ddim", steps=50, seed=config.seed)
    side = 8 if samples.shape[0] >= 64 else 4
    save_image_grid(list(samples.split(side)), out / "samples.png", private=False)
    size_mb = sum(f.stat().st_size for f in (out / "unet").glob("*.safetensors")) / 1e6
    lines = [
        "# Diffusion prior trained with opacus-dmaudit train-prior",
        "",
        f"- data: {source} ({count} images; adaptation: {adaptation})",
        f"- model: diffusers UNet2DModel, size '{config.model_size}', {result.parameters:,} parameters, "
        f"{config.resolution}x{config.resolution}, {config.channels} channel(s), {size_mb:.1f} MB safetensors"
        f"{' (fp16)' if config.save_fp16 else ''}",
        "- scheduler: DDPMScheduler, linear betas 1e-4 to 0.02, T = 1000, epsilon prediction",
        f"- training: {result.steps:,} steps of batch {config.batch_size} ({result.images_seen:,} images), "
        f"AdamW lr {config.learning_rate:g} with {config.warmup_steps} warm-up steps, EMA {config.ema_decay}, "
        f"flips {config.flips}, seed {config.seed}",
        f"- time: {result.seconds / 60:.1f} minutes on {result.device}",
        f"- final training loss (mean of the last logged values): {result.final_loss:.4f}",
        f"- written: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "Unconditional samples (DDIM, 50 steps):",
        "",
        "![samples](samples.png)",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))
