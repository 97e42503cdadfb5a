"""Importance sampling: ratios, trajectory weights and the off-policy estimators of 003 section 1.3.

Samples come from a behaviour (proposal) distribution q and estimate expectations under a target p
(003 eq. 4-5). In RL, q is the policy that collected the data (pi) and p the policy being evaluated
(pi'); per-step weights are pi'(a_t|s_t) / pi(a_t|s_t) and a trajectory's weight is their product
(003 section 4.1.2), whose variance grows exponentially with the horizon.

Log-ratios are clamped to [-clip, clip] before `exp`, so no weight overflows float32. Degenerate inputs
are defined, never NaN: masked steps are removed with `where` (so a -inf log-probability on a masked step
cannot leak), the log-ratio of two equal log-probabilities is 0 even when both are -inf (an action that
neither policy can take), and the effective sample size is computed from rescaled weights so that huge
weights do not overflow. Every function follows the dtype of its inputs.
"""

import chex
import jax
import jax.numpy as jnp

from polygrad import validate

DEFAULT_LOG_RATIO_CLIP = 20.0


def log_ratios(logp_new: jax.Array, logp_old: jax.Array, clip: float = DEFAULT_LOG_RATIO_CLIP) -> jax.Array:
    """Clamped log importance ratios log p(x) - log q(x), any shape (elementwise).

    Where the two log-probabilities are equal the log-ratio is exactly 0, also when both are -inf (x is
    impossible under both policies: the ratio is taken as 1 instead of the undefined -inf - (-inf)).
    """
    chex.assert_equal_shape([logp_new, logp_old])
    diff = jnp.where(logp_new == logp_old, jnp.zeros((), logp_new.dtype), logp_new - logp_old)
    return jnp.clip(diff, -clip, clip)


def ratios(logp_new: jax.Array, logp_old: jax.Array, clip: float = DEFAULT_LOG_RATIO_CLIP) -> jax.Array:
    """Importance ratios w = p(x) / q(x) = exp(clamped log-ratio), any shape (003 eq. 4)."""
    return jnp.exp(log_ratios(logp_new, logp_old, clip))


def _masked_log_ratios(step_log_ratios: jax.Array, mask: jax.Array | None) -> jax.Array:
    """`[T, N]` log-ratios with masked steps set to 0 by `where` (a -inf there cannot become NaN)."""
    chex.assert_rank(step_log_ratios, 2)
    if mask is None:
        return step_log_ratios
    chex.assert_equal_shape([step_log_ratios, mask])
    return jnp.where(mask > 0, step_log_ratios, jnp.zeros((), step_log_ratios.dtype))


