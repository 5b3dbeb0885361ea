"""Why the audit worker never compiles: torch.compile on one thread rewinds the global RNG of the others.

Dynamo saves the process's global RNG state before tracing and restores it afterwards, so random numbers another
thread drew meanwhile are drawn again. The main thread here draws while a worker compiles a small diffusers UNet,
then keeps drawing; every repeated value is a draw handed out twice. Next to DP-SGD training, those would be
repeated noise. Prints the counts; "repeated 0" would mean this torch no longer does it.

    python benchmarks/compile_rng_hazard.py
"""

from __future__ import annotations

import threading
import time

import torch
from diffusers import UNet2DModel


def main() -> None:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    compiled = torch.compile(unet)
    done = threading.Event()

    def worker() -> None:
        with torch.no_grad():
            compiled(torch.zeros(3, 1, 16, 16), torch.tensor([5, 5, 5]))
        done.set()

    torch.manual_seed(123)
    draws = []
    threading.Thread(target=worker).start()
    while not done.is_set():
        draws.append(torch.randn(1).item())
        time.sleep(0.001)
    for _ in range(2000):  # after the compile: the restored state hands out old draws again (same call, same size)
        draws.append(torch.randn(1).item())
    repeated = len(draws) - len(set(draws))
    print(f"torch {torch.__version__}: main thread drew {len(draws)} numbers while and after a worker compiled; "
          f"repeated {repeated}")


if __name__ == "__main__":
    main()
