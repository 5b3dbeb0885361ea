"""Run under torchrun by tests/test_ddp.py: Opacus DPDDP training on 2 CPU processes (gloo), audited by DMAuditor."""

import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from opacus import PrivacyEngine
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

from opacus_dmaudit import DMAuditor, load_images

warnings.filterwarnings("ignore")


class BrightnessJitter(torch.utils.data.Dataset):
    """A random augmentation: each rank draws its own, so the ranks calibrate their imprint bins on different samples."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return (self.images[index] * (0.8 + 0.2 * torch.rand(()))), self.labels[index]


def main(prior: str, log_dir: str, mode: str, sigma: float, wrap_model: bool) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    images = load_images("fashion-mnist", limit=256)
    labels = torch.randint(0, 10, (256,))
    model = DPDDP(nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 13 * 13, 10)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1 + dist.get_rank())
    loader = torch.utils.data.DataLoader(BrightnessJitter(images, labels), batch_size=64)
    engine = PrivacyEngine(accountant="rdp")
    auditor = DMAuditor(engine, prior=prior, log_dir=log_dir, every=2, steps=2, queue_size=8, mode=mode)
    # wrap_model=False (Opacus 1.6): Opacus hooks the DPDDP model, which the loop goes on calling.
    private, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                     noise_multiplier=sigma, max_grad_norm=1.0,
                                                     **({} if wrap_model else {"wrap_model": False}))
    model = private if wrap_model else model
    steps = 0
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        steps += 1
    auditor.close()
    bins = auditor.block.edges.tolist() if mode == "inline" else None
    print(f"rank {dist.get_rank()}: {steps} steps, {len(auditor.records)} audits, errors {auditor.errors}", flush=True)
    print(f"rank {dist.get_rank()} bins: {bins}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), wrap_model=sys.argv[5:] != ["hooks"])
