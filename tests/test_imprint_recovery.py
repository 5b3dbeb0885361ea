"""Imprint recovery through real Opacus DP-SGD steps (make_private, flat clipping, Gaussian noise)."""

import warnings

import pytest
import torch
import torch.nn as nn
from opacus import PrivacyEngine

from opacus_dmaudit.capture import GradientCapture, PerLayerClippingError, chain_pre_step, chain_step_hook
from opacus_dmaudit.imprint import ImprintBlock, ImprintedModel, image_argument
from opacus_dmaudit.recovery import recover_images

warnings.filterwarnings("ignore", category=UserWarning)


def _private_imprinted_model(images, *, sigma, structure="sparse", bins=128, batch=64, gain=1e3, clipping="flat"):
    torch.manual_seed(0)
    block = ImprintBlock(image_shape=(1, 28, 28), bins=bins, structure=structure, gain=gain).calibrate(images)
    head = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 13 * 13, 10))
    model = ImprintedModel(head, block)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    labels = torch.randint(0, 10, (images.shape[0],), generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=batch)
    engine = PrivacyEngine(accountant="rdp")
    extra = {}
    if clipping == "per_layer":
        extra = dict(clipping="per_layer", max_grad_norm=[1.0] * len(list(model.parameters())))
    else:
        extra = dict(max_grad_norm=1.0)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma, poisson_sampling=False, **extra
    )
    return engine, block, model, optimizer, loader


def _steps(model, optimizer, loader, capture, block, *, scale="oracle"):
    results = []
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        # The block is restored after each step so its bins stay calibrated, as the auditor does.
        results.append((x, recover_images(capture.latest, block, scale=scale, originals=x)))
    return results


@pytest.mark.parametrize("structure", ["sparse", "cumulative"])
def test_noise_free_step_returns_batch_images_exactly(fashion_images, structure):
    engine, block, model, optimizer, loader = _private_imprinted_model(fashion_images[:64], sigma=0.0,
                                                                     structure=structure)
    capture = GradientCapture(optimizer, block.imprint)
    (x, recovered), = _steps(model, optimizer, loader, capture, block)
    assert len(recovered) >= 20, "too few singly-occupied bins to test"
    assert (recovered.sample_index >= 0).all()
    error = (recovered.images - x[recovered.sample_index]).abs().max()
    assert float(error) < (1e-5 if structure == "sparse" else 2e-4)  # float32 ratios (and row differences)
    assert int(recovered.bin_counts.sum()) <= 64
    assert len(recovered.collisions) == int((recovered.bin_counts > 1).sum())


@pytest.mark.parametrize("structure", ["sparse", "cumulative"])
def test_images_are_matched_with_the_samples_the_rows_hold_where_rounding_moves_them(fashion_images, structure):
    # Every sample sits on an edge of a bin of its own (1e-9 bin widths below it, then rounded to the float32 edges):
    # which side the float64 measurement and the float32 rows each put it on is rounding's call, so the rows put most
    # samples in another bin than the measurement does, in two (sparse) or in none.
    engine, block, model, optimizer, loader = _private_imprinted_model(fashion_images[:64], sigma=0.0,
                                                                     structure=structure, bins=64)
    x, y = next(iter(loader))
    measured = torch.sort(block.measure(x)).values
    width = float(measured[-1] - measured[0]) / 64
    block.set_edges(torch.cat([measured[:1] - width, measured[1:] - 1e-9 * width, measured[-1:] + width]))
    # The rows a sample's gradient reaches: a non-zero derivative of the block's activation (clamp's at its bounds is
    # zero in torch 2.14, one in 2.6).
    with torch.no_grad():  # the layer's own arithmetic, without Opacus's hooks on it
        rows = nn.functional.linear(x.flatten(1), block.imprint.weight, block.imprint.bias)
    rows.requires_grad_()
    (rows.clamp(0.0, 1.0) if structure == "sparse" else torch.relu(rows)).sum().backward()
    shown = rows.grad != 0
    if structure == "cumulative":  # bin i is row i less row i + 1: a sample shows in the top row it activates
        shown = shown & ~torch.cat([shown[:, 1:], torch.zeros(64, 1, dtype=torch.bool)], dim=1)
    measured_bins = block.assign_bins(x)
    assert int((shown.float().argmax(dim=1) != measured_bins).sum() + (shown.sum(dim=1) != 1).sum()) >= 10, \
        "rounding moved too few samples to test"
    alone = torch.nonzero(shown.sum(dim=0) == 1).flatten()
    expected = set(shown[:, alone].float().argmax(dim=0).tolist())

    capture = GradientCapture(optimizer, block.imprint)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    recovered = recover_images(capture.latest, block, scale="oracle", originals=x)
    returned = recovered.sample_index.tolist()
    assert len(returned) == len(set(returned)), "a sample shown by two rows must be returned once"
    assert set(returned) == expected
    error = (recovered.images - x[recovered.sample_index]).abs().max()
    assert float(error) < (1e-5 if structure == "sparse" else 2e-4)
    assert set(recovered.collisions.tolist()) <= set(torch.nonzero(shown.sum(dim=0) > 1).flatten().tolist())


