"""The worked examples of 003 section 1 (Examples 1.1 to 1.9), reproduced with the library."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polygrad import distributions, importance, returns


@pytest.fixture(autouse=True, scope="module")
def _no_implicit_rank_promotion():
    """Every test here (and every module fixture) runs with jax_numpy_rank_promotion="raise"."""
    with jax.numpy_rank_promotion("raise"):
        yield


def test_example_1_1_discrete_expectation():
    # E[x^2] for p = (0.2, 0.5, 0.3) on {1, 2, 3} is 0.2 + 2.0 + 2.7 = 4.9 (the seed's number).
    values = np.array([1.0, 4.0, 9.0])
    actions = jnp.arange(3)

    def expectation(logits):
        """E_p[x^2] with p(x) from polygrad's categorical log-probabilities."""
        probs = jnp.exp(distributions.categorical_log_prob(jnp.broadcast_to(logits, (3, 3)), actions))
        return jnp.sum(probs * values)

    np.testing.assert_allclose(expectation(jnp.log(jnp.array([0.2, 0.5, 0.3]))), 4.9, rtol=1e-6)
    # Unnormalised logits: an independent float64 softmax in numpy gives the same expectation.
    logits = np.array([0.3, -1.2, 2.0])
    p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(expectation(jnp.asarray(logits, jnp.float32)), p @ values, rtol=1e-6)
    # ... and so does the average over samples of polygrad's sampler (Monte-Carlo error ~ 0.007).
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (200_000, 3))
    x = distributions.categorical_sample(jax.random.PRNGKey(0), batch)
    assert abs(float(jnp.mean(jnp.asarray(values, jnp.float32)[x])) - p @ values) < 0.04


def test_example_1_2_continuous_expectation_by_monte_carlo():
    x = distributions.gaussian_sample(jax.random.PRNGKey(0), jnp.zeros((200_000, 1)), jnp.zeros(1))
    # E[x^2] = 1; the Monte-Carlo error is about sqrt(2 / N) = 0.003.
    assert abs(float(jnp.mean(x**2)) - 1.0) < 0.015


def test_example_1_3_probability_as_an_expectation_by_importance_sampling():
    # P(x = 1) = E[1{x = 1}] = 0.3 for x ~ Bernoulli(0.3), estimated from samples of a uniform proposal q
    # with polygrad's categorical log-probs, ratios and IS estimators (unbiased, 003 eq. 5).
    logits_p = jnp.log(jnp.array([0.7, 0.3]))
    logits_q = jnp.zeros(2)
    n = 100_000
    x = distributions.categorical_sample(jax.random.PRNGKey(1), jnp.broadcast_to(logits_q, (n, 2)))
    w = importance.ratios(distributions.categorical_log_prob(jnp.broadcast_to(logits_p, (n, 2)), x),
                          distributions.categorical_log_prob(jnp.broadcast_to(logits_q, (n, 2)), x))
    np.testing.assert_allclose(np.unique(np.asarray(w)), [0.6, 1.4], rtol=1e-6)  # 0.3 / 0.5, 0.7 / 0.5
    indicator = (x == 1).astype(jnp.float32)
    # Standard error sqrt(Var_q[w 1{x=1}] / n) = sqrt((0.5 * 0.36 - 0.09) / n) ~ 0.001.
    assert abs(float(importance.ordinary_is(w, indicator)) - 0.3) < 0.005
    assert abs(float(importance.self_normalised_is(w, indicator)) - 0.3) < 0.005
    # The exact expectation under q, with each outcome weighted by q = 0.5, is exactly 0.3.
    exact_w = importance.ratios(jax.nn.log_softmax(logits_p), jax.nn.log_softmax(logits_q))
    np.testing.assert_allclose(importance.ordinary_is(exact_w, jnp.array([0.0, 1.0])), 0.3, rtol=1e-6)


def test_example_1_4_return_of_a_three_step_rollout():
    rewards = jnp.array([1.0, 2.0, 3.0])
    terminated = jnp.array([False, False, True])
    g = returns.discounted_returns(rewards, terminated, jnp.zeros(3, bool), 0.9)
    np.testing.assert_allclose(g[0], 1.0 + 0.9 * 2.0 + 0.81 * 3.0, rtol=1e-6)
    np.testing.assert_allclose(g, [5.23, 4.7, 3.0], rtol=1e-6)


