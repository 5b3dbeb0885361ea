"""Reports: image grids, JSON files and (for the auditor) TensorBoard logs.

Audit outputs contain training images, which are exactly what differential privacy protects. Everything this
module writes is created with owner-only permissions (files 0600, folders 0700) unless told otherwise.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Mapping, Sequence

import torch

if TYPE_CHECKING:  # the auditor writes the attack's records (and their pools) with this module's writer
    from opacus_dmaudit.attack import AuditRecord
    from opacus_dmaudit.run_summary import RunSummary

__all__ = ["PRIVATE_FILE_MODE", "PRIVATE_DIR_MODE", "make_private_dir", "protect_tree", "write_private_bytes",
           "write_json", "to_json", "image_grid", "grid_selection", "GRID_ORDERS", "save_image_grid",
           "metrics_and_success_plot", "audit_scalars", "pooled_scalars",
           "audit_summary_markdown", "AuditLogWriter"]

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def make_private_dir(path: str | os.PathLike) -> Path:
    """Create a folder (and parents) readable by the owner only; tighten an existing one we are told to use."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    os.chmod(path, PRIVATE_DIR_MODE)
    return path


def protect_tree(path: str | os.PathLike, *, leave: Collection[Path] = ()) -> None:
    """Make a folder and everything below it owner-only (files written by other libraries, e.g. TensorBoard),
    except the paths in ``leave``."""
    root = Path(path)
    for item in [root, *root.rglob("*")]:
        if item in leave:
            continue
        try:
            os.chmod(item, PRIVATE_DIR_MODE if item.is_dir() else PRIVATE_FILE_MODE)
        except OSError:
            pass