def test_noise_matches_predicted_std(fashion_images):
    engine, block, model, optimizer, loader = _private_imprinted_model(fashion_images, sigma=0.5)
    snapshot = block.parameter_snapshot()
    capture = GradientCapture(optimizer, block.imprint, on_capture=lambda c: None)
    ratios, count = [], 0
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        recovered = recover_images(capture.latest, block, scale="oracle", originals=x)
        block.restore(snapshot)
        error = recovered.images - x[recovered.sample_index]
        ratios.append(error.flatten(1) / recovered.noise_std[:, None].float())
        count += len(recovered)
    z = torch.cat(ratios)
    assert count >= 80
    assert abs(float(z.std()) - 1.0) < 0.10
    assert abs(float(z.mean())) < 0.05
    # Noise can never beat the floor DP allows: sigma * sqrt(||x||^2 + 1).
    assert float(recovered.noise_std.min()) >= 0.5 * float((x.flatten(1).norm(dim=1).min() ** 2 + 1) ** 0.5) * 0.99


def test_capture_chains_the_accountant_hook(fashion_images):
    engine, block, model, optimizer, loader = _private_imprinted_model(fashion_images[:128], sigma=1.0)
    capture = GradientCapture(optimizer, block.imprint, should_capture=lambda step: step % 2 == 0)
    seen = []
    for x, y in loader:
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        seen.append(capture.latest)
    assert seen[0] is None and seen[1] is not None
    assert len(engine.accountant.history) == 1 and engine.accountant.history[0][2] == 2  # both steps accounted
    assert capture.steps == 2 and capture.latest.step == 2
    previous = capture._handle.previous
    capture.detach()
    assert optimizer.step_hook is previous is not None  # the accountant's hook is back


@pytest.mark.parametrize("slot", ["step_hook", "pre_step"])
def test_chained_links_run_in_their_order_and_come_off_in_any_order(fashion_images, slot):
    engine, block, model, optimizer, loader = _private_imprinted_model(fashion_images[:128], sigma=1.0)
    chain = chain_step_hook if slot == "step_hook" else chain_pre_step
    own = vars(optimizer).get(slot, "none of its own")
    calls = []
    first = chain(optimizer, lambda opt: calls.append("first"))
    second = chain(optimizer, lambda opt: calls.append("second"))

    def step(x, y):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    (x1, y1), (x2, y2) = loader
    step(x1, y1)
    # A step hook's links run after what they chained onto (the accountant first); pre_step links before theirs.
    assert calls == (["first", "second"] if slot == "step_hook" else ["second", "first"])
    del calls[:]
    first.remove()  # someone chained after it: its link stays in place and does nothing
    step(x2, y2)
    assert calls == ["second"]
    assert len(engine.accountant.history) == 1 and engine.accountant.history[0][2] == 2  # Opacus's own work ran
    second.remove()  # the slot gets back what it held before: first's link, a pass-through now
    assert vars(optimizer)[slot] is first.link
    step(x1, y1)
    assert calls == ["second"]
    again = chain(optimizer, lambda opt: calls.append("again"))
    again.remove()
    first.remove()  # removed in the reverse order of chaining, the instance holds what it had of its own again
    assert vars(optimizer).get(slot, "none of its own") is own


