"""polygrad.lm.generation.token_advantages and polygrad.estimators.statistics.pass_at_k."""

from math import comb

import jax.numpy as jnp
import numpy as np

from polygrad.estimators import statistics
from polygrad.lm import generation


def test_pass_at_k_matches_combinatorics():
    for n, k in [(8, 1), (8, 4), (8, 8), (5, 2)]:
        c = np.arange(n + 1)
        expected = [1 - comb(n - ci, k) / comb(n, k) for ci in c]
        np.testing.assert_allclose(statistics.pass_at_k(n, jnp.asarray(c), k), expected, atol=1e-6)


def test_token_advantages_pay_the_reward_at_the_last_token():
    mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 0, 0]], jnp.float32)
    values = jnp.asarray([[0.5, 0.2, 0.1, 9.0], [0.3, 0.4, 9.0, 9.0]])
    rewards = jnp.asarray([1.0, 0.0])
    adv, targets = generation.token_advantages(rewards, values, mask, lam=1.0)
    # lam = gamma = 1: advantage = reward - value, target = the sequence reward, on active tokens only
    np.testing.assert_allclose(adv, [[0.5, 0.8, 0.9, 0], [-0.3, -0.4, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(targets, [[1, 1, 1, 0], [0, 0, 0, 0]], atol=1e-6)
    adv0, _ = generation.token_advantages(rewards, values, mask, lam=0.0)  # TD errors
    np.testing.assert_allclose(adv0, [[-0.3, -0.1, 0.9, 0], [0.1, -0.4, 0, 0]], atol=1e-6)
