"""The examples as users run them: the main demo (scaled down) and the paper recipe's offline failure."""

import subprocess
import sys
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_demo_runs_and_prints_where_the_logs_are(tmp_path, tiny_prior_dir):
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "audit_fashion_mnist.py"), "--steps", "4", "--every", "2",
         "--sampler-steps", "2", "--prior", tiny_prior_dir, "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 audits (0 dropped, 0 failed)" in out.stdout
    assert "all audits together" in out.stdout and "2 audit(s), steps 2 to 4" in out.stdout
    assert "tensorboard --logdir" in out.stdout and "epsilon =" in out.stdout
    assert (tmp_path / "logs" / "audits.jsonl").is_file()


def test_paper_recipe_fails_fast_and_clearly_offline(tmp_path):
    started = time.perf_counter()
    out = subprocess.run([sys.executable, str(EXAMPLES / "paper_recipe_cifar10.py"), "--data", str(tmp_path)],
                         capture_output=True, text=True, timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 2
    assert "cannot load the prior" in out.stderr and "offline" in out.stderr
    assert "Traceback" not in out.stderr
    assert time.perf_counter() - started < 60