def test_a_failing_capture_goes_to_on_error_and_the_step_still_happens(fashion_images):
    engine, block, model, optimizer, loader = _private_imprinted_model(fashion_images[:128], sigma=1.0)
    failures, after = [], []

    def failing(step):
        raise RuntimeError(f"capture broke at step {step}")

    capture = GradientCapture(optimizer, block.imprint, should_capture=failing, after_step=after.append,
                              on_error=lambda: failures.append(step_error()))
    step_error = lambda: str(__import__("sys").exc_info()[1])  # noqa: E731  (on_error runs inside except)
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert failures == ["capture broke at step 1", "capture broke at step 2"] and after == [1, 2]
    assert engine.accountant.history[0][2] == 2 and capture.latest is None  # both steps taken and accounted
    bare = GradientCapture(optimizer, block.imprint, should_capture=failing)
    x, y = next(iter(loader))
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="capture broke"):  # without on_error the exception is the caller's
        optimizer.step()
    bare.detach()
    capture.detach()


def test_attacker_scales_without_clean_sums(fashion_images):
    engine, block, model, optimizer, loader = _private_imprinted_model(fashion_images[:64], sigma=0.0)
    capture = GradientCapture(optimizer, block.imprint, keep_clean=False)
    x, y = next(iter(loader))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    with pytest.raises(ValueError, match="keep_clean"):
        recover_images(capture.latest, block, scale="oracle")
    exact = recover_images(capture.latest, block, scale="noisy-bias", originals=x)
    assert float((exact.images - x[exact.sample_index]).abs().max()) < 1e-5
    estimated = recover_images(capture.latest, block, scale="bin-measurement", originals=x)
    # The bin fixes the brightness only to within its width: close, not exact.
    assert float((estimated.images - x[estimated.sample_index]).abs().mean()) < 0.02
    detected = recover_images(capture.latest, block, scale="noisy-bias")
    assert set(detected.bins.tolist()) >= set(exact.bins.tolist()) and (detected.sample_index == -1).all()


def test_per_layer_clipping_is_refused(fashion_images):
    engine, block, model, optimizer, loader = _private_imprinted_model(fashion_images[:64], sigma=1.0,
                                                                     clipping="per_layer")
    with pytest.raises(PerLayerClippingError, match="flat clipping"):
        GradientCapture(optimizer, block.imprint)


def test_imprint_block_leaves_model_inputs_unchanged(fashion_images):
    block = ImprintBlock(image_shape=(1, 28, 28), bins=16, gain=1e6).calibrate(fashion_images)
    x = fashion_images[:8]
    assert torch.equal(block(x), x)
    assert ((block.assign_bins(fashion_images) >= 0) & (block.assign_bins(fashion_images) < 16)).all()
    counts = torch.bincount(block.assign_bins(fashion_images), minlength=16)
    assert int(counts.min()) >= 256 // 16 - 2  # quantile edges: equal-mass bins
    with pytest.raises(ValueError, match="structure"):
        ImprintBlock(image_shape=(1, 28, 28), structure="dense")


def test_calibrated_edges_lie_between_tied_measurements_where_the_float32_rows_agree_with_them():
    from opacus_dmaudit.data import load_images

    # 8-bit images share brightnesses, and a quantile of tied values is one of them: on such an edge the float32
    # rows, not the measurement, decide an image's bin (with edges at the quantiles: 22 of these 4,000 images).
    images = load_images("fashion-mnist", limit=4000)
    block = ImprintBlock(image_shape=(1, 28, 28), bins=512).calibrate(images)
    measured = block.measure(images)
    assert bool(block.settled(measured).all())
    with torch.no_grad():
        rows = block.imprint(images.flatten(1))
    shown = (rows > 0) & (rows < 1)
    assert bool((shown.sum(dim=1) == 1).all())
    assert torch.equal(shown.float().argmax(dim=1), block.bins_of(measured))
    counts = torch.bincount(block.bins_of(measured), minlength=512)
    assert int(counts.min()) >= 1 and int(counts.max()) <= 4000 // 512 + 6  # still about equal mass


