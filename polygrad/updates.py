"""Per-algorithm update steps: one batch of on-policy data in, updated parameters and metrics out.

A `Learner` is a pair of pure functions built once from hyperparameters:

    init(params) -> LearnerState
    update(state, trajectory [T, B], key) -> (state, metrics)

so that an experiment composes rollout -> update in one jitted function. The network is any Flax
`apply_fn(params, obs) -> (distribution, values)` (see `polygrad.networks`); the optimiser is an optax
transformation, typically `make_optimizer` (gradient clipping, Adam, optional linear learning-rate
annealing whose step count lives in the optimiser state, so it survives checkpoints).
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from polygrad import losses, returns
from polygrad.types import Trajectory

ApplyFn = Callable[[Any, jax.Array], tuple[Any, jax.Array]]


@struct.dataclass
class LearnerState:
    """Parameters, optimiser state, and algorithm-specific scalars in `aux` (e.g. the PPO-KL beta)."""

    params: Any
    opt_state: Any
    aux: dict[str, jax.Array] = struct.field(default_factory=dict)


class Learner(NamedTuple):
    init: Callable[[Any], LearnerState]
    update: Callable[[LearnerState, Trajectory, jax.Array], tuple[LearnerState, dict[str, jax.Array]]]


def make_optimizer(
    learning_rate: float,
    max_grad_norm: float | None = 0.5,
    anneal_steps: int | None = None,
    eps: float = 1e-5,
) -> optax.GradientTransformation:
    """Adam (eps 1e-5, as CleanRL) after global-norm gradient clipping, with the learning rate annealed
    linearly to 0 over `anneal_steps` gradient steps if given."""
    if learning_rate <= 0:
        raise ValueError(f"learning rate must be > 0, got {learning_rate}")
    lr = optax.linear_schedule(learning_rate, 0.0, anneal_steps) if anneal_steps else learning_rate
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    return optax.chain(*parts, optax.adam(lr, eps=eps))


def flatten_time_batch(tree: Any) -> Any:
    """`[T, B, ...]` leaves -> `[T * B, ...]`."""
    return jax.tree.map(lambda x: x.reshape((x.shape[0] * x.shape[1], *x.shape[2:])), tree)


def _mean_metrics(metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return jax.tree.map(jnp.mean, metrics)


def _gradient_step(loss_fn, tx, params, opt_state, batch):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
    return optax.apply_updates(params, updates), opt_state, metrics


def minibatch_epochs(
    loss_fn: Callable[[Any, Any], tuple[jax.Array, dict]],
    tx: optax.GradientTransformation,
    params: Any,
    opt_state: Any,
    batch: Any,
    key: jax.Array,
    num_epochs: int,
    num_minibatches: int,
) -> tuple[Any, Any, dict[str, jax.Array]]:
    """`num_epochs` passes over `batch` (leaves `[N, ...]`), each a fresh random partition into
    `num_minibatches` minibatches with one gradient step each (003 section 4.7.4, step 3).

    Returns the parameters, optimiser state and the metrics averaged over all gradient steps.
    """
    n = jax.tree.leaves(batch)[0].shape[0]
    if n % num_minibatches:
        raise ValueError(f"batch size {n} is not divisible by num_minibatches={num_minibatches}")
    size = n // num_minibatches

    def epoch(carry, epoch_key):
        params, opt_state = carry
        order = jax.random.permutation(epoch_key, n)
        minibatches = jax.tree.map(lambda x: x[order].reshape((num_minibatches, size, *x.shape[1:])), batch)

        def step(carry, minibatch):
            params, opt_state, metrics = _gradient_step(loss_fn, tx, *carry, minibatch)
            return (params, opt_state), metrics

        return jax.lax.scan(step, (params, opt_state), minibatches)

    (params, opt_state), metrics = jax.lax.scan(epoch, (params, opt_state), jax.random.split(key, num_epochs))
    return params, opt_state, _mean_metrics(metrics)


def _gae_batch(traj: Trajectory, gamma: float, gae_lambda: float) -> tuple[jax.Array, jax.Array]:
    """GAE advantages and value targets A + V (003 eq. 80-81), `[T, B]` each."""
    advantages = returns.gae(
        traj.rewards, traj.values, traj.next_values, traj.terminated, traj.truncated, gamma, gae_lambda
    )
    return advantages, advantages + traj.values


def make_ppo(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    *,
    gamma: float = 0.99,
    gae_lambda: float = 0.95,
    num_epochs: int = 4,
    num_minibatches: int = 4,
    clip_eps: float = 0.2,
    value_clip_eps: float | None = 0.2,
    value_coef: float = 0.5,
    entropy_coef: float = 0.01,
    normalize_advantages: bool = True,
    kl_penalty: bool = False,
    kl_target: float = 0.01,
    kl_beta_init: float = 1.0,
    kl_threshold: float = 1.5,
    kl_factor: float = 2.0,
) -> Learner:
    """PPO (003 section 4.7.4): GAE advantages from the behaviour critic, then `num_epochs` x
    `num_minibatches` Adam steps on the clipped loss (`losses.ppo_clip_loss`), advantages standardised
    per minibatch if `normalize_advantages` (CleanRL's default).

    With `kl_penalty=True`, PPO-penalty instead: the loss is `losses.ppo_kl_penalty_loss` with the exact
    KL(pi_old || pi), and after the epochs beta is adapted by `losses.adaptive_kl_beta` from the mean
    KL on the whole batch (target `kl_target`, `kl_threshold`, `kl_factor`; the PPO paper's rule).
    """

    def loss_fn(params, mb, beta):
        dist, values = apply_fn(params, mb["obs"])
        log_probs = dist.log_prob(mb["actions"])
        advantages = mb["advantages"]
        if normalize_advantages:
            advantages = losses.normalize_advantages(advantages)
        if kl_penalty:
            kl = mb["old_policy"].kl(dist)
            return losses.ppo_kl_penalty_loss(
                log_probs, mb["old_log_probs"], advantages, kl, dist.entropy(), values, mb["targets"],
                beta, value_coef=value_coef, entropy_coef=entropy_coef,
            )
        return losses.ppo_clip_loss(
            log_probs, mb["old_log_probs"], advantages, dist.entropy(), values, mb["targets"],
            mb["old_values"], clip_eps=clip_eps, value_clip_eps=value_clip_eps, value_coef=value_coef,
            entropy_coef=entropy_coef,
        )

    def init(params):
        aux = {"kl_beta": jnp.asarray(kl_beta_init, jnp.float32)} if kl_penalty else {}
        return LearnerState(params, tx.init(params), aux)

    def update(state, traj, key):
        advantages, targets = _gae_batch(traj, gamma, gae_lambda)
        batch = flatten_time_batch({
            "obs": traj.obs, "actions": traj.actions, "old_log_probs": traj.log_probs,
            "advantages": advantages, "targets": targets, "old_values": traj.values,
        })
        if kl_penalty:
            batch["old_policy"] = flatten_time_batch(traj.extras["policy"])
        beta = state.aux.get("kl_beta")
        params, opt_state, metrics = minibatch_epochs(
            functools.partial(loss_fn, beta=beta), tx, state.params, state.opt_state, batch, key,
            num_epochs, num_minibatches,
        )
        aux = state.aux
        if kl_penalty:
            new_dist, _ = apply_fn(params, batch["obs"])
            kl = jnp.mean(batch["old_policy"].kl(new_dist))
            aux = {"kl_beta": losses.adaptive_kl_beta(aux["kl_beta"], kl, kl_target, kl_threshold, kl_factor)}
            metrics = {**metrics, "kl_after_update": kl}
        return LearnerState(params, opt_state, aux), metrics

    return Learner(init, update)


def make_a2c(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    *,
    gamma: float = 0.99,
    gae_lambda: float = 1.0,
    n_step: int | None = None,
    value_coef: float = 0.5,
    entropy_coef: float = 0.01,
    normalize_advantages: bool = False,
) -> Learner:
    """A2C (003 section 3.4.2; 004): one gradient step per batch on `losses.a2c_loss`.

    Advantages are GAE(gamma, `gae_lambda`) by default, or n-step returns minus V(s_t) if `n_step` is
    given (004's n-step bootstrapping, via `returns.n_step_returns`); value targets are A + V.
    """

    def loss_fn(params, batch):
        dist, values = apply_fn(params, batch["obs"])
        advantages = batch["advantages"]
        if normalize_advantages:
            advantages = losses.normalize_advantages(advantages)
        return losses.a2c_loss(
            dist.log_prob(batch["actions"]), advantages, dist.entropy(), values, batch["targets"],
            value_coef=value_coef, entropy_coef=entropy_coef,
        )

    def init(params):
        return LearnerState(params, tx.init(params))

    def update(state, traj, key):
        del key
        if n_step is None:
            advantages, targets = _gae_batch(traj, gamma, gae_lambda)
        else:
            targets = returns.n_step_returns(
                traj.rewards, traj.next_values, traj.terminated, traj.truncated, gamma, n_step
            )
            advantages = targets - traj.values
        batch = flatten_time_batch(
            {"obs": traj.obs, "actions": traj.actions, "advantages": advantages, "targets": targets}
        )
        params, opt_state, metrics = _gradient_step(loss_fn, tx, state.params, state.opt_state, batch)
        return LearnerState(params, opt_state, state.aux), metrics

    return Learner(init, update)


def complete_episode_mask(terminated: jax.Array, truncated: jax.Array) -> jax.Array:
    """1 on the steps whose episode ends inside the batch (at or after them, in the same column), 0 on
    the trailing steps of episodes that are still running at the end of the batch. `[T, B]` -> `[T, B]`."""
    done = jnp.maximum(jnp.asarray(terminated, jnp.float32), jnp.asarray(truncated, jnp.float32))
    ends_later = jnp.flip(jax.lax.cummax(jnp.flip(done, 0), axis=0), 0)
    return ends_later


def make_reinforce(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    *,
    gamma: float = 0.99,
    baseline: bool = True,
    value_coef: float = 0.5,
    entropy_coef: float = 0.0,
    normalize_advantages: bool = True,
) -> Learner:
    """REINFORCE with reward-to-go (003 section 3.3, eq. 38-40), with a learned baseline if `baseline`
    (eq. 42): one gradient step per batch on `losses.reinforce_loss`.

    Returns are Monte-Carlo reward-to-go within each episode of the `[T, B]` batch. Only steps of
    episodes that end inside the batch are used (`complete_episode_mask`): the tail of a running
    episode has no complete return yet. A time-limit truncation bootstraps from the critic's value of
    the final observation when there is a baseline, and from 0 without one.
    """

    def loss_fn(params, batch):
        dist, values = apply_fn(params, batch["obs"])
        return losses.reinforce_loss(
            dist.log_prob(batch["actions"]), batch["returns"], dist.entropy(),
            values if baseline else None, batch["mask"], normalize=normalize_advantages,
            value_coef=value_coef, entropy_coef=entropy_coef,
        )

    def init(params):
        return LearnerState(params, tx.init(params))

    def update(state, traj, key):
        del key
        reward_to_go = returns.discounted_returns(
            traj.rewards, traj.terminated, traj.truncated, gamma,
            next_values=traj.next_values * traj.truncated if baseline else None,
        )
        mask = complete_episode_mask(traj.terminated, traj.truncated)
        batch = flatten_time_batch(
            {"obs": traj.obs, "actions": traj.actions, "returns": reward_to_go, "mask": mask}
        )
        params, opt_state, metrics = _gradient_step(loss_fn, tx, state.params, state.opt_state, batch)
        metrics = {**metrics, "complete_fraction": jnp.mean(mask)}
        return LearnerState(params, opt_state, state.aux), metrics

    return Learner(init, update)
