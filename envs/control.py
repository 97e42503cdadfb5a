"""Classic-control environments: thin batched adapters over gymnax 1.0, and the wrappers training needs.

Every environment here is *batched*: it steps `B` copies of a gymnax environment together, so that
wrappers whose statistics are shared by the whole batch (observation and reward normalisation, as in
the vectorised gym wrappers CleanRL uses) are plain functions of the batch. The interface, shared by
`VecEnv` and every wrapper, is

    reset(key) -> (obs [B, *obs_shape], state)
    step(key, state, action [B, ...]) -> (obs, state, reward [B], terminated [B], truncated [B], info)

`step` auto-resets finished episodes (gymnax 1.0): `obs` is then the first observation of the next
episode, and `info["final_observation"]` `[B, *obs_shape]` is the observation the step actually reached
(equal to `obs` where the episode goes on). `terminated` marks a true terminal state (no bootstrapping),
`truncated` a time-limit cut (bootstrap from the final observation); a step is never both. All
environment state, including the running statistics of the normalisation wrappers, is a pytree, so it
is saved in checkpoints and restored exactly.

This module never imports polygrad.
"""

from __future__ import annotations

from typing import Any

import chex
import gymnax
import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments import spaces

ENV_NAMES = ("CartPole-v1", "Acrobot-v1", "MountainCar-v0", "Pendulum-v1", "MountainCarContinuous-v0")


