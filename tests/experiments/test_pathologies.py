"""experiments/pathologies.py on its default config: prints the seed's numbers and writes the run folder."""

import json

import numpy as np
import pytest

from experiments import pathologies


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pathologies")
    printed = []
    numbers = pathologies.run(pathologies.PathologiesConfig(out=str(out)), log=printed.append)
    return out, "\n".join(printed), numbers


def test_prints_the_seed_numbers(default_run):
    _, printed, _ = default_run
    assert "J(pi)  = 8.091e-05   (seed: 8.091e-05)" in printed
    assert "J(pi') = -90   (seed: -90)" in printed
    assert "L - J(pi) = 0.79994   (seed: 0.79994)" in printed
    assert "L + DSP = -90 = J(pi')" in printed
    assert "q^2/p + (1-q)^2/(1-p) = 1.64" in printed
    assert "bound (eq. 60) <= true J at every alpha: True" in printed
    assert len(printed.splitlines()) <= 30  # one screen


def test_writes_figures_summary_and_numbers(default_run):
    out, printed, _ = default_run
    for name in pathologies.FIGURES.values():
        assert (out / name).stat().st_size > 10_000
    assert (out / "summary.txt").read_text().strip() in printed
    saved = json.loads((out / "numbers.json").read_text())
    assert saved["example1"]["J_pi_new"] == pytest.approx(-90.0)
    assert json.loads((out / "config.json").read_text())["eta"] == 1e-4


def test_numbers_agree_with_the_closed_forms(default_run):
    _, _, numbers = default_run
    ex1, sweep, cpi, ex2 = (numbers[k] for k in ("example1", "eta_sweep", "cpi", "example2"))
    np.testing.assert_allclose(ex1["surrogate_plus_dsp"], ex1["J_pi_new"], rtol=1e-6)
    np.testing.assert_allclose(ex1["performance_difference"], ex1["true_change"], rtol=1e-6)
    # The grid's last wrong-sign eta lies just below the closed-form sign change.
    flip = sweep["seed_eta_sign_flip"]
    assert flip / 1.1 < sweep["largest_eta_with_wrong_sign"] < flip
    assert cpi["J_pi"] < cpi["bound_alpha_star"] <= cpi["J_alpha_star"]
    assert cpi["fixed_candidate_monotone"] and cpi["greedy_candidate_monotone"]
    assert cpi["fixed_candidate_returns"][-1] > cpi["J_pi"] > cpi["J_full_step"] == pytest.approx(-90.0)
    # Monte Carlo agrees with 1.64^H - 1 while the sample still sees the large weights (H <= 8) ...
    small = slice(0, 8)
    np.testing.assert_allclose(ex2["weight_variance"][small], ex2["closed_form_variance"][small], rtol=0.15)
    np.testing.assert_allclose(ex2["weight_mean"][small], 1.0, atol=0.05)
    ess, closed_form_ess = ex2["ess_fraction_all"][small], ex2["closed_form_ess_fraction"][small]
    np.testing.assert_allclose(ess, closed_form_ess, rtol=0.15)
    # ... and IS stays unbiased with the predicted spread; SNIS is exact because G_0 is constant.
    np.testing.assert_allclose(ex2["ordinary_std"][small], ex2["closed_form_ordinary_std"][small], rtol=0.15)
    np.testing.assert_allclose(ex2["ordinary_mean"][small], ex2["true_value"][small], rtol=0.05)
    np.testing.assert_allclose(ex2["self_normalised_mean"], ex2["true_value"], rtol=1e-5)
    assert np.all(np.diff(ex2["closed_form_ess_fraction"]) < 0)


def test_bad_config_is_a_clear_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        pathologies.main(["--eta", "1.5"])
    assert exit_info.value.code == 2
    assert "eta must lie in (0, 1); got 1.5" in capsys.readouterr().err
