"""Reconstruction-robustness (ReRo) bounds from the hypothesis-testing view of DP, and epsilon for a schedule.

Kaissis et al. 2023 / Hayes et al. 2023: if a mechanism's trade-off function is ``f`` (the least type-II error at
type-I error ``alpha``), no attacker reconstructs a record with probability above ``1 - f(kappa)``, where ``kappa`` is
the success rate of guessing from the prior alone.

* A Gaussian mechanism with sensitivity C and noise std sigma C is mu-GDP with ``mu = 1 / sigma``; T such steps
  without subsampling are ``sqrt(T) mu``-GDP, and ``1 - f(kappa) = Phi(Phi^-1(kappa) + mu)`` in closed form.
* For the Poisson-subsampled Gaussian over T steps (DP-SGD), the trade-off curve is computed numerically from the
  composed privacy-loss distribution of Opacus's PRV accountant: its privacy profile ``delta(eps)`` gives
  ``1 - f(kappa) = inf_eps min(delta(eps) + e^eps kappa, 1 - e^-eps (1 - delta(eps) - kappa))``.
  At sample rate 1 this equals the closed form (tested).

``kappa`` itself is measured by :func:`estimate_kappa`: draws from the prior alone, scored against the targets.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

import numpy as np
import scipy.fft
import torch
from scipy.optimize import minimize_scalar
from scipy.stats import norm

from opacus_dmaudit.data import adapt_to_prior, restore_from_prior
from opacus_dmaudit.metrics import SUCCESS_THRESHOLDS, reconstruction_errors

if TYPE_CHECKING:
    from opacus_dmaudit.metrics import ImageMetrics
    from opacus_dmaudit.prior import DiffusionPrior

__all__ = ["rero_bound_gdp", "rero_bound_dpsgd", "rero_bounds_dpsgd", "history_epsilon", "schedule_epsilon",
           "noise_multiplier_for_epsilon", "mu_gdp", "estimate_kappa", "ScheduleBound", "PRV_MAX_GRID_POINTS",
           "PRV_AUDIT_MAX_WORK", "prv_grid_points", "check_prv_grid", "PRVGridTooLarge", "rdp_memoised",
           "opacus_accounting"]

# Opacus's PRV accountant discretises the composed privacy loss on a grid that grows without bound as the noise
# multiplier shrinks: 7.7e8 points at sigma 0.1, q = 64/60000 over 9,375 steps. Linux lets numpy reserve that much
# and then kills the process (a sweep at sigma 0.1 was killed on a 24 GB machine), so no MemoryError ever comes.
# Measured peak memory of epsilon plus bound on the 2-core CPU: 5.1e6 points 1.4 GB, 2.0e7 points 5.2 GB. Above this
# cap the PRV figures give way to the RDP accountant's (looser, still valid) ones.
PRV_MAX_GRID_POINTS = 10_000_000

# A history of many mechanisms (a noise schedule that changes sigma every epoch: Opacus's ExponentialNoise, say) is
# discretised and composed mechanism by mechanism, each on the whole grid: 0.5 to 1.3 us per mechanism and grid point
# on the 2-core CPU. 50 epochs of a decaying sigma (0.98 per epoch from 1, q = 256/60000, 234 steps each) made 50
# mechanisms on 2.9e6 points, and one epsilon took 86 to 100 s; 20 of them on 3.8e5 points took 3.7 s. DMAuditor logs an
# epsilon per audit and caps that work here (RDP's epsilon answers above it, noted); elsewhere there is no cap.
PRV_AUDIT_MAX_WORK = 10_000_000


class _NumpyFFT:
    """A ``scipy.fft`` backend that answers with ``numpy.fft``, for Opacus's PRV accountant (it composes by FFT).

    scipy's pocketfft keeps the plans of its last 16 transform sizes for the life of the process (16 sizes of about
    10^6 points held 0.87 GB). A run's PRV grid changes size at every audit (10^5 to 10^6 points for the step counts
    of real runs), so the audits' epsilons filled that cache on the training machine: a 128-step run audited at every
    step grew from 847 to 1,071 MB resident, and stays flat with numpy's FFT (838 to 833 MB), which keeps no plans and
    gave the same epsilons (to the last bit with numpy 2.4, within 1e-10 relative with numpy 1.26), each 1 to 17%
    slower (0.16 to 0.56 s with scipy's for five schedules; all measured on this project's 2-core CPU). What numpy
    cannot answer stays scipy's.
    """

    __ua_domain__ = "numpy.scipy.fft"
    _SCIPY_DEFAULTS = {"workers": None, "overwrite_x": False, "plan": None}

    @classmethod
    def __ua_function__(cls, method, args, kwargs):
        answer = getattr(np.fft, method.__name__, None)
        kwargs = {k: v for k, v in kwargs.items() if not (k in cls._SCIPY_DEFAULTS and v is cls._SCIPY_DEFAULTS[k])}
        if answer is None or not kwargs.keys() <= {"n", "s", "axis", "axes", "norm"}:
            return NotImplemented
        return answer(*args, **kwargs)


@contextlib.contextmanager
def fft_keeping_no_plans() -> Iterator[None]:
    """Run Opacus's PRV accountant on this thread with :class:`_NumpyFFT` (uarray backends are per thread)."""
    with scipy.fft.set_backend(_NumpyFFT):
        yield


