"""Time and peak memory of the shadow imprint's DP-SGD step: ghost clipping against Opacus's per-sample gradients;
and the time of recovery after it, with and without the check of each bin's sample against its clean ratio.

The shadow step runs on the CPU beside the user's training. Opacus's standard path (``grad_sample_mode="hooks"``)
materialises every sample's gradient of every imprint row, ``bins x C*H*W`` floats a sample; ghost clipping, what
the auditor and the sweep run, computes each sample's gradient norm from the layer's input and output gradient and
never holds one. Each variant runs in a fresh process of its own, since a process's peak resident memory only ever
rises, and steps the same images with the same noise.

    python benchmarks/shadow_step.py --batch 32 --size 256 --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from bench_common import header, write_json

VARIANTS = ("hooks", "ghost")  # the per-sample reference first, the product's step last


def one_variant(*, batch: int, size: int, channels: int, bins: int, mode: str, repeats: int) -> dict:
    import torch

    from opacus_dmaudit.shadow import ShadowImprint

    images = torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    shadow = ShadowImprint(calibration=images, bins=bins, noise_multiplier=1.0, max_grad_norm=1.0,
                           expected_batch_size=batch, grad_sample_mode=mode)
    shadow.step(images)  # warm-up: the first step allocates what later ones reuse
    started = time.perf_counter()
    for _ in range(repeats):
        shadow.step(images)
    seconds = (time.perf_counter() - started) / repeats
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    row = {"step_seconds": seconds, "peak_rss_gib": peak, "rss_before_gib": before, "repeats": repeats}
    if mode == "ghost":
        row.update(recovery_seconds(shadow.step(images), shadow.block, images, repeats=repeats))
    return row


def recovery_seconds(captured, block, images, *, repeats: int) -> dict:
    """Recovery's time after the step, with the check of each bin's sample against its clean ratio and without it
    (the float64 measurement alone, as without clean sums), at the same scale."""
    import dataclasses

    from opacus_dmaudit.recovery import recover_images

    unchecked = dataclasses.replace(captured, clean_weight=None, clean_bias=None)
    row = {}
    for name, released in (("recovery_seconds", captured), ("recovery_unchecked_seconds", unchecked)):
        recover_images(released, block, scale="noisy-bias", originals=images)
        started = time.perf_counter()
        for _ in range(repeats):
            recovered = recover_images(released, block, scale="noisy-bias", originals=images)
        row[name] = (time.perf_counter() - started) / repeats
        row[name.replace("seconds", "images")] = len(recovered)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="images in the attacked batch (default 32)")
    parser.add_argument("--size", type=int, default=256, help="image height and width (default 256)")
    parser.add_argument("--channels", type=int, default=3, help="image channels (default 3)")
    parser.add_argument("--bins", type=int, default=64, help="imprint bins (default 64, DMAuditor's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (default 3)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one variant, as JSON
    args = parser.parse_args()
    shape = dict(batch=args.batch, size=args.size, channels=args.channels, bins=args.bins)
    if args.variant:
        print(json.dumps(one_variant(mode=args.variant, repeats=args.repeats, **shape)))
        return
    import torch

    rows = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant, f"--repeats={args.repeats}",
                   *(f"--{name}={value}" for name, value in shape.items())]
        rows[variant] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    per_sample_mib = args.bins * args.channels * args.size ** 2 * 4 / 2**20
    print(f"shadow step, batch {args.batch} of {args.channels}x{args.size}x{args.size}, {args.bins} bins "
          f"({per_sample_mib:.1f} MiB of per-sample gradients a sample on the hooks path):")
    for variant, row in rows.items():
        print(f"  {variant:5s}: step {row['step_seconds'] * 1e3:9.1f} ms, peak RSS {row['peak_rss_gib']:.2f} GiB")
    speedup = rows["hooks"]["step_seconds"] / rows["ghost"]["step_seconds"]
    memory = rows["ghost"]["peak_rss_gib"] / rows["hooks"]["peak_rss_gib"]
    print(f"  ghost against hooks: x{speedup:.1f} faster, peak RSS x{memory:.2f}")
    ghost = rows["ghost"]
    print(f"  recovery after the step: {ghost['recovery_seconds'] * 1e3:.1f} ms with each bin's sample checked "
          f"against its clean ratio ({ghost['recovery_images']} images), {ghost['recovery_unchecked_seconds'] * 1e3:.1f}"
          f" ms by the measurement alone ({ghost['recovery_unchecked_images']} images)")
    write_json(args.json, {**header(torch.device("cpu")), **shape, "variants": rows,
                           "speedup_vs_naive": speedup, "peak_rss_ratio_ghost_vs_hooks": memory})


if __name__ == "__main__":
    main()
