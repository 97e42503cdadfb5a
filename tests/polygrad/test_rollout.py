"""Rollouts: trajectory layout, and bootstrapping from the TRUE successor at episode ends.

A counter environment with known dynamics checks every field exactly; gymnax CartPole and Pendulum with
a short time limit (which binds) check the same invariants on real environments.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs import control as control_envs
from polygrad import returns
from polygrad.control.networks import ActorCritic
from polygrad.control.rollout import rollout
from polygrad.estimators.distributions import Categorical

# --- a counter environment: env 0 terminates after 3 steps, env 1 is truncated after 4 -----------


def counter_step(key, t, action):
    del key
    env_id = jnp.arange(2)
    t1 = t + 1
    terminated = (env_id == 0) & (t1 == 3)
    truncated = (env_id == 1) & (t1 == 4)
    done = terminated | truncated
    t_next = jnp.where(done, 0, t1)
    obs = jnp.stack([t_next, env_id], -1).astype(jnp.float32)
    final = jnp.stack([t1, env_id], -1).astype(jnp.float32)
    return obs, t_next, t1.astype(jnp.float32), terminated, truncated, {"final_observation": final}


def counter_value(obs):
    return 10.0 * obs[..., 0] + obs[..., 1]


def uniform_policy(obs):
    return Categorical(jnp.zeros((obs.shape[0], 2)))


def run_counter(num_steps=8, maybe_jit=lambda f: f):
    start_obs = jnp.array([[0.0, 0.0], [0.0, 1.0]])
    fn = maybe_jit(
        lambda key: rollout(
            uniform_policy, counter_value, counter_step, jnp.zeros(2, jnp.int32), start_obs, key, num_steps
        )
    )
    return fn(jax.random.PRNGKey(0))


def test_counter_trajectory_fields_exactly(maybe_jit):
    traj, t_last, obs_last, infos = run_counter(maybe_jit=maybe_jit)
    t0 = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    t1 = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    np.testing.assert_array_equal(traj.obs[:, :, 0], np.stack([t0, t1], -1))
    np.testing.assert_array_equal(traj.rewards, np.stack([t0 + 1, t1 + 1], -1))
    np.testing.assert_array_equal(traj.terminated[:, 0], [0, 0, 1, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(traj.truncated[:, 1], [0, 0, 0, 1, 0, 0, 0, 1])
    assert traj.terminated[:, 1].sum() == 0 and traj.truncated[:, 0].sum() == 0
    np.testing.assert_array_equal(traj.values, counter_value(traj.obs))
    # The true successor: at episode ends the final observation (t = 3 resp. 4), never the reset one.
    np.testing.assert_array_equal(traj.next_values[:, 0], 10.0 * np.array([1, 2, 3, 1, 2, 3, 1, 2]))
    np.testing.assert_array_equal(traj.next_values[:, 1], 10.0 * np.array([1, 2, 3, 4, 1, 2, 3, 4]) + 1)
    np.testing.assert_allclose(traj.log_probs, np.log(0.5), rtol=1e-6)
    np.testing.assert_array_equal(t_last, [2, 0])
    np.testing.assert_array_equal(obs_last[:, 0], [2, 0])
    assert infos == {}


def test_truncated_step_bootstraps_and_terminated_does_not():
    traj, *_ = run_counter()
    gamma = 0.9
    adv = returns.gae(
        traj.rewards, traj.values, traj.next_values, traj.terminated, traj.truncated, gamma, 1.0
    )
    # Independent Monte-Carlo computation, episode by episode, lambda = 1.
    # env 1, first episode t = 0..3 with rewards 1..4, truncated: bootstrap gamma * V(t=4) = gamma * 41.
    g = 41.0
    expected = []
    for r in [4, 3, 2, 1]:
        g = r + gamma * g
        expected.append(g)
    values = 10.0 * np.arange(4) + 1
    np.testing.assert_allclose(adv[:4, 1], np.array(expected[::-1]) - values, rtol=1e-5)
    # env 0, first episode t = 0..2 with rewards 1..3, terminated: no bootstrap.
    g, expected = 0.0, []
    for r in [3, 2, 1]:
        g = r + gamma * g
        expected.append(g)
    np.testing.assert_allclose(adv[:3, 0], np.array(expected[::-1]) - 10.0 * np.arange(3), rtol=1e-5)


@pytest.mark.parametrize(("name", "limit"), [("CartPole-v1", 12), ("Pendulum-v1", 7)])
def test_gymnax_time_limit_bootstraps_from_final_observation(name, limit):
    env = control_envs.make_env(name, 3, max_steps_in_episode=limit)
    net = ActorCritic(action_dim=env.action_dim, discrete=env.discrete)
    obs, state = env.reset(jax.random.PRNGKey(0))
    params = net.init(jax.random.PRNGKey(1), obs)

    def value_fn(o):
        return net.apply(params, o, method=ActorCritic.value)

    traj, _, _, infos = jax.jit(
        lambda s, o, k: rollout(
            lambda x: net.apply(params, x, method=ActorCritic.policy), value_fn, env.step, s, o, k, 40
        )
    )(state, obs, jax.random.PRNGKey(2))
    truncated = np.asarray(traj.truncated, bool)
    done = truncated | np.asarray(traj.terminated, bool)
    assert truncated.sum() >= 3, "the time limit must bind in this test"
    assert not np.any(truncated & np.asarray(traj.terminated, bool))
    # Truncation happens exactly when an episode reaches the time limit.
    np.testing.assert_array_equal(np.asarray(infos["episode_length"])[truncated], limit)
    assert np.all(np.asarray(infos["episode_length"])[np.asarray(traj.terminated, bool)] < limit)
    values, next_values = np.asarray(traj.values), np.asarray(traj.next_values)
    # Inside an episode the successor is the next observation.
    np.testing.assert_allclose(next_values[:-1][~done[:-1]], values[1:][~done[:-1]], rtol=1e-5, atol=1e-6)
    # At a truncation, the successor is the final observation, not the reset observation of the next row.
    t_idx, b_idx = np.nonzero(truncated[:-1])
    assert np.all(np.abs(next_values[t_idx, b_idx] - values[t_idx + 1, b_idx]) > 1e-6)
    if name == "Pendulum-v1":  # never terminates: every episode end is a truncation
        assert traj.terminated.sum() == 0
