"""On-policy rollouts of a batch of environments with `lax.scan`, producing a time-major `Trajectory`.

The environment is any batched step function with the gymnax 1.0 convention (auto-reset, terminated
and truncated kept apart, the observation the step reached in `info["final_observation"]`):

    env_step(key, env_state, actions [B, ...]) -> (obs, env_state, rewards [B], terminated [B],
                                                   truncated [B], info)

Bootstrapping (003 eq. 44 and 80; Pardo et al., 2018): `next_values[t]` is the critic's value of the
TRUE successor of s_t, i.e. of `info["final_observation"][t]`, which is the next observation where the
episode goes on and the last observation of the episode where it ended (not the reset observation
that gymnax returns in its place). Only `terminated` stops bootstrapping downstream; a truncated step
bootstraps from that value.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from polygrad.estimators.distributions import Distribution


@struct.dataclass
class Trajectory:
    """A time-major batch of transitions. Every leaf has leading axes `[T, B]`.

    Attributes:
      obs: observations s_t, `[T, B, *obs_shape]`.
      actions: actions a_t, `[T, B]` (discrete) or `[T, B, action_dim]` (continuous).
      rewards: rewards r_t, `[T, B]`.
      terminated: 1 where s_{t+1} is terminal (no bootstrapping), `[T, B]`.
      truncated: 1 where the episode was cut by a time limit after step t (bootstrap from
        `next_values`), `[T, B]`. A step is never both.
      log_probs: log pi_old(a_t | s_t) of the behaviour policy, `[T, B]`.
      values: V(s_t) under the critic that collected the data, `[T, B]`.
      next_values: V(s_{t+1}) of the true successor of s_t, `[T, B]`.
      extras: any other per-step arrays a rollout wants to keep (e.g. policy parameters of a
        Gaussian head for exact KL), a dict of `[T, B, ...]` arrays.
    """

    obs: jax.Array
    actions: jax.Array
    rewards: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    log_probs: jax.Array
    values: jax.Array
    next_values: jax.Array
    extras: dict[str, Any] = struct.field(default_factory=dict)


EnvStep = Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any, jax.Array, jax.Array, jax.Array, dict]]


def rollout(
    policy_fn: Callable[[jax.Array], Distribution],
    value_fn: Callable[[jax.Array], jax.Array],
    env_step: EnvStep,
    env_state: Any,
    obs: jax.Array,
    key: jax.Array,
    num_steps: int,
    unroll: int = 1,
) -> tuple[Trajectory, Any, jax.Array, dict[str, jax.Array]]:
    """Runs `num_steps` steps of the batch of environments under `policy_fn`.

    Args:
      policy_fn: observations `[B, *obs_shape]` -> distribution (`Categorical`/`DiagGaussian`) over `[B]`.
      value_fn: observations `[..., *obs_shape]` -> values `[...]`; called once, after the scan, on all
        `[T, B]` observations and all `[T, B]` final observations.
      env_step: batched step function (see module docstring).
      env_state, obs: the state and current observations `[B, *obs_shape]` to start from.
      key: PRNG key for actions and environment transitions.
      num_steps: T, a Python int.
      unroll: `lax.scan` unroll factor (a speed knob only; results do not depend on it).

    Returns:
      (trajectory, env_state, obs, infos): a `Trajectory` with leaves `[T, B, ...]` (its `extras["policy"]`
      holds the behaviour distribution of every step, for exact KL), the environment state and
      observations to continue from, and the remaining per-step `info` entries stacked to `[T, B, ...]`.
    """

    def step(carry, step_key):
        env_state, obs = carry
        action_key, env_key = jax.random.split(step_key)
        dist = policy_fn(obs)
        action = dist.sample(action_key)
        log_prob = dist.log_prob(action)
        next_obs, env_state, reward, terminated, truncated, info = env_step(env_key, env_state, action)
        info = dict(info)
        final_obs = info.pop("final_observation")
        truncated = jnp.logical_and(truncated, jnp.logical_not(terminated))
        out = (obs, action, reward, terminated, truncated, log_prob, dist, final_obs, info)
        return (env_state, next_obs), out

    keys = jax.random.split(key, num_steps)
    (env_state, obs), outs = jax.lax.scan(step, (env_state, obs), keys, unroll=unroll)
    all_obs, actions, rewards, terminated, truncated, log_probs, dists, final_obs, infos = outs
    trajectory = Trajectory(
        obs=all_obs,
        actions=actions,
        rewards=rewards.astype(jnp.float32),
        terminated=terminated.astype(jnp.float32),
        truncated=truncated.astype(jnp.float32),
        log_probs=log_probs,
        values=value_fn(all_obs),
        next_values=value_fn(final_obs),
        extras={"policy": dists},
    )
    return trajectory, env_state, obs, infos