class VecEnv:
    """`num_envs` copies of the gymnax environment `name`, stepped together (see module docstring).

    Attributes:
      name: gymnax id, one of `ENV_NAMES`.
      num_envs: batch size B.
      obs_shape: shape of one observation.
      discrete: True for a `Discrete` action space (actions `[B]` int32), False for a `Box` one
        (actions `[B, action_dim]` float32, clipped to the bounds before they reach gymnax, like
        gym's ClipAction wrapper).
      action_dim: number of actions (discrete) or action dimensions (continuous).
      max_episode_steps: the time limit after which an episode is truncated.
    """

    def __init__(self, name: str, num_envs: int, **param_overrides: Any):
        if name not in ENV_NAMES:
            raise ValueError(f"unknown environment {name!r}; choose one of {', '.join(ENV_NAMES)}")
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.name = name
        self.num_envs = int(num_envs)
        self._env, default_params = gymnax.make(name)
        unknown = set(param_overrides) - set(default_params.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{name} has no environment parameter(s) {sorted(unknown)}")
        self.params = default_params.replace(**param_overrides)
        self.obs_shape = tuple(self._env.observation_space(self.params).shape)
        space = self._env.action_space(self.params)
        self.discrete = isinstance(space, spaces.Discrete)
        if self.discrete:
            self.action_dim = int(space.n)
            self._low = self._high = None
        else:
            self.action_dim = int(space.shape[0])
            self._low = jnp.broadcast_to(jnp.asarray(space.low, jnp.float32), space.shape)
            self._high = jnp.broadcast_to(jnp.asarray(space.high, jnp.float32), space.shape)
        self.max_episode_steps = int(self.params.max_steps_in_episode)

    def reset(self, key: jax.Array) -> tuple[jax.Array, Any]:
        keys = jax.random.split(key, self.num_envs)
        obs, state = jax.vmap(self._env.reset, in_axes=(0, None))(keys, self.params)
        return obs.astype(jnp.float32), state

    def step(self, key: jax.Array, state: Any, action: jax.Array):
        if self.discrete:
            chex.assert_shape(action, (self.num_envs,))
            action = action.astype(jnp.int32)
        else:
            chex.assert_shape(action, (self.num_envs, self.action_dim))
            action = jnp.clip(action, self._low, self._high)
        keys = jax.random.split(key, self.num_envs)
        obs, state, reward, terminated, truncated, info = jax.vmap(
            self._env.step, in_axes=(0, 0, 0, None)
        )(keys, state, action, self.params)
        terminated = jnp.asarray(terminated, jnp.bool_)
        # gymnax can report both flags on the last step of a time limit; termination wins.
        truncated = jnp.logical_and(jnp.asarray(truncated, jnp.bool_), jnp.logical_not(terminated))
        info = {"final_observation": info["final_observation"].astype(jnp.float32)}
        return obs.astype(jnp.float32), state, reward.astype(jnp.float32), terminated, truncated, info


class Wrapper:
    """Base class: forwards attributes (`num_envs`, `obs_shape`, `discrete`, ...) to the wrapped env."""

    def __init__(self, env):
        self.env = env

    def __getattr__(self, name):
        return getattr(self.env, name)


# --- episode statistics -------------------------------------------------------------------------


@struct.dataclass
class EpisodeStatisticsState:
    """Running and last-finished episode returns and lengths of each of the B environments, all `[B]`."""

    env_state: Any
    episode_return: jax.Array
    episode_length: jax.Array
    last_return: jax.Array
    last_length: jax.Array
    episodes_finished: jax.Array


class EpisodeStatistics(Wrapper):
    """Tracks the undiscounted return and length of every episode, on the raw (unnormalised) rewards.

    Adds to `info`, each `[B]`: `episode_done` (an episode ended at this step), `episode_return` and
    `episode_length` (of the episode that ended, 0 elsewhere). Wrap it *inside* any reward
    normalisation so that it sees the environment's own rewards.
    """

    def reset(self, key):
        obs, env_state = self.env.reset(key)
        zeros = jnp.zeros((self.num_envs,), jnp.float32)
        izeros = jnp.zeros((self.num_envs,), jnp.int32)
        return obs, EpisodeStatisticsState(env_state, zeros, izeros, zeros, izeros, izeros)

    def step(self, key, state, action):
        obs, env_state, reward, terminated, truncated, info = self.env.step(key, state.env_state, action)
        done = jnp.logical_or(terminated, truncated)
        ret = state.episode_return + reward
        length = state.episode_length + 1
        new_state = EpisodeStatisticsState(
            env_state=env_state,
            episode_return=jnp.where(done, 0.0, ret),
            episode_length=jnp.where(done, 0, length),
            last_return=jnp.where(done, ret, state.last_return),
            last_length=jnp.where(done, length, state.last_length),
            episodes_finished=state.episodes_finished + done.astype(jnp.int32),
        )
        info = {
            **info,
            "episode_done": done,
            "episode_return": jnp.where(done, ret, 0.0),
            "episode_length": jnp.where(done, length, 0),
        }
        return obs, new_state, reward, terminated, truncated, info


def find_episode_statistics(state: Any) -> EpisodeStatisticsState:
    """The `EpisodeStatisticsState` inside a (possibly wrapped) environment state."""
    while not isinstance(state, EpisodeStatisticsState):
        if not hasattr(state, "env_state"):
            raise ValueError("the environment is not wrapped in EpisodeStatistics")
        state = state.env_state
    return state


def recent_episode_return(state: Any) -> jax.Array:
    """Mean over the B environments of the return of each one's most recently finished episode.

    Environments that have not finished an episode yet are left out; before any has, the result is
    NaN, which marks "no data" (plots and summaries skip it). Scalar.
    """
    stats = find_episode_statistics(state)
    has_finished = stats.episodes_finished > 0
    count = jnp.sum(has_finished)
    total = jnp.sum(jnp.where(has_finished, stats.last_return, 0.0))
    return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)


# --- running normalisation ----------------------------------------------------------------------


