"""The orthogonal parts of every policy-gradient loss: ratio, gate, aggregation, KL terms.

A loss is `aggregate(-gate(ratio(log r), A) + beta_ref KL_ref + beta_old KL_old - c_H H + c_V V)` over a
`[B, T]` batch with a mask (003 sections 3 to 5): REINFORCE and A2C (score-function gate), PPO-clip and
the GRPO family (hard clip, soft gate, clipped IS weight), PPO-KL (no gate, KL to the old policy with an
adaptive coefficient). Each part is a small frozen dataclass, so a preset is a configuration of parts
(see `presets.py`) and a new idea is a new part: any object with the same call signature can be dropped
into a `LossConfig`, and its fields are reachable from the experiments' command lines.

Shapes: `B` responses (prompts x group size, flattened) or control samples, `T` padded response length
(1 for control). Every per-token quantity is `[B, T]`; per-sequence advantages `[B]` are broadcast to
`[B, T]` before the parts see them.

Ratio parts      `(log_ratio, mask, advantages) -> RatioOut`
                 token r_t (eq. 92), sequence geometric mean s_i (eq. 93, 107; GSPO), GMPO's geometric
                 mean of token-clipped ratios.
Gate parts       `(log_ratio, advantages, logp_new) -> GateOut`
                 hard clip with eps_low / eps_high and optional dual clip (eq. 96, 101), SAPO's soft
                 gate (eq. 117-118), CISPO's clipped stop-gradient IS weight, no gate (plain IS), and the
                 score function A log pi (REINFORCE, A2C).
Aggregations     `token_weights(mask) -> [B, T]`, `normaliser(mask) -> scalar`; loss = sum(w * L) / N.
KL estimators    `KL_ESTIMATORS[name](logp_new, logp_ref) -> [B, T]` (KL to the reference policy).
KL to pi_old     `KLToOld(coef, target, ...)`: PPO's KL penalty, fixed or adaptive (the coefficient is
                 learner state, adapted by `adapt_kl_coef`).

The "gate" reported by every gate part is the factor g in d objective / d theta = g * r * A * grad log pi
(003 eq. 116 and 121): 0/1 for the hard clip, sech^2(tau (r - 1) / 2) for SAPO, clip(r) / r for CISPO.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from polygrad import validate
from polygrad.estimators import distributions

# --- ratios -------------------------------------------------------------------------------------


class RatioOut(NamedTuple):
    """What a ratio part returns, all `[B, T]`.

    log_ratio: the log of the ratio the gate acts on (with its gradient path).
    clipped_low / clipped_high: tokens whose log-ratio the ratio part itself clipped (GMPO), else False.
    """

    log_ratio: jax.Array
    clipped_low: jax.Array
    clipped_high: jax.Array


def _no_clip(x: jax.Array) -> jax.Array:
    return jnp.zeros(x.shape, dtype=bool)


def _sequence_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked mean over the last axis, `[B, T]` -> `[B, 1]`; an all-masked row gives 0."""
    length = jnp.sum(mask, axis=-1, keepdims=True)
    return jnp.sum(x * mask, axis=-1, keepdims=True) / jnp.where(length > 0, length, 1.0)


@dataclasses.dataclass(frozen=True)
class TokenRatio:
    """Token-level ratio r_t = pi(y_t | x, y_<t) / pi_old(y_t | x, y_<t) (003 eq. 92, 95)."""

    def __call__(self, log_ratio: jax.Array, mask: jax.Array, advantages: jax.Array) -> RatioOut:
        del mask, advantages
        return RatioOut(log_ratio, _no_clip(log_ratio), _no_clip(log_ratio))


@dataclasses.dataclass(frozen=True)
class SequenceRatio:
    """Sequence-level geometric-mean ratio s_i = exp(mean_t log r_t), broadcast over tokens (eq. 93, 107).

    GSPO. d log s_i / d log pi_t = 1 / |y_i| for every token of response i, so every token of a response
    gets the same gradient weight s_i A_i / |y_i| (003 eq. 110-111). This is TRL's
    `importance_sampling_level="sequence"`; verl's `gspo` writes the same quantity as
    sg[s_i] * pi_t / sg[pi_t] per token, which has the same value and, under any aggregation whose token
    weights are constant within a response (all of ours), the same gradient.
    """

    def __call__(self, log_ratio: jax.Array, mask: jax.Array, advantages: jax.Array) -> RatioOut:
        del advantages
        log_s = jnp.broadcast_to(_sequence_mean(log_ratio, mask), log_ratio.shape)
        return RatioOut(log_s, _no_clip(log_ratio), _no_clip(log_ratio))


