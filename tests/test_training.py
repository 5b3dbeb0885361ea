import json
import logging

import pytest
import torch
from diffusers import DDPMPipeline

from opacus_dmaudit.prior import DiffusionPrior
from opacus_dmaudit.training import PriorTrainingConfig, train_prior


def test_train_resume_and_load(tmp_path, fashion_images):
    out = tmp_path / "prior"
    config = PriorTrainingConfig(model_size="tiny", epochs=2, batch_size=64, warmup_steps=2, checkpoint_every=3)
    first = train_prior(fashion_images, out, config=config, device="cpu", progress=False)
    assert first.steps == 8 and (out / "training_checkpoint.pt").is_file()
    with pytest.raises(FileExistsError, match="resume"):
        train_prior(fashion_images, out, config=config, device="cpu", progress=False)
    config.epochs = 3
    resumed = train_prior(fashion_images, out, config=config, device="cpu", progress=False, resume=True)
    assert resumed.steps == 12 and resumed.losses[: len(first.losses)] == first.losses
    assert DiffusionPrior.from_pretrained(out, device="cpu").resolution == 32
    assert DDPMPipeline.from_pretrained(out).unet.config.in_channels == 1
    card = (out / "README.md").read_text()
    assert "12 steps" in card and "CPU" in card and (out / "samples.png").stat().st_size > 0
    assert json.loads((out / "training_config.json").read_text())["model_size"] == "tiny"


def test_the_prior_takes_the_datas_channels_and_size_unless_told(tmp_path, fashion_images):
    colour = torch.nn.functional.interpolate(fashion_images[:16], size=44).expand(-1, 3, -1, -1).contiguous()
    config = PriorTrainingConfig(model_size="tiny", epochs=1, batch_size=16, warmup_steps=1)
    trained = train_prior(colour, tmp_path / "colour", config=config, device="cpu", progress=False)
    unet = DDPMPipeline.from_pretrained(tmp_path / "colour").unet.config
    # Colour kept; 44 rounded up to the tiny UNet's downsampling (2) is 44 itself, so nothing is resized away.
    assert (unet.in_channels, unet.sample_size) == (3, 44) == (trained.config.channels, trained.config.resolution)
    assert config.resolution is None and config.channels is None  # the caller's config is left as it was
    assert PriorTrainingConfig(model_size="base").for_images(torch.zeros(1, 1, 50, 36)).resolution == 56
    assert PriorTrainingConfig().for_images(fashion_images[:1]).resolution == 32  # 28x28: padded, as shipped
    told = PriorTrainingConfig(resolution=16, channels=1).for_images(colour)
    assert (told.resolution, told.channels) == (16, 1)


def test_training_config_is_validated(tmp_path):
    with pytest.raises(ValueError, match="model_size"):
        train_prior(torch.rand(4, 1, 8, 8), tmp_path, config=PriorTrainingConfig(model_size="huge"))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train_prior(torch.rand(4, 1, 8, 8), tmp_path / "x", config=PriorTrainingConfig(model_size="tiny"), resume=True)
    for bad in (dict(ema_decay=1.5), dict(ema_decay=1.0), dict(learning_rate=0.0), dict(warmup_steps=-5),
                dict(checkpoint_every=-1), dict(weight_decay=-0.1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PriorTrainingConfig(**bad).validate()


def test_a_training_run_that_diverges_writes_no_prior(tmp_path, fashion_images):
    # A learning rate far too high: the weights outgrow float16, so the saved prior would sample only NaN.
    config = PriorTrainingConfig(model_size="tiny", epochs=3, batch_size=32, warmup_steps=0, learning_rate=1e9)
    with pytest.raises(ValueError, match=r"training diverged \(.*\), so no prior was written: lower the learning "
                                         r"rate \(now 1e\+09; the default is 0.0002\)"):
        train_prior(fashion_images[:64], tmp_path / "prior", config=config, device="cpu", progress=False)
    assert not list((tmp_path / "prior").iterdir())  # no prior, and no checkpoint of the diverged state
    # A sound run casts to float16 without diffusers' warning about float32-only modules (there are none). Diffusers
    # logs through its own handler and does not propagate, so the test listens on its logger directly.
    heard = []
    listener = logging.Handler(logging.WARNING)
    listener.emit = lambda record: heard.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(listener)
    try:
        train_prior(fashion_images[:32], tmp_path / "sound", device="cpu", progress=False,
                    config=PriorTrainingConfig(model_size="tiny", epochs=1, batch_size=32, warmup_steps=0))
    finally:
        logging.getLogger("diffusers").removeHandler(listener)
    assert not [m for m in heard if "kept in float32" in m] and (tmp_path / "sound" / "model_index.json").is_file()
