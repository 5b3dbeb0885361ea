"""DMAuditor: audit live Opacus DP-SGD training with a diffusion-model attacker, logged to TensorBoard.

Two modes:

* ``"shadow"`` (default): training is untouched. The auditor copies each audited step's batch (a forward pre-hook)
  and runs its first ``bins`` images, off the training thread, through its own imprint model with Opacus's own
  machinery (its ghost clipping: ``GradSampleModuleFastGradientClipping`` and ``DPOptimizerFastGradientClipping``,
  which release what its per-sample path does without holding a gradient per sample) with the training run's noise
  multiplier, clipping norm, expected batch size and loss reduction, and the auditor's own noise generator. The
  imprint model gives each sample's whole clipping budget to its imprint row, so the noise is at the floor DP allows:
  this is what an attacker who chooses the architecture sees at this noise multiplier. An isolated image's noise does
  not depend on how many others share the step, so those images stand for the whole batch.
* ``"inline"``: the imprint block sits in front of the user's model before Opacus wraps it, so the real steps carry
  it. Its gradients are clipped with the real model's (real clip factors) and captured from the real noised
  steps by chaining the optimizer's step hook; the block's parameters are restored after every step so the bins
  stay calibrated. The seed paper's experimental setting.

In both modes the imprint's bins are calibrated at ``make_private`` on a sample of the training data, and each audit
logs, beside its success rates, the ReRo bound of the attacked step at the prior's baseline kappa.

Everything after the copy (``batch_copy``) runs on a background thread with a bounded queue: the attack (shadow
step, recovery, reconstruction, metrics: ``attack``) and the logs (``report``). A full queue drops an audit instead
of blocking training; an exception in an audit is logged and never reaches the training loop. Audits that queued
up while the worker was busy share one pass of the prior (``batch_audits``): a few dozen recovered images per audit
leave a GPU mostly idle, a few hundred do not. Each image keeps its own seed, so a DDIM reconstruction does not
depend on which audits shared its pass.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import logging
import os
import queue
import random
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.grad_sample import AbstractGradSampleModule
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel as DDP

from opacus_dmaudit.attack import AuditAttack, AuditJob, AuditRecord, RecoveredAudit, ScoredAudit
from opacus_dmaudit.batch_copy import SHARED_BACKWARD, ForwardHook, StepBatchCopy, copied_event, wait_for
from opacus_dmaudit.capture import (GradientCapture, PerLayerClippingError, chain_pre_step, chain_step_hook,
                                    released_noise_multiplier)
from opacus_dmaudit.data import sample_image
from opacus_dmaudit.imprint import ImprintBlock, ImprintedModel
from opacus_dmaudit.metrics import METRICS, ImageMetrics
from opacus_dmaudit.prior import DiffusionPrior
from opacus_dmaudit.recovery import SCALES
from opacus_dmaudit.report import GRID_ORDERS, AuditLogWriter
from opacus_dmaudit.reverse_process import FastPathConfig, cuda_graphs_leave_default_generator_alone
from opacus_dmaudit.run_summary import RunSummary, run_summary_markdown, summarize_run
from opacus_dmaudit.shadow import SHADOW_GAIN

__all__ = ["DMAuditor", "AuditRecord"]

logger = logging.getLogger("opacus_dmaudit")

INLINE_GAIN = 1e3
# Inline bins are set before training: warn when a batch would leave fewer than this share of min(batch, bins) images
# alone in their bins (64 bins, batch 256: 4.7 images expected, 7%; batch 512: 0.2).
INLINE_ISOLATION_WARNING = 0.10


def hooked_module(model) -> nn.Module:
    """The module Opacus hooked, for what ``make_private`` returned: the private model itself, or under
    ``wrap_model=False`` (Opacus 1.6), where it returns a hooks object, the module that object hooked."""
    if isinstance(model, nn.Module):
        return model
    hooked = getattr(model, "_module", None)
    if not isinstance(hooked, nn.Module):
        raise TypeError(f"attach() needs the model that PrivacyEngine.make_private returned (a GradSampleModule, or "
                        f"its hooks object under wrap_model=False), got {type(model).__name__}")
    return hooked


def trained_module(model) -> nn.Module:
    """The module whose forward calls are the training steps' forwards, for what ``make_private`` returned: the
    private model, or under ``wrap_model=False``, where the loop calls its own model, the module Opacus hooked or the
    user's model inside an inline auditor's ``ImprintedModel``."""
    hooked = hooked_module(model)
    if hooked is model:
        return model
    imprinted = hooked.module if isinstance(hooked, DPDDP) else hooked
    if isinstance(imprinted, ImprintedModel) and imprinted.imprints_in_model_hook:
        return imprinted.model
    return hooked


def accounted_steps(accountant) -> int:
    """How many DP-SGD steps an Opacus accountant has accounted (its history holds noise multiplier, sample rate and
    step count triples); 0 for none, or for an accountant that keeps no such history."""
    try:
        return int(sum(entry[-1] for entry in getattr(accountant, "history", None) or []))
    except Exception:  # read inside the user's forward and step: it must not raise
        return 0


def wait_until_freed(tensors: list[weakref.ref], *, timeout: float = 1.0) -> float:
    """Sleep a millisecond at a time, ``timeout`` seconds at most, until the tensors behind these weak references are
    freed; returns the seconds waited.

    A tensor this thread has let go of lives on while a collective's work still holds it, and on torch 2.6 with gloo
    the worker thread that frees that work last needs the GIL for it. A ``destroy_process_group()`` in that moment
    keeps the GIL while it joins the worker, and the run hangs (measured: 3 in 6 two-process runs of an all_reduce,
    ``del`` and destroy; 0 in 8 with a 50 ms sleep between). The sleep hands the worker the GIL; a weak reference
    outlives the ``del`` exactly while the work holds the tensor (a third of the ranks there, freed after one sleep).
    """
    started = time.perf_counter()
    while any(ref() is not None for ref in tensors) and time.perf_counter() - started < timeout:
        time.sleep(0.001)
    return time.perf_counter() - started


def expected_isolated(batch_size: int, bins: int) -> float:
    """Expected images alone in their bin when ``batch_size`` images fall into ``bins`` equally likely bins (the
    bins are calibrated at the measurement's quantiles)."""
    return batch_size * (1.0 - 1.0 / bins) ** (batch_size - 1) if bins > 1 else float(batch_size == 1)


@contextlib.contextmanager
def preserved_random_state():
    """Leave Python's, NumPy's and torch's CPU generators as they were (data augmentations draw from them)."""
    python_state = random.getstate()
    numpy = sys.modules.get("numpy")
    numpy_state = numpy.random.get_state() if numpy is not None else None
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            if numpy_state is not None:
                numpy.random.set_state(numpy_state)


def image_batch(images, *, what: str) -> torch.Tensor:
    """``images`` as a float CPU tensor, checked to be an N×C×H×W batch of at least two images (the imprint's bins
    are calibrated on it)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{what} must be a tensor of images N×C×H×W, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{what} must be images N×C×H×W (model inputs), got shape {tuple(images.shape)}: the imprint "
                         "needs unflattened images, so flatten inside the model (e.g. nn.Flatten())")
    if images.shape[0] < 2:
        raise ValueError(f"{what} must hold at least two images to calibrate the imprint's bins on, "
                         f"got {images.shape[0]}")
    return images.detach().float().cpu()


def _thread_counts_are_per_thread() -> bool:
    """Whether torch's intra-op thread count is each thread's own: so with its OpenMP backend (a few microseconds)."""
    return "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


class DMAuditor:
    """Audits an Opacus training run: what does a diffusion-prior attacker recover from these DP-SGD steps?

    Args:
        privacy_engine: the ``PrivacyEngine``; its ``make_private`` and ``make_private_with_epsilon`` are
            intercepted on this instance so the audit attaches itself. ``None``: call :meth:`attach` yourself.
        prior: a shipped prior's name, a local DDPMPipeline folder, a hub id, or a loaded :class:`DiffusionPrior`.
        log_dir: TensorBoard log folder (created owner-only; it will contain training images). Default: a new
            ``runs/audit-<date>-<time>`` per run, as ``SummaryWriter`` makes; a folder with an earlier run's audit
            logs is appended to, with a warning (TensorBoard draws both runs as one).
        every: audit every ``every``-th optimizer step (of the whole run, as the engine's accountant counts them,
            so a resumed run keeps the schedule of an uninterrupted one).
        mode: "shadow" or "inline" (see the module docstring).
        bins: number of imprint bins; only an image alone in its bin is recovered. In shadow mode also the most
            images of each audited batch that the imprint attacks (the first ``bins``; about 37% of them are alone),
            so that a batch of any size gives an audit of the same size. Inline mode attacks the whole batch in its
            bins, and warns at ``make_private`` when they are too few for the batch (each bin adds ``C*H*W``
            parameters to your step's per-sample gradients).
        imprint: bin structure, "sparse" or "cumulative".
        measurement: the imprint's measurement ("brightness", "random", "dct" or a tensor).
        gain: the imprint's gradient gain (default: 1e6 in shadow mode, 1e3 inline).
        scale: how recovered images are scaled, one of ``recovery.SCALES``: ``"oracle"`` (the clean clipped sum,
            the worst case), or an attacker's estimate: ``"clip-norm"`` (from the public clipping norm; shadow mode
            only), ``"bin-measurement"`` or ``"noisy-bias"``.
        estimate_noise: reconstruct with noise levels estimated from the images (the unknown-variance attacker).
        sampler / steps: the prior's reverse process ("ddim" with ``steps`` steps, or "ddpm"). DDIM-25 scores as
            DDIM-50 does (PSNR / SSIM, ``benchmarks/speed_quality.py``) at half the cost.
        max_images: images per TensorBoard grid.
        grid_order: which reconstructions a grid shows: ``"best"``, those closest to their training images (highest
            SSIM first), what the attacker succeeded on; ``"first"``, the first ones attacked. Scores are over all.
        max_reconstructions: reconstruct at most this many recovered images per audit (None: all).
        delta: the delta of the logged epsilon.
        metrics: metric names (subset of mse, psnr, ssim, lpips).
        device: where the prior runs (default: CUDA when available).
        fast_path: speed options of a prior the auditor loads. Default: bf16 and CUDA graphs on CUDA, without
            torch.compile (compiling would block the start of training), and so without channels_last, which pays
            on CUDA only with the compiler's GroupNorm; fp32 and channels_last on CPU. At creation, on the calling
            thread, the auditor captures the CUDA graph of one pass (compiling it first with ``compile=True``, here
            or in a given prior), then freezes the prior: the audit worker only replays that graph and never
            compiles, since torch.compile's RNG save-and-restore would rewind the training thread's random numbers
            (DP-SGD noise among them). Compiled code runs only inside the graph, so without graphs compile is
            switched off (with a warning). Before torch 2.14 CUDA graphs are switched off too (with a warning):
            there every graph is tied to the default CUDA generator that DP-SGD's noise comes from
            (``cuda_graphs_leave_default_generator_alone``).
        log_originals: include original training images in the grids.
        input_mean / input_std: the model's input normalisation, so images are shown and scored in pixel space.
        calibration_images: model inputs to calibrate the bins on. Default: up to 1,024 samples of the data loader's
            dataset (image tensors, (image, label) pairs or dicts with one C×H×W tensor), read at ``make_private``;
            in shadow mode without one (:meth:`attach`), or when the model's inputs do not look like its samples,
            the first audited batch.
        queue_size: audits waiting for the worker before further ones are dropped.
        batch_audits: at most this many waiting audits share one pass of the prior (1: one pass per audit).
        seed: seed of the auditor's own generators.
        on_error: "continue" or "stop" auditing after an exception in an audit.
        on_audit: called with each :class:`AuditRecord` (on the worker thread).
        kappa_samples: draws from the prior (DDIM with ``steps`` steps), made once (at the first audit, against its
            images), for the baseline kappa of the ReRo bound that each audit logs beside its success rates; 0: no
            bound.
        worker_niceness: how much to raise the audit worker thread's nice value (Linux; it is per thread there,
            and the OpenMP threads the worker starts inherit it), so that on a CPU training keeps busy, audits
            run on the cycles training leaves. Measured on a 2-core CPU (``benchmarks/auditor_overhead.py``, CNN
            width 64, six paired runs): while shadow audits ran, a step took ×1.36 to ×1.86 its time without an
            auditor at niceness 0, ×1.16 to ×1.47 at 10 (lower in every pair), and the audits finished 2 to 6 s
            later. 0 leaves the priority alone; ignored off Linux.
        worker_threads: intra-op threads of the audit worker's torch operations (the prior on CPU, the shadow
            step, recovery), set on the worker thread alone; the training thread keeps its own. ``None``: half of
            ``torch.get_num_threads()`` at creation, at least 1. Fewer threads leave training more of the cores:
            on a 2-core CPU (``benchmarks/auditor_overhead.py --drop-queued``, CNN width 16, the worker busy all
            through training, three runs) a step took ×1.01 to ×1.21 its time without an auditor in shadow mode
            and ×1.31 to ×1.41 inline with the worker on 1 thread, against ×1.24 to ×1.54 and ×1.56 to ×2.56 on 2
            (lower in every pair), and an audit took about 1.5 times as long. The audits that ``close()`` waits
            for, after training, run on the inherited count again. Applied where torch's intra-op
            backend is OpenMP (as in its Linux x86-64 wheels, checked); elsewhere the count may be process-wide,
            and the worker keeps it.

    Attributes:
        records: an :class:`AuditRecord` per finished audit, in step order (audits that share a pass of the prior
            finish out of order: one that recovers nothing needs no pass).
        dropped / errors: audits dropped (a full queue, or queued at an early close) and audits that failed.
    """

    def __init__(
        self,
        privacy_engine=None,
        *,
        prior: str | DiffusionPrior = "fashion-mnist",
        log_dir: str | Path | None = None,
        every: int = 50,
        mode: str = "shadow",
        bins: int = 64,
        imprint: str = "sparse",
        measurement: str | torch.Tensor = "brightness",
        gain: float | None = None,
        scale: str = "oracle",
        estimate_noise: bool = False,
        sampler: str = "ddim",
        steps: int = 25,
        max_images: int = 16,
        grid_order: str = "best",
        max_reconstructions: int | None = None,
        delta: float = 1e-5,
        metrics: Sequence[str] = METRICS,
        device: str | torch.device | None = None,
        fast_path: FastPathConfig | None = None,
        log_originals: bool = True,
        input_mean: Sequence[float] | float | None = None,
        input_std: Sequence[float] | float | None = None,
        calibration_images: torch.Tensor | None = None,
        queue_size: int = 2,
        batch_audits: int = 8,
        seed: int = 0,
        on_error: str = "continue",
        on_audit: Callable[[AuditRecord], None] | None = None,
        worker_niceness: int = 10,
        worker_threads: int | None = None,
        kappa_samples: int = 16,
    ) -> None:
        if privacy_engine is not None and not callable(getattr(privacy_engine, "make_private", None)):
            raise TypeError(f"the first argument must be the opacus PrivacyEngine (or None, then call attach()), got "
                            f"{type(privacy_engine).__name__}")
        if mode not in ("shadow", "inline"):
            raise ValueError(f"mode must be 'shadow' or 'inline', got {mode!r}")
        if imprint not in ("sparse", "cumulative"):
            raise ValueError(f"imprint must be 'sparse' or 'cumulative', got {imprint!r}")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
        if scale == "clip-norm" and mode == "inline":
            raise ValueError("scale='clip-norm' assumes that the imprint rows take each sample's whole clipping "
                             "budget, which holds for the shadow imprint alone: inline, your model's gradients take "
                             "part of it and the scale would come out too large; use mode='shadow' with it, or "
                             "scale='oracle' or 'bin-measurement' inline")
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
        if grid_order not in GRID_ORDERS:
            raise ValueError(f"grid_order must be one of {', '.join(map(repr, GRID_ORDERS))}, got {grid_order!r}")
        if on_error not in ("continue", "stop"):
            raise ValueError(f"on_error must be 'continue' or 'stop', got {on_error!r}")
        for name, value in (("every", every), ("bins", bins), ("steps", steps), ("max_images", max_images),
                            ("queue_size", queue_size), ("batch_audits", batch_audits)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive whole number, got {value}")
        if max_reconstructions is not None and int(max_reconstructions) < 1:
            raise ValueError(f"max_reconstructions must be a positive whole number or None (all), "
                             f"got {max_reconstructions}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if calibration_images is not None:
            calibration_images = image_batch(calibration_images, what="calibration_images")
        if int(kappa_samples) < 0:
            raise ValueError(f"kappa_samples must be a whole number >= 0 (0: no ReRo bound), got {kappa_samples}")
        if not 0 <= int(worker_niceness) <= 19:
            raise ValueError(f"worker_niceness must be between 0 and 19 (a nice increment), got {worker_niceness}")
        if worker_threads is not None and int(worker_threads) < 1:
            raise ValueError(f"worker_threads must be a positive whole number or None (half of torch's), got "
                             f"{worker_threads}")
        if fast_path is not None and isinstance(prior, DiffusionPrior):
            raise ValueError("fast_path applies to a prior the auditor loads; give your DiffusionPrior its own "
                             "fast_path instead")
        self.mode, self.every, self.bins, self.structure = mode, int(every), int(bins), imprint
        self.measurement, self.scale, self.estimate_noise = measurement, scale, estimate_noise
        self.gain = float(gain) if gain is not None else (SHADOW_GAIN if mode == "shadow" else INLINE_GAIN)
        self.sampler, self.steps, self.max_images = sampler, int(steps), int(max_images)
        self.grid_order = grid_order
        self.max_reconstructions, self.delta, self.seed = max_reconstructions, float(delta), int(seed)
        self.input_mean, self.input_std = input_mean, input_std
        self.calibration_images = calibration_images
        self.on_error, self.on_audit = on_error, on_audit
        self.batch_audits = int(batch_audits)
        self.worker_niceness = int(worker_niceness)
        self.worker_threads = int(worker_threads) if worker_threads is not None else \
            max(1, torch.get_num_threads() // 2)
        self.kappa_samples = int(kappa_samples)
        self.log_originals = log_originals
        self.prepare_seconds: float | None = None  # compiling / capturing the prior's step at creation, if it has any
        # Under torch.distributed only rank 0 audits and writes; the other ranks stay passive.
        self.active = not (torch.distributed.is_available() and torch.distributed.is_initialized()
                           and torch.distributed.get_rank() != 0)
        self.log_dir = Path(log_dir if log_dir is not None else f"runs/audit-{time.strftime('%Y%m%d-%H%M%S')}")
        self.prior = prior if isinstance(prior, DiffusionPrior) else None
        self.image_metrics = ImageMetrics(metrics=tuple(metrics), device=None)
        self._attack: AuditAttack | None = None  # the worker's side: recovery, reconstruction, scoring
        if self.active:
            # Loading initialises networks randomly before the weights arrive: keep the user's RNG untouched.
            with torch.random.fork_rng(devices=[]):
                if self.prior is None:
                    self.prior = DiffusionPrior.from_pretrained(
                        prior, device=device, fast_path=fast_path or FastPathConfig(compile=False))
                self._attack = AuditAttack(
                    prior=self.prior, image_metrics=self.image_metrics, mode=mode, bins=self.bins, structure=imprint,
                    measurement=measurement, gain=self.gain, seed=self.seed, scale=scale,
                    estimate_noise=estimate_noise, input_mean=input_mean, input_std=input_std, sampler=sampler,
                    steps=self.steps, max_reconstructions=max_reconstructions, max_images=self.max_images,
                    grid_order=grid_order,
                    delta=self.delta, kappa_samples=self.kappa_samples, calibration_images=calibration_images,
                    warn=self._warn_once)
                self._prepare_prior()
                self.image_metrics.prepare()
            self.writer = AuditLogWriter(self.log_dir, log_originals=log_originals)
            self.log_dir = self.writer.log_dir
            if self.writer.earlier_run:
                logger.warning("opacus_dmaudit: %s already holds the audit logs of an earlier run; this run's are "
                               "appended to them, and TensorBoard draws both as one run: pass a new log_dir to keep "
                               "runs apart", self.log_dir)
        self.records: list[AuditRecord] = []
        self.dropped = 0
        self._dropped_busy = 0  # of those, dropped at a full queue while training ran (the rest at close)
        self.errors = 0
        self._hook_seconds = 0.0  # training-thread time in the auditor's own hooks (the capture counts its own)
        self.block: ImprintBlock | None = None
        self._engine = privacy_engine
        self._intercepted: list[tuple[str, Callable, Callable]] = []  # (method name, wrapper, what it wraps)
        self._model = self._optimizer = None
        self._capture: GradientCapture | None = None
        self._copies = StepBatchCopy()  # the audited step's images, forward by forward
        self._warned: set[str] = set()  # what the user has been told once already (logger warnings)
        self._steps = 0
        # The steps the engine's accountant had accounted at this run's first step: a run resumed from a checkpoint
        # (privacy_engine.load_checkpoint) counts on from them. None until that step.
        self._steps_before: int | None = None
        self._handles: list[Any] = []
        self._closed = False
        self._stopped = False
        self._inside_make_private = False
        self._make_private_error: str | None = None  # why the last make_private raised, for close() to say
        self._superseded = False  # a later auditor took this one's place on the engine before it was attached
        self._imprint_cut = False  # inline: the step being built gave the imprint no gradient (filled with zeros)
        # Inline under torch.distributed: every rank joins the capture's collectives; rank 0 audits.
        self._distributed_inline = mode == "inline" and torch.distributed.is_available() and \
            torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        self._queue: queue.Queue = queue.Queue(maxsize=int(queue_size))
        self._stream = None
        self._worker: threading.Thread | None = None
        if self.active:
            if self.prior.device.type == "cuda":
                self._stream = torch.cuda.Stream(self.prior.device)
            self._worker = threading.Thread(target=self._work, name="opacus-dmaudit", daemon=True)
            self._worker_started = threading.Event()
            self._draining = threading.Event()  # close() waits for the queued audits: training has ended
            self._inherited_threads: int | None = None  # the worker's thread count before it took worker_threads
            self._worker.start()
            # Setting the worker's thread count briefly touches torch's process-wide one (see _limit_worker_threads):
            # done while this thread waits, before training goes on.
            self._worker_started.wait()
            # The worker is a daemon thread, so a script that ends without close() would lose its queued audits.
            atexit.register(self._close_at_exit)
            self.writer.config(self.settings())
        if privacy_engine is not None:
            self._intercept(privacy_engine)

    @property
    def capture_seconds(self) -> float:
        """Training-thread time spent capturing gradients (inline mode; 0 in shadow mode)."""
        return self._capture.capture_seconds if self._capture is not None else 0.0

    @property
    def blocking_seconds(self) -> float:
        """All training-thread time spent in the auditor: batch copies, gradient capture, queueing."""
        return self._hook_seconds + self.capture_seconds

    def run_summary(self, *, confidence: float = 0.95) -> list[RunSummary]:
        """The finished audits taken together, one :class:`~opacus_dmaudit.run_summary.RunSummary` per noise
        multiplier: all their reconstructions pooled, so each success rate's interval narrows as audits add up (one
        audit's rate is rough). ``close()`` logs it; call it any time for the audits finished so far."""
        return summarize_run(list(self.records), confidence=confidence)

    # ------------------------------------------------------------------ set-up
    def settings(self) -> dict[str, Any]:
        return dict(mode=self.mode, every=self.every, bins=self.bins, imprint=self.structure,
                    measurement=self.measurement if isinstance(self.measurement, str) else "custom",
                    gain=self.gain, scale=self.scale, estimate_noise=self.estimate_noise, sampler=self.sampler,
                    steps=self.steps, prior=getattr(self.prior, "name", None), delta=self.delta,
                    log_originals=self.log_originals, grid_order=self.grid_order,
                    lpips=self.image_metrics.lpips_reason)

    def _intercept(self, engine) -> None:
        for name in ("make_private", "make_private_with_epsilon"):
            original = getattr(engine, name)
            # An engine used for another run keeps the last auditor's wrapper: this auditor takes its place rather
            # than stacking on it (the old one would try to attach a second time).
            while getattr(original, "_dmauditor", None) is not None:
                earlier = original._dmauditor
                if earlier._model is None and not earlier._closed and not earlier._superseded:
                    # Two auditors made for one run (a notebook cell run twice, say): the earlier audits nothing.
                    earlier._superseded = True
                    logger.warning("opacus_dmaudit: this DMAuditor takes the place, on the same privacy engine, of "
                                   "one created earlier and not yet attached, which will audit nothing; close() "
                                   "the earlier one (one auditor per engine and run)")
                original = original.__wrapped__
            wrapper = self._wrap_make_private(original)
            setattr(engine, name, wrapper)
            self._intercepted.append((name, wrapper, original))

    def _release_engine(self) -> None:
        """Give the engine its make_private methods back (where they are still this auditor's wrappers)."""
        engine = self._engine
        for name, wrapper, original in self._intercepted:
            if vars(engine).get(name) is not wrapper:
                continue  # a later auditor (or someone else) has taken the slot: theirs now
            if original == getattr(type(engine), name).__get__(engine, type(engine)):
                delattr(engine, name)  # the class's own method shows again
            else:
                setattr(engine, name, original)  # a wrapper that was there before this auditor's
        self._intercepted.clear()

    def _wrap_make_private(self, original: Callable) -> Callable:
        def make_private(*args, **kwargs):
            if self._inside_make_private:
                # make_private_with_epsilon calls make_private: the outer call wraps and attaches, once.
                return original(*args, **kwargs)
            self._inside_make_private = True
            try:
                return wrapped(*args, **kwargs)
            except Exception as exc:
                self._make_private_error = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                self._inside_make_private = False

        def wrapped(*args, **kwargs):
            if self.mode == "inline":
                # Adaptive clipping is flat clipping whose norm moves between steps: the ratio holds.
                if kwargs.get("clipping", "flat") not in ("flat", "adaptive"):
                    raise PerLayerClippingError(
                        f"DMAuditor(mode='inline') needs flat clipping ('flat' or 'adaptive'), got "
                        f"clipping={kwargs['clipping']!r}: "
                        "per-layer clipping scales an image row and its bias differently; use mode='shadow'"
                    )
                module, optimizer = kwargs.get("module"), kwargs.get("optimizer")
                if module is None or optimizer is None:
                    raise ValueError("call make_private with keyword arguments module=..., optimizer=...")
                if isinstance(module, AbstractGradSampleModule):
                    raise ValueError(
                        f"DMAuditor(mode='inline') needs the plain model in make_private, got a {type(module).__name__}: "
                        "its hooks would compute your layers' per-sample gradients a second time, beside those of the "
                        "GradSampleModule Opacus puts around the imprint block and your model; pass the model it wraps "
                        "(module.to_standard_module()), or use mode='shadow'")
                if isinstance(module, FSDPModule) or kwargs.get("grad_sample_mode") in ("ghost_fsdp", "ghost_tp"):
                    raise ValueError(
                        "DMAuditor(mode='inline') cannot put its imprint block in front of a model sharded by FSDP "
                        "(fully_shard, grad_sample_mode='ghost_fsdp') or split by tensor parallelism ('ghost_tp'): "
                        "Opacus would take the block's whole rows on every rank for shards of them, and clip them "
                        "wrongly; use mode='shadow'")
                # Opacus recognises distributed training by the outer wrapper (DPDDP, torch's DDP) and takes a
                # distributed optimizer for it: the block must not hide it. Without one, each rank would step on
                # its own gradients, and the ranks' models would drift apart. The block goes inside DPDDP; torch's
                # DDP goes inside the block and keeps its own work, and a DPDDP around them only shows Opacus the
                # training is distributed (its broadcast of the weights from rank 0 changes nothing DDP had synced).
                imprinted = self.wrap_model(module.module if isinstance(module, DPDDP) else module, optimizer,
                                            data_loader=kwargs.get("data_loader"))
                kwargs["module"] = DPDDP(imprinted) if isinstance(module, (DPDDP, DDP)) else imprinted
            else:
                self._calibrate_shadow_on(kwargs.get("data_loader"))
            result = original(*args, **kwargs)
            if self.mode == "inline" and not kwargs.get("wrap_model", True):
                self._handles.append(self._imprint_in_model_hook(imprinted))
            self.attach(result[0], result[1])
            return result

        make_private.__wrapped__ = original  # type: ignore[attr-defined]
        make_private._dmauditor = self  # type: ignore[attr-defined]
        return make_private

    def _calibration_sample(self, data_loader) -> torch.Tensor:
        """Up to 1,024 model inputs spread evenly over the data loader's dataset (or ``calibration_images``)."""
        if self.calibration_images is not None:
            return self.calibration_images
        dataset = getattr(data_loader, "dataset", None)
        if dataset is None or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise ValueError("pass calibration_images=... (no data loader with a map-style dataset to calibrate the "
                             "imprint bins on)")
        count = min(len(dataset), 1024)
        step = max(1, len(dataset) // count)
        # Random augmentations in the dataset draw from the global generators, which also drive the training
        # (DP-SGD's noise among it): reading the sample must leave them where they were.
        with preserved_random_state():
            items = [dataset[i] for i in range(0, step * count, step)]  # the dataset's own errors pass as they are
        try:
            samples = torch.stack([torch.as_tensor(sample_image(item)) for item in items])
        except Exception as exc:  # e.g. PIL images without ToTensor
            raise ValueError(f"cannot calibrate the imprint bins on the data loader's dataset ({exc}): its samples "
                             "must be image tensors, (image tensor, label) pairs or dicts with one C×H×W image tensor; "
                             "pass calibration_images=... (an N×C×H×W tensor of model inputs) instead") from exc
        return samples

    def _calibrate_shadow_on(self, data_loader) -> None:
        """Shadow mode: sample the training data for the shadow imprint's bins, as the inline block is calibrated.

        Without it the bins would fit the first audited batch, whose images they then isolate better than any later
        batch's. Shadow mode never stops training: a dataset it cannot sample leaves that fallback, with a warning.
        """
        if self.calibration_images is not None or data_loader is None or not self.active:
            return
        try:
            self._attack.data_calibration = image_batch(self._calibration_sample(data_loader),
                                                 what="the data loader's samples")
        except Exception as exc:
            if "N×C×H×W" not in str(exc):  # flattened inputs: the forward hook names that problem itself
                self._warn_once("calibration", f"the shadow imprint's bins are calibrated on the first audited batch, "
                                f"which they fit better than later ones: {exc}")

    def _check_float_inputs(self, sample: torch.Tensor) -> None:
        if not sample.is_floating_point():
            # The imprint's gradient reaches the model's input through a float shift: integer inputs carry none.
            raise TypeError(f"mode='inline' needs float model inputs, but the data loader's samples are "
                            f"{sample.dtype}: convert them to float in the data pipeline (e.g. torchvision's "
                            "transforms.v2.ToDtype(torch.float32, scale=True)) and pass input_mean/input_std for any "
                            "scaling, or use mode='shadow'")

    def wrap_model(self, module: nn.Module, optimizer: torch.optim.Optimizer, *, data_loader=None) -> ImprintedModel:
        """Inline mode: put a calibrated imprint block in front of ``module`` and register its parameters with
        ``optimizer``, in its first parameter group (the step post-hook restores them after each step, so that group's
        learning rate and weight decay leave them as they are; ``close()`` freezes them)."""
        sample = self._calibration_sample(data_loader)
        self._check_float_inputs(sample)
        sample = image_batch(sample, what="the data loader's samples")
        parameter = next((p for p in module.parameters() if p.is_floating_point()), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        block = ImprintBlock(image_shape=tuple(sample.shape[1:]), bins=self.bins, structure=self.structure,
                             measurement=self.measurement, gain=self.gain, seed=self.seed)
        if parameter is not None and parameter.dtype == torch.float64:
            # Rows as precise as a float64 model's; Opacus 1.5.2 also fails to clip float32 and float64 parameters
            # together. Lower-precision models keep float32 rows (see ImprintBlock.activations).
            block.imprint.double()
        self.block = block.calibrate(sample).to(device)
        self._check_isolation(getattr(data_loader, "batch_size", None), pixels=sample[0].numel())
        if self._distributed_inline:
            # Each rank sampled its own dataset (random augmentations differ by rank), but rank 0 matches the
            # all-reduced imprint gradients to the gathered batch by its own bins: every rank takes rank 0's.
            edges = self.block.edges.clone()
            torch.distributed.broadcast(edges, src=0)
            self.block.set_edges(edges)
        # In the first group, not a group of their own: an LR scheduler made on the optimizer before make_private
        # (OneCycleLR, LambdaLR, CyclicLR, SequentialLR, ...) holds one entry per group and fails on a group it has
        # not seen, at the training loop's scheduler.step().
        optimizer.param_groups[0]["params"].extend(self.block.parameters())
        return ImprintedModel(module, self.block)

    @staticmethod
    def _imprint_in_model_hook(imprinted: ImprintedModel):
        """Inline under ``make_private(..., wrap_model=False)`` (Opacus 1.6): the loop calls the user's own model,
        not the ``ImprintedModel`` Opacus hooked, so a forward pre-hook on that model runs the block; its handle.
        The model's ``state_dict`` keeps the user's own keys; a copy of it holds the hook as one that does nothing.
        ``close()`` removes the hook: the model is the user's own again, without the frozen block's work in every
        forward (a model made private again would otherwise run it too)."""

        def imprint(module, args, kwargs):
            # Evaluation forwards skip the block, as Opacus's hooks skip them: its output would equal its input, and
            # the activations Opacus keeps for it would wait for a backward pass that never comes.
            if module.training and torch.is_grad_enabled():
                return imprinted.imprint_arguments(args, kwargs)
            return None

        imprinted.imprints_in_model_hook = True
        return imprinted.model.register_forward_pre_hook(ForwardHook(imprint), with_kwargs=True)

    def _check_isolation(self, batch_size: int | None, *, pixels: int) -> None:
        """Inline: warn when the bins are too few for the batch to leave images alone in them (only those are
        recovered); unlike shadow mode, inline mode attacks every image of the real batch."""
        if not batch_size:
            return
        expected = expected_isolated(batch_size, self.bins)
        if expected >= INLINE_ISOLATION_WARNING * min(batch_size, self.bins):
            return
        self._warn_once("few isolated", f"mode='inline' with {self.bins} bins and batches of {batch_size}: about "
                        f"{expected:.2g} images per audited step will be alone in their bin, and only those are "
                        f"recovered: pass bins={batch_size} or more (each bin adds {pixels} parameters, one per "
                        "input value, to the per-sample gradients of your step), or use mode='shadow', which attacks "
                        f"{self.bins} images of any batch")

    def attach(self, model, optimizer, *, data_loader=None) -> "DMAuditor":
        """Attach to a model and DP optimizer that are already private (``make_private`` does this for you).

        Args:
            model / optimizer: what ``make_private`` returned (under ``wrap_model=False``, Opacus's hooks object).
            data_loader: shadow mode: the training data loader, to calibrate the imprint's bins on its dataset (as
                ``make_private`` does); without it they fit the first audited batch.
        """
        if self._model is not None:
            raise RuntimeError("this DMAuditor is already attached; create one auditor per training run")
        if not hasattr(optimizer, "noise_multiplier") or not hasattr(optimizer, "step_hook"):
            raise TypeError("attach() needs the DPOptimizer returned by PrivacyEngine.make_private")
        called = trained_module(model)
        if self.mode == "shadow" and data_loader is not None:
            self._calibrate_shadow_on(data_loader)
        self._model, self._optimizer = model, optimizer
        if not self.active and not self._distributed_inline:
            return self
        if self.mode == "inline":
            if self.block is None:
                self.block = next((m for m in hooked_module(model).modules() if isinstance(m, ImprintBlock)), None)
            if self.block is None:
                raise ValueError("mode='inline' needs an ImprintBlock in the model: create the auditor before "
                                 "make_private, or wrap your model in ImprintedModel yourself")
            snapshot = self.block.parameter_snapshot()
            if self._attack is not None:
                self._attack.use_inline_block(self.block)
            self._capture = GradientCapture(optimizer, self.block.imprint, should_capture=self._is_audited,
                                            after_step=self._after_step, on_error=self._failed)
            restore = lambda *args, **kwargs: self.block.restore(snapshot)  # noqa: E731
            self._handles.append(optimizer.original_optimizer.register_step_post_hook(restore))
            self._handles.append(chain_pre_step(optimizer, self._fill_missing_imprint_gradients))
        else:
            self._handles.append(chain_step_hook(optimizer, lambda opt: self._on_step()))
        self._handles.append(called.register_forward_pre_hook(ForwardHook(self._on_forward), with_kwargs=True))
        self._handles.append(called.register_forward_hook(ForwardHook(self._after_forward), with_kwargs=True))
        return self

    # ------------------------------------------------------------------ training thread
    def _is_audited(self, step: int) -> bool:
        if self._distributed_inline:
            return step % self.every == 0  # the same on every rank, or the collectives would hang
        return not (self._closed or self._stopped) and step % self.every == 0

    def _on_forward(self, module, args, kwargs) -> None:
        # Only forwards that Opacus records belong to the step (its hooks skip eval mode, no_grad, and everything
        # between model.disable_hooks() and enable_hooks()): an evaluation or an input perturbation between steps must
        # not slip other images into the audited batch.
        if not (module.training and torch.is_grad_enabled() and getattr(self._model, "hooks_enabled", True)):
            return
        self._start_counting(inside_step=False)  # never raises
        if not self._is_audited(self._steps + 1):
            return
        started = time.perf_counter()
        try:
            # A forward before the last copied one's backward pass is counted, not copied: Opacus adds its per-sample
            # gradients to the earlier one's, sample by sample (and shadow mode attacks the first forward's images).
            shape = self._copies.copy_forward(args, kwargs, limit=self._images_to_copy())
            if shape is not None:
                self._warn_once("input shape", f"the model's input has shape {shape}, but the imprint needs image "
                                "batches N×C×H×W: feed the images unflattened and flatten inside the model (e.g. "
                                "nn.Flatten()); these steps are not audited")
        except Exception:  # it runs inside the user's forward: count and log it, never raise it there
            self._failed()
        finally:
            self._hook_seconds += time.perf_counter() - started

    def _after_forward(self, module, args, kwargs, output) -> None:
        """Watch a copied forward's output for its backward pass: a training forward before it shares that pass."""
        started = time.perf_counter()
        try:
            self._copies.watch_output(output)
        except Exception:  # it runs inside the user's forward: count and log it, never raise it there
            self._failed()
        finally:
            self._hook_seconds += time.perf_counter() - started

    def _start_counting(self, *, inside_step: bool) -> None:
        """At this run's first training forward (or step, if none came first): count steps on from those the
        engine's accountant has accounted, so that a run resumed with ``privacy_engine.load_checkpoint`` keeps its
        step numbers, its audit schedule and its TensorBoard axis. The accountant has already counted a step whose
        hook is running."""
        if self._steps_before is not None:
            return
        accounted = accounted_steps(getattr(self._engine, "accountant", None))
        self._steps_before = self._steps = max(0, accounted - int(inside_step))
        if self._capture is not None:
            self._capture.steps = self._steps

    def _on_step(self) -> None:
        """Shadow mode's link in the optimizer's step hook, after the accountant's."""
        self._start_counting(inside_step=True)
        self._after_step(self._steps + 1)

    def _images_to_copy(self) -> int | None:
        """How many images of this forward's batch the audit needs (None: all). Inline mode attacks the whole batch;
        shadow mode its first ``bins`` images, so it copies no more (for 256 images of 3×224×224 at 64 bins, 23 ms
        instead of 89 on a 2-core CPU), except until its imprint exists, which may be calibrated on that batch."""
        if self.mode == "inline" or self._attack is None or self._attack.shadow is None:
            return None
        return max(0, self.bins - self._copies.copied)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("opacus_dmaudit: %s", message)

    def _after_step(self, step: int) -> None:
        started = time.perf_counter()
        try:
            self._enqueue(step)
        except Exception:  # it runs inside the user's optimizer.step(): count and log it, never raise it there
            self._failed()
        finally:
            self._hook_seconds += time.perf_counter() - started

    def _fill_missing_imprint_gradients(self, optimizer) -> None:
        """Inline, before Opacus clips: a model that cuts the gradient to its input (a ``detach()``, a rounding)
        leaves the imprint rows without per-sample gradients, and Opacus would stop the user's step. They get zeros
        (the step then adds only its noise to them) and the step is not audited."""
        try:
            self._zero_missing_grad_samples(optimizer)
        except Exception:  # a guard of the user's step must never be what breaks it
            logger.exception("opacus_dmaudit: checking the imprint's gradients failed")

    def _zero_missing_grad_samples(self, optimizer) -> None:
        rows = list(self.block.imprint.parameters())
        missing = [p for p in rows if getattr(p, "grad_sample", None) is None]
        if not missing:
            return
        ours = {id(p) for p in rows}
        reached = [p.grad_sample for p in optimizer.params
                   if id(p) not in ours and getattr(p, "grad_sample", None) is not None]
        if not reached:
            return  # no per-sample gradients at all (another grad-sample mode, or no backward): Opacus's own case
        sample = reached[0]
        count = sum(len(g) for g in sample) if isinstance(sample, list) else len(sample)
        for p in missing:
            p.grad_sample = torch.zeros((count, *p.shape), dtype=p.dtype, device=p.device)
        self._imprint_cut = True

    def _enqueue(self, step: int) -> None:
        self._steps = step
        copies = self._copies.take()
        pending, ready, sizes, shared = copies.parts, copies.ready, copies.sizes, copies.shared_forwards
        cut, self._imprint_cut = self._imprint_cut, False
        if not self._is_audited(step):
            return
        if self._distributed_inline:
            # Rank 0 needs every rank's samples to match bins to images: gather the batches in rank order (the
            # collective waits for the ranks anyway, so this thread waits for its copies here).
            wait_for(ready)
            ready = []
            local = torch.cat(pending) if pending else torch.zeros(0)
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, local)
            if not self.active or self._stopped:
                return
            pending = [t for t in gathered if t is not None and t.numel()]
            sizes = [len(t) for t in pending]  # inline mode copies whole batches
        if cut:
            self._warn_once("gradient cut", f"step {step} was due for an audit, but no gradient reached the imprint "
                            "block in front of the model: its forward cuts the gradient to its input (a detach() or "
                            "a rounding, say), so mode='inline' sees only noise there; these steps are not audited "
                            "(training goes on): use mode='shadow' for this model")
            return
        if copies.copy_failed:
            return  # its batch is not whole
        if shared and self.mode == "inline":
            self._warn_once("shared backward", f"step {step} was due for an audit, but {shared} of its training "
                            f"forwards {SHARED_BACKWARD}, so the imprint's bins hold mixtures of several images; "
                            "these steps are not audited (training goes on): use mode='shadow', which attacks each "
                            "sample's first image")
            return
        if not pending:
            if "input shape" not in self._warned:  # no forward the auditor could read, and no reason given
                self._warn_once("no batch", f"step {step} was due for an audit, but no training forward of the "
                                "private model passed it an image batch (its first positional argument, its only "
                                "floating-point N×C×H×W argument, or its only tensor keyword argument): nothing to "
                                "audit")
            return
        optimizer = self._optimizer
        accountant = getattr(self._engine, "accountant", None)
        latest = self._capture.latest if self._capture is not None else None
        captured = latest if latest is not None and latest.step == step else None  # inline: this step's capture
        if self.mode == "inline" and captured is None:
            return  # the capture failed, and was counted and logged where it did
        if captured is not None and captured.weight.is_cuda:
            ready.append(copied_event(captured.weight.device))  # the capture's copies are queued on the GPU too
        job = AuditJob(
            step=step,
            parts=pending,
            ready=ready,
            captured=captured,
            history=list(getattr(accountant, "history", [])),
            accountant=accountant,
            noise_multiplier=float(optimizer.noise_multiplier),
            max_grad_norm=float(optimizer.max_grad_norm),
            batch_size=sum(sizes),
            expected_batch_size=int(optimizer.expected_batch_size or sizes[0]),
            loss_reduction=optimizer.loss_reduction,
            released_noise_multiplier=released_noise_multiplier(optimizer),
            shared_forwards=shared,
        )
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.dropped += 1
            self._dropped_busy += 1
            # Once, not per step: at every=1 a busy worker would otherwise log a line for every training step.
            self._warn_once("dropped", f"audit of step {step} dropped: the auditor is still busy with earlier audits "
                            f"({self._queue.maxsize} waiting). Audits take longer than every={self.every} training "
                            "steps: pass a larger every, fewer sampler steps or a smaller max_reconstructions (or a "
                            "larger queue_size); further drops are counted in auditor.dropped and summed up at "
                            "close()")

    # ------------------------------------------------------------------ worker thread
    @property
    def pass_size(self) -> int:
        """Images per UNet call of the prior (see :attr:`AuditAttack.pass_size`)."""
        return self._attack.pass_size

    def _prepare_prior(self) -> None:
        """On the creating thread, before training: switch off what the worker may not run beside training, compile
        (if configured) and capture one pass's shape, then freeze the prior, so the worker only ever replays."""
        process = self.prior.reverse_process
        if process.config.cuda_graphs and not cuda_graphs_leave_default_generator_alone():
            process.switch_off("cuda_graphs", reason=(
                f"torch {torch.__version__} ties every CUDA graph to the default CUDA generator, which DP-SGD's noise "
                "comes from, so the audit worker must not capture or replay one beside training; torch >= 2.14 "
                "does not"))
        if process.config.compile and not process.config.cuda_graphs:
            # Frozen, the process runs compiled code only inside graphs captured before training (a call outside one
            # could recompile on the worker): without graphs, compiling would only delay training.
            process.switch_off("compile", reason="the audit worker runs compiled code only inside CUDA graphs")
        if process.config.cuda_graphs and not process.frozen:
            started = time.perf_counter()
            process.prepare(self._attack.pass_shape, batch_size=self._attack.pass_size)
            self.prepare_seconds = time.perf_counter() - started
        process.freeze()

    def _worker_stream(self) -> contextlib.AbstractContextManager:
        """The worker's own CUDA stream, so its kernels queue beside training's rather than behind them."""
        return torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()

    def _lower_worker_priority(self) -> None:
        """Raise this (worker) thread's nice value before it starts any thread of its own, so they inherit it."""
        if not self.worker_niceness or not sys.platform.startswith("linux"):
            return
        # On Linux a thread id names that thread alone; elsewhere the same call would renice the whole process.
        thread = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread)
                                                        + self.worker_niceness))
        except OSError as exc:  # e.g. a sandbox that forbids it: audits then share the CPU evenly
            logger.warning("opacus_dmaudit: could not lower the audit worker's priority: %s", exc)

    def _limit_worker_threads(self) -> None:
        """Give this (worker) thread ``worker_threads`` intra-op threads, leaving every other thread's count alone."""
        inherited = torch.get_num_threads()
        if inherited == self.worker_threads or not _thread_counts_are_per_thread():
            return
        # With OpenMP, torch.set_num_threads sets the calling thread's OpenMP and MKL counts, and also the count that
        # threads started later take at their first torch operation: a helper thread sets that one back.
        torch.set_num_threads(self.worker_threads)
        self._inherited_threads = inherited
        helper = threading.Thread(target=torch.set_num_threads, args=(inherited,), name="opacus-dmaudit-threads")
        helper.start()
        helper.join()

    def _threads_for_the_drain(self) -> None:
        """Once close() waits for the queued audits, training has ended (its thread waits in close), so the worker
        takes back the threads it left to training. Its inherited count is the process-wide one, which this leaves
        as it is."""
        if self._draining.is_set() and self._inherited_threads not in (None, torch.get_num_threads()):
            torch.set_num_threads(self._inherited_threads)

    def _work(self) -> None:
        try:
            self._lower_worker_priority()
            self._limit_worker_threads()
        except Exception:  # audits then run with the worker's inherited priority and threads
            logger.exception("opacus_dmaudit: could not set up the audit worker's priority and threads")
        finally:
            self._worker_started.set()
        while True:
            jobs = [self._queue.get()]
            # Audits that queued up while the last pass ran share the next pass of the prior.
            while jobs[-1] is not None and len(jobs) < self.batch_audits:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                audits = [job for job in jobs if job is not None]
                if audits and not self._stopped:
                    self._threads_for_the_drain()
                    with self._worker_stream():
                        self._audit(audits)
            finally:
                for _ in jobs:
                    self._queue.task_done()
            if jobs[-1] is None:
                return

    def _failed(self, count: int = 1) -> None:
        """Count and log an audit's exception (called inside ``except``): an audit never takes training down."""
        self.errors += count
        logger.exception("opacus_dmaudit: audit failed%s", "; auditing stopped" if self.on_error == "stop" else "")
        if self.on_error == "stop":
            self._stopped = True

    def _done(self, record: AuditRecord) -> None:
        bisect.insort(self.records, record, key=lambda done: done.step)
        if self.on_audit is not None:
            try:
                self.on_audit(record)
            except Exception:
                self._failed()

    def _audit(self, jobs: list[AuditJob]) -> None:
        """Recover each audit's images, reconstruct all of them in one pass of the prior, then score and log each."""
        recovered: list[RecoveredAudit] = []
        for job in jobs:
            if self._stopped:
                return
            try:
                item = self._attack.recover(job)
                if isinstance(item, AuditRecord):  # nothing recovered: no pass of the prior
                    self._log(item)
                    self._done(item)
                else:
                    recovered.append(item)
            except Exception:
                self._failed()
        if not recovered or self._stopped:
            return
        try:
            output = self._attack.reconstruct(recovered)
        except Exception:
            self._failed(len(recovered))
            return
        begin = 0
        for item in recovered:
            part = slice(begin, begin + len(item.noisy))
            begin = part.stop
            try:
                scored = self._attack.score(item, output, part, audits_in_pass=len(recovered))
                self._log(scored)
                self._done(scored.record)
            except Exception:
                self._failed()

    def _log(self, audit: AuditRecord | ScoredAudit) -> None:
        """Write one audit's logs; a scored audit's images become its grid (the writer leaves the training images
        out under ``log_originals=False``), and its figures join the pooled ones of its noise multiplier."""
        if isinstance(audit, AuditRecord):
            self.writer.audit(audit)
            return
        record = audit.record
        # Worker thread: the records so far (this one is added once logged) at this noise multiplier.
        (pooled,) = summarize_run([r for r in self.records if r.noise_multiplier == record.noise_multiplier]
                                  + [record])
        sampler = f"ddim, {self.steps} steps" if self.sampler == "ddim" else "ddpm"
        self.writer.audit(record, originals=audit.originals, order=audit.grid_order, pooled=pooled, rows={
            "recovered from the noised DP-SGD gradient": audit.noisy,
            f"reconstructed by the prior ({sampler})": audit.reconstructed})

    # ------------------------------------------------------------------ lifecycle
    def wait(self) -> None:
        """Block until every queued audit is done."""
        self._queue.join()

    def close(self, *, wait: bool = True) -> None:
        """Finish queued audits, write hparams, close the logs and detach from the optimizer and model.

        In inline mode the imprint block stays in the model, its parameters frozen (``requires_grad`` off): training
        that goes on after ``close()`` no longer clips, noises or updates them, and the block passes the model's
        inputs through unchanged. Under ``make_private(..., wrap_model=False)`` the forward pre-hook that ran the
        block on the user's model goes: the model no longer runs it at all.

        Args:
            wait: finish the audits still waiting in the queue. False drops them (counted in ``dropped``) and only
                lets the pass already running end; leaving a ``with`` block on an exception (Ctrl-C included) does
                that, so the exception is not held up by minutes of audits.
        """
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._close_at_exit)
        if self._model is None and wait and self._make_private_error is not None:
            # Not the late-auditor mistake below: the user's script saw this exception already.
            logger.warning("opacus_dmaudit: this DMAuditor audited nothing: privacy_engine.make_private raised %s",
                           self._make_private_error)
        elif self._model is None and wait and self._superseded:
            logger.warning("opacus_dmaudit: this DMAuditor audited nothing: a DMAuditor created after it on the same "
                           "privacy engine took its place before make_private was called")
        elif self._model is None and wait:
            # The one mistake that leaves no other trace: an auditor created after make_private audits nothing.
            logger.warning("opacus_dmaudit: this DMAuditor was never attached to a private model, so it audited "
                           "nothing: create it before privacy_engine.make_private(...) or call "
                           "auditor.attach(model, optimizer)")
        elif self.active and self._steps_this_run() > 0 and self._audits_due() == 0:
            which = (f" (steps {self._steps_before + 1} to {self._steps}, as the engine's accountant counts them)"
                     if self._steps_before else "")
            logger.warning("opacus_dmaudit: the run took %d optimizer step(s)%s, none of them a multiple of every=%d, "
                           "so nothing was audited: pass a smaller every", self._steps_this_run(), which, self.every)
        if self.active:
            if not wait:
                self._drop_queued()
            else:
                self._draining.set()
            self._queue.put(None)
            self._worker.join()
            if self._dropped_busy > 1:
                logger.warning("opacus_dmaudit: %d of %d due audits were dropped while the auditor was busy",
                               self._dropped_busy, self._audits_due())
        for handle in self._handles:
            handle.remove()
        if self.block is not None:
            self._freeze_block()
        self._release_engine()
        if self._capture is not None:
            self._capture.detach()
        if not self.active:
            return
        if self.records:
            try:
                self._log_run_summary()
            except Exception:  # close() runs on the training thread: a summary must not take the run down
                logger.exception("opacus_dmaudit: writing the run summary and hparams failed; the audit logs are "
                                 "complete without them")
        self.writer.close()

    def _log_run_summary(self) -> None:
        """At close: the run's audits pooled (TensorBoard text, a warning for a rate above its bound) and the run's
        hparams."""
        last = self.records[-1]
        summaries = self.run_summary()
        self.writer.text("audit/run_summary", run_summary_markdown(summaries), step=last.step)
        for level in summaries:
            if level.above_bound:
                # The one finding that says DP itself may not hold as configured: it must not sit in a text tab alone.
                logger.warning("opacus_dmaudit: at noise multiplier %g the attack succeeded more often than DP allows, "
                               "beyond the rate's sampling error (%s; ReRo bound %s): the auditor's attacker knows "
                               "which bins hold one image%s, which the bound does not cover, but check that the noise "
                               "really is added as configured", level.noise_multiplier,
                               ", ".join(f"{k} {level.success_hits[k]} of {level.recovered}, interval from "
                                         f"{level.success_ci[k]['low']:.3f}" for k in level.above_bound),
                               ", ".join(f"{level.rero_bound[k]:.3f}" for k in level.above_bound),
                               " and the clean scale" if self.scale == "oracle" else "")
        # The figures to compare runs by in TensorBoard's HParams tab: pooled over every audit at the run's last noise
        # multiplier, not one audit's rough rate.
        level = next(s for s in summaries if s.noise_multiplier == last.noise_multiplier)
        final = {f"hparam/reconstructed_{k}": v for k, v in level.reconstructed.items()}
        final.update({f"hparam/success_{k}": v for k, v in level.success.items()})
        final.update({f"hparam/success_{k}_high": ci["high"] for k, ci in level.success_ci.items()})
        final["hparam/epsilon"] = last.epsilon
        self.writer.hparams({**self.settings(), "noise_multiplier": last.noise_multiplier}, final)

    def _freeze_block(self) -> None:
        """Inline, at close: nothing restores the rows any more. Frozen, they neither train nor take part of each
        sample's clipping budget in the steps after close (Opacus clips, noises and zeroes only parameters that need
        gradients), and the forward still passes the images through unchanged. Their gradients of the last step go
        too: the optimizer's zero_grad() no longer clears them, and a stale per-sample gradient stops
        ExpandedWeights (grad_sample_mode="ew") at the next forward."""
        freed = []
        for p in self.block.parameters():
            p.requires_grad_(False)
            freed += [weakref.ref(p.grad)] if p.grad is not None else []
            p.grad = None
            for name in ("grad_sample", "summed_grad"):
                if getattr(p, name, None) is not None:
                    setattr(p, name, None)
        if self._distributed_inline:
            # The rows are the optimizer's last parameters, so Opacus all-reduced their gradients last, just before
            # close(); gloo's worker may still hold them, and a destroy_process_group() right after close() (as
            # tutorials end a run) hung there on torch 2.6 until this wait (see wait_until_freed).
            wait_until_freed(freed)

    def _steps_this_run(self) -> int:
        """The optimizer steps this auditor saw (a resumed run's steps before its checkpoint not among them)."""
        return self._steps - (self._steps_before or 0)

    def _audits_due(self) -> int:
        """The steps of this run that were due for an audit."""
        return self._steps // self.every - (self._steps_before or 0) // self.every

    def _close_at_exit(self) -> None:
        if self._closed:
            return
        unfinished = self._queue.unfinished_tasks  # queued, and the one the worker may be on
        if unfinished:
            logger.warning("opacus_dmaudit: the program is ending without auditor.close(): finishing %d audit(s) and "
                           "the logs now (call close() yourself to choose when, or close(wait=False) to drop them)",
                           unfinished)
        self.close()

    def _drop_queued(self) -> None:
        dropped = 0
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            self._queue.task_done()
            dropped += job is not None
        if dropped:
            self.dropped += dropped
            logger.warning("opacus_dmaudit: %d queued audit(s) dropped at close", dropped)

    def __enter__(self) -> "DMAuditor":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(wait=exc_type is None)
