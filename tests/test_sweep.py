import json
import subprocess
import sys

import pytest
import torch

from opacus_dmaudit.metrics import lpips_status
from opacus_dmaudit.prior import DiffusionPrior
from opacus_dmaudit.sweep import SweepConfig, run_sweep


def test_sweep_writes_figures_bounds_and_a_recommendation(tmp_path, fashion_images, tiny_prior_dir):
    prior = DiffusionPrior.from_pretrained(tiny_prior_dir, device="cpu")
    config = SweepConfig(noise_multipliers=(3.0, 0.3), batch_size=32, bins=64, steps=2, kappa_samples=2,
                         sample_rate=0.01, epochs=1)
    result = run_sweep(fashion_images[:64], prior, config=config, out_dir=tmp_path / "sweep")
    entries = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [e["noise_multiplier"] for e in entries] == [3.0, 0.3]
    low, high = entries[1], entries[0]  # sigma 0.3 and 3
    assert low["epsilon"] > high["epsilon"] > 0 and low["mu"] == pytest.approx(1 / 0.3)
    # The recovered noise follows sigma (the DP floor scales with it), so the noisy images get worse.
    assert high["noise_std"]["median"] == pytest.approx(10 * low["noise_std"]["median"], rel=0.05)
    assert low["noisy"]["psnr"] > high["noisy"]["psnr"]
    for entry in entries:
        assert set(entry["success"]) == set(entry["kappa"]) == set(entry["rero_bound"]) == set(entry["success_ci"])
        for key, rate in entry["success"].items():
            assert entry["success_ci"][key]["low"] <= rate <= entry["success_ci"][key]["high"]
        for key, bound in entry["rero_bound"].items():
            assert entry["kappa"][key] <= bound <= 1.0
            assert entry["kappa"][key] <= entry["rero_bound_attack"][key] <= 1.0
    assert low["rero_bound"]["mse@0.03"] >= high["rero_bound"]["mse@0.03"]
    for name in ("sweep.csv", "sweep_vs_sigma.png", "sweep_vs_epsilon.png", "grid_sigma_0.3.png",
                 "recommendation.json"):
        assert (tmp_path / "sweep" / name).is_file(), name
    assert (tmp_path / "sweep" / "grid_sigma_0.3.png").stat().st_mode & 0o077 == 0
    assert list((tmp_path / "sweep" / "tensorboard").glob("events.out.tfevents.*"))
    assert result.recommendation["criterion"] == "ssim@0.5"
    # Each grid shows the reconstructions closest to their training images, highest SSIM first.
    from opacus_dmaudit.metrics import ssim

    tiles = result.grids[0.3][0, 2:, 2:].unfold(0, 28, 30).unfold(1, 28, 30)  # rows × columns × 28 × 28
    shown = ssim(tiles[2].unsqueeze(1), tiles[0].unsqueeze(1))
    assert len(shown) == min(16, low["n_images"]) and all(shown[:-1] >= shown[1:] - 1e-6), shown