@dataclasses.dataclass(frozen=True)
class GeometricMeanClippedRatio:
    """GMPO's ratio: the geometric mean over a response of token ratios clipped in log space.

    Geometric-Mean Policy Optimization (Zhao et al., 2025, arXiv 2507.20673): each token's log-ratio is
    clipped to [-clip_log_low, clip_log_high] on the side the advantage sign makes pessimistic (A > 0:
    min(log r, clip_log_high); A < 0: max(log r, -clip_log_low)), then s_i = exp(mean_t clipped log r_t),
    broadcast over tokens. The paper's default range is (e^-0.4, e^0.4). Follows verl's `geo_mean` loss.
    Use with `NoGate` (the objective is s_i * A).
    """

    clip_log_low: float = 0.4
    clip_log_high: float = 0.4

    def __post_init__(self):
        validate.positive("GeometricMeanClippedRatio.clip_log_low", self.clip_log_low)
        validate.positive("GeometricMeanClippedRatio.clip_log_high", self.clip_log_high)

    def __call__(self, log_ratio: jax.Array, mask: jax.Array, advantages: jax.Array) -> RatioOut:
        clipped_high = (advantages > 0) & (log_ratio > self.clip_log_high)
        clipped_low = (advantages < 0) & (log_ratio < -self.clip_log_low)
        clipped = jnp.where(
            clipped_high, self.clip_log_high, jnp.where(clipped_low, -self.clip_log_low, log_ratio)
        )
        log_s = jnp.broadcast_to(_sequence_mean(clipped, mask), log_ratio.shape)
        return RatioOut(log_s, clipped_low, clipped_high)


# --- gates --------------------------------------------------------------------------------------


class GateOut(NamedTuple):
    """What a gate part returns, all `[B, T]`.

    objective: per-token surrogate to MAXIMISE (the loss uses its negative).
    gate: g with d objective / d theta = g * r * A * grad log pi (stop-gradient; a diagnostic).
    clipped_low / clipped_high: tokens clipped at the lower / upper bound.
    dual_clipped: negative-advantage tokens held by the dual clip.
    """

    objective: jax.Array
    gate: jax.Array
    clipped_low: jax.Array
    clipped_high: jax.Array
    dual_clipped: jax.Array


@dataclasses.dataclass(frozen=True)
class HardClip:
    """PPO/GRPO clipped surrogate min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) (003 eq. 96, 101).

    `eps_high=None` means symmetric (eps_high = eps_low). `dual_clip=c > 1` adds the dual clip of Ye et
    al. (2020, arXiv 1912.09729) for A < 0: max(c A, min(r A, clip(r) A)), as verl's `clip_ratio_c`
    (verl applies it always with c = 3; TRL never). The value equals TRL's `-min(coef_1 A, coef_2 A)`
    and verl's `compute_policy_loss_vanilla`; clipped tokens carry exactly zero gradient (eq. 116).
    """

    eps_low: float = 0.2
    eps_high: float | None = None
    dual_clip: float | None = None

    def __post_init__(self):
        validate.in_range("HardClip.eps_low", self.eps_low, 0.0, 1.0, low_open=True, high_open=True)
        if self.eps_high is not None:
            validate.positive("HardClip.eps_high", self.eps_high)
        upper = 1.0 + (self.eps_low if self.eps_high is None else self.eps_high)
        if self.dual_clip is not None:
            validate.greater("HardClip.dual_clip (must exceed 1 + eps_high)", self.dual_clip, upper)

    def __call__(self, log_ratio: jax.Array, advantages: jax.Array, logp_new: jax.Array) -> GateOut:
        del logp_new
        eps_high = self.eps_low if self.eps_high is None else self.eps_high
        ratio = jnp.exp(log_ratio)
        clipped_high = (advantages > 0) & (ratio > 1.0 + eps_high)
        clipped_low = (advantages < 0) & (ratio < 1.0 - self.eps_low)
        held = jnp.where(clipped_high, 1.0 + eps_high, jnp.where(clipped_low, 1.0 - self.eps_low, ratio))
        objective = held * advantages
        if self.dual_clip is None:
            dual_clipped = _no_clip(ratio)
        else:
            dual_clipped = (advantages < 0) & (ratio > self.dual_clip)
            objective = jnp.where(dual_clipped, self.dual_clip * advantages, objective)
        gate = jnp.where(clipped_high | clipped_low | dual_clipped, 0.0, 1.0)
        return GateOut(objective, gate, clipped_low, clipped_high, dual_clipped)


