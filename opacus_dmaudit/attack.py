"""The attack on one audited step, on the audit worker: noisy images recovered, reconstructed by the prior, scored.

:class:`AuditAttack` takes the :class:`AuditJob` the training thread queued for a step. Shadow mode first runs the
auditor's own imprint model through Opacus on the step's copied images (``shadow``); inline mode takes the real
step's captured gradients. Either way the imprint's bins give the noisy images and their noise levels
(``recovery``); the prior reconstructs those of several audits in one pass (``prior``); each audit is then scored
against its training images (``metrics``) beside the ReRo bound of its step at the prior's baseline kappa
(``bounds``), as an :class:`AuditRecord`. Logging it, and what an exception does, is the auditor's business.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from opacus_dmaudit.batch_copy import SHARED_BACKWARD, wait_for
from opacus_dmaudit.bounds import PRV_AUDIT_MAX_WORK, estimate_kappa, history_epsilon, rero_bound_gdp
from opacus_dmaudit.capture import CapturedGradients
from opacus_dmaudit.data import denormalize
from opacus_dmaudit.imprint import ImprintBlock, tf32_rows_note
from opacus_dmaudit.metrics import ImageMetrics, success_intervals, success_rates, summarize
from opacus_dmaudit.noise import estimate_noise_std
from opacus_dmaudit.prior import DiffusionPrior, ReconstructionOutput, image_seeds
from opacus_dmaudit.recovery import recover_images
from opacus_dmaudit.report import grid_selection
from opacus_dmaudit.reverse_process import bucket_size
from opacus_dmaudit.shadow import ShadowImprint

__all__ = ["AuditAttack", "AuditJob", "AuditRecord", "RecoveredAudit", "ScoredAudit", "audit_epsilon",
           "outside_bins", "pixel_range_note"]

# How far outside [0, 1] audited images may reach before the auditor says their normalisation was not undone (room for
# rounding, not for a normalisation: those move images by tenths at least).
PIXEL_RANGE_SLACK = 0.01
# Calibrated on the same distribution, about one image in a thousand falls outside the bins (their outer edges
# leave a margin); a quarter says the model's inputs are not what the calibration sampled.
OUTSIDE_BINS_LIMIT = 0.25


@dataclass
class AuditRecord:
    """One audit step, as written to ``audits.jsonl`` (where non-finite numbers, such as the infinite ``epsilon`` of a
    run without noise, are written as null).

    Attributes:
        step: the optimizer step audited (1-based, real steps only), counted as the engine's accountant counts
            them: a run resumed with ``privacy_engine.load_checkpoint`` goes on from its checkpoint's step.
        mode / scale: the auditor's ``mode`` and how the attacker fixed each image's scale.
        batch_size: the audited step's batch: its samples, over all its forwards that had a backward pass of their
            own (a forward before an earlier one's backward pass adds its gradients to that one's samples).
        attacked: how many of its images the imprint attacked (the whole batch inline; at most ``bins`` in shadow
            mode).
        recovered: how many of those were alone in their bin, and so recovered and reconstructed.
        collisions: bins that held two or more images (recovered as none of them).
        noise_multiplier / max_grad_norm: the step's sigma (the accountant's) and clipping norm.
        epsilon / delta: the accountant's epsilon after this step at ``delta`` (None when it has none).
        mu_step: 1/sigma, the attacked step's Gaussian mechanism as mu-GDP (None without noise).
        noise_std_median: the recovered images' per-pixel noise std in pixel units, median over the images.
        t_start_median: the prior's matched start timestep t*, median over the images.
        from_prior: images whose noise exceeded the prior's last timestep: their reconstruction is a prior sample.
        noisy / reconstructed: mean ``mse``, ``psnr`` (dB), ``ssim`` and ``lpips`` (None without its weights) of
            the recovered images and of their reconstructions, against the training images.
        success: ``"<metric>@<eta>"``: the fraction of reconstructions within eta of their training image.
        success_ci: per ``success`` key, that fraction's 95% Clopper-Pearson interval (``low``, ``high``). An
            audit scores few images, so one audit's rate is rough: 1 of 4 leaves anywhere from 0.006 to 0.81.
        seconds: the worker's wall time from the audit's recovery to its scoring (the pass of the prior it shared
            included).
        audits_in_pass: how many audits shared that pass of the prior (``batch_audits``).
        notes: what the figures need said beside them (wrong pixel units, lost colour, another accountant's epsilon).
        kappa: per ``success`` key, how often a draw from the prior alone is within eta of an audited image.
        rero_bound: per ``success`` key, the highest success rate DP allows any attacker of this step at that kappa.
    """

    step: int
    mode: str
    scale: str
    batch_size: int
    attacked: int
    recovered: int
    collisions: int
    noise_multiplier: float
    max_grad_norm: float
    epsilon: float | None
    delta: float
    mu_step: float | None
    noise_std_median: float | None
    t_start_median: float | None
    from_prior: int
    noisy: dict[str, float | None]
    reconstructed: dict[str, float | None]
    success: dict[str, float]
    seconds: float
    audits_in_pass: int = 1
    notes: list[str] = field(default_factory=list)
    kappa: dict[str, float] = field(default_factory=dict)
    rero_bound: dict[str, float] = field(default_factory=dict)
    success_ci: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> str:
        if not self.recovered:
            return f"step {self.step}: no singly-occupied bins ({self.attacked} images of batch {self.batch_size})"
        eps = "n/a" if self.epsilon is None else f"{self.epsilon:.3g}"
        r, n = self.reconstructed, self.noisy
        line = (f"step {self.step}: eps={eps} | {self.recovered} images, noise std {self.noise_std_median:.3g}, "
                f"t*={self.t_start_median:.0f} | PSNR noisy {n['psnr']:.2f} -> reconstructed {r['psnr']:.2f} dB, "
                f"SSIM {n['ssim']:.3f} -> {r['ssim']:.3f}")
        key = "ssim@0.5"
        if key in self.success and key in self.rero_bound:
            line += f" | SSIM >= 0.5: {self.success[key]:.2f}"
            if key in self.success_ci:
                line += f" [{self.success_ci[key]['low']:.2f}, {self.success_ci[key]['high']:.2f}]"
            line += f" (ReRo bound {self.rero_bound[key]:.2f})"
        return line


@dataclass
class AuditJob:
    """What the training thread queues for one audited step: its copied images and, inline, its captured
    gradients, with the step's privacy settings as they were at that step."""

    step: int
    parts: list[torch.Tensor]  # each copied forward's images the audit needs (shadow mode: the step's first `bins`)
    batch_size: int  # the step's whole batch
    captured: CapturedGradients | None
    history: list
    accountant: Any  # the engine's accountant (its kind picks the epsilon's accounting), None without one
    noise_multiplier: float
    max_grad_norm: float
    expected_batch_size: int
    loss_reduction: str
    released_noise_multiplier: float  # the gradients' noise, noise_multiplier but for adaptive clipping
    shared_forwards: int = 0  # forwards that shared an earlier one's backward pass (their images left out)
    # CUDA events recorded on training's streams after the step's copies and capture: the training thread queues its
    # device-to-host copies without waiting for the GPU, so the copied images (pinned memory) and the captured
    # gradients are whole only once these have passed, and the worker waits for them (wait()).
    ready: list = field(default_factory=list)

    def wait(self) -> None:
        """Block this (the worker's) thread until the GPU has made the step's copies and captured its gradients."""
        wait_for(self.ready)
        self.ready = []

    @functools.cached_property
    def batch(self) -> torch.Tensor:
        """The images the audit needs, in one tensor (one forward's copy is not copied again)."""
        self.wait()
        return self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts)


