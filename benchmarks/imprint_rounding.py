"""How often the imprint rows put an image in another bin than its float64 measurement: float32, and TF32 emulated.

The rows compute ``(w.x - tau_i) / width_i`` as a float32 matrix product (TF32 where a GPU allows it). An image within
their rounding of a bin's edge shows in the neighbouring row, in both or in neither. Recovery checks each bin's
sample against its clean ratio, so such an image is never scored as another one; but before that check, a bin the
measurement gave one image could hold two, and was scored as that one. This script counts both, on Fashion-MNIST
test images, with bins calibrated on 1,024 training images (DMAuditor's default sample), audited batch by batch.
TF32 is emulated by rounding both operands of the product to TF32's 10 mantissa bits (to nearest; a GPU's
conversion may truncate instead), products and sums in float32: no GPU needed. With ``--device cuda`` the rows also
multiply in real TF32 (``torch.set_float32_matmul_precision("high")``), beside the emulation.

    python benchmarks/imprint_rounding.py --json benchmarks/results/cpu/imprint-rounding.json
"""

from __future__ import annotations

import argparse

import torch

from bench_common import header, write_json

DATA = "Fashion-MNIST test set, bins calibrated on 1,024 training images"
TF32_DROPPED_MANTISSA_BITS = 13  # float32 has 23 mantissa bits, TF32 10


def tf32(values: torch.Tensor) -> torch.Tensor:
    """``values`` rounded to the nearest TF32 value (kept in float32)."""
    bits = values.contiguous().view(torch.int32)
    half = 1 << (TF32_DROPPED_MANTISSA_BITS - 1)
    return ((bits + half) & ~((1 << TF32_DROPPED_MANTISSA_BITS) - 1)).view(torch.float32)


ARITHMETICS = {"cpu": ("float32", "tf32 (emulated)"), "cuda": ("float32", "tf32 (emulated)", "tf32")}


def count(block, images: torch.Tensor, *, batch: int, arithmetic: str, device: torch.device) -> dict:
    """Images the rows move out of their measured bin, and bins the measurement gives one image that hold more."""
    emulate_tf32 = arithmetic == "tf32 (emulated)"
    weight, bias = block.imprint.weight.detach().to(device), block.imprint.bias.detach().to(device)
    if emulate_tf32:
        weight = tf32(weight)
    # TF32 on for the real TF32 rows only: "float32" and the emulation multiply in float32.
    torch.set_float32_matmul_precision("high" if arithmetic == "tf32" else "highest")
    moved = mixtures = audited = 0
    for start in range(0, images.shape[0] - batch + 1, batch):
        x = images[start:start + batch]
        flat = x.flatten(1).to(device)
        flat = tf32(flat) if emulate_tf32 else flat
        rows = (flat @ weight.T + bias).cpu()
        shown = (rows > 0) & (rows < 1)  # the sparse rows with a non-zero derivative
        measured = block.assign_bins(x)
        inside = (measured >= 0) & (measured < block.bins)
        expected = torch.zeros_like(shown)
        expected[torch.nonzero(inside).flatten(), measured[inside]] = True
        moved += int((expected != shown).any(dim=1).sum())
        per_bin = torch.bincount(measured[inside], minlength=block.bins)
        mixtures += int(((per_bin == 1) & (shown.sum(dim=0) >= 2)).sum())
        audited += batch
    return {"images": audited, "moved": moved, "moved_fraction": moved / audited,
            "mixtures_the_measurement_gave_one_image": mixtures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="64:64,512:512",
                        help="bins:batch pairs, comma-separated (default 64:64,512:512)")
    parser.add_argument("--device", default="cpu", help="where the rows multiply (cuda adds real TF32)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    device = torch.device(args.device)

    from opacus_dmaudit.data import load_images
    from opacus_dmaudit.imprint import ImprintBlock

    train = load_images("fashion-mnist:train", limit=60000)
    test = load_images("fashion-mnist", limit=10000)
    calibration = train[torch.linspace(0, train.shape[0] - 1, 1024).long()]
    rows = []
    for setting in args.settings.split(","):
        bins, batch = (int(part) for part in setting.split(":"))
        block = ImprintBlock(image_shape=tuple(test.shape[1:]), bins=bins).calibrate(calibration)
        for arithmetic in ARITHMETICS[device.type]:
            row = {"bins": bins, "batch": batch, "arithmetic": arithmetic,
                   **count(block, test, batch=batch, arithmetic=arithmetic, device=device)}
            rows.append(row)
            write_json(args.json, {**header(device), "data": DATA, "rows": rows})  # after each row, as the others
            print(f"{bins:4d} bins, batches of {batch:4d}, {arithmetic:15s} on {device.type}: {row['moved']:4d} of {row['images']} "
                  f"images moved ({row['moved_fraction']:.2%}); {row['mixtures_the_measurement_gave_one_image']} "
                  "bins held two or more images where the measurement gave one")
    torch.set_float32_matmul_precision("highest")


if __name__ == "__main__":
    main()