def test_the_image_batch_is_found_among_a_forwards_arguments():
    images, flat = torch.rand(4, 1, 8, 8), torch.rand(4, 64)
    tokens, labels = torch.randint(0, 9, (4, 5)), torch.randint(0, 9, (4,))
    cases = [
        ((images,), {}, 0),
        ((images, images), {}, 0),  # the first positional argument when it is an image batch
        ((tokens, images), {}, 1),
        ((tokens,), {"pixel_values": images}, "pixel_values"),
        ((), {"pixel_values": images, "labels": labels}, "pixel_values"),
        ((), {"input": flat}, "input"),  # the only tensor keyword: the caller names what is wrong with it
        ((flat,), {}, 0),
        ((flat, tokens), {}, 0),
        ((tokens, images, images), {}, 0),  # ambiguous: the first positional tensor, whose shape the caller names
        ((), {"a": images, "b": images}, None),
        ((), {"images": flat, "offset": flat}, None),
        ((3,), {"images": images}, "images"),
        ((3,), {}, None),
    ]
    for args, kwargs, expected in cases:
        assert image_argument(args, kwargs) == expected, (len(args), sorted(kwargs))


def test_set_edges_takes_strictly_increasing_edges_and_sets_the_rows():
    block = ImprintBlock(image_shape=(1, 4, 4), bins=3)
    block.set_edges(torch.tensor([0.0, 1.0, 2.0, 4.0]))
    assert torch.equal(block.assign_bins(torch.full((1, 1, 4, 4), 0.3)), torch.tensor([1]))  # measurement 1.2
    for bad in ([0.0, 1.0, 2.0], [0.0, 2.0, 1.0, 4.0]):
        with pytest.raises(ValueError, match="4 strictly increasing values"):
            block.set_edges(torch.tensor(bad))


# Each case: the switches set one after another in a process of its own (torch keeps them for the process, and
# refuses some reads once its APIs are mixed), each with whether TF32 is on after it.
_TF32_CASES = {
    "set_float32_matmul_precision": [("pass", False), ("torch.set_float32_matmul_precision('high')", True),
                                     ("torch.set_float32_matmul_precision('highest')", False)],
    "legacy allow_tf32": [("torch.backends.cuda.matmul.allow_tf32 = True", True)],
    "generic fp32_precision, then cuBLAS's own": [("torch.backends.fp32_precision = 'tf32'", True),
                                                  ("torch.backends.cuda.matmul.fp32_precision = 'ieee'", False)],
    "legacy, then the new API": [("torch.backends.cuda.matmul.allow_tf32 = True", True),
                                 ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", True)],
}


@pytest.mark.parametrize("case", list(_TF32_CASES))
def test_tf32_is_read_from_whichever_api_set_it_and_noted_for_cuda_rows_only(case):
    import subprocess
    import sys

    steps = _TF32_CASES[case]
    if any("fp32_precision" in step for step, _ in steps) and not hasattr(torch.backends.cuda.matmul,
                                                                         "fp32_precision"):
        pytest.skip("torch.backends.*.fp32_precision needs torch 2.9")
    script = ["import torch", "from opacus_dmaudit.imprint import cuda_matmul_allows_tf32, tf32_rows_note"]
    for step, _ in steps:
        script += [step, "note = tf32_rows_note(torch.device('cuda'))",
                   "print(cuda_matmul_allows_tf32(), note is not None and 'TF32' in note, tf32_rows_note('cpu'))"]
    output = subprocess.run([sys.executable, "-c", "\n".join(script)], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    assert output == [f"{on} {on} None" for _, on in steps]
