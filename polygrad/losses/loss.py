"""Every policy-gradient loss assembled from parts: per-token terms, one aggregation, metrics.

    L_{i,t} = -c_{i,t} objective_{i,t} + kl_coef KL_ref_{i,t} + beta_old KL_old_{i,t} - entropy_coef H_{i,t}
              + value_coef V_{i,t}
    loss    = sum_{i,t} w_{i,t} L_{i,t} / N

with objective = gate(ratio(log r), A) (`parts.py`), c the product of the rollout-engine corrections'
weights (1 without corrections), w and N from the aggregation, and V the (optionally clipped) value loss
of a critic. All terms share the aggregation, as in TRL (the KL is added to the per-token loss) and verl
(KL, entropy and value losses use the same `loss_agg_mode`); the corrections weigh the policy term only,
as in both libraries.

One function serves control and language models: a control batch is `[N]` samples (flattened
time-major trajectories, `T = 1` per row, so every aggregation is a mean over samples), a language-model
batch is `[B, T]` with a response mask.

Micro-batching: `loss_terms` returns the numerator sum(w L) and the batch's own normaliser N. Either sum
the numerators of all micro-batches and divide by the full batch's normaliser, or pass
`normaliser=batch_normaliser(config, full_mask)` to every micro-batch call and sum the losses: both give
exactly the full-batch loss and gradient, for every aggregation (advantage whitening excepted: it uses
the statistics of the batch the loss sees).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp

from polygrad import validate
from polygrad.estimators import advantages as advantages_lib
from polygrad.estimators import statistics
from polygrad.estimators.importance import DEFAULT_LOG_RATIO_CLIP
from polygrad.losses import parts

METRIC_NAMES = (
    "loss",
    "policy_loss",
    "clip_frac_low",
    "clip_frac_high",
    "dual_clip_frac",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
    "gate_mean",
    "approx_kl_old",
    "kl_ref",
    "kl_old",
    "kl_old_coef",
    "entropy",
    "zero_adv_frac",
    "value_loss",
    "value_clip_frac",
    "explained_variance",
    "mismatch_kl",
    "mismatch_k3",
    "mismatch_outside_frac",
    "correction_weight_mean",
)


# Group-advantage estimators a preset can name (`polygrad.estimators.advantages`), rewards [P, G] -> [P, G];
# "token" means per-sample or per-token advantages computed elsewhere (GAE, reward-to-go, n-step).
ADVANTAGES = {
    "group_normalized": advantages_lib.group_normalized_advantages,
    "group_centered": advantages_lib.group_centered_advantages,
    "batch_normalized": advantages_lib.batch_normalized_advantages,
    "batch_std": advantages_lib.batch_std_advantages,
    "leave_one_out": advantages_lib.leave_one_out_advantages,
    "gpg": advantages_lib.gpg_advantages,
    "token": None,
}

# Estimators `AdvantageConfig` can name besides ADVANTAGES: several rewards per response, and the
# per-token ones that need the response mask (their result is `[P * G, T]`).
MULTI_REWARD_ADVANTAGES = {"multi_reward": advantages_lib.multi_reward_advantages}
TOKEN_ADVANTAGES = {
    "reinforce_pp": advantages_lib.reinforce_plus_plus_advantages,
    "reinforce_pp_baseline": advantages_lib.reinforce_plus_plus_baseline_advantages,
}


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """A policy-gradient loss as a configuration of parts (frozen, hashable, safe to close over in jit).

    The presets (`presets.PRESETS`) declare every default; a field here has the neutral value that
    turns its term off.
    """

    ratio: Any = parts.TokenRatio()
    """ratio part: TokenRatio (eq. 92), SequenceRatio (GSPO), GeometricMeanClippedRatio (GMPO),
    SequenceProductRatio (VESPO)."""
    gate: Any = parts.HardClip()
    """gate part: HardClip, SoftGate, ClippedISWeight, NoGate, ScoreFunction, DRO, DivergenceMask (DPPO),
    CovarianceClip, CovarianceKL or GammaWeight (VESPO)."""
    aggregation: Any = "token_mean"
    """aggregation part or its name (see parts.AGGREGATIONS)."""
    correction: Any = ()
    """rollout-engine corrections (a part or a tuple of parts: TruncatedIS, MaskedIS,
    OffPolicySequenceMask, or their specs, e.g. "tis:cap_max=2" "mis:low=0.5,high=5" "opsm:delta=0.5",
    see parts.correction_from_spec); their weights multiply the policy term. Used with `logp_sampler=`."""
    kl_estimator: str = "k3"
    """estimator of KL(pi_theta || pi_ref) in the loss: k1, k2, k3, abs, or k1+, k3+, abs+ (value of the
    estimator, gradient of k2); see parts.KL_ESTIMATORS for what each gradient estimates."""
    kl_coef: float = 0.0
    """beta of the KL-to-reference penalty (0: a given logp_ref only feeds the kl_ref metric)."""
    kl_is_correction: str = "none"
    """multiply the KL term by pi_theta / pi_old: "none", "token" (DeepSeek-V3.2 eq. 7) or "policy_ratio"
    (the ratio the gate sees; TRL's use_bias_correction_kl)."""
    kl_k3_clip: float | None = None
    """clamp the k3 value to [-c, c] (verl's low_var_kl: 10); None: no clamp."""
    kl_old: parts.KLToOld | None = None
    """KL penalty to the old policy (PPO-KL), fixed or adaptive; None: no such term."""
    entropy_coef: float = 0.0
    """coefficient of the entropy bonus (needs per-token entropy)."""
    value_coef: float = 0.0
    """coefficient of the critic's value loss 0.5 (V - target)^2 (needs values, values_old, returns)."""
    value_clip: float | None = None
    """clip range of the value loss around values_old (None: unclipped)."""
    normalize_advantages: bool = False
    """whiten the advantages over the active tokens of the batch the loss sees (PPO per minibatch)."""
    advantage: str = "token"
    """group-advantage estimator of the preset's paper (group_normalized, group_centered,
    batch_normalized, leave_one_out), or token for advantages computed elsewhere (GAE, returns)."""
    log_ratio_clip: float = DEFAULT_LOG_RATIO_CLIP
    """log-ratios are clamped to [-c, c] before exp."""

    def __post_init__(self):
        if isinstance(self.aggregation, str):
            validate.one_of("aggregation", self.aggregation, parts.AGGREGATIONS)
            object.__setattr__(self, "aggregation", parts.AGGREGATIONS[self.aggregation])
        correction = self.correction
        if not isinstance(correction, tuple | list):
            correction = (correction,)
        correction = tuple(parts.correction_from_spec(p) if isinstance(p, str) else p for p in correction)
        for part in correction:
            if not callable(part):
                validate.fail(f"correction must hold callable parts (TruncatedIS, MaskedIS), got {part!r}")
        object.__setattr__(self, "correction", tuple(correction))
        validate.one_of("kl_estimator", self.kl_estimator, parts.KL_ESTIMATORS)
        validate.one_of("kl_is_correction", self.kl_is_correction, parts.KL_IS_CORRECTIONS)
        if self.kl_k3_clip is not None:
            validate.positive("kl_k3_clip", self.kl_k3_clip)
        for name in ("kl_coef", "entropy_coef", "value_coef"):
            validate.non_negative(name, getattr(self, name))
        if self.value_clip is not None:
            validate.positive("value_clip", self.value_clip)
        if self.kl_old is not None and not isinstance(self.kl_old, parts.KLToOld):
            raise validate.ConfigError(f"kl_old must be a KLToOld or None, got {self.kl_old!r}")
        validate.one_of("advantage", self.advantage, ADVANTAGES)
        validate.positive("log_ratio_clip", self.log_ratio_clip)


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
    """An advantage estimator with its options, and where the KL to the reference goes if in the reward.

    `estimator`: a key of `ADVANTAGES` (rewards `[P, G]` -> one advantage per response), of
    `MULTI_REWARD_ADVANTAGES` (rewards `[P, G, K]`) or of `TOKEN_ADVANTAGES` (-> `[P * G, T]` per-token
    advantages, need the mask). `options`: keyword arguments of the estimator as (name, value) pairs (a
    tuple keeps the config hashable); `AdvantageConfig.of("group_normalized", eps=1e-4, ddof=1)` builds it.
    `kl_coef > 0` folds beta * k_t (`kl_estimator`, k1 by default) of every token into the rewards first
    (`parts.fold_kl_into_rewards`): outcome estimators see u_i - beta sum_t k_t, REINFORCE++ sees it per
    token. `compute` is the one entry point; `ports.from_trl` / `ports.from_verl` return these.
    """

    estimator: str = "group_normalized"
    options: tuple[tuple[str, Any], ...] = ()
    kl_coef: float = 0.0
    kl_estimator: str = "k1"
    reward_weights: tuple[float, ...] | None = None
    """for rewards `[P, G, K]` and a single-reward estimator: sum_k w_k u_k first (TRL's
    "sum_then_normalize"; None: all 1)."""

    def __post_init__(self):
        names = {**ADVANTAGES, **MULTI_REWARD_ADVANTAGES, **TOKEN_ADVANTAGES}
        validate.one_of("AdvantageConfig.estimator", self.estimator, [n for n in names if n != "token"])
        object.__setattr__(self, "options", tuple(sorted(dict(self.options).items())))
        validate.non_negative("AdvantageConfig.kl_coef", self.kl_coef)
        validate.one_of("AdvantageConfig.kl_estimator", self.kl_estimator, parts.KL_ESTIMATORS)
        if self.kl_coef > 0 and self.estimator in MULTI_REWARD_ADVANTAGES:
            validate.fail("AdvantageConfig: no KL in the reward with several rewards per response")

    @classmethod
    def of(cls, estimator: str, *, kl_coef: float = 0.0, kl_estimator: str = "k1", reward_weights=None,
           **options):
        """`AdvantageConfig(estimator, options)` from keyword options."""
        weights = None if reward_weights is None else tuple(float(w) for w in reward_weights)
        return cls(estimator, tuple(options.items()), kl_coef, kl_estimator, weights)

    @property
    def token_level(self) -> bool:
        """True if `compute` returns per-token advantages `[P * G, T]`."""
        return self.estimator in TOKEN_ADVANTAGES

    def compute(
        self,
        rewards: jax.Array,
        mask: jax.Array | None = None,
        logp: jax.Array | None = None,
        logp_ref: jax.Array | None = None,
    ) -> jax.Array:
        """Advantages of prompt-major rewards.

        Args:
          rewards: `[P, G]` response scores (`[P, G, K]` for "multi_reward").
          mask: `[P * G, T]` response mask (per-token estimators and a KL in the reward).
          logp, logp_ref: `[P * G, T]` log-probs of the sampled tokens under the sampling policy and the
            reference (a KL in the reward).

        Returns:
          `[P * G]` one advantage per response, or `[P * G, T]` for per-token estimators.
        """
        options = dict(self.options)
        if rewards.ndim == 3 and self.estimator not in MULTI_REWARD_ADVANTAGES:
            weights = jnp.ones(rewards.shape[-1], rewards.dtype) if self.reward_weights is None else \
                jnp.asarray(self.reward_weights, rewards.dtype)
            rewards = jnp.tensordot(rewards, weights, axes=1)
        if options.pop("token_weighted", False):  # verl's gdpo: batch statistics over tokens
            if mask is None:
                raise ValueError("token_weighted advantages need the response mask")
            lengths = jnp.sum(jnp.asarray(mask) > 0, axis=-1).astype(rewards.dtype)
            options["lengths"] = lengths.reshape(rewards.shape[:2])
        if self.kl_coef > 0:
            if mask is None or logp is None or logp_ref is None:
                raise ValueError("a KL in the reward needs mask, logp and logp_ref")
            zeros = jnp.zeros(mask.shape, rewards.dtype)
            penalty = parts.fold_kl_into_rewards(zeros, logp, logp_ref, mask, self.kl_coef, self.kl_estimator)
        if self.estimator in TOKEN_ADVANTAGES:
            if mask is None:
                raise ValueError(f"advantage estimator {self.estimator!r} needs the response mask")
            if self.estimator == "reinforce_pp":
                token_rewards = parts.outcome_token_rewards(rewards.reshape(-1), mask)
                if self.kl_coef > 0:
                    token_rewards = token_rewards + penalty
                return TOKEN_ADVANTAGES[self.estimator](token_rewards, mask, **options)[0]
            if self.kl_coef > 0:
                rewards = rewards + jnp.sum(penalty, axis=-1).reshape(rewards.shape)
            return TOKEN_ADVANTAGES[self.estimator](rewards, mask, **options)
        if self.kl_coef > 0:
            if self.estimator in MULTI_REWARD_ADVANTAGES:
                raise ValueError("a KL in the reward is not defined for several rewards per response")
            rewards = rewards + jnp.sum(penalty, axis=-1).reshape(rewards.shape)
        if self.estimator in MULTI_REWARD_ADVANTAGES:
            if "weights" in options and options["weights"] is not None:
                options["weights"] = jnp.asarray(options["weights"], rewards.dtype)
            return MULTI_REWARD_ADVANTAGES[self.estimator](rewards, **options).reshape(-1)
        return ADVANTAGES[self.estimator](rewards, **options).reshape(-1)


def group_advantages(config: LossConfig, rewards: jax.Array) -> jax.Array:
    """The preset's group advantages for rewards `[P, G]`, flattened to `[P * G]` (prompt-major rows).

    Uses each estimator's defaults (`polygrad.estimators.advantages`); call the estimator directly for
    other options. Raises ValueError for a config whose advantages are computed elsewhere ("token").
    """
    estimator = ADVANTAGES[config.advantage]
    if estimator is None:
        raise ValueError("this config uses per-token advantages (e.g. GAE); compute them with a critic")
    return estimator(rewards).reshape(-1)


def batch_normaliser(config: LossConfig, mask: jax.Array) -> jax.Array:
    """The aggregation's normaliser N of a whole batch, from its mask `[B, T]` (or `[N]`) -> scalar.

    Compute it once from the full (global) batch and pass it as `normaliser=` to every micro-batch's
    loss; the micro-batch losses and gradients then sum exactly to the full batch's. An empty batch
    gives N = 0, which the loss treats as 1 (loss 0). The dtype is the default float dtype.
    """
    chex.assert_rank(mask, {1, 2})
    mask = jnp.asarray(mask, jnp.result_type(float))
    return config.aggregation.normaliser(mask[:, None] if mask.ndim == 1 else mask)


def _masked_stats(x: jax.Array, active: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, min and max of `x` over the active entries; all 0 when none is active."""
    big = jnp.finfo(x.dtype).max
    empty = ~jnp.any(active)
    lo = jnp.where(empty, 0.0, jnp.min(jnp.where(active, x, big)))
    hi = jnp.where(empty, 0.0, jnp.max(jnp.where(active, x, -big)))
    return statistics.masked_mean(x, active), lo, hi


def _zero_advantage_fraction(advantages: jax.Array, active: jax.Array, group_size: int | None) -> jax.Array:
    """Fraction of responses (or of groups, with `group_size`) whose active advantages are all 0."""
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
    mask: jax.Array | None = None,
    logp_ref: jax.Array | None = None,
    entropy: jax.Array | None = None,
    *,
    values: jax.Array | None = None,
    values_old: jax.Array | None = None,
    returns: jax.Array | None = None,
    kl_old: jax.Array | None = None,
    kl_old_coef: jax.Array | float | None = None,
    group_size: int | None = None,
    logp_sampler: jax.Array | None = None,
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Numerator sum(w L), this batch's normaliser N, and metrics of a policy-gradient loss.

    Args:
      config: the loss configuration (a preset from `presets.PRESETS` or your own).
      logp_new: `[B, T]` (or `[N]` control samples) log pi_theta of the sampled actions (differentiated).
      logp_old: log-probs under the behaviour policy pi_old, same shape (treated as constants).
      advantages: same shape, or `[B]` per response (broadcast over tokens).
      mask: float or bool mask of the shape of `logp_new` (1 on counted tokens); None: all count.
      logp_ref: reference log-probs; required when `config.kl_coef > 0`.
      entropy: per-token policy entropy; required when `config.entropy_coef > 0`.
      values, values_old, returns: critic predictions (differentiated), their values at sampling time
        and the value targets; required when `config.value_coef > 0`.
      kl_old: per-token exact KL(pi_old || pi_theta) (differentiated) for `config.kl_old`; if None,
        the k3 estimate from `logp_old`, `logp_new` is used.
      kl_old_coef: the current coefficient of an adaptive `config.kl_old` (learner state); None: its
        initial `coef`.
      group_size: if given, `zero_adv_frac` counts groups of consecutive rows instead of responses.
      logp_sampler: log-probs of the sampled tokens under the rollout engine that generated them
        (constants), the third policy beside old and new; used by `config.correction` and for the
        mismatch metrics. None: the rollout engine is pi_old (corrections see rho = 1).
      key: PRNG key for parts that draw random numbers (`CovarianceClip`'s random choice).

    Returns:
      `(numerator, normaliser, metrics)`; the loss is numerator / normaliser (0 counts as 1). Masked
      tokens never affect any output (their inputs are replaced with `where` before use, so NaN or inf
      there cannot leak) and every output is finite for all-masked rows, all-equal groups and extreme
      ratios. Every output follows the dtype of `logp_new`. Metrics (scalars, stop-gradient, means over
      active tokens of this batch): `METRIC_NAMES` - the loss and its policy part, clip fractions
      low / high / dual, ratio mean / min / max (of the ratio the gate sees), gate mean, approx
      KL(pi_old || pi_theta) as E[(r - 1) - log r] (k3), KL to the reference (the configured
      estimator), KL to the old policy and its coefficient, entropy, the zero-advantage fraction, the
      value loss, its clip fraction and the explained variance of the returns by the values; with
      `logp_sampler`, the rollout-trainer mismatch: mismatch_kl = mean(log pi_sampler - log pi_old) and
      mismatch_k3 = mean(rho - 1 - log rho), rho = pi_old / pi_sampler (k1 and k3 estimates of
      KL(pi_sampler || pi_old) on the sampler's tokens); with corrections, the fraction of tokens they
      truncated or dropped (mismatch_outside_frac) and their mean weight (correction_weight_mean, 1
      without corrections).
    """
    chex.assert_rank(logp_new, {1, 2})
    if logp_new.ndim == 1:  # control samples: one "token" per row
        def column(x):
            return None if x is None else jnp.asarray(x)[:, None]

        logp_new, logp_old, advantages, mask, logp_ref, entropy = map(
            column, (logp_new, logp_old, advantages, mask, logp_ref, entropy))
        values, values_old, returns, kl_old, logp_sampler = map(
            column, (values, values_old, returns, kl_old, logp_sampler))
    dtype = logp_new.dtype
    if mask is None:
        mask = jnp.ones(logp_new.shape, dtype)
    chex.assert_rank([logp_old, mask], 2)
    chex.assert_equal_shape([logp_new, logp_old, mask])
    chex.assert_rank(advantages, {1, 2})
    if advantages.ndim == 1:
        chex.assert_axis_dimension(advantages, 0, logp_new.shape[0])
        advantages = jnp.broadcast_to(advantages[:, None], logp_new.shape)
    chex.assert_equal_shape([advantages, logp_new])

    sg = jax.lax.stop_gradient
    mask = jnp.asarray(mask, dtype)
    active = mask > 0
    zero = jnp.zeros((), dtype)

    def clean(x):
        return jnp.where(active, x, zero)

    def mean(x):
        return statistics.masked_mean(jnp.asarray(x, dtype), active)

    logp_new = clean(logp_new)
    logp_old = clean(sg(logp_old))
    advantages = clean(sg(jnp.asarray(advantages, dtype)))
    if config.normalize_advantages:
        advantages = statistics.whiten(advantages, active)

    metrics = dict.fromkeys(METRIC_NAMES, zero)
    if logp_sampler is not None:
        chex.assert_equal_shape([logp_sampler, logp_new])
        logp_sampler = clean(sg(jnp.asarray(logp_sampler, dtype)))
        d = logp_old - logp_sampler
        metrics["mismatch_kl"] = mean(-d)
        d_safe = jnp.clip(d, -config.log_ratio_clip, config.log_ratio_clip)
        metrics["mismatch_k3"] = mean(jnp.expm1(d_safe) - d_safe)

    log_ratio = jnp.clip(logp_new - logp_old, -config.log_ratio_clip, config.log_ratio_clip)
    weight = jnp.ones(logp_new.shape, dtype)  # multiplies the policy term
    folded = jnp.ones(logp_new.shape, dtype)  # IS weights a ratio part absorbs (VESPO)
    outside = jnp.zeros(logp_new.shape, bool)
    sampler = logp_old if logp_sampler is None else logp_sampler
    absorbs = getattr(config.ratio, "absorbs_correction", False)
    for part in config.correction:
        out = part(logp_new, logp_old, sampler, mask, advantages)
        w = sg(jnp.asarray(out.weight, dtype))
        if absorbs and getattr(part, "importance_weight", False):
            folded = folded * w
        else:
            weight = weight * w
        outside = outside | out.outside
    weight, folded = clean(weight), clean(folded)
    if config.correction:
        metrics["mismatch_outside_frac"] = mean(outside & active)
    metrics["correction_weight_mean"] = mean(weight * folded)
    ratio_input = log_ratio
    if absorbs:
        # VESPO (TRL): IS weights join the sequence ratio, log w += clamp(log weight, log 1e-8, 20).
        floor = jnp.asarray(1e-8, dtype)
        log_weight = jnp.clip(jnp.log(jnp.maximum(folded, floor)), jnp.log(floor), 20.0)
        ratio_input = log_ratio + clean(log_weight)
    ratio_out = config.ratio(ratio_input, mask, advantages)
    if getattr(config.gate, "uses_context", False):
        context = parts.GateContext(mask, logp_old, key)
        gate_out = config.gate(ratio_out.log_ratio, advantages, logp_new, context)
    else:
        gate_out = config.gate(ratio_out.log_ratio, advantages, logp_new)
    policy_per_token = -weight * gate_out.objective
    per_token = policy_per_token

    if logp_ref is not None:
        chex.assert_equal_shape([logp_ref, logp_new])
        kl = parts.kl_penalty(
            config.kl_estimator, logp_new, clean(sg(logp_ref)), log_ratio, ratio_out.log_ratio,
            is_correction=config.kl_is_correction, k3_clip=config.kl_k3_clip)
        metrics["kl_ref"] = mean(sg(kl))
        if config.kl_coef > 0:
            per_token = per_token + config.kl_coef * kl
    elif config.kl_coef > 0:
        raise ValueError(f"kl_coef={config.kl_coef} > 0 needs logp_ref")
    if config.kl_old is not None:
        if kl_old is None:
            kl_old = parts.KL_ESTIMATORS["k3"](logp_old, logp_new)
        chex.assert_equal_shape([kl_old, logp_new])
        coef = config.kl_old.coef if kl_old_coef is None else kl_old_coef
        coef = sg(jnp.asarray(coef, dtype))
        per_token = per_token + coef * clean(kl_old)
        metrics["kl_old"] = mean(sg(kl_old))
        metrics["kl_old_coef"] = coef
    if entropy is not None:
        chex.assert_equal_shape([entropy, logp_new])
        entropy = clean(entropy)
        metrics["entropy"] = mean(sg(entropy))
        if config.entropy_coef > 0:
            per_token = per_token - config.entropy_coef * entropy
    elif config.entropy_coef > 0:
        raise ValueError(f"entropy_coef={config.entropy_coef} > 0 needs per-token entropy")
    if config.value_coef > 0:
        if values is None or values_old is None or returns is None:
            raise ValueError(f"value_coef={config.value_coef} > 0 needs values, values_old and returns")
        chex.assert_equal_shape([values, values_old, returns, logp_new])
        returns = clean(sg(returns))
        value_loss, value_clipped = clipped_value_loss(
            clean(values), clean(sg(values_old)), returns, config.value_clip)
        per_token = per_token + config.value_coef * value_loss
        metrics["value_loss"] = mean(sg(value_loss))
        metrics["value_clip_frac"] = mean(value_clipped)
        metrics["explained_variance"] = statistics.explained_variance(sg(clean(values)), returns, active)

    weights = config.aggregation.token_weights(mask)
    numerator = jnp.sum(jnp.where(active, weights * per_token, zero))
    normaliser = config.aggregation.normaliser(mask)
    safe = jnp.where(normaliser > 0, normaliser, jnp.ones((), normaliser.dtype))
    metrics["loss"] = sg(numerator / safe)
    metrics["policy_loss"] = sg(jnp.sum(jnp.where(active, weights * policy_per_token, zero)) / safe)

    used_ratio = jnp.exp(sg(ratio_out.log_ratio))
    metrics["ratio_mean"], metrics["ratio_min"], metrics["ratio_max"] = _masked_stats(used_ratio, active)
    metrics["clip_frac_low"] = mean(gate_out.clipped_low | ratio_out.clipped_low)
    metrics["clip_frac_high"] = mean(gate_out.clipped_high | ratio_out.clipped_high)
    metrics["dual_clip_frac"] = mean(gate_out.dual_clipped)
    metrics["gate_mean"] = mean(sg(gate_out.gate))
    token_log_ratio = sg(log_ratio)
    metrics["approx_kl_old"] = mean(jnp.exp(token_log_ratio) - 1.0 - token_log_ratio)
    metrics["zero_adv_frac"] = _zero_advantage_fraction(advantages, active, group_size).astype(dtype)
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


def policy_loss(
    config: LossConfig,
    logp_new: jax.Array,
    logp_old: jax.Array,
    advantages: jax.Array,
    mask: jax.Array | None = None,
    logp_ref: jax.Array | None = None,
    entropy: jax.Array | None = None,
    *,
    normaliser: jax.Array | float | None = None,
    **inputs: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A policy-gradient loss (a scalar to MINIMISE) and metrics; see `loss_terms` for the arguments.

    `normaliser=None` normalises by this batch (the whole batch is one step). For gradient accumulation
    or data parallelism pass `batch_normaliser(config, full_batch_mask)`: the sum of the micro-batch
    losses (and gradients) is then exactly the full-batch loss (and gradient).
    """
    numerator, own, metrics = loss_terms(config, logp_new, logp_old, advantages, mask, logp_ref, entropy,
                                         **inputs)
    denominator = own if normaliser is None else jnp.asarray(normaliser, numerator.dtype)
    loss = numerator / jnp.where(denominator > 0, denominator, jnp.ones((), numerator.dtype))
    return loss, metrics


grpo_loss = policy_loss  # the name used before the control losses joined the same vocabulary