def test_example_1_5_tiny_discrete_importance_sampling():
    logp = jnp.log(jnp.array([0.8, 0.2]))  # target p(a), p(b)
    logq = jnp.log(jnp.array([0.5, 0.5]))  # proposal q(a), q(b)
    w = importance.ratios(logp, logq)
    np.testing.assert_allclose(w, [1.6, 0.4], rtol=1e-6)
    f = jnp.array([1.0, 3.0])
    np.testing.assert_allclose(w * f, [1.6, 1.2], rtol=1e-6)
    # Exactly 1.4 in expectation under q (each outcome with probability 0.5) ...
    np.testing.assert_allclose(importance.ordinary_is(w, f), 1.4, rtol=1e-6)
    # ... and approximately 1.4 from samples of q.
    x = jax.random.bernoulli(jax.random.PRNGKey(2), 0.5, (200_000,)).astype(jnp.int32)
    estimate = importance.ordinary_is(w[x], f[x])
    assert abs(float(estimate) - 1.4) < 0.01


def test_example_1_6_off_policy_evaluation_in_a_contextual_bandit():
    # Two contexts (uniform), two actions; behaviour pi uniform, target pi' greedy-ish.
    reward = jnp.array([[1.0, 0.0], [0.2, 0.8]])
    target = jnp.array([[0.9, 0.1], [0.3, 0.7]])
    exact = float(jnp.mean(jnp.sum(target * reward, axis=1)))  # J(pi') = (0.9 + 0.62) / 2 = 0.76
    np.testing.assert_allclose(exact, 0.76, rtol=1e-6)
    ks, ka = jax.random.split(jax.random.PRNGKey(3))
    n = 200_000
    s = jax.random.randint(ks, (n,), 0, 2)
    a = jax.random.randint(ka, (n,), 0, 2)
    w = importance.ratios(jnp.log(target[s, a]), jnp.log(jnp.full((n,), 0.5)))
    assert abs(float(importance.ordinary_is(w, reward[s, a])) - exact) < 0.01
    assert abs(float(importance.self_normalised_is(w, reward[s, a])) - exact) < 0.01


def test_example_1_7_bernoulli_score_function():
    theta = 0.3

    def log_p(t, x):
        return x * jnp.log(t) + (1 - x) * jnp.log(1 - t)

    for x in (0.0, 1.0):
        np.testing.assert_allclose(jax.grad(log_p)(theta, x), x / theta - (1 - x) / (1 - theta), rtol=1e-6)
    # d/dtheta E[f(x)] = f(1) - f(0) for f = (x + 2)^2: 9 - 4 = 5, and the score-function form agrees.
    f = lambda x: (x + 2.0) ** 2  # noqa: E731
    score_form = sum((theta if x else 1 - theta) * f(x) * jax.grad(log_p)(theta, x) for x in (0.0, 1.0))
    np.testing.assert_allclose(score_form, 5.0, rtol=1e-6)


def test_example_1_8_softmax_score_is_features_minus_expected_features():
    phi = jax.random.normal(jax.random.PRNGKey(4), (3, 5))  # phi(s, a) for 3 actions, d = 5
    theta = jax.random.normal(jax.random.PRNGKey(5), (5,))
    pi = jax.nn.softmax(phi @ theta)
    for a in range(3):
        score = jax.grad(lambda t, a=a: distributions.categorical_log_prob(phi @ t, jnp.array(a)))(theta)
        np.testing.assert_allclose(score, phi[a] - pi @ phi, rtol=1e-5, atol=1e-6)


def test_example_1_9_two_state_td_update():
    delta = returns.td_errors(jnp.array([1.0]), jnp.array([0.2]), jnp.array([0.7]), jnp.array([False]), 0.9)
    np.testing.assert_allclose(delta, [1.43], rtol=1e-6)
    np.testing.assert_allclose(1.0 + 0.9 * 0.7, 1.63, rtol=1e-6)  # the TD target y_t
    np.testing.assert_allclose(0.2 + 0.1 * delta, [0.343], rtol=1e-6)
