"""What a run's audits say together: their reconstructions pooled per noise multiplier, each success rate with an
interval that many audits make narrow.

One audit scores a few dozen images at most (about 37% of ``bins`` in shadow mode), so its success rate is rough:
1 of 4 leaves the rate anywhere from 0.006 to 0.81 at 95%. The audits of one run at the same noise multiplier attack
the same mechanism (in shadow mode the auditor's own imprint with the run's sigma and C), so their hits and images add
up: twenty audits of 16 images give a rate over 320. That pooled rate, not one audit's, is the figure to compare
between training runs of different noise multipliers, and :class:`DMAuditor` logs it at ``close()`` (TensorBoard
text ``audit/run_summary`` and the hparams of the last noise multiplier); ``opacus-dmaudit summarize`` reads it from
the ``audits.jsonl`` of finished runs.

The interval treats every reconstruction as an independent trial. Shadow mode attacks the first ``bins`` images of
each audited batch, so over several epochs one training image can be attacked more than once, each time with fresh
noise: the pooled rate counts (audit, image) pairs, not distinct images.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable, Sequence

from opacus_dmaudit.attack import AuditRecord
from opacus_dmaudit.metrics import success_interval

__all__ = ["RunSummary", "summarize_run", "read_audit_records", "run_summary_markdown"]

# The success criterion a summary line shows (the auditor's own summaries and the sweep's default show the same).
SUMMARY_KEY = "ssim@0.5"


@dataclass
class RunSummary:
    """The audits of one run at one noise multiplier, taken together.

    Attributes:
        noise_multiplier: the audited steps' sigma, as the accountant recorded it.
        audits: how many audits ran at it, from step ``first_step`` to step ``last_step``.
        attacked / recovered / collisions: summed over those audits: images attacked, images alone in their bin
            (recovered, reconstructed and scored), and bins that held two or more.
        epsilon / delta: the accountant's epsilon at ``delta`` after the last of these audits (None: none, or
            infinite).
        noisy / reconstructed: each metric's mean over all scored images (each audit's mean weighted by its images;
            PSNR's audit means are over finite values); None where no audit could score it (LPIPS without weights).
        success: per ``"<metric>@<eta>"``, the share of all these reconstructions within eta of their training image;
            ``success_hits`` their count, of ``recovered``.
        success_ci: each share's Clopper-Pearson interval (``low``, ``high``) at ``confidence``.
        rero_bound: per key, the highest success rate DP allows an attacker of one such step at the prior's baseline
            kappa (the audits share sigma and kappa, so their bounds agree; the highest is kept).
        above_bound: the keys whose whole interval lies above the bound: more successes than DP allows, beyond the
            rate's sampling error (kappa, an estimate from prior draws, has its own). The auditor's attacker has side
            information the bound does not cover (which bins hold one image; the oracle scale), but a rate above it
            is worth a look at the DP set-up.
    """

    noise_multiplier: float
    audits: int
    first_step: int
    last_step: int
    attacked: int
    recovered: int
    collisions: int
    epsilon: float | None
    delta: float
    noisy: dict[str, float | None]
    reconstructed: dict[str, float | None]
    success: dict[str, float]
    success_hits: dict[str, int]
    success_ci: dict[str, dict[str, float]]
    rero_bound: dict[str, float]
    above_bound: list[str] = field(default_factory=list)
    confidence: float = 0.95

    def summary(self) -> str:
        """One line: the audits, the images, mean PSNR and SSIM, and the ``ssim@0.5`` rate with its interval."""
        line = (f"noise multiplier {self.noise_multiplier:g}: {self.audits} audit(s), steps {self.first_step} to "
                f"{self.last_step}, eps={_figure(self.epsilon, '.3g')} | {self.recovered} images reconstructed of "
                f"{self.attacked} attacked")
        if not self.recovered:
            return line
        psnr, ssim = (self.reconstructed.get(name) for name in ("psnr", "ssim"))
        line += f" | PSNR {_figure(psnr, '.2f')} dB, SSIM {_figure(ssim, '.3f')}"
        if SUMMARY_KEY in self.success:
            ci = self.success_ci[SUMMARY_KEY]
            line += (f" | SSIM >= 0.5: {self.success_hits[SUMMARY_KEY]} of {self.recovered} = "
                     f"{self.success[SUMMARY_KEY]:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]")
            if SUMMARY_KEY in self.rero_bound:
                line += f" (ReRo bound {self.rero_bound[SUMMARY_KEY]:.3f}"
                line += ", interval above it)" if SUMMARY_KEY in self.above_bound else ")"
        return line


def _pooled_mean(records: list[AuditRecord], attribute: str, metric: str) -> float | None:
    """Mean of a metric over all images of ``records``: each audit's mean weighted by its image count."""
    total, images = 0.0, 0
    for record in records:
        value = getattr(record, attribute).get(metric)
        if value is not None and math.isfinite(value):
            total += value * record.recovered
            images += record.recovered
    return total / images if images else None


