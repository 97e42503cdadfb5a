"""Exact tabular analysis: the seed's printed numbers (003 section 4.1.1) and identities on random MDPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs.tabular import BAD, S1, FiniteMDP, contextual_bandit, distribution_shift_example
from polygrad import tabular


@pytest.fixture(autouse=True, scope="module")
def _no_implicit_rank_promotion():
    """Every test here (and every module fixture) runs with jax_numpy_rank_promotion="raise"."""
    with jax.numpy_rank_promotion("raise"):
        yield

NUM_MDPS = 8
S, A = 5, 3


def random_problems(seed=0, gamma=0.9):
    """A batch of NUM_MDPS random MDPs (as envs.tabular.random_mdp makes them, but drawn with numpy, which
    needs no compilation) with two random softmax policies each; leading axis NUM_MDPS."""
    rng = np.random.default_rng(seed)
    mdps = FiniteMDP(
        P=jnp.asarray(rng.dirichlet(np.ones(S), (NUM_MDPS, S, A)), jnp.float32),
        r=jnp.asarray(rng.uniform(size=(NUM_MDPS, S, A)), jnp.float32),
        rho0=jnp.asarray(rng.dirichlet(np.ones(S), NUM_MDPS), jnp.float32),
        gamma=jnp.full((NUM_MDPS,), gamma, jnp.float32),
    )
    return mdps, random_policies(rng), random_policies(rng)


def random_policies(rng):
    logits = rng.normal(size=(NUM_MDPS, S, A))
    return jnp.asarray(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True), jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# Example 1 (003 section 4.1.1): the printed numbers.
# ----------------------------------------------------------------------------------------------------------


def test_example1_printed_numbers(maybe_jit):
    mdp, pi, pi_new = distribution_shift_example(gamma=0.9, penalty=100.0, eta=1e-4, eta2=1e-3)
    j_old = maybe_jit(tabular.expected_return)(mdp, pi)
    j_new = maybe_jit(tabular.expected_return)(mdp, pi_new)
    predicted_gain = maybe_jit(tabular.surrogate)(mdp, pi, pi_new) - j_old
    np.testing.assert_allclose(j_old, 8.091e-5, rtol=1e-5)
    np.testing.assert_allclose(j_new, -90.0, rtol=1e-6)
    # 0.9 * (0.9999 * 0.899 - 1e-4 * 101 * 0.999) = 0.79993818, printed as "approx 0.79994".
    assert round(float(predicted_gain), 5) == 0.79994
    np.testing.assert_allclose(predicted_gain, 0.9 * (0.9999 * 0.899 - 1e-4 * 101 * 0.999), rtol=1e-6)
    dsp = tabular.distribution_shift_penalty(mdp, pi, pi_new)
    np.testing.assert_allclose(j_old + predicted_gain + dsp, j_new, rtol=1e-6)


def test_example1_intermediate_quantities():
    gamma, penalty, eta, eta2 = 0.9, 100.0, 1e-4, 1e-3
    mdp, pi, pi_new = distribution_shift_example(gamma, penalty, eta, eta2)
    v_s1 = 1 - eta2 * (1 + penalty)
    np.testing.assert_allclose(tabular.state_values(mdp, pi)[:2], [eta * gamma * v_s1, v_s1], rtol=1e-6)
    adv = tabular.advantages(mdp, pi)
    np.testing.assert_allclose(adv[0, 1], (1 - eta) * gamma * v_s1, rtol=1e-6)
    np.testing.assert_allclose(adv[S1, BAD], -(1 + penalty) * (1 - eta2), rtol=1e-6)
    d_old, d_new = tabular.state_occupancy(mdp, pi), tabular.state_occupancy(mdp, pi_new)
    np.testing.assert_allclose(d_old[:2], [1 - gamma, (1 - gamma) * gamma * eta], rtol=1e-5)
    np.testing.assert_allclose(d_new[:2], [1 - gamma, (1 - gamma) * gamma], rtol=1e-6)


def test_example1_cpi_step_size_matches_eq61():
    mdp, pi, pi_new = distribution_shift_example()
    terms = tabular.cpi_terms(mdp, pi, pi_new)
    np.testing.assert_allclose(terms.epsilon, 101 * 0.999, rtol=1e-6)  # |A(s1, b)| dominates
    alpha = tabular.cpi_step_size(terms.gain, terms.epsilon, mdp.gamma)
    np.testing.assert_allclose(alpha, 0.01 / 3.6 * 0.79993818 / 100.899, rtol=1e-5)
    # The guaranteed improvement at alpha* is positive and the true J(pi_alpha*) beats the bound.
    j_alpha = tabular.expected_return(mdp, tabular.mixture_policy(pi, pi_new, alpha))
    bound = tabular.cpi_lower_bound(mdp, pi, pi_new, alpha)
    assert bound > tabular.expected_return(mdp, pi)
    assert j_alpha >= bound


# ----------------------------------------------------------------------------------------------------------
# Policy evaluation, checked against truncated power series (independent of the linear solves).
# ----------------------------------------------------------------------------------------------------------


def power_series(mdp, pi, steps=400):
    """V = sum_t gamma^t P_pi^t r_pi and d = (1-gamma) sum_t gamma^t rho0 P_pi^t, by iteration."""
    P_pi = jnp.einsum("sa,sat->st", pi, mdp.P)
    r_pi = jnp.sum(pi * mdp.r, -1)

    def occupancy_step(carry, _):
        d, dist, discount = carry
        return (d + discount * dist, dist @ P_pi, discount * mdp.gamma), None

    init = (jnp.zeros_like(r_pi), mdp.rho0, jnp.float32(1.0))
    (d, _, _), _ = jax.lax.scan(occupancy_step, init, None, length=steps)

    def value_step(v, _):
        return r_pi + mdp.gamma * P_pi @ v, None

    v, _ = jax.lax.scan(value_step, jnp.zeros_like(r_pi), None, length=steps)
    return v, (1 - mdp.gamma) * d


def test_values_and_occupancy_match_power_series():
    mdps, pis, _ = random_problems(seed=1)
    v_solve = jax.jit(jax.vmap(tabular.state_values))(mdps, pis)
    d_solve = jax.jit(jax.vmap(tabular.state_occupancy))(mdps, pis)
    v_series, d_series = jax.jit(jax.vmap(power_series))(mdps, pis)
    np.testing.assert_allclose(v_solve, v_series, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_solve, d_series, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d_solve.sum(-1), 1.0, atol=1e-6)


def test_bellman_identities(maybe_jit):
    mdps, pis, _ = random_problems(seed=2)

    def identities(mdp, pi):
        v, q, adv = tabular.state_values(mdp, pi), tabular.action_values(mdp, pi), tabular.advantages(mdp, pi)
        d = tabular.state_occupancy(mdp, pi)
        return (
            jnp.sum(pi * q, -1) - v,  # eq. 24
            jnp.sum(pi * adv, -1),  # eq. 28
            jnp.sum(d[:, None] * pi * adv),  # eq. 29
            tabular.expected_return(mdp, pi) - jnp.sum(d * jnp.sum(pi * mdp.r, -1)) / (1 - mdp.gamma),
        )

    for residual in maybe_jit(jax.vmap(identities))(mdps, pis):
        np.testing.assert_allclose(residual, 0.0, atol=2e-5)


# ----------------------------------------------------------------------------------------------------------
# Section 4.2-4.4 identities on random MDPs.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
def test_performance_difference_and_surrogate_decomposition(gamma):
    mdps, pis, pis_new = random_problems(seed=3, gamma=gamma)

    def gaps(mdp, pi, pi_new):
        j_old, j_new = tabular.expected_return(mdp, pi), tabular.expected_return(mdp, pi_new)
        pdl = tabular.performance_difference(mdp, pi, pi_new)  # eq. 48
        dsp = tabular.distribution_shift_penalty(mdp, pi, pi_new)
        decomposition = tabular.surrogate(mdp, pi, pi_new) + dsp
        return j_new - j_old, pdl, j_new, decomposition

    true_change, pdl, j_new, decomposition = jax.jit(jax.vmap(gaps))(mdps, pis, pis_new)
    # float32 precision: values are up to 1/(1-gamma) and the solves have condition number 1/(1-gamma).
    tolerance = 4 * np.finfo(np.float32).eps / (1.0 - gamma) ** 2
    np.testing.assert_allclose(pdl, true_change, atol=tolerance)
    np.testing.assert_allclose(decomposition, j_new, atol=tolerance)  # eq. 53


def test_surrogate_is_linear_in_alpha_and_cpi_bound_holds():
    mdps, pis, pis_new = random_problems(seed=4, gamma=0.8)
    alphas = jnp.linspace(0.0, 1.0, 41)

    def along_alpha(mdp, pi, pi_new):
        mixtures = jax.vmap(lambda a: tabular.mixture_policy(pi, pi_new, a))(alphas)
        j_alpha = jax.vmap(lambda p: tabular.expected_return(mdp, p))(mixtures)
        surrogate_alpha = jax.vmap(lambda p: tabular.surrogate(mdp, pi, p))(mixtures)
        terms = tabular.cpi_terms(mdp, pi, pi_new)
        linear = tabular.expected_return(mdp, pi) + alphas * terms.gain  # eq. 57
        return j_alpha, surrogate_alpha, linear, tabular.cpi_lower_bound(mdp, pi, pi_new, alphas)

    j_alpha, surrogate_alpha, linear, bound = jax.jit(jax.vmap(along_alpha))(mdps, pis, pis_new)
    np.testing.assert_allclose(surrogate_alpha, linear, atol=2e-5)
    assert np.all(np.asarray(j_alpha) >= np.asarray(bound) - 1e-5)  # eq. 59
    np.testing.assert_allclose(bound[:, 0], j_alpha[:, 0], atol=1e-5)  # tight at alpha = 0


def test_cpi_step_size_maximises_the_bound():
    mdps, pis, _ = random_problems(seed=5, gamma=0.7)
    grid = jnp.linspace(0.0, 1.0, 20001)

    def check(mdp, pi):
        pi_new = tabular.greedy_policy(mdp, pi)
        terms = tabular.cpi_terms(mdp, pi, pi_new)
        alpha = tabular.cpi_step_size(terms.gain, terms.epsilon, mdp.gamma)
        bound_at_alpha = tabular.cpi_lower_bound(mdp, pi, pi_new, alpha)
        return alpha, bound_at_alpha, jnp.max(tabular.cpi_lower_bound(mdp, pi, pi_new, grid)), terms.gain

    alpha, bound_at_alpha, best_on_grid, gain = jax.jit(jax.vmap(check))(mdps, pis)
    assert np.all(np.asarray(gain) > 0)  # the greedy policy improves the surrogate
    assert np.all((np.asarray(alpha) > 0) & (np.asarray(alpha) < 1))
    assert np.all(np.asarray(bound_at_alpha) >= np.asarray(best_on_grid) - 1e-6)


def test_cpi_step_size_degenerate_inputs():
    step = tabular.cpi_step_size
    assert step(-1.0, 2.0, 0.9) == 0.0  # no improvement predicted: no step
    assert step(0.0, 0.0, 0.9) == 0.0
    assert step(0.5, 0.0, 0.9) == 1.0  # no penalty
    assert step(0.5, 1.0, 0.0) == 1.0  # gamma = 0: no distribution shift
    assert step(1e6, 1.0, 0.9) == 1.0  # clipped to a valid mixture weight
    np.testing.assert_allclose(step(0.1, 1.0, 0.5), 0.25 / 2.0 * 0.1, rtol=1e-6)
    assert np.isfinite(jax.grad(step)(0.1, 0.0, 0.9))


def test_cpi_iterations_improve_monotonically_and_respect_the_bound():
    mdps, pis, _ = random_problems(seed=6, gamma=0.8)
    _, history = jax.jit(jax.vmap(lambda m, p: tabular.conservative_policy_iteration(m, p, 60)))(mdps, pis)
    returns, bound = np.asarray(history.expected_return), np.asarray(history.bound)
    assert np.all(np.diff(returns, axis=1) >= -1e-5)
    assert np.all(returns[:, 1:] >= bound[:, :-1] - 1e-5)  # J(pi_{k+1}) >= guaranteed bound (eq. 60)
    assert np.all(returns[:, -1] > returns[:, 0])


def test_example1_cpi_never_collapses():
    mdp, pi, pi_new = distribution_shift_example()
    _, history = tabular.conservative_policy_iteration(mdp, pi, 50, candidate=lambda m, p: pi_new)
    returns = np.asarray(history.expected_return)
    assert np.all(np.diff(returns) > 0)
    assert tabular.expected_return(mdp, pi_new) == -90.0


# ----------------------------------------------------------------------------------------------------------
# Softmax policies: exact gradient (autodiff vs eq. 36 vs finite differences), Fisher, natural gradient.
# ----------------------------------------------------------------------------------------------------------


def random_logits(seed, num=NUM_MDPS):
    return jnp.asarray(1.5 * np.random.default_rng(seed).normal(size=(num, S, A)), jnp.float32)


def both_gradients(mdp, logits):
    autodiff = tabular.softmax_policy_gradient(mdp, logits)
    return autodiff, tabular.softmax_policy_gradient_from_occupancy(mdp, logits)


@pytest.mark.parametrize("gamma", [0.0, 0.6, 0.95])
def test_policy_gradient_autodiff_matches_occupancy_form(gamma):
    mdps, _, _ = random_problems(seed=7, gamma=gamma)
    logits = random_logits(8)
    autodiff, occupancy_form = jax.jit(jax.vmap(both_gradients))(mdps, logits)
    scale = np.max(np.abs(occupancy_form))
    np.testing.assert_allclose(autodiff, occupancy_form, atol=2e-6 * max(scale, 1.0) / (1 - gamma))


def test_policy_gradient_matches_finite_differences():
    mdps, _, _ = random_problems(seed=9, gamma=0.8)
    mdp = jax.tree.map(lambda x: x[0], mdps)
    logits = random_logits(10, 1)[0]
    gradient = tabular.softmax_policy_gradient_from_occupancy(mdp, logits)
    h = 1e-2
    basis = jnp.eye(S * A).reshape(S * A, S, A)
    j = jax.jit(jax.vmap(lambda e: tabular.softmax_expected_return(mdp, logits + h * e)))
    central = (j(basis) - j(-basis)) / (2 * h)
    np.testing.assert_allclose(central.reshape(S, A), gradient, atol=5e-4)


def test_policy_gradient_with_action_mask():
    mdp, pi, _ = distribution_shift_example()
    logits = jnp.log(jnp.where(mdp.action_mask, pi, 1.0))
    gradient, occupancy_form = jax.jit(both_gradients)(mdp, logits)
    assert np.all(np.isfinite(gradient))
    np.testing.assert_allclose(gradient, occupancy_form, atol=1e-6)
    assert gradient[2, 1] == 0.0  # masked action


def test_contextual_bandit_gradient_is_the_bandit_formula():
    rewards = jnp.array([[1.0, 0.0, 0.5], [0.2, 0.9, 0.1]])
    contexts = jnp.array([0.3, 0.7])
    bandit = contextual_bandit(rewards, contexts)
    logits = jnp.array([[0.1, -0.3, 0.4], [1.0, 0.0, -1.0]])
    pi = jax.nn.softmax(logits, -1)

    @jax.jit
    def exact(bandit, pi, logits):
        return (
            tabular.state_occupancy(bandit, pi),
            tabular.expected_return(bandit, pi),
            tabular.softmax_policy_gradient(bandit, logits),
        )

    occupancy, expected_return, gradient = exact(bandit, pi, logits)
    np.testing.assert_allclose(occupancy, contexts, atol=1e-7)
    np.testing.assert_allclose(expected_return, jnp.sum(contexts[:, None] * pi * rewards), rtol=1e-6)
    baseline = jnp.sum(pi * rewards, -1, keepdims=True)
    expected = contexts[:, None] * pi * (rewards - baseline)  # E_s E_a [grad log pi (r - b(s))] (000)
    np.testing.assert_allclose(gradient, expected, atol=1e-6)


def mean_kl(logits_old, logits, weights):
    p, log_p, log_q = jax.nn.softmax(logits_old), jax.nn.log_softmax(logits_old), jax.nn.log_softmax(logits)
    return jnp.sum(weights * jnp.sum(p * (log_p - log_q), -1))


def test_fisher_matrix_is_the_hessian_of_the_mean_kl():
    mdps, _, _ = random_problems(seed=11)
    mdp = jax.tree.map(lambda x: x[0], mdps)
    logits = random_logits(12, 1)[0]
    fisher = tabular.softmax_fisher_matrix(mdp, logits)
    weights = tabular.state_occupancy(mdp, jax.nn.softmax(logits))
    hessian = jax.jit(jax.hessian(lambda x: mean_kl(logits, x.reshape(S, A), weights)))(logits.reshape(-1))
    np.testing.assert_allclose(fisher, hessian, atol=1e-6)
    # ... and the expected outer product of the score.
    pi = jax.nn.softmax(logits)
    scores = jnp.eye(A)[None, :, :] - pi[:, None, :]  # [s, a, b]: d log pi(a|s) / d logits[s, b]
    outer = jnp.einsum("s,sa,sab,sac->sbc", weights, pi, scores, scores)
    np.testing.assert_allclose(fisher, jax.scipy.linalg.block_diag(*outer), atol=1e-6)


@pytest.mark.parametrize("custom_weights", [False, True])
def test_natural_gradient_is_the_minimum_norm_solution(custom_weights):
    mdps, _, _ = random_problems(seed=13)
    logits = random_logits(14)
    weights = jnp.asarray(np.random.default_rng(15).dirichlet(np.ones(S), NUM_MDPS), jnp.float32)
    weights = weights if custom_weights else None

    def solve(mdp, logit, w):
        fisher = tabular.softmax_fisher_matrix(mdp, logit, w)
        gradient = tabular.softmax_policy_gradient(mdp, logit).reshape(-1)
        natural = tabular.softmax_natural_gradient(mdp, logit, w).reshape(-1)
        damped = tabular.softmax_natural_gradient(mdp, logit, w, damping=0.1).reshape(-1)
        pinv = jnp.linalg.pinv(fisher, hermitian=True) @ gradient
        return fisher @ natural, gradient, natural, fisher @ damped + 0.1 * damped, pinv

    fx, gradient, natural, damped_lhs, pinv = jax.jit(jax.vmap(solve))(mdps, logits, weights)
    np.testing.assert_allclose(fx, gradient, atol=1e-5 * np.max(np.abs(gradient)))  # F x = grad J
    # In the row space of F: the per-state components sum to 0, so x is the minimum-norm solution.
    np.testing.assert_allclose(natural.reshape(-1, S, A).sum(-1), 0.0, atol=1e-6 * np.max(np.abs(natural)))
    np.testing.assert_allclose(natural, pinv, rtol=2e-2, atol=2e-2 * np.max(np.abs(natural)))
    np.testing.assert_allclose(damped_lhs, gradient, atol=1e-5 * np.max(np.abs(gradient)))  # (F + 0.1 I) x


def test_natural_gradient_is_the_centred_advantage_for_occupancy_weights():
    mdps, _, _ = random_problems(seed=16, gamma=0.9)
    logits = random_logits(17)
    natural = jax.jit(jax.vmap(tabular.softmax_natural_gradient))(mdps, logits)
    adv = jax.jit(jax.vmap(lambda m, x: tabular.advantages(m, jax.nn.softmax(x))))(mdps, logits)
    np.testing.assert_allclose(natural, (adv - adv.mean(-1, keepdims=True)) / (1 - 0.9), atol=1e-4)


def test_sample_episodes_shapes_and_support():
    mdp, pi, _ = distribution_shift_example(eta=0.5, eta2=0.5)
    episodes = jax.jit(tabular.sample_episodes, static_argnums=(3, 4))(jax.random.key(0), mdp, pi, 4, 1000)
    assert episodes.states.shape == episodes.actions.shape == episodes.rewards.shape == (4, 1000)
    states, actions = np.asarray(episodes.states), np.asarray(episodes.actions)
    assert np.all(states[0] == 0)
    assert np.all(states[2:] == 2)  # absorbing after at most two steps
    assert np.all(actions[states == 2] == 0)  # never a masked action
    np.testing.assert_allclose(np.mean(states[1] == 1), 0.5, atol=0.05)
    np.testing.assert_array_equal(episodes.rewards, np.asarray(mdp.r)[states, actions])


def test_natural_gradient_with_action_mask():
    mdp, pi, _ = distribution_shift_example(eta=0.3, eta2=0.4)
    logits = jnp.log(jnp.where(mdp.action_mask, pi, 1.0))

    @jax.jit
    def solve(mdp, logits):
        fisher = tabular.softmax_fisher_matrix(mdp, logits)
        natural = tabular.softmax_natural_gradient(mdp, logits)
        return fisher, natural, tabular.softmax_policy_gradient(mdp, logits)

    fisher, natural, gradient = solve(mdp, logits)
    np.testing.assert_allclose(fisher @ natural.reshape(-1), gradient.reshape(-1), atol=1e-5)
    np.testing.assert_allclose(natural.reshape(-1), jnp.linalg.pinv(fisher) @ gradient.reshape(-1), atol=1e-3)
    assert natural[2, 1] == 0.0 and np.all(np.isfinite(natural))