@dataclass
class RecoveredAudit:
    """An audit between recovery and reconstruction."""

    job: AuditJob
    base: dict[str, Any]
    notes: list[str]
    noisy: torch.Tensor
    noise_std: torch.Tensor
    originals: torch.Tensor
    started: float


def outside_bins(block: ImprintBlock, batch: torch.Tensor) -> float:
    """The fraction of ``batch`` whose measurement falls outside the block's bins."""
    bins = block.assign_bins(batch)
    return float(((bins < 0) | (bins >= block.bins)).float().mean())


def pixel_range_note(originals: torch.Tensor, *, input_mean: Sequence[float] | float | None = None,
                     input_std: Sequence[float] | float | None = None) -> str | None:
    """What to say when the audited images (``input_mean`` / ``input_std`` undone) are not in pixel space [0, 1]:
    the prior, the grids and the metrics all assume it, so an undeclared input normalisation would put every figure
    in the wrong units. None when they are."""
    low, high = float(originals.min()), float(originals.max())
    if low >= -PIXEL_RANGE_SLACK and high <= 1.0 + PIXEL_RANGE_SLACK:
        return None
    if input_mean is None and input_std is None:
        told = "no input_mean/input_std was given"
    else:
        told = f"after undoing input_mean={input_mean}, input_std={input_std}"
    if low >= 0 and 1.0 + PIXEL_RANGE_SLACK < high <= 255.0:
        told += "; 0-255 inputs take input_std=1/255"
    return (f"the audited images lie in [{low:.3g}, {high:.3g}] ({told}), not in pixel space [0, 1]: pass the "
            "normalisation your transforms apply as input_mean=/input_std= (e.g. those of transforms.Normalize); "
            "until then the grids and metrics are in the wrong units")


