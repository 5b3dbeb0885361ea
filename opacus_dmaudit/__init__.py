"""opacus_dmaudit: see what an attacker with a diffusion-model prior recovers from Opacus DP-SGD gradients.

Data flow, one module each: ``imprint`` (binning block in front of the model) -> ``capture`` (clipped and noised
gradients from real DP-SGD steps) -> ``recovery`` (noisy images and their noise levels) -> ``prior`` (diffusion
model denoising from a matched timestep; its reverse chain, fast path included, in ``reverse_process``) ->
``metrics`` -> ``report``. ``auditor`` runs them beside an Opacus training run: ``batch_copy`` on the training
thread, ``attack`` (recovery to scored record) on its worker; ``run_summary`` pools a run's records.
"""

from opacus_dmaudit.attack import AuditRecord
from opacus_dmaudit.auditor import DMAuditor
from opacus_dmaudit.capture import CapturedGradients, GradientCapture, PerLayerClippingError
from opacus_dmaudit.data import ImageLoadError, adapt_to_prior, denormalize, load_images, restore_from_prior
from opacus_dmaudit.evaluation import PriorEvaluation, evaluate_prior
from opacus_dmaudit.imprint import ImprintBlock, ImprintedModel
from opacus_dmaudit.metrics import ImageMetrics, lpips_distance, lpips_status, mse, psnr, ssim
from opacus_dmaudit.noise import add_gaussian_noise, estimate_noise_std
from opacus_dmaudit.prior import DiffusionPrior, PriorLoadError, ReconstructionOutput
from opacus_dmaudit.recovery import RecoveredImages, recover_images
from opacus_dmaudit.reverse_process import FastPathConfig, cuda_graphs_leave_default_generator_alone
from opacus_dmaudit.run_summary import RunSummary, read_audit_records, summarize_run
from opacus_dmaudit.training import PriorTrainingConfig, train_prior

__version__ = "0.1.0"

__all__ = [
    "AuditRecord",
    "CapturedGradients",
    "DMAuditor",
    "DiffusionPrior",
    "FastPathConfig",
    "GradientCapture",
    "ImageLoadError",
    "ImageMetrics",
    "ImprintBlock",
    "ImprintedModel",
    "PerLayerClippingError",
    "PriorEvaluation",
    "PriorLoadError",
    "PriorTrainingConfig",
    "RecoveredImages",
    "ReconstructionOutput",
    "RunSummary",
    "adapt_to_prior",
    "add_gaussian_noise",
    "cuda_graphs_leave_default_generator_alone",
    "denormalize",
    "estimate_noise_std",
    "evaluate_prior",
    "load_images",
    "lpips_distance",
    "lpips_status",
    "mse",
    "psnr",
    "read_audit_records",
    "recover_images",
    "restore_from_prior",
    "ssim",
    "summarize_run",
    "train_prior",
]
