"""Group-relative (critic-free) advantages for rewards shaped `[num_prompts, group_size]`.

003 section 5.2: for each prompt, G responses are sampled and scored; the other responses of the same
prompt act as the baseline. Each function maps rewards `[P, G]` to advantages `[P, G]` (one scalar per
response, shared by all of its tokens). Degenerate groups are defined, never NaN: a group whose rewards
are all equal (including a group of size 1) gets advantages of exactly 0.
"""

import chex
import jax
import jax.numpy as jnp


def _check_groups(rewards: jax.Array) -> None:
    chex.assert_rank(rewards, 2)
    chex.assert_type(rewards, float)


def _centered(rewards: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(rewards - group mean, group is constant); exactly 0 in constant groups."""
    constant = jnp.max(rewards, axis=1, keepdims=True) == jnp.min(rewards, axis=1, keepdims=True)
    centered = rewards - jnp.mean(rewards, axis=1, keepdims=True)
    return jnp.where(constant, 0.0, centered), constant


def group_normalized_advantages(
    rewards: jax.Array, eps: float = 1e-4, eps_in_sqrt: bool = False, ddof: int = 0
) -> jax.Array:
    """GRPO advantages (u_i - mean_group) / std_group (003 eq. 90-91; DeepSeekMath).

    Conventions differ only in the standard deviation's epsilon and degrees of freedom:
    003 eq. 90 is `eps_in_sqrt=True, ddof=0`; TRL uses `std(ddof=1) + 1e-4`; verl `std(ddof=1) + 1e-6`.

    Args:
      rewards: `[P, G]` scores of G responses for each of P prompts.
      eps: added to the std (or, with `eps_in_sqrt`, to the variance under the square root).
      eps_in_sqrt: where epsilon goes.
      ddof: 0 for the population std (003 eq. 90), 1 for Bessel's correction (TRL, verl).

    Returns:
      `[P, G]` advantages; 0 for constant groups and groups of size 1.
    """
    _check_groups(rewards)
    group_size = rewards.shape[1]
    centered, constant = _centered(rewards)
    dof = max(group_size - ddof, 1)
    var = jnp.sum(centered**2, axis=1, keepdims=True) / dof
    std = jnp.sqrt(var + eps) if eps_in_sqrt else jnp.sqrt(var) + eps
    safe_std = jnp.where(constant, 1.0, std)
    return jnp.where(constant, 0.0, centered / safe_std)


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
      eps: added to the batch std.

    Returns:
      `[P, G]` advantages; exactly 0 in constant groups, and all 0 if every group is constant.
    """
    _check_groups(rewards)
    centered, _ = _centered(rewards)
    std = jnp.sqrt(jnp.mean(centered**2))
    return centered / (std + eps)


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
