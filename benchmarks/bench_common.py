"""Shared pieces of the benchmarks: the UNet architectures, the device's name and peak, timing, JSON output."""

from __future__ import annotations

import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from opacus_dmaudit.training import MODEL_SIZES

# diffusers UNet2DModel configs of the hub priors named (from their unet/config.json), and of the shipped prior.
_GOOGLE = dict(layers_per_block=2, norm_num_groups=32, norm_eps=1e-6, attention_head_dim=None, downsample_padding=0,
               flip_sin_to_cos=False, freq_shift=1, act_fn="silu", time_embedding_type="positional")
ARCHS: dict[str, dict] = {
    "cifar10-32": dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), **_GOOGLE),
    "celebahq-256": dict(sample_size=256, in_channels=3, out_channels=3,
                         block_out_channels=(128, 128, 256, 256, 512, 512),
                         down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4, **_GOOGLE),
    "fashion-32": dict(sample_size=32, in_channels=1, out_channels=1, **MODEL_SIZES["small"]),
}
"""``cifar10-32``: google/ddpm-cifar10-32; ``celebahq-256``: google/ddpm-celebahq-256 (and the other 256² google
DDPMs); ``fashion-32``: the shipped Fashion-MNIST prior."""

# Dense bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s (SXM parts; sparsity not counted).
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}


def build_arch(name: str, *, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised UNet of one of :data:`ARCHS` (random weights suffice for speed)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**ARCHS[name]).eval().requires_grad_(False)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def spec_peak_tflops(device: torch.device) -> float | None:
    """The data-sheet dense bf16 peak of a known GPU, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_TFLOPS.items():  # longest keys first where they overlap ("H100 PCIe")
        if key in name and not (key == "H100" and "PCIe" in name):
            return peak
    return None


def measured_matmul_tflops(device: torch.device, *, size: int = 8192, repeats: int = 20) -> float | None:
    """bf16 matmul throughput measured now: the practical ceiling the UNet's FLOP rate is compared with."""
    if device.type != "cuda":
        return None
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    seconds = timed(lambda: [a @ b for _ in range(repeats)], device)
    return 2 * size**3 * repeats / seconds / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Wall seconds of ``fn()``, the device drained before and after."""
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def flops_per_image_step(arch: str) -> float:
    """FLOPs of one UNet evaluation of one image (a multiply-add counts 2), by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = build_arch(arch)
    spec = ARCHS[arch]
    x = torch.randn(1, spec["in_channels"], spec["sample_size"], spec["sample_size"])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, torch.tensor([10]))
    return float(counter.get_total_flops())


def header(device: torch.device) -> dict:
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "device": device_name(device),
            "torch": torch.__version__}


def write_json(path: str | os.PathLike | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def quiet_diffusers() -> None:
    """Only errors from diffusers' logger: its dtype-cast advice would drown the figures."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
