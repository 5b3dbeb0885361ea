import pytest
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.analysis.gdp import compute_mu_poisson
from opacus.accountants.utils import get_noise_multiplier

from opacus_dmaudit import bounds
from opacus_dmaudit.bounds import (PRV_MAX_GRID_POINTS, ScheduleBound, history_epsilon, mu_gdp,
                                   noise_multiplier_for_epsilon,
                                   prv_grid_points, rero_bound_dpsgd, rero_bound_gdp, rero_bounds_dpsgd,
                                   schedule_epsilon)


@pytest.mark.parametrize("sigma, steps", [(1.0, 1), (0.5, 1), (1.0, 10), (2.0, 100)])
@pytest.mark.parametrize("kappa", [0.01, 0.1])
def test_numerical_bound_equals_closed_form_at_sample_rate_one(sigma, steps, kappa):
    numeric = rero_bound_dpsgd(noise_multiplier=sigma, sample_rate=1.0, steps=steps, kappa=kappa)
    assert numeric == pytest.approx(rero_bound_gdp(mu_gdp(sigma, steps), kappa), abs=1e-5)


def test_closed_form_known_value():
    # Phi(Phi^-1(0.1) + 1) = Phi(-1.2816 + 1) = Phi(-0.2816) = 0.3891
    assert rero_bound_gdp(1.0, 0.1) == pytest.approx(0.38914, abs=1e-4)
    assert rero_bound_gdp(0.0, 0.3) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="kappa"):
        rero_bound_gdp(1.0, 1.5)


@pytest.mark.parametrize("sigma, rate, kappa", [(1.0, 0.1, 0.01), (0.5, 0.2, 0.05), (2.0, 0.5, 0.1), (0.7, 0.02, 0.3)])
def test_one_subsampled_step_s_bound_is_the_exact_neyman_pearson_one(sigma, rate, kappa):
    # One Poisson-subsampled Gaussian step: P = N(0, 1) against Q = (1 - q) N(0, 1) + q N(1/sigma, 1). Their
    # likelihood ratio grows with x, so the most powerful test at type I error kappa rejects P above t = Phi^-1(1 -
    # kappa), and success <= 1 - beta = 1 - Q(x <= t) (Hayes et al. 2023). This order is the larger of the two.
    from scipy.stats import norm

    t = norm.ppf(1 - kappa)
    exact = 1 - ((1 - rate) * norm.cdf(t) + rate * norm.cdf(t - 1 / sigma))
    numeric = rero_bound_dpsgd(noise_multiplier=sigma, sample_rate=rate, steps=1, kappa=kappa)
    assert numeric == pytest.approx(exact, abs=2e-4)


@pytest.mark.parametrize("sigma, rate, steps", [(1.0, 0.01, 1000), (2.0, 0.004, 5000)])
def test_subsampled_bound_agrees_with_opacus_gdp_mu_in_its_valid_regime(sigma, rate, steps):
    # Opacus's GDP accountant uses the central-limit mu, valid for small sample rates and many steps.
    mu = compute_mu_poisson(steps=steps, noise_multiplier=sigma, sample_rate=rate)
    numeric = rero_bound_dpsgd(noise_multiplier=sigma, sample_rate=rate, steps=steps, kappa=0.1)
    assert numeric == pytest.approx(rero_bound_gdp(mu, 0.1), abs=0.005)


def test_bound_is_monotone_in_sigma_kappa_and_steps():
    def bound(sigma=1.0, kappa=0.05, steps=200):
        return rero_bound_dpsgd(noise_multiplier=sigma, sample_rate=0.02, steps=steps, kappa=kappa)

    base = bound()
    assert bound(sigma=2.0) < base < bound(sigma=0.7)
    assert bound(kappa=0.01) < base < bound(kappa=0.2)
    assert bound(steps=50) < base < bound(steps=800)
    assert 0.05 <= base <= 1.0


def test_bounds_at_several_kappas_compose_the_privacy_loss_once(prv_grids_built):
    # A sweep bounds each sigma at one kappa per success criterion; each bound composed the privacy loss and its
    # profile's grid anew, which is most of a bound's cost (4 kappas on the 2-core CPU: 5.6 s instead of 14.9 at
    # sigma 0.5, q = 64/60000, 9,375 steps). The figures are the same to the bit, in the order given.
    kappas = {"mse@0.01": 0.02, "ssim@0.5": 0.3, "never": 0.0, "always": 1.0}
    schedule = dict(noise_multiplier=1.0, sample_rate=0.02, steps=200)
    together = rero_bounds_dpsgd(**schedule, kappas=kappas)
    assert len(prv_grids_built) == 1
    assert list(together) == list(kappas)
    assert together == {key: rero_bound_dpsgd(**schedule, kappa=kappa) for key, kappa in kappas.items()}
    assert together["never"] == 0.0 and together["always"] == 1.0 and 0.3 < together["ssim@0.5"] < 1.0
    tiny = dict(noise_multiplier=0.05, sample_rate=64 / 60000, steps=9375)  # its grid would not fit: RDP's bound
    assert rero_bounds_dpsgd(**tiny, kappas=kappas) == {key: rero_bound_dpsgd(**tiny, kappa=kappa)
                                                        for key, kappa in kappas.items()}
    with pytest.raises(ValueError, match="kappa"):
        rero_bounds_dpsgd(**schedule, kappas={"fine": 0.1, "wrong": 1.5})


