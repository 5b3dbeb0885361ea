"""Shared fixtures: real Fashion-MNIST test images, a tiny diffusers prior made on the fly, and torchrun."""

from __future__ import annotations

import socket
import subprocess
import sys
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*kept in float32.*")


@pytest.fixture(scope="session")
def torchrun():
    """Run a script (or ``"-m", module``) and its arguments under torchrun: 2 processes on this CPU, on a free port."""

    def run(*args, timeout: float) -> subprocess.CompletedProcess:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
             f"--master_port={port}", *map(str, args)],
            capture_output=True, text=True, timeout=timeout,
        )

    return run


@pytest.fixture(scope="session")
def fashion_images() -> torch.Tensor:
    from opacus_dmaudit.data import load_images

    return load_images("fashion-mnist", limit=256)


@pytest.fixture(scope="session")
def tiny_prior_dir(tmp_path_factory) -> str:
    """A DDPMPipeline folder with a tiny random UNet (32×32, 1 channel): fast, real diffusers files."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )
    path = tmp_path_factory.mktemp("priors") / "tiny"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(path)
    return str(path)


@pytest.fixture
def prv_grids_built(monkeypatch):
    """The sizes of the PRV grids Opacus is asked to build. One over the cap is recorded and refused, not built: it
    could take the test run down with it."""
    from opacus.accountants import PRVAccountant

    from opacus_dmaudit import bounds

    built = []
    build = PRVAccountant._get_dprv

    def recording(self, eps_error, delta_error):
        built.append(bounds.prv_grid_points(self.history, eps_error=eps_error, delta_error=delta_error))
        if built[-1] > bounds.PRV_MAX_GRID_POINTS:
            raise MemoryError("refused by the test")
        return build(self, eps_error, delta_error)

    monkeypatch.setattr(PRVAccountant, "_get_dprv", recording)
    return built