def audit_epsilon(history: list, *, accountant: Any, delta: float, notes: list[str]) -> float | None:
    """The epsilon at ``delta`` after an audited step, from a copy of the accountant's history up to that step (the
    training thread keeps appending to the accountant's own), with what it needs said appended to ``notes``; None
    without an accountant or a history."""
    if accountant is None or not history:
        return None
    if any(float(noise_multiplier) == 0.0 for noise_multiplier, *_ in history):
        # No noise, no privacy: epsilon is infinite, which the PRV and GDP accountants fail to compute.
        return float("inf")
    try:
        # A PRV grid too large for memory (small sigma), or a composition too long for an audit (a noise schedule's
        # many sigmas), gives way to RDP's epsilon, noted in the record.
        epsilon, note = history_epsilon(history, delta=delta, accountant=accountant, max_work=PRV_AUDIT_MAX_WORK)
    except Exception as exc:
        notes.append(f"epsilon unavailable: {exc}")
        return None
    if note is not None:
        notes.append(note)
    return epsilon


@dataclass
class ScoredAudit:
    """An audit scored: its record, and the images of its grid, at most ``max_images`` each: the training images,
    the noisy images recovered from their gradients, and their reconstructions, in the order ``grid_order`` says
    (for the text beside the grid)."""

    record: AuditRecord
    originals: torch.Tensor
    noisy: torch.Tensor
    reconstructed: torch.Tensor
    grid_order: str = "in the order attacked"


