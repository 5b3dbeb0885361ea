"""DMAuditor on real Opacus training: a tiny CNN, 256 Fashion-MNIST images, 20 DP-SGD steps, an audit every 5."""

import copy
import functools
import inspect
import io
import json
import logging
import math
import os
import random
import subprocess
import sys
import threading
import time
import warnings
import weakref

import numpy
import opacus
import pytest
import torch
import torch.nn as nn
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from opacus_dmaudit.attack import audit_epsilon, pixel_range_note
from opacus_dmaudit.auditor import DMAuditor, _thread_counts_are_per_thread, wait_until_freed
from opacus_dmaudit.batch_copy import _InertForwardHook
from opacus_dmaudit.capture import PerLayerClippingError
from opacus_dmaudit.imprint import ImprintBlock
from opacus_dmaudit.prior import DiffusionPrior
from opacus_dmaudit.reverse_process import FastPathConfig, cuda_graphs_leave_default_generator_alone
from opacus_dmaudit.run_summary import run_summary_markdown, summarize_run

warnings.filterwarnings("ignore", category=UserWarning)


def tiny_cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 13 * 13, 10))


class RandomFlips(torch.utils.data.Dataset):
    """Images flipped at random, drawing from torch's, Python's and NumPy's global generators as augmentations do."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        if random.random() < 0.5:
            image = image.flip(-2)
        if numpy.random.rand() < 0.5:
            image = image.flip(-1)
        return image, self.labels[index]


def train(images, *, auditor_kwargs=None, sigma=0.5, steps=20, batch=64, poisson=False, physical=None,
          clipping="flat", seed=0, on_auditor=None, accountant="rdp", augment=False, after_step=None):
    """A plain Opacus training loop; returns the engine, the auditor (or None) and the trained weights.
    ``after_step(n)`` runs after the n-th step that was not skipped."""
    torch.manual_seed(seed)
    random.seed(seed)
    numpy.random.seed(seed)
    labels = torch.randint(0, 10, (images.shape[0],))
    model = tiny_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dataset = (RandomFlips if augment else torch.utils.data.TensorDataset)(images, labels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch)
    engine = PrivacyEngine(accountant=accountant)
    auditor = DMAuditor(engine, **auditor_kwargs) if auditor_kwargs is not None else None
    if on_auditor is not None:
        on_auditor(auditor)
    max_grad_norm = 1.0 if clipping == "flat" else [1.0] * 4
    try:
        model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                       noise_multiplier=sigma, max_grad_norm=max_grad_norm,
                                                       poisson_sampling=poisson, clipping=clipping)
    except Exception:
        if auditor is not None:
            auditor.close()
        raise
    done = 0
    while done < steps:
        batches = loader
        manager = None
        if physical:
            manager = BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical, optimizer=optimizer)
            batches = manager.__enter__()
        for x, y in batches:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            if not optimizer._is_last_step_skipped:
                done += 1
                if after_step is not None:
                    after_step(done)
            if done >= steps:
                break
        if manager is not None:
            manager.__exit__(None, None, None)
    if auditor is not None:
        auditor.close()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return engine, auditor, weights


def train_epoch(model, optimizer, loader, *, criterion=nn.functional.cross_entropy) -> None:
    """One pass over ``loader``: a DP-SGD step per batch."""
    for x, y in loader:
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()


def private_run(images, *, batch, sigma, auditor_kwargs, model=None, samples=None):
    """A tiny CNN (or ``model``) made private with an auditor attached (none for ``auditor_kwargs=None``), for tests
    that write their own loop: model, optimizer, loader (no Poisson sampling) and auditor. ``samples(image, label)``
    makes each dataset sample."""
    torch.manual_seed(0)
    model = model if model is not None else tiny_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    labels = torch.randint(0, 10, (len(images),))
    dataset = (torch.utils.data.TensorDataset(images, labels) if samples is None
               else [samples(image, label) for image, label in zip(images, labels)])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch)
    engine = PrivacyEngine(accountant="rdp")
    auditor = DMAuditor(engine, **auditor_kwargs) if auditor_kwargs is not None else None
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                   noise_multiplier=sigma, max_grad_norm=1.0, poisson_sampling=False)
    return model, optimizer, loader, auditor


def first_jobs_taken(auditor) -> threading.Event:
    """An event the audit worker sets once it has taken its first jobs off the queue, which then share a pass.

    A test that needs its first audit alone in a pass waits for it before the next audit is queued: the worker thread
    runs at niceness 10, and on a loaded machine it once woke only after the next audit was queued, and the two shared
    the pass."""
    taken = threading.Event()
    audit = auditor._audit

    def audit_after_signalling(jobs):
        taken.set()
        audit(jobs)

    auditor._audit = audit_after_signalling
    return taken


per_thread_counts = pytest.mark.skipif(not _thread_counts_are_per_thread(),
                                       reason="a per-thread intra-op thread count is OpenMP's")


def first_audit_taken_while_training(*, step: int = 5, auditors: list | None = None) -> dict:
    """``train`` keywords that hold training after ``step`` until the worker has taken the first audit off the queue,
    so that its pass starts while training runs, whenever a loaded machine wakes the worker. The auditor made is
    appended to ``auditors``."""
    taken, auditors = [], auditors if auditors is not None else []

    def made(auditor):
        auditors.append(auditor)
        taken.append(first_jobs_taken(auditor))

    return dict(on_auditor=made, after_step=lambda done: done == step and taken[0].wait(60))


def audit_kwargs(tmp_path, prior, **extra):
    return {**dict(prior=prior, log_dir=tmp_path / "audit", every=5, steps=3, queue_size=10), **extra}


@pytest.mark.parametrize("mode", ["shadow", "inline"])
def test_event_files_hold_grids_scalars_and_the_accountants_epsilon(tmp_path, fashion_images, tiny_prior_dir, mode):
    engine, auditor, _ = train(fashion_images, auditor_kwargs=audit_kwargs(tmp_path, tiny_prior_dir, mode=mode))
    assert [r.step for r in auditor.records] == [5, 10, 15, 20] and auditor.errors == 0 and auditor.dropped == 0
    events = EventAccumulator(str(tmp_path / "audit"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Images("audit/original_noisy_reconstructed")] == [5, 10, 15, 20]
    summaries = events.Tensors("audit/summary/text_summary")
    assert [e.step for e in summaries] == [5, 10, 15, 20]
    text = summaries[-1].tensor_proto.string_val[0].decode()
    assert text.startswith(f"`{auditor.records[-1].summary()}`")
    assert "Grid rows, top to bottom: the training images; recovered from the noised DP-SGD gradient" in text
    scalars = set(events.Tags()["scalars"])
    for tag in ("noisy/psnr", "noisy/ssim", "noisy/mse", "reconstructed/psnr", "reconstructed/ssim",
                "reconstructed/mse", "success_rate/ssim@0.5", "audit/noise_std_median", "audit/t_start_median",
                "privacy/epsilon", "privacy/mu_step"):
        assert tag in scalars, tag
    epsilon = events.Scalars("privacy/epsilon")
    assert epsilon[-1].step == 20
    assert epsilon[-1].value == pytest.approx(engine.get_epsilon(1e-5), rel=1e-6)
    assert auditor.records[-1].epsilon == engine.get_epsilon(1e-5)
    lines = (tmp_path / "audit" / "audits.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [5, 10, 15, 20]
    assert auditor.records[0].recovered > 10 and auditor.records[0].mu_step == pytest.approx(2.0)
    # Audit logs hold training images: owner-only folder and files.
    assert (tmp_path / "audit").stat().st_mode & 0o077 == 0
    assert all(p.stat().st_mode & 0o077 == 0 for p in (tmp_path / "audit").rglob("*"))


def test_close_logs_the_audits_pooled_and_makes_them_the_runs_hparams(tmp_path, fashion_images, tiny_prior_dir):
    # At sigma = 0.02 even the tiny random prior's reconstructions succeed at rates that differ between audits, so
    # a pooled figure cannot pass for the last audit's.
    _, auditor, _ = train(fashion_images, sigma=0.02, auditor_kwargs=audit_kwargs(tmp_path, tiny_prior_dir))
    assert [r.step for r in auditor.records] == [5, 10, 15, 20]
    (level,) = auditor.run_summary()
    images = sum(r.recovered for r in auditor.records)
    assert level.audits == 4 and level.recovered == images
    for key in level.success:
        assert level.success[key] == pytest.approx(sum(r.success[key] * r.recovered for r in auditor.records) / images)
    assert level.success["ssim@0.5"] != auditor.records[-1].success["ssim@0.5"]
    events = EventAccumulator(str(tmp_path / "audit"), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    # Live, at each audit: the pooled rate so far and its interval, narrowing as audits add up.
    for tag, figure in (("pooled_success_rate", lambda s: s.success["ssim@0.5"]),
                        ("pooled_success_low", lambda s: s.success_ci["ssim@0.5"]["low"]),
                        ("pooled_success_high", lambda s: s.success_ci["ssim@0.5"]["high"])):
        logged = events.Scalars(f"{tag}/ssim@0.5")
        assert [e.step for e in logged] == [5, 10, 15, 20]
        assert [e.value for e in logged] == pytest.approx(
            [figure(summarize_run(auditor.records[: i + 1])[0]) for i in range(4)], abs=1e-6)
    widths = [high.value - low.value for low, high in zip(events.Scalars("pooled_success_low/ssim@0.5"),
                                                          events.Scalars("pooled_success_high/ssim@0.5"))]
    assert widths[-1] < widths[0]
    from tensorboard.plugins.custom_scalar import layout_pb2

    # TensorBoard's Custom Scalars tab draws the pooled rate inside its interval.
    config = events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    margins = [chart for category in layout_pb2.Layout.FromString(config).category for chart in category.chart
               if chart.HasField("margin")]
    assert {(m.title, m.margin.series[0].value, m.margin.series[0].lower, m.margin.series[0].upper)
            for m in margins} >= {("ssim@0.5", "pooled_success_rate/ssim@0.5", "pooled_success_low/ssim@0.5",
                                   "pooled_success_high/ssim@0.5")}
    run_text = events.Tensors("audit/run_summary/text_summary")
    assert [e.step for e in run_text] == [20]
    assert run_text[0].tensor_proto.string_val[0].decode() == run_summary_markdown([level])
    hparams = EventAccumulator(str(tmp_path / "audit" / "hparams"), size_guidance={"scalars": 0}).Reload()
    for key, rate in level.success.items():
        assert hparams.Scalars(f"hparam/success_{key}")[0].value == pytest.approx(rate)
        assert hparams.Scalars(f"hparam/success_{key}_high")[0].value == pytest.approx(level.success_ci[key]["high"])
    assert hparams.Scalars("hparam/reconstructed_ssim")[0].value == pytest.approx(level.reconstructed["ssim"])


def test_the_best_grid_order_falls_back_through_the_metrics_scored():
    from opacus_dmaudit.report import grid_selection

    ssim = torch.tensor([0.2, float("nan"), 0.9, 0.2, 0.5])
    indices, said = grid_selection({"ssim": ssim, "mse": torch.rand(5)}, count=5, order="best")
    assert indices.tolist() == [2, 4, 0, 3, 1] and said == "highest SSIM first"  # ties stable, unscorable last
    psnr = torch.tensor([10.0, float("inf"), 20.0])
    assert grid_selection({"ssim": None, "psnr": psnr}, count=3, order="best")[0].tolist() == [1, 2, 0]
    indices, said = grid_selection({"mse": torch.tensor([0.3, 0.1, 0.2])}, count=3, order="best")
    assert indices.tolist() == [1, 2, 0] and said == "lowest MSE first"
    assert grid_selection({"lpips": None}, count=3, order="best")[0].tolist() == [0, 1, 2]
    indices, said = grid_selection({"ssim": ssim}, count=5, order="first")
    assert indices.tolist() == [0, 1, 2, 3, 4] and said == "in the order attacked"


@pytest.mark.parametrize("grid_order", ["best", "first"])
def test_the_grid_shows_the_reconstructions_the_attacker_did_best_on(tmp_path, fashion_images, tiny_prior_dir,
                                                                     grid_order):
    import io

    from PIL import Image

    from opacus_dmaudit.metrics import ssim

    # sigma = 0.02: reconstructions of every quality, and more of them than the grid's 8 columns.
    _, auditor, _ = train(fashion_images, sigma=0.02, steps=5, auditor_kwargs=audit_kwargs(
        tmp_path, tiny_prior_dir, max_images=8, kappa_samples=0, grid_order=grid_order))
    (record,) = auditor.records
    assert record.recovered > 8
    events = EventAccumulator(str(tmp_path / "audit"), size_guidance={"images": 0, "tensors": 0}).Reload()
    (grid,) = events.Images("audit/original_noisy_reconstructed")
    pixels = torch.from_numpy(numpy.array(Image.open(io.BytesIO(grid.encoded_image_string)).convert("L")))
    # rows × columns × 28 × 28: tiles every 30 pixels after the grid's 2-pixel padding
    tiles = pixels.float().div(255)[2:, 2:].unfold(0, 28, 30).unfold(1, 28, 30)
    originals, reconstructed = tiles[0].unsqueeze(1), tiles[2].unsqueeze(1)
    shown = ssim(reconstructed, originals)  # of the 8-bit grid: within about 0.01 of the scores
    assert len(shown) == 8
    text = events.Tensors("audit/summary/text_summary")[0].tensor_proto.string_val[0].decode()
    if grid_order == "best":
        assert all(shown[:-1] >= shown[1:] - 0.02), shown
        assert shown[-1] > record.reconstructed["ssim"]  # the 8 best of more than 8 lie above their mean
        assert f"(8 of the {record.recovered} reconstructed, highest SSIM first, of 64 attacked" in text
    else:  # these 8 (seeded) are not in SSIM order: the check above would fail on them
        assert not all(shown[:-1] >= shown[1:] - 0.02), shown
        assert f"(8 of the {record.recovered} reconstructed, in the order attacked, of 64 attacked" in text
    with pytest.raises(ValueError, match="grid_order must be one of 'best', 'first', got 'worst'"):
        DMAuditor(prior=tiny_prior_dir, log_dir=tmp_path / "x", grid_order="worst")


def test_close_warns_when_the_pooled_rate_lies_above_the_rero_bound(tmp_path, tiny_prior_dir, caplog):
    # Records such as a run whose gradients carried less noise than its accountant counted would give: 30 of 32
    # reconstructions within SSIM 0.5 where the bound allows 0.6.
    from test_report import audit_record

    def close_with(records, folder):
        auditor = DMAuditor(None, prior=tiny_prior_dir, log_dir=tmp_path / folder, kappa_samples=0)
        auditor.records.extend(records)
        caplog.clear()
        with caplog.at_level("WARNING", logger="opacus_dmaudit"):
            auditor.close()
        return caplog.text

    above = dict(recovered=16, success={"ssim@0.5": 15 / 16}, rero_bound={"ssim@0.5": 0.6})
    text = close_with([audit_record(10, **above), audit_record(20, **above)], "above")
    assert "at noise multiplier 1 the attack succeeded more often than DP allows" in text
    assert "(ssim@0.5 30 of 32, interval from 0.792; ReRo bound 0.600)" in text and "and the clean scale" in text
    # 3 of 4 twice: the rate is above the bound, its interval (0.35 to 0.97) reaches below it.
    within = dict(recovered=4, success={"ssim@0.5": 3 / 4}, rero_bound={"ssim@0.5": 0.6})
    assert "more often than DP allows" not in close_with([audit_record(10, **within), audit_record(20, **within)],
                                                         "within")
    # close() runs on the training thread: a record the summary cannot pool (more hits than images) is logged, not
    # raised, and the logs are still closed.
    text = close_with([audit_record(10, recovered=4, success={"ssim@0.5": 2.0})], "broken")
    assert "writing the run summary and hparams failed" in text and "hits must lie between 0 and the 4 images" in text
    assert list((tmp_path / "broken").glob("events.out.tfevents.*"))


def test_an_accountant_of_one_s_own_that_takes_arguments_gives_each_audit_its_epsilon(tmp_path, fashion_images,
                                                                                      tiny_prior_dir):
    # Opacus 1.6 takes accountants of one's own (register_accountant). An audit asks the run's accountant's class
    # afresh for its step's epsilon; one that needs arguments could not be made, and every epsilon was unavailable.
    from opacus import accountants
    from opacus.accountants import RDPAccountant

    if not hasattr(accountants, "register_accountant"):
        pytest.skip("accountants of one's own need opacus >= 1.6")

    class OrdersRDP(RDPAccountant):
        def __init__(self, orders):
            super().__init__()
            self.orders = orders

        def get_epsilon(self, delta, alphas=None):
            return super().get_epsilon(delta, alphas=self.orders)

        @classmethod
        def mechanism(cls):
            return "rdp-of-few-orders"

    accountants.register_accountant("rdp-of-few-orders", functools.partial(OrdersRDP, orders=[2, 4, 8, 16, 32]),
                                    force=True)
    engine, auditor, _ = train(fashion_images, steps=10, accountant="rdp-of-few-orders",
                               auditor_kwargs=audit_kwargs(tmp_path, tiny_prior_dir, kappa_samples=0))
    assert [r.step for r in auditor.records] == [5, 10]
    assert not any("epsilon" in note for r in auditor.records for note in r.notes)
    assert auditor.records[-1].epsilon == engine.get_epsilon(1e-5)
    default_orders = RDPAccountant()
    default_orders.history = engine.accountant.history
    assert auditor.records[-1].epsilon != default_orders.get_epsilon(1e-5)  # the run's own orders


def test_each_audit_logs_the_rero_bound_of_its_attacked_step_beside_its_success_rate(tmp_path, fashion_images,
                                                                                     tiny_prior_dir):
    from scipy.stats import norm

    _, auditor, _ = train(fashion_images, steps=10, sigma=0.5,
                          auditor_kwargs=audit_kwargs(tmp_path / "bound", tiny_prior_dir, kappa_samples=4,
                                                      max_reconstructions=4))
    first, second = auditor.records
    assert set(first.rero_bound) == set(first.success) and {"ssim@0.5", "mse@0.01"} <= set(first.rero_bound)
    # kappa: draws from the prior alone, estimated once, never exactly 0; the bound of one Gaussian step at
    # sigma = 0.5 is Phi(Phi^-1(kappa) + 2).
    assert second.kappa == first.kappa and all(0 < k < 1 for k in first.kappa.values())
    for key, kappa in first.kappa.items():
        assert first.rero_bound[key] == pytest.approx(norm.cdf(norm.ppf(kappa) + 2.0), rel=1e-9)
    assert "ReRo bound" in first.summary()
    # At most 4 images scored per audit: each rate comes with its (wide) exact interval, in the record and its line.
    assert set(first.success_ci) == set(first.success)
    for key, rate in first.success.items():
        assert first.success_ci[key]["low"] <= rate <= first.success_ci[key]["high"]
    ci = first.success_ci["ssim@0.5"]
    assert f"SSIM >= 0.5: {first.success['ssim@0.5']:.2f} [{ci['low']:.2f}, {ci['high']:.2f}]" in first.summary()
    events = EventAccumulator(str(tmp_path / "bound" / "audit"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("rero_bound/ssim@0.5")] == pytest.approx(
        [r.rero_bound["ssim@0.5"] for r in auditor.records])
    assert "custom_scalars__config__" in events.Tags()["tensors"]  # success and bound on one chart
    written = json.loads((tmp_path / "bound" / "audit" / "audits.jsonl").read_text().splitlines()[0])
    assert written["kappa"] == first.kappa and written["success_ci"] == first.success_ci
    # The draws are DDIM ones whatever the audits' sampler (DDPM draws would take all 1,000 steps each).
    prior = DiffusionPrior.from_pretrained(tiny_prior_dir)
    draws, sample = [], prior.sample
    prior.sample = lambda count, **kwargs: draws.append((count, kwargs["sampler"])) or sample(count, **kwargs)
    _, auditor, _ = train(fashion_images, steps=5, sigma=0.5, auditor_kwargs=audit_kwargs(
        tmp_path / "ddpm", prior, kappa_samples=4, max_reconstructions=4, sampler="ddpm"))
    assert draws == [(4, "ddim")] and auditor.records[0].rero_bound
    _, auditor, _ = train(fashion_images, steps=5,
                          auditor_kwargs=audit_kwargs(tmp_path / "none", tiny_prior_dir, kappa_samples=0))
    assert auditor.records[0].success and not auditor.records[0].rero_bound and not auditor.records[0].kappa
    with pytest.raises(ValueError, match="kappa_samples must be a whole number >= 0"):
        DMAuditor(prior=tiny_prior_dir, log_dir=tmp_path / "x", kappa_samples=-1)


def test_shadow_mode_leaves_training_bit_identical(tmp_path, fashion_images, tiny_prior_dir):
    # Random augmentations too: the auditor samples the dataset for its bins without moving any global generator.
    _, _, plain = train(fashion_images, augment=True)
    _, auditor, audited = train(fashion_images, augment=True, auditor_kwargs=audit_kwargs(tmp_path, tiny_prior_dir))
    assert len(auditor.records) == 4 and auditor._attack.data_calibration is not None
    assert plain.keys() == audited.keys()
    assert all(torch.equal(plain[k], audited[k]) for k in plain)


def test_shadow_bins_are_calibrated_on_the_training_data_as_inline_ones(tmp_path, fashion_images, tiny_prior_dir):
    # Calibrated on the first audited batch, the shadow bins isolated every image of that batch (0 collisions at the
    # first audit, 9-19 at later ones in the demo): both modes now sample the dataset, so the same batches collide the
    # same way.
    collisions = {}
    for mode in ("shadow", "inline"):
        _, auditor, _ = train(fashion_images, auditor_kwargs=audit_kwargs(tmp_path / mode, tiny_prior_dir, mode=mode))
        collisions[mode] = [r.collisions for r in auditor.records]
    assert len(collisions["shadow"]) == 4 and min(collisions["shadow"]) > 0
    assert collisions["shadow"] == collisions["inline"]
    # An auditor attached by hand samples the data loader it is given.
    model, optimizer, loader, _ = private_run(fashion_images, batch=64, sigma=0.5, auditor_kwargs=None)
    with DMAuditor(**audit_kwargs(tmp_path / "attached", tiny_prior_dir, every=4)) as auditor:
        auditor.attach(model, optimizer, data_loader=loader)
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    assert [r.collisions for r in auditor.records] == collisions["shadow"][3:]  # the same last batch


def test_bins_calibrated_on_other_inputs_than_the_models_are_named(
        tmp_path, fashion_images, tiny_prior_dir, caplog):
    # A transform between the data loader and the model (here a normalisation, then a resize) makes the dataset's
    # samples a wrong calibration: said once, and the first audited batch calibrates the bins as before.
    transforms = {"normalised": lambda x: (x - 0.5) / 0.25,
                  "resized": lambda x: nn.functional.interpolate(x, size=(32, 32), mode="bilinear")}
    for name, transform in transforms.items():
        caplog.clear()
        model, optimizer, loader, auditor = private_run(
            fashion_images[:64], batch=32, sigma=0.0,
            model=nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64, 10)),
            auditor_kwargs=audit_kwargs(tmp_path / name, tiny_prior_dir, every=1))
        with caplog.at_level(logging.WARNING, logger="opacus_dmaudit"), auditor:
            for x, y in loader:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(transform(x)), y).backward()
                optimizer.step()
        assert auditor.errors == 0 and len(auditor.records) == 2 and auditor.records[0].collisions == 0
        assert caplog.text.count("calibrated on the first audited batch instead") == 1
        expected = "outside the bins calibrated" if name == "normalised" else "inputs are 1×32×32, the dataset's"
        assert expected in caplog.text
    # Inline mode's block is in the model from make_private on: a resize cannot be followed (named with the fix),
    # and a normalisation leaves most images outside the bins (each record says so, the log once).
    with pytest.raises(ValueError, match="calibration_images=... shaped as the model's inputs"):
        ImprintBlock(image_shape=(1, 28, 28))(transforms["resized"](fashion_images[:2]))
    caplog.clear()
    model, optimizer, loader, auditor = private_run(
        fashion_images[:64], batch=32, sigma=0.0,
        auditor_kwargs=audit_kwargs(tmp_path / "inline", tiny_prior_dir, every=1, mode="inline"))
    with caplog.at_level(logging.WARNING, logger="opacus_dmaudit"), auditor:
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(transforms["normalised"](x)), y).backward()
            optimizer.step()
    assert auditor.errors == 0 and len(auditor.records) == 2
    assert all("lies outside the imprint's bins" in " ".join(r.notes) for r in auditor.records)
    assert caplog.text.count("lies outside the imprint's bins") == 1


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_inline_mode_without_noise_recovers_exactly_before_the_prior(tmp_path, fashion_images, tiny_prior_dir,
                                                                     accountant):
    _, auditor, _ = train(fashion_images, sigma=0.0, steps=10, accountant=accountant,
                          auditor_kwargs=audit_kwargs(tmp_path, tiny_prior_dir, mode="inline"))
    assert len(auditor.records) == 2
    for record in auditor.records:
        assert record.recovered > 10
        assert record.noisy["mse"] < 1e-10 and record.noise_std_median == 0.0
        # No noise, no privacy, whichever accountant (PRV's own computation overflows there).
        assert record.epsilon == float("inf") and not record.notes
    # On disk the infinite epsilon is null, so a strict JSON reader takes the file; the noise multiplier says why.
    lines = (tmp_path / "audit" / "audits.jsonl").read_text().splitlines()
    written = [json.loads(line, parse_constant=lambda constant: pytest.fail(f"{constant} in audits.jsonl"))
               for line in lines]
    assert [(r["epsilon"], r["noise_multiplier"]) for r in written] == [(None, 0.0), (None, 0.0)]
    # TensorBoard charts only finite figures: an infinite epsilon would stretch its
    # chart's axis without end. The summary text beside the grid keeps epsilon.
    events = EventAccumulator(str(tmp_path / "audit"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    hparams = EventAccumulator(str(tmp_path / "audit" / "hparams"), size_guidance={"scalars": 0}).Reload()
    logged = {tag: [e.value for e in run.Scalars(tag)] for run in (events, hparams) for tag in run.Tags()["scalars"]}
    assert "privacy/noise_multiplier" in logged and "privacy/epsilon" not in logged
    assert "hparam/epsilon" not in logged and "noisy/mse" in logged
    assert all(math.isfinite(value) for values in logged.values() for value in values)
    texts = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("audit/summary/text_summary")]
    assert len(texts) == 2 and all("eps=inf" in text for text in texts)


@pytest.mark.parametrize("precision", ["float64", "bfloat16", "autocast"])
def test_inline_imprint_keeps_its_precision_whatever_the_models(tmp_path, fashion_images, tiny_prior_dir, precision):
    # The imprint rows stay float32 (float64 beside a float64 model) whatever the model's dtype: a float64 or bfloat16
    # model once crashed its first training forward ("mat1 and mat2 must have the same dtype"), and under autocast the
    # rows lost the precision an attacker would keep (at sigma 0: MSE 0.003 to 0.014 and fewer images recovered, not
    # 1e-16). Without noise the image is read back exactly: each row's gradient over its bias gradient does not depend
    # on the precision of what flows back into the row.
    dtype = torch.float32 if precision == "autocast" else getattr(torch, precision)
    images = fashion_images.to(dtype)

    def step(model, optimizer, x, y):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    plain_model, plain_optimizer, plain_loader, _ = private_run(images, batch=64, sigma=0.0,
                                                                model=tiny_cnn().to(dtype), auditor_kwargs=None)
    try:
        step(plain_model, plain_optimizer, *next(iter(plain_loader)))
    except RuntimeError as exc:  # Opacus 1.5.2, the oldest supported, trains neither bfloat16 nor under autocast
        pytest.skip(f"this Opacus cannot train {precision} without the auditor either: {exc}")
    model, optimizer, loader, auditor = private_run(images, batch=64, sigma=0.0, model=tiny_cnn().to(dtype),
                                                    auditor_kwargs=audit_kwargs(tmp_path, tiny_prior_dir,
                                                                                mode="inline", every=2))
    for x, y in loader:
        step(model, optimizer, x, y)
    auditor.close()
    assert len(auditor.records) == 2 and auditor.errors == 0
    assert all(record.recovered > 10 and record.noisy["mse"] < 1e-10 for record in auditor.records)
    assert all(p.dtype == dtype for p in model._module.model.parameters())
    assert auditor.block.imprint.weight.dtype == (torch.float64 if precision == "float64" else torch.float32)


def test_inline_mode_trains_a_model_that_cuts_the_gradient_to_its_input(tmp_path, fashion_images, tiny_prior_dir,
                                                                          caplog):
    # A detach() at the start of forward leaves the imprint rows without per-sample gradients: Opacus used to stop the
    # first step ("Per sample gradient is not initialized"). The rows now get zeros, and those steps are not audited.
    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_cnn()

        def forward(self, x):
            return self.net(x.detach())

    model, optimizer, loader, auditor = private_run(fashion_images, batch=64, sigma=0.5, model=Detached(),
                                                    auditor_kwargs=audit_kwargs(tmp_path, tiny_prior_dir,
                                                                                mode="inline", every=2))
    before = [p.detach().clone() for p in model._module.model.parameters()]
    with caplog.at_level(logging.WARNING, logger="opacus_dmaudit"):
        train_epoch(model, optimizer, loader)
        auditor.close()
    assert auditor._steps == 4 and not auditor.records and auditor.errors == 0
    assert all(not torch.equal(a, b) for a, b in zip(before, model._module.model.parameters()))  # it trained
    assert caplog.text.count("no gradient reached the imprint block") == 1 and "mode='shadow'" in caplog.text
    assert "pre_step" not in vars(optimizer)  # closing gives the optimizer its own method back
    # Training goes on after close(): the frozen rows need no per-sample gradients any more, and do not move.
    rows = [p.detach().clone() for p in auditor.block.parameters()]
    train_epoch(model, optimizer, loader)
    assert all(torch.equal(a, b) for a, b in zip(rows, auditor.block.parameters()))


SCHEDULERS = {
    "OneCycleLR": lambda optimizer: torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=8),
    "LambdaLR": lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.8**step),
    "CyclicLR": lambda optimizer: torch.optim.lr_scheduler.CyclicLR(optimizer, 0.01, 0.1, step_size_up=2),
}


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_inline_mode_keeps_an_lr_scheduler_made_before_make_private(tmp_path, fashion_images, tiny_prior_dir,
                                                                   scheduler):
    # The scheduler holds one entry per parameter group of the optimizer it was made on: the imprint's rows join
    # the first group rather than adding one it has never seen. That group's learning rate, momentum and weight
    # decay move the rows inside each step, and the restore after it puts them back (exact recovery at sigma 0).
    def run(auditor_kwargs):
        torch.manual_seed(0)
        model = tiny_cnn()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        lr_scheduler = SCHEDULERS[scheduler](optimizer)
        engine = PrivacyEngine(accountant="rdp")
        auditor = DMAuditor(engine, **auditor_kwargs) if auditor_kwargs is not None else None
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, noise_multiplier=0.0, max_grad_norm=1.0, poisson_sampling=False,
            data_loader=torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(fashion_images[:128], torch.randint(0, 10, (128,))), batch_size=32))
        rates = []
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            lr_scheduler.step()
            rates.append(optimizer.param_groups[0]["lr"])
        if auditor is not None:
            auditor.close()
        return rates, auditor

    plain, _ = run(None)
    rates, auditor = run(audit_kwargs(tmp_path, tiny_prior_dir, mode="inline", every=2))
    assert rates == plain
    assert auditor.errors == 0 and [r.step for r in auditor.records] == [2, 4]
    assert all(r.recovered > 5 and r.noisy["mse"] < 1e-10 for r in auditor.records)


def test_a_prv_epsilon_that_would_not_fit_in_memory_comes_from_rdp(tmp_path, fashion_images, tiny_prior_dir,
                                                                   prv_grids_built):
    # sigma 0.01 at q = 0.25: Opacus's PRV accountant would build a grid of 4e7 points (some 10 GiB) at each audit,
    # beside the training it must not disturb. The record's epsilon is RDP's instead, and says so.
    from opacus.accountants import RDPAccountant

    engine, auditor, _ = train(fashion_images, sigma=0.01, steps=5, accountant="prv",
                               auditor_kwargs=audit_kwargs(tmp_path, tiny_prior_dir, kappa_samples=0))
    rdp = RDPAccountant()
    rdp.history = list(engine.accountant.history)
    [record] = auditor.records
    assert record.epsilon == rdp.get_epsilon(1e-5)
    assert len(record.notes) == 1 and record.notes[0].startswith(
        "epsilon from the RDP accountant: Opacus's PRV accountant would need a grid of 3.99e+07 points")
    assert not prv_grids_built


@pytest.mark.parametrize("scale", ["oracle", "clip-norm"])
def test_shadow_noise_sits_at_the_dp_floor(tmp_path, fashion_images, tiny_prior_dir, scale):
    # The clip-norm attacker finds that floor too, from the public clipping norm and its bins' typical norms.
    _, auditor, _ = train(fashion_images, sigma=0.5,
                          auditor_kwargs=audit_kwargs(tmp_path, tiny_prior_dir, scale=scale))
    floor = 0.5 * float((fashion_images.flatten(1).norm(dim=1) ** 2 + 1).sqrt().median())
    assert auditor.errors == 0 and auditor.records[-1].scale == scale
    assert auditor.records[-1].noise_std_median == pytest.approx(floor, rel=0.25)


def test_a_batch_larger_than_the_bins_is_attacked_in_as_many_images_as_there_are_bins(tmp_path, fashion_images,
                                                                                      tiny_prior_dir, caplog):
    # 256 images in 32 bins would leave about 0.08 alone (a batch of 512 in the default 64 bins: 0.2); shadow mode
    # attacks the first 32, of which about 37% are alone in their bin.
    with caplog.at_level(logging.WARNING, logger="opacus_dmaudit"):
        _, auditor, _ = train(fashion_images, batch=256, steps=10,
                              auditor_kwargs=audit_kwargs(tmp_path / "shadow", tiny_prior_dir, bins=32))
    records = auditor.records
    assert len(records) == 2 and all(r.batch_size == 256 and r.attacked == 32 for r in records)
    assert all(r.recovered >= 4 and r.recovered + 2 * r.collisions <= 32 for r in records)
    assert "alone in their bin" not in caplog.text
    # Inline mode attacks the real batch in the bins it was given: it says at make_private how few that isolates.
    with caplog.at_level(logging.WARNING, logger="opacus_dmaudit"):
        _, auditor, _ = train(fashion_images, batch=256, steps=5,
                              auditor_kwargs=audit_kwargs(tmp_path / "inline", tiny_prior_dir, bins=32, mode="inline"))
    assert caplog.text.count("about 0.078 images per audited step will be alone in their bin") == 1
    assert "pass bins=256 or more (each bin adds 784 parameters" in caplog.text
    assert auditor.records[0].attacked == 256 and auditor.records[0].recovered <= 2


def test_shadow_mode_copies_only_the_images_it_attacks_once_its_imprint_exists(tmp_path, fashion_images,
                                                                              tiny_prior_dir):
    audited = threading.Event()
    queued = []
    model, optimizer, loader, auditor = private_run(
        fashion_images, batch=128, sigma=0.5,
        auditor_kwargs=audit_kwargs(tmp_path, tiny_prior_dir, bins=32, every=1, on_audit=lambda r: audited.set()))
    put = auditor._queue.put_nowait

    def recording(job):
        queued.append((len(job.batch), job.batch_size))
        put(job)

    auditor._queue.put_nowait = recording
    for _ in range(2):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            assert audited.wait(timeout=120)  # the worker has run this audit, and made its imprint at the first
            audited.clear()
    auditor.close()
    # The first audited batch is copied whole (the shadow imprint may be calibrated on it); then the first 32 images.
    assert queued == [(128, 128)] + [(32, 128)] * 3
    assert [(r.batch_size, r.attacked) for r in auditor.records] == [(128, 32)] * 4 and auditor.errors == 0


def test_empty_poisson_batches_and_batch_memory_manager(tmp_path, fashion_images, tiny_prior_dir):
    _, auditor, _ = train(fashion_images[:64], batch=2, poisson=True, steps=20,
                          auditor_kwargs=audit_kwargs(tmp_path / "p", tiny_prior_dir))
    assert auditor.errors == 0 and len(auditor.records) == 4
    _, auditor, _ = train(fashion_images, batch=64, physical=16, steps=10,
                          auditor_kwargs=audit_kwargs(tmp_path / "b", tiny_prior_dir, mode="inline"))
    assert auditor.errors == 0 and [r.step for r in auditor.records] == [5, 10]
    assert all(r.batch_size == 64 for r in auditor.records)  # the logical batch, from 4 physical ones


def test_inline_refuses_per_layer_clipping(tmp_path, fashion_images, tiny_prior_dir, caplog):
    with pytest.raises(PerLayerClippingError, match="flat clipping"), \
            caplog.at_level(logging.WARNING, logger="opacus_dmaudit"):
        train(fashion_images, clipping="per_layer", auditor_kwargs=audit_kwargs(tmp_path, tiny_prior_dir,
                                                                                  mode="inline"))
    # Closing says why nothing was audited: make_private failed, not an auditor created after it.
    assert "audited nothing: privacy_engine.make_private raised PerLayerClippingError" in caplog.text
    assert "never attached" not in caplog.text


@pytest.mark.parametrize("case", ["ghost_fsdp", "ghost_tp", "GradSampleModule"])
def test_inline_refuses_what_it_cannot_put_its_block_in_front_of_and_leaves_the_optimizer_as_it_was(
        tmp_path, fashion_images, tiny_prior_dir, case):
    # FSDP and tensor parallelism: the block's rows are whole on every rank, which Opacus's clipping would take for
    # shards (FSDP itself needs a process group: tests/test_ddp.py audits it in shadow mode). A model Opacus has
    # wrapped already: its hooks would add the layers' per-sample gradients a second time (the trained weights moved).
    model = tiny_cnn()
    module = opacus.GradSampleModule(model) if case == "GradSampleModule" else model
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(fashion_images[:64], torch.zeros(64).long()),
                                         batch_size=32)
    engine = PrivacyEngine(accountant="rdp")
    auditor = DMAuditor(engine, **audit_kwargs(tmp_path, tiny_prior_dir, mode="inline"))
    options = {} if case == "GradSampleModule" else {"grad_sample_mode": case, "criterion": nn.CrossEntropyLoss()}
    expected = ("needs the plain model.*to_standard_module.*mode='shadow'" if case == "GradSampleModule" else
                "cannot put its imprint block in front of a model sharded.*mode='shadow'")
    with pytest.raises(ValueError, match=expected):
        engine.make_private(module=module, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
                            max_grad_norm=1.0, **options)
    auditor.close()
    assert optimizer.param_groups[0]["params"] == list(model.parameters())


@pytest.mark.parametrize("mode", ["shadow", "inline"])
def test_adaptive_clipping_is_audited_at_the_noise_and_norm_of_each_step(tmp_path, fashion_images, tiny_prior_dir,
                                                                         mode):
    # Adaptive clipping noises the gradients with (sigma^-2 - (2 sigma_u)^-2)^(-1/2), 15% above sigma at
    # sigma = sigma_u = 1, and moves the clipping norm after every step.
    torch.manual_seed(0)
    model = tiny_cnn()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(fashion_images, torch.randint(0, 10, (256,))), batch_size=64)
    engine = PrivacyEngine(accountant="rdp")
    auditor = DMAuditor(engine, **audit_kwargs(tmp_path, tiny_prior_dir, mode=mode, every=2))
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False, clipping="adaptive",
        target_unclipped_quantile=0.5, clipbound_learning_rate=0.5, max_clipbound=10.0, min_clipbound=0.01,
        unclipped_num_std=1.0)
    norms = []
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        norms.append(float(optimizer.max_grad_norm))  # the norm this step clips to
        optimizer.step()
    auditor.close()
    assert auditor.errors == 0 and [r.step for r in auditor.records] == [2, 4]
    released = 1.0 if float(optimizer.noise_multiplier) != 1.0 else (1.0 - 0.25) ** -0.5  # opacus < 1.6 stores it
    assert len(set(norms)) == 4
    last = auditor.records[-1]
    assert last.max_grad_norm == pytest.approx(norms[3])
    captured = (auditor._capture if mode == "inline" else auditor._attack.shadow.capture).latest
    assert captured.coordinate_noise_std == pytest.approx(float(optimizer.noise_multiplier) * released * norms[3])
    # What the step really added: 10,000s of coordinates pin its std to about 1%.
    noise = torch.cat([(captured.weight - captured.clean_weight).flatten(), captured.bias - captured.clean_bias])
    assert float(noise.std()) == pytest.approx(captured.coordinate_noise_std, rel=0.03)
    assert ("adaptive clipping: the gradients carry noise multiplier 1.155" in " ".join(last.notes)) == (released > 1)


def test_audit_errors_never_reach_training(tmp_path, fashion_images, tiny_prior_dir, caplog):
    # Two normalisation stds for one channel: every audit fails inside the worker, training must not notice.
    kwargs = audit_kwargs(tmp_path, tiny_prior_dir, input_mean=0.5, input_std=[0.5, 0.5])
    with caplog.at_level(logging.ERROR, logger="opacus_dmaudit"):
        _, auditor, weights = train(fashion_images, auditor_kwargs=kwargs)
    assert auditor.errors == 4 and not auditor.records and "audit failed" in caplog.text
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_waiting_audits_share_a_pass_of_the_prior_without_changing_results(tmp_path, fashion_images,
                                                                           tiny_prior_dir):
    def hold_first_audit(record):
        # Keep the worker busy until the three later audits are queued: they must then share one pass.
        deadline = time.monotonic() + 120
        while record.step == 5 and auditors[-1]._queue.qsize() < 3 and time.monotonic() < deadline:
            time.sleep(0.01)

    def start(auditor):
        auditors.append(auditor)
        taken.append(first_jobs_taken(auditor))

    def first_audit_alone(step):
        if step == 5:
            assert taken[-1].wait(120), "the audit worker took no job"

    auditors: list[DMAuditor] = []
    taken: list[threading.Event] = []
    records = {}
    for batch_audits in (1, 8):
        kwargs = audit_kwargs(tmp_path / str(batch_audits), tiny_prior_dir, batch_audits=batch_audits,
                              on_audit=hold_first_audit)
        _, auditor, _ = train(fashion_images, auditor_kwargs=kwargs, on_auditor=start, after_step=first_audit_alone)
        assert auditor.errors == 0 and [r.step for r in auditor.records] == [5, 10, 15, 20]
        records[batch_audits] = auditor.records
    assert [r.audits_in_pass for r in records[1]] == [1, 1, 1, 1]
    assert [r.audits_in_pass for r in records[8]] == [1, 3, 3, 3]
    for alone, shared in zip(records[1], records[8]):
        assert shared.recovered == alone.recovered > 0
        for name in ("psnr", "ssim"):
            assert shared.reconstructed[name] == pytest.approx(alone.reconstructed[name], abs=1e-3)
    with pytest.raises(ValueError, match="batch_audits"):
        DMAuditor(prior=tiny_prior_dir, log_dir=tmp_path / "x", batch_audits=0)


def test_records_stay_in_step_order_when_a_shared_pass_finishes_late(tmp_path, fashion_images, tiny_prior_dir):
    # Steps 2 and 3 wait together for the worker; step 3's batch is one image 32 times, which all collide: it
    # recovers nothing, needs no pass of the prior and finishes before step 2's pass. records[-1] (close() logs its
    # figures as the run's hparams) used to be step 2's.
    def hold_first_audit(record):
        deadline = time.monotonic() + 120
        while record.step == 1 and auditor._queue.qsize() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)

    model, optimizer, _, auditor = private_run(
        fashion_images[:64], batch=32, sigma=0.0,
        auditor_kwargs=audit_kwargs(tmp_path, tiny_prior_dir, every=1, on_audit=hold_first_audit, kappa_samples=0))
    taken = first_jobs_taken(auditor)
    labels = torch.zeros(32, dtype=torch.long)
    batches = (fashion_images[:32], fashion_images[32:64], fashion_images[64:65].expand(32, -1, -1, -1))
    train_epoch(model, optimizer, [(batches[0], labels)])
    assert taken.wait(120), "the audit worker took no job"
    train_epoch(model, optimizer, [(x, labels) for x in batches[1:]])
    auditor.close()
    assert [(r.step, r.audits_in_pass, r.recovered > 0) for r in auditor.records[:2]] == [(1, 1, True), (2, 1, True)]
    assert [(r.step, r.recovered, r.collisions) for r in auditor.records[2:]] == [(3, 0, 1)]


def test_an_audit_s_epsilon_caps_the_prv_composition_s_work(monkeypatch):
    # A noise schedule that changes sigma every epoch (Opacus's ExponentialNoise) leaves one mechanism per epoch:
    # one audit's PRV epsilon took 86 to 100 s after 50 such epochs on the 2-core CPU. Above bounds.PRV_AUDIT_MAX_WORK
    # (lowered here, so the test stays short) the audit logs RDP's epsilon and says why.
    from opacus_dmaudit import attack

    monkeypatch.setattr(attack, "PRV_AUDIT_MAX_WORK", 10**6)
    notes: list[str] = []
    epsilon = audit_epsilon([(0.98**i, 256 / 60000, 234) for i in range(10)], accountant=PrivacyEngine().accountant,
                            delta=1e-5, notes=notes)
    assert epsilon > 0 and len(notes) == 1 and "RDP accountant" in notes[0] and "the 10 mechanisms" in notes[0]


def test_a_compiled_prior_never_compiles_in_the_worker(tmp_path, fashion_images, tiny_prior_dir):
    """torch.compile restores the global RNG after tracing, which would rewind the training thread's random numbers
    (DP-SGD noise among them) if it ran on the audit worker during training. Frozen, a prior runs compiled code only
    inside CUDA graphs captured before training, so without them (here, on CPU) the auditor switches compile off
    rather than spend the compile on the training thread for nothing."""
    prior = DiffusionPrior.from_pretrained(tiny_prior_dir, device="cpu", fast_path=FastPathConfig(compile=True))
    with pytest.warns(RuntimeWarning, match="compile switched off.*only inside CUDA graphs"):
        _, auditor, _ = train(fashion_images, steps=10, auditor_kwargs=audit_kwargs(tmp_path, prior, steps=2))
    assert auditor.errors == 0 and len(auditor.records) == 2
    process = prior.reverse_process
    assert auditor.prepare_seconds is None and process.frozen and process.compiled_threads == set()
    assert process.describe() == "fp32 + channels_last" and len(process.fallbacks) == 1
    assert all(any("compile switched off" in note for note in r.notes) for r in auditor.records)
    assert all(r.reconstructed["psnr"] > 0 for r in auditor.records)
    with pytest.raises(ValueError, match="fast_path applies to a prior the auditor loads"):
        DMAuditor(prior=prior, log_dir=tmp_path / "x", fast_path=FastPathConfig.eager())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the worker's CUDA graphs need a CUDA device")
@pytest.mark.parametrize("mode", ["shadow", "inline"])
def test_the_worker_reconstructs_on_cuda_next_to_training_and_leaves_its_generator_alone(tmp_path, fashion_images,
                                                                                       tiny_prior_dir, mode):
    device = torch.device("cuda", torch.cuda.current_device())

    def run(auditor_kwargs):
        """Two epochs of DP-SGD on the GPU; returns the auditor and how far the default CUDA generator moved."""
        torch.manual_seed(0)
        generator = torch.cuda.default_generators[device.index]
        start = generator.get_offset()
        model = tiny_cnn().to(device)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(fashion_images, torch.randint(0, 10, (256,))), batch_size=64)
        engine = PrivacyEngine(accountant="rdp")
        auditor = DMAuditor(engine, **auditor_kwargs) if auditor_kwargs else None
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
            noise_multiplier=0.5, max_grad_norm=1.0, poisson_sampling=False)
        for _ in range(2):
            for x, y in loader:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
                optimizer.step()
        if auditor is not None:
            auditor.close()
        return auditor, generator.get_offset() - start

    auditor, moved = run(audit_kwargs(tmp_path, tiny_prior_dir, mode=mode, every=2, device="cuda"))
    process = auditor.prior.reverse_process
    assert auditor.errors == 0 and len(auditor.records) == 4, auditor.records
    graphs = cuda_graphs_leave_default_generator_alone()  # before torch 2.14 the worker must not run graphs
    assert process.describe() == ("bf16 + cuda_graphs" if graphs else "bf16"), process.fallbacks
    assert len(process.fallbacks) == (0 if graphs else 1) and process.compiled_threads == set()
    # Graphs are captured at creation, on this thread, before training: the worker only replays them.
    assert (auditor.prepare_seconds is not None) == graphs
    assert process.captured_threads == ({threading.get_ident()} if graphs else set())
    assert all(r.reconstructed["psnr"] > r.noisy["psnr"] for r in auditor.records)
    if mode == "shadow":  # inline's imprint rows are the user's model's parameters too: they draw noise of their own
        # Every DP-SGD noise draw moved the default generator exactly as it does without an auditor: none failed,
        # none lost its offset increment to a graph's capture or replay, and the auditor drew nothing from it.
        assert moved == run(None)[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 is a setting of CUDA's float32 matrix products")
def test_inline_audits_on_cuda_note_tf32_while_it_is_on(tmp_path, fashion_images, tiny_prior_dir):
    device = torch.device("cuda", torch.cuda.current_device())

    def notes_of_audits(precision):
        torch.set_float32_matmul_precision(precision)
        try:
            torch.manual_seed(0)
            loader = torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(fashion_images, torch.randint(0, 10, (256,))), batch_size=64)
            engine = PrivacyEngine(accountant="rdp")
            auditor = DMAuditor(engine, **audit_kwargs(tmp_path / precision, tiny_prior_dir, mode="inline", every=2,
                                                       device="cuda"))
            model = tiny_cnn().to(device)
            model, optimizer, loader = engine.make_private(
                module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
                noise_multiplier=0.5, max_grad_norm=1.0, poisson_sampling=False)
            for x, y in loader:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
                optimizer.step()
            auditor.close()
        finally:
            torch.set_float32_matmul_precision("highest")  # torch's default
        assert auditor.errors == 0 and len(auditor.records) == 2, auditor.records
        return [any("TF32" in note for note in record.notes) for record in auditor.records]

    assert notes_of_audits("high") == [True, True]
    assert notes_of_audits("highest") == [False, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the copies under test are queued on a CUDA device")
@pytest.mark.parametrize("mode", ["shadow", "inline"])
def test_cuda_training_never_waits_for_the_audits_copies_and_the_worker_does(tmp_path, fashion_images,
                                                                            tiny_prior_dir, mode):
    # The training thread queues an audited step's copies on the GPU (the images into pinned memory; inline, the
    # captured gradients too) and goes on; the worker waits for them. Here the forward and the backward pass of the
    # second and third steps are queued behind half a second of GPU spin each: the training thread must come back
    # from both while the spin still runs (a blocking copy would have waited for it), and the audits must equal a run
    # without the spin (one that read its images or gradients before the GPU wrote them would recover other images).
    device = torch.device("cuda", torch.cuda.current_device())
    stream = torch.cuda.current_stream(device)
    spin_cycles = 10**9  # about 0.5 s at an H100's or H200's clock

    def run(folder, *, spin):
        torch.manual_seed(0)
        model, optimizer, loader, auditor = private_run(
            fashion_images[:192], batch=64, sigma=0.0, model=tiny_cnn().to(device),
            auditor_kwargs=audit_kwargs(folder, tiny_prior_dir, mode=mode, every=1, device="cuda"))
        # Page-locked blocks for the copies, cached by torch's host allocator beforehand: a new one is the CUDA
        # driver's allocation, which may wait for the device (while the cache grows; not the auditor's own wait).
        blocks = [torch.empty((64, *fashion_images.shape[1:]), pin_memory=True) for _ in range(4)]
        del blocks
        busy = []  # per spun forward and step: whether the GPU was still spinning when it returned
        for index, (x, y) in enumerate(loader):
            x, y = x.to(device), y.to(device)
            spun = spin and index > 0  # the first step allocates (cudaMalloc may synchronise)
            optimizer.zero_grad()
            if spun:
                torch.cuda._sleep(spin_cycles)
            output = model(x)
            if spun:
                busy.append(not stream.query())
                torch.cuda._sleep(spin_cycles)
            nn.functional.cross_entropy(output, y).backward()
            optimizer.step()
            if spun:
                busy.append(not stream.query())
        auditor.close()
        assert auditor.errors == 0 and len(auditor.records) == 3, auditor.records
        assert all(r.recovered > 5 and r.noisy["mse"] < 1e-8 for r in auditor.records), auditor.records
        return [(r.step, r.recovered, r.collisions) for r in auditor.records], busy

    audited, busy = run(tmp_path / "spun", spin=True)
    assert busy == [True] * 4
    assert audited == run(tmp_path / "plain", spin=False)[0]


def test_no_originals_option_and_bad_arguments(tmp_path, fashion_images, tiny_prior_dir):
    _, auditor, _ = train(fashion_images, steps=5,
                          auditor_kwargs=audit_kwargs(tmp_path, tiny_prior_dir, log_originals=False))
    events = EventAccumulator(str(tmp_path / "audit"), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["audit/noisy_reconstructed"]
    with pytest.raises(ValueError, match="mode"):
        DMAuditor(prior=tiny_prior_dir, log_dir=tmp_path / "x", mode="offline")
    with pytest.raises(ValueError, match="every"):
        DMAuditor(prior=tiny_prior_dir, log_dir=tmp_path / "x", every=0)
    # Inline mode calibrates its bins on the loader's dataset: samples it cannot read are named, with the way out.
    dicts = [{"image": image, "mask": image > 0.5, "label": 0} for image in fashion_images[:8]]
    with DMAuditor(prior=tiny_prior_dir, log_dir=tmp_path / "x", mode="inline") as auditor:
        with pytest.raises(ValueError, match="calibration_images=") as error:
            auditor.wrap_model(tiny_cnn(), torch.optim.SGD(tiny_cnn().parameters(), lr=0.1),
                               data_loader=torch.utils.data.DataLoader(dicts))
    assert "exactly one C×H×W image tensor, found 2 among keys 'image', 'mask', 'label'" in str(error.value)


def test_a_pass_of_the_prior_holds_one_audit_padded_to_the_priors_own_buckets(tmp_path, tiny_prior_dir):
    sizes = {}
    for min_bucket, max_reconstructions in ((8, 3), (8, 12), (16, 3), (2, 3), (2, 64)):
        with DMAuditor(prior=tiny_prior_dir, log_dir=tmp_path / f"{min_bucket}-{max_reconstructions}",
                       max_reconstructions=max_reconstructions, fast_path=FastPathConfig(min_bucket=min_bucket)) as a:
            sizes[min_bucket, max_reconstructions] = a.pass_size
    # On CPU a pass holds at most the prior's default batch, 32 images.
    assert sizes == {(8, 3): 8, (8, 12): 16, (16, 3): 16, (2, 3): 4, (2, 64): 32}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a per-thread nice value is Linux's")
def test_the_worker_thread_runs_at_a_lower_priority_and_training_does_not(tmp_path, tiny_prior_dir):
    main = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, main)
    for niceness in (5, 0):
        auditor = DMAuditor(prior=tiny_prior_dir, log_dir=tmp_path / f"n{niceness}", worker_niceness=niceness)
        worker = auditor._worker.native_id
        expected = min(19, before + niceness)
        deadline = time.monotonic() + 10  # the worker lowers its own priority first thing
        while os.getpriority(os.PRIO_PROCESS, worker) != expected and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.getpriority(os.PRIO_PROCESS, worker) == expected
        assert os.getpriority(os.PRIO_PROCESS, main) == before
        auditor.close()
    for bad in (-1, 20):
        with pytest.raises(ValueError, match="worker_niceness must be between 0 and 19"):
            DMAuditor(prior=tiny_prior_dir, log_dir=tmp_path / "x", worker_niceness=bad)


@per_thread_counts
def test_the_worker_thread_sets_its_own_intra_op_threads_and_no_other_threads(tmp_path, fashion_images,
                                                                              tiny_prior_dir):
    before = torch.get_num_threads()
    torch.set_num_threads(4)  # whatever this machine's count: one that the default halves

    def count_in_a_new_thread() -> int:
        counts = []
        thread = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        return counts[0]

    try:
        for worker_threads, expected in ((None, 2), (3, 3)):
            seen = []
            kwargs = audit_kwargs(tmp_path, tiny_prior_dir, log_dir=tmp_path / f"threads-{worker_threads}",
                                  worker_threads=worker_threads, kappa_samples=0,
                                  on_audit=lambda record: seen.append(torch.get_num_threads()))
            _, auditor, _ = train(fashion_images[:128], auditor_kwargs=kwargs, steps=10,
                                  **first_audit_taken_while_training())
            assert len(seen) == 2 and seen[0] == expected, seen
            assert torch.get_num_threads() == 4  # the training thread's own
            # A thread started later takes the process's count (the worker set it for itself alone).
            assert count_in_a_new_thread() == 4
        for bad in (0, -2):
            with pytest.raises(ValueError, match="worker_threads must be a positive whole number or None"):
                DMAuditor(prior=tiny_prior_dir, log_dir=tmp_path / "x", worker_threads=bad)
    finally:
        torch.set_num_threads(before)


@per_thread_counts
def test_the_audits_close_waits_for_run_on_the_threads_training_no_longer_needs(tmp_path, fashion_images,
                                                                                tiny_prior_dir):
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    seen, auditors = [], []

    def hold_until_close(record):
        seen.append(torch.get_num_threads())
        if len(seen) == 1:  # the next audit waits in the queue until close() waits for it
            deadline = time.monotonic() + 60
            while not auditors[0]._draining.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert auditors[0]._draining.is_set()

    try:
        kwargs = audit_kwargs(tmp_path, tiny_prior_dir, kappa_samples=0, batch_audits=1, on_audit=hold_until_close)
        _, auditor, _ = train(fashion_images[:128], auditor_kwargs=kwargs, steps=10,
                              **first_audit_taken_while_training(auditors=auditors))
        assert auditor.errors == 0 and seen == [2, 4]  # half while training ran, all once it ended
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


def test_make_private_with_epsilon_and_attach(tmp_path, fashion_images, tiny_prior_dir):
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(fashion_images, torch.zeros(256, dtype=torch.long)), batch_size=64)
    engine = PrivacyEngine(accountant="rdp")
    auditor = DMAuditor(engine, **audit_kwargs(tmp_path, tiny_prior_dir, every=2))
    model = tiny_cnn()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        target_epsilon=5.0, target_delta=1e-5, epochs=1, max_grad_norm=1.0)
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    auditor.close()
    assert auditor.records and auditor.records[0].noise_multiplier == optimizer.noise_multiplier
    with pytest.raises(RuntimeError, match="already attached"):
        auditor.attach(model, optimizer)


@pytest.mark.parametrize("grad_sample_mode", ["functorch", "ew", "ghost"])
@pytest.mark.parametrize("mode", ["shadow", "inline"])
def test_grad_sample_modes(tmp_path, fashion_images, tiny_prior_dir, grad_sample_mode, mode):
    # Opacus 1.6 takes the loss in make_private (ghost clipping wraps it); 1.5 has no such argument.
    takes_criterion = "criterion" in inspect.signature(PrivacyEngine.make_private).parameters
    if grad_sample_mode == "ghost" and not takes_criterion:
        pytest.skip("ghost clipping through make_private(criterion=...) needs opacus >= 1.6")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(fashion_images[:128], torch.randint(0, 10, (128,))), batch_size=32)
    engine = PrivacyEngine(accountant="rdp")
    auditor = DMAuditor(engine, **audit_kwargs(tmp_path, tiny_prior_dir, mode=mode, every=2))
    criterion = nn.CrossEntropyLoss()
    out = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
                              max_grad_norm=1.0, grad_sample_mode=grad_sample_mode, poisson_sampling=False,
                              **({"criterion": criterion} if takes_criterion else {}))
    model, optimizer, loader = (out[0], out[1], out[3]) if len(out) == 4 else out
    criterion = out[2] if len(out) == 4 else criterion
    train_epoch(model, optimizer, loader, criterion=criterion)
    auditor.close()
    assert auditor.errors == 0 and len(auditor.records) == 2
    assert all(r.recovered > 0 and r.noisy["mse"] < 1e-10 for r in auditor.records)
    # Training goes on after close() in every mode; inline, the frozen rows no longer move.
    rows = [p.detach().clone() for p in auditor.block.parameters()] if mode == "inline" else []
    train_epoch(model, optimizer, loader, criterion=criterion)
    assert all(torch.equal(a, b) for a, b in zip(rows, auditor.block.parameters() if rows else []))


@pytest.mark.parametrize("grad_sample_mode", ["hooks", "ghost"])
@pytest.mark.parametrize("mode", ["shadow", "inline"])
def test_a_model_opacus_hooks_without_wrapping_is_audited_as_a_wrapped_one(tmp_path, fashion_images, tiny_prior_dir,
                                                                          grad_sample_mode, mode):
    # Opacus 1.6's make_private(..., wrap_model=False) hooks the user's own model, which the loop goes on calling, and
    # returns a hooks object, no module: with an auditor, make_private failed on it ("'GradSampleHooks' object has no
    # attribute 'register_forward_pre_hook'"). Between steps, an evaluation loss computed with gradients on.
    if "wrap_model" not in inspect.signature(PrivacyEngine.make_private).parameters:
        pytest.skip("make_private(wrap_model=False) needs opacus >= 1.6")

    def run(folder, *, wrap_model):
        torch.manual_seed(0)
        model = tiny_cnn()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(fashion_images[:128], torch.randint(0, 10, (128,))), batch_size=32)
        engine = PrivacyEngine(accountant="rdp")
        auditor = DMAuditor(engine, **audit_kwargs(folder, tiny_prior_dir, mode=mode, every=2, kappa_samples=0))
        criterion = nn.CrossEntropyLoss()
        out = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
                                  max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=grad_sample_mode,
                                  criterion=criterion, wrap_model=wrap_model)
        private, optimizer, loader = (out[0], out[1], out[-1])
        criterion = out[2] if len(out) == 4 else criterion
        trained = private if wrap_model else model
        for x, y in loader:
            optimizer.zero_grad()
            criterion(trained(x), y).backward()
            optimizer.step()
            trained.eval()
            nn.functional.cross_entropy(trained(x), y)
            trained.train()
        # A snapshot of the model (copy.deepcopy) holds the auditor's hooks as ones that do nothing, not the block.
        copied_hooks = list(copy.deepcopy(model)._forward_pre_hooks.values())
        auditor.close()
        x, y = next(iter(loader))  # training goes on after close()
        optimizer.zero_grad()
        criterion(trained(x), y).backward()
        optimizer.step()
        return auditor, model, copied_hooks

    wrapped, *_ = run(tmp_path / "wrapped", wrap_model=True)
    hooked, model, copied_hooks = run(tmp_path / "hooked", wrap_model=False)
    assert hooked.errors == 0 and len(hooked.records) == 2
    assert all(r.recovered > 0 and r.noisy["mse"] < 1e-10 for r in hooked.records)
    assert [(r.step, r.recovered, r.collisions) for r in hooked.records] == \
        [(r.step, r.recovered, r.collisions) for r in wrapped.records]
    # The model keeps its own keys (inline, the block rides in a forward pre-hook), and trains as the wrapped one did.
    assert set(model.state_dict()) == set(tiny_cnn().state_dict())
    trained_wrapped = (wrapped._model._module.model if mode == "inline" else wrapped._model._module).state_dict()
    assert all(torch.equal(v, trained_wrapped[k]) for k, v in model.state_dict().items())
    assert len(copied_hooks) == 1 + (mode == "inline")
    assert all(isinstance(hook, _InertForwardHook) for hook in copied_hooks)
    assert not model._forward_pre_hooks and not model._forward_hooks  # close() took every hook of the auditor's


def test_normalised_inputs_are_audited_in_pixel_space(tmp_path, fashion_images, tiny_prior_dir):
    mean, std = 0.2860, 0.3530  # Fashion-MNIST's statistics, as a user's transforms.Normalize would use
    normalised = (fashion_images - mean) / std
    _, auditor, _ = train(normalised, sigma=0.0, steps=5, auditor_kwargs=audit_kwargs(
        tmp_path, tiny_prior_dir, mode="inline", input_mean=mean, input_std=std))
    record = auditor.records[0]
    assert record.recovered > 10 and record.noisy["mse"] < 1e-10  # compared with the pixel-space originals


def test_gradient_accumulation_audits_the_whole_logical_batch(tmp_path, fashion_images, tiny_prior_dir):
    model, optimizer, loader, auditor = private_run(
        fashion_images[:128], batch=32, sigma=0.0,
        auditor_kwargs=audit_kwargs(tmp_path, tiny_prior_dir, mode="inline", every=1))
    for i, (x, y) in enumerate(loader):
        nn.functional.cross_entropy(model(x), y).backward()
        if i % 2 == 1:  # two backward passes per optimizer step
            optimizer.step()
            optimizer.zero_grad()
    auditor.close()
    assert [r.batch_size for r in auditor.records] == [64, 64]
    assert all(r.recovered > 10 and r.noisy["mse"] < 1e-10 for r in auditor.records)


@pytest.mark.parametrize("mode", ["shadow", "inline"])
def test_forwards_sharing_one_backward_pass(tmp_path, fashion_images, tiny_prior_dir, mode, caplog):
    # Two augmented views of each batch, one backward pass (augmentation multiplicity): Opacus sums the i-th images'
    # gradients of both forwards into one sample. Both views used to join the audited batch as 64 samples, and as a
    # flip keeps an image's bin, every view collided with its twin: nothing recovered, and nothing said. Shadow mode
    # now attacks the first view (exactly, without noise); inline mode, whose rows hold the mixtures, says why it
    # audits nothing. Gradient accumulation (a backward pass per forward) keeps all its images: see the test above.
    model, optimizer, loader, auditor = private_run(
        fashion_images[:128], batch=32, sigma=0.0,
        auditor_kwargs=audit_kwargs(tmp_path, tiny_prior_dir, mode=mode, every=2, kappa_samples=0))
    with caplog.at_level(logging.WARNING, logger="opacus_dmaudit"):
        train_epoch(model, optimizer, loader)
        for x, y in loader:
            optimizer.zero_grad()
            views = nn.functional.cross_entropy(model(x), y) + nn.functional.cross_entropy(model(x.flip(-1)), y)
            views.backward()
            optimizer.step()
        auditor.close()
    assert auditor.errors == 0
    if mode == "shadow":
        # The first epoch (one forward per step) has no note; the second epoch's audits attack the first views.
        assert [(r.step, r.batch_size, r.attacked) for r in auditor.records] == [(s, 32, 32) for s in (2, 4, 6, 8)]
        assert all(r.recovered > 5 and r.noisy["mse"] < 1e-10 for r in auditor.records)
        shared = ["before the backward pass of an earlier one" in " ".join(r.notes) for r in auditor.records]
        assert shared == [False, False, True, True]
    else:
        assert [r.step for r in auditor.records] == [2, 4]
        assert caplog.text.count("came before the backward pass") == 1 and "mode='shadow'" in caplog.text


@pytest.mark.parametrize("mode", ["shadow", "inline"])
def test_audits_follow_opacus_s_noise_and_clipping_schedulers(tmp_path, fashion_images, tiny_prior_dir, mode):
    # Opacus's schedulers change the optimizer's noise multiplier and clipping norm between epochs: each audit takes
    # the step's own. An isolated image's noise std in pixels is sigma times its gradient's norm over its bias
    # gradient, whatever C clips it to, so it halves with sigma (steps 2 and 6, 6 and 10 see the same batch).
    from opacus.schedulers import ExponentialNoise, StepGradClip

    model, optimizer, loader, auditor = private_run(
        fashion_images[:128], batch=32, sigma=0.5,
        auditor_kwargs=audit_kwargs(tmp_path, tiny_prior_dir, mode=mode, every=2, kappa_samples=0))
    noise, clipping = ExponentialNoise(optimizer, gamma=0.5), StepGradClip(optimizer, step_size=1, gamma=0.5)
    for _ in range(3):
        train_epoch(model, optimizer, loader)
        noise.step()
        clipping.step()
    auditor.close()
    records = auditor.records
    assert [(r.step, r.noise_multiplier, r.max_grad_norm) for r in records] == [
        (2, 0.5, 1.0), (4, 0.5, 1.0), (6, 0.25, 0.5), (8, 0.25, 0.5), (10, 0.125, 0.25), (12, 0.125, 0.25)]
    for earlier, later in ((records[0], records[2]), (records[2], records[4])):
        assert later.noise_std_median == pytest.approx(earlier.noise_std_median / 2, rel=0.02)


def audit_with_other_forwards(tmp_path, fashion_images, tiny_prior_dir, mode, between_steps):
    """Four DP-SGD steps of 32 training images, with ``between_steps(i, model, held_out)`` before each: other forwards,
    on held-out images, that must not join the audited batches (without noise, inline audits recover exactly)."""
    held_out = fashion_images[128:].flip(-1)
    model, optimizer, loader, auditor = private_run(
        fashion_images[:128], batch=32, sigma=0.0,
        auditor_kwargs=audit_kwargs(tmp_path, tiny_prior_dir, mode=mode, every=1))
    for i, (x, y) in enumerate(loader):
        between_steps(i, model, held_out)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    auditor.close()
    assert auditor.errors == 0 and [r.batch_size for r in auditor.records] == [32, 32, 32, 32]
    if mode == "inline":
        assert all(r.recovered > 5 and r.noisy["mse"] < 1e-10 for r in auditor.records)


@pytest.mark.parametrize("mode", ["shadow", "inline"])
def test_evaluation_forwards_between_steps_are_not_audited(tmp_path, fashion_images, tiny_prior_dir, mode):
    # A loop that evaluates on held-out images between steps: those forwards are not part of any DP-SGD step
    # (Opacus records none of them), so they must not join the audited batch.
    def evaluate(i, model, held_out):
        model.eval()
        if i % 2:
            with torch.no_grad():
                model(held_out[:48])
        else:
            model(held_out[:48])  # eval mode with gradients on: Opacus records nothing either
        model.train()
        with torch.no_grad():
            model(held_out[:16])  # training mode without gradients: nothing recorded

    audit_with_other_forwards(tmp_path, fashion_images, tiny_prior_dir, mode, evaluate)


@pytest.mark.parametrize("mode", ["shadow", "inline"])
def test_forwards_with_opacus_hooks_disabled_are_not_audited(tmp_path, fashion_images, tiny_prior_dir, mode):
    # Opacus's way to run a forward that is no part of the step (an adversarial perturbation of the inputs, say):
    # model.disable_hooks(). Opacus records nothing of it, nor may the auditor.
    def perturb(i, model, held_out):
        model.disable_hooks()
        images = held_out[:48].clone().requires_grad_()
        gradient, = torch.autograd.grad(model(images).logsumexp(dim=1).sum(), images)
        model.enable_hooks()
        assert gradient.abs().sum() > 0

    audit_with_other_forwards(tmp_path, fashion_images, tiny_prior_dir, mode, perturb)


@pytest.mark.parametrize("mode", ["shadow", "inline"])
def test_copies_of_the_private_model_work_and_are_not_audited(tmp_path, fashion_images, tiny_prior_dir, mode):
    # Best-model snapshots, weight averaging and torch.save(model) copy the model with its hooks: the copy must be
    # made (the auditor's thread and locks cannot be), and its training forwards are not this run's batches.
    from torch.optim.swa_utils import AveragedModel

    copies = {}

    def copy_and_use(i, model, held_out):
        if i == 1:
            saved = io.BytesIO()
            torch.save(model, saved)
            saved.seek(0)
            copies.update(deepcopy=copy.deepcopy(model), loaded=torch.load(saved, weights_only=False),
                          averaged=AveragedModel(model))
            with torch.no_grad():
                assert all(torch.equal(c(held_out[:8]), model(held_out[:8])) for c in copies.values())
        if copies:
            # A training forward of a copy, on other images. (Opacus's hooks let only this copy run one: the others
            # lose its per-parameter forward counters.)
            copies["loaded"](held_out[:48])

    audit_with_other_forwards(tmp_path, fashion_images, tiny_prior_dir, mode, copy_and_use)


def test_audits_dropped_while_the_auditor_is_busy_are_warned_once_and_summed_up_at_close(
        tmp_path, fashion_images, tiny_prior_dir, caplog):
    slow = lambda record: time.sleep(0.5)  # noqa: E731
    model, optimizer, loader, auditor = private_run(
        fashion_images, batch=8, sigma=1.0,
        auditor_kwargs=audit_kwargs(tmp_path, tiny_prior_dir, every=1, batch_audits=1, queue_size=1, on_audit=slow))
    with caplog.at_level(logging.WARNING, logger="opacus_dmaudit"), auditor:
        for x, y in loader:  # 32 steps, an audit due at each
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    assert auditor.dropped >= 20 and len(auditor.records) + auditor.dropped == 32
    assert caplog.text.count("dropped: the auditor is still busy") == 1 and "pass a larger every" in caplog.text
    assert f"{auditor.dropped} of 32 due audits were dropped while the auditor was busy" in caplog.text


def test_leaving_the_with_block_on_an_exception_drops_queued_audits_instead_of_running_them(
        tmp_path, fashion_images, tiny_prior_dir):
    slow = lambda record: time.sleep(1.0)  # noqa: E731  (an audit that takes a while, as on a CPU)
    model, optimizer, loader, auditor = private_run(
        fashion_images, batch=16, sigma=1.0,
        auditor_kwargs=audit_kwargs(tmp_path, tiny_prior_dir, every=2, batch_audits=1, on_audit=slow))
    with pytest.raises(KeyboardInterrupt):
        with auditor:
            for x, y in loader:  # 16 steps: 8 audits queue up behind the first
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
            raise KeyboardInterrupt
    assert auditor.dropped >= 5 and len(auditor.records) + auditor.dropped == 8 and auditor.errors == 0
    assert auditor._worker is not None and not auditor._worker.is_alive()
    lines = (tmp_path / "audit" / "audits.jsonl").read_text().splitlines()
    assert len(lines) == len(auditor.records)


class PixelValuesModel(nn.Module):
    """A Hugging Face style image classifier: ``model(pixel_values=x, labels=y)``."""

    def __init__(self):
        super().__init__()
        self.model = tiny_cnn()

    def forward(self, pixel_values, labels=None):
        logits = self.model(pixel_values)
        return logits if labels is None else logits + 0 * labels[:, None]


class TokensAndImagesModel(nn.Module):
    """A two-input model whose image batch is its second positional argument: ``model(tokens, images)``."""

    def __init__(self):
        super().__init__()
        self.model = tiny_cnn()

    def forward(self, tokens, images):
        return self.model(images) + 0 * tokens


@pytest.mark.parametrize("mode", ["shadow", "inline"])
@pytest.mark.parametrize("call", ["input", "pixel_values", "second"])
def test_the_batch_is_found_among_the_forwards_arguments(tmp_path, fashion_images, tiny_prior_dir, mode, call):
    # nn.Sequential's forward argument is called `input`: a loop that writes model(input=x) is audited like model(x).
    # Hugging Face models take the labels beside the images, from dict samples: the batch is the only floating-point
    # N×C×H×W keyword, and the dataset's image the only C×H×W tensor of a sample (the bins are calibrated on it).
    # A model of tokens and images takes the images second.
    hugging_face = call == "pixel_values"
    model = {"input": None, "pixel_values": PixelValuesModel(), "second": TokensAndImagesModel()}[call]
    model, optimizer, loader, auditor = private_run(
        fashion_images[:64], batch=32, sigma=0.0, model=model,
        samples=(lambda image, label: {"pixel_values": image, "labels": label}) if hugging_face else None,
        auditor_kwargs=audit_kwargs(tmp_path, tiny_prior_dir, mode=mode, every=1))
    for batch in loader:
        optimizer.zero_grad()
        if hugging_face:
            logits, y = model(**batch), batch["labels"]
        else:
            x, y = batch
            logits = model(input=x) if call == "input" else model(y[:, None], x)
        nn.functional.cross_entropy(logits, y).backward()
        optimizer.step()
    auditor.close()
    assert auditor.errors == 0 and [r.batch_size for r in auditor.records] == [32, 32]
    assert all(r.recovered > 5 and r.noisy["mse"] < 1e-10 for r in auditor.records)


def test_inputs_the_auditor_cannot_read_are_named_once_and_never_stop_training(tmp_path, fashion_images,
                                                                               tiny_prior_dir, caplog):
    flat = fashion_images[:64].flatten(1)
    labels = torch.randint(0, 10, (64,))

    def run(mode, forward):
        engine = PrivacyEngine(accountant="rdp")
        auditor = DMAuditor(engine, **audit_kwargs(tmp_path / mode, tiny_prior_dir, mode=mode, every=1))
        model = nn.Linear(flat.shape[1], 10)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(flat, labels), batch_size=16)
        with auditor:
            model, optimizer, loader = engine.make_private(
                module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
                noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
            for x, y in loader:
                optimizer.zero_grad()
                nn.functional.cross_entropy(forward(model, x), y).backward()
                optimizer.step()
        return auditor

    # Flattened images: the imprint needs N×C×H×W. Shadow mode says so once and trains on; inline mode cannot put
    # its block in front of the model, so make_private refuses with the fix.
    with caplog.at_level(logging.WARNING, logger="opacus_dmaudit"):
        auditor = run("shadow", lambda model, x: model(x))
    assert not auditor.records and auditor.errors == 0
    assert caplog.text.count("N×C×H×W") == 1 and "flatten inside the model" in caplog.text
    with pytest.raises(ValueError, match=r"N×C×H×W .*got shape \(64, 784\).*flatten inside the model"):
        run("inline", lambda model, x: model(x))
    # Integer images (a model that scales them itself): the inline imprint's gradient cannot reach them.
    engine = PrivacyEngine(accountant="rdp")
    model = tiny_cnn()
    as_bytes = (fashion_images[:64] * 255).to(torch.uint8)
    with DMAuditor(engine, **audit_kwargs(tmp_path / "uint8", tiny_prior_dir, mode="inline")), \
            pytest.raises(TypeError, match="needs float model inputs.*torch.uint8.*ToDtype"):
        engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                            data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(as_bytes, labels)),
                            noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(TypeError, match="float inputs"):
        ImprintBlock(image_shape=(1, 28, 28))(as_bytes)
    # A forward whose image batch the auditor cannot tell apart (two tensor keyword arguments): said once, at the
    # first audited step.
    caplog.clear()

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(flat.shape[1], 10)

        def forward(self, images, offset):
            return self.linear(images) + offset

    engine = PrivacyEngine(accountant="rdp")
    auditor = DMAuditor(engine, **audit_kwargs(tmp_path / "two", tiny_prior_dir, every=1))
    model = TwoInputs()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(flat, labels), batch_size=16),
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
    with caplog.at_level(logging.WARNING, logger="opacus_dmaudit"), auditor:
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images=x, offset=torch.zeros(1, 10)), y).backward()
            optimizer.step()
    assert not auditor.records and auditor.errors == 0
    assert caplog.text.count("step 1 was due for an audit") == 1 and "nothing to audit" in caplog.text


def test_images_outside_pixel_space_are_flagged_when_the_normalisation_is_not_undone(tmp_path, fashion_images,
                                                                                       tiny_prior_dir, caplog):
    normalised = (fashion_images - 0.5) / 0.5  # transforms.Normalize((0.5,), (0.5,)), undeclared
    with caplog.at_level(logging.WARNING, logger="opacus_dmaudit"):
        _, auditor, _ = train(normalised, steps=10, auditor_kwargs=audit_kwargs(tmp_path / "a", tiny_prior_dir))
    assert len(auditor.records) == 2
    assert all(any("not in pixel space [0, 1]" in note for note in r.notes) for r in auditor.records)
    assert caplog.text.count("not in pixel space") == 1 and "[-1, 1] (no input_mean/input_std was given)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="opacus_dmaudit"):
        _, auditor, _ = train(normalised, steps=5, auditor_kwargs=audit_kwargs(
            tmp_path / "b", tiny_prior_dir, input_mean=0.5, input_std=0.5))
    assert len(auditor.records) == 1 and not auditor.records[0].notes and "pixel space" not in caplog.text
    note = pixel_range_note(fashion_images * 255, input_mean=0.5, input_std=0.5)  # uint8 inputs scaled in the model
    assert "lie in [0, 255]" in note and "0-255 inputs take input_std=1/255" in note


def test_arguments_that_cannot_work_are_refused_at_creation(tmp_path, fashion_images, tiny_prior_dir):
    for bad, message in ((dict(max_reconstructions=0), "max_reconstructions must be a positive"),
                         (dict(calibration_images=fashion_images.flatten(1)), r"N×C×H×W .*\(256, 784\)"),
                         (dict(calibration_images=fashion_images[:1]), "at least two images"),
                         (dict(calibration_images=fashion_images.numpy()), "must be a tensor"),
                         (dict(mode="inline", scale="clip-norm"), "whole clipping budget.*mode='shadow'")):
        with pytest.raises((ValueError, TypeError), match=message):
            DMAuditor(prior=tiny_prior_dir, log_dir=tmp_path / "x", **bad)
    with pytest.raises(TypeError, match="must be the opacus PrivacyEngine .*got Sequential"):
        DMAuditor(tiny_cnn(), prior=tiny_prior_dir, log_dir=tmp_path / "x")  # the model passed by mistake
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_colour_images_with_a_gray_prior_are_audited_and_the_lost_colour_is_named(tmp_path, fashion_images,
                                                                                   tiny_prior_dir, caplog):
    colour = fashion_images[:64].expand(-1, 3, -1, -1) * torch.tensor([1.0, 0.6, 0.2]).view(1, 3, 1, 1)
    rgb_cnn = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 13 * 13, 10))
    with caplog.at_level(logging.WARNING, logger="opacus_dmaudit"):
        model, optimizer, loader, auditor = private_run(
            colour, batch=32, sigma=0.0, model=rgb_cnn,
            auditor_kwargs=audit_kwargs(tmp_path, tiny_prior_dir, mode="inline", every=1))
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        auditor.close()
    assert auditor.errors == 0 and len(auditor.records) == 2
    assert all(r.recovered > 5 and r.noisy["mse"] < 1e-10 for r in auditor.records)  # colour recovered exactly
    assert all(any("lose colour" in note for note in r.notes) for r in auditor.records)
    assert caplog.text.count("lose colour") == 1
    # Each audit's notes are in TensorBoard beside its grid, not only in audits.jsonl.
    events = EventAccumulator(str(tmp_path / "audit"), size_guidance={"tensors": 0})
    events.Reload()
    texts = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("audit/summary/text_summary")]
    assert len(texts) == 2 and all("\n- reconstructions lose colour" in text for text in texts)


def test_each_run_logs_to_a_new_folder_unless_told_otherwise(tmp_path, tiny_prior_dir, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with DMAuditor(prior=tiny_prior_dir) as auditor:
        pass
    assert auditor.log_dir.resolve().parent == tmp_path.resolve() / "runs" and auditor.log_dir.name.startswith("audit-")
    assert time.strftime("%Y%m%d") in auditor.log_dir.name and auditor.log_dir.stat().st_mode & 0o777 == 0o700
    with caplog.at_level(logging.WARNING, logger="opacus_dmaudit"):
        with DMAuditor(prior=tiny_prior_dir, log_dir=auditor.log_dir):
            pass
    assert "already holds the audit logs of an earlier run" in caplog.text


def test_an_auditor_created_after_make_private_says_it_audited_nothing(tmp_path, fashion_images, tiny_prior_dir,
                                                                      caplog):
    engine = PrivacyEngine(accountant="rdp")
    model = tiny_cnn()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
        data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(fashion_images[:32],
                                                                               torch.zeros(32, dtype=torch.long))))
    late = DMAuditor(engine, **audit_kwargs(tmp_path / "late", tiny_prior_dir, every=1))
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    with caplog.at_level(logging.WARNING, logger="opacus_dmaudit"):
        late.close()
    assert not late.records and "never attached" in caplog.text and "attach(model, optimizer)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="opacus_dmaudit"):
        short = DMAuditor(engine, **audit_kwargs(tmp_path / "short", tiny_prior_dir, every=100)).attach(model,
                                                                                                       optimizer)
        for x, y in loader:  # 32 more steps (batches of one): steps 33 to 64 of the engine's run, and every=100
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        short.close()
    assert "never attached" not in caplog.text and not short.records
    assert ("the run took 32 optimizer step(s) (steps 33 to 64, as the engine's accountant counts them), none of them "
            "a multiple of every=100, so nothing was audited") in caplog.text


def test_a_script_that_never_closes_the_auditor_still_gets_every_queued_audit(tmp_path, tiny_prior_dir):
    # The worker is a daemon thread: without the exit hook the interpreter would kill it with audits still queued.
    script = f"""
