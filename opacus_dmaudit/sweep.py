"""Choosing a noise multiplier: a sweep of the imprint attack through real Opacus DP-SGD steps, per sigma.

For each noise multiplier: the images go, batch by batch, through real DP-SGD steps of the shadow imprint model
(:mod:`opacus_dmaudit.shadow`: Opacus's ghost-clipping DP-SGD with sigma, C and the batch size);
one noisy image per singly-occupied bin is recovered, optionally averaged over ``links`` steps (an attacker who links
a sample across steps), reconstructed with the prior, and scored. Next to it: the empirical success rate per metric
and threshold eta, the prior's baseline kappa (how often a draw from the prior alone is within eta of a target), the
ReRo bound at that kappa for the user's training schedule, and the schedule's epsilon (RDP and PRV).

Under ``torchrun`` each rank takes a share of the noise multipliers; rank 0 gathers and writes. Every figure of a
noise multiplier is seeded by its index alone, so one process and several give the same numbers.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from opacus_dmaudit.bounds import (estimate_kappa, mu_gdp, noise_multiplier_for_epsilon, rero_bound_gdp,
                                   rero_bounds_dpsgd, schedule_epsilon)
from opacus_dmaudit.data import adapt_to_prior
from opacus_dmaudit.metrics import (SUCCESS_THRESHOLDS, ImageMetrics, lpips_status, success_intervals, success_rates,
                                    summarize)
from opacus_dmaudit.prior import DiffusionPrior
from opacus_dmaudit.noise import estimate_noise_std
from opacus_dmaudit.recovery import SCALES, recover_images
from opacus_dmaudit.report import (grid_selection, image_grid, make_private_dir, metrics_and_success_plot,
                                   protect_tree, save_image_grid, write_json, write_private_bytes)
from opacus_dmaudit.shadow import ShadowImprint

__all__ = ["SweepConfig", "SweepEntry", "SweepResult", "run_sweep", "estimate_kappa", "RECOMMEND_ON"]

# What a recommendation compares with the target: the observed success rate, or the top of its interval.
RECOMMEND_ON = ("estimate", "upper")


@dataclass
class SweepConfig:
    """The sweep's settings. ``sample_rate``, ``epochs`` and ``delta`` describe the user's training schedule (for
    epsilon and the bounds); ``batch_size``, ``max_grad_norm`` and ``bins`` the attacked DP-SGD steps, each of which
    attacks at most ``bins`` images (as DMAuditor's shadow mode does: the rest of a larger batch would only share
    bins).

    Attributes:
        noise_multipliers: the sigmas to sweep (or give ``target_epsilons``).
        target_epsilons: epsilons for the schedule; each becomes the sigma that reaches it by Opacus's PRV accountant
            (by its RDP accountant where the PRV grid would not fit in memory, see ``bounds.PRV_MAX_GRID_POINTS``).
        scale: how the attacker fixes each recovered image's scale (``recovery.SCALES``): ``"oracle"``, the clean
            clipped sum (the seed paper's worst case), or an attacker's own estimate (``"clip-norm"``, the strongest,
            learns each bin's typical image norm from the images outside the attacked batch).
        estimate_noise: reconstruct from noise levels the attacker estimates from each image (scikit-image
            ``estimate_sigma``) rather than those recovery gives (``sigma C / |scale|``: the true noise with the
            oracle scale); the entries' ``noise_std`` stays recovery's, ``noise_std_estimated`` holds the estimates.
        success_metric / success_eta / target_success: the recommendation is the smallest sigma whose success rate
            (error within eta) stays at or below ``target_success``, as does every larger sigma swept (rates carry
            sampling error, and one that passes below a larger sigma that fails passes by luck).
        recommend_on: the rate compared with ``target_success``: ``"estimate"``, the observed rate, or ``"upper"``,
            the top of its interval (the conservative choice: the true rate is under the target with
            ``confidence``, which takes more images; 0 of 128 reaches down to only 0.028 at 95%).
        confidence: the level of each success rate's Clopper-Pearson interval (``SweepEntry.success_ci``). The
            recommendation says when the interval of the rate it rests on reaches above ``target_success``: the
            rate is then under the target by sampling luck as much as by the noise, and more images would settle it.
    """

    noise_multipliers: Sequence[float] = (0.3, 1.0, 3.0)
    target_epsilons: Sequence[float] | None = None
    sample_rate: float = 64 / 60000
    epochs: float = 10.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    batch_size: int = 64
    bins: int = 128
    sampler: str = "ddim"
    steps: int = 50
    links: int = 1
    scale: str = "oracle"
    estimate_noise: bool = False
    kappa_samples: int = 64
    success_metric: str = "ssim"
    success_eta: float = 0.5
    target_success: float = 0.05
    recommend_on: str = "estimate"
    confidence: float = 0.95
    seed: int = 0

    def validate(self) -> None:
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if not self.epochs > 0 or not 0 < self.delta < 1 or not self.max_grad_norm > 0:
            raise ValueError("epochs and max_grad_norm must be positive and delta in (0, 1)")
        if self.batch_size < 1 or self.bins < 1 or self.links < 1 or self.steps < 1:
            raise ValueError("batch_size, bins, links and steps must be positive whole numbers")
        if self.target_epsilons is None and any(not s > 0 for s in self.noise_multipliers):
            raise ValueError(f"noise multipliers must be positive, got {list(self.noise_multipliers)}")
        if self.target_epsilons is not None and any(not e > 0 for e in self.target_epsilons):
            raise ValueError(f"target epsilons must be positive, got {list(self.target_epsilons)}")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
        if self.success_metric not in SUCCESS_THRESHOLDS:
            raise ValueError(f"success_metric must be one of {', '.join(SUCCESS_THRESHOLDS)}")
        if not self.success_eta > 0:
            raise ValueError(f"success_eta must be positive, got {self.success_eta}")
        if self.recommend_on not in RECOMMEND_ON:
            raise ValueError(f"recommend_on must be one of {', '.join(RECOMMEND_ON)}, got {self.recommend_on!r}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must lie strictly between 0 and 1 (0.95 for a 95% interval), got "
                             f"{self.confidence}")

    @property
    def thresholds(self) -> dict[str, tuple[float, ...]]:
        """The success thresholds to score: the usual ones, plus ``success_eta`` for ``success_metric`` (so the
        recommendation is made at exactly the eta asked for)."""
        thresholds = dict(SUCCESS_THRESHOLDS)
        thresholds[self.success_metric] = tuple(sorted({*thresholds[self.success_metric], float(self.success_eta)}))
        return thresholds

    @property
    def training_steps(self) -> int:
        return max(1, round(self.epochs / self.sample_rate))


@dataclass
class SweepEntry:
    """One noise multiplier's figures (one element of ``sweep.json``).

    Two bounds sit next to the empirical success rate, because they answer different questions:
    ``rero_bound`` is what DP promises for the user's whole schedule (Poisson sampling at rate q over
    ``epochs / q`` steps: the attacker does not know when a sample was used); ``rero_bound_attack`` covers exactly
    what this attack observes (``links`` steps in which the sample is known to be in the batch:
    ``sqrt(links) / sigma``-GDP). The empirical rate must stay under the second; it can exceed the first.
    ``success_ci`` holds each rate's Clopper-Pearson interval (``low``, ``high``) over the ``n_images`` images.
    """

    noise_multiplier: float
    epsilon: float | None
    epsilon_rdp: float | None
    epsilon_prv: float | None
    delta: float
    mu: float
    links: int
    n_images: int
    noise_std: dict[str, float]
    noise_std_estimated: dict[str, float] | None  # with estimate_noise: the attacker's estimates, same quantiles
    t_start_median: float
    noisy: dict[str, float | None]
    reconstructed: dict[str, float | None]
    success: dict[str, float]
    success_ci: dict[str, dict[str, float]]
    kappa: dict[str, float]
    rero_bound: dict[str, float | None]
    rero_bound_attack: dict[str, float]
    seconds: float


@dataclass
class SweepResult:
    """All entries, the recommendation, and the settings."""

    entries: list[SweepEntry]
    recommendation: dict
    config: dict
    prior: str
    grids: dict[float, torch.Tensor] = field(default_factory=dict, repr=False)

    def to_json(self) -> list[dict]:
        return [asdict(entry) for entry in self.entries]


def _attack(images: torch.Tensor, sigma: float, index: int, config: SweepConfig):
    """Real DP-SGD steps of the shadow imprint model over the images; returns noisy images, stds and sample ids."""
    shadow = ShadowImprint(calibration=images, bins=config.bins, noise_multiplier=sigma,
                           max_grad_norm=config.max_grad_norm, expected_batch_size=config.batch_size,
                           seed=config.seed * 1000 + index)
    noisy, variances, owners = [], [], []
    # As the auditor's shadow mode, each step attacks at most `bins` images: an isolated image's noise depends on its
    # own clip factor, not on the batch's size, and a batch far larger than the bins leaves hardly any image alone
    # (512 in 128 bins: 9 expected; 128 in 128: 47).
    attacked = min(config.batch_size, config.bins)
    for begin in range(0, images.shape[0], attacked):
        batch = images[begin : begin + attacked]
        if config.scale == "clip-norm":
            # The attacker's knowledge of the data must not include its targets, from which the bins were calibrated:
            # its typical norms come from the images outside the attacked batch.
            others = torch.cat([images[:begin], images[begin + attacked:]])
            if others.shape[0] == 0:
                raise ValueError("scale 'clip-norm' takes each bin's typical image norm from the images outside the "
                                 "attacked batch, and there are none: give more images (--limit) than "
                                 f"min(--batch-size, --bins) = {attacked}")
            shadow.block.reference_norms(others)
        total, variance, seen = None, None, None
        for _ in range(config.links):
            recovered = recover_images(shadow.step(batch), shadow.block, scale=config.scale, originals=batch)
            ids = recovered.sample_index
            if total is None:
                total = torch.zeros_like(batch)
                variance = torch.zeros(batch.shape[0], dtype=torch.float64)
                seen = torch.zeros(batch.shape[0], dtype=torch.long)
            total[ids] += recovered.images
            variance[ids] += recovered.noise_std**2
            seen[ids] += 1
        keep = torch.nonzero(seen == config.links).flatten()  # linked in every step
        noisy.append(total[keep] / config.links)
        variances.append(variance[keep].sqrt() / config.links)  # std of the mean of independent noisy copies
        owners.append(keep + begin)
    return torch.cat(noisy), torch.cat(variances), torch.cat(owners)


def _sweep_one(images, sigma, index, *, prior, config, metrics, kappa, steps_total) -> tuple[SweepEntry, torch.Tensor]:
    started = time.perf_counter()
    noisy, stds, owners = _attack(images, sigma, index, config)
    originals = images[owners]
    # The unknown-variance attacker reads the noise level off each image (the estimate sees the unclamped pixels).
    estimated = estimate_noise_std(noisy) if config.estimate_noise else None
    output = prior.reconstruct(noisy, stds if estimated is None else estimated, sampler=config.sampler,
                               steps=config.steps, seed=config.seed + index)
    noisy_values = metrics(noisy.clamp(0, 1), originals)
    recon_values = metrics(output.images, originals)
    epsilons = schedule_epsilon(noise_multiplier=sigma, sample_rate=config.sample_rate, steps=steps_total,
                                delta=config.delta)
    try:
        bounds: dict[str, float | None] = dict(rero_bounds_dpsgd(
            noise_multiplier=sigma, sample_rate=config.sample_rate, steps=steps_total, kappas=kappa))
    except RuntimeError:  # Opacus's PRV discretisation fails at tiny noise multipliers
        bounds = dict.fromkeys(kappa)

    def quantiles(values: torch.Tensor) -> dict[str, float]:
        levels = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
        figures = torch.quantile(values.double(), levels).tolist() if values.numel() else [math.nan] * 3
        return dict(zip(("q10", "median", "q90"), figures))

    entry = SweepEntry(
        noise_multiplier=sigma,
        epsilon=epsilons["prv"] if epsilons["prv"] is not None else epsilons["rdp"],
        epsilon_rdp=epsilons["rdp"], epsilon_prv=epsilons["prv"], delta=config.delta, mu=1.0 / sigma,
        links=config.links, n_images=int(noisy.shape[0]),
        noise_std=quantiles(stds),
        noise_std_estimated=None if estimated is None else quantiles(estimated),
        t_start_median=float(output.t_start.double().median()) if noisy.shape[0] else math.nan,
        noisy=summarize(noisy_values), reconstructed=summarize(recon_values),
        success=success_rates(recon_values, config.thresholds),
        success_ci=success_intervals(recon_values, config.thresholds, confidence=config.confidence),
        kappa=dict(kappa), rero_bound=bounds,
        rero_bound_attack={key: rero_bound_gdp(mu_gdp(sigma, config.links), k) for key, k in kappa.items()},
        seconds=round(time.perf_counter() - started, 3),
    )
    # No grid for a sigma whose attack left no image alone in its bin (its entry says n_images 0). As the auditor's
    # default grid: the 16 reconstructions closest to their training images, what the attacker succeeded on.
    shown = grid_selection(recon_values, count=noisy.shape[0], order="best")[0][:16]
    grid = (image_grid([originals[shown], noisy[shown].clamp(0, 1), output.images[shown]]) if noisy.shape[0]
            else None)
    return entry, grid


def _judged_rate(entry: SweepEntry, key: str, config: SweepConfig) -> float | None:
    """The rate a recommendation compares with the target (None: the entry scored no image)."""
    if entry.n_images == 0 or key not in entry.success:
        return None
    return entry.success_ci[key]["high"] if config.recommend_on == "upper" else entry.success[key]


def _recommend(entries: list[SweepEntry], config: SweepConfig, *, caveat: str | None = None) -> dict:
    key = f"{config.success_metric}@{config.success_eta:g}"
    scored = [e for e in sorted(entries, key=lambda e: e.noise_multiplier) if _judged_rate(e, key, config) is not None]
    unscored = [e.noise_multiplier for e in entries if e.n_images == 0]
    # The smallest sigma from which every larger one swept meets the target: a smaller sigma that meets it below a
    # larger one that does not met it by sampling luck, and more noise does not make an attack stronger.
    safe: list[SweepEntry] = []
    for entry in reversed(scored):
        if _judged_rate(entry, key, config) > config.target_success:
            break
        safe.insert(0, entry)
    below_a_failure = scored[: len(scored) - len(safe)]
    lucky = [e.noise_multiplier for e in below_a_failure if _judged_rate(e, key, config) <= config.target_success]
    judged = "the top of its interval" if config.recommend_on == "upper" else "its success rate"
    if not safe:
        recommendation = {"noise_multiplier": None, "criterion": key, "target_success": config.target_success,
                          "recommend_on": config.recommend_on,
                          "message": "no recommendation" if len(unscored) == len(entries) else
                          f"no swept noise multiplier keeps {judged} ({key}) at or below {config.target_success:g}"
                          f"{' from there on' if lucky else ''}"}
        # Where DP's own bound for the attacked step already meets the target, a larger sigma cannot bring the rate
        # much lower (it sits near the prior's baseline): what is missing is images, not noise.
        bounded = [e for e in scored if e.rero_bound_attack.get(key, math.inf) <= config.target_success]
        if bounded:
            recommendation["bound_meets_target_from"] = bounded[0].noise_multiplier
            recommendation["message"] += (
                f"; but from noise multiplier {bounded[0].noise_multiplier:g} on, the attacked step's ReRo bound "
                f"({bounded[0].rero_bound_attack[key]:.3f}) is itself at or below it: DP holds any attacker of the "
                "step to that (at the prior's baseline kappa, without the side information this attack has), so "
                f"attack more images (--limit, now {bounded[0].n_images} scored) to see whether this attack's rate "
                "is under the target too, rather than sweeping larger ones")
        elif len(unscored) < len(entries):
            recommendation["message"] += ": sweep larger ones"
    else:
        best = safe[0]
        interval = best.success_ci.get(key, {"low": math.nan, "high": math.nan})
        low, high = interval["low"], interval["high"]
        compared = (f"{key} success rate {best.success.get(key, 0):.3f}, the top of its {config.confidence:.0%} "
                    f"interval {high:.3f} <= {config.target_success:g} (interval from {low:.3f}, over "
                    f"{best.n_images} images)" if config.recommend_on == "upper" else
                    f"{key} success rate {best.success.get(key, 0):.3f} <= {config.target_success:g} "
                    f"({config.confidence:.0%} interval {low:.3f} to {high:.3f} over {best.n_images} images)")
        recommendation = {
            "noise_multiplier": best.noise_multiplier, "epsilon": best.epsilon, "delta": config.delta,
            "criterion": key, "target_success": config.target_success, "recommend_on": config.recommend_on,
            "success": best.success.get(key), "success_ci": dict(interval), "confidence": config.confidence,
            "message": f"noise multiplier {best.noise_multiplier:g}: {compared}, epsilon "
                       f"{best.epsilon if best.epsilon is not None else float('nan'):.3g} at delta {config.delta:g} "
                       f"for your schedule (q = {config.sample_rate:g}, {config.epochs:g} epochs)"}
        if high > config.target_success and config.recommend_on == "estimate":
            # The rate is under the target, but so few images were attacked that a true rate above it would often
            # give the same count: the choice must not look firmer than it is.
            recommendation["message"] += (f"; the interval reaches above {config.target_success:g}, so the rate may "
                                          "be under the target by chance: attack more images (--limit) to settle it, "
                                          "or recommend on the interval's top (--recommend-on upper)")
    if lucky:
        recommendation["met_below_a_failure"] = lucky
        larger = [e.noise_multiplier for e in below_a_failure if e.noise_multiplier > lucky[0]
                  and _judged_rate(e, key, config) > config.target_success]
        recommendation["message"] += (f"; noise multiplier {', '.join(f'{s:g}' for s in lucky)} met the target too, "
                                      f"but the larger {', '.join(f'{s:g}' for s in larger)} did not: that pass is "
                                      "sampling luck (more noise does not help an attacker), so it is not recommended")
    if unscored:
        # Their success rate is not 0 but unknown: no recommendation may rest on them, and the user must know why.
        recommendation["unscored"] = unscored
        recommendation["message"] += (f"; no image was recovered at noise multiplier "
                                      f"{', '.join(f'{s:g}' for s in unscored)} (no bin held a single image), so it "
                                      "has no success rate: give more images or more bins")
    estimates = [what for what, estimated in (("scale", config.scale != "oracle"),
                                              ("noise level", config.estimate_noise)) if estimated]
    if estimates:
        # An attacker who estimates what the worst case knows succeeds less often: the recommended noise multiplier
        # is safe against this attacker, not against every one.
        recommendation["attacker"] = {"scale": config.scale, "estimate_noise": config.estimate_noise}
        recommendation["message"] += (f"; the attacker estimates its {' and '.join(estimates)} (scale "
                                      f"{config.scale!r}), so these success rates can understate the worst case "
                                      "(scale 'oracle', known noise)")
    if caveat:
        # Capped scores make the attack look weaker than one with a matching prior: the recommended noise
        # multiplier may be too small, so the recommendation must not travel without this.
        recommendation["caveat"] = caveat
        recommendation["message"] += (f". Caveat: {caveat}, so these success rates understate an attacker with a "
                                      "matching prior")
    return recommendation


def run_sweep(images: torch.Tensor, prior: DiffusionPrior, *, config: SweepConfig | None = None,
              out_dir: str | Path | None = None, progress: bool = False) -> SweepResult:
    """Run the sweep (see the module docstring); writes the outputs to ``out_dir`` on rank 0 when given.

    Raises:
        ValueError: for invalid settings.
    """
    config = config or SweepConfig()
    config.validate()
    lpips = lpips_status()
    if config.success_metric == "lpips" and not lpips.available:
        # Refused now rather than after the whole sweep, whose recommendation would have had nothing to go by.
        raise ValueError(f"success_metric 'lpips' cannot be scored here: {lpips.reason}; choose ssim or mse")
    if config.target_epsilons is not None:
        sigmas = [noise_multiplier_for_epsilon(target_epsilon=e, delta=config.delta, sample_rate=config.sample_rate,
                                               steps=config.training_steps) for e in config.target_epsilons]
    else:
        sigmas = [float(s) for s in config.noise_multipliers]
    images = images.detach().float().cpu()
    metrics = ImageMetrics(metrics=("mse", "psnr", "ssim", "lpips"))
    kappa = estimate_kappa(prior, images, metrics=metrics, samples=config.kappa_samples, sampler=config.sampler,
                           steps=config.steps, seed=config.seed, thresholds=config.thresholds)

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    mine = []
    for index, sigma in enumerate(sigmas):
        if index % world != rank:
            continue
        if progress:
            print(f"  sigma {sigma:g} ...", flush=True)
        entry, grid = _sweep_one(images, sigma, index, prior=prior, config=config, metrics=metrics, kappa=kappa,
                                 steps_total=config.training_steps)
        mine.append((index, entry, grid))
    if distributed:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, mine)
        mine = [item for part in gathered for item in part]
    mine.sort(key=lambda item: item[0])
    entries = [entry for _, entry, _ in mine]
    _, adaptation = adapt_to_prior(images[:1], resolution=prior.resolution, channels=prior.channels)
    recommendation = _recommend(entries, config, caveat=adaptation.loss_note())
    result = SweepResult(entries=entries, recommendation=recommendation, config=asdict(config),
                         prior=prior.name,
                         grids={entry.noise_multiplier: grid for _, entry, grid in mine if grid is not None})
    if out_dir is not None and rank == 0:
        write_sweep(result, out_dir)
    return result


def write_sweep(result: SweepResult, out_dir: str | Path) -> Path:
    """sweep.json, sweep.csv, plots, one grid per sigma and TensorBoard logs (owner-only: grids show images)."""
    out = make_private_dir(out_dir)
    write_json(out / "sweep.json", result.to_json())
    write_json(out / "recommendation.json", {"recommendation": result.recommendation, "config": result.config,
                                             "prior": result.prior})
    rows = [_flatten(asdict(e)) for e in result.entries]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["noise_multiplier"])
    writer.writeheader()
    writer.writerows(rows)
    write_private_bytes(out / "sweep.csv", buffer.getvalue().encode())
    for sigma, grid in result.grids.items():
        save_image_grid([grid.unsqueeze(0)], out / f"grid_sigma_{sigma:g}.png")
    _plot(result, out)
    from torch.utils.tensorboard import SummaryWriter

    writer_tb = SummaryWriter(log_dir=str(out / "tensorboard"))
    for i, entry in enumerate(result.entries):
        for prefix, values in (("noisy", entry.noisy), ("reconstructed", entry.reconstructed),
                               ("success_rate", entry.success), ("rero_bound", entry.rero_bound),
                               ("rero_bound_attack", entry.rero_bound_attack)):
            for name, value in values.items():
                if value is not None and value == value and math.isfinite(value):
                    writer_tb.add_scalar(f"sweep/{prefix}/{name}", value, global_step=i)
        if entry.epsilon is not None:
            writer_tb.add_scalar("sweep/epsilon", entry.epsilon, global_step=i)
        writer_tb.add_scalar("sweep/noise_multiplier", entry.noise_multiplier, global_step=i)
        if entry.noise_multiplier in result.grids:
            writer_tb.add_image("sweep/original_noisy_reconstructed", result.grids[entry.noise_multiplier],
                                global_step=i)
    writer_tb.add_text("sweep/recommendation", result.recommendation["message"], global_step=0)
    writer_tb.close()
    protect_tree(out / "tensorboard")
    return out


def _flatten(record: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def _plot(result: SweepResult, out: Path) -> None:
    entries = [e for e in result.entries if e.n_images]
    if not entries:
        return
    bounds = [("ReRo bound, schedule", "s:", 1.0, lambda e, key: e.rero_bound.get(key)),
              ("ReRo bound, attacked steps", "^--", 0.6, lambda e, key: e.rero_bound_attack.get(key))]
    for axis_name, xs in (("sigma", [e.noise_multiplier for e in entries]),
                          ("epsilon", [e.epsilon if e.epsilon is not None else math.nan for e in entries])):
        png = metrics_and_success_plot(entries, xs, x_label=axis_name, bounds=bounds,
                                       confidence=result.config["confidence"],
                                       title=f"opacus-dmaudit sweep, prior {result.prior}")
        write_private_bytes(out / f"sweep_vs_{axis_name}.png", png, private=False)