@dataclasses.dataclass(frozen=True)
class SoftGate:
    """SAPO's soft gate: objective f(r) A with f(r) = (4 / tau) sigmoid(tau (r - 1)) (003 eq. 117-119).

    tau = tau_pos where A > 0, else tau_neg (eq. 118). The gradient weight is
    g = f'(r) = 4 s (1 - s) = sech^2(tau (r - 1) / 2), s = sigmoid(tau (r - 1)): 1 at r = 1 and in (0, 1]
    (eq. 120 as corrected in the seeds' errata; eq. 121-122). Matches verl's `sapo` loss. Note that the
    objective's value at r = 1 is 2 A / tau, not A.
    """

    tau_pos: float = 1.0
    tau_neg: float = 1.05

    def __post_init__(self):
        validate.positive("SoftGate.tau_pos", self.tau_pos)
        validate.positive("SoftGate.tau_neg", self.tau_neg)

    def __call__(self, log_ratio: jax.Array, advantages: jax.Array, logp_new: jax.Array) -> GateOut:
        del logp_new
        ratio = jnp.exp(log_ratio)
        tau = jnp.where(advantages > 0, self.tau_pos, self.tau_neg)
        s = jax.nn.sigmoid(tau * (ratio - 1.0))
        objective = (4.0 / tau) * s * advantages
        gate = 4.0 * s * jax.nn.sigmoid(-tau * (ratio - 1.0))  # 4 s (1 - s) without cancellation
        no = _no_clip(ratio)
        return GateOut(objective, gate, no, no, no)


@dataclasses.dataclass(frozen=True)
class ClippedISWeight:
    """CISPO: objective sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * log pi (MiniMax-M1, arXiv 2506.13585).

    The IS weight is clipped and its gradient stopped, so no token is dropped: every token keeps the
    gradient clip(r) A grad log pi. `eps_low=None` means no lower bound (the paper's choice). The default
    cap 1 + eps_high = 5 is TRL's recommended `epsilon_high=5.0` for `loss_type="cispo"` (TRL writes the
    cap itself, `clamp(coef_1, max=epsilon_high)`; verl writes 1 + clip_ratio_high as here). The value is
    TRL's and verl's (-sg(w) A log pi, not comparable in size with the clipped surrogates); clipped-token
    counts ignore the sign of A because the weight is clipped for every token (TRL counts A > 0 only).
    """

    eps_low: float | None = None
    eps_high: float = 4.0

    def __post_init__(self):
        if self.eps_low is not None:
            validate.in_range("ClippedISWeight.eps_low", self.eps_low, 0.0, 1.0, low_open=True)
        validate.positive("ClippedISWeight.eps_high", self.eps_high)

    def __call__(self, log_ratio: jax.Array, advantages: jax.Array, logp_new: jax.Array) -> GateOut:
        ratio = jax.lax.stop_gradient(jnp.exp(log_ratio))
        lower = 0.0 if self.eps_low is None else 1.0 - self.eps_low
        weight = jnp.clip(ratio, lower, 1.0 + self.eps_high)
        objective = weight * advantages * logp_new
        clipped_high = ratio > 1.0 + self.eps_high
        clipped_low = ratio < lower
        return GateOut(objective, weight / ratio, clipped_low, clipped_high, _no_clip(ratio))


@dataclasses.dataclass(frozen=True)
class NoGate:
    """Plain importance-weighted objective r A (no clipping; eq. 110 and 112 "for clarity").

    Used by GMPO, whose ratio part already clips, and for the unclipped surrogate in analyses.
    """

    def __call__(self, log_ratio: jax.Array, advantages: jax.Array, logp_new: jax.Array) -> GateOut:
        del logp_new
        ratio = jnp.exp(log_ratio)
        no = _no_clip(ratio)
        return GateOut(ratio * advantages, jnp.ones_like(ratio), no, no, no)