import torch, torch.nn as nn
from opacus import PrivacyEngine
from opacus_dmaudit import DMAuditor, load_images
images = load_images("fashion-mnist", limit=128)
engine = PrivacyEngine(accountant="rdp")
auditor = DMAuditor(engine, prior={tiny_prior_dir!r}, log_dir={str(tmp_path / "audit")!r}, every=1, steps=3,
                    queue_size=10, batch_audits=1, on_audit=lambda record: __import__("time").sleep(0.5))
model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
model, optimizer, loader = engine.make_private(
    module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
    data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(128).long()),
                                            batch_size=32), poisson_sampling=False)
for x, y in loader:
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ending without auditor.close()" in done.stderr
    assert len((tmp_path / "audit" / "audits.jsonl").read_text().splitlines()) == 4
    assert (tmp_path / "audit" / "hparams").is_dir()  # close() ran to the end


def test_an_audit_that_fails_on_the_training_thread_never_reaches_the_training_loop(tmp_path, fashion_images,
                                                                                    tiny_prior_dir, caplog):
    # Gradient accumulation over micro-batches of two image sizes (a pooling model takes both): the audited batch
    # cannot be put together, inside the user's optimizer.step(). Training goes on; the failure is counted and logged.
    pooled = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    padded = nn.functional.pad(fashion_images[:32], (2, 2, 2, 2))
    labels = torch.zeros(32, dtype=torch.long)
    model, optimizer, _, auditor = private_run(fashion_images[:64], batch=32, sigma=1.0, model=pooled,
                                               auditor_kwargs=audit_kwargs(tmp_path, tiny_prior_dir, every=1))
    with caplog.at_level(logging.ERROR, logger="opacus_dmaudit"), auditor:
        for _ in range(2):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(fashion_images[:32]), labels).backward()
            nn.functional.cross_entropy(model(padded), labels).backward()
            optimizer.step()
    assert auditor.errors == 2 and not auditor.records and "Sizes of tensors must match" in caplog.text
    # Inline, the imprint block is part of the model and has one weight per pixel: it names the problem itself.
    with pytest.raises(ValueError, match=r"made for inputs N×1×28×28, got \(32, 1, 32, 32\).*mode='shadow'"):
        ImprintBlock(image_shape=(1, 28, 28))(padded)


