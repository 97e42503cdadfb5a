"""TRPO and natural policy gradient as control `Learner`s: an on-policy batch in, new parameters out.

One update (Schulman et al. 2015; 003 section 4.6.4) on a time-major batch `Trajectory [T, B]`:

1. Advantages from the behaviour critic (`learners.estimate_advantages`, GAE by default); value
   targets A + V.
2. Policy step: `polygrad.trust_region.trpo_step` (CG direction, eq. 74 scale, backtracking line search)
   or `natural_policy_gradient_step` (the same step without the line search, `line_search="none"`), on the
   surrogate given by the loss (the "trpo" preset: r A with whitened advantages, eq. 69; any preset
   works, negated) and the batch-mean exact KL(pi_old || pi_theta) (eq. 70).
3. Value step: `value_epochs` x `value_minibatches` Adam steps on 0.5 (V - target)^2 (003 eq. 82).

The network is any `apply_fn(params, obs) -> (distribution, values)` whose distribution has `log_prob`,
`kl` and `entropy` (see `polygrad.control.networks`). The trust-region step and the value fit both act on
the whole parameter pytree; with separate actor and critic torsos the surrogate and the KL do not depend
on the critic's parameters (their gradient and Fisher block are zero, so CG leaves them at exactly zero)
and the value loss does not depend on the actor's (Adam's update is exactly zero), so each step moves
only its own network. A shared torso would let the value fit move the policy after the trust-region
step: the callers reject it.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

from polygrad import losses, optim, trust_region, validate
from polygrad.control import learners
from polygrad.control.rollout import Trajectory
from polygrad.estimators import statistics


@dataclasses.dataclass(frozen=True)
class TrustRegionLearnerConfig:
    """The trust-region step (`polygrad.trust_region.TrustRegionConfig`) and the critic's fit."""

    step: trust_region.TrustRegionConfig = trust_region.TrustRegionConfig()
    """delta, conjugate gradient and line search (line_search none: the natural policy gradient)."""
    value_epochs: int = 5
    """passes of the value fit over each batch."""
    value_minibatches: int = 4
    """Adam steps per pass of the value fit; must divide the batch."""

    def __post_init__(self):
        validate.integer("learner.value_epochs", self.value_epochs, minimum=1)
        validate.integer("learner.value_minibatches", self.value_minibatches, minimum=1)


def policy_objectives(
    loss_config: losses.LossConfig,
    apply_fn: Callable[[Any, jax.Array], tuple[Any, jax.Array]],
    params: Any,
    batch: dict[str, Any],
) -> tuple[Callable[[Any], jax.Array], Callable[[Any], jax.Array]]:
    """The empirical surrogate (003 eq. 69) and mean KL (eq. 70) of a flat batch, as functions of params.

    pi_old is the policy at ``params`` (theta_old), evaluated once and held constant.

    Args:
      loss_config: the policy loss; the surrogate is minus its value (value and entropy terms are
        dropped: the critic is fitted separately).
      apply_fn: `(params, obs [N, ...]) -> (distribution over [N], values [N])`.
      params: theta_old.
      batch: the flat batch of `learners.learner_batch` (obs, actions, advantages, mask, ...).

    Returns:
      `(surrogate_fn, kl_fn)`: with the "trpo" preset `surrogate_fn(theta) = mean_t[pi_theta(a_t|s_t) /
      pi_old(a_t|s_t) A_t]` (log-ratio clamped) and `kl_fn(theta) = mean_t KL(pi_old(.|s_t) ||
      pi_theta(.|s_t))`, both scalars.
    """
    policy_only = dataclasses.replace(loss_config, value_coef=0.0, entropy_coef=0.0)
    old_policy, _ = jax.lax.stop_gradient(apply_fn(params, batch["obs"]))
    batch = {**batch, "log_probs": old_policy.log_prob(batch["actions"])}

    def surrogate_fn(theta):
        return -learners.control_loss(policy_only, apply_fn, theta, batch)[0]

    def kl_fn(theta):
        policy, _ = apply_fn(theta, batch["obs"])
        return statistics.masked_mean(old_policy.kl(policy), batch["mask"])

    return surrogate_fn, kl_fn


