"""The audit log folder: what the auditor writes is owner-only; what was there before keeps its permissions."""

import json
import os

import numpy as np
import torch

from opacus_dmaudit.report import AuditLogWriter, write_json


def strict_json(text):
    """Parse as RFC 8259 readers (JavaScript's JSON.parse) do: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_log_writer_tightens_what_it_writes_and_leaves_the_users_files_alone(tmp_path):
    folder = tmp_path / "runs"
    (folder / "my-run").mkdir(parents=True)
    mine = folder / "my-run" / "notes.txt"
    mine.write_text("the user's")
    os.chmod(mine, 0o644)
    os.chmod(folder / "my-run", 0o755)
    writer = AuditLogWriter(folder)
    assert not writer.earlier_run  # the user's own files are not audit logs
    writer.scalars({"audit/x": 1.0}, step=1)
    writer.grid("audit/grid", [torch.rand(2, 1, 8, 8)], step=1)
    writer.record({"step": 1})
    writer.hparams({"mode": "shadow"}, {"hparam/x": 1.0})
    writer.close()
    assert mine.read_text() == "the user's"
    assert (mine.stat().st_mode & 0o777, (folder / "my-run").stat().st_mode & 0o777) == (0o644, 0o755)
    assert folder.stat().st_mode & 0o777 == 0o700  # the folder that holds training images is tightened
    written = [p for p in folder.rglob("*") if "my-run" not in p.parts]
    assert any(p.name.startswith("events.out.tfevents") for p in written) and (folder / "audits.jsonl") in written
    assert all(p.stat().st_mode & 0o077 == 0 for p in written)


def test_a_second_run_in_the_same_folder_appends_and_knows_it(tmp_path):
    first = AuditLogWriter(tmp_path / "runs")
    first.record({"step": 1})
    first.close()
    second = AuditLogWriter(tmp_path / "runs")
    second.record({"step": 1})
    second.close()
    assert second.earlier_run
    assert (tmp_path / "runs" / "audits.jsonl").read_text().splitlines() == ['{"step": 1}', '{"step": 1}']
    only_events = AuditLogWriter(tmp_path / "events")
    only_events.close()  # an earlier run that logged no audit yet still left its event file
    assert AuditLogWriter(tmp_path / "events").earlier_run


def test_logs_are_standard_json_without_noise_or_scores(tmp_path):
    # An epsilon without noise is infinite, a metric that could not be scored NaN: both must stay readable.
    payload = {"epsilon": float("inf"), "noisy": {"psnr": np.float64("inf"), "ssim": float("nan")},
               "levels": [{"low": float("-inf"), "step": 3}]}
    writer = AuditLogWriter(tmp_path / "runs")
    writer.record(payload)
    writer.close()
    expected = {"epsilon": None, "noisy": {"psnr": None, "ssim": None}, "levels": [{"low": None, "step": 3}]}
    assert strict_json((tmp_path / "runs" / "audits.jsonl").read_text()) == expected
    assert strict_json(write_json(tmp_path / "r.json", payload).read_text()) == expected
