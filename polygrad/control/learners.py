"""Control learners: one time-major batch of on-policy data in, updated parameters and metrics out.

A control algorithm is a loss preset (`polygrad.losses`) plus an advantage estimator plus a learner:

    reinforce = losses "reinforce" + AdvantageConfig("reward_to_go") + MinibatchEpochs(1, 1)
    a2c       = losses "a2c"       + AdvantageConfig("gae", gae_lambda=1) + MinibatchEpochs(1, 1)
    ppo       = losses "ppo"       + AdvantageConfig("gae") + MinibatchEpochs(4, 4)
    ppo_kl    = losses "ppo_kl"    + AdvantageConfig("gae") + MinibatchEpochs(4, 4)
    trpo, npg = losses "trpo"      + AdvantageConfig("gae") + a trust-region step (`control.trpo`)

A `Learner` is a pair of pure functions built once:

    init(params) -> LearnerState
    update(state, trajectory [T, B], key) -> (state, metrics)

so that an experiment composes rollout -> update in one jitted function. The network is any Flax
`apply_fn(params, obs) -> (distribution, values)` (see `polygrad.control.networks`). The learner takes
the loss, not flags: PPO's adaptive KL coefficient is learner state (`LearnerState.aux`), adapted after
each update by the loss's own `KLToOld` rule.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from polygrad import losses, optim, validate
from polygrad.control.rollout import Trajectory
from polygrad.estimators import returns

ApplyFn = Callable[[Any, jax.Array], tuple[Any, jax.Array]]
ADVANTAGE_ESTIMATORS = ("gae", "n_step", "reward_to_go", "monte_carlo")


@struct.dataclass
class LearnerState:
    """Parameters, optimiser state, and algorithm-specific scalars in `aux` (PPO-KL's coefficient)."""

    params: Any
    opt_state: Any
    aux: dict[str, jax.Array] = struct.field(default_factory=dict)


class Learner(NamedTuple):
    init: Callable[[Any], LearnerState]
    update: Callable[[LearnerState, Trajectory, jax.Array], tuple[LearnerState, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
    """How advantages and value targets are estimated from a time-major batch."""

    estimator: str = "gae"
    """gae (Schulman et al. 2016), n_step (A2C, Mnih et al. 2016), reward_to_go (Monte-Carlo return minus
    the critic's V, on complete episodes; 003 eq. 42) or monte_carlo (the return itself, no critic;
    003 eq. 39)."""
    gamma: float = 0.99
    """discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda (gae only): 1 gives Monte-Carlo returns minus V, 0 the TD error."""
    n_step: int = 5
    """bootstrap horizon (n_step only)."""

    def __post_init__(self):
        validate.one_of("advantage.estimator", self.estimator, ADVANTAGE_ESTIMATORS)
        validate.in_range("advantage.gamma", self.gamma, 0.0, 1.0, low_open=True)
        validate.in_range("advantage.gae_lambda", self.gae_lambda, 0.0, 1.0)
        validate.integer("advantage.n_step", self.n_step, minimum=1)


@dataclasses.dataclass(frozen=True)
class MinibatchEpochs:
    """`num_epochs` passes over each batch, `num_minibatches` gradient steps per pass."""

    num_epochs: int = 4
    """passes over each batch (PPO's K)."""
    num_minibatches: int = 4
    """gradient steps per pass; must divide the batch."""

    def __post_init__(self):
        validate.integer("learner.num_epochs", self.num_epochs, minimum=1)
        validate.integer("learner.num_minibatches", self.num_minibatches, minimum=1)


def complete_episode_mask(terminated: jax.Array, truncated: jax.Array) -> jax.Array:
    """1 on the steps whose episode ends inside the batch (at or after them, in the same column), 0 on
    the trailing steps of episodes that are still running at the end of the batch. `[T, B]` -> `[T, B]`."""
    done = jnp.logical_or(terminated, truncated).astype(jnp.int32)
    return jnp.flip(jax.lax.cummax(jnp.flip(done, 0), axis=0), 0)


def estimate_advantages(config: AdvantageConfig, traj: Trajectory
                        ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """`(advantages, value targets, mask)`, each `[T, B]` in the dtype of the rewards (mask None: every
    step counts, which lets the loss skip its masking altogether).

    gae: GAE(gamma, lambda), targets A + V (003 eq. 80-81). n_step: n-step returns minus V (004).
    reward_to_go / monte_carlo: the discounted return within each episode, bootstrapped at a time-limit
    truncation from the critic's value of the final observation (reward_to_go) or from 0 (monte_carlo),
    minus V (reward_to_go) or not; only steps of episodes that end inside the batch count (the tail of a
    running episode has no complete return yet; `complete_episode_mask`). The mask is None elsewhere.
    """
    if config.estimator == "gae":
        advantages = returns.gae(traj.rewards, traj.values, traj.next_values, traj.terminated, traj.truncated,
                                 config.gamma, config.gae_lambda)
        return advantages, advantages + traj.values, None
    if config.estimator == "n_step":
        targets = returns.n_step_returns(traj.rewards, traj.next_values, traj.terminated, traj.truncated,
                                         config.gamma, config.n_step)
        return targets - traj.values, targets, None
    baseline = config.estimator == "reward_to_go"
    bootstrap = jnp.where(traj.truncated, traj.next_values, 0.0) if baseline else None
    reward_to_go = returns.discounted_returns(traj.rewards, traj.terminated, traj.truncated, config.gamma,
                                              next_values=bootstrap)
    mask = complete_episode_mask(traj.terminated, traj.truncated).astype(traj.rewards.dtype)
    advantages = reward_to_go - traj.values if baseline else reward_to_go
    return advantages, reward_to_go, mask


def flatten_time_batch(tree: Any) -> Any:
    """`[T, B, ...]` leaves -> `[T * B, ...]`."""
    return jax.tree.map(lambda x: x.reshape((x.shape[0] * x.shape[1], *x.shape[2:])), tree)


def learner_batch(config: AdvantageConfig, traj: Trajectory, with_old_policy: bool) -> dict[str, Any]:
    """The flat `[N, ...]` batch a learner's loss reads: obs, actions, behaviour log-probs and values,
    advantages, value targets, mask (and the behaviour policy's distribution for an exact KL)."""
    advantages, targets, mask = estimate_advantages(config, traj)
    batch = {"obs": traj.obs, "actions": traj.actions, "log_probs": traj.log_probs, "values": traj.values,
             "advantages": advantages, "targets": targets, "mask": mask}
    if with_old_policy:
        batch["old_policy"] = traj.extras["policy"]
    return flatten_time_batch(batch)


def control_loss(
    loss_config: losses.LossConfig, apply_fn: ApplyFn, params: Any, batch: dict[str, Any],
    kl_old_coef: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`losses.policy_loss` of a flat control batch under `params`: the network gives log-probs, entropy
    and values; the exact KL(pi_old || pi_theta) is passed when the loss has a `kl_old` term."""
    dist, values = apply_fn(params, batch["obs"])
    extra = {}
    if loss_config.kl_old is not None:
        extra = {"kl_old": batch["old_policy"].kl(dist), "kl_old_coef": kl_old_coef}
    return losses.policy_loss(
        loss_config, dist.log_prob(batch["actions"]), batch["log_probs"], batch["advantages"], batch["mask"],
        entropy=dist.entropy(), values=values, values_old=batch["values"], returns=batch["targets"], **extra,
    )


def make_learner(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    loss_config: losses.LossConfig,
    advantage_config: AdvantageConfig,
    learner_config: MinibatchEpochs,
) -> Learner:
    """Advantages from the behaviour critic, then `num_epochs` x `num_minibatches` optimiser steps on the
    loss (one step for REINFORCE and A2C: 1 x 1). With an adaptive `loss_config.kl_old`, the coefficient
    is learner state: after the epochs, the mean KL(pi_old || pi_new) on the whole batch adapts it
    (`losses.adapt_kl_coef`) and is logged as `kl_after_update`.

    Metrics: the loss metrics averaged over the gradient steps (`losses.METRIC_NAMES`, `grad_norm`) and
    `mask_fraction` (the share of the batch that counts: below 1 for Monte-Carlo returns).
    """
    kl_part = loss_config.kl_old
    loss_fn = functools.partial(control_loss, loss_config, apply_fn)

    def init(params):
        aux = {} if kl_part is None else {"kl_old_coef": jnp.asarray(kl_part.coef, jnp.result_type(float))}
        return LearnerState(params, tx.init(params), aux)

    def update(state, traj, key):
        batch = learner_batch(advantage_config, traj, kl_part is not None)
        coef = state.aux.get("kl_old_coef")
        params, opt_state, metrics = optim.minibatch_epochs(
            lambda p, mb: loss_fn(p, mb, coef), tx, state.params, state.opt_state, batch, key,
            learner_config.num_epochs, learner_config.num_minibatches,
        )
        metrics["mask_fraction"] = jnp.ones(()) if batch["mask"] is None else jnp.mean(batch["mask"])
        aux = state.aux
        if kl_part is not None and kl_part.target is not None:
            _, after = loss_fn(params, batch, coef)
            aux = {"kl_old_coef": losses.adapt_kl_coef(kl_part, coef, after["kl_old"])}
            metrics["kl_after_update"] = after["kl_old"]
        return LearnerState(params, opt_state, aux), metrics

    return Learner(init, update)