# Opacus's RDP of one Poisson-subsampled Gaussian step, order by order (about 150 orders), is a pure-Python series:
# some 0.2 s per (sigma, q) on this project's 2-core CPU, holding the GIL throughout. Its PRV accountant asks for it
# twice to size every grid (``compute_safe_domain_size``), and an audit's epsilon sized its grid twice (once to check
# the size): 0.85 s of the audit worker's 1.1 s per audit (by cProfile, tiny prior), for every audit of a run with
# one sigma and q, while the training thread waited for the GIL. The values depend on (q, sigma, order) alone, so
# they are memoised: Opacus's own function answers once per triple.
_rdp_lock = threading.Lock()
_rdp_blocks = 0  # rdp_memoised() blocks running, on any thread
_rdp_opacus: Callable | None = None  # Opacus's function, while the memoised one stands in for it


def _memoised_rdp(q: float, sigma: float, alpha: float) -> float:
    # Keyed by value: a tensor or NumPy scalar sigma hashes by identity or type, and a tensor can change in place.
    return _rdp_by_value(float(q), float(sigma), float(alpha))


@functools.lru_cache(maxsize=1 << 15)  # about 200 (sigma, q) pairs, some 8 MB
def _rdp_by_value(q: float, sigma: float, alpha: float) -> float:
    return _rdp_opacus(q, sigma, alpha)


@contextlib.contextmanager
def rdp_memoised() -> Iterator[None]:
    """Let Opacus's accountants take each order's RDP of a (q, sigma) step from :func:`_memoised_rdp`.

    The function is a module attribute of Opacus, so while any such block runs, every thread's Opacus accountants
    use it (the user's too): they get the same values, bit for bit, sooner.
    """
    from opacus.accountants.analysis import rdp

    global _rdp_blocks, _rdp_opacus
    with _rdp_lock:
        if _rdp_blocks == 0:
            _rdp_opacus, rdp._compute_rdp = rdp._compute_rdp, _memoised_rdp
        _rdp_blocks += 1
    try:
        yield
    finally:
        with _rdp_lock:
            _rdp_blocks -= 1
            if _rdp_blocks == 0 and rdp._compute_rdp is _memoised_rdp:
                rdp._compute_rdp = _rdp_opacus


@contextlib.contextmanager
def opacus_accounting() -> Iterator[None]:
    """Run Opacus's accountants as this package does: FFTs that keep no plans, RDP orders memoised."""
    with fft_keeping_no_plans(), rdp_memoised():
        yield


class PRVGridTooLarge(MemoryError):
    """Opacus's PRV accountant would need a grid above :data:`PRV_MAX_GRID_POINTS` for this history."""


def prv_grid_points(history: list[tuple[float, float, int]], *, eps_error: float = 0.01,
                    delta_error: float) -> int:
    """How many points Opacus's PRV accountant discretises ``history`` (``(sigma, q, steps)`` triples) on.

    This is the accountant's own domain computation, without building the grid (a fraction of a second).
    """
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

    with rdp_memoised():
        domain = PRVAccountant()._get_domain(
            prvs=[PoissonSubsampledGaussianPRV(sample_rate, noise_multiplier) for noise_multiplier, sample_rate, _ in
                  history],
            num_self_compositions=[steps for *_, steps in history], eps_error=eps_error, delta_error=delta_error)
    return int(domain.size)


