"""End to end: N noisy 32×32 images reconstructed from t* = 300, with DDPM steps and with DDIM-50, one run.

Each figure is the wall time of one ``DiffusionPrior.reconstruct`` call on all images (host adaptation, t* matching,
planning, transfers, the reverse process, the copy back), with the default speed options of the device. The
first call of a shape compiles and captures it: that one-off cost is reported apart ("cold"), then the call is
timed again ("warm", what every later audit pays). Random weights of the google/ddpm-cifar10-32 architecture on
CUDA; on CPU, where this only guards against regressions, the shipped prior's smaller one and 4 images.

    python benchmarks/end_to_end_audit.py --images 5000 --json out.json
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_common import quiet_diffusers, ARCHS, build_arch, device_name, header, timed, write_json
from diffusers import DDPMScheduler

from opacus_dmaudit.prior import DiffusionPrior
from opacus_dmaudit.reverse_process import FastPathConfig

GOALS_S = {"ddpm": 90.0, "ddim-50": 20.0}  # issue 6, for 5,000 images on one H100
T_START = 300


def main() -> None:
    quiet_diffusers()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="default: 5000 on CUDA, 4 on CPU")
    parser.add_argument("--arch", choices=tuple(ARCHS), default=None,
                        help="default: cifar10-32 on CUDA, fashion-32 (the shipped prior's) on CPU")
    parser.add_argument("--batch", type=int, default=None, help="images per pass (default: 256 on CUDA, 4 on CPU)")
    parser.add_argument("--samplers", nargs="*", choices=("ddpm", "ddim-50"), default=["ddim-50", "ddpm"])
    parser.add_argument("--eager", action="store_true", help="no speed options (FastPathConfig.eager())")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    count = args.images or (5000 if cuda else 4)
    batch = args.batch or (256 if cuda else 4)
    args.arch = args.arch or ("cifar10-32" if cuda else "fashion-32")
    spec = ARCHS[args.arch]

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    prior = DiffusionPrior(build_arch(args.arch), alphas_cumprod=scheduler.alphas_cumprod, device=device,
                           name=args.arch, fast_path=FastPathConfig.eager() if args.eager else None)
    # The pixel noise std whose model-scale sigma is sigma_{t*}: every image then starts at exactly t* = 300.
    std = float(prior.sigmas[T_START]) / 2
    noisy = torch.rand(count, spec["in_channels"], spec["sample_size"], spec["sample_size"],
                       generator=torch.Generator().manual_seed(0))
    rows = []
    result = {"benchmark": "end_to_end_audit", **header(device), "arch": args.arch, "t_start": T_START,
              "batch": batch, "rows": rows}
    print(f"end to end, {count} images of {args.arch} at t* = {T_START}, batch {batch}, {device_name(device)}, "
          f"torch {torch.__version__}", flush=True)
    for name in args.samplers:
        sampler, steps = ("ddim", 50) if name == "ddim-50" else ("ddpm", 0)
        outputs = []
        clock = {"started": 0.0, "done": 0, "written": 0.0}

        def progress(finished: int) -> None:
            """Every few seconds, the images done so far as a partial row: a run cut short still says how far it got."""
            clock["done"] += finished
            now = time.perf_counter()
            if now - clock["written"] > 5.0:
                clock["written"] = now
                partial = {"sampler": name, "images": count, "partial": True, "images_done": clock["done"],
                           "seconds_so_far": now - clock["started"], "goal_s_5000_images_h100": GOALS_S[name]}
                write_json(args.json, {**result, "rows": rows + [partial]})

        def run():
            clock.update(started=time.perf_counter(), done=0, written=time.perf_counter())
            outputs.append(prior.reconstruct(noisy, std, sampler=sampler, steps=steps or 1, batch_size=batch,
                                             progress=progress))

        cold = None
        # Compiling and capturing happen at the first call of a shape; both samplers then share that graph.
        if prior.reverse_process.fast and not rows:
            cold = timed(lambda: prior.reconstruct(noisy[:batch], std, sampler=sampler, steps=steps or 1,
                                                   batch_size=batch), device)
        warm = timed(run, device)
        output = outputs[-1]
        assert int(output.t_start.min()) == int(output.t_start.max()) == T_START
        unet_steps = 50 if sampler == "ddim" else T_START + 1
        row = {"sampler": name, "images": count, "unet_steps": unet_steps, "seconds": warm,
               "first_batch_cold_s": cold, "img_steps_per_s": count * unet_steps / warm,
               "goal_s_5000_images_h100": GOALS_S[name], "fast_path": output.fast_path, "notes": output.notes}
        rows.append(row)
        write_json(args.json, result)  # after each sampler: a run cut short keeps the rows it finished
        print(f"  {row['sampler']:<8} {row['unet_steps']:>4} steps  {row['seconds']:8.2f} s warm "
              f"({row['img_steps_per_s']:.0f} img-steps/s"
              + (f"; first batch cold {row['first_batch_cold_s']:.1f} s" if row["first_batch_cold_s"] else "")
              + ") "
              f"[{row['fast_path']}]  goal on one H100 for 5,000 images: {GOALS_S[row['sampler']]:.0f} s", flush=True)
        for note in row["notes"]:
            print(f"      note: {note}")


if __name__ == "__main__":
    main()
