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

Corrections      `(logp_new, logp_old, logp_sampler, mask, advantages) -> CorrectionOut`
                 the rollout engine's log-probs as a third policy beside old and new: truncated IS (TIS),
                 masked IS (MIS / IcePop) at token or sequence level, DeepSeek-V3.2's off-policy sequence
                 mask (OPSM). Their weight multiplies the policy term of each token.
KL placement     in the loss (`KL_ESTIMATORS`, `kl_penalty`: k1, k2, k3, abs, "+" straight-through k2
                 gradients, the pi_theta / pi_old bias correction) or in the reward (`fold_kl_into_rewards`).

The "gate" reported by every gate part is the factor g in d objective / d theta = g * r * A * grad log pi
(003 eq. 116 and 121): 0/1 for the hard clip, sech^2(tau (r - 1) / 2) for SAPO, clip(r) / r for CISPO.

Gates that need more than the token's own numbers (the old log-probs, the mask, batch statistics, a PRNG
key) set `uses_context = True` and are called with a fourth argument, a `GateContext`.

Precision: every part follows the dtype of its inputs (float32, float64 under `jax_enable_x64`, bfloat16);
constants enter as weakly typed Python scalars or in the input's dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import chex
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


def _zero(x: jax.Array) -> jax.Array:
    return jnp.zeros((), x.dtype)


def _one(x: jax.Array) -> jax.Array:
    return jnp.ones((), x.dtype)


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
    """log-ratios below -clip_log_low are clipped where A < 0."""
    clip_log_high: float = 0.4
    """log-ratios above clip_log_high are clipped where A > 0."""

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


@dataclasses.dataclass(frozen=True)
class SequenceProductRatio:
    """VESPO's sequence ratio w_i = prod_t r_t (the product, not GSPO's geometric mean), in log space
    and clamped to [log_low, log_high], broadcast over tokens.

    TRL's `get_gamma_weights` (`loss_type="vespo"`): log w = clamp(sum_t clamp(log r_t, -20, 20),
    log 1e-8, 20). With a rollout-engine correction (`LossConfig.correction`) the correction's weights are
    folded into w as TRL does (log w += sum_t clamp(log weight_t, log 1e-8, 20)) instead of multiplying
    the loss (`absorbs_correction`). Use with `GammaWeight`.
    """

    log_low: float = math.log(1e-8)
    """lower clamp of the log sequence ratio."""
    log_high: float = 20.0
    """upper clamp of the log sequence ratio."""
    absorbs_correction = True

    def __post_init__(self):
        validate.finite("SequenceProductRatio.log_low", self.log_low)
        validate.greater("SequenceProductRatio.log_high", self.log_high, self.log_low)

    def __call__(self, log_ratio: jax.Array, mask: jax.Array, advantages: jax.Array) -> RatioOut:
        del advantages
        total = jnp.sum(jnp.where(mask > 0, log_ratio, _zero(log_ratio)), axis=-1, keepdims=True)
        clipped = jnp.clip(total, self.log_low, self.log_high)
        log_w = jnp.broadcast_to(clipped, log_ratio.shape)
        low = jnp.broadcast_to(total < self.log_low, log_ratio.shape)
        high = jnp.broadcast_to(total > self.log_high, log_ratio.shape)
        return RatioOut(log_w, low & (mask > 0), high & (mask > 0))


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

    `eps_high=None` means symmetric (eps_high = eps_low); `eps_low=1` removes the lower clip (r >= 0
    anyway). `dual_clip=c > 1` adds the dual clip of Ye et
    al. (2020, arXiv 1912.09729) for A < 0: max(c A, min(r A, clip(r) A)), as verl's `clip_ratio_c`
    (verl applies it always with c = 3; TRL never). The value equals TRL's `-min(coef_1 A, coef_2 A)`
    and verl's `compute_policy_loss_vanilla`; clipped tokens carry exactly zero gradient (eq. 116).
    """

    eps_low: float = 0.2
    """the ratio is held at 1 - eps_low where A < 0."""
    eps_high: float | None = None
    """the ratio is held at 1 + eps_high where A > 0 (None: eps_low)."""
    dual_clip: float | None = None
    """dual clip c > 1 + eps_high for A < 0 (None: off)."""

    def __post_init__(self):
        validate.in_range("HardClip.eps_low", self.eps_low, 0.0, 1.0, low_open=True)
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
        gate = jnp.where(clipped_high | clipped_low | dual_clipped, _zero(ratio), _one(ratio))
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
    """temperature of the soft gate where A > 0."""
    tau_neg: float = 1.05
    """temperature of the soft gate where A <= 0."""

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
    `eps_low >= 1` means no lower bound; a cap below 1 (`-1 < eps_high < 0`) is allowed because TRL's
    `loss_type="cispo"` caps at `epsilon_high` itself, which defaults to `epsilon` = 0.2.
    """

    eps_low: float | None = None
    """lower bound 1 - eps_low of the IS weight (None: no lower bound)."""
    eps_high: float = 4.0
    """upper bound 1 + eps_high of the IS weight."""

    def __post_init__(self):
        if self.eps_low is not None:
            validate.positive("ClippedISWeight.eps_low", self.eps_low)
        validate.greater("ClippedISWeight.eps_high (the cap 1 + eps_high must be > 0)", self.eps_high, -1.0)

    def __call__(self, log_ratio: jax.Array, advantages: jax.Array, logp_new: jax.Array) -> GateOut:
        ratio = jax.lax.stop_gradient(jnp.exp(log_ratio))
        lower = 0.0 if self.eps_low is None else max(1.0 - self.eps_low, 0.0)
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


