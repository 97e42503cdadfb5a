"""The GRPO-family loss assembled from parts: per-token terms, one aggregation, metrics.

    L_{i,t} = -objective_{i,t} + kl_coef * KL_{i,t} - entropy_coef * H_{i,t} + value_coef * V_{i,t}
    loss    = sum_{i,t} w_{i,t} L_{i,t} / N

with objective = gate(ratio(log r), A) (`parts.py`), w and N from the aggregation, and V the clipped value
loss of a token critic (PPO preset). All terms share the aggregation, as in TRL (the KL is added to the
per-token loss) and verl (KL, entropy and value losses use the same `loss_agg_mode`).

Micro-batching: `loss_terms` returns the numerator sum(w L) and the batch's own normaliser N. Either sum
the numerators of all micro-batches and divide by the full batch's normaliser, or pass
`normaliser=batch_normaliser(config, full_mask)` to every micro-batch call and sum the losses: both give
exactly the full-batch loss and gradient, for every aggregation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp

from polygrad import advantages as advantages_lib
from polygrad.grpo import parts
from polygrad.importance import DEFAULT_LOG_RATIO_CLIP

METRIC_NAMES = (
    "clip_frac_low",
    "clip_frac_high",
    "dual_clip_frac",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
    "gate_mean",
    "approx_kl_old",
    "kl_ref",
    "entropy",
    "zero_adv_frac",
    "value_loss",
    "value_clip_frac",
)


# Group-advantage estimators a preset can name (`polygrad.advantages`), rewards [P, G] -> [P, G];
# "token" means per-token advantages computed elsewhere (GAE from a token critic).
ADVANTAGES = {
    "group_normalized": advantages_lib.group_normalized_advantages,
    "group_centered": advantages_lib.group_centered_advantages,
    "batch_normalized": advantages_lib.batch_normalized_advantages,
    "leave_one_out": advantages_lib.leave_one_out_advantages,
    "token": None,
}


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """A GRPO-family loss as a configuration of parts (frozen, hashable, safe to close over in jit).

    Attributes:
      ratio: a ratio part (`parts.TokenRatio()`, `parts.SequenceRatio()`, ...).
      gate: a gate part (`parts.HardClip(...)`, `parts.SoftGate(...)`, ...).
      aggregation: an aggregation part or its name (see `parts.AGGREGATIONS`).
      kl_estimator: "k1", "k2", "k3" or "k3_value_k2_grad" (`parts.KL_ESTIMATORS`).
      kl_coef: beta of the KL-to-reference penalty; with 0, a given logp_ref only feeds the metric.
      entropy_coef: coefficient of the entropy bonus (needs per-token `entropy`).
      value_coef: coefficient of the token critic's clipped value loss (needs `values` etc.).
      value_clip: clip range of the value loss, or None for the unclipped squared error.
      advantage: name of the group-advantage estimator the preset's paper uses, in
        `polygrad.advantages` ("group_normalized", "group_centered", "batch_normalized",
        "leave_one_out"), or "token" for per-token advantages computed elsewhere (GAE).
      log_ratio_clip: log-ratios are clamped to [-c, c] before `exp`.
    """

    ratio: Any = parts.TokenRatio()
    gate: Any = parts.HardClip()
    aggregation: Any = "seq_mean_token_mean"
    kl_estimator: str = "k3"
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    value_coef: float = 0.0
    value_clip: float | None = 0.2
    advantage: str = "group_normalized"
    log_ratio_clip: float = DEFAULT_LOG_RATIO_CLIP

    def __post_init__(self):
        if isinstance(self.aggregation, str):
            if self.aggregation not in parts.AGGREGATIONS:
                raise ValueError(
                    f"unknown aggregation {self.aggregation!r}; choose from {sorted(parts.AGGREGATIONS)}"
                )
            object.__setattr__(self, "aggregation", parts.AGGREGATIONS[self.aggregation])
        if self.kl_estimator not in parts.KL_ESTIMATORS:
            raise ValueError(
                f"unknown kl_estimator {self.kl_estimator!r}; choose from {sorted(parts.KL_ESTIMATORS)}"
            )
        for name in ("kl_coef", "entropy_coef", "value_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.value_clip is not None and self.value_clip <= 0:
            raise ValueError(f"value_clip must be > 0 or None, got {self.value_clip}")
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"unknown advantage {self.advantage!r}; choose from {sorted(ADVANTAGES)}")
        if self.log_ratio_clip <= 0:
            raise ValueError(f"log_ratio_clip must be > 0, got {self.log_ratio_clip}")


def group_advantages(config: LossConfig, rewards: jax.Array) -> jax.Array:
    """The preset's group advantages for rewards `[P, G]`, flattened to `[P * G]` (prompt-major rows).

    Uses each estimator's defaults (`polygrad.advantages`); call the estimator directly for other
    options. Raises ValueError for a config whose advantages are per token ("token").
    """
    estimator = ADVANTAGES[config.advantage]
    if estimator is None:
        raise ValueError("this config uses per-token advantages (e.g. GAE); compute them with a critic")
    return estimator(rewards).reshape(-1)


def batch_normaliser(config: LossConfig, mask: jax.Array) -> jax.Array:
    """The aggregation's normaliser N of a whole batch, from its response mask `[B, T]` -> scalar.

    Compute it once from the full (global) batch and pass it as `normaliser=` to every micro-batch's
    loss; the micro-batch losses and gradients then sum exactly to the full batch's. An empty batch
    gives N = 0, which the loss treats as 1 (loss 0).
    """
    chex.assert_rank(mask, 2)
    return config.aggregation.normaliser(jnp.asarray(mask, jnp.float32))


def _masked_stats(x: jax.Array, mask: jax.Array, count: jax.Array) -> tuple[jax.Array, ...]:
    active = mask > 0
    mean = jnp.sum(jnp.where(active, x, 0.0)) / count
    big = jnp.finfo(x.dtype).max
    lo = jnp.min(jnp.where(active, x, big))
    hi = jnp.max(jnp.where(active, x, -big))
    empty = jnp.sum(mask) == 0
    return mean, jnp.where(empty, 0.0, lo), jnp.where(empty, 0.0, hi)


def _zero_advantage_fraction(advantages: jax.Array, mask: jax.Array, group_size: int | None) -> jax.Array:
    """Fraction of responses (or of groups, with `group_size`) whose active advantages are all 0."""
    active = mask > 0
    zero_row = jnp.all(jnp.where(active, advantages == 0, True), axis=-1)
    nonempty = jnp.any(active, axis=-1)
    if group_size is None:
        flags, keep = zero_row, nonempty
    else:
        if advantages.shape[0] % group_size:
            raise ValueError(f"batch size {advantages.shape[0]} is not a multiple of group_size {group_size}")
        flags = jnp.all(zero_row.reshape(-1, group_size), axis=-1)
        keep = jnp.any(nonempty.reshape(-1, group_size), axis=-1)
    return jnp.sum(flags & keep) / jnp.maximum(jnp.sum(keep), 1)


def loss_terms(
    config: LossConfig,
    logp_new: jax.Array,
    logp_old: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    logp_ref: jax.Array | None = None,
    entropy: jax.Array | None = None,
    *,
    values: jax.Array | None = None,
    values_old: jax.Array | None = None,
    returns: jax.Array | None = None,
    group_size: int | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Numerator sum(w L), this batch's normaliser N, and metrics of a GRPO-family loss.

    Args:
      config: the loss configuration (a preset from `presets.PRESETS` or your own).
      logp_new: `[B, T]` log pi_theta(y_t | x, y_<t) of the sampled tokens (differentiated).
      logp_old: `[B, T]` log-probs under the behaviour policy pi_old (treated as constants).
      advantages: `[B]` per response (broadcast over tokens) or `[B, T]` per token.
      mask: `[B, T]` float or bool response mask (1 on response tokens, 0 on padding / masked rows).
      logp_ref: `[B, T]` reference log-probs; required when `config.kl_coef > 0`.
      entropy: `[B, T]` per-token policy entropy; required when `config.entropy_coef > 0`.
      values, values_old, returns: `[B, T]` token-critic predictions (differentiated), their values at
        sampling time and the value targets; required when `config.value_coef > 0`.
      group_size: if given, `zero_adv_frac` counts groups of consecutive rows instead of responses.

    Returns:
      `(numerator, normaliser, metrics)`; the loss is numerator / normaliser (0 counts as 1). Masked tokens
      never affect any output (their inputs are replaced by zeros before use) and every output is finite
      for all-masked rows, all-equal groups and extreme ratios. Metrics (scalars, stop-gradient, means
      over active tokens of this batch): clip fractions low / high / dual, ratio mean / min / max (of the
      ratio the gate sees), gate mean, approx KL(pi_old || pi_theta) as E[(r - 1) - log r] (k3 with
      token ratios), KL to the reference (the configured estimator), entropy, the zero-advantage fraction,
      the value loss and its clip fraction.
    """
    chex.assert_rank([logp_new, logp_old, mask], 2)
    chex.assert_equal_shape([logp_new, logp_old, mask])
    chex.assert_rank(advantages, {1, 2})
    if advantages.ndim == 1:
        chex.assert_axis_dimension(advantages, 0, logp_new.shape[0])
        advantages = jnp.broadcast_to(advantages[:, None], logp_new.shape)
    chex.assert_equal_shape([advantages, logp_new])

    mask = jnp.asarray(mask, jnp.float32)
    active = mask > 0

    def clean(x):
        return jnp.where(active, x, 0.0)

    logp_new = clean(logp_new)
    logp_old = clean(jax.lax.stop_gradient(logp_old))
    advantages = clean(jax.lax.stop_gradient(advantages))

    log_ratio = jnp.clip(logp_new - logp_old, -config.log_ratio_clip, config.log_ratio_clip)
    ratio_out = config.ratio(log_ratio, mask, advantages)
    gate_out = config.gate(ratio_out.log_ratio, advantages, logp_new)
    per_token = -gate_out.objective

    zero = jnp.zeros((), jnp.float32)
    kl_ref_mean, entropy_mean, value_mean, value_clip_frac = zero, zero, zero, zero
    token_count = jnp.maximum(jnp.sum(mask), 1.0)
    if logp_ref is not None:
        chex.assert_equal_shape([logp_ref, logp_new])
        kl = parts.KL_ESTIMATORS[config.kl_estimator](logp_new, clean(jax.lax.stop_gradient(logp_ref)))
        kl_ref_mean = jnp.sum(clean(kl)) / token_count
        if config.kl_coef > 0:
            per_token = per_token + config.kl_coef * kl
    elif config.kl_coef > 0:
        raise ValueError(f"kl_coef={config.kl_coef} > 0 needs logp_ref")
    if entropy is not None:
        chex.assert_equal_shape([entropy, logp_new])
        entropy = clean(entropy)
        entropy_mean = jnp.sum(entropy) / token_count
        if config.entropy_coef > 0:
            per_token = per_token - config.entropy_coef * entropy
    elif config.entropy_coef > 0:
        raise ValueError(f"entropy_coef={config.entropy_coef} > 0 needs per-token entropy")
    if config.value_coef > 0:
        if values is None or values_old is None or returns is None:
            raise ValueError(f"value_coef={config.value_coef} > 0 needs values, values_old and returns")
        chex.assert_equal_shape([values, values_old, returns, logp_new])
        value_loss, value_clipped = clipped_value_loss(
            clean(values), clean(jax.lax.stop_gradient(values_old)), clean(jax.lax.stop_gradient(returns)),
            config.value_clip,
        )
        per_token = per_token + config.value_coef * value_loss
        value_mean = jnp.sum(clean(value_loss)) / token_count
        value_clip_frac = jnp.sum(clean(value_clipped.astype(jnp.float32))) / token_count

    weights = config.aggregation.token_weights(mask)
    numerator = jnp.sum(jnp.where(active, weights * per_token, 0.0))
    normaliser = config.aggregation.normaliser(mask)

    sg = jax.lax.stop_gradient
    token_ratio = jnp.exp(sg(log_ratio))
    used_ratio = jnp.exp(sg(ratio_out.log_ratio))
    ratio_mean, ratio_min, ratio_max = _masked_stats(used_ratio, mask, token_count)

    def frac(flags):
        return jnp.sum(jnp.where(active & flags, 1.0, 0.0)) / token_count

    metrics = {
        "clip_frac_low": frac(gate_out.clipped_low | ratio_out.clipped_low),
        "clip_frac_high": frac(gate_out.clipped_high | ratio_out.clipped_high),
        "dual_clip_frac": frac(gate_out.dual_clipped),
        "ratio_mean": ratio_mean,
        "ratio_min": ratio_min,
        "ratio_max": ratio_max,
        "gate_mean": jnp.sum(clean(sg(gate_out.gate))) / token_count,
        "approx_kl_old": jnp.sum(clean(token_ratio - 1.0 - sg(log_ratio))) / token_count,
        "kl_ref": sg(kl_ref_mean),
        "entropy": sg(entropy_mean),
        "zero_adv_frac": _zero_advantage_fraction(advantages, mask, group_size),
        "value_loss": sg(value_mean),
        "value_clip_frac": value_clip_frac,
    }
    return numerator, normaliser, metrics


