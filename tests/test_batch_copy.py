"""The audited step's images as the training thread copies them: forward by forward, up to the step that takes them."""

import pytest
import torch
import torch.nn as nn

from opacus_dmaudit.batch_copy import StepBatchCopy


def forward(copies, model, images, *, limit=None):
    """A training forward as the auditor's hooks see it: the copy before, the output watched after."""
    shape = copies.copy_forward((images,), {}, limit=limit)
    output = model(images)
    copies.watch_output(output)
    return output, shape


def test_a_forward_before_the_last_copied_one_s_backward_is_counted_not_copied():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    copies = StepBatchCopy()
    first, second = torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    output, _ = forward(copies, model, first)
    forward(copies, model, second)  # augmented views of one batch: its backward pass is the first's
    output.sum().backward()
    third = torch.rand(2, 1, 4, 4)
    forward(copies, model, third)[0].sum().backward()  # after that pass: a forward of its own
    taken = copies.take()
    assert taken.shared_forwards == 1 and taken.sizes == [3, 2] and not taken.copy_failed
    assert torch.equal(taken.parts[0], first) and torch.equal(taken.parts[1], third)
    assert taken.parts[0].data_ptr() != first.data_ptr()  # a copy: the training loop may overwrite its batch
    assert copies.take().parts == [] and copies.copied == 0  # the next step starts afresh


def test_a_copy_keeps_the_first_images_the_audit_needs_and_the_batch_s_whole_size():
    copies = StepBatchCopy()
    batch = torch.rand(5, 1, 4, 4)
    copies.copy_forward((batch,), {}, limit=2)
    assert copies.copied == 2
    taken = copies.take()
    assert taken.sizes == [5] and torch.equal(taken.parts[0], batch[:2])


def test_an_input_that_is_no_image_batch_is_named_and_not_copied():
    copies = StepBatchCopy()
    assert copies.copy_forward((torch.rand(4, 16),), {}, limit=None) == (4, 16)
    assert copies.copy_forward((), {"labels": [1, 2]}, limit=None) is None  # no tensor at all: nothing to name
    assert copies.take().parts == []


def test_a_failed_copy_marks_the_step_s_batch_as_not_whole_and_passes_on():
    class Unreadable(torch.Tensor):
        def __getitem__(self, index):
            raise RuntimeError("unreadable")

    copies = StepBatchCopy()
    with pytest.raises(RuntimeError, match="unreadable"):
        copies.copy_forward((torch.rand(2, 1, 4, 4).as_subclass(Unreadable),), {}, limit=None)
    assert copies.take().copy_failed
    assert not copies.take().copy_failed