class NoCopies(torch.Tensor):
    """An input that refuses to be copied off its device (a stand-in for any copy that fails)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to:
            raise RuntimeError("this tensor cannot be copied")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_batch_the_auditor_cannot_copy_never_stops_the_forward(tmp_path, fashion_images, tiny_prior_dir, caplog):
    model, optimizer, loader, auditor = private_run(fashion_images[:64], batch=32, sigma=1.0,
                                                    auditor_kwargs=audit_kwargs(tmp_path, tiny_prior_dir, every=1))
    with caplog.at_level(logging.WARNING, logger="opacus_dmaudit"), auditor:
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x.as_subclass(NoCopies)), y).backward()
            optimizer.step()
    assert auditor._steps == 2 and auditor.errors == 2 and not auditor.records
    assert "this tensor cannot be copied" in caplog.text and "nothing to audit" not in caplog.text


DEFAULT_DTYPE_RUN = """
import json, sys, tempfile, warnings
import torch, torch.nn as nn
torch.set_default_dtype(getattr(torch, sys.argv[2]))
from opacus import PrivacyEngine
from opacus_dmaudit import DMAuditor
from opacus_dmaudit.data import load_images
from opacus_dmaudit.prior import DiffusionPrior
warnings.filterwarnings("ignore")
images = load_images("fashion-mnist", limit=64)
out = {}
for mode in ("shadow", "inline"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).float()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(64, dtype=torch.long)),
                                         batch_size=32)
    engine = PrivacyEngine(accountant="rdp")
    auditor = DMAuditor(engine, prior=sys.argv[1], log_dir=tempfile.mkdtemp() + "/a", every=2, steps=2, mode=mode,
                        kappa_samples=2)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        noise_multiplier=0.5, max_grad_norm=1.0, poisson_sampling=False)
    for _ in range(2):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    auditor.close()
    out[mode] = {"errors": auditor.errors, "records": [[r.recovered, r.noise_std_median, r.reconstructed["psnr"],
                                                        r.reconstructed["ssim"], r.kappa] for r in auditor.records]}
