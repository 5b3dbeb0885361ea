"""Command line: ``opacus-dmaudit reconstruct | train-prior | sweep | summarize``.

Every expected failure (missing file, bad prior, bad number) ends with one line ``opacus-dmaudit: error: ...``
and exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser"]


class CliError(Exception):
    """A failure the user can fix; printed as one line."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a number > 0, got 0")
    return value


def _probability(text: str) -> float:
    value = _non_negative_float(text)
    if not value < 1 or value == 0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1 (0.95 for 95%), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opacus-dmaudit",
        description="See what an attacker with a diffusion-model prior recovers from DP-SGD gradients.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", required=True)

    rec = commands.add_parser("reconstruct", help="noise images at given stds and reconstruct them with a prior")
    rec.add_argument("--prior", required=True, help="shipped prior name (fashion-mnist), pipeline folder or hub id")
    rec.add_argument("--images", required=True, help=_IMAGES_HELP)
    rec.add_argument("--noise-std", type=_non_negative_float, nargs="+", required=True,
                     help="per-pixel Gaussian noise std(s) in [0, 1] pixel units")
    rec.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim", help=_SAMPLER_HELP)
    rec.add_argument("--steps", type=_positive_int, default=50, help="DDIM steps (default 50)")
    rec.add_argument("--limit", type=_positive_int, default=None, help="use the first N images in file order")
    rec.add_argument("--seed", type=int, default=0, help="seed of the added noise and the sampler (default 0)")
    rec.add_argument("--estimate-noise", action="store_true", help="estimate each image's noise std (unknown variance)")
    rec.add_argument("--batch-size", type=_positive_int, default=None,
                     help="images per UNet call (default: 256 on CUDA, 32 on CPU; fewer for images over 64x64)")
    rec.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    rec.add_argument("--allow-pickle", action="store_true", help=_PICKLE_HELP)
    rec.add_argument("--eager", action="store_true", help=_EAGER_HELP)
    rec.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    rec.add_argument("--per-image", action="store_true", help="include per-image metrics in the JSON")
    rec.add_argument("--grid", type=Path, default=None, help="write a PNG grid: original, noisy, reconstructed")
    rec.add_argument("--overwrite", action="store_true", help="replace existing --json / --grid files")
    rec.add_argument("--no-progress", action="store_true", help="no progress bar")

    train = commands.add_parser("train-prior", help="train a diffusion prior (DDPMPipeline folder)")
    train.add_argument("--images", required=True, help=_IMAGES_HELP + "; e.g. fashion-mnist:train")
    train.add_argument("--out", required=True, type=Path, help="pipeline folder to write")
    train.add_argument("--resolution", type=_positive_int, default=None,
                       help="side of the prior's square images (default: 32 for images up to 32x32, else their size)")
    train.add_argument("--channels", type=int, choices=(1, 3), default=None, help="default: the images' channels")
    train.add_argument("--model-size", choices=("tiny", "small", "base"), default="small",
                       help="UNet width and depth (default small)")
    budget = train.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=_positive_float, default=None, help="passes over the images (default 1)")
    budget.add_argument("--minutes", type=_positive_float, default=None,
                        help="train for this wall-clock time instead of a number of epochs")
    train.add_argument("--batch-size", type=_positive_int, default=128, help="images per step (default 128)")
    train.add_argument("--learning-rate", type=_positive_float, default=2e-4, help="AdamW peak rate (default 2e-4)")
    train.add_argument("--warmup-steps", type=int, default=500,
                       help="steps of linear learning-rate warm-up (default 500)")
    train.add_argument("--ema-decay", type=float, default=0.9995,
                       help="decay of the EMA weights that are saved, in [0, 1) (default 0.9995)")
    train.add_argument("--no-flips", action="store_true", help="no random horizontal flips (e.g. for digits)")
    train.add_argument("--limit", type=_positive_int, default=None, help="train on the first N images only")
    train.add_argument("--seed", type=int, default=0, help="seed of initialisation, batches and noise (default 0)")
    train.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA)")
    train.add_argument("--checkpoint-every", type=int, default=2000,
                       help="steps between resumable checkpoints; 0: only at the end (default 2000)")
    train.add_argument("--fp32", action="store_true", help="save float32 weights instead of float16")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    train.add_argument("--resume", action="store_true",
                       help="continue from --out's checkpoint (--epochs / --minutes count from the first start)")
    train.add_argument("--allow-pickle", action="store_true", help=_PICKLE_HELP)
    train.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out folder")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    sweep = commands.add_parser("sweep", help="which noise multiplier? attack, reconstruct and bound per sigma")
    sweep.add_argument("--images", required=True, help=_IMAGES_HELP + "; e.g. fashion-mnist (its test split)")
    sweep.add_argument("--prior", required=True,
                       help="shipped prior name (fashion-mnist), pipeline folder or hub id")
    sigmas = sweep.add_mutually_exclusive_group()
    sigmas.add_argument("--noise-multipliers", type=_positive_float, nargs="+", default=None,
                        help="the noise multipliers to compare (default 0.3 1 3)")
    sigmas.add_argument("--target-epsilons", type=_positive_float, nargs="+", default=None,
                        help="or the epsilons to compare: each becomes the noise multiplier that reaches it "
                             "over your schedule")
    sweep.add_argument("--sample-rate", type=_positive_float, default=64 / 60000,
                       help="your training's sampling rate q (default 64/60000)")
    sweep.add_argument("--epochs", type=_positive_float, default=10.0, help="your training's epochs (default 10)")
    sweep.add_argument("--delta", type=_positive_float, default=1e-5, help="delta of the epsilons (default 1e-5)")
    sweep.add_argument("--max-grad-norm", type=_positive_float, default=1.0,
                       help="your training's clipping norm C (default 1)")
    sweep.add_argument("--batch-size", type=_positive_int, default=64, help="images per attacked step (default 64)")
    sweep.add_argument("--bins", type=_positive_int, default=128, help="imprint bins (default 128)")
    sweep.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim", help=_SAMPLER_HELP)
    sweep.add_argument("--steps", type=_positive_int, default=50, help="DDIM steps (default 50)")
    sweep.add_argument("--limit", type=_positive_int, default=256, help="attack the first N images (default 256)")
    sweep.add_argument("--links", type=_positive_int, default=1, help="average a sample over this many steps")
    sweep.add_argument("--scale", choices=RECOVERY_SCALES, default="oracle",
                       help="how the attacker fixes each image's scale: oracle (the clean clipped sum, the paper's "
                            "worst case; default), or the attacker's own estimates: clip-norm (from the public "
                            "clipping norm; the strongest), bin-measurement or noisy-bias")
    sweep.add_argument("--estimate-noise", action="store_true",
                       help="reconstruct from noise stds estimated from the images (unknown variance) instead of the "
                            "known ones")
    sweep.add_argument("--kappa-samples", type=_positive_int, default=64, help="prior draws for the baseline kappa")
    sweep.add_argument("--success-metric", choices=("mse", "ssim", "lpips"), default="ssim",
                       help="the error a success is judged by (default ssim; lpips needs the VGG16 weights)")
    sweep.add_argument("--success-eta", type=_positive_float, default=0.5,
                       help="error threshold of a success (1 - SSIM for ssim; default 0.5)")
    sweep.add_argument("--target-success", type=_non_negative_float, default=0.05,
                       help="highest acceptable success rate for the recommendation (default 0.05)")
    sweep.add_argument("--recommend-on", choices=("estimate", "upper"), default="estimate",
                       help="compare the target with each success rate (estimate, default) or with the top of its "
                            "interval (upper: the conservative choice, needs more images)")
    sweep.add_argument("--confidence", type=_probability, default=0.95,
                       help="level of each success rate's Clopper-Pearson interval (default 0.95)")
    sweep.add_argument("--seed", type=int, default=0, help="seed of the noise, batches and sampler (default 0)")
    sweep.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    sweep.add_argument("--allow-pickle", action="store_true", help=_PICKLE_HELP)
    sweep.add_argument("--eager", action="store_true", help=_EAGER_HELP)
    sweep.add_argument("--out", required=True, type=Path,
                       help="folder for sweep.json, sweep.csv, plots, grids and TensorBoard logs (private)")
    sweep.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")

    summarize = commands.add_parser("summarize", help="pool the audits of DMAuditor runs per noise multiplier")
    summarize.add_argument("log_dirs", nargs="+", type=Path, metavar="LOG_DIR",
                           help="DMAuditor log folders (each holds audits.jsonl), e.g. runs/audit-*")
    summarize.add_argument("--confidence", type=_probability, default=0.95,
                           help="level of each pooled success rate's Clopper-Pearson interval (default 0.95)")
    summarize.add_argument("--json", type=Path, default=None, help="write the summaries as JSON here")
    summarize.add_argument("--plot", type=Path, default=None,
                           help="write a PNG here: metrics and success rates (with intervals and ReRo bounds) "
                                "against each run's epsilon, one point per run and noise multiplier")
    summarize.add_argument("--overwrite", action="store_true", help="replace existing --json / --plot files")
    return parser


