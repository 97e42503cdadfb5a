"""experiments/evaluate.py: a control run folder back as a config, a policy and an evaluation with a GIF."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from envs import control as control_envs
from experiments import control, evaluate, runs
from polygrad import validate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# CartPole PPO, 1 seed, 30k steps: the greedy policy balances far longer than a random one (~20 steps).
SHORT = ["--num-seeds", "1", "--total-steps", "30720", "--updates-per-chunk", "60", "--learning-rate", "1e-3"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("evaluate") / "cartpole")
    control.main([*SHORT, "--run-dir", run_dir])
    return run_dir


@pytest.mark.parametrize(("algo", "env", "overrides"), [
    ("ppo", "CartPole-v1", {}),
    ("ppo_kl", "Pendulum-v1", {"loss.kl_old.target": 0.02, "hidden_sizes": (32,)}),
    ("trpo", "Acrobot-v1", {"learner.step.max_kl": 0.02, "learner.step.line_search": "none"}),
    ("a2c", "MountainCar-v0", {"advantage.estimator": "n_step", "max_episode_steps": 50}),
])
def test_a_saved_config_is_rebuilt_exactly_with_its_part_types(algo, env, overrides):
    config = control.default_config(algo, env, **overrides)
    saved = json.loads(json.dumps(runs.config_to_dict(config)))
    rebuilt = evaluate.config_from_dict(saved)
    assert rebuilt == config and hash(rebuilt) == hash(config)
    assert type(rebuilt.advantage) is type(config.advantage) and type(rebuilt.learner) is type(config.learner)


def test_an_unknown_part_type_or_field_is_refused():
    saved = runs.config_to_dict(control.default_config("ppo"))
    with pytest.raises(validate.ConfigError, match="unknown part type 'Nope'"):
        evaluate.config_from_dict({**saved, "loss": {**saved["loss"], "gate": {"type": "Nope"}}})
    with pytest.raises(validate.ConfigError, match="lacks"):
        evaluate.config_from_dict({**saved, "colour": "red"})


@pytest.mark.slow  # trains CartPole for 30k steps (about a minute)
def test_evaluate_writes_eval_json_and_a_gif_of_a_balancing_greedy_policy(trained_run):
    result = evaluate.evaluate(trained_run, episodes=8, log=lambda _: None)
    with open(os.path.join(trained_run, evaluate.EVAL_FILE)) as f:
        saved = json.load(f)
    assert saved["greedy"]["mean_return"] == result["greedy"]["mean_return"]
    greedy, sampled = np.asarray(saved["greedy"]["returns"]), np.asarray(saved["sampled"]["returns"])
    assert greedy.shape == sampled.shape == (1, 8)
    assert greedy.mean() > 100, greedy  # a random CartPole policy lasts about 22 steps
    assert np.all((greedy >= 1) & (greedy <= 500)) and np.all((sampled >= 1) & (sampled <= 500))
    assert saved["greedy"]["mean_length"] == greedy.mean()  # CartPole: reward 1 per step
    with Image.open(os.path.join(trained_run, evaluate.GIF_FILE)) as gif:
        assert gif.n_frames == saved["gif"]["frames"] > 1
        assert gif.size == (evaluate.WIDTH, evaluate.HEIGHT)
    assert saved["gif"]["episode_length"] == int(greedy[0, 0])


@pytest.mark.slow
def test_load_policy_in_three_lines_gives_a_pure_act(trained_run):
    params, act = evaluate.load_policy(trained_run, seed=0)
    obs = np.zeros((5, 4), np.float32)
    greedy = jax.jit(lambda o, k: act(o, k, greedy=True))(obs, jax.random.PRNGKey(0))
    assert greedy.shape == (5,) and np.all(greedy == greedy[0])  # the mode is a function of obs alone
    np.testing.assert_array_equal(act(obs, jax.random.PRNGKey(1), greedy=True), greedy)
    samples = jax.vmap(lambda k: act(obs[0], k))(jax.random.split(jax.random.PRNGKey(0), 200))
    assert set(np.unique(samples)) <= {0, 1}
    # the parameters are the checkpoint's own
    config = evaluate.load_config(trained_run)
    template = jax.eval_shape(runs.vmap_seeds(control.make_program(config).init), runs.seed_keys(0, 1))
    stored = runs.load_checkpoint(trained_run, template).carry.learner.params
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b[0]), params, stored)
    with pytest.raises(validate.ConfigError, match="seed"):
        evaluate.load_policy(trained_run, seed=1)


def test_every_classic_control_environment_is_drawn():
    for name in control_envs.ENV_NAMES:
        env = control_envs.VecEnv(name, 1)
        _, state = env.reset(jax.random.PRNGKey(0))
        states = jax.tree.map(lambda x: np.repeat(np.asarray(x), 3, axis=0), state)  # [3]: three frames
        frames = evaluate.render_episode(name, states)
        assert len(frames) == 3 and frames[0].size == (evaluate.WIDTH, evaluate.HEIGHT)
        assert len(frames[0].getcolors(1 << 16)) > 2, name  # something drawn on the white canvas


def test_the_command_line_refuses_a_folder_without_a_run_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.evaluate", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no config.json" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_run_that_normalised_observations_is_evaluated_with_its_frozen_statistics_and_drawn(tmp_path):
    # no training: a checkpoint of the initial carry, with made-up normaliser statistics
    config = control.default_config("ppo", "Pendulum-v1", num_seeds=2, num_envs=2, num_steps=8,
                                    total_steps=32, hidden_sizes=(8,), **{"learner.num_minibatches": 2})
    assert config.normalize_observations
    run_dir = str(tmp_path / "pendulum")
    runs.prepare_run_dir(run_dir, runs.config_to_dict(config))
    carry = jax.jit(runs.vmap_seeds(control.make_program(config).init))(runs.seed_keys(0, 2))
    stats = evaluate._find_obs_stats(carry.env_state)
    mean, var = np.array([[0.5, -0.5, 1.0], [0.1, 0.2, 0.3]], np.float32), np.full((2, 3), 4.0, np.float32)
    carry = _replace_obs_stats(carry, stats.replace(mean=mean, var=var))
    runs.save_checkpoint(run_dir, carry, 0)
    run = evaluate.load_run(run_dir)
    np.testing.assert_array_equal(run.obs_stats.mean, mean)
    params, act = evaluate.load_policy(run_dir, seed=1)
    obs = np.array([1.1, 2.2, 1.3], np.float32)
    normalised = (obs - mean[1]) / np.sqrt(var[1] + 1e-8)
    dist = run.network.apply(params, normalised, method=evaluate.networks.ActorCritic.policy)
    np.testing.assert_allclose(act(obs, jax.random.PRNGKey(0), greedy=True), dist.mode(), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b[1]), params, carry.learner.params)
    result = evaluate.evaluate(run_dir, episodes=2, render_seed=1, log=lambda _: None)
    with open(os.path.join(run_dir, evaluate.EVAL_FILE)) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    assert np.asarray(result["greedy"]["returns"]).shape == (2, 2)
    assert result["greedy"]["mean_length"] == result["sampled"]["mean_length"] == 200  # the time limit
    assert np.all(np.asarray(result["sampled"]["returns"]) < 0)  # Pendulum's rewards are <= 0
    with Image.open(os.path.join(run_dir, evaluate.GIF_FILE)) as gif:
        assert gif.n_frames == result["gif"]["frames"] == 200 and result["gif"]["seed"] == 1


def _replace_obs_stats(state, stats):
    """`state` (a carry or a wrapped environment state) with its NormalizeObservation statistics replaced."""
    if isinstance(state, control_envs.NormalizeObservationState):
        return state.replace(obs_stats=stats)
    return state.replace(env_state=_replace_obs_stats(state.env_state, stats))


def test_a_config_saved_before_a_field_was_added_is_rebuilt_with_its_default():
    saved = runs.config_to_dict(control.default_config("ppo"))
    del saved["rollout_unroll"]
    assert evaluate.config_from_dict(saved) == control.default_config("ppo")
    with pytest.raises(validate.ConfigError, match="hidden_sizes"):  # the config's own checks run
        evaluate.config_from_dict({**saved, "hidden_sizes": [64, "x"]})
