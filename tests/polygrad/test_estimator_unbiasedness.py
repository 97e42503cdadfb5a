"""Sampled policy-gradient estimators against the exact gradient of random finite MDPs (003 sections 3.2-3.4).

Each estimator is averaged over many sampled episodes; a z-test per gradient component (Bonferroni over the
S*A components) must accept the unbiased ones and reject biased ones. Two negative controls show the test has
the power to detect bias: an action-dependent baseline b(s, a) = Q^pi(s, a), and reward-to-go without the
gamma^t factor (eq. 35 and 39 as printed), which is biased for the discounted objective of eq. (17).
"""

import jax
import jax.numpy as jnp
import pytest

from envs.tabular import random_mdp
from polygrad import tabular
from polygrad.estimators.returns import discounted_returns


@pytest.fixture(autouse=True, scope="module")
def _no_implicit_rank_promotion():
    """Every test here (and every module fixture) runs with jax_numpy_rank_promotion="raise"."""
    with jax.numpy_rank_promotion("raise"):
        yield

NUM_STATES, NUM_ACTIONS, GAMMA = 4, 3, 0.8
HORIZON = 60  # gamma^60 / (1 - gamma) < 1e-5: truncation bias far below the standard errors (~5e-3)
NUM_EPISODES = 20_000
# Bonferroni: two-sided p = 1e-4 / 12 components -> |z| < 4.46 for every component with probability 1 - 1e-4.
Z_THRESHOLD = 4.5
SEEDS = (0, 1, 2)


def estimator_weights(mdp, pi, episodes):
    """Per-step weights w_t of sum_t w_t grad log pi(a_t|s_t) for each estimator, each [T, N]."""
    rewards = episodes.rewards
    terminated = jnp.zeros(rewards.shape, bool)
    truncated = terminated.at[-1].set(True)  # cut by the horizon, not bootstrapped (negligible tail)
    returns_to_go = discounted_returns(rewards, terminated, truncated, GAMMA)  # G_t, eq. 38
    discounts = (GAMMA ** jnp.arange(rewards.shape[0], dtype=jnp.float32))[:, None]
    values = tabular.state_values(mdp, pi)[episodes.states]
    q_values = tabular.action_values(mdp, pi)[episodes.states, episodes.actions]
    return {
        "reward_to_go": discounts * returns_to_go,  # eq. 34-35 with the gamma^t of eq. 34
        "value_baseline": discounts * (returns_to_go - values),  # eq. 42, b = V^pi
        "exact_advantage": discounts * (q_values - values),  # A^pi(s_t, a_t)
        "action_dependent_baseline": discounts * (returns_to_go - q_values),  # biased: b depends on a_t
        "undiscounted_reward_to_go": returns_to_go,  # eq. 39 as printed: biased for discounted J
    }


@jax.jit
def z_scores_and_variances(key):
    """For one random MDP and softmax policy: max_i |mean_i - exact_i| / se_i and the total variance
    (trace of the covariance) of every estimator."""
    mdp_key, logits_key, sample_key = jax.random.split(key, 3)
    mdp = random_mdp(mdp_key, NUM_STATES, NUM_ACTIONS, GAMMA)
    logits = jax.random.normal(logits_key, (NUM_STATES, NUM_ACTIONS))
    pi = tabular.softmax_policy(logits)
    exact = tabular.softmax_policy_gradient(mdp, logits).reshape(-1)
    episodes = tabular.sample_episodes(sample_key, mdp, pi, HORIZON, NUM_EPISODES)
    results = {}
    for name, weights in estimator_weights(mdp, pi, episodes).items():
        estimates = tabular.softmax_score_gradients(pi, episodes.states, episodes.actions, weights)
        estimates = estimates.reshape(NUM_EPISODES, -1)
        standard_error = jnp.std(estimates, axis=0) / jnp.sqrt(NUM_EPISODES)
        z = jnp.abs(jnp.mean(estimates, axis=0) - exact) / standard_error
        results[name] = (jnp.max(z), jnp.sum(jnp.var(estimates, axis=0)))
    return results


@pytest.fixture(scope="module")
def results():
    return [jax.device_get(z_scores_and_variances(jax.random.key(seed))) for seed in SEEDS]


@pytest.mark.parametrize("estimator", ["reward_to_go", "value_baseline", "exact_advantage"])
def test_unbiased_estimators_pass_the_z_test(results, estimator):
    for per_seed in results:
        max_z, _ = per_seed[estimator]
        assert max_z < Z_THRESHOLD, f"{estimator}: max |z| = {max_z:.2f}"


@pytest.mark.parametrize("estimator", ["action_dependent_baseline", "undiscounted_reward_to_go"])
def test_biased_estimators_fail_the_z_test(results, estimator):
    """Negative controls: the same test rejects biased estimators by a wide margin."""
    for per_seed in results:
        max_z, _ = per_seed[estimator]
        assert max_z > 4 * Z_THRESHOLD, f"{estimator}: max |z| = {max_z:.2f} (bias not detected)"


def test_value_baseline_reduces_variance(results):
    for per_seed in results:
        _, variance_plain = per_seed["reward_to_go"]
        _, variance_baseline = per_seed["value_baseline"]
        _, variance_advantage = per_seed["exact_advantage"]
        assert variance_baseline < 0.2 * variance_plain
        assert variance_advantage < variance_baseline