def test_a_recommendation_that_rests_on_too_few_images_says_so():
    from opacus_dmaudit.metrics import success_interval
    from opacus_dmaudit.sweep import SweepEntry, _recommend

    def entry(hits, images, sigma=3.0):
        low, high = success_interval(hits, images)
        return SweepEntry(noise_multiplier=sigma, epsilon=0.12, epsilon_rdp=0.2, epsilon_prv=0.12, delta=1e-5,
                          mu=1 / 3, links=1, n_images=images, noise_std={"median": 36.9}, noise_std_estimated=None,
                          t_start_median=921.0, noisy={}, reconstructed={}, success={"ssim@0.5": hits / images},
                          success_ci={"ssim@0.5": {"low": low, "high": high}}, kappa={"ssim@0.5": 0.016},
                          rero_bound={"ssim@0.5": 0.017}, rero_bound_attack={"ssim@0.5": 0.035}, seconds=1.0)

    # 2 of 128 (the README's sweep at sigma 3) is under 5%, but a true rate of 5.5% gives so few hits 2.5% of the time.
    unsure = _recommend([entry(2, 128)], SweepConfig())
    assert unsure["noise_multiplier"] == 3.0 and unsure["success_ci"]["high"] == pytest.approx(0.0553, abs=1e-4)
    assert "(95% interval 0.002 to 0.055 over 128 images)" in unsure["message"]
    assert unsure["message"].endswith("the interval reaches above 0.05, so the rate may be under the target by "
                                      "chance: attack more images (--limit) to settle it, or recommend on the "
                                      "interval's top (--recommend-on upper)")
    firm = _recommend([entry(8, 1024)], SweepConfig())
    assert firm["success_ci"]["high"] < 0.05 and "by chance" not in firm["message"]
    # On the interval's top, 2 of 128 does not meet 5%; 8 of 1,024 (top 0.015) does, and so does 2 of 128 at 10%.
    upper = SweepConfig(recommend_on="upper")
    assert _recommend([entry(2, 128)], upper)["noise_multiplier"] is None
    refused = _recommend([entry(2, 128)], upper)
    assert "keeps the top of its interval (ssim@0.5) at or below 0.05" in refused["message"]
    # sigma 3's attacked-step bound, 0.035, is itself under the target: more images, not more noise, would settle it.
    assert refused["bound_meets_target_from"] == 3.0 and "sweep larger" not in refused["message"]
    assert ("from noise multiplier 3 on, the attacked step's ReRo bound (0.035) is itself at or below it"
            in refused["message"]) and "attack more images (--limit, now 128 scored)" in refused["message"]
    firm_upper = _recommend([entry(8, 1024)], upper)
    assert firm_upper["noise_multiplier"] == 3.0 and firm_upper["recommend_on"] == "upper"
    assert "the top of its 95% interval 0.015 <= 0.05" in firm_upper["message"]
    assert _recommend([entry(2, 128)], SweepConfig(recommend_on="upper", target_success=0.1))["noise_multiplier"] == 3
    with pytest.raises(ValueError, match="confidence must lie strictly between 0 and 1"):
        SweepConfig(confidence=95).validate()
    with pytest.raises(ValueError, match="recommend_on must be one of estimate, upper"):
        SweepConfig(recommend_on="lower").validate()


def test_a_sigma_that_passes_below_a_larger_one_that_fails_is_not_recommended():
    from opacus_dmaudit.metrics import success_interval
    from opacus_dmaudit.sweep import SweepEntry, _recommend

    def entry(sigma, hits, images=256):
        low, high = success_interval(hits, images)
        return SweepEntry(noise_multiplier=sigma, epsilon=1 / sigma, epsilon_rdp=1 / sigma, epsilon_prv=1 / sigma,
                          delta=1e-5, mu=1 / sigma, links=1, n_images=images, noise_std={"median": sigma},
                          noise_std_estimated=None, t_start_median=500.0, noisy={}, reconstructed={},
                          success={"ssim@0.5": hits / images}, success_ci={"ssim@0.5": {"low": low, "high": high}},
                          kappa={}, rero_bound={}, rero_bound_attack={}, seconds=1.0)

    # 10, 14 and 3 of 256: sigma 1 passes (3.9%) by the luck of its draw, as sigma 2 (5.5%) shows.
    entries = [entry(3.0, 3), entry(1.0, 10), entry(2.0, 14), entry(0.5, 40)]
    recommendation = _recommend(entries, SweepConfig())
    assert recommendation["noise_multiplier"] == 3.0 and recommendation["met_below_a_failure"] == [1.0]
    assert ("noise multiplier 1 met the target too, but the larger 2 did not: that pass is sampling luck"
            in recommendation["message"])
    # The largest failing: nothing from there on meets the target.
    failing = _recommend([entry(1.0, 10), entry(2.0, 14)], SweepConfig())
    assert failing["noise_multiplier"] is None and failing["met_below_a_failure"] == [1.0]
    assert "at or below 0.05 from there on: sweep larger ones" in failing["message"]
    # Rates that fall with sigma: the smallest passing one, as before.
    plain = _recommend([entry(1.0, 20), entry(2.0, 10), entry(3.0, 3)], SweepConfig())
    assert plain["noise_multiplier"] == 2.0 and "met_below_a_failure" not in plain


