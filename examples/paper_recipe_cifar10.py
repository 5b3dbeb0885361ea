"""The seed paper's recipe: CIFAR-10, ResNet-9, batch 64, a 128-bin imprint block, google/ddpm-cifar10-32.

Needs network access once (the CIFAR-10 download and the hub prior) and, realistically, a GPU: a ResNet-9 DP step
at batch 64 takes about 10 s on a 2-core CPU. Offline it stops at once with a message saying what is missing.

    python examples/paper_recipe_cifar10.py --noise-multiplier 1.0 --epochs 1 --every 100 --data ./data
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn as nn
from opacus import PrivacyEngine

from opacus_dmaudit import DiffusionPrior, DMAuditor, PriorLoadError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def conv_block(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    # GroupNorm, not BatchNorm: per-sample gradients need layers that do not mix samples.
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(min(32, cout), cout), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_block(channels, channels), conv_block(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def resnet9(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        conv_block(3, 64), conv_block(64, 128, pool=True), Residual(128),
        conv_block(128, 256, pool=True), conv_block(256, 512, pool=True), Residual(512),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(512, num_classes),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--mode", choices=("inline", "shadow"), default="inline")
    parser.add_argument("--data", default="./data")
    parser.add_argument("--log-dir", default=None, help="default: a new runs/audit-<date>-<time>")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    # Fail fast offline: the prior first (a 3 s reachability check), then the data set.
    try:
        prior = DiffusionPrior.from_pretrained("google/ddpm-cifar10-32", device=args.device)
    except PriorLoadError as exc:
        print(f"paper recipe: cannot load the prior: {exc}", file=sys.stderr)
        return 2
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])
    try:
        train = datasets.CIFAR10(args.data, train=True, download=True, transform=transform)
    except Exception as exc:  # torchvision raises URLError / RuntimeError depending on the failure
        print(f"paper recipe: cannot get CIFAR-10 into {args.data} ({exc}); it needs network access once",
              file=sys.stderr)
        return 2

    device = torch.device(args.device)
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, num_workers=2)
    model = resnet9().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = PrivacyEngine()
    with DMAuditor(engine, prior=prior, log_dir=args.log_dir, every=args.every, mode=args.mode, bins=128,
                   input_mean=CIFAR_MEAN, input_std=CIFAR_STD, on_audit=lambda r: print(r.summary())) as auditor:
        model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                       noise_multiplier=args.noise_multiplier,
                                                       max_grad_norm=args.max_grad_norm)
        started = time.perf_counter()
        for epoch in range(args.epochs):
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
            print(f"epoch {epoch + 1}: {time.perf_counter() - started:.0f} s, epsilon {engine.get_epsilon(1e-5):.2f}")
    print(f"logs: {auditor.log_dir}  (tensorboard --logdir {auditor.log_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
