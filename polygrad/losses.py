"""Policy-gradient losses for control: REINFORCE, A2C, PPO-clip and PPO with an adaptive KL penalty.

Each loss is a pure function of per-sample arrays of one shape `[N]` (or `[T, B]`; every reduction is
a mean over all elements, weighted by an optional 0/1 `mask` of the same shape) and returns
`(loss, metrics)`: `loss` is the scalar to MINIMISE (the negated objective of the notes) and `metrics`
always holds the same diagnostics, so that every algorithm logs the same columns:

  loss, policy_loss, value_loss, entropy; approx_kl = mean((r - 1) - log r), the k3 estimate of
  KL(pi_old || pi) from the ratios r = pi / pi_old (Schulman, 2020); clip_fraction = fraction of
  samples with |r - 1| > clip_eps (0 for losses without clipping); explained_variance of the value
  targets by the values.

Losses that take a single gradient step on fresh data (REINFORCE, A2C) get `old_log_probs=None`, which
means "the data's own policy", so their ratio is 1 and approx_kl and clip_fraction are 0.

The value loss is 0.5 * (V - V_targ)^2 (003 eq. 82 times 1/2, as in the PPO baselines and CleanRL, so
that the CleanRL coefficient c1 = 0.5 carries over unchanged).
"""

import chex
import jax
import jax.numpy as jnp

from polygrad import importance

Metrics = dict[str, jax.Array]