def test_schedule_bound_reports_both_accountants():
    figures = ScheduleBound.compute(noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=1e-5, kappa=0.05)
    assert figures.epsilon_rdp == pytest.approx(2.10, abs=0.01) and figures.epsilon_prv < figures.epsilon_rdp
    assert figures.mu_step == 1.0 and figures.kappa <= figures.rero_bound <= 1.0


def test_tiny_noise_falls_back_to_a_valid_rdp_bound():
    # sigma 0.05 over 9375 steps: Opacus's PRV grid would need hundreds of GiB; the bound must still come back.
    bound = rero_bound_dpsgd(noise_multiplier=0.05, sample_rate=64 / 60000, steps=9375, kappa=0.01)
    assert 0.01 <= bound <= 1.0


def test_a_prv_grid_that_would_not_fit_in_memory_is_never_built(prv_grids_built):
    # sigma 0.1 at q = 64/60000 over 10 epochs: Opacus's grid holds 7.7e8 points. Numpy reserves it without a
    # MemoryError and Linux then kills the process: a sweep at sigma 0.1 was killed on a 24 GB machine.
    schedule = dict(noise_multiplier=0.1, sample_rate=64 / 60000, steps=9375)
    assert prv_grid_points([(0.1, 64 / 60000, 9375)], delta_error=1e-9) > 50 * PRV_MAX_GRID_POINTS
    epsilons = schedule_epsilon(**schedule, delta=1e-5)
    rdp = RDPAccountant()
    rdp.history = [(0.1, 64 / 60000, 9375)]
    assert epsilons == {"rdp": rdp.get_epsilon(1e-5), "prv": None}
    assert rero_bound_dpsgd(**schedule, kappa=0.01) == 1.0
    assert not prv_grids_built
    # A schedule whose grid fits still gets Opacus's PRV figures.
    assert schedule_epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=1e-5)["prv"] is not None
    assert prv_grids_built and max(prv_grids_built) <= PRV_MAX_GRID_POINTS


def test_the_noise_multiplier_for_an_epsilon_is_opacus_s_where_the_prv_grid_fits(prv_grids_built, monkeypatch):
    schedule = dict(sample_rate=0.01, steps=500)
    assert noise_multiplier_for_epsilon(target_epsilon=3.0, delta=1e-5, **schedule) == \
        get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, accountant="prv", **schedule)
    # A large target sends the bisection down to noise multipliers whose PRV grid would not fit: RDP answers there,
    # and its epsilon is an upper bound, so the noise multiplier found still reaches the target.
    # (A smaller cap keeps the test quick: grids near the real one take a minute each.)
    monkeypatch.setattr(bounds, "PRV_MAX_GRID_POINTS", 100_000)
    prv_grids_built.clear()
    sigma = noise_multiplier_for_epsilon(target_epsilon=2000.0, delta=1e-5, sample_rate=0.25, steps=100)
    assert max(prv_grids_built) <= 100_000
    reached = schedule_epsilon(noise_multiplier=sigma, sample_rate=0.25, steps=100, delta=1e-5)
    assert (reached["prv"] or reached["rdp"]) <= 2000.0


def test_a_history_s_epsilon_is_its_accountant_s_and_rdp_s_where_the_prv_grid_would_not_fit(prv_grids_built):
    history = [(1.0, 0.01, 100), (0.8, 0.02, 50)]  # a noise schedule: two mechanisms composed
    for cls in (RDPAccountant, PRVAccountant, GaussianAccountant):
        own = cls()
        own.history = list(history)
        # PRV composes with numpy's FFT here (see below): bit for bit Opacus's with numpy 2, within 1e-10 with 1.26
        epsilon, note = history_epsilon(history, delta=1e-5, accountant=cls)
        assert epsilon == pytest.approx(own.get_epsilon(1e-5), rel=1e-9, abs=0) and note is None
    rdp = RDPAccountant()
    rdp.history = [(0.1, 64 / 60000, 9375)]
    epsilon, note = history_epsilon(rdp.history, delta=1e-5)  # 7.7e8 grid points: never built
    assert epsilon == rdp.get_epsilon(1e-5) and "RDP" in note and "7.32e+08 points" in note
    assert max(prv_grids_built) <= PRV_MAX_GRID_POINTS