def write_private_bytes(path: str | os.PathLike, data: bytes, *, private: bool = True) -> Path:
    """Write a file atomically, with mode 0600 when ``private``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, payload: Any, *, private: bool = True) -> Path:
    """Write JSON that any reader accepts: NaN and infinities written as null (see :func:`to_json`)."""
    return write_private_bytes(path, (to_json(payload, indent=2) + "\n").encode(), private=private)


def to_json(payload: Any, *, indent: int | None = None) -> str:
    """Standard JSON text: NaN and ±infinity become null, as JavaScript's ``JSON.stringify`` writes them.

    Python's ``json`` would write ``NaN`` and ``Infinity``, which RFC 8259 forbids: ``JSON.parse`` rejects them and
    ``jq`` turns ``Infinity`` into 1.8e308. The values that meet this are an epsilon without noise (infinite, and the
    record's ``noise_multiplier`` of 0 says why) and metrics of images that could not be scored.
    """
    return json.dumps(_non_finite_to_none(payload), indent=indent, allow_nan=False)


def _non_finite_to_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _non_finite_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_non_finite_to_none(v) for v in value]
    return value


def image_grid(rows: Sequence[torch.Tensor], *, padding: int = 2) -> torch.Tensor:
    """Stack image sets as rows of one grid: ``rows[i]`` is ``N×C×H×W`` in ``[0, 1]``; returns ``3×H'×W'``."""
    from torchvision.utils import make_grid

    width = max((r.shape[0] for r in rows), default=0)
    if width == 0:
        raise ValueError("image_grid needs at least one image")
    tiles = []
    for row in rows:
        row = row.detach().float().cpu().clamp(0, 1)
        if row.shape[1] == 1:
            row = row.expand(-1, 3, -1, -1)
        if row.shape[0] < width:
            row = torch.cat([row, row.new_ones((width - row.shape[0], *row.shape[1:]))])
        tiles.append(row)
    return make_grid(torch.cat(tiles), nrow=width, padding=padding, pad_value=1.0)


# Which reconstructions a grid shows first (DMAuditor's grid_order); what a "best" grid sorts by, in order of
# preference: the metric, whether higher is better, and its name in the text beside the grid.
GRID_ORDERS = ("best", "first")
_BEST_BY = (("ssim", True, "SSIM"), ("psnr", True, "PSNR"), ("mse", False, "MSE"))


def grid_selection(values: dict[str, torch.Tensor | None], *, count: int, order: str) -> tuple[torch.Tensor, str]:
    """Which reconstructions an audit's grid shows first, and how to say so.

    ``"best"``: the reconstructions closest to their training images first (highest SSIM; PSNR or lowest MSE when
    SSIM is not scored), because those show what the attacker succeeded on, which the first few of a batch at a
    large sigma mostly do not. ``"first"``: the order in which the images were attacked.

    Returns:
        ``(indices, description)``: all ``count`` indices in grid order (stable: ties keep the attacked order).
    """
    if order == "best":
        for name, higher_is_better, label in _BEST_BY:
            scores = values.get(name)
            if scores is not None and scores.numel() == count:
                # NaN (an unscorable image) last; a perfect reconstruction's infinite PSNR first.
                key = torch.nan_to_num(scores.double(), nan=-math.inf if higher_is_better else math.inf)
                indices = torch.sort(key, descending=higher_is_better, stable=True).indices
                return indices, f"{'highest' if higher_is_better else 'lowest'} {label} first"
    return torch.arange(count), "in the order attacked"


def save_image_grid(rows: Sequence[torch.Tensor], path: str | os.PathLike, *, private: bool = True) -> Path:
    """Save :func:`image_grid` as a PNG (0600 when ``private``)."""
    from PIL import Image

    grid = image_grid(rows)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return write_private_bytes(path, buffer.getvalue(), private=private)


def _log_axis(ax, xs: Sequence[float]) -> None:
    """A log x axis ticked at the given values alone (matplotlib's minor labels overlap over a short range)."""
    ax.set_xscale("log")
    ticks = sorted({x for x in xs if math.isfinite(x) and x > 0})
    ax.set_xticks(ticks, [f"{x:.3g}" for x in ticks])
    ax.minorticks_off()


def metrics_and_success_plot(entries: Sequence[Any], xs: Sequence[float], *, x_label: str,
                             bounds: Sequence[tuple[str, str, float, Callable[[Any, str], float | None]]],
                             confidence: float, title: str) -> bytes:
    """A PNG of four panels against ``xs`` (log axis): mean PSNR, SSIM and MSE of the noisy and reconstructed
    images, and each success rate with its interval as error bars beside its bounds.

    Args:
        entries: one per x, each with ``noisy`` and ``reconstructed`` (metric means) and ``success`` and
            ``success_ci`` per ``metric@eta`` (a sweep's entries, a run summary's noise multipliers).
        bounds: per bound line: its label, matplotlib format, alpha, and ``bound(entry, key)`` (None: not drawn).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, metric in zip(axes[:3], ("psnr", "ssim", "mse")):
        for attribute, style, label in (("noisy", "o--", "noisy (recovered)"),
                                        ("reconstructed", "o-", "reconstructed")):
            values = [getattr(e, attribute).get(metric) for e in entries]
            ax.plot(xs, [math.nan if v is None else v for v in values], style, label=label)
        ax.set_xlabel(x_label)
        ax.set_ylabel(metric.upper())
        _log_axis(ax, xs)
        ax.legend()
    ax = axes[3]
    for key in sorted(entries[0].success) if entries else ():
        rates = [e.success.get(key, math.nan) for e in entries]
        # The bars are each rate's interval: few images leave a rate rough, and the plot must not hide it.
        spans = [[rate - e.success_ci[key]["low"] if key in e.success_ci else 0.0 for rate, e in zip(rates, entries)],
                 [e.success_ci[key]["high"] - rate if key in e.success_ci else 0.0 for rate, e in zip(rates, entries)]]
        line = ax.errorbar(xs, rates, yerr=spans, fmt="o-", capsize=3,
                           label=f"success {key} ({confidence:.0%} interval)").lines[0]
        for label, style, alpha, bound in bounds:
            values = [bound(e, key) for e in entries]
            if any(v is not None for v in values):
                ax.plot(xs, [math.nan if v is None else v for v in values], style, color=line.get_color(),
                        alpha=alpha, label=f"{label} {key}")
    ax.set_xlabel(x_label)
    ax.set_ylabel("success rate")
    _log_axis(ax, xs)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def audit_scalars(record: AuditRecord) -> dict[str, float | None]:
    """An audit's TensorBoard scalars by tag: what it recovered, its privacy figures, the mean metrics of its noisy
    and reconstructed images, its success rates and their ReRo bounds (None: not logged)."""
    scalars: dict[str, float | None] = {
        "audit/recovered_images": record.recovered,
        "audit/collisions": record.collisions,
        "audit/noise_std_median": record.noise_std_median,
        "audit/t_start_median": record.t_start_median,
        "privacy/epsilon": record.epsilon,
        "privacy/mu_step": record.mu_step,
        "privacy/noise_multiplier": record.noise_multiplier,
    }
    for prefix, values in (("noisy", record.noisy), ("reconstructed", record.reconstructed),
                           ("success_rate", record.success), ("rero_bound", record.rero_bound)):
        scalars.update({f"{prefix}/{name}": value for name, value in values.items()})
    return scalars


def pooled_scalars(pooled: RunSummary) -> dict[str, float]:
    """The TensorBoard scalars of a :class:`~opacus_dmaudit.run_summary.RunSummary`: per ``metric@eta`` the pooled
    success rate and its interval's ends, which narrow as audits add up."""
    scalars = {f"pooled_success_rate/{key}": rate for key, rate in pooled.success.items()}
    for key, interval in pooled.success_ci.items():
        scalars[f"pooled_success_low/{key}"] = interval["low"]
        scalars[f"pooled_success_high/{key}"] = interval["high"]
    return scalars


def audit_summary_markdown(record: AuditRecord, *, grid_rows: Sequence[str] = (), shown: int = 0,
                           order: str | None = None) -> str:
    """The Markdown beside an audit's grid: its summary line, what the grid's rows are (``grid_rows``, top to bottom,
    ``shown`` images each, in the ``order`` said, e.g. "highest SSIM first"; none: no grid), and the notes that would
    otherwise sit in ``audits.jsonl`` alone (wrong pixel units, lost colour, epsilon from another accountant)."""
    lines = [f"`{record.summary()}`", ""]
    if grid_rows:
        lines += [f"Grid rows, top to bottom: {'; '.join(grid_rows)} ({shown} of the {record.recovered} "
                  f"reconstructed{f', {order}' if order else ''}, of {record.attacked} attacked in a batch of "
                  f"{record.batch_size}).", ""]
    lines += [f"- {note}" for note in record.notes]
    return "\n".join(lines).strip()


def _chartable(value: float | None) -> bool:
    """Whether TensorBoard can chart ``value``: not None (not scored), NaN, or infinite. An infinite value (epsilon of
    a run without noise, PSNR of an exact reconstruction) would stretch a chart's axis without end and hide every
    finite point on it; the audit's summary text and ``audits.jsonl`` keep it."""
    return value is not None and math.isfinite(value)


class AuditLogWriter:
    """TensorBoard event files plus ``audits.jsonl`` in one private log folder.

    Args:
        log_dir: the folder (created 0700, an existing one tightened to 0700; existing files are appended to,
            never replaced, and keep their permissions unless they are ``audits.jsonl``).
        log_originals: put the original training images in grids; False logs only noisy and reconstructed rows.

    Attributes:
        earlier_run: the folder already held audit logs (``audits.jsonl`` or event files) that this run appends to.
    """

    def __init__(self, log_dir: str | os.PathLike, *, log_originals: bool = True) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = make_private_dir(log_dir)
        self.log_originals = log_originals
        self.jsonl_path = self.log_dir / "audits.jsonl"
        # What was there before is the user's (or an earlier run's): only what this writer adds gets its modes set.
        self._found = set(self.log_dir.rglob("*")) - {self.jsonl_path}
        self.earlier_run = self.jsonl_path.exists() or any(self.log_dir.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self._charted = False  # the success-rate charts are laid out once, at the first audit that scored images
        self._protect()

    def _protect(self) -> None:
        # The folder is already owner-only; tighten the files too in case it is ever moved or shared.
        protect_tree(self.log_dir, leave=self._found)

    def config(self, settings: dict[str, Any]) -> None:
        rows = "\n".join(f"| {k} | {v} |" for k, v in settings.items())
        self.writer.add_text("audit/config", "| setting | value |\n|---|---|\n" + rows, global_step=0)

    def text(self, tag: str, markdown: str, *, step: int) -> None:
        self.writer.add_text(tag, markdown, global_step=step)

    def grid(self, tag: str, rows: Sequence[torch.Tensor], *, step: int) -> None:
        self.writer.add_image(tag, image_grid(rows), global_step=step)

    def scalars(self, values: dict[str, float | None], *, step: int) -> None:
        """Log each value that is a finite number (see :func:`_chartable`)."""
        for tag, value in values.items():
            if _chartable(value):
                self.writer.add_scalar(tag, float(value), global_step=step)

    def success_charts(self, keys: Sequence[str]) -> None:
        """Custom Scalars charts per ``metric@eta``: the audit's success rate, the pooled one and the ReRo bound on
        the same axes; and the pooled rate inside its interval (a Margin chart)."""
        self.writer.add_custom_scalars({
            "success rate against the ReRo bound": {
                key: ["Multiline", [f"success_rate/{key}", f"pooled_success_rate/{key}", f"rero_bound/{key}"]]
                for key in keys},
            "pooled success rate and its interval": {
                key: ["Margin", [f"pooled_success_rate/{key}", f"pooled_success_low/{key}",
                                 f"pooled_success_high/{key}"]] for key in keys},
        })

    def audit(self, record: AuditRecord, *, originals: torch.Tensor | None = None,
              rows: Mapping[str, torch.Tensor] | None = None, order: str | None = None,
              pooled: RunSummary | None = None) -> None:
        """Log one audit at its step: its scalars (:func:`audit_scalars`, and :func:`pooled_scalars` of ``pooled``),
        its image grid, the Markdown summary beside it (:func:`audit_summary_markdown`), and its line in
        ``audits.jsonl``; then flush.

        Args:
            record: the audit's :class:`~opacus_dmaudit.attack.AuditRecord`.
            originals: the training images, the grid's top row; never written under ``log_originals=False``.
            rows: the grid's rows below them, top to bottom, by what they show (as many images each as
                ``originals``); None: no grid.
            order: how the grid's columns are ordered, for the text beside it (e.g. "highest SSIM first").
            pooled: the run's audits at this audit's noise multiplier so far, this one included.
        """
        grid: dict[str, torch.Tensor] = {}
        if rows:
            if originals is not None and self.log_originals:
                grid["the training images"] = originals
            grid.update(rows)
        if record.success and not self._charted:
            self._charted = True
            self.success_charts(sorted(record.success))
        self.scalars(audit_scalars(record), step=record.step)
        if pooled is not None:
            self.scalars(pooled_scalars(pooled), step=record.step)
        if grid:
            tag = "original_noisy_reconstructed" if self.log_originals else "noisy_reconstructed"
            self.grid(f"audit/{tag}", list(grid.values()), step=record.step)
        self.text("audit/summary", audit_summary_markdown(record, grid_rows=list(grid),
                                                          shown=len(next(iter(grid.values()))) if grid else 0,
                                                          order=order if grid else None),
                  step=record.step)
        self.record(dataclasses.asdict(record))
        self.flush()

    def record(self, payload: dict[str, Any]) -> None:
        line = to_json(payload) + "\n"
        fd = os.open(self.jsonl_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_FILE_MODE)
        with os.fdopen(fd, "a") as fh:
            fh.write(line)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        self.writer.add_hparams(clean, {k: v for k, v in metrics.items() if _chartable(v)},
                                run_name="hparams")

    def flush(self) -> None:
        self.writer.flush()
        self._protect()

    def close(self) -> None:
        self.writer.close()
        self._protect()
