import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from opacus_dmaudit.data import (
    ImageLoadError,
    adapt_to_prior,
    denormalize,
    load_images,
    read_idx,
    restore_from_prior,
)


def _write_idx(path, array, *, compress):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress):
    array = np.random.default_rng(0).integers(0, 256, size=(5, 7, 6))
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    _write_idx(path, array, compress=compress)
    images = load_images(path)
    assert images.shape == (5, 1, 7, 6)
    assert torch.allclose(images * 255, torch.as_tensor(array[:, None], dtype=torch.float32))


def test_fashion_mnist_is_real_and_in_range(fashion_images):
    assert fashion_images.shape == (256, 1, 28, 28)
    assert 0.0 <= float(fashion_images.min()) and float(fashion_images.max()) <= 1.0
    assert float(fashion_images.std()) > 0.2  # real clothing images, not blanks


def test_numpy_folder_and_dataset_sources(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", rgb)
    np.savez(tmp_path / "b.npz", images=rgb)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, image in enumerate(rgb):
        Image.fromarray(image).save(folder / f"{i}.png")
    expected = torch.as_tensor(rgb).permute(0, 3, 1, 2).float() / 255
    for source in (tmp_path / "a.npy", tmp_path / "b.npz", folder):
        assert torch.allclose(load_images(source), expected)
    dataset = torch.utils.data.TensorDataset(expected, torch.zeros(3))
    assert torch.allclose(load_images(dataset, limit=2), expected[:2])
    # Hugging Face style samples, as the auditor reads them for its calibration.
    samples = [{"pixel_values": image, "labels": 0} for image in expected]
    assert torch.allclose(load_images(ListDataset(samples)), expected)
    with pytest.raises(ImageLoadError, match=r"ListDataset\[0\]: a dict sample needs exactly one C×H×W image tensor, "
                                             r"found 2 among keys 'image', 'mask'"):
        load_images(ListDataset([{"image": image, "mask": image > 0.5} for image in expected]))
    # A grayscale file among colour ones (ImageNet has them) joins as RGB; only a real size difference is refused.
    Image.fromarray(rgb[0, :, :, 0]).save(folder / "3-gray.png")
    mixed = load_images(folder)
    assert mixed.shape == (4, 3, 8, 8) and torch.equal(mixed[3], expected[0, :1].expand(3, -1, -1))
    Image.fromarray(rng.integers(0, 256, size=(9, 8, 3), dtype=np.uint8)).save(folder / "4-taller.png")
    with pytest.raises(ImageLoadError, match=r"differ in size \(8x8, 9x8\); resize them"):
        load_images(folder)


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        load_images(tmp_path / "missing.idx")
    corrupt = tmp_path / "c.idx.gz"
    corrupt.write_bytes(b"not gzip at all")
    with pytest.raises(ImageLoadError, match="cannot read"):
        load_images(corrupt)
    truncated = tmp_path / "t.idx"
    _write_idx(truncated, np.zeros((4, 5, 5)), compress=False)
    truncated.write_bytes(truncated.read_bytes()[:-3])
    with pytest.raises(ImageLoadError, match="truncated"):
        read_idx(truncated)
    np.save(tmp_path / "wrong.npy", np.zeros((2, 5, 5, 5, 5)))
    with pytest.raises(ImageLoadError, match="shaped"):
        load_images(tmp_path / "wrong.npy")
    np.save(tmp_path / "range.npy", np.full((2, 5, 5), -3.0))
    with pytest.raises(ImageLoadError, match="denormalize"):
        load_images(tmp_path / "range.npy")
    with pytest.raises(ImageLoadError, match="positive"):
        load_images(tmp_path / "range.npy", limit=0)


def test_adapt_pad_and_restore_is_exact(fashion_images):
    adapted, adaptation = adapt_to_prior(fashion_images[:4], resolution=32, channels=1)
    assert adapted.shape == (4, 1, 32, 32) and adaptation.spatial == "pad" and adaptation.noise_gain == 1.0
    assert float(adapted[..., :2, :].abs().max()) == 0.0
    assert torch.equal(restore_from_prior(adapted, adaptation), fashion_images[:4])


def test_adapt_resize_and_channels_measure_noise_gain(fashion_images):
    adapted, adaptation = adapt_to_prior(fashion_images[:4], resolution=64, channels=3, spatial="resize")
    assert adapted.shape == (4, 3, 64, 64) and adaptation.channel == "gray->rgb"
    back = restore_from_prior(adapted, adaptation)
    assert back.shape == (4, 1, 28, 28)
    assert float((back - fashion_images[:4]).abs().mean()) < 0.05
    rgb = fashion_images[:2].expand(-1, 3, -1, -1)
    _, to_gray = adapt_to_prior(rgb, resolution=28, channels=1)
    # Luma of three independent noise channels: sqrt(.299^2 + .587^2 + .114^2) = 0.668.
    assert to_gray.channel == "rgb->gray" and abs(to_gray.noise_gain - 0.668) < 0.02


def test_adaptations_that_lose_information_say_so(fashion_images):
    gray = fashion_images[:4]
    colour = torch.cat([gray, gray.flip(-1), gray.flip(-2)], dim=1)  # three different channels
    large = torch.nn.functional.interpolate(gray, size=64, mode="bilinear")
    for images, resolution, channels, lost in ((gray, 32, 1, None), (gray, 28, 3, None), (colour, 28, 3, None),
                                               (colour, 28, 1, "colour"),
                                               (large, 32, 1, "resized from 64x64 to the prior's 32x32 and back"),
                                               (gray, 64, 3, "resized from 28x28 to the prior's 64x64 and back")):
        adapted, adaptation = adapt_to_prior(images, resolution=resolution, channels=channels)
        round_trip = float((restore_from_prior(adapted, adaptation) - images).abs().max())
        note = adaptation.loss_note()
        if lost is None:  # nothing lost: the round trip gives the images back
            assert note is None and round_trip < 1e-5, (adaptation, note)
        else:  # the note names what the round trip cannot give back
            assert lost in note and "train-prior" in note and round_trip > 0.1, (adaptation, round_trip)


def test_denormalize_inverts_normalisation():
    x = torch.rand(2, 3, 4, 4)
    mean, std = [0.4914, 0.4822, 0.4465], [0.247, 0.243, 0.261]
    normalised = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(denormalize(normalised, mean=mean, std=std), x, atol=1e-6)
    with pytest.raises(ValueError, match="positive"):
        denormalize(x, mean=0.0, std=0.0)


def _write_cifar(root, *, hundred=False, per_file=3):
    """torchvision's CIFAR folder, written in CIFAR's own format (pickled dicts of uint8 rows, 3×32×32 row-major).
    CIFAR cannot ship in the tests, so torchvision's md5 check is bypassed (the caller's monkeypatch); the rest of
    the reading is torchvision's own. Returns {split: the images as N×3×32×32 uint8}."""
    import pickle

    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    files = {"train": ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)],
             "test": ["test"] if hundred else ["test_batch"]}
    rng = np.random.default_rng(0)
    expected = {}
    for split, names in files.items():
        parts = []
        for name in names:
            data = rng.integers(0, 256, size=(per_file, 3 * 32 * 32), dtype=np.uint8)
            labels = {"fine_labels": [0] * per_file} if hundred else {"labels": [0] * per_file}
            (folder / name).write_bytes(pickle.dumps({"data": data, **labels}, protocol=2))
            parts.append(data.reshape(-1, 3, 32, 32))
        expected[split] = np.concatenate(parts)
    meta = {"fine_label_names": ["a"]} if hundred else {"label_names": ["a"]}
    (folder / ("meta" if hundred else "batches.meta")).write_bytes(pickle.dumps(meta, protocol=2))
    return folder, expected