def test_a_batch_larger_than_the_bins_is_attacked_in_steps_of_as_many_images_as_bins(fashion_images, tiny_prior_dir):
    # 64 images in one step of 16 bins would leave about one alone; four steps of 16 leave about 6 each.
    prior = DiffusionPrior.from_pretrained(tiny_prior_dir, device="cpu")
    config = SweepConfig(noise_multipliers=(1.0,), batch_size=256, bins=16, steps=1, kappa_samples=1)
    entry, = run_sweep(fashion_images[:64], prior, config=config).entries
    assert entry.n_images >= 12


def test_a_noise_multiplier_that_recovers_no_image_is_named_and_written_without_a_grid(tmp_path, tiny_prior_dir):
    # Images of one brightness all share one bin: nothing is recovered, and there is no success rate to go by.
    prior = DiffusionPrior.from_pretrained(tiny_prior_dir, device="cpu")
    config = SweepConfig(noise_multipliers=(1.0,), batch_size=8, bins=4, steps=1, kappa_samples=1)
    result = run_sweep(torch.full((8, 1, 28, 28), 0.5), prior, config=config, out_dir=tmp_path)
    assert result.entries[0].n_images == 0 and result.recommendation["unscored"] == [1.0]
    assert result.recommendation["message"] == ("no recommendation; no image was recovered at noise multiplier 1 (no "
                                                "bin held a single image), so it has no success rate: give more "
                                                "images or more bins")
    assert (tmp_path / "sweep.json").is_file() and not list(tmp_path.glob("grid_sigma_*.png"))


def test_a_prior_that_loses_colour_puts_a_caveat_on_the_recommendation(fashion_images, tiny_prior_dir):
    # Gray reconstructions of colour images score low whatever the noise, so the attack looks weaker than one with a
    # matching prior and the recommended noise multiplier may be too small: the recommendation must say so.
    prior = DiffusionPrior.from_pretrained(tiny_prior_dir, device="cpu")
    config = SweepConfig(noise_multipliers=(1.0,), batch_size=32, bins=64, steps=1, kappa_samples=1)
    gray = fashion_images[:32]
    colour = gray.expand(-1, 3, -1, -1) * torch.tensor([1.0, 0.6, 0.2]).view(1, 3, 1, 1)
    caveat = run_sweep(colour, prior, config=config).recommendation
    assert "lose colour" in caveat["caveat"] and "Caveat: reconstructions lose colour" in caveat["message"]
    assert "caveat" not in run_sweep(gray, prior, config=config).recommendation


def test_the_recommendation_is_made_at_the_eta_asked_for(fashion_images, tiny_prior_dir):
    # 0.4 is not one of the usual thresholds (0.3, 0.5): it used to find no success rate at all and recommend
    # "sweep larger ones" whatever the figures.
    prior = DiffusionPrior.from_pretrained(tiny_prior_dir, device="cpu")
    config = SweepConfig(noise_multipliers=(100.0,), batch_size=32, bins=64, steps=1, kappa_samples=1,
                         success_eta=0.4, target_success=1.0)
    result = run_sweep(fashion_images[:32], prior, config=config)
    entry = result.entries[0]
    assert {"ssim@0.3", "ssim@0.4", "ssim@0.5"} <= set(entry.success) == set(entry.kappa) == set(entry.rero_bound)
    assert entry.success["ssim@0.3"] <= entry.success["ssim@0.4"] <= entry.success["ssim@0.5"]
    assert result.recommendation["criterion"] == "ssim@0.4" and result.recommendation["noise_multiplier"] == 100.0


@pytest.mark.skipif(lpips_status().available, reason="LPIPS-VGG weights are here, so an LPIPS sweep can run")
def test_an_lpips_sweep_without_lpips_is_refused_before_it_runs(fashion_images, tiny_prior_dir):
    prior = DiffusionPrior.from_pretrained(tiny_prior_dir, device="cpu")
    with pytest.raises(ValueError, match="success_metric 'lpips' cannot be scored here: .*choose ssim or mse"):
        run_sweep(fashion_images[:32], prior, config=SweepConfig(success_metric="lpips"))


