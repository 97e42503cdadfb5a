"""Importance-sampling estimators: exact expectations, unbiasedness, degenerate inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polygrad import importance


@pytest.fixture(autouse=True, scope="module")
def _no_implicit_rank_promotion():
    """Every test here (and every module fixture) runs with jax_numpy_rank_promotion="raise"."""
    with jax.numpy_rank_promotion("raise"):
        yield


def test_ratios_are_clamped_and_finite():
    logp_new = jnp.array([0.0, 500.0, -500.0, -jnp.inf])
    logp_old = jnp.array([0.0, 0.0, 0.0, 0.0])
    w = importance.ratios(logp_new, logp_old, clip=20.0)
    assert jnp.all(jnp.isfinite(w))
    np.testing.assert_allclose(w, [1.0, np.exp(20.0), np.exp(-20.0), np.exp(-20.0)], rtol=1e-6)
    grad = jax.grad(lambda x: importance.ratios(x, logp_old[:2]).sum())(jnp.array([0.3, 1.0]))
    np.testing.assert_allclose(grad, np.exp([0.3, 1.0]), rtol=1e-6)


def test_trajectory_weight_is_product_of_step_ratios(maybe_jit):
    step = jnp.log(jnp.array([[2.0, 0.5], [3.0, 0.5], [0.5, 4.0]]))  # [T=3, N=2]
    trajectory_weights = maybe_jit(importance.trajectory_weights)
    np.testing.assert_allclose(trajectory_weights(step), [3.0, 1.0], rtol=1e-6)
    mask = jnp.array([[1, 1], [1, 1], [0, 1]], jnp.float32)  # the first trajectory ended after 2 steps
    np.testing.assert_allclose(trajectory_weights(step, mask), [6.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(trajectory_weights(step, mask > 0), [6.0, 1.0], rtol=1e-6)  # a bool mask
    np.testing.assert_allclose(
        maybe_jit(importance.cumulative_weights)(step), [[2.0, 0.5], [6.0, 0.25], [3.0, 1.0]], rtol=1e-6
    )
    np.testing.assert_allclose(
        maybe_jit(importance.trajectory_log_weights)(step, mask), np.log([6.0, 1.0]), rtol=1e-6, atol=1e-6
    )


def test_per_decision_is_by_hand(maybe_jit):
    # One trajectory, rho = (2, 0.5), rewards (1, 1), gamma 0.9: 2*1 + 0.9 * (2*0.5) * 1 = 2.9.
    step = jnp.log(jnp.array([[2.0], [0.5]]))
    rewards = jnp.ones((2, 1))
    per_decision_is = maybe_jit(importance.per_decision_is)
    np.testing.assert_allclose(per_decision_is(step, rewards, 0.9), 2.9, rtol=1e-6)
    # A masked second step adds nothing: 2 * 1.
    mask = jnp.array([[1.0], [0.0]])
    np.testing.assert_allclose(per_decision_is(step, rewards, 0.9, mask), 2.0, rtol=1e-6)


def test_ordinary_and_per_decision_is_are_unbiased_on_a_two_step_chain():
    # Behaviour q = Bernoulli(0.5) per step, target p = Bernoulli(0.8); reward 1 for action 1.
    # Exact discounted return under p: 0.8 + 0.9 * 0.8 = 1.52.
    key = jax.random.PRNGKey(0)
    n = 200_000
    actions = jax.random.bernoulli(key, 0.5, (2, n))
    step = jnp.where(actions, jnp.log(0.8 / 0.5), jnp.log(0.2 / 0.5))
    rewards = actions.astype(jnp.float32)
    ret = rewards[0] + 0.9 * rewards[1]
    w = importance.trajectory_weights(step)
    ordinary = importance.ordinary_is(w, ret)
    pdis = importance.per_decision_is(step, rewards, 0.9)
    snis = importance.self_normalised_is(w, ret)
    for estimate in (ordinary, pdis, snis):
        assert abs(float(estimate) - 1.52) < 0.02


def test_capped_weights():
    w = jnp.array([0.1, 1.0, 5.0, 50.0])
    np.testing.assert_allclose(importance.capped_weights(w, 2.0), [0.1, 1.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="cap must be > 0"):
        importance.capped_weights(w, 0.0)
    with pytest.raises(ValueError, match="cap must be finite"):
        importance.capped_weights(w, float("nan"))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.0, 100.0, width=32), min_size=1, max_size=30))
def test_effective_sample_size_bounds(weights):
    w = jnp.array(weights, jnp.float32)
    ess = float(importance.effective_sample_size(w))
    if float(jnp.sum(w)) == 0.0:
        assert ess == 0.0
    else:
        assert 1.0 - 1e-4 <= ess <= len(weights) * (1 + 1e-4)


def test_effective_sample_size_values():
    np.testing.assert_allclose(importance.effective_sample_size(jnp.ones(8)), 8.0)
    np.testing.assert_allclose(importance.effective_sample_size(jnp.array([1.0, 0.0, 0.0])), 1.0)
    w = jnp.array([0.5, 2.0, 1.0, 0.25])
    kish = float(w.sum() ** 2 / (w**2).sum())
    np.testing.assert_allclose(importance.effective_sample_size(w), kish, rtol=1e-6)
    np.testing.assert_allclose(importance.effective_sample_size_from_log_weights(jnp.log(w)), kish, rtol=1e-6)
    mask = jnp.array([1.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(importance.effective_sample_size_from_log_weights(jnp.log(w), mask),
                               float(w[:3].sum() ** 2 / (w[:3] ** 2).sum()), rtol=1e-6)


def test_degenerate_weights_give_zero_not_nan():
    zeros = jnp.zeros(4)
    assert float(importance.self_normalised_is(zeros, jnp.ones(4))) == 0.0
    assert float(importance.effective_sample_size(zeros)) == 0.0
