"""Reconstruction throughput: the naive diffusers loop against each speed option of the reverse process, one run.

Naive: ``UNet2DModel`` in fp32 (TF32 off), eager, ``DDPMScheduler.step`` per step: what a first implementation does
when it asks for fp32. ``naive + TF32`` is the same loop with PyTorch's default TF32 convolutions (CUDA only).
Ours: ``DiffusionPrior.reconstruct`` with one :class:`FastPathConfig` per row, timed end to end (host adaptation,
planning and transfers included) after a warm-up call that compiles and captures the batch's shape.

Figures per row: image-steps per second (UNet evaluations of one image), achieved TFLOP/s (FlopCounterMode's count
of one UNet call, multiply-add = 2), the percentage of the data-sheet dense bf16 peak and of a bf16 matmul measured
in the same run, and ``speedup_vs_naive``. Random weights suffice for speed.

    python benchmarks/reconstruction_throughput.py --arch cifar10-32 --batch 256 --steps 50 --json out.json
"""

from __future__ import annotations

import argparse
import warnings

import torch
from bench_common import (ARCHS, build_arch, device_name, flops_per_image_step, header, measured_matmul_tflops,
                          quiet_diffusers, spec_peak_tflops, timed, write_json)

from opacus_dmaudit.prior import DiffusionPrior, default_batch_size
from opacus_dmaudit.reverse_process import FastPathConfig

VARIANTS = {
    "fp32 eager": FastPathConfig.eager(),
    "fp32 + channels_last (CPU default)": FastPathConfig(precision="fp32", channels_last=True, compile=False,
                                                         cuda_graphs=False),
    "fp32 + channels_last + compile": FastPathConfig(precision="fp32", channels_last=True, compile=True,
                                                     cuda_graphs=False),
    "bf16": FastPathConfig.eager(precision="bf16"),
    "bf16 + channels_last": FastPathConfig(precision="bf16", channels_last=True, compile=False, cuda_graphs=False),
    "bf16 + cuda_graphs (DMAuditor's prior)": FastPathConfig(compile=False),
    "bf16 + channels_last + compile": FastPathConfig(precision="bf16", channels_last=True, compile=True,
                                                     cuda_graphs=False),
    "bf16 + channels_last + compile + cuda_graphs (default)": FastPathConfig(),
    "bf16 + channels_last + compile(max-autotune) + cuda_graphs": FastPathConfig(
        compile_mode="max-autotune-no-cudagraphs"),
}
CPU_VARIANTS = ("fp32 eager", "fp32 + channels_last (CPU default)", "fp32 + channels_last + compile")
# Uncompiled ones first: a compile that overruns the time limit then costs only the rows after it. Of the compiled
# ones the default comes first (the goals read it); the next compiles the same step again, from inductor's cache.
CUDA_DEFAULT_VARIANTS = ("bf16", "bf16 + channels_last", "bf16 + cuda_graphs (DMAuditor's prior)",
                         "bf16 + channels_last + compile + cuda_graphs (default)", "bf16 + channels_last + compile")
UNCOMPILED = tuple(name for name in VARIANTS if not VARIANTS[name].compile)