def clipped_value_loss(
    values: jax.Array, values_old: jax.Array, returns: jax.Array, clip: float | None
) -> tuple[jax.Array, jax.Array]:
    """Per-token PPO value loss 0.5 max((v - R)^2, (v_old + clip(v - v_old, -c, c) - R)^2), `[B, T]`.

    The clipped critic loss of PPO implementations (OpenAI baselines; verl's `compute_value_loss`, which
    also halves it). `clip=None` gives 0.5 (v - R)^2. Returns the loss and where the clipped branch won.
    """
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * unclipped, jnp.zeros(values.shape, dtype=bool)
    held = values_old + jnp.clip(values - values_old, -clip, clip)
    clipped = (held - returns) ** 2
    return 0.5 * jnp.maximum(unclipped, clipped), clipped > unclipped


def grpo_loss(
    config: LossConfig,
    logp_new: jax.Array,
    logp_old: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    logp_ref: jax.Array | None = None,
    entropy: jax.Array | None = None,
    *,
    normaliser: jax.Array | float | None = None,
    values: jax.Array | None = None,
    values_old: jax.Array | None = None,
    returns: jax.Array | None = None,
    group_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO-family loss (a scalar to MINIMISE) and metrics; see `loss_terms` for the arguments.

    `normaliser=None` normalises by this batch (the whole batch is one step). For gradient accumulation
    or data parallelism pass `batch_normaliser(config, full_batch_mask)`: the sum of the micro-batch
    losses (and gradients) is then exactly the full-batch loss (and gradient).
    """
    numerator, own, metrics = loss_terms(
        config, logp_new, logp_old, advantages, mask, logp_ref, entropy,
        values=values, values_old=values_old, returns=returns, group_size=group_size,
    )
    denominator = own if normaliser is None else jnp.asarray(normaliser, jnp.float32)
    loss = numerator / jnp.where(denominator > 0, denominator, 1.0)
    return loss, metrics