class GateContext(NamedTuple):
    """What a gate with `uses_context = True` receives besides the token's own numbers.

    mask: `[B, T]` float mask of the batch the loss sees. logp_old: `[B, T]` log pi_old (constants, 0 on
    masked tokens). key: a PRNG key passed to the loss (`key=`), or None.
    """

    mask: jax.Array
    logp_old: jax.Array
    key: jax.Array | None


@dataclasses.dataclass(frozen=True)
class DRO:
    """Direct Reward Optimisation's quadratic penalty: objective A log pi - (beta / 2) (log pi / pi_old)^2.

    Richemond et al. 2024 ("Offline Regularised Reinforcement Learning for Large Language Models
    Alignment", arXiv 2405.19107) and Kimi k1.5 (Kimi Team 2025, arXiv 2501.12599): the policy gradient
    A grad log pi plus a penalty whose gradient -beta log r grad log pi pulls each token back towards the
    sampling policy. Value and gradient are verl's `compute_policy_loss_dro` (`policy_loss.dro_beta`) and
    Tinker's `dro` loss (Tinker sums over tokens, verl uses `loss_agg_mode`). Neither library has a
    default beta (verl requires it); the 0.1 here is polygrad's choice, not a published default. `gate`
    reports 1 / r as for the score function.
    """

    beta: float = 0.1
    """coefficient of the quadratic penalty on log r."""

    def __post_init__(self):
        validate.positive("DRO.beta", self.beta)

    def __call__(self, log_ratio: jax.Array, advantages: jax.Array, logp_new: jax.Array) -> GateOut:
        ratio = jax.lax.stop_gradient(jnp.exp(log_ratio))
        objective = advantages * logp_new - (0.5 * self.beta) * log_ratio**2
        no = _no_clip(ratio)
        return GateOut(objective, 1.0 / ratio, no, no, no)


@dataclasses.dataclass(frozen=True)
class DivergenceMask:
    """DPPO: drop tokens whose probability moved too far from pi_old, measured by a divergence of the
    token's probabilities instead of the ratio (Qi et al. 2026, "Rethinking the Trust Region in LLM
    Reinforcement Learning", arXiv 2602.04879; verl's `dppo_tv` / `dppo_kl`).

        objective = sg(min(r, cap)) * valid * A * log pi,   p = pi(y_t), q = pi_old(y_t)
        tv:         valid = (p - q <= eps_high) if A > 0 else (p - q >= -eps_low)
        binary_kl:  D = q log(q / p) + (1 - q) log((1 - q + 1e-8) / (1 - p + 1e-8)) (KL of the two
                    Bernoulli distributions "this token or another");
                    valid = (D <= eps_high or p <= q) if A > 0 else (D <= eps_low or p >= q)

    So a token is dropped only when the update pushes it further out in the advantage's direction (the
    same one-sidedness as PPO's clip), and the threshold is on the probability mass moved, which does not
    over-penalise rare tokens as the ratio does. `cap` truncates the IS weight (verl's `clip_ratio_c`:
    3.0 unless configured; the authors' script uses 1e4, i.e. none). `divergence="tv"` with the authors'
    threshold 0.15, `"binary_kl"` with 0.05 (verl `examples/dppo_trainer`). Valid tokens have gate
    min(r, cap) / r; dropped ones 0 (counted in clip_frac_high / clip_frac_low by the sign of A), and
    tokens held at the cap in dual_clip_frac.
    """

    divergence: str = "tv"
    """tv or binary_kl."""
    eps_low: float = 0.15
    """divergence threshold where A < 0."""
    eps_high: float | None = None
    """divergence threshold where A > 0 (None: eps_low)."""
    cap: float | None = 1e4
    """cap of the IS weight (None: none)."""
    uses_context = True

    def __post_init__(self):
        validate.one_of("DivergenceMask.divergence", self.divergence, ("tv", "binary_kl"))
        validate.positive("DivergenceMask.eps_low", self.eps_low)
        if self.eps_high is not None:
            validate.positive("DivergenceMask.eps_high", self.eps_high)
        if self.cap is not None:
            validate.positive("DivergenceMask.cap", self.cap)

    def __call__(self, log_ratio: jax.Array, advantages: jax.Array, logp_new: jax.Array,
                 ctx: GateContext) -> GateOut:
        sg = jax.lax.stop_gradient
        eps_high = self.eps_low if self.eps_high is None else self.eps_high
        logp, logq = sg(logp_new), ctx.logp_old
        p, q = jnp.exp(logp), jnp.exp(logq)
        if self.divergence == "tv":
            valid_pos = p - q <= eps_high
            valid_neg = p - q >= -self.eps_low
        else:
            d = q * (logq - logp) + (1.0 - q) * jnp.log((1.0 - q + 1e-8) / (1.0 - p + 1e-8))
            valid_pos = (d <= eps_high) | (p <= q)
            valid_neg = (d <= self.eps_low) | (p >= q)
        valid = jnp.where(advantages > 0, valid_pos, valid_neg)
        ratio = sg(jnp.exp(log_ratio))
        weight = ratio if self.cap is None else jnp.minimum(ratio, self.cap)
        objective = jnp.where(valid, weight * advantages * logp_new, _zero(ratio))
        capped = valid & (ratio > (jnp.inf if self.cap is None else self.cap))
        gate = jnp.where(valid, weight / ratio, _zero(ratio))
        return GateOut(objective, gate, ~valid & (advantages < 0), ~valid & (advantages > 0), capped)