def naive_loop(unet, *, batch: int, steps: int, device: torch.device, tf32: bool) -> float:
    """img-steps/s of the fp32 eager UNet with ``scheduler.step`` per step."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    spec = unet.config
    x = torch.randn(batch, spec.in_channels, spec.sample_size, spec.sample_size, device=device)
    unet = unet.to(device, dtype=torch.float32, memory_format=torch.contiguous_format)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    generator = torch.Generator(device=device).manual_seed(0)

    def loop():
        sample = x
        for t in range(steps, 0, -1):
            eps = unet(sample, torch.tensor([t], device=device)).sample
            sample = scheduler.step(eps, t, sample, generator=generator).prev_sample

    try:
        with torch.no_grad():
            unet(x[:1], torch.tensor([1], device=device))  # warm-up (cuDNN algorithm choice)
            seconds = timed(loop, device)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    return batch * steps / seconds


def ours(arch: str, config: FastPathConfig, *, batch: int, steps: int, device: torch.device) -> dict:
    """img-steps/s of ``reconstruct`` with DDIM-``steps`` from t* = 351 (noise std 0.8), after a warm-up call."""
    from diffusers import DDPMScheduler

    unet = build_arch(arch)
    prior = DiffusionPrior(unet, alphas_cumprod=DDPMScheduler(num_train_timesteps=1000).alphas_cumprod,
                           device=device, name=arch, fast_path=config)
    spec = ARCHS[arch]
    noisy = torch.rand(batch, spec["in_channels"], spec["sample_size"], spec["sample_size"],
                       generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        warm_up = timed(lambda: prior.reconstruct(noisy, 0.8, steps=2, batch_size=batch), device)
        outputs = []
        seconds = timed(lambda: outputs.append(prior.reconstruct(noisy, 0.8, steps=steps, batch_size=batch)), device)
    return {"img_steps_per_s": batch * steps / seconds, "warm_up_s": warm_up, "ran": outputs[0].fast_path,
            "fallbacks": [str(w.message) for w in caught] + outputs[0].fallbacks}


def main() -> None:
    quiet_diffusers()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=tuple(ARCHS), default="cifar10-32")
    parser.add_argument("--batch", type=int, default=None,
                        help="default: the product's (prior.default_batch_size: 256 on CUDA, 32 on CPU at 32²)")
    parser.add_argument("--steps", type=int, default=None, help="steps timed (default: 50 on CUDA, 4 on CPU)")
    parser.add_argument("--variants", nargs="*", choices=tuple(VARIANTS), default=None,
                        help="default: the fp32 ones on CPU; the bf16 ones but max-autotune on CUDA")
    parser.add_argument("--no-compile", action="store_true", help="only the variants that do not compile")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN time its convolution algorithms (every row, naive included)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    spec = ARCHS[args.arch]
    batch = args.batch or default_batch_size(device, spec["sample_size"])
    steps = args.steps or (50 if cuda else 4)
    variants = args.variants or (CUDA_DEFAULT_VARIANTS if cuda else CPU_VARIANTS)
    if args.no_compile:
        variants = [name for name in variants if name in UNCOMPILED]
    flops = flops_per_image_step(args.arch)
    parameters = sum(p.numel() for p in build_arch(args.arch).parameters())
    spec_peak, matmul_peak = spec_peak_tflops(device), measured_matmul_tflops(device)

    result = {"benchmark": "reconstruction_throughput", **header(device), "arch": args.arch,
              "parameters": parameters, "gflop_per_image_step": flops / 1e9, "batch": batch, "steps": steps,
              "cudnn_benchmark": args.cudnn_benchmark,
              "bf16_spec_peak_tflops": spec_peak, "bf16_matmul_measured_tflops": matmul_peak, "rows": []}
    print(f"{args.arch}: {parameters / 1e6:.1f}M params, {flops / 1e9:.1f} GFLOP/img-step, batch {batch}, "
          f"{steps} steps, {device_name(device)}, torch {torch.__version__}"
          + (f", bf16 peak {spec_peak:.0f} (data sheet) / {matmul_peak:.0f} (matmul now) TFLOP/s" if cuda else ""),
          flush=True)

    def add(row: dict) -> None:
        """Derive a row's ratios, print it and rewrite the JSON: a run cut short keeps the rows it finished."""
        row["tflops"] = row["img_steps_per_s"] * flops / 1e12
        row["pct_of_bf16_spec_peak"] = 100 * row["tflops"] / spec_peak if spec_peak else None
        row["pct_of_measured_bf16_matmul"] = 100 * row["tflops"] / matmul_peak if matmul_peak else None
        row["speedup_vs_naive"] = row["img_steps_per_s"] / result["rows"][0]["img_steps_per_s"] if result["rows"] \
            else 1.0
        result["rows"].append(row)
        pct = f" {row['pct_of_bf16_spec_peak']:5.1f}% of peak" if row["pct_of_bf16_spec_peak"] else ""
        print(f"  {row['variant']:<78} {row['img_steps_per_s']:>10.1f} img-steps/s {row['tflops']:>8.2f} TFLOP/s"
              f"{pct}  x{row['speedup_vs_naive']:.2f}", flush=True)
        for note in row.get("fallbacks", []):
            print(f"      fallback: {note}")
        write_json(args.json, result)

    add({"variant": "naive fp32 eager + scheduler.step",
         "img_steps_per_s": naive_loop(build_arch(args.arch), batch=batch, steps=steps, device=device, tf32=False)})
    if cuda:
        add({"variant": "naive + TF32 (PyTorch's cuDNN default)",
             "img_steps_per_s": naive_loop(build_arch(args.arch), batch=batch, steps=steps, device=device, tf32=True)})
    for name in variants:
        add({"variant": f"reconstruct ddim-{steps}: {name}",
             **ours(args.arch, VARIANTS[name], batch=batch, steps=steps, device=device)})


if __name__ == "__main__":
    main()
