"""The audited step's training images, copied on the training thread: all an audit takes from the user's forward.

The auditor's forward hooks hand each training forward of an audited step to :class:`StepBatchCopy`, which copies
the images the audit needs to the CPU (from CUDA without waiting for the GPU, see :func:`copied_event`) and watches
the forward's output for its backward pass: a forward that comes before an earlier one's backward pass shares that
pass, and Opacus sums its per-sample gradients into the earlier forward's samples. At the step, :meth:`take` hands
the copies over as a :class:`CopiedBatch` and starts the next step afresh.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from opacus_dmaudit.imprint import image_argument

__all__ = ["SHARED_BACKWARD", "CopiedBatch", "ForwardHook", "StepBatchCopy", "copied_event", "output_tensors",
           "wait_for"]

# What Opacus makes of a training forward that comes before an earlier one's backward pass (warning and note).
SHARED_BACKWARD = ("came before the backward pass of an earlier one (augmented views of one batch, say): Opacus sums "
                   "the i-th images' gradients of all of them into one sample")


class ForwardHook:
    """One of the auditor's forward hooks on the private model, which copies as a hook that does nothing.

    A copy of the model (``copy.deepcopy`` for a best-model snapshot, ``torch.optim.swa_utils.AveragedModel``,
    ``torch.save(model)``) is not the model being trained: its forwards must not join this run's audited batches. A
    bound method as the hook would also drag the auditor (its worker thread, its locks) into the copy, and copying
    would fail with "cannot pickle '_thread.lock' object".
    """

    def __init__(self, hook: Callable) -> None:
        self._hook = hook

    def __call__(self, *args) -> Any:
        return self._hook(*args)

    def __reduce__(self):
        return (_InertForwardHook, ())


class _InertForwardHook:
    """What a copied model holds where the private model holds one of the auditor's forward hooks."""

    def __call__(self, *args) -> None:
        return None


def output_tensors(output) -> list[torch.Tensor]:
    """The tensors of a model's output that a loss can be computed from: the output itself, or the tensors of a
    tuple, list or mapping (a Hugging Face ``ModelOutput`` is one) that require gradients."""
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) \
        else [output]
    return [value for value in values if isinstance(value, torch.Tensor) and value.requires_grad]


def copied_event(device: torch.device):
    """A CUDA event recorded on ``device``'s current stream: it passes once the GPU has run what was queued before."""
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def wait_for(events: list) -> None:
    """Block the calling thread until each of :func:`copied_event`'s events has passed."""
    for event in events:
        event.synchronize()


@dataclass
class CopiedBatch:
    """What one step's training forwards left for its audit.

    Attributes:
        parts: each copied forward's images (on the CPU; whole once ``ready`` has passed).
        ready: CUDA events recorded after those copies, still queued on training's streams.
        sizes: the images each copied forward had (shadow mode copies fewer than that).
        copy_failed: a copy failed (and was counted where it did): the batch is not whole.
        shared_forwards: forwards that shared an earlier one's backward pass (not copied).
    """

    parts: list[torch.Tensor] = field(default_factory=list)
    ready: list = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    copy_failed: bool = False
    shared_forwards: int = 0


class StepBatchCopy:
    """The copies of one step's training forwards, from its first forward to the step that takes them."""

    def __init__(self) -> None:
        self._batch = CopiedBatch()
        self._forward_copied = False  # the forward running now was copied (its output still to be watched)
        self._awaiting_backward = False  # a copied forward's output has not had its backward pass yet

    @property
    def copied(self) -> int:
        """Images copied so far this step."""
        return sum(len(images) for images in self._batch.parts)

    def copy_forward(self, args: tuple, kwargs: dict, *, limit: int | None) -> tuple[int, ...] | None:
        """Copy the first ``limit`` images (None: all) of a training forward's image batch.

        Returns the shape of an input that is no N×C×H×W batch (nothing copied, nothing audited), else None. A
        forward before the last copied one's backward pass is counted, not copied: its images are no samples of
        their own. An exception marks the step's batch as not whole, and passes on.
        """
        if self._awaiting_backward:
            self._batch.shared_forwards += 1
            return None
        self._forward_copied = True
        try:
            where = image_argument(args, kwargs)
            batch = None if where is None else (args[where] if isinstance(where, int) else kwargs[where])
            if batch is None:
                return None
            if batch.ndim != 4:
                return tuple(batch.shape)
            images = batch[:limit].detach()
            if images.is_cuda:
                # Queued on training's stream into pinned memory: a blocking copy would make the training thread wait
                # until the GPU has run everything queued before it. The worker waits for the event instead.
                self._batch.parts.append(images.to("cpu", non_blocking=True))
                self._batch.ready.append(copied_event(images.device))
            else:
                self._batch.parts.append(images.to("cpu", copy=True))
            self._batch.sizes.append(int(batch.shape[0]))
            return None
        except Exception:
            self._batch.copy_failed = True
            raise

    def watch_output(self, output) -> None:
        """After a copied forward: until its output's backward pass, later forwards share that pass."""
        if not self._forward_copied:
            return
        self._forward_copied = False
        tensors = output_tensors(output)
        for tensor in tensors:
            tensor.register_hook(self._backward_reached)
        self._awaiting_backward = bool(tensors)

    def _backward_reached(self, grad: torch.Tensor) -> None:
        self._awaiting_backward = False

    def take(self) -> CopiedBatch:
        """This step's copies; the next forward starts the next step's."""
        taken, self._batch = self._batch, CopiedBatch()
        self._awaiting_backward = self._forward_copied = False
        return taken