def _token_covariance(advantages: jax.Array, logp: jax.Array, active: jax.Array) -> jax.Array:
    """(A - mean A) (log pi - mean log pi) per token, means over the active tokens; -inf elsewhere."""
    def mean(x):
        total = jnp.sum(jnp.where(active, x, _zero(x)))
        return total / jnp.maximum(jnp.sum(active), 1).astype(x.dtype)

    cov = (advantages - mean(advantages)) * (logp - mean(logp))
    return jnp.where(active, cov, -jnp.inf)


def _select_first(priority: jax.Array, candidates: jax.Array, count: jax.Array) -> jax.Array:
    """The `count` candidates of lowest priority (a traced count is fine), as a mask of `priority`'s shape."""
    flat = jnp.where(candidates, priority, jnp.inf).reshape(-1)
    ranks = jnp.argsort(jnp.argsort(flat, stable=True), stable=True).reshape(priority.shape)
    return candidates & (ranks < count)


def _selection_count(fraction: float, active: jax.Array) -> jax.Array:
    """max(floor(fraction * number of active tokens), 1) as verl computes it in double precision."""
    n = jnp.sum(active).astype(jnp.float32)
    return jnp.maximum(jnp.floor(n * fraction * (1.0 + 1e-6)), 1.0)


@dataclasses.dataclass(frozen=True)
class CovarianceClip:
    """Clip-Cov: the clipped surrogate, with the gradient of a few high-covariance tokens removed (Cui et
    al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models", arXiv
    2505.22617; verl's `clip_cov`).

    cov_t = (A_t - mean A)(log pi_t - mean log pi) over the active tokens of the batch the loss sees.
    Among the tokens not already clipped whose cov lies in (cov_low, cov_high), max(floor(fraction *
    n_active), 1) are chosen and their loss set to 0: verl picks them at random (`torch.randperm`); with
    a `key=` passed to the loss polygrad does the same (a uniformly random subset), without a key it
    takes the candidates of largest covariance (deterministic). Defaults: the authors' scripts
    (fraction 2e-4, bounds (1, 5), `clip_ratio_low = clip_ratio_high = 1`; verl's config default clip
    range is 0.2). The covariance is a batch statistic, so this part is not micro-batch exact (verl
    computes it per micro-batch too). Chosen tokens count in clip_frac_high / clip_frac_low by the sign
    of A.
    """

    eps_low: float = 1.0
    """lower clip range of the surrogate."""
    eps_high: float | None = None
    """upper clip range (None: eps_low)."""
    fraction: float = 2e-4
    """share of the active tokens whose gradient is removed."""
    cov_low: float = 1.0
    """lower bound of the covariance of candidate tokens."""
    cov_high: float = 5.0
    """upper bound of the covariance of candidate tokens."""
    uses_context = True

    def __post_init__(self):
        HardClip(self.eps_low, self.eps_high)  # validates the clip range
        validate.in_range("CovarianceClip.fraction", self.fraction, 0.0, 1.0, low_open=True)
        validate.finite("CovarianceClip.cov_low", self.cov_low)
        validate.greater("CovarianceClip.cov_high", self.cov_high, self.cov_low)

    def __call__(self, log_ratio: jax.Array, advantages: jax.Array, logp_new: jax.Array,
                 ctx: GateContext) -> GateOut:
        base = HardClip(self.eps_low, self.eps_high)(log_ratio, advantages, logp_new)
        active = ctx.mask > 0
        cov = _token_covariance(advantages, jax.lax.stop_gradient(logp_new), active)
        inside = (cov > self.cov_low) & (cov < self.cov_high)
        candidates = active & ~(base.clipped_low | base.clipped_high) & inside
        count = _selection_count(self.fraction, active)
        if ctx.key is None:
            priority = -cov
        else:
            priority = jax.random.uniform(ctx.key, cov.shape, jnp.float32)
        chosen = _select_first(priority, candidates, count)
        zero = _zero(base.objective)
        objective = jnp.where(chosen, zero, base.objective)
        gate = jnp.where(chosen, zero, base.gate)
        return GateOut(objective, gate, base.clipped_low | (chosen & (advantages <= 0)),
                       base.clipped_high | (chosen & (advantages > 0)), base.dual_clipped)


