"""experiments/grpo_claims.py at a small size: the signs of each claim, the exact checks, the run folder."""

import json

import numpy as np
import pytest

from experiments import grpo_claims

SMALL = dict(
    length_max_length=3, length_group_size=3, eos_points=5, mc_groups=0,
    difficulty_group_sizes=(4, 8), difficulty_points=21, difficulty_check_group_size=4,
    kl_max_length=3, kl_group_size=3, kl_points=4,
    ratio_max_length=4, gate_epochs=8, zero_signal_group_sizes=(2, 4),
)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("claims")
    printed = []
    config = grpo_claims.ClaimsConfig(out=str(out), figures="", **SMALL)
    numbers = grpo_claims.run(config, log=printed.append)
    return out, "\n".join(printed), numbers


def test_writes_figures_numbers_and_summary(small_run):
    out, printed, _ = small_run
    for name in grpo_claims.FIGURES.values():
        assert (out / name).stat().st_size > 10_000
    saved = json.loads((out / "numbers.json").read_text())
    assert set(saved) >= {"length_bias", "difficulty_bias", "kl_estimators", "ratio_variance", "gates",
                          "zero_signal", "timings_s"}
    assert (out / "summary.txt").read_text().strip() in printed
    assert json.loads((out / "config.json").read_text())["length_max_length"] == 3


def test_length_bias_signs(small_run):
    """GRPO's token mean lengthens incorrect and shortens correct responses at every length distribution;
    Dr. GRPO's constant normaliser and DAPO's many-prompt token mean leave lengths alone; DAPO with one
    group per batch drifts less than GRPO per unit gain in J."""
    length = small_run[2]["length_bias"]["losses"]
    grpo = length["GRPO"]
    assert np.all(grpo["J"] > 0)
    scale = np.max(np.abs(grpo["length_incorrect_per_J"]))
    assert scale > 0.01
    assert np.all(grpo["length_incorrect_per_J"] > 0.01 * scale)
    assert np.all(grpo["length_correct_per_J"] < -0.01 * scale)
    for name in ("Dr. GRPO", "DAPO, many prompts", "GRPO with a constant normaliser"):
        assert np.max(np.abs(length[name]["length_incorrect_per_J"])) < 1e-3 * scale, name
        assert np.max(np.abs(length[name]["length_correct_per_J"])) < 1e-3 * scale, name
    dapo = length["DAPO, one group per batch"]["length_incorrect_per_J"]
    assert np.all(dapo > 0) and np.all(dapo < grpo["length_incorrect_per_J"])


def test_difficulty_bias(small_run):
    diff = small_run[2]["difficulty_bias"]
    assert max(float(c["max_abs_error"]) for c in diff["check"].values()) < 1e-5  # closed form = enumeration
    p = diff["p"]
    edge, half = int(np.argmin(np.abs(p - 0.05))), int(np.argmin(np.abs(p - 0.5)))
    for G in (4, 8):
        std = diff["curves"][f"std-normalised (GRPO), G={G}"]["weight_relative_to_half"]
        centred = diff["curves"][f"mean-centred (Dr. GRPO), G={G}"]["weight"]
        assert std[edge] > 1.02 and std[half] == pytest.approx(1.0)
        np.testing.assert_allclose(centred, (G - 1) / G, rtol=1e-5)
    assert (diff["curves"]["std-normalised (GRPO), G=8"]["weight_relative_to_half"][edge]
            > diff["curves"]["std-normalised (GRPO), G=4"]["weight_relative_to_half"][edge])


def test_kl_estimators(small_run):
    kl = small_run[2]["kl_estimators"]["options"]
    assert np.max(kl["k1 in the reward (RLOO)"]["relative_error_vs_exact"]) < 1e-4  # unbiased
    assert np.max(kl["k1 in the loss"]["norm_ratio"]) < 1e-4  # zero expected gradient
    for name in ("k2 in the loss", "k3_value_k2_grad in the loss"):
        assert np.max(kl[name]["relative_error_vs_state-frozen forward KL"]) < 1e-4
        assert kl[name]["relative_error_vs_exact"][-1] > 0.05  # biased for the sequence KL
    assert np.max(kl["k3 in the loss"]["relative_error_vs_state-frozen reverse KL"]) < 1e-4
    k3 = kl["k3 in the loss"]["relative_error_vs_exact"]
    assert k3[-1] > k3[0] and k3[-1] > kl["k2 in the loss"]["relative_error_vs_exact"][-1]
    centred = kl["k1 in the reward (Dr. GRPO, token sum)"]
    np.testing.assert_allclose(centred["cosine_vs_exact"], 1.0, atol=1e-5)  # (G - 1) / G times grad KL
    np.testing.assert_allclose(centred["norm_ratio"], 2 / 3, rtol=1e-4)


def test_ratio_variance(small_run):
    ratio = small_run[2]["ratio_variance"]["losses"]
    token, sequence = ratio["token ratio (GRPO), no clip"], ratio["sequence ratio (GSPO), no clip"]
    product = ratio["product ratio (exact IS), no clip"]["variance_ratio"]
    assert np.all(sequence["variance_ratio"] < token["variance_ratio"])
    assert np.all(np.diff(product[-1]) > 0) and product[-1, -1] > token["variance_ratio"][-1, -1]
    np.testing.assert_allclose(token["variance_on_policy"], sequence["variance_on_policy"])


def test_gates(small_run):
    gates = small_run[2]["gates"]["losses"]
    rare_correct = {name: d["first_token_probs"][-1, 0, grpo_claims.A] for name, d in gates.items()}
    entropy = {name: d["first_token_entropy"][-1, 1] for name, d in gates.items()}
    assert rare_correct["no gate"] > rare_correct["SAPO tau_neg=1.05"]
    assert rare_correct["SAPO tau_neg=1.05"] > rare_correct["clip-higher 0.2/0.28 (DAPO)"]
    assert rare_correct["clip-higher 0.2/0.28 (DAPO)"] > rare_correct["hard clip 0.2 (GRPO)"]
    assert entropy["SAPO tau_neg=5"] > entropy["SAPO tau_neg=2"] > entropy["SAPO tau_neg=1.05"]
    assert entropy["SAPO tau_neg=1.05"] > entropy["no gate"]


def test_zero_signal(small_run):
    zero = small_run[2]["zero_signal"]
    assert zero["max_abs_error_enumerated"] < 1e-5
    assert zero["dynamic_sampling_direction"]["no KL"]["cosine"] > 1 - 1e-5
    assert zero["dynamic_sampling_direction"]["no KL"]["norm_ratio"] == pytest.approx(1.0, rel=1e-5)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="staleness"):
        grpo_claims.ClaimsConfig(staleness=(0.0,))