prior = DiffusionPrior.from_pretrained(sys.argv[1], device="cpu")
noisy = images[:4] + 0.2 * torch.randn(images[:4].shape, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float32)
out["ddpm"] = float(prior.reconstruct(noisy, 0.2, sampler="ddpm", seed=0).images.double().sum())
print(json.dumps(out))
"""


def test_a_float64_default_dtype_changes_no_audit(tiny_prior_dir):
    # torch.set_default_dtype is process-wide, and some users set float64: the auditor's own tensors (its shadow
    # imprint, the prior's noise, the reverse process) must not follow it. Each setting in a process of its own.
    if "criterion" not in inspect.signature(PrivacyEngine.make_private).parameters:
        pytest.skip("opacus 1.5 trains no float32 model under a float64 default (its noise is float64), auditor or not")
    runs = {}
    for dtype in ("float32", "float64"):
        result = subprocess.run([sys.executable, "-c", DEFAULT_DTYPE_RUN, tiny_prior_dir, dtype],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[dtype] = json.loads(result.stdout.strip().splitlines()[-1])
    single, double = runs["float32"], runs["float64"]
    assert double["shadow"] == single["shadow"] and single["shadow"]["errors"] == 0
    assert len(single["shadow"]["records"]) == 2 and single["shadow"]["records"][0][4]  # kappa: the bound's baseline
    assert double["ddpm"] == single["ddpm"]
    # Inline audits the user's own steps, which Opacus noises in the default dtype: audited, not bit-identical.
    assert double["inline"]["errors"] == 0 and len(double["inline"]["records"]) == 2
    assert all(record[4] for record in double["inline"]["records"])


def make_private_tiny_cnn(engine, images):
    """A tiny CNN made private by ``engine`` (sigma = 1, C = 1, batches of 32, no Poisson sampling)."""
    model = tiny_cnn()
    return engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=False, data_loader=torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(images, torch.zeros(len(images), dtype=torch.long)), batch_size=32))


def test_an_engine_used_for_a_second_run_takes_the_new_auditor(tmp_path, fashion_images, tiny_prior_dir):
    engine = PrivacyEngine(accountant="rdp")

    def run(auditor):
        train_epoch(*make_private_tiny_cnn(engine, fashion_images[:64]))

    first = DMAuditor(engine, **audit_kwargs(tmp_path / "1", tiny_prior_dir, every=1))
    run(first)
    first.close()
    assert "make_private" not in vars(engine)  # close() gave the engine its own methods back
    second = DMAuditor(engine, **audit_kwargs(tmp_path / "2", tiny_prior_dir, every=1))
    run(second)
    third = DMAuditor(engine, **audit_kwargs(tmp_path / "3", tiny_prior_dir, every=1, mode="inline"))
    run(third)  # the second is still open: the third takes its place on the engine instead of stacking on it
    for auditor in (second, third):
        auditor.close()
    assert [len(a.records) for a in (first, second, third)] == [2, 2, 2] and second.errors == third.errors == 0
    assert {r.mode for r in third.records} == {"inline"}
    assert "make_private" not in vars(engine) and "make_private_with_epsilon" not in vars(engine)


@pytest.mark.parametrize("mode", ["shadow", "inline"])
def test_a_run_resumed_from_a_checkpoint_keeps_its_step_numbers_and_audit_schedule(tmp_path, fashion_images,
                                                                                   tiny_prior_dir, mode):
    checkpoint = tmp_path / "checkpoint.pt"
    opacus_version = tuple(int(part) for part in opacus.__version__.split(".")[:2])

    def run(part):
        torch.manual_seed(part)
        engine = PrivacyEngine(accountant="rdp")
        auditor = DMAuditor(engine, **audit_kwargs(tmp_path / str(part), tiny_prior_dir, mode=mode, every=3))
        model, optimizer, loader = make_private_tiny_cnn(engine, fashion_images[:128])
        if part == 2:
            # Opacus 1.5 leaves torch.load at its default, which from torch 2.6 refuses the checkpoint's accountant
            # state; 1.6 passes weights_only=False itself (and refuses a second one).
            load = {} if opacus_version >= (1, 6) else {"torch_load_kwargs": {"weights_only": False}}
            engine.load_checkpoint(path=checkpoint, module=model, optimizer=optimizer, **load)
        train_epoch(model, optimizer, loader)
        if part == 1:
            engine.save_checkpoint(path=checkpoint, module=model, optimizer=optimizer)
        auditor.close()
        return engine, auditor

    _, first = run(1)
    engine, resumed = run(2)  # steps 5 to 8 of the run: every=3 audits step 6 (as an uninterrupted run would)
    assert [r.step for r in first.records] == [3] and [r.step for r in resumed.records] == [6]
    assert resumed.errors == 0 and resumed.records[0].recovered > 0
    # ε at step 6 of the run: the resumed accountant's 8 steps compose more
    assert first.records[0].epsilon < resumed.records[0].epsilon < engine.get_epsilon(resumed.delta)
    events = EventAccumulator(str(resumed.log_dir)).Reload()
    assert [e.step for e in events.Scalars("privacy/epsilon")] == [6]


def test_an_auditor_replaced_before_make_private_says_so(tmp_path, fashion_images, tiny_prior_dir, caplog):
    # A notebook cell run twice makes two auditors for one run: the earlier one names what happened.
    engine = PrivacyEngine(accountant="rdp")
    with caplog.at_level(logging.WARNING, logger="opacus_dmaudit"):
        earlier = DMAuditor(engine, **audit_kwargs(tmp_path / "1", tiny_prior_dir, every=1))
        assert caplog.text == ""
        later = DMAuditor(engine, **audit_kwargs(tmp_path / "2", tiny_prior_dir, every=1))
        assert caplog.text.count("takes the place, on the same privacy engine, of one created earlier") == 1
        train_epoch(*make_private_tiny_cnn(engine, fashion_images[:32]))
        caplog.clear()
        earlier.close()
        later.close()
    assert "audited nothing: a DMAuditor created after it on the same privacy engine took its place" in caplog.text
    assert "never attached" not in caplog.text and "takes the place" not in caplog.text
    assert len(earlier.records) == 0 and len(later.records) == 1


def test_wait_until_freed_waits_for_another_holder_and_gives_up_at_the_timeout():
    # As a gloo worker holds a finished collective's tensor a moment after this thread let go of it.
    tensor = torch.ones(4)
    ref = weakref.ref(tensor)
    holder = threading.Thread(target=lambda held=tensor: time.sleep(0.05))
    holder.start()
    del tensor
    waited = wait_until_freed([ref], timeout=5.0)
    holder.join()
    assert ref() is None and 0.03 < waited < 4.0
    kept = torch.ones(4)
    assert 0.1 <= wait_until_freed([weakref.ref(kept)], timeout=0.1) < 2.0
    assert wait_until_freed([], timeout=5.0) < 0.1
