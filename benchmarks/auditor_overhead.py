"""Auditor overhead per DP-SGD training step: no auditor vs shadow vs inline, measured in one run.

Prints, per variant: mean training-loop time per step, its ratio to the run without an auditor, the time the
training thread spent inside the auditor's hooks per audited step (the copy of the batch, the capture), and how long
the audits themselves took on the worker. The inline capture cost is the gradient copy inside the step hook, given
also as a share of the step without an auditor. "inline, no audits" carries the imprint block through every step
but never audits: the standing cost of its per-sample gradients, apart from the audits' share of the device. On
CPU, "shadow, worker niceness 0" runs the audit worker at training's own priority, and "…, worker all threads" on as
many intra-op threads as training, against DMAuditor's defaults (niceness 10, half the threads).
On CUDA each row also gives the device memory's peak from the auditor's creation to the end of training: the worker
allocates on its own stream, and the caching allocator does not lend those blocks to training's stream, so what the
auditor holds adds to training's peak. ``--grad-sample-mode ghost`` trains with Opacus's ghost clipping (its
criterion wrapped by ``make_private``), where the inline imprint's rows, a linear layer, need no per-sample gradient.
``--accountant`` is the engine's (PRV by default, as ``PrivacyEngine()``): each audit logs its epsilon, computed on
the worker beside training.

    python benchmarks/auditor_overhead.py --steps 40 --every 10 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings

import torch
import torch.nn as nn
from bench_common import device_name, header, write_json
from opacus import PrivacyEngine

from opacus_dmaudit import DMAuditor, load_images

warnings.filterwarnings("ignore")


# The worker at the training thread's priority: what DMAuditor's default niceness saves a CPU-bound loop.
EVEN_PRIORITY = "shadow, worker niceness 0"
# The worker on as many intra-op threads as training (DMAuditor's default gives it half): what that saves on a CPU.
ALL_THREADS = ("shadow, worker all threads", "inline, worker all threads")


def cnn(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 7 * 7, 10),
    )


def _reset_cuda_peak(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()  # the last variant's model, optimizer and auditor
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _cuda_peak(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def run(variant: str, *, images, labels, args, device) -> dict:
    torch.manual_seed(0)
    _reset_cuda_peak(device)
    model = cnn(args.width).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=args.batch)
    engine = PrivacyEngine(accountant=args.accountant)
    auditor = None
    mode = {"no auditor": None, "inline, no audits": "inline"}.get(variant, variant.split(",")[0])
    if mode is not None:
        every = 10**9 if variant == "inline, no audits" else args.every
        worker = {"worker_niceness": 0} if variant == EVEN_PRIORITY else {}
        if variant in ALL_THREADS:
            worker = {"worker_threads": torch.get_num_threads()}
        # One fresh folder per variant and run: appending to an earlier run's logs would warn and mix them.
        log_dir = f"{args.log_root}/{time.strftime('%Y%m%d-%H%M%S')}-{variant.replace(' ', '').replace(',', '-')}"
        auditor = DMAuditor(engine, prior=args.prior, log_dir=log_dir, every=every,
                            mode=mode, steps=args.sampler_steps, max_reconstructions=args.max_reconstructions,
                            queue_size=args.steps // args.every + 1, device=device,
                            kappa_samples=args.kappa_samples, **worker)
    criterion = nn.CrossEntropyLoss()
    ghost = args.grad_sample_mode == "ghost"
    private = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
                                  max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=args.grad_sample_mode,
                                  **({"criterion": criterion} if ghost else {}))
    if ghost:  # the wrapped criterion's backward runs ghost clipping's two passes
        model, optimizer, criterion, loader = private
    else:
        model, optimizer, loader = private
    step_times, step = [], 0
    while step < args.steps:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            started = time.perf_counter()
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter() - started)
            step += 1
            if step >= args.steps:
                break
    result = {"variant": variant, "ms_per_step": 1e3 * statistics.mean(step_times[2:]),
              "ms_per_step_median": 1e3 * statistics.median(step_times[2:]), **_cuda_peak(device)}
    if auditor is not None:
        waited = time.perf_counter()
        auditor.close(wait=not args.drop_queued)
        audits = max(1, len(auditor.records) + auditor.dropped + auditor.errors)
        result.update(blocking_ms_per_audit=1e3 * auditor.blocking_seconds / audits,
                      capture_ms_per_audit=1e3 * auditor.capture_seconds / audits,
                      audits=len(auditor.records), dropped=auditor.dropped, errors=auditor.errors,
                      audit_seconds_mean=statistics.mean(r.seconds for r in auditor.records) if auditor.records else None,
                      drain_seconds_after_training=time.perf_counter() - waited,
                      prior_fast_path=auditor.prior.reverse_process.describe() if auditor.prior else None,
                      prepare_seconds=auditor.prepare_seconds)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--prior", default="fashion-mnist")
    parser.add_argument("--sampler-steps", type=int, default=10)
    parser.add_argument("--max-reconstructions", type=int, default=16)
    parser.add_argument("--kappa-samples", type=int, default=16,
                        help="prior draws for the ReRo bound's kappa, once per auditor (DMAuditor's default; 0: none)")
    parser.add_argument("--grad-sample-mode", choices=("hooks", "ghost"), default="hooks",
                        help="Opacus's per-sample gradients (hooks, its default) or ghost clipping")
    parser.add_argument("--accountant", choices=("prv", "rdp"), default="prv",
                        help="the engine's accountant, whose epsilon each audit logs (prv: PrivacyEngine()'s default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--log-root", default="/tmp/opacus-dmaudit-bench")
    parser.add_argument("--drop-queued", action="store_true",
                        help="close(wait=False) after training: the audits still queued are dropped, not waited for. "
                             "With audits due more often than the worker finishes them, it is busy all through "
                             "training, and the step times measure that steady state")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    images = load_images("fashion-mnist:train", limit=args.batch * 8)
    labels = torch.randint(0, 10, (images.shape[0],))
    variants = ("no auditor", "shadow", "inline", "inline, no audits")
    if device.type == "cpu":  # where the worker's priority and threads decide how it shares the cores with training
        variants += (EVEN_PRIORITY, *ALL_THREADS)
    rows = [run(variant, images=images, labels=labels, args=args, device=device) for variant in variants]
    base = rows[0]["ms_per_step"]
    for row in rows:
        row["step_time_ratio"] = row["ms_per_step"] / base
        if "capture_ms_per_audit" in row:
            row["capture_pct_of_step"] = 100 * row["capture_ms_per_audit"] / base
    name = device_name(device)
    dropped = "; audits still queued after training dropped" if args.drop_queued else ""
    print(f"auditor overhead: {name}, {args.grad_sample_mode}, {args.accountant} accountant, CNN width {args.width}, "
          f"batch {args.batch}, {args.steps} steps, audit every {args.every} ({args.sampler_steps} DDIM steps, <= "
          f"{args.max_reconstructions} images){dropped}")
    for row in rows:
        extra = ""
        if row.get("audits"):
            extra = (f" | training thread blocked {row['blocking_ms_per_audit']:.2f} ms/audit (capture "
                     f"{row['capture_ms_per_audit']:.3f} ms = {row['capture_pct_of_step']:.2f}% of a step) | audits "
                     f"{row['audits']} ({row['dropped']} dropped), {row['audit_seconds_mean'] or 0:.2f} s each")
        if "peak_reserved_gib" in row:
            extra += (f" | CUDA peak {row['peak_allocated_gib']:.2f} GiB allocated, {row['peak_reserved_gib']:.2f} "
                      "GiB reserved")
        print(f"  {row['variant']:<25} {row['ms_per_step']:8.2f} ms/step  x{row['step_time_ratio']:.3f}{extra}")
        if row.get("prepare_seconds") is not None:
            print(f"      prior {row['prior_fast_path']}: prepared (compile, graph capture) at creation, on the "
                  f"training thread before training, in {row['prepare_seconds']:.2f} s")
    write_json(args.json, {"benchmark": "auditor_overhead", **header(device), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
