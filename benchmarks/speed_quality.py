"""What each speed option costs in reconstruction quality: PSNR / SSIM of the shipped prior on real images, one run.

Rows: the reference (fp32, eager, DDIM-50, or the first sampler asked for), then fewer DDIM steps, DDPM, and the
other speed options (``--paths``; bf16 also on CPU) with each sampler. Every row reconstructs the same noisy
Fashion-MNIST test images (same noise, same seeds) and is scored against the originals on the 28×28 crop;
``delta_*`` is the change from the reference row.

    python benchmarks/speed_quality.py --images 256 --noise-std 0.2 0.8 --json out.json
"""

from __future__ import annotations

import argparse

import torch
from bench_common import quiet_diffusers, device_name, header, write_json

from opacus_dmaudit import ImageMetrics, evaluate_prior, load_images
from opacus_dmaudit.prior import DiffusionPrior
from opacus_dmaudit.reverse_process import FastPathConfig

SAMPLERS = {"ddim-50": ("ddim", 50), "ddim-25": ("ddim", 25), "ddim-10": ("ddim", 10), "ddpm": ("ddpm", 1)}
PATHS = {
    "fp32 eager": FastPathConfig.eager(),
    # bf16 autocast runs on the CPU too (emulated, about 25x slower than fp32 on an AVX2 core): its rounding of the
    # UNet's inputs and weights, the part that costs quality, can be measured without a GPU.
    "bf16 eager": FastPathConfig.eager(precision="bf16"),
    "bf16 + cuda_graphs (DMAuditor's prior)": FastPathConfig(compile=False),
    "bf16 + channels_last + compile + cuda_graphs": FastPathConfig(),
}


def main() -> None:
    quiet_diffusers()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", default="fashion-mnist")
    parser.add_argument("--images", type=int, default=None, help="test images (default: 1000 on CUDA, 16 on CPU)")
    parser.add_argument("--noise-std", type=float, nargs="+", default=[0.2, 0.8])
    parser.add_argument("--samplers", nargs="*", choices=tuple(SAMPLERS), default=None,
                        help="default: all on CUDA, the DDIM ones on CPU (DDPM takes t* + 1 steps)")
    parser.add_argument("--paths", nargs="*", choices=tuple(PATHS), default=None,
                        help="speed options (default: fp32 eager and the CUDA default on CUDA, fp32 eager on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    images = load_images("fashion-mnist", limit=args.images or (1000 if cuda else 16))
    samplers = args.samplers or (list(SAMPLERS) if cuda else ["ddim-50", "ddim-25", "ddim-10"])
    names = args.paths or (["fp32 eager", "bf16 + channels_last + compile + cuda_graphs"] if cuda else ["fp32 eager"])
    if "fp32 eager" not in names:
        names = ["fp32 eager", *names]  # the reference every delta is taken against
    paths = {name: PATHS[name] for name in names}
    metrics = ImageMetrics(metrics=("mse", "psnr", "ssim"))

    rows = []
    for path_name, config in paths.items():
        prior = DiffusionPrior.from_pretrained(args.prior, device=device, fast_path=config)
        for sampler_name in samplers:
            sampler, steps = SAMPLERS[sampler_name]
            evaluation = evaluate_prior(prior, images, args.noise_std, sampler=sampler, steps=steps, seed=0,
                                        metrics=metrics, keep_examples=0)
            for level in evaluation.levels:
                rows.append({"fast_path": path_name, "sampler": sampler_name, "noise_std": level.noise_std,
                             "t_start": level.t_start, "psnr": level.reconstructed["psnr"],
                             "ssim": level.reconstructed["ssim"], "seconds": level.seconds,
                             "images_per_s": len(images) / level.seconds})
    reference = {r["noise_std"]: r for r in rows if r["fast_path"] == "fp32 eager" and r["sampler"] == samplers[0]}
    for row in rows:
        base = reference.get(row["noise_std"])
        row["delta_psnr"] = row["psnr"] - base["psnr"] if base else None
        row["delta_ssim"] = row["ssim"] - base["ssim"] if base else None
    print(f"speed options vs quality: prior {args.prior}, {len(images)} Fashion-MNIST test images, "
          f"{device_name(device)}, torch {torch.__version__}")
    for row in rows:
        delta = (f"  ΔPSNR {row['delta_psnr']:+.2f} ΔSSIM {row['delta_ssim']:+.3f}"
                 if row["delta_psnr"] is not None else "")
        print(f"  {row['fast_path']:<46} {row['sampler']:<8} s={row['noise_std']:<4} t*={row['t_start']:<4} "
              f"PSNR {row['psnr']:6.2f} SSIM {row['ssim']:.3f}{delta}  {row['images_per_s']:8.1f} img/s")
    write_json(args.json, {"benchmark": "speed_quality", **header(device), "prior": args.prior,
                           "images": len(images), "rows": rows})


if __name__ == "__main__":
    main()
