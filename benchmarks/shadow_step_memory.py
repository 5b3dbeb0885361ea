"""Peak memory and time of the shadow imprint's DP-SGD step, with its per-sample gradient budget and without.

Opacus materialises every sample's gradient of every imprint row (``bins x C*H*W`` floats a sample), and the shadow
step runs on the CPU beside the user's training. Each variant runs in a fresh process of its own, since a process's
peak resident memory only ever rises; "unbounded" gives the step a budget larger than the batch needs, which is how
the step ran before the budget (one physical batch).

    python benchmarks/shadow_step_memory.py --batch 32 --size 256 --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from bench_common import header, write_json

UNBOUNDED = 1 << 62


def one_variant(*, batch: int, size: int, channels: int, bins: int, budget: int) -> dict:
    import torch

    from opacus_dmaudit.shadow import ShadowImprint

    images = torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    shadow = ShadowImprint(calibration=images, bins=bins, noise_multiplier=1.0, max_grad_norm=1.0,
                           expected_batch_size=batch, grad_sample_budget=budget)
    shadow.step(images)  # warm-up: the first step allocates what later ones reuse
    started = time.perf_counter()
    shadow.step(images)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"physical_batch_size": min(batch, shadow.physical_batch_size), "step_seconds": seconds,
            "peak_rss_gib": peak, "rss_before_gib": before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="images in the audited batch (default 32)")
    parser.add_argument("--size", type=int, default=256, help="image height and width (default 256)")
    parser.add_argument("--channels", type=int, default=3, help="image channels (default 3)")
    parser.add_argument("--bins", type=int, default=64, help="imprint bins (default 64, DMAuditor's)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant and print it as JSON
    args = parser.parse_args()
    shape = dict(batch=args.batch, size=args.size, channels=args.channels, bins=args.bins)
    if args.variant:
        from opacus_dmaudit.shadow import GRAD_SAMPLE_BUDGET_BYTES

        budget = UNBOUNDED if args.variant == "unbounded" else GRAD_SAMPLE_BUDGET_BYTES
        print(json.dumps(one_variant(budget=budget, **shape)))
        return
    import torch

    rows = {}
    for variant in ("unbounded", "budget"):
        command = [sys.executable, __file__, "--variant", variant,
                   *(f"--{name}={value}" for name, value in shape.items())]
        rows[variant] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    per_sample_gib = args.bins * args.channels * args.size ** 2 * 4 / 2**30
    print(f"shadow step, batch {args.batch} of {args.channels}x{args.size}x{args.size}, {args.bins} bins "
          f"({per_sample_gib * 1024:.1f} MiB of per-sample gradients a sample):")
    for variant, row in rows.items():
        print(f"  {variant:9s} physical batch {row['physical_batch_size']:4d}: step {row['step_seconds']:.2f} s, "
              f"peak RSS {row['peak_rss_gib']:.2f} GiB")
    ratio = rows["unbounded"]["peak_rss_gib"] / rows["budget"]["peak_rss_gib"]
    speed = rows["unbounded"]["step_seconds"] / rows["budget"]["step_seconds"]
    print(f"  budget against unbounded: peak RSS x{1 / ratio:.2f}, step time x{1 / speed:.2f}")
    write_json(args.json, {**header(torch.device("cpu")), **shape, "variants": rows,
                           "peak_rss_ratio_budget_vs_unbounded": 1 / ratio,
                           "step_time_ratio_budget_vs_unbounded": 1 / speed})


if __name__ == "__main__":
    main()