def _refuse_overwrite(path: Path | None, overwrite: bool) -> None:
    if path is not None and path.exists() and not overwrite:
        raise CliError(f"{path} exists; pass --overwrite to replace it or choose another path")


def _reconstruct(args: argparse.Namespace) -> int:
    from opacus_dmaudit.data import load_images
    from opacus_dmaudit.evaluation import evaluate_prior
    from opacus_dmaudit.prior import DiffusionPrior
    from opacus_dmaudit.report import save_image_grid, write_json

    _refuse_overwrite(args.json, args.overwrite)
    _refuse_overwrite(args.grid, args.overwrite)
    images = load_images(args.images, limit=args.limit, allow_pickle=args.allow_pickle)
    prior = DiffusionPrior.from_pretrained(args.prior, device=args.device, allow_pickle=args.allow_pickle,
                                           fast_path=_fast_path(args))
    show_progress = not args.no_progress and sys.stderr.isatty()
    result = evaluate_prior(
        prior, images, args.noise_std, sampler=args.sampler, steps=args.steps, seed=args.seed,
        estimate_noise=args.estimate_noise, batch_size=args.batch_size, progress=show_progress,
    )
    print(f"prior {result.prior} | {result.n_images} images | {result.sampler}"
          f"{'-' + str(result.steps) if result.sampler == 'ddim' else ''} | adaptation: {result.adaptation} | "
          f"{result.device}")
    header = f"{'noise std':>9} {'t*':>4} | {'noisy PSNR':>10} {'SSIM':>6} {'LPIPS':>6} | " \
             f"{'recon PSNR':>10} {'SSIM':>6} {'LPIPS':>6} | {'seconds':>7}"
    print(header)
    print("-" * len(header))
    for level in result.levels:
        n, r = level.noisy, level.reconstructed
        print(f"{level.noise_std:>9.4g} {level.t_start:>4d} | {_figure(n['psnr'], '10.2f')} "
              f"{_figure(n['ssim'], '6.3f')} {_figure(n.get('lpips'), '6.3f')} | {_figure(r['psnr'], '10.2f')} "
              f"{_figure(r['ssim'], '6.3f')} {_figure(r.get('lpips'), '6.3f')} | {level.seconds:>7.1f}")
        if level.from_prior:
            print(f"          {level.from_prior} images had noise above the prior's range: prior samples")
    if result.adaptation_loss:
        print(f"note: {result.adaptation_loss}")
    if result.levels[0].reconstructed.get("lpips") is None:
        print(f"LPIPS: not computed: {result.lpips}")
    if args.json:
        payload = result.to_json(per_image=args.per_image)
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    if args.grid:
        rows = []
        for original, noisy, reconstructed in result.examples:
            rows = rows or [original]
            rows += [noisy, reconstructed]
        save_image_grid(rows, args.grid)
        print(f"wrote {args.grid} (rows: original, then noisy and reconstructed per noise std)")
    return 0


