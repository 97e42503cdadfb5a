"""Tests of the TRPO / NPG learners of polygrad.trpo on a synthetic batch (no environment)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polygrad import losses, networks, returns, trpo, trust_region, updates
from polygrad.types import Trajectory

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


@pytest.mark.parametrize(("discrete", "line_search"), [(True, True), (False, False)],
                         ids=["trpo-categorical", "npg-gaussian"])
def test_one_update_respects_the_trust_region_and_fits_the_critic(discrete, line_search):
    network = networks.ActorCritic(action_dim=2, discrete=discrete, hidden_sizes=(16,))
    params = network.init(jax.random.PRNGKey(0), jnp.zeros((1, OBS_DIM)))
    traj = synthetic_batch(network, params, jax.random.PRNGKey(1))
    config = trust_region.TrustRegionConfig(max_kl=0.01, damping=0.1)
    learner = trpo.make_trust_region_learner(
        network.apply, updates.make_optimizer(1e-2, None), config, line_search=line_search,
        value_epochs=4, value_minibatches=2,
    )
    state, metrics = jax.jit(learner.update)(learner.init(params), traj, jax.random.PRNGKey(2))

    obs = traj.obs.reshape(T * B, OBS_DIM)
    old_policy, old_values = network.apply(params, obs)
    new_policy, new_values = network.apply(state.params, obs)
    kl = float(jnp.mean(old_policy.kl(new_policy)))
    # The value fit leaves the policy alone, so the reported KL is the KL of the policy after the update.
    np.testing.assert_allclose(kl, metrics["kl"], rtol=1e-4)
    assert 0 < kl
    if line_search:
        assert float(metrics["step_accepted"]) == 1.0 and kl <= config.max_kl
        assert float(metrics["actual_improvement"]) >= 0
    else:
        assert kl <= 2 * config.max_kl  # the quadratic model only

    advantages = returns.gae(traj.rewards, traj.values, traj.next_values, traj.terminated, traj.truncated,
                             0.99, 0.97)
    targets = (advantages + traj.values).reshape(-1)
    assert float(losses.value_loss(new_values, targets)) < float(losses.value_loss(old_values, targets))
    for name, value in metrics.items():
        assert np.isfinite(float(value)), name


def test_learner_rejects_bad_value_fit_sizes():
    network = networks.ActorCritic(action_dim=2)
    with pytest.raises(ValueError, match="value_epochs"):
        trpo.make_trust_region_learner(network.apply, updates.make_optimizer(1e-3),
                                       trust_region.TrustRegionConfig(), value_epochs=0)
