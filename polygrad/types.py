"""Small shared data types.

A `Trajectory` is a time-major batch of transitions `[T, B, ...]` as produced by a rollout of `B`
environments for `T` steps. Episodes may start and end anywhere inside it; `terminated` and `truncated`
mark the step that ended one, and `next_values` holds the value of each step's *true* successor state
(for a step that ended an episode, the value of its final observation, not of the reset observation),
which is what `polygrad.returns` needs to bootstrap truncated episodes correctly.
"""

from typing import Any

import jax
from flax import struct


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