@dataclasses.dataclass(frozen=True)
class ScoreFunction:
    """The score-function objective A log pi, whose gradient is A grad log pi (Williams 1992; 003 eq. 38
    and 45): REINFORCE, A2C and GPG. It ignores the ratio, so it is only the policy gradient on on-policy
    data (one step per batch); `gate` reports 1 / r (1 on-policy) so that g r = 1 as for every gate.
    """

    def __call__(self, log_ratio: jax.Array, advantages: jax.Array, logp_new: jax.Array) -> GateOut:
        ratio = jax.lax.stop_gradient(jnp.exp(log_ratio))
        no = _no_clip(ratio)
        return GateOut(advantages * logp_new, 1.0 / ratio, no, no, no)


# --- aggregations -------------------------------------------------------------------------------
#
# Every aggregation is loss = sum_{i,t} w_{i,t} L_{i,t} / N, with token weights w computed from each
# response alone and a batch normaliser N. Splitting a batch into micro-batches (or devices) and giving
# each the normaliser of the FULL batch makes the sum of micro-batch losses and gradients exactly the
# full-batch loss and gradient, for every mode (`loss.batch_normaliser`). The count normalisers are sums
# over responses, so the full-batch N is also the sum of the micro-batch N's.
#
# Names elsewhere:
#   ours                     verl loss_agg_mode            TRL loss_type             003
#   seq_mean_token_mean      seq-mean-token-mean           grpo                      eq. 97 (GRPO), 119
#   token_mean               token-mean                    dapo (global normaliser), eq. 102 (DAPO)
#                                                          bnpo (local normaliser)
#   seq_mean_token_sum_norm  seq-mean-token-sum-norm       dr_grpo                   eq. 100 (Dr. GRPO)
#   seq_mean_token_sum       seq-mean-token-sum            -                         -
#   token_sum                token-sum                     -                         -
#
# Sequence means count the responses with at least one active token (as verl does), so an all-masked row
# changes neither the loss nor the gradient; TRL divides by all B rows. The two agree when no row is empty.
# Older verl releases computed seq-mean-token-sum-norm as sum / T without dividing by the number of
# responses; current verl, TRL's dr_grpo and 003 eq. 100 all include the 1 / G, as here.


def _count(mask: jax.Array) -> jax.Array:
    return jnp.sum(mask)


def _nonempty_rows(mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.any(mask > 0, axis=-1).astype(mask.dtype))


@dataclasses.dataclass(frozen=True)
class TokenMean:
    """Mean over all active tokens of the batch (DAPO, 003 eq. 102; BNPO's token normalisation)."""

    name = "token_mean"

    def token_weights(self, mask: jax.Array) -> jax.Array:
        return mask

    def normaliser(self, mask: jax.Array) -> jax.Array:
        return _count(mask)


@dataclasses.dataclass(frozen=True)
class SeqMeanTokenMean:
    """Mean over responses of each response's token mean (GRPO, 003 eq. 97; GSPO eq. 109; SAPO eq. 119)."""

    name = "seq_mean_token_mean"

    def token_weights(self, mask: jax.Array) -> jax.Array:
        length = jnp.sum(mask, axis=-1, keepdims=True)
        return mask / jnp.where(length > 0, length, 1.0)

    def normaliser(self, mask: jax.Array) -> jax.Array:
        return _nonempty_rows(mask)


@dataclasses.dataclass(frozen=True)
class SeqMeanTokenSumNorm:
    """Mean over responses of token sums divided by a constant (Dr. GRPO, 003 eq. 100).

    `constant=None` uses the padded length T (verl's default `loss_scale_factor`; TRL uses
    `max_completion_length`). Set it to the generation's maximum length so that it does not change with
    the padding of each batch.
    """

    constant: float | None = None
    name = "seq_mean_token_sum_norm"

    def __post_init__(self):
        if self.constant is not None:
            validate.positive("SeqMeanTokenSumNorm.constant", self.constant)

    def token_weights(self, mask: jax.Array) -> jax.Array:
        constant = mask.shape[-1] if self.constant is None else self.constant
        return mask / constant

    def normaliser(self, mask: jax.Array) -> jax.Array:
        return _nonempty_rows(mask)


@dataclasses.dataclass(frozen=True)
class SeqMeanTokenSum:
    """Mean over responses of token sums (verl's seq-mean-token-sum)."""

    name = "seq_mean_token_sum"

    def token_weights(self, mask: jax.Array) -> jax.Array:
        return mask

    def normaliser(self, mask: jax.Array) -> jax.Array:
        return _nonempty_rows(mask)


