"""Classic-control adapters: interface, flags, episode statistics and normalisation statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs import control as control_envs


def _random_actions(env, key):
    if env.discrete:
        return jax.random.randint(key, (env.num_envs,), 0, env.action_dim)
    return 3.0 * jax.random.normal(key, (env.num_envs, env.action_dim))


def _run(env, num_steps, seed=0):
    """Random-action rollout; returns the stacked (obs, reward, terminated, truncated, info) and the state."""

    def step(carry, key):
        state, obs = carry
        k_act, k_env = jax.random.split(key)
        next_obs, state, reward, terminated, truncated, info = env.step(
            k_env, state, _random_actions(env, k_act)
        )
        return (state, next_obs), (obs, reward, terminated, truncated, info)

    obs, state = env.reset(jax.random.PRNGKey(seed))
    (state, _), out = jax.jit(
        lambda s, o: jax.lax.scan(step, (s, o), jax.random.split(jax.random.PRNGKey(seed + 1), num_steps))
    )(state, obs)
    return out, state


@pytest.mark.parametrize("name", control_envs.ENV_NAMES)
def test_interface_shapes_and_flags(name):
    env = control_envs.make_env(name, 3, max_steps_in_episode=10)
    (obs, reward, terminated, truncated, info), _ = _run(env, 45)
    assert obs.shape == (45, 3, *env.obs_shape) and obs.dtype == jnp.float32
    assert reward.shape == (45, 3) and reward.dtype == jnp.float32
    assert terminated.dtype == jnp.bool_ and truncated.dtype == jnp.bool_
    assert info["final_observation"].shape == (45, 3, *env.obs_shape)
    assert not np.any(terminated & truncated)
    assert np.all(np.isfinite(obs)) and np.all(np.isfinite(reward))
    # The time limit binds: no episode is longer than 10 steps and truncation happens exactly at 10.
    lengths = np.asarray(info["episode_length"])
    assert lengths.max() <= 10
    np.testing.assert_array_equal(lengths[np.asarray(truncated)], 10)
    assert truncated.sum() >= 3


def test_unknown_env_and_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="unknown environment"):
        control_envs.make_env("CartPole-v0", 2)
    with pytest.raises(ValueError, match="no environment parameter"):
        control_envs.make_env("CartPole-v1", 2, max_steps=3)
    with pytest.raises(ValueError, match="num_envs"):
        control_envs.make_env("CartPole-v1", 0)


def test_continuous_actions_are_clipped_to_bounds():
    env = control_envs.make_env("MountainCarContinuous-v0", 2)
    obs, state = env.reset(jax.random.PRNGKey(0))
    # gymnax's reward -0.1 a^2 uses the raw action: with clipping, |a| = 100 costs as much as |a| = 1.
    _, _, reward, *_ = env.step(jax.random.PRNGKey(1), state, jnp.array([[100.0], [-100.0]]))
    np.testing.assert_allclose(reward, -0.1, rtol=1e-6)


def test_episode_statistics_cartpole_return_equals_length():
    env = control_envs.make_env("CartPole-v1", 4)
    (obs, reward, terminated, truncated, info), state = _run(env, 200)
    done = np.asarray(info["episode_done"])
    assert done.sum() > 10
    np.testing.assert_array_equal(done, np.asarray(terminated | truncated))
    np.testing.assert_allclose(
        np.asarray(info["episode_return"])[done], np.asarray(info["episode_length"])[done]
    )
    # Per-episode returns equal the sum of rewards since the previous episode end of that environment.
    rewards = np.asarray(reward)
    for b in range(4):
        ends = np.nonzero(done[:, b])[0]
        starts = np.concatenate([[0], ends[:-1] + 1])
        for s, e in zip(starts, ends, strict=True):
            np.testing.assert_allclose(info["episode_return"][e, b], rewards[s : e + 1, b].sum(), rtol=1e-6)
    # recent_episode_return: mean over environments of each one's last finished episode.
    last = [np.asarray(info["episode_return"])[np.nonzero(done[:, b])[0][-1], b] for b in range(4)]
    np.testing.assert_allclose(control_envs.recent_episode_return(state), np.mean(last), rtol=1e-6)


def test_recent_episode_return_is_nan_before_any_episode_ends():
    env = control_envs.make_env("Pendulum-v1", 2, normalize_observations=True, normalize_rewards=True)
    _, state = _run(env, 5)
    assert np.isnan(control_envs.recent_episode_return(state))
    _, state = _run(env, 201)
    assert np.isfinite(control_envs.recent_episode_return(state))


def test_running_mean_std_matches_numpy_on_the_whole_stream():
    batches = jax.random.normal(jax.random.PRNGKey(0), (6, 5, 3)) * jnp.array([1.0, 3.0, 0.1]) + 2.0
    stats = control_envs.RunningMeanStd.create((3,))
    for batch in batches:
        stats = stats.update(batch)
    flat = np.asarray(batches).reshape(-1, 3)
    np.testing.assert_allclose(stats.mean, flat.mean(0), rtol=1e-4)
    # The initial pseudo-count 1e-4 (mean 0, var 1) leaves a bias of order 1e-4 / 30.
    np.testing.assert_allclose(stats.var, flat.var(0), rtol=1e-3, atol=1e-4)


def test_observation_normalisation_uses_statistics_in_the_state():
    env = control_envs.make_env("Pendulum-v1", 8, normalize_observations=True)
    raw = control_envs.make_env("Pendulum-v1", 8)
    (obs, *_, info), state = _run(env, 300)
    (raw_obs, *_, raw_info), _ = _run(raw, 300)
    # Same keys, same dynamics: the normalised stream is the raw stream standardised by running stats.
    stats = state.obs_stats
    all_raw = np.asarray(raw_obs).reshape(-1, 3)
    np.testing.assert_allclose(stats.mean, all_raw.mean(0), atol=0.05)  # the stats saw the same stream
    z = (np.asarray(raw_info["final_observation"][-1]) - np.asarray(stats.mean)) / np.sqrt(
        np.asarray(stats.var) + 1e-8
    )
    np.testing.assert_allclose(info["final_observation"][-1], np.clip(z, -10, 10), rtol=1e-4, atol=1e-5)
    assert abs(float(np.asarray(obs[100:]).mean())) < 0.3 and 0.5 < float(np.asarray(obs[100:]).std()) < 1.5


def test_reward_normalisation_scales_by_return_std():
    env = control_envs.make_env("Pendulum-v1", 8, normalize_rewards=True, gamma=0.9)
    raw = control_envs.make_env("Pendulum-v1", 8)
    (_, reward, *_), state = _run(env, 300)
    (_, raw_reward, *_), _ = _run(raw, 300)
    scale = np.asarray(raw_reward[-1]) / np.asarray(reward[-1])
    np.testing.assert_allclose(scale, np.sqrt(float(state.return_stats.var) + 1e-8), rtol=1e-4)
    # Pendulum costs up to ~16 per step; with gamma 0.9 the discounted return has std of a few units.
    assert 0.5 < scale[0] < 100


def test_state_is_a_checkpointable_pytree():
    env = control_envs.make_env("CartPole-v1", 2, normalize_observations=True, normalize_rewards=True)
    _, state = _run(env, 10)
    leaves, treedef = jax.tree.flatten(state)
    restored = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
    assert all(isinstance(x, jax.Array | np.ndarray) for x in leaves)
    assert control_envs.find_episode_statistics(restored).episodes_finished.shape == (2,)
