"""Actor-critic networks: shapes, heads, torsos, initialisation, and the distribution pytrees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polygrad.control.networks import ActorCritic
from polygrad.estimators import distributions
from polygrad.estimators.distributions import Categorical, DiagGaussian

OBS = jax.random.normal(jax.random.PRNGKey(0), (5, 3))


def _count(params):
    return sum(x.size for x in jax.tree.leaves(params))


def test_categorical_head_shapes_and_near_uniform_init(maybe_jit):
    net = ActorCritic(action_dim=4, discrete=True)
    params = net.init(jax.random.PRNGKey(1), OBS)
    dist, value = maybe_jit(net.apply)(params, OBS)
    assert isinstance(dist, Categorical)
    assert dist.logits.shape == (5, 4) and value.shape == (5,)
    # Policy output layer initialised with gain 0.01: the initial policy is close to uniform.
    np.testing.assert_allclose(dist.entropy(), np.log(4.0), atol=1e-3)
    # log-probabilities of all actions normalise.
    all_logp = jnp.stack([dist.log_prob(jnp.full((5,), a)) for a in range(4)], -1)
    np.testing.assert_allclose(jax.scipy.special.logsumexp(all_logp, -1), 0.0, atol=1e-6)


def test_gaussian_head_state_independent_log_std():
    net = ActorCritic(action_dim=2, discrete=False, log_std_init=-0.5)
    params = net.init(jax.random.PRNGKey(1), OBS)
    assert params["params"]["log_std"].shape == (2,)
    dist, value = net.apply(params, OBS)
    assert isinstance(dist, DiagGaussian)
    assert dist.mean.shape == (5, 2) and value.shape == (5,)
    np.testing.assert_array_equal(dist.log_std, np.full((5, 2), -0.5))
    x = dist.sample(jax.random.PRNGKey(2))
    np.testing.assert_allclose(
        dist.log_prob(x), distributions.gaussian_log_prob(dist.mean, dist.log_std, x), rtol=1e-6
    )
    np.testing.assert_allclose(dist.kl(dist), 0.0, atol=1e-6)


def test_shared_torso_has_one_torso_and_same_interface():
    separate = ActorCritic(action_dim=2, hidden_sizes=(16, 16))
    shared = ActorCritic(action_dim=2, hidden_sizes=(16, 16), shared_torso=True)
    p_sep = separate.init(jax.random.PRNGKey(0), OBS)
    p_sh = shared.init(jax.random.PRNGKey(0), OBS)
    torso = 3 * 16 + 16 + 16 * 16 + 16
    assert _count(p_sep) - _count(p_sh) == torso
    dist, value = shared.apply(p_sh, OBS)
    np.testing.assert_allclose(shared.apply(p_sh, OBS, method=ActorCritic.value), value, rtol=1e-6)
    np.testing.assert_allclose(
        shared.apply(p_sh, OBS, method=ActorCritic.policy).logits, dist.logits, rtol=1e-6
    )


def test_separate_torsos_policy_does_not_depend_on_critic():
    net = ActorCritic(action_dim=3)
    params = net.init(jax.random.PRNGKey(0), OBS)

    def policy_entropy(p):
        return net.apply(p, OBS, method=ActorCritic.policy).entropy().sum()

    grads = jax.grad(policy_entropy)(params)["params"]
    assert all(np.all(g == 0) for g in jax.tree.leaves(grads["critic_torso"]))
    assert all(np.all(g == 0) for g in jax.tree.leaves(grads["value_head"]))
    assert any(np.any(g != 0) for g in jax.tree.leaves(grads["actor_torso"]))


def test_vmap_over_seeds_equals_each_seed_alone():
    net = ActorCritic(action_dim=2)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params = jax.vmap(lambda k: net.init(k, OBS))(keys)
    dists, values = jax.vmap(net.apply, in_axes=(0, None))(params, OBS)
    for i, key in enumerate(keys):
        alone = net.init(key, OBS)
        dist_i, values_i = net.apply(alone, OBS)
        np.testing.assert_allclose(dists.logits[i], dist_i.logits, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(values[i], values_i, rtol=1e-5, atol=1e-6)
    assert not np.allclose(values[0], values[1])


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="activation"):
        ActorCritic(action_dim=2, activation="swish2").init(jax.random.PRNGKey(0), OBS)
