"""Audit a differentially private Fashion-MNIST training run with DMAuditor (the README's main job).

Runs offline on a CPU in a few minutes: a small CNN trained with Opacus DP-SGD on Fashion-MNIST (Debian's
dataset-fashion-mnist package), audited every few steps with the shipped diffusion prior. Open TensorBoard on the
printed log folder to see, per audit, the original images, what the attacker recovers from the noised gradients,
and what the diffusion prior reconstructs from that, next to PSNR/SSIM and epsilon.

    python examples/audit_fashion_mnist.py --noise-multiplier 0.1 --steps 40 --every 10
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from opacus import PrivacyEngine

from opacus_dmaudit.auditor import DMAuditor
from opacus_dmaudit.data import load_images


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, stride=2, padding=2), nn.Tanh(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.Tanh(),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise-multiplier", type=float, default=0.1)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="DP-SGD steps to train")
    parser.add_argument("--every", type=int, default=10, help="audit every N steps")
    parser.add_argument("--mode", choices=("shadow", "inline"), default="shadow")
    parser.add_argument("--prior", default="fashion-mnist")
    parser.add_argument("--sampler-steps", type=int, default=20, help="DDIM steps of the prior")
    parser.add_argument("--log-dir", default=None, help="default: runs/audit-<time>")
    parser.add_argument("--no-originals", action="store_true", help="log no original training images")
    args = parser.parse_args()
    # Opacus's RDP "Optimal order is the smallest alpha" at the demo's small sigma only asks for more alpha orders.
    warnings.filterwarnings("ignore", message=".*(Secure RNG|full backward hook|Full backward hook|Optimal order).*")

    log_dir = Path(args.log_dir or f"runs/audit-{time.strftime('%Y%m%d-%H%M%S')}")
    torch.manual_seed(0)
    images = load_images("fashion-mnist:train", limit=args.steps * args.batch_size)
    labels_path = "/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz"
    from opacus_dmaudit.data import read_idx

    labels = torch.as_tensor(read_idx(labels_path)[: len(images)]).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=args.batch_size)
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    privacy_engine = PrivacyEngine(accountant="rdp")
    auditor = DMAuditor(
        privacy_engine, prior=args.prior, log_dir=log_dir, every=args.every, mode=args.mode, bins=128,
        sampler="ddim", steps=args.sampler_steps, max_images=16, max_reconstructions=32, delta=1e-5,
        log_originals=not args.no_originals, queue_size=args.steps // args.every + 1,
        on_audit=lambda record: print("  audit", record.summary(), flush=True),
    )
    model, optimizer, loader = privacy_engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=args.noise_multiplier, max_grad_norm=args.max_grad_norm,
    )
    print(f"training {args.steps} DP-SGD steps (noise multiplier {args.noise_multiplier}, batch {args.batch_size}), "
          f"{args.mode} audit every {args.every} steps")
    started = time.perf_counter()
    with auditor:
        step = 0
        while step < args.steps:
            for x, y in loader:
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                step += 1
                if step % args.every == 0:
                    print(f"step {step}: loss {loss.item():.3f}", flush=True)
                if step >= args.steps:
                    break
        print(f"training done in {time.perf_counter() - started:.1f} s; waiting for the last audits")
    epsilon = privacy_engine.get_epsilon(1e-5)
    print(f"\nepsilon = {epsilon:.2f} at delta = 1e-5 after {args.steps} steps")
    print(f"{len(auditor.records)} audits ({auditor.dropped} dropped, {auditor.errors} failed):")
    for record in auditor.records:
        print("  " + record.summary())
    print("all audits together (one audit's rate is rough; pooled, the interval narrows):")
    for level in auditor.run_summary():
        print("  " + level.summary())
    print(f"\nlogs (private: they contain training images): {auditor.log_dir.resolve()}")
    print(f"open them with:  tensorboard --logdir {auditor.log_dir}")


if __name__ == "__main__":
    main()