@dataclasses.dataclass(frozen=True)
class CovarianceKL:
    """KL-Cov: the unclipped surrogate r A, plus a penalty coef |log r| on the tokens of largest
    covariance (Cui et al. 2025, arXiv 2505.22617; verl's `kl_cov`).

    cov_t as in `CovarianceClip`; the max(floor(fraction * n_active), 1) tokens of largest cov get the
    objective r A - coef |log(pi / pi_old)|. Defaults are the authors' 7B script (`k_percent=0.2`, i.e. a
    fraction 2e-3, `ppo_kl_coef=1`); verl's config defaults are 2e-4 and 0.1. Not micro-batch exact (batch
    statistic, as in verl). Penalised tokens count in clip_frac_high / clip_frac_low by the sign of A.
    """

    fraction: float = 2e-3
    """share of the active tokens that get the penalty."""
    coef: float = 1.0
    """coefficient of the |log r| penalty."""
    uses_context = True

    def __post_init__(self):
        validate.in_range("CovarianceKL.fraction", self.fraction, 0.0, 1.0, low_open=True)
        validate.non_negative("CovarianceKL.coef", self.coef)

    def __call__(self, log_ratio: jax.Array, advantages: jax.Array, logp_new: jax.Array,
                 ctx: GateContext) -> GateOut:
        active = ctx.mask > 0
        cov = _token_covariance(advantages, jax.lax.stop_gradient(logp_new), active)
        chosen = _select_first(-cov, active, _selection_count(self.fraction, active))
        ratio = jnp.exp(log_ratio)
        zero = _zero(ratio)
        # sign(x) x: |x| with torch's gradient 0 at x = 0 (jnp.abs has 1 there)
        objective = ratio * advantages - jnp.where(chosen, self.coef * jnp.sign(log_ratio) * log_ratio, zero)
        r, a = jax.lax.stop_gradient(ratio), advantages
        safe = jnp.where(a != 0, r * a, _one(r))
        sign = jnp.sign(jax.lax.stop_gradient(log_ratio))
        gate = jnp.where(chosen & (a != 0), 1.0 - self.coef * sign / safe, _one(r))
        no = _no_clip(ratio)
        return GateOut(objective, gate, chosen & (a <= 0), chosen & (a > 0), no)


@dataclasses.dataclass(frozen=True)
class GammaWeight:
    """VESPO's soft weight: objective sg(phi(w)) A log pi with phi(w) = e^lambda w^k e^(-lambda w), w the
    sequence ratio (use with `SequenceProductRatio`).

    Variational sequence-level soft policy optimisation (arXiv 2602.10693), as implemented in TRL's
    `get_gamma_weights` (`loss_type="vespo"`): phi(1) = 1, phi -> 0 for w -> 0 (power k) and for large
    w (exponential decay lambda), with (k, lambda) = (k_pos, lambda_pos) where A >= 0 and (k_neg,
    lambda_neg) where A < 0 (TRL's defaults 2, 3, 3, 2); lambda is clamped at 1e-4 and phi's NaN / inf
    mapped to 0 as TRL does. The formula is TRL's; the paper itself was not available to check it.
    """

    k_pos: float = 2.0
    """power k where A >= 0."""
    lambda_pos: float = 3.0
    """decay lambda where A >= 0."""
    k_neg: float = 3.0
    """power k where A < 0."""
    lambda_neg: float = 2.0
    """decay lambda where A < 0."""

    def __post_init__(self):
        for name in ("k_pos", "lambda_pos", "k_neg", "lambda_neg"):
            validate.non_negative(f"GammaWeight.{name}", getattr(self, name))

    def __call__(self, log_ratio: jax.Array, advantages: jax.Array, logp_new: jax.Array) -> GateOut:
        log_w = jax.lax.stop_gradient(log_ratio)
        dtype = log_w.dtype
        nonneg = advantages >= 0
        k = jnp.where(nonneg, jnp.asarray(self.k_pos, dtype), jnp.asarray(self.k_neg, dtype))
        lam = jnp.where(nonneg, jnp.asarray(self.lambda_pos, dtype), jnp.asarray(self.lambda_neg, dtype))
        lam = jnp.maximum(lam, jnp.asarray(1e-4, dtype))
        phi = jnp.exp(lam + k * log_w - lam * jnp.exp(log_w))
        phi = jnp.where(jnp.isfinite(phi), phi, _zero(phi))
        no = _no_clip(log_w)
        return GateOut(phi * advantages * logp_new, phi * jnp.exp(-log_w), no, no, no)


