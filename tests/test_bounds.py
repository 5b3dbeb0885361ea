import pytest
from opacus.accountants.analysis.gdp import compute_mu_poisson

from opacus_dmaudit.bounds import ScheduleBound, mu_gdp, rero_bound_dpsgd, rero_bound_gdp


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


def test_schedule_bound_reports_both_accountants():
    figures = ScheduleBound.compute(noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=1e-5, kappa=0.05)
    assert figures.epsilon_rdp == pytest.approx(2.10, abs=0.01) and figures.epsilon_prv < figures.epsilon_rdp
    assert figures.mu_step == 1.0 and figures.kappa <= figures.rero_bound <= 1.0


def test_tiny_noise_falls_back_to_a_valid_rdp_bound():
    # sigma 0.05 over 9375 steps: Opacus's PRV grid would need hundreds of GiB; the bound must still come back.
    bound = rero_bound_dpsgd(noise_multiplier=0.05, sample_rate=64 / 60000, steps=9375, kappa=0.01)
    assert 0.01 <= bound <= 1.0
