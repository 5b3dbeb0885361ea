"""The planned reverse process: its updates against diffusers' schedulers, and the fast path against eager."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from opacus_dmaudit.prior import DiffusionPrior
from opacus_dmaudit.reverse_process import (FastPathConfig, ReverseProcess, ReverseStep, bucket_size,
                                            cuda_graphs_leave_default_generator_alone, plan_ddim, plan_ddpm)


def _unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()


def _step(unet) -> ReverseStep:
    return ReverseStep(unet, prediction_type="epsilon", clip_sample=True, channels=1, precision="fp32")


@torch.no_grad()
def test_ddpm_step_matches_diffusers_scheduler_step():
    unet, scheduler = _unet(), DDPMScheduler(num_train_timesteps=1000)
    t_start = torch.tensor([400, 400, 250])
    plan = plan_ddpm(t_start, alphas_cumprod=scheduler.alphas_cumprod)
    assert plan.num_steps == 401 and plan.active[0] == 2 and plan.active[-1] == 3
    x = torch.randn(3, 1, 16, 16)
    j = 400 - 250  # the step at t = 250, where all three images move
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    ours = _step(unet)(x, plan.timesteps[j], plan.coefficients[j], noise)
    eps = unet(x, torch.tensor(250)).sample
    reference = scheduler.step(eps, 250, x, generator=torch.Generator().manual_seed(7)).prev_sample
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_ddpm_plan_keeps_waiting_images_still():
    unet, scheduler = _unet(), DDPMScheduler(num_train_timesteps=1000)
    plan = plan_ddpm(torch.tensor([30, 10]), alphas_cumprod=scheduler.alphas_cumprod)
    x = torch.randn(2, 1, 16, 16)
    out = _step(unet)(x, plan.timesteps[0], plan.coefficients[0], torch.randn(x.shape))
    torch.testing.assert_close(out[1], x[1], rtol=0, atol=0)  # t* = 10 has not started at t = 30
    assert not torch.allclose(out[0], x[0])
    with pytest.raises(ValueError, match="sorted"):
        plan_ddpm(torch.tensor([10, 30]), alphas_cumprod=scheduler.alphas_cumprod)


@torch.no_grad()
def test_ddim_step_matches_diffusers_scheduler_step():
    unet = _unet()
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=True, set_alpha_to_one=True)
    scheduler.set_timesteps(20)  # step ratio 50: from t = 500 diffusers goes to 450, as our plan does
    plan = plan_ddim(torch.tensor([500, 500]), steps=10, alphas_cumprod=scheduler.alphas_cumprod)
    assert plan.timesteps[:, 0].tolist() == [500, 450, 400, 350, 300, 250, 200, 150, 100, 50]
    x = torch.randn(2, 1, 16, 16)
    ours = _step(unet)(x, plan.timesteps[0], plan.coefficients[0], torch.zeros_like(x))
    eps = unet(x, torch.tensor(500)).sample
    reference = scheduler.step(eps, 500, x, eta=0.0, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)
    last = plan.coefficients[-1]
    assert torch.equal(last[:, 2], torch.ones(2)) and torch.equal(last[:, 3], torch.zeros(2))  # returns x_0


def test_ddim_plan_drops_steps_where_nothing_moves():
    abar = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    plan = plan_ddim(torch.tensor([3, 3]), steps=50, alphas_cumprod=abar)
    assert plan.timesteps[:, 0].tolist() == [3, 2, 1, 0]
    plan = plan_ddim(torch.tensor([3, 2]), steps=50, alphas_cumprod=abar)  # a row moves at least one image
    assert plan.timesteps.tolist() == [[3, 2], [2, 1], [1, 1], [1, 0], [0, 0]]


@pytest.mark.parametrize(("t_start", "steps"), [([3, 2], 50), ([26, 26], 50), ([258], 400), ([600, 300, 20], 8),
                                                ([40, 7, 1], 25), ([999], 1000), ([5], 1)])
def test_ddim_plan_is_one_unbroken_chain_from_t_star_to_a_clean_image(t_start, steps):
    # Each step must start from the noise level at which the step before left the image: a step that assumes a
    # cleaner image than it gets leaves that noise in the result.
    abar = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    plan = plan_ddim(torch.tensor(t_start), steps=steps, alphas_cumprod=abar)
    assert plan.timesteps[0].tolist() == t_start
    reached = plan.coefficients[:-1, :, 2] ** 2  # abar after each step but the last
    torch.testing.assert_close(reached, abar[plan.timesteps[1:]].float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(plan.coefficients[-1, :, 2], torch.ones(len(t_start)))
    if len(set(t_start)) == 1:  # one t*: every kept step moves the image
        assert plan.num_steps == min(steps, t_start[0] + 1)


def test_bucket_sizes_are_few_and_cover_the_batch():
    sizes = {bucket_size(n, batch_size=256, min_bucket=8) for n in range(1, 300)}
    assert sizes == {8, 16, 32, 64, 128, 256}
    assert all(bucket_size(n, batch_size=256, min_bucket=8) >= min(n, 256) for n in range(1, 300))


def test_fast_path_config_resolves_per_device_and_rejects_bad_options():
    cpu = FastPathConfig().resolve(torch.device("cpu"))
    assert (cpu.precision, cpu.channels_last, cpu.compile, cpu.cuda_graphs) == ("fp32", True, False, False)
    assert not FastPathConfig(channels_last=False).resolve(torch.device("cpu")).channels_last
    cuda = FastPathConfig().resolve(torch.device("cuda"))
    assert (cuda.precision, cuda.channels_last, cuda.compile, cuda.cuda_graphs) == ("bf16", True, True, True)
    # Uncompiled, NHWC would only add GroupNorm's transposes on CUDA; asked for explicitly, it is kept.
    graphs_only = FastPathConfig(compile=False).resolve(torch.device("cuda"))
    assert (graphs_only.channels_last, graphs_only.compile, graphs_only.cuda_graphs) == (False, False, True)
    assert FastPathConfig(compile=False, channels_last=True).resolve(torch.device("cuda")).channels_last
    with pytest.raises(ValueError, match="needs a CUDA device"):
        FastPathConfig(cuda_graphs=True).resolve(torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA graphs"):
        FastPathConfig(compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="precision"):
        FastPathConfig(precision="fp8")


def test_ddim_result_does_not_depend_on_batching(tiny_prior_dir, fashion_images):
    prior = DiffusionPrior.from_pretrained(tiny_prior_dir, device="cpu")
    noisy = fashion_images[:6] + 0.3 * torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    std = torch.tensor([0.3, 0.3, 0.3, 0.3, 0.3, 1e4])  # padding noise and one pure-noise start, both seeded
    together = prior.reconstruct(noisy, std, steps=4, seed=5, batch_size=6).images
    apart = prior.reconstruct(noisy, std, steps=4, seed=5, batch_size=2).images
    torch.testing.assert_close(together, apart, atol=1e-3, rtol=0)  # conv kernels vary with the batch size
    seeds = prior.reconstruct(noisy[:2], 0.3, steps=4, seed=[11, 12]).images
    alone = prior.reconstruct(noisy[1:2], 0.3, steps=4, seed=[12]).images
    torch.testing.assert_close(seeds[1:], alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="2 seeds for 6 images"):
        prior.reconstruct(noisy, std, steps=4, seed=[1, 2])


def test_compiled_step_matches_eager_on_cpu(tiny_prior_dir, fashion_images):
    """Real torch.compile (inductor's C++ backend here; the same graph capture as on CUDA)."""
    noisy = fashion_images[:5] + 0.2 * torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    eager = DiffusionPrior.from_pretrained(tiny_prior_dir, device="cpu").reconstruct(noisy, 0.2, steps=3,
                                                                                    batch_size=4)
    compiled = DiffusionPrior.from_pretrained(tiny_prior_dir, device="cpu",
                                              fast_path=FastPathConfig(compile=True, min_bucket=4))
    out = compiled.reconstruct(noisy, 0.2, steps=3, batch_size=4)
    assert out.fast_path == "fp32 + channels_last + compile" and out.notes == []
    torch.testing.assert_close(out.images, eager.images, atol=1e-4, rtol=0)


def test_a_compile_failure_falls_back_to_eager_with_a_warning(tiny_prior_dir, fashion_images):
    noisy = fashion_images[:3]
    eager = DiffusionPrior.from_pretrained(tiny_prior_dir, device="cpu").reconstruct(noisy, 0.2, steps=3)
    broken = DiffusionPrior.from_pretrained(tiny_prior_dir, device="cpu",
                                            fast_path=FastPathConfig(compile=True, compile_mode="no-such-mode"))
    with pytest.warns(RuntimeWarning, match="compile switched off.*no-such-mode"):
        out = broken.reconstruct(noisy, 0.2, steps=3)
    assert out.fast_path == "fp32 + channels_last" and "compile switched off" in out.notes[0]
    torch.testing.assert_close(out.images, eager.images, atol=0, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_cuda_fast_path_matches_eager_fp32(tiny_prior_dir, fashion_images, sampler):
    noisy = (fashion_images[:20] + 0.2 * torch.randn(20, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    std = torch.linspace(0.05, 0.3, 20)
    runs = {}
    for name, config in {"eager": FastPathConfig.eager(),
                         "graphs": FastPathConfig(precision="fp32", compile=False, cuda_graphs=True),
                         "compile+graphs": FastPathConfig(precision="fp32")}.items():
        prior = DiffusionPrior.from_pretrained(tiny_prior_dir, device="cuda", fast_path=config)
        runs[name] = prior.reconstruct(noisy, std, sampler=sampler, steps=5, batch_size=16)
        assert runs[name].notes == [], runs[name].notes
    # DDPM's step noise is drawn per padded bucket on the fast path, so only DDIM is compared image by image.
    if sampler == "ddim":
        for name in ("graphs", "compile+graphs"):
            torch.testing.assert_close(runs[name].images, runs["eager"].images, atol=2e-3, rtol=0)
        # The auditor's own default, bf16 CUDA graphs without compile: close to fp32, not equal.
        prior = DiffusionPrior.from_pretrained(tiny_prior_dir, device="cuda", fast_path=FastPathConfig(compile=False))
        bf16 = prior.reconstruct(noisy, std, sampler=sampler, steps=5, batch_size=16)
        assert bf16.fast_path == "bf16 + cuda_graphs" and bf16.notes == [], (bf16.fast_path, bf16.notes)
        assert float((bf16.images - runs["eager"].images).abs().mean()) < 0.03
    else:
        for name in ("graphs", "compile+graphs"):
            assert runs[name].images.shape == runs["eager"].images.shape
            assert abs(float(runs[name].images.mean() - runs["eager"].images.mean())) < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@torch.no_grad()
def test_cuda_graph_replays_queued_on_two_streams_keep_their_buffers_apart(tiny_prior_dir):
    # The graphs' static buffers are shared by every caller, and the lock orders only their host calls: a caller on
    # another stream (the audit worker's) would otherwise overwrite the buffers while the GPU still replays the last
    # caller's steps. A's 1,000 DDPM steps are queued in milliseconds and run for far longer, so B, queued right after
    # on a stream of its own, lands in the middle of them unless it waits for them.
    prior = DiffusionPrior.from_pretrained(tiny_prior_dir, device="cuda",
                                           fast_path=FastPathConfig(precision="fp32", compile=False, cuda_graphs=True))
    process = prior.reverse_process
    plan = plan_ddpm(torch.full((8,), 999), alphas_cumprod=prior.alphas_cumprod)
    inputs = [torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(seed)).cuda() for seed in (0, 1)]

    def run(x, seed, stream):
        with torch.cuda.stream(stream):
            return process.run(x, plan, generator=torch.Generator("cuda").manual_seed(seed), batch_size=8)

    default = torch.cuda.current_stream()
    expected = [run(x, seed, default).cpu() for seed, x in enumerate(inputs)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for stream in streams:
        stream.wait_stream(default)
    results = [run(x, seed, stream) for seed, x, stream in zip((0, 1), inputs, streams)]
    torch.cuda.synchronize()
    assert process.describe() == "fp32 + cuda_graphs" and not process.fallbacks
    for result, reference in zip(results, expected):
        torch.testing.assert_close(result.cpu(), reference, atol=1e-6, rtol=0)


def test_the_fixed_shape_loop_matches_the_sliced_eager_loop():
    """The loop that compile and CUDA graphs use (padded bucket, waiting rows kept still) against the eager one."""
    unet, abar = _unet(), DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    process = ReverseProcess(unet, prediction_type="epsilon", clip_sample=True, channels=1,
                             device=torch.device("cpu"), config=FastPathConfig.eager())
    x = torch.randn(3, 1, 16, 16)
    ddim = plan_ddim(torch.tensor([600, 300, 20]), steps=8, alphas_cumprod=abar)
    fixed = process._run_fixed(x, ddim.padded(8), generator=None)
    torch.testing.assert_close(fixed[:3], process._run_eager(x, ddim, generator=None), atol=1e-5, rtol=0)
    # DDPM with one t* for all: both loops draw the same noise from the same generator.
    ddpm = plan_ddpm(torch.tensor([40, 40, 40]), alphas_cumprod=abar)
    fixed = process._run_fixed(x, ddpm, generator=torch.Generator().manual_seed(3))
    eager = process._run_eager(x, ddpm, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(fixed, eager, atol=1e-5, rtol=0)


def test_a_frozen_process_never_enters_the_compiler_again():
    import threading

    unet, abar = _unet(), DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    process = ReverseProcess(unet, prediction_type="epsilon", clip_sample=True, channels=1,
                             device=torch.device("cpu"), config=FastPathConfig(compile=True))
    process.prepare((8, 1, 16, 16), batch_size=8)
    process.freeze()
    assert process.compiled_threads == {threading.get_ident()} and process.fallbacks == []
    plan = plan_ddim(torch.tensor([50, 40, 30]), steps=3, alphas_cumprod=abar)
    x = torch.randn(3, 1, 16, 16)
    results = []
    worker = threading.Thread(target=lambda: results.append(process.run(x, plan, generator=None, batch_size=8)))
    worker.start()
    worker.join()
    assert process.compiled_threads == {threading.get_ident()}  # the worker ran the uncompiled step
    torch.testing.assert_close(results[0], process._run_eager(x, plan, generator=None), atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="frozen"):
        process.prepare((8, 1, 16, 16), batch_size=8)


def test_a_compiled_process_pads_to_a_size_it_has_compiled_rather_than_compile_another():
    unet, abar = _unet(), DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    process = ReverseProcess(unet, prediction_type="epsilon", clip_sample=True, channels=1,
                             device=torch.device("cpu"), config=FastPathConfig(compile=True))
    # A seeded DDPM run is the same on the call that compiles and checks the shape as on the next one.
    ddpm = plan_ddpm(torch.tensor([6] * 10 + [3] * 10), alphas_cumprod=abar)
    x = torch.randn(20, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    first, second = (process.run(x, ddpm, generator=torch.Generator().manual_seed(1), batch_size=32) for _ in "12")
    assert torch.equal(first, second)
    for count in (20, 5):  # buckets 32 and 8: the 5 images ride in the compiled 32
        plan = plan_ddim(torch.full((count,), 60), steps=2, alphas_cumprod=abar)
        x = torch.randn(count, 1, 16, 16, generator=torch.Generator().manual_seed(count))
        out = process.run(x, plan, generator=None, batch_size=32)
        torch.testing.assert_close(out, process._run_eager(x, plan, generator=None), atol=1e-4, rtol=0)
    assert process._compiled_sizes == {32} and process.fallbacks == []


def test_reverse_process_rejects_a_plan_of_another_batch():
    unet = _unet()
    process = ReverseProcess(unet, prediction_type="epsilon", clip_sample=True, channels=1,
                             device=torch.device("cpu"))
    plan = plan_ddim(torch.tensor([10, 10]), steps=2, alphas_cumprod=DDPMScheduler().alphas_cumprod)
    with pytest.raises(ValueError, match="plan for 2 images"):
        process.run(torch.zeros(3, 1, 16, 16), plan, generator=None, batch_size=4)


@pytest.mark.parametrize("version, alone", [("2.11.0+cu130", False), ("2.13.0", False), ("2.14.0a0+git5f1c", False),
                                            ("2.14.1+cu130", True), ("2.15.0", True)])
def test_cuda_graphs_are_safe_beside_training_from_torch_2_14(monkeypatch, version, alone):
    """Up to 2.13 every CUDA graph is tied to the default CUDA generator (the version gate the auditor reads)."""
    from torch.torch_version import TorchVersion

    monkeypatch.setattr(torch, "__version__", TorchVersion(version))
    assert cuda_graphs_leave_default_generator_alone() is alone