def fit_value(
    apply_fn: Callable[[Any, jax.Array], tuple[Any, jax.Array]],
    value_tx: optax.GradientTransformation,
    params: Any,
    opt_state: Any,
    batch: dict[str, Any],
    key: jax.Array,
    num_epochs: int,
    num_minibatches: int,
) -> tuple[Any, Any, dict[str, jax.Array]]:
    """Regress the critic on `batch["targets"] [N]`: `num_epochs` passes of `num_minibatches` Adam steps
    on 0.5 (V(s) - target)^2 (003 eq. 82), via `optim.minibatch_epochs`. Returns the parameters, optimiser
    state and the mean `value_loss` and `grad_norm` over the steps."""

    def loss_fn(theta, minibatch):
        _, values = apply_fn(theta, minibatch["obs"])
        per_sample, _ = losses.clipped_value_loss(values, values, minibatch["targets"], None)
        loss = statistics.masked_mean(per_sample, minibatch["mask"])
        return loss, {"value_loss": loss}

    value_batch = {k: batch[k] for k in ("obs", "targets", "mask")}
    return optim.minibatch_epochs(loss_fn, value_tx, params, opt_state, value_batch, key, num_epochs,
                                  num_minibatches)


def make_trust_region_learner(
    apply_fn: Callable[[Any, jax.Array], tuple[Any, jax.Array]],
    value_tx: optax.GradientTransformation,
    loss_config: losses.LossConfig,
    advantage_config: learners.AdvantageConfig,
    learner_config: TrustRegionLearnerConfig,
) -> learners.Learner:
    """TRPO (a line search) or natural policy gradient (`line_search="none"`) as a Learner.

    Args:
      apply_fn: `(params, obs [N, ...]) -> (distribution over [N], values [N])`.
      value_tx: optax optimiser of the value fit (e.g. `optim.make_optimizer`); its state is the
        learner's `opt_state`.
      loss_config: the surrogate (e.g. `losses.PRESETS["trpo"]`).
      advantage_config: how advantages and value targets are estimated.
      learner_config: the trust-region step and the value fit.

    Returns:
      `Learner(init, update)`; `update(state, trajectory [T, B], key)` returns the new state and the
      metrics of the trust-region step (see `trust_region.trpo_step`) plus `value_loss` and
      `value_grad_norm` (means over the value fit's steps), `explained_variance` (of the behaviour
      values) and `entropy` (of the new policy).
    """
    step_config = learner_config.step
    no_search = step_config.line_search == "none"
    policy_step = trust_region.natural_policy_gradient_step if no_search else trust_region.trpo_step

    def init(params):
        return learners.LearnerState(params, value_tx.init(params))

    def update(state, traj: Trajectory, key):
        batch = learners.learner_batch(advantage_config, traj, with_old_policy=False)
        surrogate_fn, kl_fn = policy_objectives(loss_config, apply_fn, state.params, batch)
        params, metrics = policy_step(surrogate_fn, kl_fn, state.params, step_config)
        params, opt_state, value_metrics = fit_value(
            apply_fn, value_tx, params, state.opt_state, batch, key, learner_config.value_epochs,
            learner_config.value_minibatches,
        )
        new_policy, _ = apply_fn(params, batch["obs"])
        metrics = {
            **metrics,
            "value_loss": value_metrics["value_loss"],
            "value_grad_norm": value_metrics["grad_norm"],
            "explained_variance": statistics.explained_variance(batch["values"], batch["targets"],
                                                                batch["mask"]),
            "entropy": statistics.masked_mean(new_policy.entropy(), batch["mask"]),
        }
        return learners.LearnerState(params, opt_state, state.aux), metrics

    return learners.Learner(init, update)
