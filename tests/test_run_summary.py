"""A run's audits taken together: pooled per noise multiplier, read back from their logs, and `summarize`."""

import json
import math
from dataclasses import asdict

import pytest
from scipy.stats import binomtest
from test_report import audit_record

from opacus_dmaudit.cli import main
from opacus_dmaudit.report import AuditLogWriter
from opacus_dmaudit.run_summary import read_audit_records, run_summary_markdown, summarize_run


def scored(step, hits, images, **changes):
    """A record of ``images`` reconstructions, ``hits`` of them within SSIM 0.5 (and none within MSE 0.01)."""
    return audit_record(step, recovered=images, success={"ssim@0.5": hits / images, "mse@0.01": 0.0}, **changes)


def nothing_recovered(step, **changes):
    return audit_record(step, recovered=0, noisy={}, reconstructed={}, success={}, rero_bound={}, **changes)


def test_audits_at_one_noise_multiplier_add_their_hits_and_images():
    records = [scored(10, 1, 4, reconstructed={"psnr": 10.0, "ssim": 0.3}, epsilon=1.0, collisions=2),
               nothing_recovered(20, epsilon=2.0, collisions=9),
               scored(30, 5, 12, reconstructed={"psnr": 14.0, "ssim": 0.5}, epsilon=3.0, collisions=4),
               scored(40, 3, 7, reconstructed={"psnr": 12.0, "ssim": 0.4}, epsilon=4.0, collisions=1),
               # 13 / 23 * 23 is 12.999999999999998 in floating point: the count must come back as 13.
               scored(50, 13, 23, reconstructed={"psnr": 11.0, "ssim": 0.35}, epsilon=5.0, collisions=3)]
    (level,) = summarize_run(reversed(records))  # any order
    assert (level.noise_multiplier, level.audits, level.first_step, level.last_step) == (1.0, 5, 10, 50)
    assert (level.attacked, level.recovered, level.collisions) == (320, 46, 19)
    assert level.epsilon == 5.0  # after the last of them
    assert level.success_hits == {"ssim@0.5": 22, "mse@0.01": 0}
    assert level.success == {"ssim@0.5": 22 / 46, "mse@0.01": 0.0}
    exact = binomtest(22, 46).proportion_ci(confidence_level=0.95, method="exact")
    assert level.success_ci["ssim@0.5"] == pytest.approx({"low": exact.low, "high": exact.high})
    # Each audit's mean weighted by its images: a plain mean of the four audits would be 11.75 dB.
    assert level.reconstructed["psnr"] == pytest.approx((10 * 4 + 14 * 12 + 12 * 7 + 11 * 23) / 46)
    assert level.noisy == {"psnr": 8.0, "ssim": pytest.approx(0.1), "lpips": None}  # no audit scored LPIPS
    # Pooled, the interval is narrower than any one audit's.
    width = level.success_ci["ssim@0.5"]["high"] - level.success_ci["ssim@0.5"]["low"]
    for hits, images in ((1, 4), (5, 12), (3, 7), (13, 23)):
        one = binomtest(hits, images).proportion_ci(method="exact")
        assert width < one.high - one.low
    assert "5 audit(s), steps 10 to 50" in level.summary() and "22 of 46 = 0.478" in level.summary()
    narrower = summarize_run(records, confidence=0.5)[0].success_ci["ssim@0.5"]
    assert narrower["high"] - narrower["low"] < width


def test_each_noise_multiplier_is_pooled_apart_in_the_order_first_audited():
    # A noise schedule that comes back to sigma 1: its audits at 1 pool together, those at 0.5 apart.
    records = [scored(10, 4, 8, noise_multiplier=1.0), scored(20, 8, 8, noise_multiplier=0.5, epsilon=2.0),
               scored(30, 0, 8, noise_multiplier=1.0, epsilon=float("inf"))]
    first, second = summarize_run([records[1], records[2], records[0]])  # in any order
    assert (first.noise_multiplier, first.audits, first.success_hits["ssim@0.5"], first.recovered) == (1.0, 2, 4, 16)
    assert (second.noise_multiplier, second.audits, second.success_hits["ssim@0.5"]) == (0.5, 1, 8)
    assert first.epsilon is None and second.epsilon == 2.0  # an infinite epsilon is no figure
    assert summarize_run([]) == []
    with pytest.raises(ValueError, match="confidence must lie strictly between 0 and 1"):
        summarize_run(records, confidence=95)


