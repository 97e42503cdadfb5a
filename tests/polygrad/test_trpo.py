"""Tests of the TRPO / NPG learners of polygrad.trpo on a synthetic batch (no environment)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polygrad import losses, optim, trust_region, validate
from polygrad.control import learners, networks, trpo
from polygrad.control.rollout import Trajectory
from polygrad.estimators import returns

T, B, OBS_DIM = 16, 4, 3


def synthetic_batch(network, params, key):
    """A [T, B] on-policy batch: actions sampled from the policy, random rewards and episode ends."""
    k_obs, k_act, k_rew, k_done = jax.random.split(key, 4)
    obs = jax.random.normal(k_obs, (T, B, OBS_DIM))
    policy, values = network.apply(params, obs)
    actions = policy.sample(k_act)
    ends = jax.random.bernoulli(k_done, 0.1, (T, B)).astype(jnp.float32)
    next_values = jnp.concatenate([values[1:], values[-1:]], axis=0)
    return Trajectory(
        obs=obs, actions=actions, rewards=jax.random.normal(k_rew, (T, B)), terminated=ends,
        truncated=jnp.zeros((T, B)), log_probs=policy.log_prob(actions), values=values,
        next_values=next_values, extras={},
    )


@pytest.mark.parametrize(("discrete", "line_search"), [(True, "sequential"), (False, "none")],
                         ids=["trpo-categorical", "npg-gaussian"])
def test_one_update_respects_the_trust_region_and_fits_the_critic(discrete, line_search):
    network = networks.ActorCritic(action_dim=2, discrete=discrete, hidden_sizes=(16,))
    params = network.init(jax.random.PRNGKey(0), jnp.zeros((1, OBS_DIM)))
    traj = synthetic_batch(network, params, jax.random.PRNGKey(1))
    config = trust_region.TrustRegionConfig(max_kl=0.01, damping=0.1, line_search=line_search)
    learner = trpo.make_trust_region_learner(
        network.apply, optim.make_optimizer(1e-2, None), losses.PRESETS["trpo"],
        learners.AdvantageConfig(gamma=0.99, gae_lambda=0.97),
        trpo.TrustRegionLearnerConfig(step=config, value_epochs=4, value_minibatches=2),
    )
    state, metrics = jax.jit(learner.update)(learner.init(params), traj, jax.random.PRNGKey(2))

    obs = traj.obs.reshape(T * B, OBS_DIM)
    old_policy, old_values = network.apply(params, obs)
    new_policy, new_values = network.apply(state.params, obs)
    kl = float(jnp.mean(old_policy.kl(new_policy)))
    # The value fit leaves the policy alone, so the reported KL is the KL of the policy after the update.
    np.testing.assert_allclose(kl, metrics["kl"], rtol=1e-4)
    assert 0 < kl
    if line_search != "none":
        assert float(metrics["step_accepted"]) == 1.0 and kl <= config.max_kl
        assert float(metrics["actual_improvement"]) >= 0
    else:
        assert kl <= 2 * config.max_kl  # the quadratic model only

    advantages = returns.gae(traj.rewards, traj.values, traj.next_values, traj.terminated, traj.truncated,
                             0.99, 0.97)
    targets = (advantages + traj.values).reshape(-1)
    assert float(jnp.mean((new_values - targets) ** 2)) < float(jnp.mean((old_values - targets) ** 2))
    for name, value in metrics.items():
        assert np.isfinite(float(value)), name


def test_learner_rejects_bad_value_fit_sizes():
    with pytest.raises(validate.ConfigError, match="value_epochs"):
        trpo.TrustRegionLearnerConfig(value_epochs=0)


def test_surrogate_is_the_importance_weighted_advantage_of_eq_69():
    network = networks.ActorCritic(action_dim=3, hidden_sizes=(8,))
    params = network.init(jax.random.PRNGKey(0), jnp.zeros((1, OBS_DIM)))
    traj = synthetic_batch(network, params, jax.random.PRNGKey(1))
    batch = learners.learner_batch(learners.AdvantageConfig(), traj, with_old_policy=False)
    surrogate_fn, kl_fn = trpo.policy_objectives(losses.PRESETS["trpo"], network.apply, params, batch)
    moved = jax.tree.map(lambda x: x + 0.05, params)
    old, _ = network.apply(params, batch["obs"])
    new, _ = network.apply(moved, batch["obs"])
    adv = np.asarray(batch["advantages"], np.float64)
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    ratio = np.exp(np.asarray(new.log_prob(batch["actions"]), np.float64)
                   - np.asarray(old.log_prob(batch["actions"]), np.float64))
    np.testing.assert_allclose(surrogate_fn(moved), np.mean(ratio * adv), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(kl_fn(moved), np.mean(old.kl(new)), rtol=1e-5)
    np.testing.assert_allclose(kl_fn(params), 0.0, atol=1e-7)


@pytest.mark.parametrize("estimator", ["gae", "n_step", "reward_to_go", "monte_carlo"])
def test_advantage_estimators_against_a_plain_loop(estimator):
    network = networks.ActorCritic(action_dim=2, hidden_sizes=(8,))
    params = network.init(jax.random.PRNGKey(0), jnp.zeros((1, OBS_DIM)))
    traj = synthetic_batch(network, params, jax.random.PRNGKey(3))
    config = learners.AdvantageConfig(estimator=estimator, gamma=0.9, gae_lambda=0.8, n_step=3)
    advantages, targets, mask = jax.jit(learners.estimate_advantages, static_argnums=0)(config, traj)
    r, v, nv, term = (np.asarray(x, np.float64) for x in (traj.rewards, traj.values, traj.next_values,
                                                         traj.terminated))
    expected_mask = np.ones((T, B))
    if estimator in ("reward_to_go", "monte_carlo"):  # steps of episodes that end inside the batch
        for b in range(B):
            last_end = np.nonzero(term[:, b])[0]
            expected_mask[:, b] = 0.0
            if len(last_end):
                expected_mask[: last_end[-1] + 1, b] = 1.0
    np.testing.assert_array_equal(np.ones((T, B)) if mask is None else mask, expected_mask)
    assert (mask is None) == (estimator in ("gae", "n_step"))  # every step counts: no mask at all
    for b in range(B):
        g, a = 0.0, 0.0
        for t in reversed(range(T)):
            if estimator == "gae":
                delta = r[t, b] + 0.9 * (1 - term[t, b]) * nv[t, b] - v[t, b]
                a = delta + 0.9 * 0.8 * (1 - term[t, b]) * (a if t < T - 1 else 0.0)
                np.testing.assert_allclose(advantages[t, b], a, rtol=1e-4, atol=1e-5)
            elif estimator in ("reward_to_go", "monte_carlo"):
                g = r[t, b] + 0.9 * (1 - term[t, b]) * (g if t < T - 1 else 0.0)
                base = v[t, b] if estimator == "reward_to_go" else 0.0
                if expected_mask[t, b]:
                    np.testing.assert_allclose(advantages[t, b], g - base, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(targets - (advantages if estimator != "monte_carlo" else 0),
                               v if estimator in ("gae", "n_step", "reward_to_go") else targets, rtol=1e-4,
                               atol=1e-5)
