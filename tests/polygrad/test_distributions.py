"""Exact KL/entropy closed forms, log-probs, sampling, and the sampled KL estimators."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polygrad import distributions as d


@pytest.fixture(autouse=True, scope="module")
def _no_implicit_rank_promotion():
    """Every test here (and every module fixture) runs with jax_numpy_rank_promotion="raise"."""
    with jax.numpy_rank_promotion("raise"):
        yield


def test_categorical_against_hand_values(maybe_jit):
    logits = jnp.log(jnp.array([0.2, 0.5, 0.3]))
    log_prob = maybe_jit(d.categorical_log_prob)(logits, jnp.array(1))
    np.testing.assert_allclose(log_prob, np.log(0.5), rtol=1e-6)
    p = np.array([0.2, 0.5, 0.3])
    q = np.array([0.5, 0.25, 0.25])
    np.testing.assert_allclose(maybe_jit(d.categorical_entropy)(logits), -(p * np.log(p)).sum(), rtol=1e-6)
    np.testing.assert_allclose(
        maybe_jit(d.categorical_kl)(logits, jnp.log(jnp.asarray(q))), (p * np.log(p / q)).sum(), rtol=1e-5
    )


def test_categorical_with_impossible_actions_is_finite():
    logits = jnp.array([0.0, -jnp.inf, 1.0])
    assert jnp.isfinite(d.categorical_entropy(logits))
    assert jnp.isfinite(d.categorical_kl(logits, jnp.array([0.0, -jnp.inf, 0.0])))


def test_gaussian_closed_forms_against_monte_carlo():
    key = jax.random.PRNGKey(1)
    mean_p, log_std_p = jnp.array([0.0, 1.0]), jnp.array([0.0, -0.5])
    mean_q, log_std_q = jnp.array([0.5, 0.0]), jnp.array([0.3, 0.0])
    x = d.gaussian_sample(key, jnp.broadcast_to(mean_p, (400_000, 2)), log_std_p)
    logp = d.gaussian_log_prob(jnp.broadcast_to(mean_p, x.shape), log_std_p, x)
    logq = d.gaussian_log_prob(jnp.broadcast_to(mean_q, x.shape), log_std_q, x)
    np.testing.assert_allclose(
        jnp.mean(logp - logq), d.gaussian_kl(mean_p, log_std_p, mean_q, log_std_q), atol=0.01
    )
    np.testing.assert_allclose(-jnp.mean(logp), d.gaussian_entropy(mean_p, log_std_p), atol=0.01)
    # One dimension, by hand: N(0, 1) vs N(1, 2^2): log 2 + (1 + 1) / 8 - 1/2.
    kl = d.gaussian_kl(jnp.zeros(1), jnp.zeros(1), jnp.ones(1), jnp.log(2.0) * jnp.ones(1))
    np.testing.assert_allclose(kl, np.log(2) + 0.25 - 0.5, rtol=1e-6)


def test_sampled_kl_estimators():
    # Samples from p, reference ref: k1 and k3 are unbiased for KL(p || ref); k2 and k3 are non-negative.
    key = jax.random.PRNGKey(2)
    logits_p = jnp.log(jnp.array([0.6, 0.3, 0.1]))
    logits_ref = jnp.log(jnp.array([0.5, 0.3, 0.2]))
    actions = d.categorical_sample(key, jnp.broadcast_to(logits_p, (500_000, 3)))
    logp = d.categorical_log_prob(jnp.broadcast_to(logits_p, (500_000, 3)), actions)
    logp_ref = d.categorical_log_prob(jnp.broadcast_to(logits_ref, (500_000, 3)), actions)
    exact = float(d.categorical_kl(logits_p, logits_ref))
    assert abs(float(jnp.mean(d.kl_k1(logp, logp_ref))) - exact) < 2e-3
    assert abs(float(jnp.mean(d.kl_k3(logp, logp_ref))) - exact) < 2e-3
    # k2 is biased: its expectation is sum_x p(x) (log ref(x) - log p(x))^2 / 2, not the KL.
    p, ref = np.array([0.6, 0.3, 0.1]), np.array([0.5, 0.3, 0.2])
    k2_expectation = float(np.sum(p * np.log(ref / p) ** 2) / 2)
    assert abs(float(jnp.mean(d.kl_k2(logp, logp_ref))) - k2_expectation) < 1e-3
    assert abs(k2_expectation - exact) > 3e-3
    assert float(jnp.min(d.kl_k2(logp, logp_ref))) >= 0.0
    assert float(jnp.min(d.kl_k3(logp, logp_ref))) >= 0.0
    # k1 can be negative sample by sample.
    assert float(jnp.min(d.kl_k1(logp, logp_ref))) < 0.0


def test_kl_estimators_are_zero_on_policy_and_finite_at_extremes(maybe_jit):
    x = jnp.array([-3.0, -0.1])
    for fn in map(maybe_jit, (d.kl_k1, d.kl_k2, d.kl_k3)):
        np.testing.assert_allclose(fn(x, x), 0.0, atol=1e-7)
        assert jnp.all(jnp.isfinite(fn(jnp.array([0.0, -1e4]), jnp.array([-1e4, 0.0]))))


@pytest.mark.parametrize("fn", [d.categorical_entropy])
def test_entropy_gradient_exists(fn):
    grad = jax.grad(lambda z: fn(z))(jnp.array([0.1, 0.2, -0.3]))
    assert jnp.all(jnp.isfinite(grad))
    np.testing.assert_allclose(jnp.sum(grad), 0.0, atol=1e-6)  # invariant to a shift of the logits
