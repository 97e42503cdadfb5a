"""Returns, TD errors and advantage estimators on time-major batches.

Every function takes arrays shaped `[T, ...]` (time first; any batch axes after) that may contain
several episodes: a step with `terminated[t] = 1` or `truncated[t] = 1` ends an episode and the next
step starts a new one. The two flags are kept apart (003 section 2.1; Pardo et al., 2018, "Time limits
in reinforcement learning"):

- a *terminated* step never bootstraps: the value of a terminal state is 0;
- a *truncated* step bootstraps from `next_values[t]`, the value of the final observation that the
  time limit cut off;
- neither lets a return or a lambda-trace cross into the next episode.

`gamma` is a scalar or a per-step discount `[T, ...]` (gamma_t multiplies what follows step t), so the
same functions compute token-level GAE for language models, where the discount is 0 after the last token
of a response (`polygrad.lm.token_advantages`). Every function follows the dtype of `rewards`.

`next_values[t]` is V(s_{t+1}) of the *true* successor of s_t. Where step t did not end an episode this
is simply `values[t + 1]`; at the last step of the batch it is the value of the observation the rollout
stopped on. The last step of the batch bootstraps from `next_values[T - 1]` unless it terminated.
"""

import chex
import jax
import jax.numpy as jnp

SCAN_UNROLL = 16  # backward recursions unrolled 16 steps at a time: fewer loop iterations, same numbers


def _check_time_major(rewards: jax.Array, *others: jax.Array | None) -> None:
    chex.assert_rank(rewards, {1, 2, 3})
    chex.assert_axis_dimension_gt(rewards, 0, 0)
    chex.assert_equal_shape([rewards, *[x for x in others if x is not None]])


