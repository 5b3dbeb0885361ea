import numpy as np
import pytest
import torch

from opacus_dmaudit.prior import DiffusionPrior, PriorLoadError, default_batch_size


def test_t_star_matches_hand_computed_table(tiny_prior_dir):
    prior = DiffusionPrior.from_pretrained(tiny_prior_dir, device="cpu")
    # Linear betas 1e-4 .. 0.02, T = 1000, computed independently in numpy; DESIGN.md's table agrees.
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    sigma = np.sqrt((1 - abar) / abar)
    assert np.allclose(prior.sigmas.numpy(), sigma, rtol=1e-3)  # diffusers keeps abar in float32
    table = {0.05: 26, 0.2: 117, 0.8: 351, 1.6: 487, 6.4: 709}
    stds = torch.tensor(list(table))
    assert prior.match_timestep(2 * stds).tolist() == list(table.values())
    assert [int(np.argmin(np.abs(sigma - 2 * s))) for s in table] == list(table.values())


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_are_reproducible_with_a_seed(tiny_prior_dir, fashion_images, sampler):
    prior = DiffusionPrior.from_pretrained(tiny_prior_dir, device="cpu")
    noisy = fashion_images[:3] + 0.05 * torch.randn(3, 1, 28, 28)
    run = lambda seed: prior.reconstruct(noisy, [0.05, 0.02, 0.05], sampler=sampler, steps=5, seed=seed)  # noqa
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.images, b.images)
    assert a.images.shape == (3, 1, 28, 28) and a.t_start.tolist() == [26, 8, 26]
    if sampler == "ddpm":
        assert not torch.equal(a.images, c.images)  # the seed drives the ancestral noise


def test_noise_above_sigma_T_falls_back_to_prior_samples(tiny_prior_dir, fashion_images):
    prior = DiffusionPrior.from_pretrained(tiny_prior_dir, device="cpu")
    out = prior.reconstruct(fashion_images[:2], [0.1, 1e4], steps=2)
    assert out.from_prior.tolist() == [False, True]
    assert out.t_start[1] == 999 and "samples of the prior" in out.notes[0]


def test_reconstructions_of_colour_images_with_a_gray_prior_say_what_is_lost(tiny_prior_dir, fashion_images):
    prior = DiffusionPrior.from_pretrained(tiny_prior_dir, device="cpu")
    colour = torch.cat([fashion_images[:2], fashion_images[:2].flip(-1), fashion_images[:2] * 0.5], dim=1)
    out = prior.reconstruct(colour, 0.1, steps=1)
    assert out.images.shape == colour.shape and out.adaptation.channel == "rgb->gray"
    assert any("lose colour" in note for note in out.notes)
    assert not any("lose" in note for note in prior.reconstruct(fashion_images[:2], 0.1, steps=1).notes)


def test_bad_reconstruct_arguments(tiny_prior_dir, fashion_images):
    prior = DiffusionPrior.from_pretrained(tiny_prior_dir, device="cpu")
    with pytest.raises(ValueError, match="non-negative"):
        prior.reconstruct(fashion_images[:2], -0.1)
    with pytest.raises(ValueError, match="sampler"):
        prior.reconstruct(fashion_images[:2], 0.1, sampler="euler")
    with pytest.raises(ValueError, match="2 images"):
        prior.reconstruct(fashion_images[:2], [0.1, 0.2, 0.3])


def test_load_errors_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(PriorLoadError, match="not a DDPM pipeline folder"):
        DiffusionPrior.from_pretrained(tmp_path)
    with pytest.raises(PriorLoadError, match="no such folder"):
        DiffusionPrior.from_pretrained(tmp_path / "nope")
    with pytest.raises(PriorLoadError, match="unknown prior"):
        DiffusionPrior.from_pretrained("mnist")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PriorLoadError, match="HF_HUB_OFFLINE") as info:
        DiffusionPrior.from_pretrained("google/ddpm-cifar10-32")
    assert "cache" in str(info.value) and "fashion-mnist" in str(info.value)


def test_pickle_checkpoints_need_opt_in(tiny_prior_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_prior_dir, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(PriorLoadError, match="allow_pickle"):
        DiffusionPrior.from_pretrained(folder)
    assert DiffusionPrior.from_pretrained(folder, allow_pickle=True, device="cpu").channels == 1


def test_shipped_prior_loads_offline_and_denoises(fashion_images, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prior = DiffusionPrior.from_pretrained("fashion-mnist", device="cpu")
    assert (prior.resolution, prior.channels) == (32, 1)
    x = fashion_images[:4]
    noisy = x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    out = prior.reconstruct(noisy, 0.2, sampler="ddim", steps=10)
    noisy_mse = float(((noisy - x) ** 2).mean())
    recon_mse = float(((out.images - x) ** 2).mean())
    assert recon_mse < noisy_mse / 3, (recon_mse, noisy_mse)


@pytest.mark.parametrize("resolution, expected", [(16, 32), (64, 32), (128, 16), (256, 4)])
def test_default_batch_size_shrinks_with_the_image_size(resolution, expected):
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=resolution, in_channels=1, out_channels=1, block_out_channels=(4, 8),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=2)
    prior = DiffusionPrior(unet, alphas_cumprod=DDPMScheduler().alphas_cumprod, device="cpu")
    assert prior.resolution == resolution and prior.default_batch_size == expected
    # The same rule on CUDA (computed, no device needed): 256 up to 64×64, 32 at 256×256.
    assert default_batch_size("cuda", resolution) == {16: 256, 64: 256, 128: 128, 256: 32}[resolution]


def test_a_device_this_machine_lacks_is_named_before_anything_loads(tiny_prior_dir, tmp_path):
    from opacus_dmaudit.training import train_prior

    with pytest.raises(ValueError, match="'gpu' is not a torch device: use 'cpu', 'cuda'"):
        DiffusionPrior.from_pretrained(tiny_prior_dir, device="gpu")
    with pytest.raises(ValueError, match="'meta' holds no data"):
        DiffusionPrior.from_pretrained(tiny_prior_dir, device="meta")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match=r"^device 'mps': torch cannot use it on this machine \([^\n]{10,200}\); "
                                             "use 'cpu' or 'cuda'"):
            DiffusionPrior.from_pretrained(tiny_prior_dir, device="mps")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match=f"this machine has {torch.cuda.device_count()} CUDA device"):
            DiffusionPrior.from_pretrained(tiny_prior_dir, device="cuda:99")
        return
    # Torch's own error would come at the first CUDA call and speak of NVIDIA drivers.
    with pytest.raises(ValueError, match=r"CUDA is not available on this machine .*use device 'cpu'"):
        DiffusionPrior.from_pretrained(tiny_prior_dir, device="cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        train_prior(torch.rand(4, 1, 8, 8), tmp_path / "prior", device="cuda")
    assert not (tmp_path / "prior").exists()  # refused before the output folder was made
