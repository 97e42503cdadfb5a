"""TRPO and natural policy gradient as `polygrad.updates.Learner`s: an on-policy batch in, new parameters out.

One update (003 section 4.6.4) on a time-major batch `Trajectory [T, B]`:

1. GAE advantages from the behaviour critic's values (003 eq. 80; `polygrad.returns.gae`), optionally
   standardised over the batch; value targets A + V.
2. Policy step: `polygrad.trust_region.trpo_step` (CG direction, eq. 74 scale, backtracking line search)
   or `natural_policy_gradient_step` (the same step without the line search), on the empirical surrogate
   (eq. 69) and the batch-mean exact KL(pi_old || pi_theta) (eq. 70).
3. Value step: `value_epochs` x `value_minibatches` Adam steps on 0.5 (V - target)^2 (003 eq. 82).

The network is any `apply_fn(params, obs) -> (distribution, values)` whose distribution has `log_prob`,
`kl` and `entropy` (see `polygrad.networks`). The trust-region step and the value fit both act on the
whole parameter pytree; with separate actor and critic torsos the surrogate and the KL do not depend on
the critic's parameters (their gradient and Fisher block are zero, so CG leaves them at exactly zero) and
the value loss does not depend on the actor's (Adam's update is exactly zero), so each step moves only
its own network. A shared torso would let the value fit move the policy after the trust-region step:
the callers reject it.
"""

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from polygrad import importance, losses, returns, trust_region, updates
from polygrad.types import Trajectory


def policy_objectives(
    apply_fn: Callable[[Any, jax.Array], tuple[Any, jax.Array]],
    params: Any,
    obs: jax.Array,
    actions: jax.Array,
    advantages: jax.Array,
) -> tuple[Callable[[Any], jax.Array], Callable[[Any], jax.Array]]:
    """The empirical surrogate (003 eq. 69) and mean KL (eq. 70) of a flat batch, as functions of params.

    pi_old is the policy at ``params`` (theta_old), evaluated once and held constant.

    Args:
      apply_fn: `(params, obs [N, ...]) -> (distribution over [N], values [N])`.
      params: theta_old.
      obs, actions, advantages: the batch, `[N, ...]`, `[N, ...]` and `[N]`.

    Returns:
      `(surrogate_fn, kl_fn)`: `surrogate_fn(theta) = mean_t[pi_theta(a_t|s_t) / pi_old(a_t|s_t) A_t]`
      (log-ratio clamped as in `importance.ratios`) and `kl_fn(theta) = mean_t KL(pi_old(.|s_t) ||
      pi_theta(.|s_t))`, both scalars.
    """
    chex.assert_rank(advantages, 1)
    old_policy, _ = jax.lax.stop_gradient(apply_fn(params, obs))
    old_log_probs = old_policy.log_prob(actions)
    chex.assert_equal_shape([old_log_probs, advantages])

    def surrogate_fn(theta):
        policy, _ = apply_fn(theta, obs)
        return jnp.mean(importance.ratios(policy.log_prob(actions), old_log_probs) * advantages)

    def kl_fn(theta):
        policy, _ = apply_fn(theta, obs)
        return jnp.mean(old_policy.kl(policy))

    return surrogate_fn, kl_fn


def fit_value(
    apply_fn: Callable[[Any, jax.Array], tuple[Any, jax.Array]],
    value_tx: optax.GradientTransformation,
    params: Any,
    opt_state: Any,
    obs: jax.Array,
    targets: jax.Array,
    key: jax.Array,
    num_epochs: int,
    num_minibatches: int,
) -> tuple[Any, Any, dict[str, jax.Array]]:
    """Regress the critic on `targets [N]`: `num_epochs` passes of `num_minibatches` Adam steps on
    0.5 (V(s) - target)^2 (003 eq. 82), via `updates.minibatch_epochs`. Returns the parameters, optimiser
    state and the mean `value_loss` and `grad_norm` over the steps."""

    def loss_fn(theta, minibatch):
        _, values = apply_fn(theta, minibatch["obs"])
        loss = losses.value_loss(values, minibatch["targets"])
        return loss, {"value_loss": loss}

    return updates.minibatch_epochs(
        loss_fn, value_tx, params, opt_state, {"obs": obs, "targets": targets}, key, num_epochs,
        num_minibatches,
    )


def make_trust_region_learner(
    apply_fn: Callable[[Any, jax.Array], tuple[Any, jax.Array]],
    value_tx: optax.GradientTransformation,
    trust_region_config: trust_region.TrustRegionConfig,
    *,
    line_search: bool = True,
    gamma: float = 0.99,
    gae_lambda: float = 0.97,
    value_epochs: int = 5,
    value_minibatches: int = 4,
    normalize_advantages: bool = True,
) -> updates.Learner:
    """TRPO (`line_search=True`) or natural policy gradient (`line_search=False`) as a Learner.

    Args:
      apply_fn: `(params, obs [N, ...]) -> (distribution over [N], values [N])`.
      value_tx: optax optimiser of the value fit (e.g. `updates.make_optimizer`); its state is the
        learner's `opt_state`.
      trust_region_config: delta, CG and line-search settings (`polygrad.trust_region.TrustRegionConfig`).
      line_search: TRPO's backtracking line search (True) or the plain scaled NPG step (False).
      gamma, gae_lambda: discount and GAE lambda of the advantages.
      value_epochs, value_minibatches: passes over the batch and minibatches per pass of the value fit.
      normalize_advantages: standardise the advantages over the whole batch before the policy step.

    Returns:
      `Learner(init, update)`; `update(state, trajectory [T, B], key)` returns the new state and the
      metrics of the trust-region step (see `trust_region.trpo_step`) plus `value_loss` and
      `value_grad_norm` (means over the value fit's steps), `explained_variance` (of the behaviour
      values) and `entropy` (of the new policy).
    """
    if value_epochs < 1 or value_minibatches < 1:
        raise ValueError(f"value_epochs and value_minibatches must be >= 1, got {value_epochs}, "
                         f"{value_minibatches}")
    policy_step = trust_region.trpo_step if line_search else trust_region.natural_policy_gradient_step

    def init(params):
        return updates.LearnerState(params, value_tx.init(params))

    def update(state, traj: Trajectory, key):
        advantages = returns.gae(
            traj.rewards, traj.values, traj.next_values, traj.terminated, traj.truncated, gamma, gae_lambda
        )
        batch = updates.flatten_time_batch({
            "obs": traj.obs, "actions": traj.actions, "advantages": advantages,
            "targets": advantages + traj.values, "values": traj.values,
        })
        policy_advantages = batch["advantages"]
        if normalize_advantages:
            policy_advantages = losses.normalize_advantages(policy_advantages)
        surrogate_fn, kl_fn = policy_objectives(
            apply_fn, state.params, batch["obs"], batch["actions"], policy_advantages
        )
        params, metrics = policy_step(surrogate_fn, kl_fn, state.params, trust_region_config)
        params, opt_state, value_metrics = fit_value(
            apply_fn, value_tx, params, state.opt_state, batch["obs"], batch["targets"], key, value_epochs,
            value_minibatches,
        )
        new_policy, _ = apply_fn(params, batch["obs"])
        metrics = {
            **metrics,
            "value_loss": value_metrics["value_loss"],
            "value_grad_norm": value_metrics["grad_norm"],
            "explained_variance": losses.explained_variance(batch["values"], batch["targets"]),
            "entropy": jnp.mean(new_policy.entropy()),
        }
        return updates.LearnerState(params, opt_state, state.aux), metrics

    return updates.Learner(init, update)