def test_prv_epsilons_and_bounds_compose_with_numpy_s_fft_on_their_own_thread_only(monkeypatch):
    # scipy's FFT keeps plans of its last 16 sizes for good (some 50 bytes a grid point), and a run's PRV grid
    # changes size at every audit: the auditor's PRV computations go through numpy's FFT, which keeps none, and get
    # Opacus's own figures. Other threads (the user's training) keep scipy's.
    import threading

    import numpy
    import scipy.fft

    calls = []
    numpy_rfft = numpy.fft.rfft
    monkeypatch.setattr(numpy.fft, "rfft", lambda *args, **kwargs: calls.append(1) or numpy_rfft(*args, **kwargs))
    history = [(0.8, 0.01, 500)]
    plain = PRVAccountant()
    plain.history = list(history)
    assert not calls
    assert history_epsilon(history, delta=1e-5, accountant=PRVAccountant)[0] == pytest.approx(plain.get_epsilon(1e-5),
                                                                                              rel=1e-9, abs=0)
    assert calls
    calls.clear()
    rero_bound_dpsgd(noise_multiplier=0.8, sample_rate=0.01, steps=500, kappa=0.1)
    assert calls
    calls.clear()
    inside, done = threading.Event(), threading.Event()

    def hold():
        with bounds.fft_keeping_no_plans():
            inside.set()
            done.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    inside.wait(10)
    try:
        scipy.fft.rfft(numpy.ones(8))
    finally:
        done.set()
        holder.join()
    assert not calls  # the backend was the other thread's


def test_each_order_s_rdp_is_computed_once_per_sigma_and_rate(monkeypatch):
    # Opacus's PRV accountant sizes every grid from the RDP of each order, a pure-Python series (some 0.2 s per
    # (sigma, q) on a 2-core CPU, holding the GIL): an audit's epsilon asked for it four times (its grid's size is
    # checked first), every audit of a run anew, and the RDP fallback of the bound once per delta. Now Opacus's own
    # function answers once per (q, sigma, order), and the figures stay its accountants' to the bit.
    from opacus.accountants.analysis import rdp

    calls = []
    opacus_rdp = rdp._compute_rdp

    def counting(q, sigma, alpha):
        calls.append((q, sigma, alpha))
        return opacus_rdp(q, sigma, alpha)

    monkeypatch.setattr(rdp, "_compute_rdp", counting)
    sigma, rate = 0.913, 0.0173  # no other test's: the memo lasts as long as the process
    epsilon = history_epsilon([(sigma, rate, 40)], delta=1e-5)[0]
    assert calls and len(set(calls)) == len(calls)
    calls.clear()
    later = history_epsilon([(sigma, rate, 80)], delta=1e-5)[0]
    rdp_epsilon = history_epsilon([(sigma, rate, 80)], delta=1e-5, accountant=RDPAccountant)[0]
    bounds._rdp_epsilons(noise_multiplier=sigma, sample_rate=rate, steps=80)  # the bound's RDP fallback
    assert not calls and rdp._compute_rdp is counting  # Opacus's own (here, the test's) again after each block
    answers = {(PRVAccountant, 40): epsilon, (PRVAccountant, 80): later, (RDPAccountant, 80): rdp_epsilon}
    for (cls, steps), value in answers.items():
        plain = cls()
        plain.history = [(sigma, rate, steps)]
        assert value == pytest.approx(plain.get_epsilon(1e-5), rel=1e-9, abs=0)
    assert calls  # the plain accountants computed their own
    # Blocks nest (the audit worker's beside a sweep's, say): the memo stands in until the last one ends.
    with bounds.rdp_memoised():
        with bounds.rdp_memoised():
            pass
        assert rdp._compute_rdp is bounds._memoised_rdp
    assert rdp._compute_rdp is counting


def test_a_history_of_many_mechanisms_gets_rdp_s_epsilon_above_the_work_cap(prv_grids_built):
    # A noise schedule that changes sigma every epoch leaves one mechanism per epoch, and the PRV accountant composes
    # each on the whole grid: 50 epochs of a decaying sigma took 86 to 100 s per epsilon on the 2-core CPU. Above the
    # cap (here lowered, so the test stays short) RDP answers, with the reason, and no PRV grid is built.
    history = [(0.98**i, 256 / 60000, 234) for i in range(10)]  # 10 mechanisms on about 2e5 points
    assert prv_grid_points(history, delta_error=1e-8) * len(history) > 10**6
    epsilon, note = history_epsilon(history, delta=1e-5, max_work=10**6)
    plain = RDPAccountant()
    plain.history = list(history)
    assert epsilon == pytest.approx(plain.get_epsilon(1e-5), rel=1e-9) and not prv_grids_built
    assert "RDP" in note and "the 10 mechanisms" in note
    assert history_epsilon(history, delta=1e-5, max_work=10**8)[1] is None and len(prv_grids_built) == 1