def trajectory_log_weights(step_log_ratios: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Unclamped trajectory log-weights sum_t log rho_t over the unmasked steps, `[T, N]` -> `[N]`.

    The log-space form of `trajectory_weights`, for `effective_sample_size_from_log_weights` and for
    self-normalised estimates that must not overflow. A -inf step gives a -inf log-weight (weight 0).
    """
    return jnp.sum(_masked_log_ratios(step_log_ratios, mask), axis=0)


def trajectory_weights(
    step_log_ratios: jax.Array, mask: jax.Array | None = None, clip: float = DEFAULT_LOG_RATIO_CLIP
) -> jax.Array:
    """Trajectory weights prod_t pi'(a_t|s_t) / pi(a_t|s_t) (003 section 4.1.2, eq. 13 form).

    Computed in log space: the summed log-weight is clamped, then exponentiated.

    Args:
      step_log_ratios: `[T, N]` per-step log-ratios of N trajectories (time-major).
      mask: optional `[T, N]`, nonzero on steps that belong to the trajectory (0 after it ended);
        masked steps are ignored whatever they hold (-inf included).
      clip: the summed log-weight is clamped to [-clip, clip] before `exp`.

    Returns:
      `[N]` weights.
    """
    return jnp.exp(jnp.clip(trajectory_log_weights(step_log_ratios, mask), -clip, clip))


def cumulative_weights(
    step_log_ratios: jax.Array, mask: jax.Array | None = None, clip: float = DEFAULT_LOG_RATIO_CLIP
) -> jax.Array:
    """Per-decision weights w_{0:t} = prod_{k<=t} rho_k for every prefix, `[T, N]` -> `[T, N]`.

    Masked steps contribute a factor 1 (they are ignored, whatever they hold); each prefix's log-weight
    is clamped to [-clip, clip] before `exp`.
    """
    step_log_ratios = _masked_log_ratios(step_log_ratios, mask)
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
    safe_total = jnp.where(total > 0, total, jnp.ones((), total.dtype))
    return jnp.where(total > 0, jnp.sum(weights * values) / safe_total, jnp.zeros((), total.dtype))


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
      mask: optional `[T, N]`, nonzero on valid steps; masked steps add nothing (whatever they hold).

    Returns:
      scalar estimate, in the dtype of `step_log_ratios` and `rewards` (promoted).
    """
    chex.assert_equal_shape([step_log_ratios, rewards])
    dtype = jnp.result_type(step_log_ratios, rewards, float)
    weights = cumulative_weights(step_log_ratios.astype(dtype), mask, clip)  # finite: clamped logs
    rewards = rewards.astype(dtype)
    if mask is not None:  # before the product, so that neither value nor gradient sees 0 * inf
        rewards = jnp.where(mask > 0, rewards, jnp.zeros((), dtype))
    terms = weights * rewards
    discounts = jnp.asarray(gamma, dtype) ** jnp.arange(rewards.shape[0], dtype=dtype)
    return jnp.mean(jnp.sum(discounts[:, None] * terms, axis=0))


def capped_weights(weights: jax.Array, cap: float) -> jax.Array:
    """Truncated weights min(w, cap) (003 Remark 1.3; Ionides, 2008), any shape. Biased, bounded.

    A concrete `cap` must be finite and > 0 (`ValueError` otherwise, NaN included).
    """
    if not isinstance(cap, jax.core.Tracer):
        validate.positive("capped_weights cap", float(cap))
    return jnp.minimum(weights, jnp.asarray(cap, weights.dtype))


def _kish(scaled: jax.Array, any_positive: jax.Array) -> jax.Array:
    """(sum u)^2 / sum u^2 of weights u in [0, 1] whose largest is 1; 0 when `any_positive` is False."""
    one, zero = jnp.ones((), scaled.dtype), jnp.zeros((), scaled.dtype)
    sum_sq = jnp.sum(scaled**2)
    return jnp.where(any_positive, jnp.sum(scaled) ** 2 / jnp.where(any_positive, sum_sq, one), zero)


def effective_sample_size(weights: jax.Array) -> jax.Array:
    """Kish's effective sample size (sum w)^2 / sum w^2, `[N]` -> scalar in [1, N] (0 if all w are 0).

    The (non-negative) weights are first scaled by a power of two that brings the largest to [0.5, 1),
    which leaves the ratio unchanged and keeps w^2 from overflowing (or underflowing): weights of 1e30 in
    float32 give the right answer, not inf / inf. Infinite weights dominate: with k of them the result
    is k.
    """
    chex.assert_rank(weights, 1)
    largest = jnp.max(weights)
    one, zero = jnp.ones((), weights.dtype), jnp.zeros((), weights.dtype)
    # Two power-of-two factors, each a normal number: one 2^-128 would be flushed to zero on XLA:CPU.
    _, exponent = jnp.frexp(jax.lax.stop_gradient(jnp.where(jnp.isfinite(largest), largest, one)))
    half = exponent // 2
    finite_scale = weights * jnp.ldexp(one, -half) * jnp.ldexp(one, half - exponent)
    scaled = jnp.where(jnp.isposinf(largest), jnp.where(jnp.isposinf(weights), one, zero), finite_scale)
    return _kish(scaled, largest > 0)


def effective_sample_size_from_log_weights(
    log_weights: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Kish's effective sample size from log-weights, (sum w)^2 / sum w^2 with w = exp(l): `[N]` -> scalar.

    Computed as `effective_sample_size` of exp(l - max l), so it never overflows whatever the log-weights
    (e.g. the `trajectory_log_weights` of long horizons, which `trajectory_weights` would clamp). Entries
    with `mask == 0` are left out (whatever they hold); -inf log-weights are weights 0; if no weight is
    positive the result is 0.
    """
    chex.assert_rank(log_weights, 1)
    if mask is not None:
        chex.assert_equal_shape([log_weights, mask])
        log_weights = jnp.where(mask > 0, log_weights, -jnp.inf)
    largest = jnp.max(log_weights)
    one, zero = jnp.ones((), log_weights.dtype), jnp.zeros((), log_weights.dtype)
    shift = jnp.where(jnp.isfinite(largest), largest, zero)
    finite_scale = jnp.exp(log_weights - shift)
    scaled = jnp.where(jnp.isposinf(largest), jnp.where(jnp.isposinf(log_weights), one, zero), finite_scale)
    return _kish(scaled, largest > -jnp.inf)