@pytest.fixture()
def cifar_md5_bypassed(monkeypatch):
    import os

    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


@pytest.mark.parametrize("hundred", [False, True])
def test_torchvision_cifar_folders_load_through_torchvision(tmp_path, cifar_md5_bypassed, hundred):
    folder, expected = _write_cifar(tmp_path, hundred=hundred)
    test = load_images(folder, allow_pickle=True)
    assert test.shape == (3, 3, 32, 32) and test.dtype == torch.float32
    assert torch.equal(test, torch.from_numpy(expected["test"]).float() / 255)  # channels and pixel order kept
    train = load_images(f"{folder}:train", allow_pickle=True, limit=7)
    assert torch.equal(train, torch.from_numpy(expected["train"][:7]).float() / 255)
    assert torch.equal(load_images(tmp_path, allow_pickle=True), test)  # the root above the folder, as torchvision


def test_cifar_folders_need_consent_to_their_pickles(tmp_path, cifar_md5_bypassed, monkeypatch):
    import torchvision.datasets.cifar

    folder, _ = _write_cifar(tmp_path)
    with pytest.raises(ImageLoadError, match=r"Python pickles.*--allow-pickle"):
        load_images(folder)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: False)  # as corrupt
    with pytest.raises(ImageLoadError, match="torchvision could not read CIFAR10 .*download=True"):
        load_images(folder, allow_pickle=True)


def test_a_split_suffix_on_a_source_without_splits_is_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 8, 8), dtype=np.uint8))
    with pytest.raises(ImageLoadError, match="has no splits"):
        load_images(f"{tmp_path / 'x.npy'}:train")