# --- rollout-engine corrections (three policies: sampler, old, new) -----------------------------
#
# The rollout engine (vLLM, SGLang, a bf16 sampler) samples with pi_sampler, which differs numerically
# from the trainer's pi_old even at the same parameters. The loss is an expectation under pi_old, the data
# come from pi_sampler: the importance weight rho = pi_old / pi_sampler corrects for it (token level, or
# per sequence the product of the token weights). Every correction part maps
# (logp_new, logp_old, logp_sampler, mask, advantages) to a stop-gradient weight on the policy term of each
# token; without sampler log-probs the loss passes logp_sampler = logp_old, so rho = 1.

_SAFETY_LOG = 20.0  # verl's SAFETY_BOUND: log-weights are clamped to [-20, 20] before exp


class CorrectionOut(NamedTuple):
    """weight: `[B, T]` stop-gradient factor on the policy term (0 drops the token); outside: `[B, T]`
    bool, tokens whose weight this part truncated or dropped."""

    weight: jax.Array
    outside: jax.Array


def _mismatch_log_weight(logp_old, logp_sampler, mask, level):
    """log(pi_old / pi_sampler) per token, or summed over the response and broadcast; clamped to +-20."""
    d = jnp.where(mask > 0, logp_old - logp_sampler, _zero(logp_old))
    if level == "sequence":
        d = jnp.broadcast_to(jnp.sum(d, axis=-1, keepdims=True), d.shape)
    return jnp.clip(d, -_SAFETY_LOG, _SAFETY_LOG)


def _check_bounds(name, low, high):
    if low is None and high is None:
        validate.fail(f"{name} needs at least one bound")
    if low is not None:
        validate.positive(f"{name} lower bound", low)
    if high is not None:
        validate.positive(f"{name} upper bound", high)
    if low is not None and high is not None and low >= high:
        validate.fail(f"{name} lower bound must be < upper bound, got {low} >= {high}")


@dataclasses.dataclass(frozen=True)
class TruncatedIS:
    """Truncated importance sampling (TIS): weight clip(rho, cap_min, cap_max), rho = pi_old / pi_sampler.

    Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training" (the TIS
    blog, fengyao.notion.site/off-policy-rl); verl's decoupled `rollout_is` (token or sequence, upper cap
    `rollout_is_threshold`, default 2) and TRL's `vllm_importance_sampling_mode="token_truncate"` /
    `"sequence_truncate"` (C_min, C_max; C_max default 3). `level="sequence"` uses prod_t rho_t for every
    token of the response (verl and TRL both take the product). The truncation trades a bias for bounded
    variance; tokens above the cap (or below the floor) are reported as outside the band.
    """

    level: str = "token"
    """token or sequence."""
    cap_max: float | None = 2.0
    """upper cap of the weight (None: none)."""
    cap_min: float | None = None
    """lower floor of the weight (None: none)."""
    importance_weight = True  # an IS weight: VESPO folds it into its sequence ratio

    def __post_init__(self):
        validate.one_of("TruncatedIS.level", self.level, ("token", "sequence"))
        _check_bounds("TruncatedIS", self.cap_min, self.cap_max)

    def __call__(self, logp_new, logp_old, logp_sampler, mask, advantages) -> CorrectionOut:
        del logp_new, advantages
        rho = jnp.exp(_mismatch_log_weight(logp_old, logp_sampler, mask, self.level))
        weight = jnp.clip(rho, self.cap_min, self.cap_max)
        outside = jnp.zeros(rho.shape, bool)
        if self.cap_max is not None:
            outside = outside | (rho > self.cap_max)
        if self.cap_min is not None:
            outside = outside | (rho < self.cap_min)
        return CorrectionOut(jax.lax.stop_gradient(weight), outside & (mask > 0))


