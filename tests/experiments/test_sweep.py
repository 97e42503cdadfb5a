"""experiments/sweep.py: learning rates x seeds in one compiled program, each member the run it stands for."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import control, runs, sweep
from polygrad import optim, validate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--num-seeds", "1", "--num-envs", "2", "--num-steps", "32", "--learner.num-minibatches", "2",
        "--total-steps", str(2 * 32 * 6)]


def test_the_learning_rate_lives_in_the_optimiser_state_and_can_be_vmapped():
    params = {"w": np.ones(3, np.float32)}
    tx = optim.make_optimizer(1e-3, 0.5, anneal_steps=10)
    state = tx.init(params)
    assert float(state.hyperparams["learning_rate"]) == np.float32(1e-3)
    states = jax.vmap(lambda lr: optim.set_learning_rate(state, lr))(np.array([1e-4, 1e-2], np.float32))
    grads = {"w": np.full(3, 2.0, np.float32)}
    updates, _ = jax.vmap(lambda s: tx.update(grads, s, params))(states)
    # Adam's first step is -lr * sign(g) (times the annealing factor 1 at step 0)
    np.testing.assert_allclose(updates["w"][:, 0], [-1e-4, -1e-2], rtol=1e-4)
    with pytest.raises(ValueError, match="no learning rate"):
        optim.set_learning_rate({"count": 0}, 1e-3)


def test_a_sweep_trains_every_value_and_seed_in_one_program_as_the_separate_runs_would(tmp_path):
    config = control.parse_config([*TINY, "--run-dir", str(tmp_path / "sweep")])
    rates = [1e-4, 3e-3]
    result = sweep.run(config, rates, log=lambda _: None)
    returns = result.metrics["episode_return"]
    assert returns.shape == (2, 1, config.num_updates) and result.final_returns.shape == (2, 1)
    grad_norms = result.metrics["grad_norm"]
    assert not np.allclose(grad_norms[0], grad_norms[1])  # distinct results per learning rate
    # a member is the run `experiments.control --learning-rate VALUE` (same key, same annealing)
    single = control.parse_config([*TINY, "--learning-rate", str(rates[1])])
    _, metrics = runs.train(control.make_program(single), runs.seed_keys(single.seed, 1))
    for name, values in metrics.items():
        np.testing.assert_allclose(result.metrics[name][1], np.asarray(values), rtol=2e-3, atol=2e-5,
                                   err_msg=name)
    folder = tmp_path / "sweep"
    with open(folder / sweep.RESULTS_FILE) as f:
        saved = json.load(f)
    assert [v["learning_rate"] for v in saved["values"]] == rates
    assert all(len(v["final_return_per_seed"]) == 1 for v in saved["values"])
    with open(folder / runs.CONFIG_FILE) as f:
        assert json.load(f)["learning_rates"] == rates
    assert (folder / sweep.FIGURE_FILE).stat().st_size > 0
    with np.load(folder / sweep.CURVES_FILE) as curves:
        assert curves["episode_return"].shape == (2, 1, config.num_updates)


def test_bad_sweeps_are_refused_in_one_line(tmp_path):
    with pytest.raises(validate.ConfigError, match="sweep.learning_rate must be > 0"):
        sweep.parse(["--sweep.learning-rate", "1e-3", "-1"])
    with pytest.raises(validate.ConfigError, match="repeat"):
        sweep.parse(["--sweep.learning-rate", "1e-3", "1e-3"])
    args = ["--sweep.learning-rate", "nan", "--run-dir", str(tmp_path / "x")]
    proc = subprocess.run([sys.executable, "-m", "experiments.sweep", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "learning_rate must be finite" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
