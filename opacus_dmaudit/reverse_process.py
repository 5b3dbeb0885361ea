"""The reverse process from per-image start timesteps: planned on the host, run as one fused step per timestep.

Every sampler step, DDIM or DDPM, is the same computation on each image ``i``::

    out   = unet(x, t)                              # eps, v or x_0 prediction
    x0    = clip((x - b_i eps) / a_i)               # a = sqrt(abar_t), b = sqrt(1 - abar_t)
    eps   = (x - a_i x0) / b_i                      # consistent with the clipped x_0
    x_new = A_i x0 + B_i eps + C_i x + D_i noise

DDIM (eta = 0) uses ``A = sqrt(abar_next), B = sqrt(1 - abar_next)``; DDPM's posterior mean uses ``A, C`` and its
std ``D``; an image that is not moving at this step has ``A = B = D = 0, C = 1``. So the host computes one small
``steps × N × 6`` coefficient table per batch (:func:`plan_ddim`, :func:`plan_ddpm`), uploads it once, and the
device runs one fixed-shape step per timestep with no host round trip. That makes the step a single function to
``torch.compile`` (the scheduler update fuses into the UNet's last kernels) and to capture as a CUDA graph.

:class:`ReverseProcess` runs the plan eagerly (the CPU default: images whose chain has not started yet are
sliced off, so no compute is wasted), or compiled, or compiled and replayed as CUDA graphs (the CUDA default: batch
sizes are padded to a few buckets so the shapes stay fixed). A compiled step that fails to build, or whose first
output disagrees with the eager step, falls back to eager with a warning: speed options never cost correctness.

Threads: while ``torch.compile`` traces, it saves the process's global RNG state and restores it when done, so any
random numbers another thread drew meanwhile are drawn again afterwards (``benchmarks/compile_rng_hazard.py``).
Next to a training loop that would repeat DP-SGD noise. And before torch 2.14 every CUDA graph capture and replay
touches the default CUDA generator, which DP-SGD's noise comes from
(:func:`cuda_graphs_leave_default_generator_alone`). Code that reconstructs next to training therefore calls
:meth:`ReverseProcess.prepare` on the training thread before training and :meth:`ReverseProcess.freeze` after it:
a frozen process never compiles or captures again. It replays the CUDA graphs captured while preparing (a batch
padded up to the smallest that holds it), and runs the uncompiled step eagerly where none does; on an older torch
such code runs no graphs at all.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

__all__ = ["FastPathConfig", "ReversePlan", "ReverseStep", "ReverseProcess", "plan_ddim", "plan_ddpm",
           "bucket_size", "cuda_graphs_leave_default_generator_alone"]

logger = logging.getLogger(__name__)

# Columns of the coefficient table.
_A_T, _B_T, _X0, _EPS, _X, _NOISE = range(6)


@dataclass(frozen=True)
class FastPathConfig:
    """How the reverse process runs; ``None`` resolves per device (:meth:`resolve`).

    Attributes:
        precision: "bf16" (autocast of the UNet; the update stays fp32) or "fp32". Default: bf16 on CUDA.
        channels_last: NHWC layout for the UNet's convolutions. Default: on the CPU, and elsewhere where
            ``compile`` is (on CUDA). Eager CUDA GroupNorm computes in NCHW (``native_group_norm`` makes its input
            contiguous on every device but the CPU), so uncompiled, every GroupNorm → conv pair would transpose the
            activation twice; inductor lowers GroupNorm itself and keeps the layout. The CPU's GroupNorm keeps
            NHWC, and oneDNN's convolutions run faster in it (on a 2-core x86-64, 7 to 8% per call of the shipped
            prior's UNet, alternating runs at batch 8 and 32; 5 to 12% in ``reconstruction_throughput.py`` runs).
        compile: ``torch.compile`` the step (UNet and scheduler update together). Default: on CUDA. Falls back
            to eager, with a warning, when compiling fails or disagrees with eager.
        cuda_graphs: replay each fixed-shape step as a CUDA graph (needs CUDA). Default: on CUDA.
        compile_mode: ``torch.compile``'s mode ("default", "max-autotune-no-cudagraphs", ...); CUDA graphs are
            ours, so modes that add their own ("reduce-overhead", "max-autotune") are refused.
        min_bucket: smallest padded batch of the compiled path; batches are padded to powers of two from here up
            to the batch size, so at most a handful of shapes are ever compiled.
    """

    precision: str | None = None
    channels_last: bool | None = None
    compile: bool | None = None
    cuda_graphs: bool | None = None
    compile_mode: str = "default"
    min_bucket: int = 8

    def __post_init__(self) -> None:
        if self.precision not in (None, "bf16", "fp32"):
            raise ValueError(f"precision must be 'bf16' or 'fp32', got {self.precision!r}")
        if self.compile_mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"compile_mode {self.compile_mode!r} adds torch's own CUDA graphs; use 'default' or "
                             "'max-autotune-no-cudagraphs' (cuda_graphs=True gives the graphs)")
        if self.min_bucket < 1:
            raise ValueError(f"min_bucket must be positive, got {self.min_bucket}")

    def resolve(self, device: torch.device) -> "FastPathConfig":
        """Fill the ``None`` fields for ``device``; CUDA graphs are off wherever CUDA is not."""
        cuda = device.type == "cuda"
        if self.cuda_graphs and not cuda:
            raise ValueError(f"cuda_graphs=True needs a CUDA device, the prior runs on {device}")
        compile = cuda if self.compile is None else self.compile
        return replace(
            self,
            precision=self.precision or ("bf16" if cuda else "fp32"),
            channels_last=(compile or device.type == "cpu") if self.channels_last is None else self.channels_last,
            compile=compile,
            cuda_graphs=cuda if self.cuda_graphs is None else self.cuda_graphs,
        )

    @classmethod
    def eager(cls, *, precision: str = "fp32") -> "FastPathConfig":
        """No speed options at all: the reference against which the others are checked."""
        return cls(precision=precision, channels_last=False, compile=False, cuda_graphs=False)


@dataclass
class ReversePlan:
    """The reverse chain of one batch, computed on the host.

    Attributes:
        timesteps: ``S×N`` UNet timesteps per step and image.
        coefficients: ``S×N×6`` float32 (a, b, A, B, C, D of the module docstring).
        active: per step, how many leading images move (images sorted by descending ``t*``); the eager runner
            computes only those.
        stochastic: whether any step adds noise (DDPM).
    """

    timesteps: torch.Tensor
    coefficients: torch.Tensor
    active: list[int]
    stochastic: bool

    @property
    def num_steps(self) -> int:
        return len(self.active)

    @property
    def batch(self) -> int:
        return int(self.timesteps.shape[1])

    def padded(self, size: int) -> "ReversePlan":
        """The plan for ``size ≥ N`` images: the extra rows sit still (C = 1) at t = 0."""
        extra = size - self.batch
        if extra <= 0:
            return self
        steps = self.num_steps
        still = self.coefficients.new_zeros(steps, extra, 6)
        still[..., _A_T] = 1.0
        still[..., _B_T] = 1.0
        still[..., _X] = 1.0
        return ReversePlan(
            timesteps=torch.cat([self.timesteps, self.timesteps.new_zeros(steps, extra)], dim=1),
            coefficients=torch.cat([self.coefficients, still], dim=1),
            active=list(self.active),
            stochastic=self.stochastic,
        )


def _model_coefficients(abar: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    at = abar[t]
    return at.sqrt(), (1.0 - at).sqrt()


def plan_ddim(t_start: torch.Tensor, *, steps: int, alphas_cumprod: torch.Tensor) -> ReversePlan:
    """Deterministic DDIM (eta = 0) from each image's ``t*``: ``t_j = floor(t* (steps - j) / steps)``.

    The last step jumps to ``abar = 1`` (a clean image). Steps from ``t_j`` to ``t_{j+1}`` at which no image of the
    batch moves (``t* < steps`` repeats timesteps) are dropped, so every kept step starts at the level where the one
    before left each image.
    """
    abar = alphas_cumprod.to(torch.float64).cpu()
    t_start = t_start.cpu().long()
    levels = [torch.div(t_start * (steps - j), steps, rounding_mode="floor") for j in range(steps)]
    timesteps, rows = [], []
    for j, t in enumerate(levels):
        last = j == steps - 1
        # Drop the step that stands still (t_{j+1} == t_j), never the move after it: the image would then be one
        # level noisier than the next step assumes, and at t* < steps the misses add up to ruin the result.
        if not last and bool((levels[j + 1] == t).all()):
            continue
        a, b = _model_coefficients(abar, t)
        abar_next = torch.ones_like(a) if last else abar[levels[j + 1]]
        zero = torch.zeros_like(a)
        rows.append(torch.stack([a, b, abar_next.sqrt(), (1.0 - abar_next).sqrt(), zero, zero], dim=1))
        timesteps.append(t)
    count = t_start.numel()
    return ReversePlan(timesteps=torch.stack(timesteps), coefficients=torch.stack(rows).float(),
                       active=[count] * len(rows), stochastic=False)


def plan_ddpm(t_start: torch.Tensor, *, alphas_cumprod: torch.Tensor) -> ReversePlan:
    """Ancestral DDPM steps, each image from its own ``t*`` down to 0 (Ho et al. 2020, posterior q(x_{t-1}|x_t, x_0)).

    Images must be sorted by descending ``t*``: the ones already moving then form a prefix (``active``).
    """
    abar = alphas_cumprod.to(torch.float64).cpu()
    t_start = t_start.cpu().long()
    if bool((t_start[1:] > t_start[:-1]).any()):
        raise ValueError("plan_ddpm needs images sorted by descending t*")
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    alpha = abar / abar_prev
    # All steps at once: row j is the step at t = t_max - j; an image moves from its own t* down.
    current = torch.arange(int(t_start.max()), -1, -1)
    moving = t_start.view(1, -1) >= current.view(-1, 1)
    t = torch.where(moving, current.view(-1, 1), torch.zeros_like(moving, dtype=torch.long))
    ab, ap, al = abar[current], abar_prev[current], alpha[current]
    coef_x0 = (ap.sqrt() * (1 - al) / (1 - ab)).view(-1, 1)
    coef_xt = (al.sqrt() * (1 - ap) / (1 - ab)).view(-1, 1)
    std = ((1 - ap) / (1 - ab) * (1 - al)).clamp(min=1e-20).sqrt().view(-1, 1)
    std = torch.where(current.view(-1, 1) > 0, std, 0.0)  # the last step adds no noise
    a, b = _model_coefficients(abar, t)
    zero = torch.zeros_like(a)
    coefficients = torch.stack([a, b, torch.where(moving, coef_x0, zero), zero, torch.where(moving, coef_xt, 1.0),
                                torch.where(moving, std, zero)], dim=2)
    return ReversePlan(timesteps=t, coefficients=coefficients.float(), active=moving.sum(dim=1).tolist(),
                       stochastic=True)


class ReverseStep(nn.Module):
    """One reverse step of every image: the UNet call and the scheduler update (module docstring).

    Args:
        unet: a diffusers ``UNet2DModel`` or any module called as ``unet(x, t).sample``.
        prediction_type: "epsilon", "v_prediction" or "sample".
        clip_sample: clamp the predicted ``x_0`` to ``[-1, 1]``.
        channels: image channels (a learned-variance UNet returns twice as many; the rest is dropped).
        precision: "bf16" autocasts the UNet on the input's device; the update always runs in fp32.
    """

    def __init__(self, unet: nn.Module, *, prediction_type: str, clip_sample: bool, channels: int,
                 precision: str) -> None:
        super().__init__()
        self.unet = unet
        self.prediction_type = prediction_type
        self.clip_sample = clip_sample
        self.channels = channels
        self.precision = precision

    def forward(self, x: torch.Tensor, t: torch.Tensor, coefficients: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
        autocast = (torch.autocast(x.device.type, dtype=torch.bfloat16) if self.precision == "bf16"
                    else contextlib.nullcontext())
        with autocast:
            out = self.unet(x, t).sample
        out = out[:, : self.channels].float()
        a, b, to_x0, to_eps, to_x, to_noise = (c.view(-1, 1, 1, 1) for c in coefficients.unbind(1))
        if self.prediction_type == "epsilon":
            x0 = (x - b * out) / a
            eps = out
        elif self.prediction_type == "v_prediction":
            x0 = a * x - b * out
            eps = a * out + b * x
        else:
            x0 = out
            eps = (x - a * x0) / b
        if self.clip_sample:
            x0 = x0.clamp(-1.0, 1.0)
            # Keep eps consistent with the clipped x_0: DDIM's update needs both to describe x_t.
            eps = (x - a * x0) / b
        return to_x0 * x0 + to_eps * eps + to_x * x + to_noise * noise


def bucket_size(count: int, *, batch_size: int, min_bucket: int) -> int:
    """The padded batch a fixed-shape runner uses for ``count`` images: a power of two, at most ``batch_size``."""
    if count >= batch_size:
        return batch_size
    return min(batch_size, max(min_bucket, 1 << math.ceil(math.log2(max(count, 1)))))


def cuda_graphs_leave_default_generator_alone() -> bool:
    """Whether capturing and replaying a CUDA graph that draws no random numbers leaves the default CUDA generator
    alone, so that another thread (a training loop) may draw from it meanwhile.

    Up to torch 2.11 every capture registers the device's default generator with the graph and flags that generator
    as capturing (pytorch/pytorch#172390): a draw from it on another thread during the capture fails ("Offset
    increment outside graph capture encountered unexpectedly"), and every replay rewrites the generator's offset
    without taking its lock, so a draw on another thread at that moment can lose its increment and a later draw
    repeat its random numbers. 2.12 and 2.13 keep the state per capture but still register generators up front; from
    2.14 a generator joins a graph only when the capture draws from it (pytorch/pytorch#176753; seen in the wheels'
    headers and in inductor, which stopped registering generators in 2.14). torch 2.15's ``CUDAGraph.h``,
    ``CUDAGeneratorImpl.h`` and its Python callers of ``register_generator_state`` are 2.14's, line for line.
    """
    return torch.torch_version.TorchVersion(torch.__version__) >= (2, 14)


class _CaptureError(RuntimeError):
    """A CUDA graph capture failed (the step itself ran)."""


class _GraphedStep:
    """A captured CUDA graph of one step on static buffers; replays write the new ``x`` into ``self.x``."""

    def __init__(self, step, x: torch.Tensor, t: torch.Tensor, coefficients: torch.Tensor, noise: torch.Tensor):
        self.x, self.t, self.coefficients, self.noise = x.clone(), t.clone(), coefficients.clone(), noise.clone()
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            # Warm-up (lazy initialisation, cuDNN's algorithm choice) must precede capture.
            for _ in range(2):
                step(self.x.clone(), self.t, self.coefficients, self.noise)
            # Captured by hand, not with torch.cuda.graph(), whose entry synchronises the device and empties the
            # caching allocator: next to a training loop, the user's next allocations would cudaMalloc again.
            # Thread-local capture: the training thread may allocate or synchronise meanwhile without breaking it.
            self.graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.x.copy_(step(self.x, self.t, self.coefficients, self.noise))
            except BaseException:
                with contextlib.suppress(Exception):  # end the broken capture; the step's error is the one to see
                    self.graph.capture_end()
                raise
            self.graph.capture_end()
        torch.cuda.current_stream(x.device).wait_stream(side)

    def __call__(self, t: torch.Tensor, coefficients: torch.Tensor) -> None:
        self.t.copy_(t, non_blocking=True)
        self.coefficients.copy_(coefficients, non_blocking=True)
        self.graph.replay()


class ReverseProcess:
    """Runs :class:`ReversePlan` s with a UNet, eagerly or through the fast path of :class:`FastPathConfig`.

    Args:
        unet: the denoiser (already on ``device``, in eval mode, without gradients).
        prediction_type / clip_sample / channels: as :class:`ReverseStep`.
        device: where the UNet runs.
        config: the speed options; ``None`` fields are resolved for ``device``.
    """

    def __init__(self, unet: nn.Module, *, prediction_type: str, clip_sample: bool, channels: int,
                 device: torch.device, config: FastPathConfig | None = None) -> None:
        self.device = torch.device(device)
        self.config = (config or FastPathConfig()).resolve(self.device)
        if self.config.channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        self.step = ReverseStep(unet, prediction_type=prediction_type, clip_sample=clip_sample, channels=channels,
                                precision=self.config.precision)
        self._compiled = None
        self._graphs: dict[tuple, _GraphedStep] = {}
        self._checked: set[tuple] = set()
        self._frozen = False
        self._compiled_sizes: set[int] = set()  # padded batch sizes the compiled step has been built for
        self.compiled_threads: set[int] = set()
        """Idents of the threads that have called the compiled step (for checks that none is a worker)."""
        self.captured_threads: set[int] = set()
        """Idents of the threads that have captured a CUDA graph (likewise)."""
        self._lock = threading.Lock()
        # Passes once the GPU has run the last graph replays and read their result: the next caller may queue its
        # work on another stream (the audit worker's, a user's reconstruct on the training thread), and its writes to
        # the same static buffers must wait for it there, as the lock makes its host calls wait.
        self._graphs_released = None
        self.fallbacks: list[str] = []
        """Why a speed option was switched off (empty while every configured option runs)."""

    @property
    def fast(self) -> bool:
        """Whether steps run compiled or as graphs (padded fixed shapes) rather than eagerly (sliced)."""
        if self._frozen:  # only the graphs captured before freezing run then (compiled code too runs only in them)
            return bool(self.config.cuda_graphs and self._graphs)
        return bool(self.config.compile or self.config.cuda_graphs)

    @property
    def frozen(self) -> bool:
        """Whether the compiler is off limits (see the module docstring)."""
        return self._frozen

    def freeze(self) -> None:
        """Never compile or capture again: replay the prepared graphs, run the uncompiled step eagerly otherwise."""
        self._frozen = True

    @torch.no_grad()
    def prepare(self, shape: tuple[int, ...], *, batch_size: int) -> None:
        """Compile, check and capture the step for ``shape`` (N×C×H×W, N padded to its bucket) on this thread."""
        if self._frozen:
            raise RuntimeError("this reverse process is frozen: prepare() it before freeze()")
        count, *image = shape
        size = bucket_size(count, batch_size=batch_size, min_bucket=self.config.min_bucket)
        x = torch.zeros((size, *image), device=self.device, dtype=torch.float32)
        half = 0.5**0.5  # any valid step will do: abar_t = 0.5, then x <- x0
        plan = ReversePlan(timesteps=torch.full((1, size), 100), active=[size], stochastic=False,
                           coefficients=torch.tensor([half, half, 1.0, 0.0, 0.0, 0.0],
                                                     dtype=torch.float32).repeat(1, size, 1))
        self.run(x, plan, generator=None, batch_size=size)

    def describe(self) -> str:
        """The options in effect, e.g. ``"bf16 + channels_last + compile + cuda_graphs"``."""
        parts = [self.config.precision]
        parts += [name for name in ("channels_last", "compile", "cuda_graphs") if getattr(self.config, name)]
        return " + ".join(parts)

    def switch_off(self, option: str, *, reason: str) -> None:
        """Run without ``option`` ("compile" or "cuda_graphs") from now on; warns, and says why in :attr:`fallbacks`."""
        if option not in ("compile", "cuda_graphs"):
            raise ValueError(f"only 'compile' or 'cuda_graphs' can be switched off, got {option!r}")
        message = f"opacus_dmaudit: {option} switched off ({reason}); the reverse process runs without it"
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        self.fallbacks.append(message)
        self.config = replace(self.config, **{option: False})
        self._graphs.clear()

    # ------------------------------------------------------------------ running a plan
    @torch.no_grad()
    def run(self, x: torch.Tensor, plan: ReversePlan, *, generator: torch.Generator | None,
            batch_size: int) -> torch.Tensor:
        """Run ``plan`` from ``x`` (``N×C×H×W`` on the model's scale) and return the final images (fp32)."""
        if plan.batch != x.shape[0]:
            raise ValueError(f"plan for {plan.batch} images, got {x.shape[0]}")
        x = x.to(self.device, torch.float32)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        while self.fast:
            size = bucket_size(x.shape[0], batch_size=batch_size, min_bucket=self.config.min_bucket)
            if self._frozen:
                size = self._prepared_size(x)
                if size is None:  # no graph holds this batch, and capturing one now is what freezing rules out
                    break
            elif self.config.compile:
                # Pad up to a size already compiled where one fits: a compile costs seconds to minutes, the time of
                # thousands of image-steps (and once frozen, any other size would run uncompiled).
                size = min((p for p in self._compiled_sizes if p >= x.shape[0]), default=size)
            try:
                # The static buffers of the captured graphs belong to one caller at a time (e.g. the audit worker
                # and a user's own reconstruct on the same prior).
                with self._lock:
                    return self._run_fixed(x, plan.padded(size), generator=generator)[: plan.batch]
            except torch.cuda.OutOfMemoryError:
                raise  # no speed option's fault: a smaller batch_size is the fix
            except Exception as exc:  # compile, capture or Triton errors: never worse than eager
                cause = exc.__cause__ if isinstance(exc, _CaptureError) else exc
                reason = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
                # A failed capture costs the graphs alone; anything else is the compiler's.
                self.switch_off("cuda_graphs" if isinstance(exc, _CaptureError) or not self.config.compile
                                else "compile", reason=reason)
        return self._run_eager(x, plan, generator=generator)

    def _prepared_size(self, x: torch.Tensor) -> int | None:
        """The smallest batch a graph was captured for that holds ``x``'s images, or None."""
        return min((shape[0] for shape, _, _ in self._graphs
                    if shape[1:] == tuple(x.shape[1:]) and shape[0] >= x.shape[0]), default=None)

    def _run_eager(self, x: torch.Tensor, plan: ReversePlan, *, generator) -> torch.Tensor:
        timesteps = plan.timesteps.to(self.device)
        coefficients = plan.coefficients.to(self.device)
        zeros = torch.zeros_like(x)
        x = x.clone()
        for j, n in enumerate(plan.active):
            xa = x[:n]
            noise = (torch.randn(xa.shape, generator=generator, device=self.device, dtype=x.dtype) if plan.stochastic
                     else zeros[:n])
            x[:n] = self.step(xa, timesteps[j, :n], coefficients[j, :n], noise)
        return x

    def _run_fixed(self, x: torch.Tensor, plan: ReversePlan, *, generator) -> torch.Tensor:
        size = plan.batch
        if size > x.shape[0]:
            pad = x.new_zeros((size - x.shape[0], *x.shape[1:])).contiguous(memory_format=_layout(x))
            x = torch.cat([x, pad]).contiguous(memory_format=_layout(x))
        timesteps = plan.timesteps.to(self.device, non_blocking=True)
        coefficients = plan.coefficients.to(self.device, non_blocking=True)
        noise = torch.zeros_like(x)
        # Frozen (so replaying a graph captured before freezing): the compiled function only inside a graph captured
        # from it, i.e. at a size compiled before freezing (calling it could recompile).
        compiled = self.config.compile and (not self._frozen or size in self._compiled_sizes)
        step = self._compiled_step() if compiled else self.step
        key = (tuple(x.shape), x.dtype, compiled)
        if key not in self._checked:
            self._check(step, x, timesteps[0], coefficients[0], noise, stochastic=plan.stochastic)
            self._checked.add(key)
        if compiled:
            self._compiled_sizes.add(size)
        if self.config.cuda_graphs:
            graphed = self._graphs.get(key)
            if graphed is None:
                if self._frozen:
                    raise RuntimeError(f"no CUDA graph was captured for {key} before freezing")
                try:
                    graphed = _GraphedStep(step, x, timesteps[0], coefficients[0], noise)
                except Exception as exc:
                    raise _CaptureError("CUDA graph capture failed") from exc
                self._graphs[key] = graphed
                self.captured_threads.add(threading.get_ident())
            stream = torch.cuda.current_stream(self.device)
            if self._graphs_released is not None:
                stream.wait_event(self._graphs_released)
            graphed.x.copy_(x)
            for j in range(plan.num_steps):
                if plan.stochastic:
                    graphed.noise.normal_(generator=generator)
                graphed(timesteps[j], coefficients[j])
            result = graphed.x.clone()
            self._graphs_released = torch.cuda.Event()
            self._graphs_released.record(stream)
            return result
        for j in range(plan.num_steps):
            if plan.stochastic:
                noise.normal_(generator=generator)
            x = step(x, timesteps[j], coefficients[j], noise)
        return x

    def _compiled_step(self):
        if self._compiled is None:
            compiled = torch.compile(self.step, mode=self.config.compile_mode, dynamic=False)

            def call(*args):
                self.compiled_threads.add(threading.get_ident())
                return compiled(*args)

            self._compiled = call
        return self._compiled

    def _check(self, step, x, t, coefficients, noise, *, stochastic: bool) -> None:
        """The first compiled step of each shape must agree with the eager step on the same input."""
        if step is self.step:
            return
        # The probe's noise has its own generator: drawing it from the caller's would shift every later draw, so a
        # seeded DDPM run would differ between the first call of a shape and the next.
        probe = noise if not stochastic else torch.randn(
            x.shape, generator=torch.Generator(device=self.device).manual_seed(0), device=self.device, dtype=x.dtype)
        fast = step(x, t, coefficients, probe.contiguous(memory_format=_layout(x)))
        reference = self.step(x, t, coefficients, probe.contiguous(memory_format=_layout(x)))
        error = float((fast - reference).abs().max())
        scale = float(reference.abs().max()) + 1.0
        if not math.isfinite(error) or error > 0.05 * scale:
            raise RuntimeError(f"the compiled step differs from eager by {error:.3g} (scale {scale:.3g})")


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format