def masked_mean(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean of `x` over all elements, or over the elements where `mask` is 1 (0 if the mask is empty)."""
    if mask is None:
        return jnp.mean(x)
    chex.assert_equal_shape([x, mask])
    mask = jnp.asarray(mask, x.dtype)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def normalize_advantages(
    advantages: jax.Array, mask: jax.Array | None = None, eps: float = 1e-8
) -> jax.Array:
    """(A - mean A) / (std A + eps) over the (masked) batch; equal advantages give exactly 0."""
    mean = masked_mean(advantages, mask)
    std = jnp.sqrt(masked_mean((advantages - mean) ** 2, mask))
    return (advantages - mean) / (std + eps)


def explained_variance(values: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """1 - Var[targets - values] / Var[targets]: 1 for a perfect critic, 0 for a constant one.

    Defined as 0 when the targets have no variance (instead of 0/0). Scalar.
    """
    chex.assert_equal_shape([values, targets])
    var_targets = masked_mean((targets - masked_mean(targets, mask)) ** 2, mask)
    residual = targets - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return jnp.where(var_targets > 1e-8, 1.0 - var_residual / jnp.maximum(var_targets, 1e-8), 0.0)


def value_loss(
    values: jax.Array,
    targets: jax.Array,
    old_values: jax.Array | None = None,
    clip_eps: float | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """0.5 * mean (V - V_targ)^2 (003 eq. 82), optionally clipped around the old values.

    With `clip_eps`, the PPO baselines' clipped value loss
    0.5 * mean max((V - V_targ)^2, (V_old + clip(V - V_old, -eps, eps) - V_targ)^2). Scalar.
    """
    chex.assert_equal_shape([values, targets])
    squared = (values - targets) ** 2
    if clip_eps is not None:
        if old_values is None:
            raise ValueError("a clipped value loss needs old_values")
        clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
        squared = jnp.maximum(squared, (clipped - targets) ** 2)
    return 0.5 * masked_mean(squared, mask)


def _diagnostics(
    log_probs: jax.Array,
    old_log_probs: jax.Array | None,
    entropy: jax.Array,
    values: jax.Array | None,
    targets: jax.Array | None,
    clip_eps: float | None,
    mask: jax.Array | None,
) -> Metrics:
    """approx_kl, clip_fraction, entropy and explained_variance, none of them differentiated."""
    log_probs, entropy = jax.lax.stop_gradient((log_probs, entropy))
    if old_log_probs is None:
        approx_kl = clip_fraction = jnp.zeros((), jnp.float32)
    else:
        log_ratio = importance.log_ratios(log_probs, old_log_probs)
        ratio = jnp.exp(log_ratio)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
        if clip_eps is None:
            clip_fraction = jnp.zeros((), jnp.float32)
        else:
            clip_fraction = masked_mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32), mask)
    if values is None:
        ev = jnp.zeros((), jnp.float32)
    else:
        ev = explained_variance(jax.lax.stop_gradient(values), targets, mask)
    return {
        "entropy": masked_mean(entropy, mask),
        "approx_kl": approx_kl,
        "clip_fraction": clip_fraction,
        "explained_variance": ev,
    }


def _combine(policy_loss, v_loss, entropy, value_coef, entropy_coef, mask, diagnostics):
    loss = policy_loss + value_coef * v_loss - entropy_coef * masked_mean(entropy, mask)
    metrics = {"loss": loss, "policy_loss": policy_loss, "value_loss": v_loss, **diagnostics}
    return loss, jax.lax.stop_gradient(metrics)


def reinforce_loss(
    log_probs: jax.Array,
    returns: jax.Array,
    entropy: jax.Array,
    values: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    normalize: bool = False,
    value_coef: float = 0.5,
    entropy_coef: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """REINFORCE with reward-to-go, with or without a learned baseline (003 eq. 39 and 42).

    policy_loss = -mean log pi(a_t|s_t) * A_t with A_t = G_t (no baseline, `values=None`) or
    A_t = G_t - V(s_t) (the baseline's gradient stopped in this term); the baseline itself is fitted by
    the value loss 0.5 * mean (V(s_t) - G_t)^2. With `normalize`, A is standardised over the batch.

    Args:
      log_probs: log pi(a_t|s_t) under the parameters being differentiated, `[N]`.
      returns: reward-to-go G_t, `[N]`.
      entropy: policy entropy at s_t, `[N]` (bonus weighted by `entropy_coef`).
      values: baseline V(s_t) `[N]` or None.
      mask: optional 0/1 `[N]`, 0 for samples to ignore (e.g. steps of unfinished episodes).
    """
    chex.assert_equal_shape([log_probs, returns, entropy])
    returns = jax.lax.stop_gradient(returns)
    if values is None:
        advantages = returns
        v_loss = jnp.zeros((), jnp.float32)
    else:
        advantages = returns - jax.lax.stop_gradient(values)
        v_loss = value_loss(values, returns, mask=mask)
    if normalize:
        advantages = normalize_advantages(advantages, mask)
    policy_loss = -masked_mean(log_probs * advantages, mask)
    diagnostics = _diagnostics(log_probs, None, entropy, values, returns, None, mask)
    return _combine(policy_loss, v_loss, entropy, value_coef if values is not None else 0.0, entropy_coef,
                    mask, diagnostics)


def a2c_loss(
    log_probs: jax.Array,
    advantages: jax.Array,
    entropy: jax.Array,
    values: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    value_coef: float = 0.5,
    entropy_coef: float = 0.01,
) -> tuple[jax.Array, Metrics]:
    """Advantage actor-critic loss (003 section 3.4.2, eq. 45 and 47; 004 A2C).

    -mean log pi(a_t|s_t) A_t + value_coef * 0.5 mean (V(s_t) - V_targ_t)^2 - entropy_coef * mean H,
    with advantages (n-step or GAE, computed by the caller from the old critic) and targets held fixed.
    """
    chex.assert_equal_shape([log_probs, advantages, entropy, values, targets])
    advantages, targets = jax.lax.stop_gradient((advantages, targets))
    policy_loss = -masked_mean(log_probs * advantages, mask)
    v_loss = value_loss(values, targets, mask=mask)
    diagnostics = _diagnostics(log_probs, None, entropy, values, targets, None, mask)
    return _combine(policy_loss, v_loss, entropy, value_coef, entropy_coef, mask, diagnostics)


def ppo_clip_loss(
    log_probs: jax.Array,
    old_log_probs: jax.Array,
    advantages: jax.Array,
    entropy: jax.Array,
    values: jax.Array,
    targets: jax.Array,
    old_values: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    clip_eps: float = 0.2,
    value_clip_eps: float | None = None,
    value_coef: float = 0.5,
    entropy_coef: float = 0.01,
) -> tuple[jax.Array, Metrics]:
    """The PPO-clip actor-critic loss, the negation of 003 eq. (85).

    policy_loss = -mean min(r A, clip(r, 1 - eps, 1 + eps) A) with r = pi/pi_old (003 eq. 76-79, the
    log-ratio clamped before exp); value loss as `value_loss`, clipped around `old_values` when
    `value_clip_eps` is given; minus `entropy_coef` times the mean entropy (eq. 83).
    """
    chex.assert_equal_shape([log_probs, old_log_probs, advantages, entropy, values, targets])
    advantages, targets = jax.lax.stop_gradient((advantages, targets))
    ratio = importance.ratios(log_probs, old_log_probs)
    surrogate = jnp.minimum(ratio * advantages, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages)
    policy_loss = -masked_mean(surrogate, mask)
    v_loss = value_loss(values, targets, old_values, value_clip_eps, mask)
    diagnostics = _diagnostics(log_probs, old_log_probs, entropy, values, targets, clip_eps, mask)
    return _combine(policy_loss, v_loss, entropy, value_coef, entropy_coef, mask, diagnostics)


def ppo_kl_penalty_loss(
    log_probs: jax.Array,
    old_log_probs: jax.Array,
    advantages: jax.Array,
    kl: jax.Array,
    entropy: jax.Array,
    values: jax.Array,
    targets: jax.Array,
    beta: jax.Array | float,
    mask: jax.Array | None = None,
    *,
    value_coef: float = 0.5,
    entropy_coef: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """PPO with a KL penalty (003 section 4.7.4, "Optional: KL-penalty"; 002 PPO-Penalty; 004).

    policy_loss = -mean (r A - beta KL(pi_old(.|s) || pi(.|s))) with `kl` the per-sample exact KL `[N]`
    (differentiable in the new policy) and `beta` held fixed within the update (adapt it between
    updates with `adaptive_kl_beta`). Metrics add `kl` (mean exact KL) and `beta`.
    """
    chex.assert_equal_shape([log_probs, old_log_probs, advantages, kl, entropy, values, targets])
    advantages, targets, beta = jax.lax.stop_gradient((advantages, targets, jnp.asarray(beta, jnp.float32)))
    ratio = importance.ratios(log_probs, old_log_probs)
    policy_loss = -masked_mean(ratio * advantages - beta * kl, mask)
    v_loss = value_loss(values, targets, mask=mask)
    diagnostics = _diagnostics(log_probs, old_log_probs, entropy, values, targets, None, mask)
    diagnostics = {**diagnostics, "kl": masked_mean(jax.lax.stop_gradient(kl), mask), "beta": beta}
    return _combine(policy_loss, v_loss, entropy, value_coef, entropy_coef, mask, diagnostics)


def adaptive_kl_beta(
    beta: jax.Array | float,
    kl: jax.Array | float,
    target_kl: float,
    threshold: float = 1.5,
    factor: float = 2.0,
    min_beta: float = 1e-6,
    max_beta: float = 1e6,
) -> jax.Array:
    """The PPO paper's adaptive penalty rule (Schulman et al., 2017, section 4; 004, with the seeds' errata).

    beta / factor if kl < target_kl / threshold; beta * factor if kl > target_kl * threshold; else beta;
    then clipped to [min_beta, max_beta], so that a long run of small (or large) KLs cannot drive beta
    to 0 or to infinity in float32. The paper uses threshold 1.5 and factor 2 (004 writes threshold 2).
    Scalar.
    """
    if threshold <= 1.0 or factor <= 1.0:
        raise ValueError(f"adaptive_kl_beta needs threshold > 1 and factor > 1, got {threshold}, {factor}")
    beta = jnp.asarray(beta, jnp.float32)
    beta = jnp.where(kl < target_kl / threshold, beta / factor, beta)
    beta = jnp.where(kl > target_kl * threshold, beta * factor, beta)
    return jnp.clip(beta, min_beta, max_beta)
