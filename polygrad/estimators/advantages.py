"""Group-relative (critic-free) advantages for rewards shaped `[num_prompts, group_size]`.

003 section 5.2: for each prompt, G responses are sampled and scored; the other responses of the same
prompt act as the baseline. Each function maps rewards `[P, G]` to advantages `[P, G]` (one scalar per
response, shared by all of its tokens). Degenerate groups are defined, never NaN: a group whose rewards
are all equal (including a group of size 1) gets advantages of exactly 0, and the normalised advantages
are computed from deviations scaled by a power of two (exact) that brings the largest to [0.5, 1), so that
huge rewards (1e30 in float32) give finite advantages instead of overflowing in the square. Every
function follows the dtype of `rewards`; a negative or non-finite `eps` is refused with `ValueError`.
"""

import chex
import jax
import jax.numpy as jnp

from polygrad import validate


def _check_groups(rewards: jax.Array) -> None:
    chex.assert_rank(rewards, 2)
    chex.assert_type(rewards, float)


def _check_eps(eps) -> None:
    """A concrete eps must be finite and >= 0 (a traced one cannot be checked)."""
    if not isinstance(eps, jax.core.Tracer):
        validate.non_negative("eps", float(eps))


def _centered(rewards: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(rewards - group mean, group is constant); exactly 0 in constant groups."""
    constant = jnp.max(rewards, axis=1, keepdims=True) == jnp.min(rewards, axis=1, keepdims=True)
    centered = rewards - jnp.mean(rewards, axis=1, keepdims=True)
    return jnp.where(constant, jnp.zeros((), rewards.dtype), centered), constant


def _power_of_two_scale(largest: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Powers of two (a, b) with largest * a * b in [0.5, 1), each factor a normal number.

    Scaling by exact powers of two changes no digit, and using two factors keeps each one (and its
    reciprocal) representable even for the largest floats: a single 2^-128 would be subnormal, which
    XLA:CPU flushes to zero (as it does x / y for y above ~1e38 in float32). Constants for autodiff.
    """
    _, exponent = jnp.frexp(jax.lax.stop_gradient(largest))
    half = exponent // 2
    one = jnp.ones((), largest.dtype)
    return jnp.ldexp(one, -half), jnp.ldexp(one, half - exponent)


def _normalised(centered: jax.Array, count, axis, eps, eps_in_sqrt: bool) -> jax.Array:
    """centered / (rms + eps), or centered / sqrt(rms^2 + eps), with rms = sqrt(sum(centered^2) / count)
    over `axis`, computed without overflow or underflow anywhere.

    Numerator and denominator are both scaled by k, the power of two that brings the largest deviation
    to [0.5, 1): (k c) / (k rms + k eps), or (k c) / hypot(k rms, k sqrt(eps)). Powers of two change no
    digit, so this is exact in every dtype. A zero denominator (all deviations 0 and eps = 0) gives 0.
    """
    largest = jnp.max(jnp.abs(centered), axis=axis, keepdims=True)
    a, b = _power_of_two_scale(largest)
    scaled = centered * a * b
    rms = jnp.sqrt(jnp.sum(scaled**2, axis=axis, keepdims=True) / count)
    eps = jnp.asarray(eps, centered.dtype)
    denominator = jnp.hypot(rms, jnp.sqrt(eps) * a * b) if eps_in_sqrt else rms + eps * a * b
    safe = jnp.where(denominator > 0, denominator, jnp.ones((), centered.dtype))
    return jnp.where(denominator > 0, scaled / safe, jnp.zeros((), centered.dtype))


def group_normalized_advantages(
    rewards: jax.Array, eps: float = 1e-4, eps_in_sqrt: bool = False, ddof: int = 0
) -> jax.Array:
    """GRPO advantages (u_i - mean_group) / std_group (003 eq. 90-91; DeepSeekMath).

    Conventions differ only in the standard deviation's epsilon and degrees of freedom:
    003 eq. 90 is `eps_in_sqrt=True, ddof=0`; TRL uses `std(ddof=1) + 1e-4`; verl `std(ddof=1) + 1e-6`.

    Args:
      rewards: `[P, G]` scores of G responses for each of P prompts.
      eps: added to the std (or, with `eps_in_sqrt`, to the variance under the square root); finite and
        >= 0 (`ValueError` otherwise).
      eps_in_sqrt: where epsilon goes.
      ddof: 0 for the population std (003 eq. 90), 1 for Bessel's correction (TRL, verl).

    Returns:
      `[P, G]` advantages; 0 for constant groups and groups of size 1.
    """
    _check_groups(rewards)
    _check_eps(eps)
    validate.integer("ddof", ddof, minimum=0)
    group_size = rewards.shape[1]
    centered, constant = _centered(rewards)
    dof = max(group_size - ddof, 1)
    advantages = _normalised(centered, dof, 1, eps, eps_in_sqrt)
    return jnp.where(constant, jnp.zeros((), rewards.dtype), advantages)


def group_centered_advantages(rewards: jax.Array) -> jax.Array:
    """Dr. GRPO advantages u_i - mean_group, no division by the std (Liu et al., 2025; 003 section 5.4.1).

    Args:
      rewards: `[P, G]`.

    Returns:
      `[P, G]` advantages; exactly 0 in constant groups.
    """
    _check_groups(rewards)
    return _centered(rewards)[0]


def batch_normalized_advantages(rewards: jax.Array, eps: float = 1e-4) -> jax.Array:
    """Group-mean baseline scaled by the batch std of the centred rewards.

    A_i = (u_i - mean_group) / (std_batch + eps), std_batch = sqrt(mean over all P*G responses of
    (u - mean_group)^2): groups with little spread are not blown up to unit scale ("group mean,
    batch std", Liu et al., 2025, "Tricks or traps"). TRL's `scale_rewards="batch"` divides by the std of
    the raw rewards instead (which also contains the spread between prompts).

    Args:
      rewards: `[P, G]`.
      eps: added to the batch std; finite and >= 0 (`ValueError` otherwise). With eps = 0 and every
        group constant the result is 0 (not 0 / 0).

    Returns:
      `[P, G]` advantages; exactly 0 in constant groups, and all 0 if every group is constant.
    """
    _check_groups(rewards)
    _check_eps(eps)
    centered, _ = _centered(rewards)
    return _normalised(centered, centered.size, None, eps, eps_in_sqrt=False)


def leave_one_out_advantages(rewards: jax.Array) -> jax.Array:
    """RLOO advantages u_i - mean_{j != i} u_j = G / (G - 1) * (u_i - mean_group) (Ahmadian et al., 2024).

    Args:
      rewards: `[P, G]`.

    Returns:
      `[P, G]` advantages; 0 for constant groups and for groups of size 1 (no other sample).
    """
    _check_groups(rewards)
    group_size = rewards.shape[1]
    if group_size == 1:
        return jnp.zeros_like(rewards)
    return _centered(rewards)[0] * (group_size / (group_size - 1))


# --- TRL and verl conventions, GPG, GDPO, REINFORCE++ ---------------------------------------------
#
# The functions below follow the two libraries most GRPO-family runs use, with every convention a
# parameter: the degrees of freedom `ddof` of each standard deviation (TRL and verl use Bessel's ddof=1,
# 003 eq. 90 ddof=0) and where its epsilon goes. Each says which library line it transcribes.


def _group_mean_and_std(rewards: jax.Array, ddof: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Group mean `[P, 1]`, std `[P, 1]` with `ddof` (divisor max(G - ddof, 1)) and constant flags."""
    group_size = rewards.shape[1]
    mean = jnp.mean(rewards, axis=1, keepdims=True)
    constant = jnp.max(rewards, axis=1, keepdims=True) == jnp.min(rewards, axis=1, keepdims=True)
    centered = jnp.where(constant, jnp.zeros((), rewards.dtype), rewards - mean)
    var = jnp.sum(centered**2, axis=1, keepdims=True) / max(group_size - ddof, 1)
    return mean, jnp.sqrt(var), constant


def _standardise(x: jax.Array, weights: jax.Array, ddof: int, eps: float, eps_in_sqrt: bool) -> jax.Array:
    """(x - mean) / scale over all entries, each entry counted `weights` times (a count, e.g. its tokens).

    mean = sum(w x) / sum(w); var = sum(w (x - mean)^2) / max(sum(w) - ddof, 1); scale = std + eps, or
    sqrt(var + eps) with `eps_in_sqrt`. Entries of weight 0 give 0; an all-equal batch gives exactly 0.
    """
    dtype = x.dtype
    zero = jnp.zeros((), dtype)
    total = jnp.sum(weights)
    mean = jnp.sum(weights * x) / jnp.maximum(total, jnp.ones((), dtype))
    constant = jnp.max(jnp.where(weights > 0, x, -jnp.inf)) == jnp.min(jnp.where(weights > 0, x, jnp.inf))
    centered = jnp.where(constant | (weights <= 0), zero, x - mean)
    var = jnp.sum(weights * centered**2) / jnp.maximum(total - ddof, jnp.ones((), dtype))
    scale = jnp.sqrt(var + eps) if eps_in_sqrt else jnp.sqrt(var) + eps
    safe = jnp.where(scale > 0, scale, jnp.ones((), dtype))
    return centered / safe


def batch_std_advantages(rewards: jax.Array, eps: float = 1e-4, ddof: int = 1) -> jax.Array:
    """Group-mean baseline divided by the standard deviation of ALL rewards of the batch.

    A_i = (u_i - mean_group) / (std_batch(u) + eps): TRL's `scale_rewards="batch"` (`grpo_trainer.py`,
    `std_rewards = nanstd(rewards)`, ddof=1, eps 1e-4; "PPO Lite", Liu et al. 2025, arXiv 2508.08221).
    Unlike `batch_normalized_advantages`, the batch std here is that of the raw rewards, which also
    contains the spread between prompts.

    Args:
      rewards: `[P, G]`.
      eps: added to the batch std.
      ddof: degrees of freedom of the batch std (1: TRL).

    Returns:
      `[P, G]`; exactly 0 in constant groups.
    """
    _check_groups(rewards)
    validate.integer("ddof", ddof, minimum=0)
    mean, _, constant = _group_mean_and_std(rewards, ddof)
    centered = jnp.where(constant, jnp.zeros((), rewards.dtype), rewards - mean)
    flat = rewards.reshape(-1)
    batch_var = jnp.sum((flat - jnp.mean(flat)) ** 2) / max(flat.size - ddof, 1)
    scale = jnp.sqrt(batch_var) + jnp.asarray(eps, rewards.dtype)
    return centered / jnp.where(scale > 0, scale, jnp.ones((), rewards.dtype))


def gpg_advantages(rewards: jax.Array, f_norm: float = 1.0, alpha: str = "valid_groups") -> jax.Array:
    """GPG advantages alpha (u_i - mean_group) / F_norm (Chu et al. 2025, "GPG: A Simple and Strong
    Reinforcement Learning Baseline for Model Reasoning", arXiv 2504.02546).

    The group mean is the baseline, there is no division by the group std, and alpha rescales the batch
    so that groups without signal (all rewards equal) do not shrink the gradient:
      - `alpha="valid_groups"`: alpha = P / (number of groups whose rewards are not all equal), the
        authors' code (AMAP-ML/GPG, `grpo_trainer.py`: `loss / inverse_alpha`, inverse_alpha = valid
        groups / groups), which multiplies the loss instead of the advantages (the same gradient).
      - `alpha="nonzero_rewards"`: alpha = P G / (number of nonzero rewards), verl's
        `compute_gpg_outcome_advantage` (`alpha = bsz / count_nonzero(scores)`), a different count.

    Args:
      rewards: `[P, G]`.
      f_norm: the constant F_norm (1 in both implementations).
      alpha: which count defines alpha (see above).

    Returns:
      `[P, G]`; exactly 0 in constant groups; all 0 when no group has signal.
    """
    _check_groups(rewards)
    validate.positive("f_norm", f_norm)
    validate.one_of("alpha", alpha, ("valid_groups", "nonzero_rewards"))
    mean, _, constant = _group_mean_and_std(rewards, 0)
    centered = jnp.where(constant, jnp.zeros((), rewards.dtype), rewards - mean)
    if alpha == "valid_groups":
        count = jnp.sum(~constant[:, 0])
        scale = rewards.shape[0] / jnp.maximum(count, 1).astype(rewards.dtype)
    else:
        count = jnp.sum(rewards != 0)
        scale = rewards.size / jnp.maximum(count, 1).astype(rewards.dtype)
    return centered * (scale / jnp.asarray(f_norm, rewards.dtype))


def multi_reward_advantages(
    rewards: jax.Array,
    weights: jax.Array | None = None,
    *,
    eps: float = 1e-4,
    ddof: int = 1,
    batch_eps: float = 1e-4,
    batch_ddof: int = 1,
    batch_eps_in_sqrt: bool = False,
    lengths: jax.Array | None = None,
) -> jax.Array:
    """GDPO: normalise each reward within its group, sum them, then normalise the sum over the batch
    (Liu et al. 2026, "GDPO: Group reward-Decoupled Normalization Policy Optimization for Multi-reward
    RL Optimization", arXiv 2601.05242).

        a_k = (u_k - mean_group(u_k)) / (std_group(u_k) + eps)        for every reward k
        s   = sum_k w_k a_k
        A   = (s - mean_batch(s)) / (std_batch(s) + batch_eps)

    so that a reward with a large spread cannot drown the others, as it does when the rewards are summed
    first. Defaults are TRL's `multi_objective_aggregation="normalize_then_sum"` (ddof 1 and eps 1e-4 in
    both steps). verl's `gdpo` estimator is `eps=1e-6` per reward and, for the batch step,
    `masked_whiten` over tokens: pass `lengths` (each response counted once per token),
    `batch_eps=1e-8, batch_eps_in_sqrt=True`.

    Args:
      rewards: `[P, G, K]`, K rewards per response.
      weights: `[K]` weights w_k (None: all 1).
      eps, ddof: epsilon added to and degrees of freedom of each group std.
      batch_eps, batch_ddof, batch_eps_in_sqrt: the same for the batch step (`batch_eps_in_sqrt`: divide
        by sqrt(var + batch_eps) instead of std + batch_eps).
      lengths: optional `[P, G]` token counts weighting the batch statistics (verl); None: one per response.

    Returns:
      `[P, G]` advantages; a reward constant within a group contributes 0 to that group; an all-equal
      batch gives 0.
    """
    chex.assert_rank(rewards, 3)
    chex.assert_type(rewards, float)
    validate.integer("ddof", ddof, minimum=0)
    validate.integer("batch_ddof", batch_ddof, minimum=0)
    validate.non_negative("eps", eps)
    validate.non_negative("batch_eps", batch_eps)
    dtype = rewards.dtype
    per_reward = jnp.moveaxis(rewards, -1, 0)  # [K, P, G]
    normalised = jax.vmap(lambda r: group_normalized_advantages(r, eps=eps, ddof=ddof))(per_reward)
    w = jnp.ones(rewards.shape[-1], dtype) if weights is None else jnp.asarray(weights, dtype)
    chex.assert_shape(w, (rewards.shape[-1],))
    summed = jnp.tensordot(w, normalised, axes=1)  # [P, G]
    counts = jnp.ones_like(summed) if lengths is None else jnp.asarray(lengths, dtype)
    chex.assert_equal_shape([counts, summed])
    return _standardise(summed, counts, batch_ddof, batch_eps, batch_eps_in_sqrt)


def whiten_tokens(values: jax.Array, mask: jax.Array, ddof: int = 1, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over the active tokens of `[B, T]` values, 0 on inactive tokens.

    verl's `masked_whiten` (mean over tokens, Bessel-corrected variance with `ddof=1`, eps under the
    square root), used by its REINFORCE++, REINFORCE++-baseline, GAE and GDPO advantages. Every active
    token counts once, so longer responses weigh more. An all-equal batch gives exactly 0.
    """
    chex.assert_rank([values, mask], 2)
    chex.assert_equal_shape([values, mask])
    validate.integer("ddof", ddof, minimum=0)
    validate.non_negative("eps", eps)
    weights = (jnp.asarray(mask) > 0).astype(values.dtype)
    values = jnp.where(weights > 0, values, jnp.zeros((), values.dtype))
    return _standardise(values, weights, ddof, eps, True)


def reinforce_plus_plus_advantages(
    token_rewards: jax.Array, mask: jax.Array, gamma: float = 1.0, ddof: int = 1, eps: float = 1e-8
) -> tuple[jax.Array, jax.Array]:
    """REINFORCE++ (Hu et al. 2025, arXiv 2501.03262): per-token discounted returns whitened over the
    batch, no critic and no group baseline.

        G_t = sum_{t' >= t} gamma^(t' - t) r_t'      (within each response)
        A_t = whiten_tokens(G)_t

    Fold the KL to the reference into `token_rewards` first (`losses.fold_kl_into_rewards`, k1 per
    token: the paper's and verl's placement), then every token's return carries the KL of the tokens
    after it. Transcribes verl's `compute_reinforce_plus_plus_outcome_advantage`.

    Args:
      token_rewards: `[B, T]` per-token rewards (the outcome score on the last response token, minus
        the per-token KL penalty if any).
      mask: `[B, T]` response mask.
      gamma: discount (verl's `algorithm.gamma`, default 1).
      ddof, eps: of the whitening (verl: 1 and 1e-8 under the square root).

    Returns:
      `(advantages [B, T], returns [B, T])`, 0 on inactive tokens.
    """
    chex.assert_rank([token_rewards, mask], 2)
    chex.assert_equal_shape([token_rewards, mask])
    validate.in_range("gamma", gamma, 0.0, 1.0)
    dtype = token_rewards.dtype
    m = (jnp.asarray(mask) > 0).astype(dtype)
    rewards = jnp.where(m > 0, token_rewards, jnp.zeros((), dtype))

    def step(running, inputs):
        r_t, m_t = inputs
        running = r_t + gamma * running
        return running * m_t, running

    _, returns = jax.lax.scan(step, jnp.zeros(rewards.shape[0], dtype), (rewards.T, m.T), reverse=True)
    returns = returns.T * m
    return whiten_tokens(returns, m, ddof=ddof, eps=eps), returns


def reinforce_plus_plus_baseline_advantages(
    rewards: jax.Array, mask: jax.Array, ddof: int = 1, eps: float = 1e-8
) -> jax.Array:
    """REINFORCE++-baseline (Hu et al. 2025, arXiv 2501.03262): the group mean as baseline, then the
    whole batch whitened over tokens (verl's `compute_reinforce_plus_plus_baseline_outcome_advantage`).

        A_{i,t} = whiten_tokens(u_i - mean_group(u))_{i,t}

    Args:
      rewards: `[P, G]` response scores (sum the per-token rewards first if the KL is in the reward).
      mask: `[P * G, T]` response mask of the prompt-major flattened responses.
      ddof, eps: of the whitening.

    Returns:
      `[P * G, T]` per-token advantages, 0 on inactive tokens. A group of size 1 keeps its raw score as
      verl does (its baseline is 0), so G = 1 is REINFORCE++ with outcome rewards.
    """
    _check_groups(rewards)
    chex.assert_rank(mask, 2)
    chex.assert_axis_dimension(mask, 0, rewards.size)
    dtype = rewards.dtype
    if rewards.shape[1] == 1:
        centered = rewards
    else:
        mean, _, constant = _group_mean_and_std(rewards, 0)
        centered = jnp.where(constant, jnp.zeros((), dtype), rewards - mean)
    m = (jnp.asarray(mask) > 0).astype(dtype)
    return whiten_tokens(centered.reshape(-1, 1) * m, m, ddof=ddof, eps=eps)