def test_linking_steps_lowers_the_noise(fashion_images, tiny_prior_dir):
    prior = DiffusionPrior.from_pretrained(tiny_prior_dir, device="cpu")
    base = dict(noise_multipliers=(0.05,), batch_size=32, bins=64, steps=1, kappa_samples=1)
    one = run_sweep(fashion_images[:32], prior, config=SweepConfig(**base)).entries[0]
    four = run_sweep(fashion_images[:32], prior, config=SweepConfig(**base, links=4)).entries[0]
    assert four.noise_std["median"] == pytest.approx(one.noise_std["median"] / 2, rel=0.05)
    assert four.noisy["psnr"] > one.noisy["psnr"] + 2  # a quarter of the variance (clamped images: under 6 dB)


def test_the_attacker_can_estimate_its_scale_and_noise_level(fashion_images, tiny_prior_dir):
    prior = DiffusionPrior.from_pretrained(tiny_prior_dir, device="cpu")
    base = dict(noise_multipliers=(0.05,), batch_size=32, bins=64, steps=1, kappa_samples=1)
    worst = run_sweep(fashion_images[:32], prior, config=SweepConfig(**base))
    scaled = run_sweep(fashion_images[:32], prior, config=SweepConfig(**base, scale="bin-measurement"))
    attacker = run_sweep(fashion_images[:32], prior,
                         config=SweepConfig(**base, scale="bin-measurement", estimate_noise=True))
    assert worst.entries[0].noise_std_estimated is None and "attacker" not in worst.recommendation
    # Rescaled by the bin's measurement, each image carries other noise than the clean sum gives it.
    assert scaled.entries[0].noise_std["median"] != pytest.approx(worst.entries[0].noise_std["median"], rel=1e-3)
    entry = attacker.entries[0]
    assert entry.noise_std == scaled.entries[0].noise_std  # recovery's, whatever the estimates
    # scikit-image's estimate, from the images alone, lands near the noise DP put there; t* follows it.
    assert entry.noise_std_estimated["median"] == pytest.approx(entry.noise_std["median"], rel=0.15)
    assert entry.noise_std_estimated != entry.noise_std
    assert entry.t_start_median != scaled.entries[0].t_start_median
    assert attacker.recommendation["attacker"] == {"scale": "bin-measurement", "estimate_noise": True}
    assert "the attacker estimates its scale and noise level" in attacker.recommendation["message"]
    with pytest.raises(ValueError, match="scale must be one of oracle, bin-measurement, noisy-bias, clip-norm"):
        run_sweep(fashion_images[:8], prior, config=SweepConfig(scale="clean"))


def test_the_clip_norm_attacker_learns_norms_from_other_images_than_its_targets(fashion_images, tiny_prior_dir,
                                                                                monkeypatch):
    from opacus_dmaudit.imprint import ImprintBlock

    prior = DiffusionPrior.from_pretrained(tiny_prior_dir, device="cpu")
    base = dict(noise_multipliers=(3.0,), batch_size=32, bins=32, steps=1, kappa_samples=1)
    worst = run_sweep(fashion_images[:96], prior, config=SweepConfig(**base)).entries[0]
    references, reference_norms = [], ImprintBlock.reference_norms

    def recorded(block, images, **kwargs):  # the real method, its reference images recorded
        references.append(images.clone())
        return reference_norms(block, images, **kwargs)

    monkeypatch.setattr(ImprintBlock, "reference_norms", recorded)
    clipped = run_sweep(fashion_images[:96], prior, config=SweepConfig(**base, scale="clip-norm"))
    entry = clipped.entries[0]
    # Calibration's own call, then one per attacked batch: the images of the other two batches.
    batches = fashion_images[:96].split(32)
    assert len(references) == 4 and torch.equal(references[0], fashion_images[:96])
    for attacked, reference in enumerate(references[1:]):
        assert torch.equal(reference, torch.cat([b for i, b in enumerate(batches) if i != attacked]))
    # The bins were calibrated on these 96 images, three to a bin: norms learned from them would be mostly the
    # targets' own. From the other batches' images the attacker's scale is near the oracle's, not equal to it.
    assert entry.n_images == worst.n_images
    assert entry.noise_std["median"] != worst.noise_std["median"]
    assert entry.noise_std["median"] == pytest.approx(worst.noise_std["median"], rel=0.15)
    assert clipped.recommendation["attacker"] == {"scale": "clip-norm", "estimate_noise": False}
    with pytest.raises(ValueError, match=r"images outside the attacked batch, and there are none: give more images"):
        run_sweep(fashion_images[:32], prior, config=SweepConfig(**base, scale="clip-norm"))