def _flags(terminated: jax.Array, truncated: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """(not_terminated, not_done) masks in `dtype` from bool or float episode-end flags."""
    terminated = jnp.asarray(terminated, dtype)
    truncated = jnp.asarray(truncated, dtype)
    done = jnp.maximum(terminated, truncated)
    return 1.0 - terminated, 1.0 - done


def _discounts(gamma: float | jax.Array, rewards: jax.Array) -> jax.Array:
    """gamma as a `[T, ...]` array of the dtype of `rewards` (a scalar is broadcast)."""
    gamma = jnp.asarray(gamma, rewards.dtype)
    if gamma.ndim:
        chex.assert_equal_shape([gamma, rewards])
    return jnp.broadcast_to(gamma, rewards.shape)


def td_errors(
    rewards: jax.Array,
    values: jax.Array,
    next_values: jax.Array,
    terminated: jax.Array,
    gamma: float | jax.Array,
) -> jax.Array:
    """One-step TD errors delta_t = r_t + gamma * (1 - terminated_t) * V(s_{t+1}) - V(s_t).

    003 eq. (9). A truncated step bootstraps from `next_values` like any other non-terminal step.

    Args:
      rewards, values, next_values, terminated: `[T, ...]`.
      gamma: discount factor, a scalar or per step `[T, ...]`.

    Returns:
      `[T, ...]` TD errors.
    """
    _check_time_major(rewards, values, next_values, terminated)
    not_terminated = 1.0 - jnp.asarray(terminated, rewards.dtype)
    return rewards + _discounts(gamma, rewards) * not_terminated * next_values - values


def lambda_returns(
    rewards: jax.Array,
    next_values: jax.Array,
    terminated: jax.Array,
    truncated: jax.Array,
    gamma: float | jax.Array,
    lam: float,
) -> jax.Array:
    """TD(lambda) returns G^lambda_t, computed backwards within each episode.

    G_t = r_t + gamma * (1 - terminated_t) * [(1 - l_t) * V(s_{t+1}) + l_t * G_{t+1}],
    with l_t = lam where the episode continues past t and l_t = 0 where it ended at t or where t is
    the last step of the batch (so the trace is cut and the return bootstraps from `next_values`).
    lam = 1 gives Monte-Carlo returns (bootstrapped only at truncation and at the batch end);
    lam = 0 gives one-step TD targets. 002 (GAE section); Sutton and Barto, section 12.1.

    Args:
      rewards, next_values, terminated, truncated: `[T, ...]`.
      gamma: discount factor, a scalar or per step `[T, ...]`.
      lam: trace parameter in [0, 1].

    Returns:
      `[T, ...]` lambda-returns.
    """
    _check_time_major(rewards, next_values, terminated, truncated)
    not_terminated, not_done = _flags(terminated, truncated, rewards.dtype)
    last = jnp.zeros_like(rewards[0])

    def step(g_next, xs):
        r, v_next, nt, nd, discount = xs
        trace = lam * nd
        g = r + discount * nt * ((1.0 - trace) * v_next + trace * g_next)
        return g, g

    # The carried G_{T} never matters: at the last step the trace is forced to 0 below.
    not_done = not_done.at[-1].set(0.0)
    xs = (rewards, next_values, not_terminated, not_done, _discounts(gamma, rewards))
    _, g = jax.lax.scan(step, last, xs, reverse=True, unroll=min(SCAN_UNROLL, rewards.shape[0]))
    return g


def discounted_returns(
    rewards: jax.Array,
    terminated: jax.Array,
    truncated: jax.Array,
    gamma: float | jax.Array,
    next_values: jax.Array | None = None,
) -> jax.Array:
    """Discounted reward-to-go G_t = sum_k gamma^k r_{t+k}, within each episode of the batch.

    003 eq. (39) (reward-to-go) and Example 1.4. The sum stops at the end of the episode that contains
    step t. Where the episode was truncated, or runs past the end of the batch, the tail is replaced by
    gamma * V(final observation) taken from `next_values`; with `next_values=None` the tail is 0 (the
    plain Monte-Carlo return of the observed rewards).

    Args:
      rewards, terminated, truncated: `[T, ...]`.
      gamma: discount factor, a scalar or per step `[T, ...]`.
      next_values: optional `[T, ...]` bootstrap values of each step's true successor.

    Returns:
      `[T, ...]` returns.
    """
    if next_values is None:
        next_values = jnp.zeros_like(rewards)
    return lambda_returns(rewards, next_values, terminated, truncated, gamma, 1.0)


def n_step_returns(
    rewards: jax.Array,
    next_values: jax.Array,
    terminated: jax.Array,
    truncated: jax.Array,
    gamma: float,
    n: int,
) -> jax.Array:
    """n-step bootstrapped returns G^(n)_t = sum_{k<m} gamma^k r_{t+k} + gamma^m V(s_{t+m}).

    004 (A2C with n-step bootstrapping; see the errata: the bootstrap term is gamma^n V(s_{t+n})).
    m = n unless the episode ends or the batch runs out first: if step t+m-1 terminated there is no
    bootstrap term, otherwise it is gamma^m * next_values[t+m-1]. n = 1 gives the TD target; n >= T
    gives `discounted_returns(..., next_values=next_values)`.

    Args:
      rewards, next_values, terminated, truncated: `[T, ...]`.
      gamma: discount factor (a scalar).
      n: number of steps, a Python int >= 1.

    Returns:
      `[T, ...]` n-step returns.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n_step_returns needs an integer n >= 1, got {n!r}")
    _check_time_major(rewards, next_values, terminated, truncated)
    not_terminated, not_done = _flags(terminated, truncated, rewards.dtype)
    horizon = rewards.shape[0]
    n = min(n, horizon)

    def shifted(x, k, fill):
        """x[t + k] for every t, `fill` past the end of the batch."""
        pad = jnp.full((k, *x.shape[1:]), fill, x.dtype)
        return jnp.concatenate([x[k:], pad], axis=0)

    g = jnp.zeros_like(rewards)
    alive = jnp.ones_like(rewards)  # the window starting at t still lies inside t's episode
    discount = 1.0
    for k in range(n):
        r_k = shifted(rewards, k, 0.0)
        nd_k = shifted(not_done, k, 0.0)
        in_batch = shifted(jnp.ones_like(rewards), k, 0.0)
        in_batch_next = shifted(jnp.ones_like(rewards), k + 1, 0.0)
        g = g + alive * discount * r_k
        # The window stops at t+k if the episode ended there, the batch ends there, or k = n - 1.
        stops = 1.0 - nd_k * in_batch_next if k < n - 1 else jnp.ones_like(rewards)
        bootstrap = shifted(not_terminated * next_values, k, 0.0)
        g = g + alive * in_batch * stops * discount * gamma * bootstrap
        alive = alive * in_batch * (1.0 - stops)
        discount = discount * gamma
    return g


def gae(
    rewards: jax.Array,
    values: jax.Array,
    next_values: jax.Array,
    terminated: jax.Array,
    truncated: jax.Array,
    gamma: float | jax.Array,
    lam: float,
) -> jax.Array:
    """Generalised advantage estimates A_t = sum_k (gamma lam)^k delta_{t+k}, within each episode.

    002 (GAE); Schulman et al., 2016. The recursion A_t = delta_t + gamma * lam * (1 - done_t) * A_{t+1}
    uses the TD errors of `td_errors` (a truncated step bootstraps from `next_values`, a terminated one
    does not) and cuts the trace at every episode end. lam = 1 gives Monte-Carlo returns minus values;
    lam = 0 gives the TD errors.

    Args:
      rewards, values, next_values, terminated, truncated: `[T, ...]`.
      gamma: discount factor, a scalar or per step `[T, ...]`.
      lam: GAE parameter in [0, 1].

    Returns:
      `[T, ...]` advantages.
    """
    _check_time_major(rewards, values, next_values, terminated, truncated)
    deltas = td_errors(rewards, values, next_values, terminated, gamma)
    _, not_done = _flags(terminated, truncated, rewards.dtype)

    def step(a_next, xs):
        delta, nd, discount = xs
        a = delta + discount * lam * nd * a_next
        return a, a

    xs = (deltas, not_done, _discounts(gamma, rewards))
    _, advantages = jax.lax.scan(step, jnp.zeros_like(rewards[0]), xs, reverse=True,
                                 unroll=min(SCAN_UNROLL, rewards.shape[0]))
    return advantages
