"""Around the loss: DAPO's dynamic sampling and overlong handling, multi-reward combination.

Pure, jittable functions on rewards `[P, G]` (P prompts x G samples each), lengths `[B]` and masks
`[B, T]`, for the sampling side of a GRPO-family training loop (003 section 5.4.2; DAPO, Yu et al.,
arXiv 2503.14476, section 3).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def groups_with_signal(rewards: jax.Array, tol: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """DAPO's dynamic-sampling filter: which groups carry a learning signal, and how many.

    A group carries signal when its rewards are not all equal, max - min > tol (DAPO keeps prompts with
    0 < accuracy < 1; for 0/1 rewards the two agree). A group without signal gets zero group-relative
    advantages and hence zero policy gradient (003 section 5.4.2 (2)).

    Args:
      rewards: `[P, G]` rewards of G samples for each of P prompts.
      tol: spread at or below which rewards count as equal (>= 0).

    Returns:
      `(keep [P] bool, num_kept int32 scalar)`.
    """
    chex.assert_rank(rewards, 2)
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    spread = jnp.max(rewards, axis=-1) - jnp.min(rewards, axis=-1)
    keep = spread > tol
    return keep, jnp.sum(keep).astype(jnp.int32)


def zero_signal_fraction(rewards: jax.Array, tol: float = 1e-6) -> jax.Array:
    """Fraction of groups whose rewards are all equal (zero-advantage groups), `[P, G]` -> scalar."""
    keep, _ = groups_with_signal(rewards, tol)
    return 1.0 - jnp.mean(keep.astype(jnp.float32))


def fill_batch(keep: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """Indices of the first `batch_size` kept groups, for DAPO's "sample until the batch is full".

    Concatenate the groups of several generation rounds, filter them with `groups_with_signal`, and take
    the first `batch_size` kept ones, in order. Static shapes, so it jits.

    Args:
      keep: `[P]` bool, the groups that may enter the batch.
      batch_size: number of groups wanted.

    Returns:
      `(indices [batch_size] int32, valid [batch_size] bool)`; when fewer than `batch_size` groups are
      kept, the missing slots point at index 0 and are marked invalid (mask them out of the loss).
    """
    chex.assert_rank(keep, 1)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = jnp.argsort(jnp.logical_not(keep), stable=True)  # kept groups first, in their order
    slots = jnp.arange(batch_size)
    valid = slots < jnp.sum(keep)
    padded = jnp.concatenate([order, jnp.zeros((max(batch_size - keep.shape[0], 0),), order.dtype)])
    indices = jnp.where(valid, padded[:batch_size], 0)
    return indices.astype(jnp.int32), valid


def overlong_penalty(lengths: jax.Array, max_length: int, cache_length: int) -> jax.Array:
    """DAPO's soft overlong punishment (DAPO eq. 13), added to the task reward; lengths in tokens.

        R(L) = 0                                  L <= max_length - cache_length
             = ((max_length - cache_length) - L) / cache_length   inside the cache interval
             = -1                                 L > max_length

    DAPO uses max_length 20480 with a 4096-token cache. Any shape of `lengths` -> the same shape.
    """
    if cache_length <= 0 or cache_length > max_length:
        raise ValueError(f"need 0 < cache_length <= max_length, got {cache_length}, {max_length}")
    lengths = jnp.asarray(lengths, jnp.float32)
    soft_start = max_length - cache_length
    ramp = (soft_start - lengths) / cache_length
    return jnp.where(lengths <= soft_start, 0.0, jnp.where(lengths <= max_length, ramp, -1.0))


def mask_truncated(mask: jax.Array, truncated: jax.Array) -> jax.Array:
    """Zero the response mask of truncated completions (DAPO's overlong filtering), `[B, T]`, `[B]`.

    TRL's `mask_truncated_completions`. The masked rows then change neither the loss nor its gradient
    (with every aggregation of `polygrad.grpo`), but keep them in the advantage computation if the
    group statistics should still see their rewards.
    """
    chex.assert_rank([mask, truncated], [2, 1])
    chex.assert_axis_dimension(truncated, 0, mask.shape[0])
    return jnp.where(jnp.asarray(truncated, bool)[:, None], jnp.zeros_like(mask), mask)


def combine_rewards(rewards: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted sum of several rewards, `[..., K]` with weights `[K]` -> `[...]`.

    As TRL's `reward_weights`: a NaN reward means "does not apply to this sample" and is skipped; a
    sample to which no reward applies gets 0.
    """
    weights = jnp.asarray(weights, jnp.float32)
    chex.assert_rank(weights, 1)
    chex.assert_axis_dimension(rewards, -1, weights.shape[0])
    applies = ~jnp.isnan(rewards)
    return jnp.sum(jnp.where(applies, rewards * weights, 0.0), axis=-1)
