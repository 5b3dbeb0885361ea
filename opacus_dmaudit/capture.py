"""Capturing the imprint layer's gradients as Opacus releases them: clipped, summed, noised.

Opacus's ``DPOptimizer.pre_step`` clips per-sample gradients into ``p.summed_grad``, adds noise into ``p.grad``,
divides ``p.grad`` by ``expected_batch_size * accumulated_iterations`` (mean reduction), and only then calls
``step_hook``, the single slot the privacy accountant uses. :class:`GradientCapture` chains that slot (the
accountant still runs first) and copies the imprint layer's noisy gradient, undoing the division, together with
the clean clipped sum that the oracle noise level needs.
"""

from __future__ import annotations

import functools
import time

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

__all__ = ["CapturedGradients", "ChainHandle", "GradientCapture", "PerLayerClippingError", "chain_pre_step",
           "chain_step_hook", "released_noise_multiplier"]


class PerLayerClippingError(ValueError):
    """Per-layer clipping scales an image row and its bias by different factors, which breaks the ratio."""


@dataclass
class CapturedGradients:
    """The imprint layer's gradients of one DP-SGD step.

    Attributes:
        weight: noisy sum ``sum_j c_j dL_j/dW + N(0, (sigma C)^2)``, shape ``K×d`` (the batch-size division undone).
        bias: the same for the bias, shape ``K``.
        clean_weight: the clipped sum before noise (``p.summed_grad``), or ``None`` when not kept.
        clean_bias: likewise for the bias.
        coordinate_noise_std: std of the noise added to every coordinate of the sums, ``sigma * C``
            (:func:`released_noise_multiplier` times the step's clipping norm).
        step: the optimizer step counter (1-based) at capture.
        max_grad_norm: the step's clipping norm ``C``, public in DP-SGD (the ``"clip-norm"`` scale needs it);
            ``None`` where unknown.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    clean_weight: torch.Tensor | None
    clean_bias: torch.Tensor | None
    coordinate_noise_std: float
    step: int
    max_grad_norm: float | None = None


_NOTHING_OF_ITS_OWN = object()  # the instance had no attribute of that name: the class's shows through


class ChainHandle:
    """Undoes :func:`chain_step_hook` or :func:`chain_pre_step`: the optimizer instance's slot gets back what it held.

    Attributes:
        previous: what the slot held on the instance before the chain (the accountant's step hook, say).
        active: False once removed; a link someone chained after ours stays in place but does nothing.
    """

    def __init__(self, optimizer, name: str, link: Callable, previous) -> None:
        self.optimizer, self.name, self.link, self.previous = optimizer, name, link, previous
        self.active = True

    def remove(self) -> None:
        self.active = False
        if vars(self.optimizer).get(self.name) is not self.link:
            return  # someone chained after us: their link calls ours, which now passes straight through
        if self.previous is _NOTHING_OF_ITS_OWN:
            delattr(self.optimizer, self.name)
        else:
            setattr(self.optimizer, self.name, self.previous)


def _chain(optimizer, name: str, make_link: Callable[[Callable, ChainHandle], Callable]) -> ChainHandle:
    """Put ``make_link(current, handle)`` into the instance slot ``name``, where ``current`` is what it held."""
    handle = ChainHandle(optimizer, name, None, vars(optimizer).get(name, _NOTHING_OF_ITS_OWN))
    handle.link = make_link(getattr(optimizer, name), handle)
    setattr(optimizer, name, handle.link)
    return handle


def chain_step_hook(optimizer, fn: Callable) -> ChainHandle:
    """Run ``fn(optimizer)`` after the optimizer's existing step hook (the privacy accountant's), never instead."""
    def make_link(previous, handle):
        def hook(opt) -> None:
            if previous is not None:
                previous(opt)
            if handle.active:
                fn(opt)

        return hook

    return _chain(optimizer, "step_hook", make_link)


def chain_pre_step(optimizer, fn: Callable) -> ChainHandle:
    """Run ``fn(optimizer)`` at the start of the DP optimizer's ``pre_step``, before Opacus clips, on this optimizer
    instance only; ``remove()`` gives the instance its own method back. ``fn`` runs inside the user's
    ``optimizer.step()``: it must not raise."""
    def make_link(original, handle):
        def pre_step(*args, **kwargs):
            if handle.active:
                fn(optimizer)
            return original(*args, **kwargs)

        return pre_step

    return _chain(optimizer, "pre_step", make_link)


def released_noise_multiplier(optimizer) -> float:
    """The std of the noise a DP optimizer adds to each coordinate of its clipped sum, in units of ``max_grad_norm``.

    That is ``optimizer.noise_multiplier``, except under adaptive clipping (``clipping="adaptive"``, Andrew et al.
    2021): its optimizer also releases a noised count of unclipped samples, and so noises the gradients with
    ``(sigma^-2 - (2 sigma_u)^-2)^(-1/2)`` (``sigma_u``: ``unclipped_num_std``) for the two releases to add up to
    ``sigma``. Opacus >= 1.6 keeps ``sigma`` in ``noise_multiplier`` (the accountant's) and adjusts in ``add_noise``;
    older releases store the adjusted value in ``noise_multiplier`` itself.
    """
    sigma = float(optimizer.noise_multiplier)
    from opacus.optimizers import AdaClipDPOptimizer

    if not isinstance(optimizer, AdaClipDPOptimizer) or sigma <= 0 or _adaptive_clipping_stores_adjusted_sigma():
        return sigma
    return (sigma ** -2 - (2 * float(optimizer.unclipped_num_std)) ** -2) ** -0.5


@functools.lru_cache(maxsize=None)
def _adaptive_clipping_stores_adjusted_sigma() -> bool:
    """Whether this Opacus's ``AdaClipDPOptimizer`` replaces ``noise_multiplier`` by the adjusted one, asked of the
    class itself (a throwaway instance) rather than of a version number."""
    from opacus.optimizers import AdaClipDPOptimizer

    probe = AdaClipDPOptimizer(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0), noise_multiplier=1.0,
                               target_unclipped_quantile=0.5, clipbound_learning_rate=0.0, max_clipbound=2.0,
                               min_clipbound=0.5, unclipped_num_std=1.0, max_grad_norm=1.0, expected_batch_size=1)
    return float(probe.noise_multiplier) != 1.0


def _is_distributed(optimizer) -> bool:
    from opacus.optimizers import DistributedDPOptimizer

    return isinstance(optimizer, DistributedDPOptimizer) and torch.distributed.get_world_size() > 1


def _clean_sum(p: torch.Tensor, factor: float) -> torch.Tensor:
    """The clipped sum before noise. On the ranks that add no noise, Opacus's DistributedDPOptimizer sets
    ``p.grad = p.summed_grad.view_as(p)`` and then divides ``p.grad`` in place, which divides ``summed_grad`` too:
    there the noise-free ``p.grad`` times the factor is the clean sum."""
    if p.grad.untyped_storage().data_ptr() == p.summed_grad.untyped_storage().data_ptr():
        return p.grad.detach().mul(factor)
    return p.summed_grad.detach().clone()


def _unscale_factor(optimizer) -> float:
    if getattr(optimizer, "loss_reduction", "mean") == "mean":
        return float(optimizer.expected_batch_size * optimizer.accumulated_iterations)
    return 1.0


class GradientCapture:
    """Chains a ``DPOptimizer``'s step hook to capture an imprint layer's released gradients.

    Args:
        optimizer: the Opacus ``DPOptimizer`` (flat or adaptive clipping).
        layer: the imprint ``nn.Linear`` (its parameters must be among the optimizer's).
        should_capture: called with the step number; capture only when it returns True (default: every step).
        on_capture: called with each :class:`CapturedGradients`, on the training thread; keep it short.
        keep_clean: also copy the clean clipped sums (the oracle).
        after_step: called with the step number after every real (not skipped) step, captured or not.
        on_error: called (inside ``except``) instead of raising when capturing fails; the hook runs inside the
            training loop's ``optimizer.step()``, where a monitor's exception must not land.

    Raises:
        PerLayerClippingError: for per-layer clipping optimizers.
        ValueError: if the layer's parameters are not optimised by ``optimizer``.
    """

    def __init__(
        self,
        optimizer,
        layer: nn.Linear,
        *,
        should_capture: Callable[[int], bool] | None = None,
        on_capture: Callable[[CapturedGradients], None] | None = None,
        keep_clean: bool = True,
        after_step: Callable[[int], None] | None = None,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        from opacus.optimizers import DPPerLayerOptimizer

        try:
            from opacus.optimizers import DistributedPerLayerOptimizer
        except ImportError:  # older opacus
            DistributedPerLayerOptimizer = DPPerLayerOptimizer
        if isinstance(optimizer, (DPPerLayerOptimizer, DistributedPerLayerOptimizer)):
            raise PerLayerClippingError(
                "per-layer clipping scales the imprint layer's weight and bias gradients differently, so "
                "images cannot be read from their ratio; use flat clipping (clipping='flat') or shadow mode"
            )
        params = {id(p) for p in optimizer.params}
        if id(layer.weight) not in params or layer.bias is None or id(layer.bias) not in params:
            raise ValueError("the imprint layer's weight and bias must be trainable parameters of the DP optimizer")
        self.optimizer = optimizer
        self.layer = layer
        self.should_capture = should_capture or (lambda step: True)
        self.on_capture = on_capture
        self.keep_clean = keep_clean
        self.after_step = after_step
        self.on_error = on_error
        self.steps = 0
        self.capture_seconds = 0.0  # training-thread time spent copying gradients (benchmarks report it)
        self.latest: CapturedGradients | None = None
        # The accountant (or whatever was there) keeps running first and unconditionally.
        self._handle = chain_step_hook(optimizer, self._hook)

    def _hook(self, optimizer) -> None:
        self.steps += 1
        try:
            if self.should_capture(self.steps):
                started = time.perf_counter()
                self._capture(optimizer)
                self.capture_seconds += time.perf_counter() - started
        except Exception:
            if self.on_error is None:
                raise
            self.on_error()
        finally:
            if self.after_step is not None:
                self.after_step(self.steps)

    def _capture(self, optimizer) -> None:
        factor = _unscale_factor(optimizer)
        weight, bias = self.layer.weight, self.layer.bias
        # Copies, so the optimizer's in-place update cannot change what the audit sees.
        tensors = [weight.grad.detach().mul(factor), bias.grad.detach().mul(factor)]
        if self.keep_clean:
            tensors += [_clean_sum(p, factor) for p in (weight, bias)]
        if _is_distributed(optimizer):
            # Opacus calls this hook before its all-reduce; rank 0 alone added noise. Summing the ranks' (unscaled)
            # gradients here gives exactly the released global gradient, and the global clean sum.
            for tensor in tensors:
                torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        captured = CapturedGradients(
            weight=tensors[0],
            bias=tensors[1],
            clean_weight=tensors[2] if self.keep_clean else None,
            clean_bias=tensors[3] if self.keep_clean else None,
            # Read inside the step: adaptive clipping moves max_grad_norm only after this hook.
            coordinate_noise_std=released_noise_multiplier(optimizer) * float(optimizer.max_grad_norm),
            step=self.steps,
            max_grad_norm=float(optimizer.max_grad_norm),
        )
        self.latest = captured
        if self.on_capture is not None:
            self.on_capture(captured)

    def detach(self) -> None:
        """Stop capturing and put the previous step hook back."""
        self._handle.remove()