class AuditAttack:
    """The attacker's pipeline of an auditor, from a queued step to its scored record (run on the audit worker).

    Args:
        prior: the diffusion prior that reconstructs the noisy images.
        image_metrics: scores reconstructions (and kappa's prior draws) against the training images.
        mode / bins / structure / measurement / gain / seed: the auditor's imprint (shadow mode builds its own from
            these at the first audit; inline mode is given the live block with :meth:`use_inline_block`).
        scale / estimate_noise / input_mean / input_std: how noisy images are recovered, and put in pixel space.
        sampler / steps / max_reconstructions / max_images / grid_order / delta / kappa_samples: as
            :class:`DMAuditor` takes them.
        calibration_images: model inputs to calibrate the shadow imprint on (None: ``data_calibration``, else the
            first audited batch).
        warn: ``warn(key, message)`` tells the user something once per key.

    Attributes:
        shadow: shadow mode's imprint model, made at the first audit that reaches a shadow step.
        data_calibration: a sample of the training data for the shadow imprint's bins (set at ``make_private``).
        kappa: the prior's baseline kappa per ``metric@eta``, estimated at the first audit that recovers images.
    """

    def __init__(self, *, prior: DiffusionPrior, image_metrics: ImageMetrics, mode: str, bins: int, structure: str,
                 measurement: str | torch.Tensor, gain: float, seed: int, scale: str, estimate_noise: bool,
                 input_mean: Sequence[float] | float | None, input_std: Sequence[float] | float | None,
                 sampler: str, steps: int, max_reconstructions: int | None, max_images: int, grid_order: str,
                 delta: float, kappa_samples: int, calibration_images: torch.Tensor | None,
                 warn: Callable[[str, str], None]) -> None:
        self.prior, self.image_metrics = prior, image_metrics
        self.mode, self.bins, self.structure, self.measurement = mode, bins, structure, measurement
        self.gain, self.seed, self.scale, self.estimate_noise = gain, seed, scale, estimate_noise
        self.input_mean, self.input_std = input_mean, input_std
        self.sampler, self.steps, self.max_reconstructions = sampler, steps, max_reconstructions
        self.max_images, self.grid_order = max_images, grid_order
        self.delta, self.kappa_samples = delta, kappa_samples
        self.calibration_images = calibration_images
        self._warn = warn
        self.shadow: ShadowImprint | None = None
        self.data_calibration: torch.Tensor | None = None
        self.kappa: dict[str, float] | None = None
        self.inline_block: ImprintBlock | None = None  # inline: the worker's CPU copy of the live block
        self._live_block: ImprintBlock | None = None  # inline: the block in the model (read for its device only)

    def use_inline_block(self, block: ImprintBlock) -> None:
        """Inline mode: attack with ``block``'s bins. The worker reads a CPU copy, never the live block: Opacus may
        swap the live parameters (ExpandedWeights in grad_sample_mode="ew") while the training thread runs, and
        restored after each step, the copy stays valid."""
        self.inline_block, self._live_block = block.cpu_copy(), block

    @property
    def pass_size(self) -> int:
        """Images per UNet call of the prior: one audit's reconstructions, rounded up to a power of two (at least the
        prior's ``min_bucket``), at most its ``default_batch_size`` (256 on CUDA, 32 on CPU, fewer for large images)."""
        count = min(self.bins, self.max_reconstructions or self.bins)
        return bucket_size(count, batch_size=self.prior.default_batch_size,
                           min_bucket=self.prior.reverse_process.config.min_bucket)

    @property
    def pass_shape(self) -> tuple[int, int, int, int]:
        """The N×C×H×W input of one pass of the prior (compiled, if configured, and captured before training)."""
        return (self.pass_size, self.prior.channels, self.prior.resolution, self.prior.resolution)

    def reconstruct(self, recovered: Sequence[RecoveredAudit]) -> ReconstructionOutput:
        """All these audits' noisy images in one pass of the prior."""
        # Each image keeps the seed it would have in an audit of its own: batching changes no DDIM result.
        seeds = torch.cat([image_seeds(self.seed + item.job.step, len(item.noisy)) for item in recovered])
        return self.prior.reconstruct(torch.cat([item.noisy for item in recovered]),
                                      torch.cat([item.noise_std for item in recovered]),
                                      sampler=self.sampler, steps=self.steps, seed=seeds, batch_size=self.pass_size)

    def recover(self, job: AuditJob) -> RecoveredAudit | AuditRecord:
        """The attack up to the noisy images: the shadow step or the captured gradients, then recovery; the
        audit's record when it recovers no image (an empty batch, or no image alone in its bin)."""
        started = time.perf_counter()
        job.wait()  # a CUDA step's copies and capture may still be queued behind training's kernels
        notes: list[str] = []
        base = dict(step=job.step, mode=self.mode, scale=self.scale, batch_size=job.batch_size,
                    noise_multiplier=job.noise_multiplier, max_grad_norm=job.max_grad_norm,
                    epsilon=audit_epsilon(job.history, accountant=job.accountant, delta=self.delta,
                                          notes=notes), delta=self.delta,
                    mu_step=(1.0 / job.noise_multiplier) if job.noise_multiplier > 0 else None)
        if job.shared_forwards:
            note = (f"{job.shared_forwards} training forward(s) of this step {SHARED_BACKWARD}; the shadow imprint "
                    "attacks each sample's image in the first forward as if it were the sample's only one (an "
                    "attacker's bins would hold the mixture)")
            notes.append(note)
            self._warn("shared backward", note)
        if job.released_noise_multiplier != job.noise_multiplier:
            notes.append(f"adaptive clipping: the gradients carry noise multiplier {job.released_noise_multiplier:.4g}"
                         f" at this step's clipping norm {job.max_grad_norm:.4g}; the accountant's "
                         f"{job.noise_multiplier:.4g} also pays for the noised count of unclipped samples")

        def nothing_recovered(collisions: int) -> AuditRecord:
            return AuditRecord(recovered=0, collisions=collisions, noise_std_median=None, t_start_median=None,
                               from_prior=0, noisy={}, reconstructed={}, success={},
                               seconds=time.perf_counter() - started, notes=notes, **base)

        # An isolated image's noise depends on its own clip factor alone, not on the batch's size, so the shadow
        # imprint attacks the first `bins` images (the most images `bins` bins isolate, about 37%): what an attacker
        # with bins enough for the whole batch sees of them. All of a batch of 512 in 64 bins left no image alone
        # (Opacus's CIFAR-10 tutorial trains at 512).
        attacked = job.batch[: self.bins] if self.mode == "shadow" else job.batch
        base["attacked"] = int(attacked.shape[0])
        if attacked.shape[0] == 0:  # an empty Poisson batch
            return nothing_recovered(0)
        if self.mode == "shadow":
            captured, block = self._shadow_step(job, attacked)
        else:
            # Never None here: _enqueue queues no inline audit whose capture failed.
            captured, block = job.captured, self.inline_block
            tf32 = tf32_rows_note(self._live_block.imprint.weight.device)  # the model may have moved since
            if tf32 is not None:
                notes.append(tf32)
                self._warn("tf32", tf32)
            captured = CapturedGradients(**{k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                                            for k, v in asdict(captured).items()})
        outside = outside_bins(block, attacked)
        if outside > OUTSIDE_BINS_LIMIT:
            note = (f"{outside:.0%} of the audited batch lies outside the imprint's bins: those images share the "
                    "outer bins and are not recovered, so the audit shows fewer than the attacker could; the bins "
                    "were calibrated on inputs unlike this batch's: pass calibration_images=... (inputs as the model "
                    "sees them)")
            notes.append(note)
            self._warn("outside bins", note)
        recovered = recover_images(captured, block, scale=self.scale, originals=attacked,
                                   input_mean=self.input_mean, input_std=self.input_std)
        base["collisions"] = int(len(recovered.collisions))
        if len(recovered) == 0:
            return nothing_recovered(base.pop("collisions"))
        keep = slice(None) if self.max_reconstructions is None else slice(0, self.max_reconstructions)
        noisy = recovered.images[keep]
        noise_std = estimate_noise_std(noisy) if self.estimate_noise else recovered.noise_std[keep]
        originals = attacked[recovered.sample_index[keep]].float()
        if self.input_mean is not None or self.input_std is not None:
            originals = denormalize(originals, mean=0.0 if self.input_mean is None else self.input_mean,
                                    std=1.0 if self.input_std is None else self.input_std)
        note = pixel_range_note(originals, input_mean=self.input_mean, input_std=self.input_std)
        if note is not None:
            notes.append(note)
            self._warn("pixel range", note)
        return RecoveredAudit(job=job, base=base, notes=notes, noisy=noisy,
                              noise_std=torch.as_tensor(noise_std, dtype=torch.float64).reshape(-1).expand(len(noisy)),
                              originals=originals.clamp(0, 1), started=started)

    def score(self, item: RecoveredAudit, output: ReconstructionOutput, part: slice, *,
              audits_in_pass: int) -> ScoredAudit:
        """Metrics and the record of one audit from its share (``part``) of the prior's pass."""
        images, noisy, originals = output.images[part], item.noisy, item.originals
        from_prior = output.from_prior[part]
        notes = item.notes + output.fallbacks
        lost = output.adaptation.loss_note()
        if lost:
            notes.append(lost)
            self._warn("adaptation", lost)
        if from_prior.any():
            notes.append(self.prior.prior_sample_note(int(from_prior.sum()), len(noisy)))
        noisy_values = self.image_metrics(noisy.clamp(0, 1), originals)
        recon_values = self.image_metrics(images, originals)
        kappa = self._baseline(originals)
        mu = item.base["mu_step"]  # 1/sigma; None without noise
        record = AuditRecord(
            kappa=dict(kappa),
            # The attacked step alone, with the sample known to be in the batch: a Gaussian mechanism, mu-GDP.
            rero_bound={key: rero_bound_gdp(mu, k) if mu is not None else 1.0 for key, k in kappa.items()},
            recovered=len(noisy), noise_std_median=float(item.noise_std.median()),
            t_start_median=float(output.t_start[part].double().median()), from_prior=int(from_prior.sum()),
            noisy=summarize(noisy_values), reconstructed=summarize(recon_values), success=success_rates(recon_values),
            success_ci=success_intervals(recon_values),
            seconds=time.perf_counter() - item.started, audits_in_pass=audits_in_pass, notes=notes, **item.base,
        )
        shown, order = grid_selection(recon_values, count=len(noisy), order=self.grid_order)
        shown = shown[: self.max_images]
        return ScoredAudit(record=record, originals=originals[shown], noisy=noisy[shown].clamp(0, 1),
                           reconstructed=images[shown], grid_order=order)

    def _baseline(self, originals: torch.Tensor) -> dict[str, float]:
        """kappa per metric@eta: how often a draw from the prior alone is within eta of an audited image."""
        if self.kappa_samples == 0:
            return {}
        if self.kappa is None:
            try:
                # DDIM whatever the audits' sampler: DDPM draws from pure noise take all 1,000 steps each (16 draws:
                # 16,000 image-steps, some 13 minutes at the shipped prior's 20 image-steps/s on a 2-core CPU).
                self.kappa = estimate_kappa(self.prior, originals, metrics=self.image_metrics,
                                            samples=self.kappa_samples, sampler="ddim", steps=self.steps,
                                            seed=self.seed + 1)
            except Exception as exc:
                self.kappa = {}
                self._warn("kappa", f"no ReRo bound in this run: estimating the prior's baseline failed: {exc}")
        return self.kappa

    def _shadow_step(self, job: AuditJob, attacked: torch.Tensor) -> tuple[CapturedGradients, ImprintBlock]:
        """One DP-SGD step of the auditor's own imprint model on the attacked images, through Opacus."""
        if self.shadow is None:
            self.shadow = self._shadow_imprint(job)
        # The user's run may change these (e.g. a noise schedule); follow it.
        captured = self.shadow.step(attacked, noise_multiplier=job.released_noise_multiplier,
                                    max_grad_norm=job.max_grad_norm, expected_batch_size=job.expected_batch_size)
        return captured, self.shadow.block

    def _shadow_imprint(self, job: AuditJob) -> ShadowImprint:
        """The shadow imprint model, its bins calibrated on ``calibration_images``, else on the training data sampled
        at ``make_private``, else (or when the model's inputs do not look like those samples) on this first batch."""
        def shadow_imprint(calibration: torch.Tensor) -> ShadowImprint:
            return ShadowImprint(calibration=calibration, bins=self.bins, structure=self.structure,
                                 measurement=self.measurement, gain=self.gain,
                                 noise_multiplier=job.released_noise_multiplier, max_grad_norm=job.max_grad_norm,
                                 expected_batch_size=job.expected_batch_size, loss_reduction=job.loss_reduction,
                                 seed=self.seed)

        if self.calibration_images is not None:
            return shadow_imprint(self.calibration_images)
        sample = self.data_calibration
        if sample is None:
            return shadow_imprint(job.batch)
        if sample.shape[1:] != job.batch.shape[1:]:
            mismatch = (f"the model's inputs are {'×'.join(map(str, job.batch.shape[1:]))}, the dataset's samples "
                        f"{'×'.join(map(str, sample.shape[1:]))}")
        else:
            shadow = shadow_imprint(sample)
            outside = outside_bins(shadow.block, job.batch)
            if outside <= OUTSIDE_BINS_LIMIT:
                return shadow
            mismatch = (f"{outside:.0%} of the first audited batch lies outside the bins calibrated on the dataset's "
                        "samples")
        self._warn("calibration", f"{mismatch} (a transform between the data loader and the model?): the shadow "
                   "imprint's bins are calibrated on the first audited batch instead, which they fit better than "
                   "later ones; pass calibration_images=... (model inputs) to calibrate on data")
        return shadow_imprint(job.batch)
