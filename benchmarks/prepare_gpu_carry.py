"""Prepare what a GPU turn carries to the device machine, and check it here, before any device time is spent.

The device machine has no network and its image lacks opacus, diffusers and lpips. This script makes anew (what was
in them goes) the two ignored folders that ``benchmarks/gpu_perf.sh`` and ``benchmarks/gpu_turn.sh`` read:

- ``.whl/``: wheels of the versions installed here (so the GPU runs the code the CPU tests passed with), for the
  image's Python (3.12, manylinux x86-64);
- ``.gpu/fashion-mnist/``: the Fashion-MNIST IDX files (Debian's ``dataset-fashion-mnist``);
- with ``--reference-prior PATH``, ``.gpu/reference-prior/``: the shared reference prior, which only ``gpu_turn.sh``
  compares against (the package never reads it).

It then checks every wheel's requirements against the other wheels and the image's packages (read off such a machine
and written down in the device tool's notes, 2026-11), versions included where those are known, and the size of
what travels against the 64 MiB limit. A missing dependency found here costs a second; found on the device, a
machine start and a lease.

    python3 benchmarks/prepare_gpu_carry.py            # then: run(command="bash benchmarks/gpu_perf.sh",
                                                       #           carry=[".whl", ".gpu"], timeout_s=570)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ("opacus", "diffusers", "lpips")
"""What the device image lacks; each is fetched at the version installed here."""

IMAGE_PYTHON = "3.12"
IMAGE_PACKAGES = {
    "filelock": None, "huggingface-hub": "1.33.0", "numpy": "2.5.2", "opt-einsum": None, "pillow": None,
    "regex": None, "requests": None, "safetensors": "0.8.0", "scipy": None, "torch": "2.11.0",
    "torchvision": "0.26.0", "tqdm": None, "zipp": None, "packaging": None, "typing-extensions": None,
    "scikit-image": None, "tensorboard": None, "matplotlib": None,
}
"""The device image's packages this project's wheels need, with the version where one was read off a machine."""

NOT_NEEDED = {"importlib-metadata": "diffusers imports it only on Python < 3.8; 3.12 has importlib.metadata"}
"""Declared requirements that are never imported on the image's Python, and why."""

CARRY_LIMIT_BYTES = 64 * 2**20
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def download_wheels(folder: Path) -> list[Path]:
    """Fetch the :data:`WHEELS` at this machine's versions into ``folder`` (emptied first: one version of each)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    pins = [f"{name}=={version(name)}" for name in WHEELS]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", IMAGE_PYTHON, "--implementation", "cp", *platforms, "-d", str(folder), *pins],
                   check=True)
    return sorted(folder.glob("*.whl"))


def missing_requirements(wheels: list[Path]) -> list[str]:
    """Each requirement of a wheel that neither another wheel nor the image meets, as a line saying why."""
    parsed = {wheel: parse_wheel_filename(wheel.name) for wheel in wheels}
    carried = {name: version for name, version, *_ in parsed.values()}
    # The image's interpreter, over packaging's defaults for this one (Marker.evaluate merges them).
    image = {"python_version": IMAGE_PYTHON, "python_full_version": IMAGE_PYTHON + ".3", "sys_platform": "linux",
             "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
             "platform_python_implementation": "CPython", "os_name": "posix"}
    problems = []
    for wheel, (wheel_name, *_) in parsed.items():
        with zipfile.ZipFile(wheel) as archive:
            metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            lines = archive.read(metadata).decode().splitlines()
        for line in lines:
            if not line.startswith("Requires-Dist:"):
                continue
            requirement = Requirement(line.split(":", 1)[1].strip())
            if requirement.marker is not None and not requirement.marker.evaluate(image):
                continue
            name = canonicalize_name(requirement.name)
            if name in NOT_NEEDED:
                continue
            if name in carried:
                found = carried[name]
            elif name not in IMAGE_PACKAGES:
                problems.append(f"{wheel.name} needs {requirement}, which is neither carried nor on the image: "
                                "add it to WHEELS")
                continue
            elif IMAGE_PACKAGES[name] is None:
                continue  # on the image, version not recorded
            else:
                found = Version(IMAGE_PACKAGES[name])
            if requirement.specifier and found not in requirement.specifier:
                problems.append(f"{wheel.name} needs {requirement}, but {name} {found} is what the device has: "
                                f"pin an older {wheel_name} or carry a matching {name}")
    return problems


def traveling_bytes(extra: list[Path]) -> int:
    """Bytes that travel: the tracked and untracked-not-ignored files of the checkout, plus the carried folders."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.split(b"\0")
    size = sum((ROOT / name.decode()).stat().st_size for name in listed if name and (ROOT / name.decode()).is_file())
    return size + sum(f.stat().st_size for folder in extra for f in folder.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fashion-mnist", type=Path, default=FASHION_MNIST, help="folder of the IDX .gz files")
    parser.add_argument("--reference-prior", type=Path, default=None,
                        help="a DDPMPipeline folder to carry as .gpu/reference-prior/<its name> (gpu_turn.sh only)")
    args = parser.parse_args()

    wheels = download_wheels(ROOT / ".whl")
    print("wheels:", ", ".join(w.name for w in wheels))
    data = ROOT / ".gpu"
    shutil.rmtree(data, ignore_errors=True)
    idx = sorted(args.fashion_mnist.glob("*-ubyte.gz"))
    if len(idx) != 4:
        sys.exit(f"error: {args.fashion_mnist} holds {len(idx)} of Fashion-MNIST's 4 IDX .gz files: install Debian's "
                 f"dataset-fashion-mnist (make install) or pass --fashion-mnist")
    (data / "fashion-mnist").mkdir(parents=True)
    for f in idx:
        shutil.copy2(f, data / "fashion-mnist" / f.name)
    if args.reference_prior is not None:
        shutil.copytree(args.reference_prior, data / "reference-prior" / args.reference_prior.name)

    problems = missing_requirements(wheels)
    size = traveling_bytes([ROOT / ".whl", data])
    print(f"travels: {size / 2**20:.1f} MiB of the {CARRY_LIMIT_BYTES / 2**20:.0f} MiB limit")
    if size > CARRY_LIMIT_BYTES:
        problems.append("what travels is over the device's 64 MiB limit: carry less (the training split, say)")
    for line in problems:
        print("error:", line, file=sys.stderr)
    if problems:
        sys.exit(1)
    print('ready: run(command="bash benchmarks/gpu_perf.sh", carry=[".whl", ".gpu"], timeout_s=570)')


if __name__ == "__main__":
    main()
