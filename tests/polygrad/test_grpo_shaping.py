"""Tests of the helpers around GRPO-family losses: dynamic sampling, overlong handling, rewards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polygrad import grpo


def test_groups_with_signal_by_hand(maybe_jit):
    rewards = jnp.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.5 + 1e-8, 0.5], [0.0, 0.0, 0.0]])
    keep, count = maybe_jit(grpo.groups_with_signal)(rewards)
    np.testing.assert_array_equal(keep, [False, True, False, False])
    assert int(count) == 1
    keep, count = grpo.groups_with_signal(rewards, tol=0.0)
    np.testing.assert_array_equal(keep, [False, True, False, False])  # 1e-8 is below float32 resolution
    np.testing.assert_allclose(grpo.zero_signal_fraction(rewards), 0.75)
    with pytest.raises(ValueError, match="tol"):
        grpo.groups_with_signal(rewards, tol=-1.0)


def test_signal_groups_are_exactly_those_with_nonzero_advantages():
    rewards = jax.random.bernoulli(jax.random.PRNGKey(0), 0.5, (64, 4)).astype(jnp.float32)
    keep, _ = grpo.groups_with_signal(rewards)
    advantages = grpo.group_advantages(grpo.PRESETS["grpo"], rewards).reshape(64, 4)
    np.testing.assert_array_equal(keep, jnp.any(advantages != 0, axis=-1))


def test_fill_batch_takes_the_first_kept_groups_in_order(maybe_jit):
    keep = jnp.array([False, True, True, False, True, True])
    indices, valid = maybe_jit(grpo.fill_batch, static_argnums=1)(keep, 3)
    np.testing.assert_array_equal(indices, [1, 2, 4])
    np.testing.assert_array_equal(valid, [True, True, True])
    indices, valid = grpo.fill_batch(jnp.array([False, True, False]), 4)
    np.testing.assert_array_equal(indices, [1, 0, 0, 0])
    np.testing.assert_array_equal(valid, [True, False, False, False])
    with pytest.raises(ValueError, match="batch_size"):
        grpo.fill_batch(keep, 0)


def test_overlong_penalty_piecewise():
    lengths = jnp.array([0, 12, 16, 18, 20, 21, 100])
    penalty = grpo.overlong_penalty(lengths, max_length=20, cache_length=4)
    # 0 up to 16 tokens, a linear ramp (16 - L) / 4 to -1 at 20, then -1.
    np.testing.assert_allclose(penalty, [0.0, 0.0, 0.0, -0.5, -1.0, -1.0, -1.0])
    with pytest.raises(ValueError, match="cache_length"):
        grpo.overlong_penalty(lengths, max_length=20, cache_length=30)


def test_mask_truncated_removes_rows_from_the_loss():
    mask = jnp.ones((6, 5))
    truncated = jnp.array([False, True, False, False, True, False])
    masked = grpo.mask_truncated(mask, truncated)
    np.testing.assert_array_equal(masked.sum(-1), [5, 0, 5, 5, 0, 5])
    rng = np.random.default_rng(0)
    logp_new, logp_old = rng.normal(size=(2, 6, 5)).astype(np.float32) * 0.1 - 1
    adv = rng.normal(size=6).astype(np.float32)
    loss_fn = jax.jit(grpo.make_loss("dapo"))
    rows = np.flatnonzero(~np.asarray(truncated))
    kept = loss_fn(logp_new[rows], logp_old[rows], adv[rows], mask[rows])[0]
    np.testing.assert_allclose(loss_fn(logp_new, logp_old, adv, masked)[0], kept, rtol=1e-6)


def test_combine_rewards_weights_and_skips_nan():
    rewards = jnp.array([[1.0, 0.5], [jnp.nan, 2.0], [jnp.nan, jnp.nan]])
    combined = grpo.combine_rewards(rewards, jnp.array([1.0, 0.1]))
    np.testing.assert_allclose(combined, [1.05, 0.2, 0.0], rtol=1e-6)
    with pytest.raises(AssertionError):
        grpo.combine_rewards(rewards, jnp.array([1.0, 0.1, 3.0]))