def check_prv_grid(history: list[tuple[float, float, int]], *, eps_error: float = 0.01, delta_error: float,
                   max_work: int | None = None) -> None:
    """Raise :class:`PRVGridTooLarge` (naming the size) when the PRV grid for ``history`` exceeds the cap, or when its
    mechanisms times its grid points exceed ``max_work`` (the composition's cost, see :data:`PRV_AUDIT_MAX_WORK`)."""
    points = prv_grid_points(history, eps_error=eps_error, delta_error=delta_error)
    if points > PRV_MAX_GRID_POINTS:
        raise PRVGridTooLarge(f"Opacus's PRV accountant would need a grid of {points:.3g} points (some "
                              f"{points * 256 / 2**30:.0f} GiB) at noise multiplier "
                              f"{min(h[0] for h in history):g}")
    if max_work is not None and len(history) * points > max_work:
        raise PRVGridTooLarge(f"Opacus's PRV accountant would compose the {len(history)} mechanisms of this history "
                              f"(sigma {min(h[0] for h in history):.3g} to {max(h[0] for h in history):.3g}) "
                              f"on a grid of {points:.3g} points each, above the {max_work:.3g} mechanism-points "
                              "an audit spends")


def _check(kappa: float, noise_multiplier: float, steps: int, sample_rate: float = 1.0) -> None:
    if not 0.0 <= kappa <= 1.0:
        raise ValueError(f"kappa must be a probability in [0, 1], got {kappa}")
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be positive, got {noise_multiplier}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")


def mu_gdp(noise_multiplier: float, steps: int = 1) -> float:
    """mu of ``steps`` unsubsampled Gaussian steps: ``sqrt(steps) / noise_multiplier``."""
    return math.sqrt(steps) / noise_multiplier


def rero_bound_gdp(mu: float, kappa: float) -> float:
    """``Phi(Phi^-1(kappa) + mu)``: the most a mu-GDP mechanism lets a reconstruction succeed at baseline kappa."""
    if not 0.0 <= kappa <= 1.0:
        raise ValueError(f"kappa must be a probability in [0, 1], got {kappa}")
    if mu < 0:
        raise ValueError(f"mu must be non-negative, got {mu}")
    if kappa in (0.0, 1.0):
        return kappa
    return float(norm.cdf(norm.ppf(kappa) + mu))


def estimate_kappa(prior: DiffusionPrior, targets: torch.Tensor, *, metrics: ImageMetrics, samples: int,
                   sampler: str, steps: int, seed: int,
                   thresholds: dict[str, tuple[float, ...]] = SUCCESS_THRESHOLDS) -> dict[str, float]:
    """Baseline success rates: how often a draw from the prior alone is within eta of a target, per metric@eta."""
    draws = prior.sample(samples, sampler=sampler, steps=steps, seed=seed)
    _, adaptation = adapt_to_prior(targets[:1], resolution=prior.resolution, channels=prior.channels)
    draws = restore_from_prior(draws, adaptation)
    errors: dict[str, list[torch.Tensor]] = {}
    for draw in draws:
        values = metrics(draw.expand_as(targets), targets)
        for name, tensor in values.items():
            if tensor is not None and name in thresholds:
                errors.setdefault(name, []).append(reconstruction_errors(name, tensor))
    kappa = {}
    for name, chunks in errors.items():
        stacked = torch.stack(chunks)
        for eta in thresholds[name]:
            # Never exactly 0: the bound needs kappa in (0, 1); half a hit is the usual continuity correction.
            kappa[f"{name}@{eta:g}"] = max(float((stacked <= eta).double().mean()), 0.5 / stacked.numel())
    return kappa


def _composed_prv(noise_multiplier: float, sample_rate: float, steps: int, eps_error: float, delta_error: float):
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    check_prv_grid(accountant.history, eps_error=eps_error, delta_error=delta_error)
    # Opacus's own discretised, composed privacy-loss distribution (the one its epsilon comes from). At sample rate 1
    # it takes log(1 - q) = -inf on purpose, and NumPy would warn of a division by zero at every call.
    with np.errstate(divide="ignore"), opacus_accounting():
        return accountant._get_dprv(eps_error=eps_error, delta_error=delta_error)


def rero_bound_dpsgd(
    *, noise_multiplier: float, sample_rate: float, steps: int, kappa: float, eps_error: float = 0.01,
    delta_error: float = 1e-9,
) -> float:
    """ReRo bound of DP-SGD (Poisson-subsampled Gaussian, ``steps`` compositions) at baseline ``kappa``.

    When Opacus's PRV grid cannot be built (very small noise multipliers over many steps), the looser but still
    valid ``min_delta (e^eps(delta) kappa + delta)`` from the RDP accountant is returned instead.

    Raises:
        ValueError: for invalid arguments.
    """
    return rero_bounds_dpsgd(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps,
                             kappas={"": kappa}, eps_error=eps_error, delta_error=delta_error)[""]