def test_an_interval_wholly_above_the_rero_bound_is_flagged():
    above = summarize_run([scored(1, 15, 16), scored(2, 15, 16, rero_bound={"ssim@0.5": 0.4})])[0]
    # 30 of 32: the interval's low end, 0.79, clears the higher of the two bounds.
    assert above.rero_bound == {"ssim@0.5": 0.6} and above.above_bound == ["ssim@0.5"]
    assert "interval above it" in above.summary()
    within = summarize_run([scored(1, 3, 4)])[0]  # 0.75, but its interval reaches down to 0.19
    assert within.above_bound == [] and "interval above it" not in within.summary()
    markdown = run_summary_markdown([above, within])
    assert "the whole interval of ssim@0.5 lies above its ReRo bound" in markdown
    assert markdown.count("lies above") == 1 and "95% Clopper-Pearson" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len({line.count("|") for line in rows}) == 1  # every row has the header's columns
    assert len(rows) == 2 + 2 * 2  # header, rule, two keys per noise multiplier


def test_records_read_back_from_the_log_folder_as_they_were_written(tmp_path):
    records = [scored(5, 2, 4, epsilon=1.5), nothing_recovered(10, epsilon=2.5)]
    writer = AuditLogWriter(tmp_path / "run")
    for record in records:
        writer.audit(record)
    writer.close()
    assert read_audit_records(tmp_path / "run") == records
    assert read_audit_records(tmp_path / "run" / "audits.jsonl") == records
    # A field of a later version is passed over; a line that is no record is named.
    lines = (tmp_path / "run" / "audits.jsonl").read_text().splitlines()
    later = json.loads(lines[0]) | {"a_later_field": 1}
    (tmp_path / "later.jsonl").write_text(json.dumps(later) + "\n\n")
    assert read_audit_records(tmp_path / "later.jsonl") == records[:1]
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n" + json.dumps({"step": 3}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2, is not an audit record"):
        read_audit_records(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="give a DMAuditor log folder"):
        read_audit_records(tmp_path / "nowhere")
    # An infinite epsilon is written as null and comes back as no figure.
    writer = AuditLogWriter(tmp_path / "no-noise")
    writer.audit(scored(1, 4, 4, noise_multiplier=0.0, epsilon=math.inf, mu_step=None))
    writer.close()
    assert read_audit_records(tmp_path / "no-noise")[0].epsilon is None


def test_summarize_prints_each_run_and_writes_json(tmp_path, capsys):
    runs = {"sigma1": [scored(50, 2, 20), scored(100, 4, 20, epsilon=3.0)],
            "sigma3": [scored(50, 0, 20, noise_multiplier=3.0, epsilon=0.2, rero_bound={"ssim@0.5": 0.05})]}
    for name, records in runs.items():
        writer = AuditLogWriter(tmp_path / name)
        for record in records:
            writer.audit(record)
        writer.close()
    folders = [str(tmp_path / name) for name in runs]
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "audits.jsonl").write_text("")  # a run that finished no audit
    assert main(["summarize", *folders, str(tmp_path / "none"), "--json", str(tmp_path / "summary.json"),
                 "--plot", str(tmp_path / "runs.png")]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(str(tmp_path))}
    # run, sigma, audits, steps, epsilon, images | PSNR, SSIM | success, interval, bound
    assert rows[folders[0]][1:6] == ["1", "2", "50-100", "3", "40"] and rows[folders[0]][10:] == [
        "0.150", "0.057-0.298", "0.600"]
    assert rows[folders[1]][1:6] == ["3", "1", "50-50", "0.2", "20"] and rows[folders[1]][10:] == [
        "0.000", "0.000-0.168", "0.050"]
    assert rows[str(tmp_path / "none")][1:] == ["no", "audits"]
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == json.loads(json.dumps({**{f: [asdict(s) for s in summarize_run(runs[n])]
                                                for f, n in zip(folders, runs)}, str(tmp_path / "none"): []}))
    assert (tmp_path / "summary.json").stat().st_mode & 0o077 == 0  # it describes training images' attacks
    # Nothing is replaced without --overwrite, and a folder without audits is one line, exit status 2.
    assert main(["summarize", folders[0], "--json", str(tmp_path / "summary.json")]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["summarize", str(tmp_path / "nowhere")]) == 2
    assert "no audit records at" in capsys.readouterr().err
    # The plot: one point per run and sigma, against epsilon; a run without a finite epsilon has no place on it.
    from PIL import Image

    with Image.open(tmp_path / "runs.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 3 * plot.size[1]
    assert main(["summarize", folders[0], "--plot", str(tmp_path / "runs.png")]) == 2
    assert "runs.png exists; pass --overwrite" in capsys.readouterr().err
    writer = AuditLogWriter(tmp_path / "no-noise")
    writer.audit(scored(1, 4, 4, noise_multiplier=0.0, epsilon=math.inf, mu_step=None))
    writer.close()
    assert main(["summarize", str(tmp_path / "no-noise"), "--plot", str(tmp_path / "none.png")]) == 2
    assert "nothing to plot: no run has an audit that reconstructed images at a finite epsilon" in (
        capsys.readouterr().err)
    assert not (tmp_path / "none.png").exists()