@dataclasses.dataclass(frozen=True)
class MaskedIS:
    """Masked importance sampling (MIS, IcePop): tokens (or whole responses) whose rho = pi_old /
    pi_sampler leaves [low, high] are dropped; the others keep the weight rho (`reweight=True`) or 1.

    IcePop (Ring-1T, inclusionAI 2025, arXiv 2510.18855; ringtech.notion.site/icepop) with its band
    [0.5, 5] at token level, the defaults here; "When Speed Kills Stability" (Liu, Li et al. 2025,
    richardli.xyz/rl-collapse) at sequence level. Matches TRL's `"token_mask"` / `"sequence_mask"` (TRL's
    default mode: sequence level, C_max 3, no lower bound) and verl's `rollout_is_threshold="low_high"`
    (IcePop), which keep rho as the weight inside the band and leave the token in the normaliser.
    `reweight=False` keeps weight 1 inside the band (pure rejection). `None` bounds are open.
    """

    level: str = "token"
    """token or sequence."""
    low: float | None = 0.5
    """lower end of the band (None: open)."""
    high: float | None = 5.0
    """upper end of the band (None: open)."""
    reweight: bool = True
    """keep rho as the weight inside the band (False: weight 1)."""
    importance_weight = True

    def __post_init__(self):
        validate.one_of("MaskedIS.level", self.level, ("token", "sequence"))
        _check_bounds("MaskedIS", self.low, self.high)

    def __call__(self, logp_new, logp_old, logp_sampler, mask, advantages) -> CorrectionOut:
        del logp_new, advantages
        rho = jnp.exp(_mismatch_log_weight(logp_old, logp_sampler, mask, self.level))
        keep = jnp.ones(rho.shape, bool)
        if self.low is not None:
            keep = keep & (rho >= self.low)
        if self.high is not None:
            keep = keep & (rho <= self.high)
        weight = jnp.where(keep, rho if self.reweight else _one(rho), _zero(rho))
        return CorrectionOut(jax.lax.stop_gradient(weight), ~keep & (mask > 0))


@dataclasses.dataclass(frozen=True)
class OffPolicySequenceMask:
    """DeepSeek-V3.2's off-policy sequence masking (OPSM; DeepSeek-AI 2025, arXiv 2512.02556, eq. 9):
    drop a response with a negative advantage whose mean per-token KL from the sampling policy exceeds
    delta, (1 / |y|) sum_t log(pi_sampler(y_t) / pi_theta(y_t)) > delta.

    The KL is measured against the CURRENT policy (stop-gradient), so the mask tightens as the update
    moves away from the data; responses with A >= 0 are always kept. Transcribes TRL's
    `get_off_policy_mask` (`off_policy_mask_threshold`, which uses the sampler's log-probs, or pi_old's
    without them). TRL documents no default delta ("a positive value, e.g. 0.5"), so none is set here.
    """

    delta: float
    """mean per-token KL above which a negative-advantage response is dropped."""

    def __post_init__(self):
        validate.positive("OffPolicySequenceMask.delta", self.delta)

    def __call__(self, logp_new, logp_old, logp_sampler, mask, advantages) -> CorrectionOut:
        del logp_old
        d = jnp.where(mask > 0, logp_sampler - jax.lax.stop_gradient(logp_new), _zero(logp_new))
        length = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), _one(mask))
        seq_kl = jnp.sum(d, axis=-1, keepdims=True) / length
        keep = (advantages >= 0) | (seq_kl <= self.delta)
        weight = jnp.where(keep, _one(logp_new), _zero(logp_new))
        return CorrectionOut(weight, ~keep & (mask > 0))


CORRECTIONS = (TruncatedIS, MaskedIS, OffPolicySequenceMask)
CORRECTION_NAMES = {"tis": TruncatedIS, "mis": MaskedIS, "opsm": OffPolicySequenceMask}


def _spec_value(text: str) -> Any:
    """A field value written in a correction spec: none, true / false, a number, or a word."""
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return float(lowered)
    except ValueError:
        return text.strip()


