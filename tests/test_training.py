import json

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


def test_training_config_is_validated(tmp_path):
    with pytest.raises(ValueError, match="model_size"):
        train_prior(torch.rand(4, 1, 8, 8), tmp_path, config=PriorTrainingConfig(model_size="huge"))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train_prior(torch.rand(4, 1, 8, 8), tmp_path / "x", config=PriorTrainingConfig(model_size="tiny"), resume=True)