def rero_bounds_dpsgd(
    *, noise_multiplier: float, sample_rate: float, steps: int, kappas: Mapping[str, float],
    eps_error: float = 0.01, delta_error: float = 1e-9,
) -> dict[str, float]:
    """:func:`rero_bound_dpsgd` at several baselines (one per success criterion, say) from one composed privacy loss:
    composing it and its privacy profile on a coarse grid are the bulk of the cost, and neither depends on kappa.

    Raises:
        ValueError: for invalid arguments.
    """
    for kappa in kappas.values():
        _check(kappa, noise_multiplier, steps, sample_rate)
    if all(kappa in (0.0, 1.0) for kappa in kappas.values()):
        return dict(kappas)  # no attacker beats a certain baseline, nor falls below it: nothing to compose
    try:
        dprv = _composed_prv(noise_multiplier, sample_rate, steps, eps_error, delta_error)
    except (MemoryError, ValueError, RuntimeError, OverflowError):
        # Tiny noise multipliers over many steps need an unmanageable PRV grid (hundreds of GiB). Any (eps, delta)
        # guarantee still bounds success by e^eps kappa + delta (Hayes et al. 2023): take RDP's best over delta.
        epsilons = _rdp_epsilons(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)

        def bound(kappa: float) -> float:
            return _rero_bound_from_epsilons(epsilons, kappa)
    else:
        def delta(eps: float) -> float:
            return min(1.0, max(0.0, float(dprv.compute_delta_estimate(eps))))

        grid = np.linspace(0.0, max(float(dprv.domain.ts.max()), 1e-6), 64)
        profile = np.array([delta(e) for e in grid])

        def bound(kappa: float) -> float:
            return _rero_bound_from_profile(delta, grid, profile, kappa)
    return {key: kappa if kappa in (0.0, 1.0) else bound(kappa) for key, kappa in kappas.items()}


