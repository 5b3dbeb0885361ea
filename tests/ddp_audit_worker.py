"""Run under torchrun by tests/test_ddp.py: distributed Opacus training on 2 CPU processes (gloo), audited by DMAuditor.

The model is wrapped as the last argument says: Opacus's DPDDP (``dpddp``), DPDDP hooked by Opacus without wrapping
(``dpddp-unwrapped``, make_private(wrap_model=False), Opacus 1.6), torch's DDP (``ddp``), or FSDP2 with ghost clipping
(``fsdp``, Opacus 1.6). A sixth argument ``at-once`` ends the run as tutorials do, destroying the group right after
``auditor.close()``, without a barrier (and without the weights check, whose collective would come between).
"""

import gc
import sys
import warnings
import weakref

import torch
import torch.distributed as dist
import torch.nn as nn
from opacus import PrivacyEngine
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from torch.nn.parallel import DistributedDataParallel as DDP

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


def distributed(model: nn.Module, wrapping: str) -> nn.Module:
    if wrapping == "ddp":
        return DDP(model)
    if wrapping == "fsdp":
        from opacus.utils.fsdp_utils import FSDP2Wrapper

        return FSDP2Wrapper(model)
    return DPDDP(model)


def main(prior: str, log_dir: str, mode: str, sigma: float, wrapping: str, teardown: str = "barrier") -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    images = load_images("fashion-mnist", limit=256)
    labels = torch.randint(0, 10, (256,))
    model = distributed(nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(),
                                      nn.Linear(4 * 13 * 13, 10)), wrapping)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1 + dist.get_rank())
    loader = torch.utils.data.DataLoader(BrightnessJitter(images, labels), batch_size=64)
    engine = PrivacyEngine(accountant="rdp")
    auditor = DMAuditor(engine, prior=prior, log_dir=log_dir, every=2, steps=2, queue_size=8, mode=mode)
    options = {"wrap_model": False} if wrapping == "dpddp-unwrapped" else {}
    if wrapping == "fsdp":
        options = {"grad_sample_mode": "ghost_fsdp", "criterion": nn.CrossEntropyLoss()}
    out = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
                              max_grad_norm=1.0, **options)
    private, optimizer, loader = out[0], out[1], out[-1]
    criterion = out[2] if len(out) == 4 else nn.CrossEntropyLoss()
    # wrap_model=False: Opacus hooks the DPDDP model, which the loop goes on calling.
    model = model if wrapping == "dpddp-unwrapped" else private
    steps = 0
    for x, y in loader:
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
        steps += 1
    if teardown == "at-once":
        # The imprint rows' gradients, all-reduced last in the step, and let go of by close().
        grads = [weakref.ref(p.grad) for p in auditor.block.parameters() if p.grad is not None]
        auditor.close()
        sys.stdout.write(f"rank {dist.get_rank()}: {steps} steps, {len(grads)} imprint gradients, "
                         f"{sum(ref() is not None for ref in grads)} still held after close\n")
        sys.stdout.flush()
        dist.destroy_process_group()
        return
    auditor.close()
    # Every rank must have taken the same steps: an optimizer that is not the distributed one lets them drift apart.
    weights = torch.cat([p.detach().full_tensor().flatten() if hasattr(p, "full_tensor") else p.detach().flatten()
                         for p in model.parameters() if p.requires_grad])
    gathered = [torch.zeros_like(weights) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, weights)
    bins = auditor.block.edges.tolist() if mode == "inline" else None
    # One write for both lines (well under a pipe's atomic 4 KiB): the ranks share torchrun's stdout, and print()
    # writes a line and its newline apart, so a CI run once found rank 1's line inside rank 0's bins line.
    sys.stdout.write(f"rank {dist.get_rank()}: {steps} steps, {len(auditor.records)} audits, errors {auditor.errors}, "
                     f"ranks agree {all(torch.equal(w, weights) for w in gathered)}\n"
                     f"rank {dist.get_rank()} bins: {bins}\n")
    sys.stdout.flush()
    # torch's DDP and FSDP hold the process group: left to the interpreter's exit, it was sometimes torn down there
    # after everything had run, and gloo aborted the process ("terminate called without an active exception").
    del model, private, optimizer, criterion, out, loader, auditor, engine
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5], *sys.argv[6:])