def _summarize_level(records: list[AuditRecord], *, confidence: float) -> RunSummary:
    scored = [r for r in records if r.recovered]
    hits: dict[str, int] = {}
    images: dict[str, int] = {}
    for record in scored:
        for key, rate in record.success.items():
            # A record keeps its rate, hits / recovered, as a float: the count comes back exactly.
            hits[key] = hits.get(key, 0) + round(rate * record.recovered)
            images[key] = images.get(key, 0) + record.recovered
    success = {key: hits[key] / images[key] for key in hits}
    success_ci = {}
    for key in hits:
        low, high = success_interval(hits[key], images[key], confidence=confidence)
        success_ci[key] = {"low": low, "high": high}
    bounds: dict[str, float] = {}
    for record in scored:
        for key, bound in record.rero_bound.items():
            bounds[key] = max(bound, bounds.get(key, bound))
    metrics = {"noisy": [], "reconstructed": []}
    for record in scored:
        for attribute, names in metrics.items():
            names.extend(name for name in getattr(record, attribute) if name not in names)
    last = max(records, key=lambda r: r.step)
    return RunSummary(
        noise_multiplier=records[0].noise_multiplier, audits=len(records),
        first_step=min(r.step for r in records), last_step=last.step,
        attacked=sum(r.attacked for r in records), recovered=sum(r.recovered for r in records),
        collisions=sum(r.collisions for r in records),
        epsilon=last.epsilon if last.epsilon is not None and math.isfinite(last.epsilon) else None, delta=last.delta,
        noisy={name: _pooled_mean(scored, "noisy", name) for name in metrics["noisy"]},
        reconstructed={name: _pooled_mean(scored, "reconstructed", name) for name in metrics["reconstructed"]},
        success=success, success_hits=hits, success_ci=success_ci, rero_bound=bounds,
        above_bound=sorted(key for key in success_ci if key in bounds and success_ci[key]["low"] > bounds[key]),
        confidence=confidence,
    )


def summarize_run(records: Iterable[AuditRecord], *, confidence: float = 0.95) -> list[RunSummary]:
    """Pool a run's audit records per noise multiplier.

    Args:
        records: the run's :class:`~opacus_dmaudit.attack.AuditRecord` (``DMAuditor.records``, or
            :func:`read_audit_records` of its log folder), in any order.
        confidence: the level of each pooled success rate's Clopper-Pearson interval.

    Returns:
        One :class:`RunSummary` per noise multiplier, in the order the run first audited them (a noise schedule gives
        one per value it took at an audited step); empty for no records.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1 (0.95 for a 95% interval), got {confidence}")
    levels: dict[float, list[AuditRecord]] = {}
    for record in sorted(records, key=lambda r: r.step):
        levels.setdefault(record.noise_multiplier, []).append(record)
    return [_summarize_level(group, confidence=confidence) for group in levels.values()]


def read_audit_records(path: str | os.PathLike) -> list[AuditRecord]:
    """The audit records of a DMAuditor log folder (or of its ``audits.jsonl`` given directly).

    Fields a later version added are ignored; a field this version needs and the line lacks is an error. A folder a
    second run appended to holds both runs' records (``AuditLogWriter.earlier_run``); they come back together.

    Raises:
        FileNotFoundError: no ``audits.jsonl`` there.
        ValueError: a line that is not one audit record, named by its number.
    """
    path = Path(path)
    jsonl = path / "audits.jsonl" if path.is_dir() else path
    if not jsonl.is_file():
        raise FileNotFoundError(f"no audit records at {jsonl}: give a DMAuditor log folder (it holds audits.jsonl) "
                                "or the audits.jsonl file itself")
    known = {f.name for f in fields(AuditRecord)}
    records = []
    with open(jsonl, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                payload = json.loads(line)
                records.append(AuditRecord(**{k: v for k, v in payload.items() if k in known}))
            except (json.JSONDecodeError, TypeError, AttributeError) as exc:
                raise ValueError(f"{jsonl}, line {number}, is not an audit record ({exc}): is this file one that "
                                 "DMAuditor wrote?") from None
    return records


def run_summary_markdown(summaries: Sequence[RunSummary]) -> str:
    """A Markdown table of :func:`summarize_run`'s summaries: one row per noise multiplier and success key."""
    header = ["noise multiplier", "audits (steps)", "epsilon", "images reconstructed of attacked",
              "reconstructed PSNR / SSIM", "success: hits = rate", "interval", "ReRo bound"]
    rows = [header, ["---"] * len(header)]
    notes = []
    for s in summaries:
        psnr, ssim = (s.reconstructed.get(name) for name in ("psnr", "ssim"))
        run = [f"{s.noise_multiplier:g}", f"{s.audits} ({s.first_step} to {s.last_step})",
               _figure(s.epsilon, ".3g"), f"{s.recovered} of {s.attacked}",
               f"{_figure(psnr, '.2f')} / {_figure(ssim, '.3f')}"]
        if not s.success:
            rows.append(run + ["n/a", "", ""])
        for key in s.success:
            ci = s.success_ci[key]
            rows.append(run + [f"{key}: {s.success_hits[key]} = {s.success[key]:.3f}",
                               f"{ci['low']:.3f} to {ci['high']:.3f}", _figure(s.rero_bound.get(key), ".3f")])
            run = [""] * len(run)  # the noise multiplier's figures once, on its first row
        if s.above_bound:
            notes.append(f"At noise multiplier {s.noise_multiplier:g} the whole interval of {', '.join(s.above_bound)} "
                         "lies above its ReRo bound: more successes than DP allows, beyond the rate's sampling error. "
                         "The auditor's attacker knows which bins hold one image (and, with scale 'oracle', the clean "
                         "scale), which the bound does not cover; check the DP set-up all the same.")
    level = f"{summaries[0].confidence:.0%} " if summaries else ""
    intro = (f"Success rates over all reconstructions of the run at each noise multiplier, with their {level}"
             "Clopper-Pearson intervals (an image attacked in several audits counts once per audit).")
    table = ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join([intro, "", *table, *(["", *notes] if notes else [])])


def _figure(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
