"""How well each attacker-side scale estimate finds the oracle's, through real Opacus steps of the shadow imprint.

A recovered image is ``G_W,i / lambda`` and its noise std ``sigma C / |lambda|``: a wrong ``lambda`` scales the image
and misstates its noise level, from which the prior's starting timestep t* is chosen. The oracle takes ``lambda`` from
the clean clipped bias sum; the attacker estimates it (``recovery.SCALES``). This script steps
``ShadowImprint`` (DMAuditor's shadow mode, the sweep's attack) on Fashion-MNIST test images, its bins calibrated on
1,024 training images, and prints, for each noise multiplier, bin structure and attacker scale, the median and 90th
percentile over the recovered images of ``|log(lambda_attacker / lambda_oracle)|`` (0.1 is a factor of 1.105), and
how many came out with the wrong sign (an image turned negative). Only images both scales recover are compared.

    python benchmarks/scale_estimates.py --json benchmarks/results/cpu/scale-estimates.json
"""

from __future__ import annotations

import argparse
import time

import torch

from bench_common import header, write_json

DATA = "Fashion-MNIST test set, bins calibrated on 1,024 training images"
ATTACKER_SCALES = ("clip-norm", "bin-measurement", "noisy-bias")


def scale_errors(*, sigma: float, structure: str, images: torch.Tensor, calibration: torch.Tensor, bins: int,
                 batch: int, max_grad_norm: float) -> dict:
    from opacus_dmaudit.recovery import recover_images
    from opacus_dmaudit.shadow import ShadowImprint

    shadow = ShadowImprint(calibration=calibration, bins=bins, structure=structure, noise_multiplier=sigma,
                           max_grad_norm=max_grad_norm, expected_batch_size=batch, seed=1)
    ratios: dict[str, list[torch.Tensor]] = {scale: [] for scale in ATTACKER_SCALES}
    for start in range(0, images.shape[0], batch):
        attacked = images[start:start + batch]
        captured = shadow.step(attacked)
        oracle = recover_images(captured, shadow.block, scale="oracle", originals=attacked)
        # lambda = coordinate noise std / noise std, so lambda's ratio is the inverse of the noise stds' ratio
        # (and the images' ratio, which carries the sign).
        for scale in ATTACKER_SCALES:
            estimate = recover_images(captured, shadow.block, scale=scale, originals=attacked)
            common, at_oracle, at_estimate = (torch.from_numpy(a) for a in _intersect(oracle.bins, estimate.bins))
            sign = torch.sign((estimate.images[at_estimate] * oracle.images[at_oracle]).flatten(1).sum(dim=1))
            ratios[scale].append(sign * oracle.noise_std[at_oracle] / estimate.noise_std[at_estimate])
    result = {}
    for scale, parts in ratios.items():
        ratio = torch.cat(parts).double()
        error = ratio.abs().log().abs()
        result[scale] = {"images": int(ratio.numel()), "median_abs_log_ratio": float(error.median()),
                         "p90_abs_log_ratio": float(error.quantile(0.9)),
                         "wrong_sign": int((ratio < 0).sum())}
    return result


def _intersect(a: torch.Tensor, b: torch.Tensor):
    import numpy as np

    return np.intersect1d(a.numpy(), b.numpy(), return_indices=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.01, 0.1, 0.3, 1.0, 3.0])
    parser.add_argument("--images", type=int, default=512, help="Fashion-MNIST test images attacked")
    parser.add_argument("--bins", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    from opacus_dmaudit.data import load_images

    images = load_images("fashion-mnist", limit=args.images)
    calibration = load_images("fashion-mnist:train", limit=1024)
    started = time.perf_counter()
    rows = []
    print(f"{'sigma':>6} {'bins':>10} " + " ".join(f"{scale:>26}" for scale in ATTACKER_SCALES))
    print(f"{'':>6} {'':>10} " + " ".join(f"{'median / p90 / wrong sign':>26}" for _ in ATTACKER_SCALES))
    for sigma in args.sigmas:
        for structure in ("sparse", "cumulative"):
            errors = scale_errors(sigma=sigma, structure=structure, images=images, calibration=calibration,
                                  bins=args.bins, batch=args.batch, max_grad_norm=args.max_grad_norm)
            rows.append({"noise_multiplier": sigma, "structure": structure, **errors})
            print(f"{sigma:>6g} {structure:>10} " + " ".join(
                f"{e['median_abs_log_ratio']:>10.3f} / {e['p90_abs_log_ratio']:>5.3f} / {e['wrong_sign']:>3d}"
                for e in errors.values()), flush=True)
    seconds = time.perf_counter() - started
    counts = [row["clip-norm"]["images"] for row in rows]
    print(f"|log(lambda_attacker / lambda_oracle)| over {min(counts)} to {max(counts)} recovered images per row "
          f"({DATA}); {seconds:.0f} s")
    write_json(args.json, {**header(torch.device("cpu")), "data": DATA, "images": args.images, "bins": args.bins,
                           "batch": args.batch, "max_grad_norm": args.max_grad_norm, "seconds": seconds,
                           "rows": rows})


if __name__ == "__main__":
    main()