def correction_from_spec(spec: str) -> Any:
    """A correction part from a short spec, for command lines: `name` or `name:field=value,field=value`.

    Names: `tis` (TruncatedIS), `mis` (MaskedIS), `opsm` (OffPolicySequenceMask), or the class names;
    values: numbers, `none`, `true` / `false`, or words (`level=sequence`). Examples: `tis`,
    `tis:level=sequence,cap_max=3`, `mis:low=0.5,high=5`, `opsm:delta=0.5`. An unknown name or field is a
    `ConfigError` naming it; the part's own checks validate the values.
    """
    if not isinstance(spec, str):
        validate.fail(f"a correction spec must be a string, got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    classes = {**CORRECTION_NAMES, **{c.__name__: c for c in CORRECTIONS}}
    validate.one_of("correction", name, classes)
    cls = classes[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            validate.fail(f"correction spec {spec!r}: {item!r} is not field=value")
        if key not in fields:
            validate.fail(f"correction spec {spec!r}: {cls.__name__} has no field {key!r} (fields: "
                          f"{', '.join(sorted(fields))})")
        kwargs[key] = _spec_value(value)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field left out (OffPolicySequenceMask's delta)
        validate.fail(f"correction spec {spec!r}: {e}")


def correction_spec(part: Any) -> str:
    """The spec of a correction part (`correction_from_spec(correction_spec(p)) == p`)."""
    short = {cls: name for name, cls in CORRECTION_NAMES.items()}
    fields = ",".join(f"{f.name}={getattr(part, f.name)}" for f in dataclasses.fields(part))
    return f"{short.get(type(part), type(part).__name__)}:{fields}"


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
    """the normalising constant (None: the padded length T)."""
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
#
# Per-token estimators k(x) of KL(pi_theta || pi_ref) for x ~ pi_theta (Schulman 2020, "Approximating KL
# divergence"), r = pi_ref / pi_theta. What matters for training is the expected GRADIENT of the term,
# not its value (A Comedy of Estimators, Shah et al. 2025, arXiv 2512.21852; TRL issue #4967). For one
# token (a single categorical, x ~ pi_theta, on-policy):
#
#   estimator  value E[k]               in the loss: E[grad k]                 unbiased grad of KL(pi||ref)?
#   k1         log pi - log ref: KL     E[grad log pi] = 0: no force at all   no (pure noise)
#   k2         (log r)^2 / 2, biased    E[k1 grad log pi] = grad KL(pi||ref)  yes
#   k3         r - 1 - log r: KL        E[(1 - r) grad log pi]                 no: it is grad KL(ref||pi),
#                                         = -sum_x ref(x) grad log pi(x)        the other direction
#   abs        |log pi - log ref|       E[sign(k1) grad log pi]                no
#   k1+, k3+,  value of k1 / k3 / abs,   k2's gradient                          yes ("+": verl's
#   abs+       gradient of k2                                                   straight-through trick)
#   k * pi/pi_old (is_correction)        E_old[grad(r_old k)] = grad E_pi[k]    yes for k1 and k3, also
#              (DeepSeek-V3.2 eq. 7; TRL use_bias_correction_kl)                off-policy (x ~ pi_old)
#
# In the reward (`fold_kl_into_rewards`): r_t - beta k_t enters the return, and the score-function
# gradient E[(sum_t' k_t') grad log pi] is the unbiased gradient of the sequence-level KL for k1
# (InstructGPT, REINFORCE++; the paper's recommendation), biased for k3 (its mean is right, but the
# score function needs the k1 value per sample). For sequences, every in-loss estimator (k2 and the
# corrected k3 included) only gives sum_t E_s[grad KL(pi(.|s_t) || ref(.|s_t))] with the visited states held
# fixed; it misses how pi changes the later states, so it is unbiased per token and biased for the
# sequence-level KL. `experiments/kl_placement.py` measures each bias exactly on small categoricals.


def kl_abs(logp: jax.Array, logp_ref: jax.Array) -> jax.Array:
    """|log pi - log ref| per token (verl's `kl_penalty="abs"`); not an unbiased estimate of the KL. Its
    gradient at log pi = log ref is 0, as torch's `abs`."""
    k1 = distributions.kl_k1(logp, logp_ref)
    return jnp.sign(k1) * k1


def _straight_through_k2(value: jax.Array, logp: jax.Array, logp_ref: jax.Array) -> jax.Array:
    k2 = distributions.kl_k2(logp, logp_ref)
    return k2 - jax.lax.stop_gradient(k2) + jax.lax.stop_gradient(value)


def kl_k3_value_k2_gradient(logp: jax.Array, logp_ref: jax.Array) -> jax.Array:
    """Per-token k3 in value with k2's gradient: k2 - sg(k2) + sg(k3) (verl's "k3+" / "low_var_kl+").

    k3 is unbiased and non-negative for KL(pi || ref), but its expected gradient is not the gradient of
    the KL; k2's is (Schulman, 2020). This straight-through form reports k3 and follows k2's gradient.
    """
    return _straight_through_k2(distributions.kl_k3(logp, logp_ref), logp, logp_ref)


# Estimator name -> (logp, logp_ref) -> [B, T]. "+" names: the value of the named estimator with the
# gradient of k2 (verl's suffix); "k3_value_k2_grad" is the older name of "k3+".
KL_ESTIMATORS = {
    "k1": distributions.kl_k1,
    "k2": distributions.kl_k2,
    "k3": distributions.kl_k3,
    "abs": kl_abs,
    "k1+": lambda logp, ref: _straight_through_k2(distributions.kl_k1(logp, ref), logp, ref),
    "k3+": kl_k3_value_k2_gradient,
    "abs+": lambda logp, ref: _straight_through_k2(kl_abs(logp, ref), logp, ref),
    "k3_value_k2_grad": kl_k3_value_k2_gradient,
}

KL_IS_CORRECTIONS = ("none", "token", "policy_ratio")


def kl_penalty(
    estimator: str,
    logp_new: jax.Array,
    logp_ref: jax.Array,
    token_log_ratio: jax.Array | None = None,
    policy_log_ratio: jax.Array | None = None,
    *,
    is_correction: str = "none",
    k3_clip: float | None = None,
) -> jax.Array:
    """The per-token KL-to-reference term of the loss, `[B, T]` (differentiated through `logp_new`).

    Args:
      estimator: a key of `KL_ESTIMATORS`.
      logp_new, logp_ref: log pi_theta (with gradient) and log pi_ref (constant) of the sampled tokens.
      token_log_ratio: log(pi_theta / pi_old) per token, with gradient (for `is_correction="token"`).
      policy_log_ratio: the log-ratio the gate sees (token or sequence level), with gradient (for
        `is_correction="policy_ratio"`).
      is_correction: "none"; "token": multiply by pi_theta / pi_old per token (DeepSeek-V3.2 eq. 7, the
        unbiased gradient of KL(pi_theta || ref) from pi_old samples); "policy_ratio": multiply by the
        ratio the gate sees, TRL's `use_bias_correction_kl` (equal to "token" at token level; with
        GSPO's sequence ratio TRL multiplies by the sequence ratio, see TRL issue #6586).
      k3_clip: clamp the k3 value to [-c, c] (verl's `low_var_kl` uses 10); applies to "k3" and "k3+".

    Returns:
      `[B, T]` per-token penalty.
    """
    kl = KL_ESTIMATORS[estimator](logp_new, logp_ref)
    if k3_clip is not None and estimator in ("k3", "k3+", "k3_value_k2_grad"):
        k3 = jnp.clip(distributions.kl_k3(logp_new, logp_ref), -k3_clip, k3_clip)
        kl = k3 if estimator == "k3" else _straight_through_k2(k3, logp_new, logp_ref)
    if is_correction == "token":
        kl = kl * jnp.exp(token_log_ratio)
    elif is_correction == "policy_ratio":
        kl = kl * jnp.exp(policy_log_ratio)
    return kl


def fold_kl_into_rewards(
    token_rewards: jax.Array,
    logp: jax.Array,
    logp_ref: jax.Array,
    mask: jax.Array,
    coef: float | jax.Array,
    estimator: str = "k1",
) -> jax.Array:
    """KL in the reward: r_t - coef * k_t per token, `[B, T]` -> `[B, T]`, 0 on inactive tokens.

    The placement of InstructGPT (Ouyang et al. 2022, eq. 2) and REINFORCE++ (Hu et al. 2025), and
    verl's `use_kl_in_reward` (`apply_kl_penalty`, default estimator "kl" = k1, on the behaviour
    policy's log-probs). With k1 the score-function gradient of the shaped return is the unbiased
    gradient of the sequence-level KL(pi || ref) (Shah et al. 2025, arXiv 2512.21852); with k3 it is
    biased. Everything is stop-gradient: the KL acts only through the advantages. Sum the result over
    tokens for outcome estimators (GRPO, RLOO), or pass it to `reinforce_plus_plus_advantages`.

    Args:
      token_rewards: `[B, T]` rewards (e.g. `outcome_token_rewards(scores, mask)`).
      logp, logp_ref: `[B, T]` log-probs of the sampled tokens under the sampling and reference policies.
      mask: `[B, T]` response mask.
      coef: beta >= 0.
      estimator: a key of `KL_ESTIMATORS` (values only; "+" variants equal their base here).
    """
    chex.assert_equal_shape([token_rewards, logp, logp_ref, mask])
    validate.one_of("estimator", estimator, KL_ESTIMATORS)
    if isinstance(coef, int | float):
        validate.non_negative("coef", coef)
    sg = jax.lax.stop_gradient
    active = jnp.asarray(mask) > 0
    zero = _zero(token_rewards)
    logp, logp_ref = jnp.where(active, sg(logp), zero), jnp.where(active, sg(logp_ref), zero)
    kl = sg(KL_ESTIMATORS[estimator](logp, logp_ref))
    return jnp.where(active, token_rewards - coef * kl, zero)


def outcome_token_rewards(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """`[B]` response scores placed on the last active token of each response, `[B, T]` (0 elsewhere;
    an all-masked response gets nothing)."""
    chex.assert_rank([scores, mask], [1, 2])
    chex.assert_axis_dimension(scores, 0, mask.shape[0])
    active = jnp.asarray(mask) > 0
    last = jnp.sum(active, axis=-1, keepdims=True) - 1
    at_end = (jnp.arange(mask.shape[-1])[None, :] == last) & active
    return jnp.where(at_end, scores[:, None], jnp.zeros((), scores.dtype))


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
    """lower clip of the adaptive coefficient."""
    max_coef: float = 1e6
    """upper clip of the adaptive coefficient."""

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