@dataclasses.dataclass(frozen=True)
class TokenSum:
    """Plain sum over all active tokens (verl's token-sum); the normaliser is the constant 1."""

    name = "token_sum"

    def token_weights(self, mask: jax.Array) -> jax.Array:
        return mask

    def normaliser(self, mask: jax.Array) -> jax.Array:
        return jnp.ones((), mask.dtype)


AGGREGATIONS = {
    "token_mean": TokenMean(),
    "seq_mean_token_mean": SeqMeanTokenMean(),
    "seq_mean_token_sum_norm": SeqMeanTokenSumNorm(),
    "seq_mean_token_sum": SeqMeanTokenSum(),
    "token_sum": TokenSum(),
}


# --- KL to the reference policy -----------------------------------------------------------------


def kl_k3_value_k2_gradient(logp: jax.Array, logp_ref: jax.Array) -> jax.Array:
    """Per-token k3 in value with k2's gradient: k2 - sg(k2) + sg(k3) (verl's "k3+" / "low_var_kl+").

    k3 is unbiased and non-negative for KL(pi || ref), but its expected gradient is not the gradient of
    the KL; k2's is (Schulman, 2020). This straight-through form reports k3 and follows k2's gradient.
    """
    k2 = distributions.kl_k2(logp, logp_ref)
    k3 = distributions.kl_k3(logp, logp_ref)
    return k2 - jax.lax.stop_gradient(k2) + jax.lax.stop_gradient(k3)


# Per-token estimators of KL(pi_theta || pi_ref) from samples of pi_old (~ pi_theta near on-policy).
# k1 is 003 eq. 87's log-ratio; k3 is DeepSeekMath's (and TRL's) default; k2 = (log r)^2 / 2 as verl.
KL_ESTIMATORS = {
    "k1": distributions.kl_k1,
    "k2": distributions.kl_k2,
    "k3": distributions.kl_k3,
    "k3_value_k2_grad": kl_k3_value_k2_gradient,
}


# --- KL to the old policy (PPO's penalty) ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KLToOld:
    """PPO's KL penalty coef * KL(pi_old(.|s) || pi_theta(.|s)) per token (Schulman et al. 2017, eq. 8;
    003 section 4.7.4, "Optional: KL-penalty").

    The per-token KL is the exact one when the caller passes it (`kl_old=`, e.g. from the distributions
    of a control policy), else the k3 estimate from the sampled log-probs, k3(logp_old, logp_new)
    (Schulman 2020), which is unbiased for samples of pi_old.

    `target=None` keeps `coef` fixed. With a `target`, the coefficient is adaptive: it is learner state,
    starts at `coef`, and after each update is divided by `factor` if the measured KL < target /
    threshold and multiplied by it if KL > target * threshold (Schulman et al. 2017, section 4, with 1.5
    and 2), then clipped to [min_coef, max_coef] so a long run of small (or large) KLs cannot drive it to
    0 or to infinity (`adapt_kl_coef`).
    """

    coef: float = 1.0
    """initial (or fixed) penalty coefficient beta."""
    target: float | None = 0.01
    """target KL d_targ of the adaptive rule (None: fixed coefficient)."""
    threshold: float = 1.5
    """adapt when the KL leaves [target / threshold, target * threshold]."""
    factor: float = 2.0
    """beta is multiplied or divided by this factor."""
    min_coef: float = 1e-6
    max_coef: float = 1e6

    def __post_init__(self):
        validate.non_negative("KLToOld.coef", self.coef)
        if self.target is not None:
            validate.positive("KLToOld.target", self.target)
        validate.greater("KLToOld.threshold", self.threshold, 1.0)
        validate.greater("KLToOld.factor", self.factor, 1.0)
        validate.positive("KLToOld.min_coef", self.min_coef)
        validate.greater("KLToOld.max_coef", self.max_coef, self.min_coef)


def adapt_kl_coef(part: KLToOld, coef: jax.Array, kl: jax.Array) -> jax.Array:
    """The PPO paper's adaptive penalty rule (section 4) for `part`; the same coefficient if fixed."""
    if part.target is None:
        return coef
    coef = jnp.where(kl < part.target / part.threshold, coef / part.factor, coef)
    coef = jnp.where(kl > part.target * part.threshold, coef * part.factor, coef)
    return jnp.clip(coef, part.min_coef, part.max_coef)
