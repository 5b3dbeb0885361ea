"""The audit log folder: what the auditor writes is owner-only; what was there before keeps its permissions."""

import json
import math
import os

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from opacus_dmaudit.attack import AuditRecord
from opacus_dmaudit.report import AuditLogWriter, audit_scalars, image_grid, write_json


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


def audit_record(step, **changes):
    fields = dict(step=step, mode="shadow", scale="oracle", batch_size=64, attacked=64, recovered=3, collisions=5,
                  noise_multiplier=1.0, max_grad_norm=1.0, epsilon=float("inf"), delta=1e-5, mu_step=1.0,
                  noise_std_median=0.5, t_start_median=300.0, from_prior=0,
                  noisy={"psnr": 8.0, "ssim": 0.1, "lpips": None}, reconstructed={"psnr": 15.0, "ssim": 0.4},
                  success={"ssim@0.5": 0.25}, seconds=1.0, notes=["a note"], kappa={"ssim@0.5": 0.1},
                  rero_bound={"ssim@0.5": 0.6})
    return AuditRecord(**{**fields, **changes})


def test_an_audit_s_scalars_grid_summary_and_record_land_at_its_step(tmp_path):
    writer = AuditLogWriter(tmp_path / "runs", log_originals=False)
    rows = {"recovered": torch.rand(3, 1, 8, 8), "reconstructed": torch.rand(3, 1, 8, 8)}
    writer.audit(audit_record(5), originals=torch.rand(3, 1, 8, 8), rows=rows)  # log_originals=False: left out
    writer.audit(audit_record(10, recovered=0, noisy={}, reconstructed={}, success={}, rero_bound={}))
    writer.close()
    events = EventAccumulator(str(tmp_path / "runs"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == {tag for tag, value in audit_scalars(audit_record(5)).items()
                                             if value is not None and math.isfinite(value)}
    assert "noisy/lpips" not in events.Tags()["scalars"]  # None: not scored, not logged
    assert "privacy/epsilon" not in events.Tags()["scalars"]  # infinite: no chart can draw it
    assert [e.step for e in events.Scalars("audit/recovered_images")] == [5, 10]
    (image,) = events.Images("audit/noisy_reconstructed")  # the writer's log_originals names the grid
    assert (image.step, image.height, image.width) == (5, *image_grid(list(rows.values())).shape[1:])
    texts = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("audit/summary/text_summary")]
    assert "Grid rows, top to bottom: recovered; reconstructed (3 of the 3 reconstructed, of 64 attacked" in texts[0]
    assert texts[0].endswith("- a note") and "Grid rows" not in texts[1]
    lines = [strict_json(line) for line in (tmp_path / "runs" / "audits.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [5, 10] and lines[0]["epsilon"] is None
    assert lines[0]["rero_bound"] == {"ssim@0.5": pytest.approx(0.6)}
