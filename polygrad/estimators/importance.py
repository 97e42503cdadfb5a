"""Importance sampling: ratios, trajectory weights and the off-policy estimators of 003 section 1.3.

Samples come from a behaviour (proposal) distribution q and estimate expectations under a target p
(003 eq. 4-5). In RL, q is the policy that collected the data (pi) and p the policy being evaluated
(pi'); per-step weights are pi'(a_t|s_t) / pi(a_t|s_t) and a trajectory's weight is their product
(003 section 4.1.2), whose variance grows exponentially with the horizon.

Log-ratios are clamped to [-clip, clip] before `exp`, so no weight overflows float32.
"""

import chex
import jax
import jax.numpy as jnp

DEFAULT_LOG_RATIO_CLIP = 20.0


def log_ratios(logp_new: jax.Array, logp_old: jax.Array, clip: float = DEFAULT_LOG_RATIO_CLIP) -> jax.Array:
    """Clamped log importance ratios log p(x) - log q(x), any shape (elementwise)."""
    chex.assert_equal_shape([logp_new, logp_old])
    return jnp.clip(logp_new - logp_old, -clip, clip)


def ratios(logp_new: jax.Array, logp_old: jax.Array, clip: float = DEFAULT_LOG_RATIO_CLIP) -> jax.Array:
    """Importance ratios w = p(x) / q(x) = exp(clamped log-ratio), any shape (003 eq. 4)."""
    return jnp.exp(log_ratios(logp_new, logp_old, clip))


def trajectory_weights(
    step_log_ratios: jax.Array, mask: jax.Array | None = None, clip: float = DEFAULT_LOG_RATIO_CLIP
) -> jax.Array:
    """Trajectory weights prod_t pi'(a_t|s_t) / pi(a_t|s_t) (003 section 4.1.2, eq. 13 form).

    Args:
      step_log_ratios: `[T, N]` per-step log-ratios of N trajectories (time-major).
      mask: optional `[T, N]`, 1 on steps that belong to the trajectory (0 after it ended).
      clip: the summed log-weight is clamped to [-clip, clip] before `exp`.

    Returns:
      `[N]` weights.
    """
    chex.assert_rank(step_log_ratios, 2)
    if mask is not None:
        chex.assert_equal_shape([step_log_ratios, mask])
        step_log_ratios = step_log_ratios * mask
    return jnp.exp(jnp.clip(jnp.sum(step_log_ratios, axis=0), -clip, clip))


def cumulative_weights(
    step_log_ratios: jax.Array, mask: jax.Array | None = None, clip: float = DEFAULT_LOG_RATIO_CLIP
) -> jax.Array:
    """Per-decision weights w_{0:t} = prod_{k<=t} rho_k for every prefix, `[T, N]` -> `[T, N]`."""
    chex.assert_rank(step_log_ratios, 2)
    if mask is not None:
        chex.assert_equal_shape([step_log_ratios, mask])
        step_log_ratios = step_log_ratios * mask
    # associative_scan: XLA:CPU lowers jnp.cumsum over a long axis far more slowly.
    log_weights = jax.lax.associative_scan(jnp.add, step_log_ratios, axis=0)
    return jnp.exp(jnp.clip(log_weights, -clip, clip))


def ordinary_is(weights: jax.Array, values: jax.Array) -> jax.Array:
    """Ordinary IS estimate (1/N) sum_i w_i f(x_i) (003 eq. 5), `[N]`, `[N]` -> scalar. Unbiased."""
    chex.assert_rank(weights, 1)
    chex.assert_equal_shape([weights, values])
    return jnp.mean(weights * values)


def self_normalised_is(weights: jax.Array, values: jax.Array) -> jax.Array:
    """Self-normalised IS estimate sum_i w_i f_i / sum_i w_i (003 Remark 1.3), `[N]`, `[N]` -> scalar.

    Biased for finite N but usually lower variance. All-zero weights give 0 (no information), not NaN.
    """
    chex.assert_rank(weights, 1)
    chex.assert_equal_shape([weights, values])
    total = jnp.sum(weights)
    safe_total = jnp.where(total > 0, total, 1.0)
    return jnp.where(total > 0, jnp.sum(weights * values) / safe_total, 0.0)


def per_decision_is(
    step_log_ratios: jax.Array,
    rewards: jax.Array,
    gamma: float,
    mask: jax.Array | None = None,
    clip: float = DEFAULT_LOG_RATIO_CLIP,
) -> jax.Array:
    """Per-decision IS estimate of the discounted return (Precup et al., 2000; 003 section 4.1.2).

    (1/N) sum_i sum_t gamma^t (prod_{k<=t} rho^i_k) r^i_t: each reward is weighted only by the ratios
    of the actions taken before it, which keeps the estimator unbiased with lower variance than the
    whole-trajectory weight.

    Args:
      step_log_ratios, rewards: `[T, N]`, time-major.
      gamma: discount factor.
      mask: optional `[T, N]`, 1 on valid steps.

    Returns:
      scalar estimate.
    """
    chex.assert_equal_shape([step_log_ratios, rewards])
    weights = cumulative_weights(step_log_ratios, mask, clip)
    if mask is not None:
        rewards = rewards * mask
    discounts = gamma ** jnp.arange(rewards.shape[0], dtype=jnp.float32)
    return jnp.mean(jnp.sum(discounts[:, None] * weights * rewards, axis=0))


def capped_weights(weights: jax.Array, cap: float) -> jax.Array:
    """Truncated weights min(w, cap) (003 Remark 1.3; Ionides, 2008), any shape. Biased, bounded."""
    if cap <= 0:
        raise ValueError(f"capped_weights needs cap > 0, got {cap}")
    return jnp.minimum(weights, cap)


def effective_sample_size(weights: jax.Array) -> jax.Array:
    """Kish's effective sample size (sum w)^2 / sum w^2, `[N]` -> scalar in [1, N] (0 if all w are 0)."""
    chex.assert_rank(weights, 1)
    sum_sq = jnp.sum(weights**2)
    safe = jnp.where(sum_sq > 0, sum_sq, 1.0)
    return jnp.where(sum_sq > 0, jnp.sum(weights) ** 2 / safe, 0.0)