def _train_prior(args: argparse.Namespace) -> int:
    from opacus_dmaudit.data import load_images
    from opacus_dmaudit.training import CHECKPOINT_NAME, PriorTrainingConfig, train_prior

    config = PriorTrainingConfig(
        resolution=args.resolution, channels=args.channels, model_size=args.model_size,
        epochs=args.epochs if args.epochs is not None else 1.0, minutes=args.minutes, batch_size=args.batch_size,
        learning_rate=args.learning_rate, warmup_steps=args.warmup_steps, ema_decay=args.ema_decay,
        flips=not args.no_flips, seed=args.seed, compile=args.compile, checkpoint_every=args.checkpoint_every,
        save_fp16=not args.fp32,
    )
    images = load_images(args.images, limit=args.limit, allow_pickle=args.allow_pickle)
    description = f"{args.images}" + (f" (first {args.limit})" if args.limit else "")
    try:
        result = train_prior(images, args.out, config=config, resume=args.resume, overwrite=args.overwrite,
                             device=args.device, progress=not args.no_progress, data_description=description)
    except (FileExistsError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None
    trained = result.config
    print(f"trained a {trained.resolution}x{trained.resolution}, {trained.channels}-channel prior: {result.steps} steps "
          f"({result.images_seen} images) in {result.seconds / 60:.1f} min on {result.device}; final loss "
          f"{result.final_loss:.4f}; {result.parameters:,} parameters")
    print(f"wrote {result.path} (load with DiffusionPrior.from_pretrained or --prior {result.path}; its "
          f"{CHECKPOINT_NAME} is only for --resume, so leave it out when you share the prior)")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    import os
    import time

    import torch

    from opacus_dmaudit.data import load_images
    from opacus_dmaudit.prior import DiffusionPrior
    from opacus_dmaudit.sweep import SweepConfig, run_sweep

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        # Launched by torchrun: each rank takes a share of the noise multipliers.
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0 and args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise CliError(f"{args.out} is not empty; pass --overwrite to write into it or choose another folder")
    config = SweepConfig(
        noise_multipliers=args.noise_multipliers or (0.3, 1.0, 3.0), target_epsilons=args.target_epsilons,
        sample_rate=args.sample_rate, epochs=args.epochs, delta=args.delta, max_grad_norm=args.max_grad_norm,
        batch_size=args.batch_size, bins=args.bins, sampler=args.sampler, steps=args.steps, links=args.links,
        scale=args.scale, estimate_noise=args.estimate_noise,
        kappa_samples=args.kappa_samples, success_metric=args.success_metric, success_eta=args.success_eta,
        target_success=args.target_success, recommend_on=args.recommend_on, confidence=args.confidence,
        seed=args.seed,
    )
    if config.sample_rate > 1:
        raise CliError(f"--sample-rate must be at most 1, got {config.sample_rate}")
    images = load_images(args.images, limit=args.limit, allow_pickle=args.allow_pickle)
    device = args.device
    if device is None and torch.distributed.is_initialized() and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"  # one GPU per process
    prior = DiffusionPrior.from_pretrained(args.prior, device=device, fast_path=_fast_path(args),
                                           allow_pickle=args.allow_pickle)
    result = run_sweep(images, prior, config=config, out_dir=args.out, progress=rank == 0)
    if rank == 0:
        key = f"{config.success_metric}@{config.success_eta:g}"
        header = (f"{'sigma':>7} {'epsilon':>9} {'images':>6} {'noise std':>9} | {'noisy PSNR':>10} {'recon PSNR':>10} "
                  f"{'recon SSIM':>10} | {'success ' + key:>16} {f'{config.confidence:.0%} interval':>13} "
                  f"{'kappa':>7} {'bound: steps':>12} "
                  f"{'bound: schedule':>15}")
        print(f"schedule: q = {config.sample_rate:g}, {config.epochs:g} epochs ({config.training_steps} steps), "
              f"delta = {config.delta:g}; attack: batch {config.batch_size}, {config.bins} bins, links "
              f"{config.links}; prior {result.prior}")
        print(header)
        print("-" * len(header))
        for e in result.entries:
            eps = "n/a" if e.epsilon is None else f"{e.epsilon:.3g}"
            bound = e.rero_bound.get(key)
            ci = e.success_ci.get(key, {"low": float("nan"), "high": float("nan")})
            interval = f"{ci['low']:.3f}-{ci['high']:.3f}"
            print(f"{e.noise_multiplier:>7.3g} {eps:>9} {e.n_images:>6d} {e.noise_std['median']:>9.3g} | "
                  f"{e.noisy['psnr']:>10.2f} {e.reconstructed['psnr']:>10.2f} {e.reconstructed['ssim']:>10.3f} | "
                  f"{e.success.get(key, float('nan')):>16.3f} {interval:>13} {e.kappa.get(key, float('nan')):>7.4f} "
                  f"{e.rero_bound_attack.get(key, float('nan')):>12.3f} "
                  f"{'n/a' if bound is None else format(bound, '.3f'):>15}")
        print("bound: steps = ReRo bound for what the attack saw (the sample known to be in the attacked step(s)); "
              "bound: schedule = what DP promises for your whole Poisson-sampled schedule")
        print(f"recommendation: {result.recommendation['message']}")
        print(f"wrote {args.out}/sweep.json, sweep.csv, sweep_vs_sigma.png, sweep_vs_epsilon.png, grids, "
              f"tensorboard/ (private: the grids show the images)")
    if torch.distributed.is_initialized():
        # torch 2.6's gloo group destructor keeps the GIL while it joins its worker threads, and a worker that frees a
        # finished collective's tensors needs the GIL: a rank that destroyed the group just after the gather (one with
        # nothing to write) deadlocked there, and torchrun waited for it forever. The barrier lets the gather's work
        # be freed while this rank waits for rank 0's writing (3 hangs in 25 runs before, 1 in 73 with it). The pause
        # is for that one: read from torch's source, not caught in a stack, the barrier's own work holds references
        # to earlier work until it is freed, right as it returns. torch 2.14 did not deadlock without either.
        torch.distributed.barrier()
        time.sleep(0.05)
        torch.distributed.destroy_process_group()
    return 0


def _summarize(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from opacus_dmaudit.report import metrics_and_success_plot, write_json, write_private_bytes
    from opacus_dmaudit.run_summary import read_audit_records, summarize_run

    _refuse_overwrite(args.json, args.overwrite)
    _refuse_overwrite(args.plot, args.overwrite)
    runs = {}
    for log_dir in args.log_dirs:
        try:
            runs[str(log_dir)] = summarize_run(read_audit_records(log_dir), confidence=args.confidence)
        except FileNotFoundError as exc:
            raise CliError(str(exc)) from None
    width = max(len("run"), *(len(log_dir) for log_dir in runs))
    header = (f"{'run':<{width}} {'sigma':>7} {'audits':>6} {'steps':>11} {'epsilon':>9} {'images':>6} | "
              f"{'recon PSNR':>10} {'recon SSIM':>10} | {'success ssim@0.5':>16} "
              f"{f'{args.confidence:.0%} interval':>13} {'ReRo bound':>10}")
    key = "ssim@0.5"
    print(header)
    print("-" * len(header))
    for log_dir, summaries in runs.items():
        if not summaries:
            print(f"{log_dir:<{width}} no audits")
        for s in summaries:
            ci = s.success_ci.get(key)
            interval = "n/a" if ci is None else f"{ci['low']:.3f}-{ci['high']:.3f}"
            print(f"{log_dir:<{width}} {s.noise_multiplier:>7.3g} {s.audits:>6d} "
                  f"{f'{s.first_step}-{s.last_step}':>11} {_figure(s.epsilon, '9.3g')} {s.recovered:>6d} | "
                  f"{_figure(s.reconstructed.get('psnr'), '10.2f')} {_figure(s.reconstructed.get('ssim'), '10.3f')} | "
                  f"{_figure(s.success.get(key), '16.3f')} {interval:>13} {_figure(s.rero_bound.get(key), '10.3f')}"
                  + ("  interval above the bound" if key in s.above_bound else ""))
    print("success = share of all reconstructions at that sigma with SSIM >= 0.5, pooled over the run's audits (an "
          "image attacked in several audits counts once per audit); --json has every metric and threshold")
    if args.json:
        write_json(args.json, {log_dir: [asdict(s) for s in summaries] for log_dir, summaries in runs.items()})
        print(f"wrote {args.json}")
    if args.plot:
        # Each run's epsilon is the one after its last audit at that sigma: the runs' privacy, side by side.
        points = sorted((s for summaries in runs.values() for s in summaries if s.recovered and s.epsilon is not None),
                        key=lambda s: s.epsilon)
        if not points:
            raise CliError("nothing to plot: no run has an audit that reconstructed images at a finite epsilon")
        png = metrics_and_success_plot(points, [s.epsilon for s in points], x_label="epsilon",
                                       confidence=args.confidence, bounds=[("ReRo bound, audited step", "^--", 0.6,
                                                lambda s, key: s.rero_bound.get(key))],
                                       title=f"opacus-dmaudit summarize: {len(points)} run(s) and noise multiplier(s)")
        write_private_bytes(args.plot, png, private=False)
        print(f"wrote {args.plot}")
    return 0


# recovery.SCALES, spelled out so that --help needs no torch (tested equal)
RECOVERY_SCALES = ("oracle", "bin-measurement", "noisy-bias", "clip-norm")
_SAMPLER_HELP = "ddim (default, --steps steps from t*) or ddpm (every step from t*, as in the paper)"
_EAGER_HELP = "no speed options (fp32, eager, no CUDA graphs); default on CUDA: bf16, compiled, CUDA graphs"
_PICKLE_HELP = ("read Python pickles from trusted sources (they can run code when read): .bin prior checkpoints, "
                "CIFAR's data batches")
_IMAGES_HELP = ("IDX (.gz), .npy/.npz, image folder, torchvision's CIFAR-10/100 folder (test split; PATH:train), "
                "or fashion-mnist[:train]")


def _figure(value: float | None, spec: str) -> str:
    """A table cell: ``value`` formatted by ``spec``, or n/a at the same width."""
    return "n/a".rjust(len(format(0.0, spec))) if value is None else format(value, spec)


def _fast_path(args):
    """The prior's speed options: None keeps the device's defaults."""
    from opacus_dmaudit.reverse_process import FastPathConfig

    return FastPathConfig.eager() if args.eager else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"reconstruct": _reconstruct, "train-prior": _train_prior, "sweep": _sweep,
                "summarize": _summarize}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("opacus-dmaudit: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the user; --debug for the traceback
        if args.debug:
            raise
        from opacus_dmaudit.data import ImageLoadError
        from opacus_dmaudit.prior import PriorLoadError

        expected = (CliError, ImageLoadError, PriorLoadError, ValueError, OSError)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not isinstance(exc, expected):
            message = f"{type(exc).__name__}: {message} (rerun with --debug for the traceback)"
        print(f"opacus-dmaudit: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
