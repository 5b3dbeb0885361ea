"""Reconstruction throughput: the naive diffusers loop against DiffusionPrior.reconstruct, measured in one run.

Naive: UNet2DModel in fp32, eager, ``scheduler.step`` per step (what a first implementation does).
Ours: ``DiffusionPrior.reconstruct`` (bf16 autocast and channels_last on CUDA, vectorised per-image timesteps),
timed end to end including host-side adaptation.

Random weights suffice for speed. Prints a table and writes JSON (device named) with ``speedup_vs_naive``.

    python benchmarks/reconstruction_throughput.py --arch cifar10-32 --batch 256 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone

import torch

from opacus_dmaudit.prior import DiffusionPrior
from opacus_dmaudit.training import build_unet

ARCHS = {
    # name: (model size, resolution, channels)
    "fashion-32": ("small", 32, 1),
    "cifar10-32": ("base", 32, 3),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_image_step(unet: torch.nn.Module, resolution: int, channels: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, channels, resolution, resolution)
    unet = unet.cpu().float()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, torch.tensor([10]))
    return float(counter.get_total_flops())


def naive_loop(unet, scheduler, *, batch: int, steps: int, resolution: int, channels: int, device) -> float:
    """img-steps/s of fp32 eager UNet calls with scheduler.step per step."""
    unet = unet.to(device, dtype=torch.float32, memory_format=torch.contiguous_format)
    x = torch.randn(batch, channels, resolution, resolution, device=device)
    timesteps = list(range(steps, 0, -1))
    with torch.no_grad():
        unet(x, torch.tensor([1], device=device))  # warm-up
        _sync(device)
        started = time.perf_counter()
        for t in timesteps:
            eps = unet(x, torch.tensor([t], device=device)).sample
            x = scheduler.step(eps, t, x).prev_sample
        _sync(device)
    return batch * steps / (time.perf_counter() - started)


def ours(unet, alphas_cumprod, *, batch: int, steps: int, resolution: int, channels: int, device, sampler: str):
    prior = DiffusionPrior(unet, alphas_cumprod=alphas_cumprod, device=device, name="bench")
    noisy = torch.rand(batch, channels, resolution, resolution)
    std = 0.8  # t* = 351 for the linear schedule: DDPM runs 352 steps, DDIM `steps`
    prior.reconstruct(noisy[: min(batch, 8)], std, sampler="ddim", steps=2, batch_size=batch)  # warm-up
    _sync(device)
    started = time.perf_counter()
    output = prior.reconstruct(noisy, std, sampler=sampler, steps=steps, batch_size=batch)
    _sync(device)
    seconds = time.perf_counter() - started
    unet_calls = steps if sampler == "ddim" else int(output.t_start.max()) + 1
    return batch * unet_calls / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=tuple(ARCHS), default="fashion-32")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps timed (default: 50 on CUDA, 4 on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from diffusers import DDPMScheduler

    device = torch.device(args.device)
    size, resolution, channels = ARCHS[args.arch]
    batch = args.batch or (256 if device.type == "cuda" else 8)
    steps = args.steps or (50 if device.type == "cuda" else 4)
    torch.manual_seed(0)
    unet = build_unet(resolution=resolution, channels=channels, model_size=size)
    parameters = sum(p.numel() for p in unet.parameters())
    flops = flops_per_image_step(unet, resolution, channels)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}"

    rows = []
    naive = naive_loop(unet, scheduler, batch=batch, steps=steps, resolution=resolution, channels=channels,
                       device=device)
    rows.append({"variant": "naive fp32 eager + scheduler.step", "img_steps_per_s": naive})
    rows.append({"variant": f"reconstruct ddim-{steps}", "img_steps_per_s": ours(
        unet, scheduler.alphas_cumprod, batch=batch, steps=steps, resolution=resolution, channels=channels,
        device=device, sampler="ddim")})
    for row in rows:
        row["tflops"] = row["img_steps_per_s"] * flops / 1e12
        row["speedup_vs_naive"] = row["img_steps_per_s"] / naive
    result = {
        "benchmark": "reconstruction_throughput",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "device": device_name,
        "torch": torch.__version__,
        "arch": args.arch,
        "parameters": parameters,
        "gflop_per_image_step": flops / 1e9,
        "batch": batch,
        "steps": steps,
        "rows": rows,
    }
    print(f"{args.arch}: {parameters / 1e6:.2f}M params, {flops / 1e9:.2f} GFLOP/img-step, batch {batch}, "
          f"{device_name}, torch {torch.__version__}")
    for row in rows:
        print(f"  {row['variant']:<40} {row['img_steps_per_s']:>10.1f} img-steps/s {row['tflops']:>8.2f} TFLOP/s "
              f"x{row['speedup_vs_naive']:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