@struct.dataclass
class RunningMeanStd:
    """Running mean and variance of a stream of batches (Chan et al.'s parallel update).

    `count` starts at a small epsilon, as in gym's RunningMeanStd, so the first batch dominates.
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array

    @classmethod
    def create(cls, shape: tuple[int, ...]) -> RunningMeanStd:
        return cls(jnp.zeros(shape, jnp.float32), jnp.ones(shape, jnp.float32), jnp.array(1e-4, jnp.float32))

    def update(self, batch: jax.Array) -> RunningMeanStd:
        """Merge a batch `[N, *shape]` into the statistics."""
        batch_mean = jnp.mean(batch, axis=0)
        batch_var = jnp.var(batch, axis=0)
        batch_count = jnp.asarray(batch.shape[0], jnp.float32)
        delta = batch_mean - self.mean
        total = self.count + batch_count
        mean = self.mean + delta * batch_count / total
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        return RunningMeanStd(mean, m2 / total, total)


@struct.dataclass
class NormalizeObservationState:
    env_state: Any
    obs_stats: RunningMeanStd


class NormalizeObservation(Wrapper):
    """Standardises observations with running statistics shared by the batch, clipped to [-clip, clip].

    Like gym's NormalizeObservation: the statistics are updated with every batch of observations the
    environment returns (before normalising it), and `info["final_observation"]` is normalised with
    the same statistics so that the critic sees both in one scale.
    """

    def __init__(self, env, clip: float = 10.0, epsilon: float = 1e-8):
        super().__init__(env)
        self.clip = clip
        self.epsilon = epsilon

    def _normalize(self, stats: RunningMeanStd, obs: jax.Array) -> jax.Array:
        z = (obs - stats.mean) / jnp.sqrt(stats.var + self.epsilon)
        return jnp.clip(z, -self.clip, self.clip)

    def reset(self, key):
        obs, env_state = self.env.reset(key)
        stats = RunningMeanStd.create(self.obs_shape).update(obs)
        return self._normalize(stats, obs), NormalizeObservationState(env_state, stats)

    def step(self, key, state, action):
        obs, env_state, reward, terminated, truncated, info = self.env.step(key, state.env_state, action)
        stats = state.obs_stats.update(obs)
        info = {**info, "final_observation": self._normalize(stats, info["final_observation"])}
        return self._normalize(stats, obs), NormalizeObservationState(env_state, stats), reward, terminated, \
            truncated, info


@struct.dataclass
class NormalizeRewardState:
    env_state: Any
    discounted_return: jax.Array
    return_stats: RunningMeanStd


class NormalizeReward(Wrapper):
    """Scales rewards by the running standard deviation of the discounted return, clipped to [-clip, clip].

    As gym's NormalizeReward (used by CleanRL for continuous control): each environment accumulates
    its discounted return R <- gamma R + r (reset at every episode end), the batch of R updates the
    running variance, and the reward is divided by its square root (not centred).
    """

    def __init__(self, env, gamma: float, clip: float = 10.0, epsilon: float = 1e-8):
        super().__init__(env)
        self.gamma = gamma
        self.clip = clip
        self.epsilon = epsilon

    def reset(self, key):
        obs, env_state = self.env.reset(key)
        zeros = jnp.zeros((self.num_envs,), jnp.float32)
        return obs, NormalizeRewardState(env_state, zeros, RunningMeanStd.create(()))

    def step(self, key, state, action):
        obs, env_state, reward, terminated, truncated, info = self.env.step(key, state.env_state, action)
        discounted_return = state.discounted_return * self.gamma + reward
        stats = state.return_stats.update(discounted_return)
        scaled = jnp.clip(reward / jnp.sqrt(stats.var + self.epsilon), -self.clip, self.clip)
        done = jnp.logical_or(terminated, truncated)
        new_state = NormalizeRewardState(env_state, jnp.where(done, 0.0, discounted_return), stats)
        return obs, new_state, scaled, terminated, truncated, info


def make_env(
    name: str,
    num_envs: int,
    *,
    normalize_observations: bool = False,
    normalize_rewards: bool = False,
    gamma: float = 0.99,
    **param_overrides: Any,
):
    """The batched environment `name` with episode statistics and the optional normalisation wrappers.

    Order (inside out): gymnax -> EpisodeStatistics (raw returns) -> NormalizeObservation ->
    NormalizeReward (its discounted return uses `gamma`). `param_overrides` replace gymnax
    `EnvParams` fields, e.g. `max_steps_in_episode=50`.
    """
    env = EpisodeStatistics(VecEnv(name, num_envs, **param_overrides))
    if normalize_observations:
        env = NormalizeObservation(env)
    if normalize_rewards:
        env = NormalizeReward(env, gamma)
    return env