def test_the_command_line_takes_the_attackers_estimates(tmp_path, tiny_prior_dir):
    out = subprocess.run([sys.executable, "-m", "opacus_dmaudit", "sweep", "--images", "fashion-mnist", "--prior",
                          tiny_prior_dir, "--noise-multipliers", "0.05", "--limit", "32", "--batch-size", "32",
                          "--bins", "64", "--steps", "1", "--kappa-samples", "1", "--scale", "bin-measurement",
                          "--estimate-noise", "--target-success", "1", "--recommend-on", "upper",
                          "--out", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    written = json.loads((tmp_path / "s" / "recommendation.json").read_text())
    assert written["config"]["scale"] == "bin-measurement" and written["config"]["estimate_noise"] is True
    assert written["recommendation"]["attacker"] == {"scale": "bin-measurement", "estimate_noise": True}
    entry = json.loads((tmp_path / "s" / "sweep.json").read_text())[0]
    assert entry["noise_std_estimated"]["median"] > 0
    assert "the attacker estimates its scale and noise level" in out.stdout
    assert "95% interval" in out.stdout and "95% interval" in written["recommendation"]["message"]
    assert written["config"]["recommend_on"] == written["recommendation"]["recommend_on"] == "upper"
    assert "the top of its 95% interval" in written["recommendation"]["message"]


def test_the_command_line_refuses_a_confidence_outside_0_to_1(capsys):
    from opacus_dmaudit.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["sweep", "--images", "x", "--prior", "y", "--out", "z", "--confidence", "95"])
    assert exit_info.value.code == 2
    assert "--confidence: expected a number between 0 and 1 (0.95 for 95%), got 95" in capsys.readouterr().err


def test_two_processes_give_the_same_figures_as_one(tmp_path, tiny_prior_dir, torchrun):
    args = ["sweep", "--images", "fashion-mnist", "--prior", tiny_prior_dir, "--noise-multipliers", "0.5", "2",
            "--limit", "32", "--batch-size", "32", "--bins", "64", "--steps", "2", "--kappa-samples", "2"]
    single = subprocess.run([sys.executable, "-m", "opacus_dmaudit", *args, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    # 30 s here; a rank that deadlocks at exit fails it sooner.
    double = torchrun("-m", "opacus_dmaudit", *args, "--out", tmp_path / "two", timeout=300)
    assert double.returncode == 0, double.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "sweep.json").read_text())
    two = json.loads((tmp_path / "two" / "sweep.json").read_text())
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in ("noise_multiplier", "epsilon", "n_images", "noise_std", "noisy", "reconstructed", "success",
                    "kappa", "rero_bound"):
            # Equal up to float reduction order (torchrun gives each process one thread).
            assert _close(a[key], b[key]), (key, a[key], b[key])


def _close(a, b, tol=1e-4):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if a is None or b is None:
        return a is b
    return abs(a - b) <= tol * max(1.0, abs(a))


def test_sweep_rejects_bad_settings(fashion_images, tiny_prior_dir):
    prior = DiffusionPrior.from_pretrained(tiny_prior_dir, device="cpu")
    with pytest.raises(ValueError, match="sample_rate"):
        run_sweep(fashion_images[:8], prior, config=SweepConfig(sample_rate=2.0))
    with pytest.raises(ValueError, match="noise multipliers"):
        run_sweep(fashion_images[:8], prior, config=SweepConfig(noise_multipliers=(0.0,)))
