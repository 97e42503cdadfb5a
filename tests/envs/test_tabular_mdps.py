"""Finite MDPs: validation messages and the named instances of 003 section 4.1 and 000."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs import tabular as mdps
from polygrad import tabular


@pytest.fixture(autouse=True, scope="module")
def _no_implicit_rank_promotion():
    """Every test here (and every module fixture) runs with jax_numpy_rank_promotion="raise"."""
    with jax.numpy_rank_promotion("raise"):
        yield


def valid_arrays():
    P = np.full((2, 2, 2), 0.5, np.float32)
    r = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)
    return P, r, np.array([1.0, 0.0], np.float32), 0.9


def test_make_mdp_accepts_a_valid_mdp():
    mdp = mdps.make_mdp(*valid_arrays())
    assert (mdp.num_states, mdp.num_actions) == (2, 2)
    assert mdp.P.dtype == mdp.r.dtype == mdp.gamma.dtype == jnp.float32


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda P, r, rho, g: (P * 0.9, r, rho, g), "sums to 0.9"),
        (lambda P, r, rho, g: (P.at[0, 1].set(jnp.array([1.5, -0.5])), r, rho, g), "negative probability"),
        (lambda P, r, rho, g: (P, r, rho, 1.0), r"gamma must lie in \[0, 1\)"),
        (lambda P, r, rho, g: (P, r, rho, -0.1), r"gamma must lie in \[0, 1\)"),
        (lambda P, r, rho, g: (P[:, :1], r, rho, g), "P must have shape"),
        (lambda P, r, rho, g: (P, r[0], rho, g), "r must have shape"),
        (lambda P, r, rho, g: (P, r, jnp.ones(3) / 3, g), "rho0 must have shape"),
        (lambda P, r, rho, g: (P, r, jnp.array([0.5, 0.6]), g), "rho0 must be a probability"),
        (lambda P, r, rho, g: (P, r.at[0, 0].set(jnp.nan), rho, g), "non-finite"),
    ],
)
def test_make_mdp_rejects_malformed_inputs(change, message):
    P, r, rho0, gamma = valid_arrays()
    with pytest.raises(ValueError, match=message):
        mdps.make_mdp(*change(jnp.asarray(P), jnp.asarray(r), jnp.asarray(rho0), gamma))


def test_make_mdp_rejects_bad_action_masks():
    arrays = valid_arrays()
    with pytest.raises(ValueError, match="action_mask must have shape"):
        mdps.make_mdp(*arrays, action_mask=np.ones((2, 3), bool))
    with pytest.raises(ValueError, match="must be boolean"):
        mdps.make_mdp(*arrays, action_mask=np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"states \[1\] have none"):
        mdps.make_mdp(*arrays, action_mask=np.array([[True, False], [False, False]]))


def test_validate_policy():
    mdp, pi, pi_new = mdps.distribution_shift_example()
    mdps.validate_policy(mdp, pi)
    mdps.validate_policy(mdp, pi_new)
    with pytest.raises(ValueError, match="not available in state 2"):
        mdps.validate_policy(mdp, pi.at[2].set(jnp.array([0.5, 0.5])))
    with pytest.raises(ValueError, match="sums to"):
        mdps.validate_policy(mdp, pi.at[0, 0].set(0.5))
    with pytest.raises(ValueError, match="shape"):
        mdps.validate_policy(mdp, pi[:2])


def test_distribution_shift_mdp_matches_the_notes():
    mdp, pi, pi_new = mdps.distribution_shift_example(gamma=0.9, penalty=100.0, eta=1e-4, eta2=1e-3)
    P = np.asarray(mdp.P)
    assert P[mdps.S0, mdps.A0, mdps.S_PERP] == P[mdps.S0, mdps.A1, mdps.S1] == 1.0
    assert np.all(P[mdps.S1, :, mdps.S_PERP] == 1.0) and P[mdps.S_PERP, mdps.PERP, mdps.S_PERP] == 1.0
    assert mdp.r[mdps.S1, mdps.GOOD] == 1.0 and mdp.r[mdps.S1, mdps.BAD] == -100.0
    np.testing.assert_allclose([pi[mdps.S0, mdps.A1], pi[mdps.S1, mdps.BAD]], [1e-4, 1e-3], rtol=1e-6)
    assert pi_new[mdps.S0, mdps.A1] == 1.0 and pi_new[mdps.S1, mdps.BAD] == 1.0
    with pytest.raises(ValueError, match="eta must lie in"):
        mdps.distribution_shift_policies(eta=0.0)
    with pytest.raises(ValueError, match="penalty M must be positive"):
        mdps.distribution_shift_mdp(penalty=-1.0)


def test_importance_sampling_chain_has_constant_return():
    gamma = 0.95
    expected_return = jax.jit(tabular.expected_return)
    for horizon in (1, 3, 7):
        mdp = mdps.importance_sampling_chain(horizon, gamma)
        for p in (0.0, 0.5, 0.9, 1.0):
            pi = mdps.chain_policy(horizon, p)
            mdps.validate_policy(mdp, pi)
            np.testing.assert_allclose(expected_return(mdp, pi), gamma**horizon, rtol=1e-6)
    # G_0 = gamma^H on every sampled episode (H = 7, with a horizon long enough to reach the end).
    episodes = tabular.sample_episodes(jax.random.key(0), mdp, mdps.chain_policy(7, 0.5), 10, 8)
    returns = jnp.sum(episodes.rewards * gamma ** jnp.arange(10)[:, None], axis=0)
    np.testing.assert_allclose(returns, gamma**7, rtol=1e-6)
    with pytest.raises(ValueError, match="horizon must be at least 1"):
        mdps.importance_sampling_chain(0)


def test_contextual_bandit():
    bandit = mdps.contextual_bandit([[1.0, 0.0], [0.0, 2.0]], [0.25, 0.75])
    pi = jnp.array([[0.5, 0.5], [0.1, 0.9]])
    np.testing.assert_allclose(tabular.expected_return(bandit, pi), 0.25 * 0.5 + 0.75 * 1.8, rtol=1e-6)
    with pytest.raises(ValueError, match="context_distribution must have shape"):
        mdps.contextual_bandit([[1.0, 0.0]], [0.5, 0.5])


def test_random_mdps_are_valid_jittable_and_vmappable():
    keys = jax.random.split(jax.random.key(0), 4)
    batch = jax.jit(jax.vmap(lambda k: mdps.random_mdp(k, 5, 3, 0.9)))(keys)
    assert batch.P.shape == (4, 5, 3, 5)
    for i in range(4):
        mdps.validate_mdp(jax.tree.map(lambda x, i=i: x[i], batch))
    assert not np.allclose(batch.P[0], batch.P[1])  # different keys, different MDPs
    bandit = jax.jit(mdps.random_contextual_bandit, static_argnums=(1, 2))(keys[0], 4, 2)
    mdps.validate_mdp(bandit)
