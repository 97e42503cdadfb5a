"""experiments.kl_placement: the exact bias table on a small vocabulary, and its run folder."""

import os

import pytest

from experiments import kl_placement


@pytest.mark.slow  # about a minute of XLA compilation for 36 small configurations
def test_bias_table_separates_unbiased_from_biased_configurations(tmp_path):
    config = kl_placement.KLPlacementConfig(out=str(tmp_path / "kl"), vocab=3, scales=(0.5,))
    results = kl_placement.run(config, log=lambda *_: None)
    token, off, seq = (results["settings"][s] for s in ("token, on-policy", "token, off-policy", "sequence"))
    for label in ("k2 in loss", "k3+ in loss", "k3 * r in loss", "k1 in reward"):
        assert token[label][0.5] < 1e-10, label
    assert off["k3 * r in loss"][0.5] < 1e-10 and off["k2 in loss"][0.5] > 1e-3
    assert seq["k1 in reward"][0.5] < 1e-10 and seq["k2 in loss"][0.5] > 1e-3
    assert abs(token["k1 in loss"][0.5] - 1.0) < 1e-10  # no expected force at all
    for name in ("table.md", "table.csv", "numbers.json", "config.json", "kl_placement.png"):
        assert os.path.exists(os.path.join(config.out, name))