def _rero_bound_from_profile(delta: Callable[[float], float], grid: np.ndarray, profile: np.ndarray,
                             kappa: float) -> float:
    """``inf_eps min(delta(eps) + e^eps kappa, 1 - e^-eps (1 - delta(eps) - kappa))``, from the privacy profile on
    ``grid`` and a bounded search around each term's least grid value."""
    def first(eps: float) -> float:
        return delta(eps) + math.exp(eps) * kappa

    def second(eps: float) -> float:
        return 1.0 - math.exp(-eps) * (1.0 - delta(eps) - kappa)

    # Both terms are convex in eps (delta is a convex, decreasing privacy profile): a bounded 1-D search suffices;
    # the coarse grid first guards against flat stretches.
    best = 1.0
    on_grid = (profile + np.exp(grid) * kappa, 1.0 - np.exp(-grid) * (1.0 - profile - kappa))
    for term, values in zip((first, second), on_grid):
        i = int(np.argmin(values))
        lo, hi = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
        result = minimize_scalar(term, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
        best = min(best, float(result.fun), float(values.min()))
    return float(min(1.0, max(kappa, best)))


def _rdp_epsilons(*, noise_multiplier: float, sample_rate: float, steps: int) -> dict[float, float]:
    """RDP's epsilon of the schedule at each delta that :func:`_rero_bound_from_epsilons` tries."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    with rdp_memoised():  # the orders' RDP once, not once per delta
        return {delta: float(accountant.get_epsilon(delta))
                for delta in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 5e-2, 0.1, 0.2)}


def _rero_bound_from_epsilons(epsilons: dict[float, float], kappa: float) -> float:
    best = 1.0
    for delta, eps in epsilons.items():
        if eps < 700:  # e^eps overflows beyond; the bound is 1 there anyway
            best = min(best, math.exp(eps) * kappa + delta)
    return float(max(kappa, best))


def history_epsilon(history: list[tuple[float, float, int]], *, delta: float, accountant: type | object | None = None,
                    max_work: int | None = None) -> tuple[float, str | None]:
    """Epsilon at ``delta`` of an accountant ``history`` (``(sigma, q, steps)`` triples), and a note where the answer
    came from another accountant than the one asked.

    A PRV accountant answers where its grid fits under :data:`PRV_MAX_GRID_POINTS` and its discretisation succeeds;
    elsewhere RDP's epsilon, an upper bound on the same mechanism's, answers, and the note says why.

    Args:
        history: the mechanisms composed, as Opacus's accountants keep them.
        delta: the delta of the epsilon.
        accountant: the Opacus accountant class to ask (default ``PRVAccountant``); a fresh one gets the history.
            Or an accountant (a training run's), whose class is asked the same way, or where that class needs
            arguments to be made (an accountant of one's own, registered with Opacus), a copy of it.
        max_work: PRV only: the most mechanisms times grid points to compose (see :data:`PRV_AUDIT_MAX_WORK`);
            RDP answers above it. None: no such cap.

    Raises:
        Whatever the accountant raises, for any accountant but PRV.
    """
    from opacus.accountants import PRVAccountant, RDPAccountant

    template = None if accountant is None or isinstance(accountant, type) else accountant
    accountant = type(template) if template is not None else accountant or PRVAccountant

    def epsilon(cls: type) -> float:
        try:
            answering = cls()
        except TypeError:
            if template is None or cls is not type(template):
                raise
            answering = copy.deepcopy(template)  # its own history is replaced below: it may still be growing
        answering.history = list(history)
        with opacus_accounting():
            return float(answering.get_epsilon(delta))

    if not issubclass(accountant, PRVAccountant):
        return epsilon(accountant), None
    try:
        check_prv_grid(history, delta_error=delta / 1000, max_work=max_work)  # get_epsilon's default delta_error
        return epsilon(accountant), None
    except Exception as exc:  # the grid's size, or its discretisation at tiny noise multipliers
        reason = str(exc) if isinstance(exc, PRVGridTooLarge) else f"the PRV accountant failed ({exc})"
        return epsilon(RDPAccountant), f"epsilon from the RDP accountant: {reason}"


def schedule_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> dict[str, float | None]:
    """Epsilon of the schedule from Opacus's RDP and PRV accountants (``None`` where one fails, and for PRV where its
    grid would exceed :data:`PRV_MAX_GRID_POINTS`)."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    history = [(noise_multiplier, sample_rate, steps)]
    result: dict[str, float | None] = {}
    for name, cls in (("rdp", RDPAccountant), ("prv", PRVAccountant)):
        try:
            eps, note = history_epsilon(history, delta=delta, accountant=cls)
            result[name] = None if note is not None else eps  # PRV's own figure, or none
        except Exception:
            result[name] = None
    return result


def noise_multiplier_for_epsilon(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                                 tolerance: float = 0.01) -> float:
    """The noise multiplier whose schedule reaches ``target_epsilon`` (to within ``tolerance``) at ``delta``.

    Opacus's ``get_noise_multiplier(accountant="prv")`` bisects from 20 down, and for a large target it asks the PRV
    accountant about noise multipliers whose grid fills any machine's memory. This bisection takes the PRV epsilon
    where its grid fits and RDP's (an upper bound, so the noise multiplier found is never too small) elsewhere.
    """
    def epsilon(sigma: float) -> float:
        return history_epsilon([(sigma, sample_rate, steps)], delta=delta)[0]

    low, high = 0.0, 10.0
    eps_high = math.inf
    while eps_high > target_epsilon:
        high *= 2
        if high > 1e6:
            raise ValueError(f"no noise multiplier up to 1e6 reaches epsilon {target_epsilon:g}: the budget is too low")
        eps_high = epsilon(high)
    while target_epsilon - eps_high > tolerance:
        middle = (low + high) / 2
        eps = epsilon(middle)
        if eps < target_epsilon:
            high, eps_high = middle, eps
        else:
            low = middle
    return high


@dataclass
class ScheduleBound:
    """A training schedule's privacy figures: epsilon (RDP, PRV), mu, and the ReRo bound at kappa."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon_rdp: float | None
    epsilon_prv: float | None
    mu_step: float
    kappa: float
    rero_bound: float | None

    @classmethod
    def compute(cls, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                kappa: float) -> "ScheduleBound":
        eps = schedule_epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta)
        try:
            bound = rero_bound_dpsgd(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps,
                                     kappa=kappa)
        except RuntimeError:
            bound = None
        return cls(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta,
                   epsilon_rdp=eps["rdp"], epsilon_prv=eps["prv"], mu_step=1.0 / noise_multiplier, kappa=kappa,
                   rero_bound=bound)
