"""The CLI end to end, in a subprocess as a user runs it."""

import json
import subprocess
import sys

import pytest

FASHION_TEST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "opacus_dmaudit", *args], capture_output=True, text=True,
                          cwd=cwd, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)


def test_reconstruct_end_to_end(tmp_path, tiny_prior_dir):
    out = run_cli("reconstruct", "--prior", tiny_prior_dir, "--images", FASHION_TEST, "--noise-std", "0.1", "0.5",
                  "--sampler", "ddim", "--steps", "3", "--limit", "6", "--json", str(tmp_path / "r.json"),
                  "--grid", str(tmp_path / "g.png"))
    assert out.returncode == 0, out.stderr
    assert "recon PSNR" in out.stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["n_images"] == 6 and result["sampler"] == "ddim" and result["steps"] == 3
    assert [level["noise_std"] for level in result["levels"]] == [0.1, 0.5]
    level = result["levels"][0]
    assert set(level) >= {"noise_std", "t_start", "noisy", "reconstructed", "seconds"}
    assert set(level["noisy"]) == {"mse", "psnr", "ssim", "lpips"} and level["t_start"] == 57
    assert (tmp_path / "g.png").stat().st_mode & 0o077 == 0  # training images: owner-only
    assert result["adaptation_loss"] is None and "note:" not in out.stdout  # 28x28 padded to 32x32: nothing lost
    again = run_cli("reconstruct", "--prior", tiny_prior_dir, "--images", FASHION_TEST, "--noise-std", "0.1",
                    "--limit", "2", "--steps", "1", "--json", str(tmp_path / "r.json"))
    assert again.returncode == 2 and "--overwrite" in again.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--images", "/no/such/file.gz"], "not found"),
        (["--noise-std", "-0.5"], "finite number >= 0"),
        (["--prior", "/tmp"], "not a DDPM pipeline folder"),
        (["--prior", "google/ddpm-cifar10-32"], "HF_HUB_OFFLINE"),
        (["--images", "CORRUPT"], "cannot read"),
        (["--images", "WRONGSHAPE"], "shaped"),
        (["--images", "CIFAR"], "reading a pickle can run code: pass allow_pickle=True to load_images (CLI: "
                                "--allow-pickle)"),
    ],
)
def test_bad_inputs_give_one_line_errors(tmp_path, tiny_prior_dir, args, message):
    (tmp_path / "bad.idx.gz").write_bytes(b"garbage")
    import numpy as np

    np.save(tmp_path / "wrong.npy", np.zeros((2, 2, 2, 2, 2)))
    (tmp_path / "cifar-10-batches-py").mkdir()
    base = {"--prior": tiny_prior_dir, "--images": FASHION_TEST, "--noise-std": "0.1"}
    given = dict(zip(args[::2], args[1::2]))
    given = {k: {"CORRUPT": str(tmp_path / "bad.idx.gz"), "WRONGSHAPE": str(tmp_path / "wrong.npy"),
                 "CIFAR": str(tmp_path / "cifar-10-batches-py")}.get(v, v) for k, v in given.items()}
    base.update(given)
    argv = ["reconstruct", "--limit", "2", "--steps", "1"] + [x for kv in base.items() for x in kv]
    out = run_cli(*argv)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len([line for line in out.stderr.splitlines() if "error" in line]) == 1


def test_train_prior_cli(tmp_path):
    out = run_cli("train-prior", "--images", "fashion-mnist:train", "--limit", "64", "--out", str(tmp_path / "p"),
                  "--model-size", "tiny", "--epochs", "1", "--batch-size", "32", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "p" / "unet" / "config.json").is_file()
    assert "trained a 32x32, 1-channel prior: 2 steps" in out.stdout  # Fashion-MNIST's 28x28 gray, padded


def test_reconstruct_with_estimated_noise(tmp_path, tiny_prior_dir):
    out = run_cli("reconstruct", "--prior", tiny_prior_dir, "--images", FASHION_TEST, "--noise-std", "0.3",
                  "--limit", "8", "--steps", "2", "--estimate-noise", "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr
    level = json.loads((tmp_path / "r.json").read_text())["levels"][0]
    assert abs(level["estimated_noise_std"] / 0.3 - 1) < 0.15  # the attacker's own estimate, from the images


def test_reconstruct_says_what_a_gray_prior_loses_of_colour_images(tmp_path, tiny_prior_dir):
    import numpy as np

    rng = np.random.default_rng(0)
    np.save(tmp_path / "colour.npy", rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8))
    out = run_cli("reconstruct", "--prior", tiny_prior_dir, "--images", str(tmp_path / "colour.npy"),
                  "--noise-std", "0.1", "--steps", "1", "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr
    assert "note: reconstructions lose colour" in out.stdout
    assert "lose colour" in json.loads((tmp_path / "r.json").read_text())["adaptation_loss"]


def test_every_option_says_what_it_does():
    from opacus_dmaudit.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.choices and isinstance(a.choices, dict)).choices
    silent = [f"{name} {action.option_strings[0]}" for name, command in commands.items()
              for action in command._actions if action.option_strings and not action.help]
    assert not silent


def test_the_scales_the_sweep_offers_are_recoverys():
    from opacus_dmaudit.cli import RECOVERY_SCALES
    from opacus_dmaudit.recovery import SCALES

    assert RECOVERY_SCALES == SCALES
