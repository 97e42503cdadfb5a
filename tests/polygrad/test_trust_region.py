"""Tests of polygrad.trust_region against dense linear algebra and the constraints of 003 section 4.6."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from envs import tabular as tabular_envs
from polygrad import tabular
from polygrad import trust_region as tr


@pytest.fixture(autouse=True, scope="module")
def _no_implicit_rank_promotion():
    """Every test here (and every module fixture) runs with jax_numpy_rank_promotion="raise"."""
    with jax.numpy_rank_promotion("raise"):
        yield

OBS_DIM, HIDDEN, NUM_ACTIONS, ACTION_DIM = 3, 5, 4, 2


# --- a tiny two-layer policy network written out by hand, so the dense checks depend on nothing else ----


def init_mlp(key, out_dim):
    k1, k2 = jax.random.split(key)
    return {
        "hidden": {"w": jax.random.normal(k1, (OBS_DIM, HIDDEN)) / np.sqrt(OBS_DIM), "b": jnp.zeros(HIDDEN)},
        "out": {"w": jax.random.normal(k2, (HIDDEN, out_dim)) / np.sqrt(HIDDEN), "b": jnp.full(out_dim, 0.1)},
    }


def mlp(params, obs):
    def dense(x, layer):
        y = x @ layer["w"]
        return y + jnp.broadcast_to(layer["b"], y.shape)

    return dense(jnp.tanh(dense(obs, params["hidden"])), params["out"])


def log_softmax_kl(logits_p, logits_q):
    """KL(p || q) of categoricals, written independently of polygrad.distributions."""
    logp, logq = jax.nn.log_softmax(logits_p), jax.nn.log_softmax(logits_q)
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def diagonal_gaussian_kl(mean_p, log_std_p, mean_q, log_std_q):
    log_std_p = jnp.broadcast_to(log_std_p, mean_p.shape)
    log_std_q = jnp.broadcast_to(log_std_q, mean_q.shape)
    var_p, var_q = jnp.exp(2 * log_std_p), jnp.exp(2 * log_std_q)
    per_dim = log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5
    return jnp.sum(per_dim, axis=-1)


def categorical_problem(key, batch=6):
    """A policy, a batch of observations and the mean-KL function from pi_old = pi_params."""
    k_params, k_obs = jax.random.split(key)
    params = init_mlp(k_params, NUM_ACTIONS)
    obs = jax.random.normal(k_obs, (batch, OBS_DIM))
    old_logits = mlp(params, obs)

    def kl_fn(p):
        return jnp.mean(log_softmax_kl(old_logits, mlp(p, obs)))

    return params, obs, old_logits, kl_fn


def spd_matrix(key, n, condition=10.0):
    q, _ = jnp.linalg.qr(jax.random.normal(key, (n, n)))
    return (q * jnp.linspace(1.0, condition, n)[None, :]) @ q.T


def as_tree(vector):
    """Split a length-7 vector into a nested pytree, to exercise CG on structures, not flat arrays."""
    return {"a": vector[:3], "b": {"c": vector[3:7].reshape(2, 2)}}


def tree_matvec(matrix):
    def matvec(tree):
        flat, unravel = ravel_pytree(tree)
        return unravel(matrix @ flat)

    return matvec


# --- conjugate gradient --------------------------------------------------------------------------------


def test_conjugate_gradient_matches_dense_solve_on_pytrees(maybe_jit):
    matrix = spd_matrix(jax.random.PRNGKey(0), 7)
    b = as_tree(jax.random.normal(jax.random.PRNGKey(1), (7,)))

    solve = maybe_jit(lambda rhs: tr.conjugate_gradient(tree_matvec(matrix), rhs, 20, 1e-7))
    x, metrics = solve(b)

    expected = np.linalg.solve(np.asarray(matrix, np.float64), np.asarray(ravel_pytree(b)[0], np.float64))
    np.testing.assert_allclose(ravel_pytree(x)[0], expected, rtol=1e-4, atol=1e-5)
    assert jax.tree.structure(x) == jax.tree.structure(b)
    assert 1 <= int(metrics["cg_iterations"]) <= 20
    true_residual = np.linalg.norm(ravel_pytree(b)[0] - matrix @ ravel_pytree(x)[0])
    assert float(metrics["cg_residual"]) <= 1e-4 and true_residual <= 1e-4


def test_conjugate_gradient_respects_iteration_count_and_tolerance():
    matrix = spd_matrix(jax.random.PRNGKey(2), 7, condition=100.0)
    b = as_tree(jax.random.normal(jax.random.PRNGKey(3), (7,)))
    _, two_steps = tr.conjugate_gradient(tree_matvec(matrix), b, max_iterations=2, residual_tol=0.0)
    assert int(two_steps["cg_iterations"]) == 2
    assert float(two_steps["cg_residual"]) > 1e-3

    # A multiple of the identity is solved exactly in one iteration; the tolerance then stops CG.
    x, one_step = tr.conjugate_gradient(lambda v: jax.tree.map(lambda t: 3.0 * t, v), b, 10, 1e-5)
    assert int(one_step["cg_iterations"]) == 1
    np.testing.assert_allclose(ravel_pytree(x)[0], ravel_pytree(b)[0] / 3.0, rtol=1e-6)


def test_conjugate_gradient_zero_rhs_and_singular_operator():
    matrix = spd_matrix(jax.random.PRNGKey(4), 7)
    zero = as_tree(jnp.zeros(7))
    x, metrics = tr.conjugate_gradient(tree_matvec(matrix), zero, 10)
    assert int(metrics["cg_iterations"]) == 0
    np.testing.assert_array_equal(ravel_pytree(x)[0], np.zeros(7))

    # Singular PSD operator, right-hand side in its range: CG from zero returns the minimum-norm solution.
    basis = jax.random.normal(jax.random.PRNGKey(5), (7, 4))
    singular = basis @ basis.T
    b = singular @ jax.random.normal(jax.random.PRNGKey(6), (7,))
    x, metrics = tr.conjugate_gradient(tree_matvec(singular), as_tree(b), 7, 1e-6)
    expected = np.linalg.pinv(np.asarray(singular, np.float64), rcond=1e-4) @ np.asarray(b, np.float64)
    np.testing.assert_allclose(ravel_pytree(x)[0], expected, rtol=1e-3, atol=1e-4)
    assert np.isfinite(float(metrics["cg_residual"]))


def test_conjugate_gradient_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_iterations"):
        tr.conjugate_gradient(lambda v: v, jnp.ones(2), max_iterations=0)
    with pytest.raises(ValueError, match="residual_tol"):
        tr.conjugate_gradient(lambda v: v, jnp.ones(2), residual_tol=-1.0)


# --- Fisher-vector products -----------------------------------------------------------------------------


def test_fisher_vector_product_matches_dense_hessian_and_gauss_newton_categorical(maybe_jit):
    damping = 0.1
    params, obs, old_logits, kl_fn = categorical_problem(jax.random.PRNGKey(7))
    flat_params, unravel = ravel_pytree(params)
    num_params = flat_params.size

    dense_hessian = jax.jit(jax.hessian(lambda flat: kl_fn(unravel(flat))))(flat_params)
    # Gauss-Newton form at theta_old: mean_b J_b^T (diag(p_b) - p_b p_b^T) J_b, J_b = d logits_b / d theta.
    jac = jax.jit(jax.jacobian(lambda flat: mlp(unravel(flat), obs)))(flat_params)  # [B, A, P]
    probs = jax.nn.softmax(old_logits)
    logit_fisher = jax.vmap(lambda p: jnp.diag(p) - jnp.outer(p, p))(probs)  # [B, A, A]
    gauss_newton = jnp.einsum("bap,bac,bcq->pq", jac, logit_fisher, jac) / obs.shape[0]
    np.testing.assert_allclose(dense_hessian, gauss_newton, atol=1e-5)

    vectors = jax.random.normal(jax.random.PRNGKey(8), (3, num_params))
    fvp = maybe_jit(lambda v: ravel_pytree(tr.fisher_vector_product(kl_fn, params, damping)(unravel(v)))[0])
    for v in vectors:
        expected = gauss_newton @ v + damping * v
        np.testing.assert_allclose(fvp(v), expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(fvp(v), dense_hessian @ v + damping * v, rtol=1e-4, atol=1e-5)


def test_fisher_vector_product_matches_gauss_newton_gaussian():
    """Diagonal Gaussian with a state-independent log-std: Fisher = J_mu^T diag(1/sigma^2) J_mu (+) 2 I."""
    key_params, key_obs = jax.random.split(jax.random.PRNGKey(9))
    params = {"mean": init_mlp(key_params, ACTION_DIM), "log_std": jnp.array([-0.3, 0.4])}
    obs = jax.random.normal(key_obs, (5, OBS_DIM))
    old_mean = mlp(params["mean"], obs)
    old_log_std = params["log_std"]

    def kl_fn(p):
        return jnp.mean(diagonal_gaussian_kl(old_mean, old_log_std, mlp(p["mean"], obs), p["log_std"]))

    flat_params, unravel = ravel_pytree(params)
    jac_mean = jax.jit(jax.jacobian(lambda flat: mlp(unravel(flat)["mean"], obs)))(flat_params)  # [B, D, P]
    jac_log_std = jax.jacobian(lambda flat: unravel(flat)["log_std"])(flat_params)  # [D, P]
    precision = jnp.exp(-2 * old_log_std)
    gauss_newton = jnp.einsum("bdp,d,bdq->pq", jac_mean, precision, jac_mean) / obs.shape[0]
    gauss_newton += 2.0 * jac_log_std.T @ jac_log_std
    dense_hessian = jax.jit(jax.hessian(lambda flat: kl_fn(unravel(flat))))(flat_params)
    np.testing.assert_allclose(dense_hessian, gauss_newton, atol=1e-5)

    fvp = jax.jit(lambda v: ravel_pytree(tr.fisher_vector_product(kl_fn, params)(unravel(v)))[0])
    for v in jax.random.normal(jax.random.PRNGKey(10), (3, flat_params.size)):
        np.testing.assert_allclose(fvp(v), gauss_newton @ v, rtol=1e-4, atol=1e-5)


def test_fisher_vector_product_rejects_negative_damping():
    _, _, _, kl_fn = categorical_problem(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="damping"):
        tr.fisher_vector_product(kl_fn, init_mlp(jax.random.PRNGKey(0), NUM_ACTIONS), damping=-1.0)


# --- TRPO and NPG steps on random batches --------------------------------------------------------------


def random_policy_batch(key, batch=32):
    """Random policy, observations, sampled actions and advantages: (params, surrogate_fn, kl_fn)."""
    k_problem, k_actions, k_adv = jax.random.split(key, 3)
    params, obs, old_logits, kl_fn = categorical_problem(k_problem, batch)
    actions = jax.random.categorical(k_actions, old_logits)
    advantages = jax.random.normal(k_adv, (batch,))
    old_log_probs = jnp.take_along_axis(jax.nn.log_softmax(old_logits), actions[:, None], -1)[:, 0]

    def surrogate_fn(p):
        log_probs = jnp.take_along_axis(jax.nn.log_softmax(mlp(p, obs)), actions[:, None], -1)[:, 0]
        return jnp.mean(jnp.exp(log_probs - old_log_probs) * advantages)

    return params, surrogate_fn, kl_fn


def run_steps(step_fn, config, num_batches, seed):
    """vmap a step over random batches: old and new surrogate, new KL, new and old params, metrics."""

    def one(key):
        params, surrogate_fn, kl_fn = random_policy_batch(key)
        new_params, metrics = step_fn(surrogate_fn, kl_fn, params, config)
        return surrogate_fn(params), surrogate_fn(new_params), kl_fn(new_params), new_params, params, metrics

    return jax.vmap(one)(jax.random.split(jax.random.PRNGKey(seed), num_batches))


# delta = 0.05 is large enough that about a third of the batches need at least one backtracking step.
STEP_CONFIG = dict(max_kl=0.05, cg_iterations=10, damping=0.01)


@pytest.fixture(scope="module")
def steps_on_random_batches():
    """TRPO (both line searches) and NPG on the same 64 random batches, compiled as one program."""

    @jax.jit
    def run():
        return {
            "sequential": run_steps(tr.trpo_step, tr.TrustRegionConfig(**STEP_CONFIG), 64, 11),
            "parallel": run_steps(
                tr.trpo_step, tr.TrustRegionConfig(**STEP_CONFIG, line_search="parallel"), 64, 11
            ),
            "npg": run_steps(tr.natural_policy_gradient_step, tr.TrustRegionConfig(**STEP_CONFIG), 64, 11),
        }

    return run()


@pytest.mark.parametrize("line_search", ["sequential", "parallel"])
def test_trpo_step_keeps_kl_within_delta_and_never_decreases_surrogate(steps_on_random_batches, line_search):
    old, new, kl, new_params, params, metrics = steps_on_random_batches[line_search]
    max_kl = STEP_CONFIG["max_kl"]

    assert np.all(np.asarray(kl) <= max_kl + 1e-7)
    assert np.all(np.asarray(new) >= np.asarray(old))
    accepted = np.asarray(metrics["step_accepted"]) > 0
    assert accepted.mean() >= 0.9  # not vacuous: almost every batch takes a step ...
    assert np.all(np.asarray(new)[accepted] > np.asarray(old)[accepted])  # ... and improves the surrogate
    steps = np.asarray(metrics["line_search_steps"])
    assert np.any(steps[accepted] > 1)  # ... and some of them only after backtracking
    np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(metrics["actual_improvement"], new - old, rtol=1e-4, atol=1e-7)
    factor = tr.TrustRegionConfig(**STEP_CONFIG).backtrack_factor
    expected_fraction = factor ** (steps[accepted] - 1)
    np.testing.assert_allclose(np.asarray(metrics["step_fraction"])[accepted], expected_fraction, rtol=1e-6)
    # A rejected line search leaves the parameters untouched.
    moved = jax.vmap(lambda a, b: jnp.any(ravel_pytree(a)[0] != ravel_pytree(b)[0]))(new_params, params)
    np.testing.assert_array_equal(np.asarray(moved), accepted)
    for name, values in metrics.items():
        assert values.dtype == jnp.float32 and np.all(np.isfinite(values)), name


def test_sequential_and_parallel_line_search_accept_the_same_candidate(steps_on_random_batches):
    sequential = steps_on_random_batches["sequential"][-1]
    parallel = steps_on_random_batches["parallel"][-1]
    for name in ("line_search_steps", "step_fraction", "step_accepted", "kl", "actual_improvement"):
        np.testing.assert_allclose(sequential[name], parallel[name], rtol=1e-5, atol=1e-7)


def test_trpo_step_is_a_backtracked_npg_step(steps_on_random_batches):
    _, _, _, trpo_params, params, trpo_metrics = steps_on_random_batches["sequential"]
    _, _, npg_kl, npg_params, _, npg_metrics = steps_on_random_batches["npg"]
    fraction = trpo_metrics["step_fraction"]
    trpo_delta = jax.vmap(lambda a, b: ravel_pytree(a)[0] - ravel_pytree(b)[0])(trpo_params, params)
    npg_delta = jax.vmap(lambda a, b: ravel_pytree(a)[0] - ravel_pytree(b)[0])(npg_params, params)
    np.testing.assert_allclose(trpo_delta, fraction[:, None] * npg_delta, rtol=1e-4, atol=1e-6)
    for name in ("cg_iterations", "cg_residual", "quadratic_form", "step_scale", "gradient_norm"):
        np.testing.assert_allclose(trpo_metrics[name], npg_metrics[name], rtol=1e-5)
    np.testing.assert_allclose(npg_metrics["kl"], npg_kl, rtol=1e-5)
    # Without a line search the KL is only bounded to second order: some NPG steps overshoot delta.
    assert np.any(np.asarray(npg_kl) > STEP_CONFIG["max_kl"])


def test_full_step_matches_quadratic_model_for_small_delta():
    """Without damping and for small delta, KL(theta_old + beta s) ~= beta^2 s^T A s / 2 = delta (eq. 74)."""
    config = tr.TrustRegionConfig(max_kl=1e-6, cg_iterations=30, cg_residual_tol=0.0, damping=0.0)
    _, _, kl, _, _, metrics = jax.jit(lambda: run_steps(tr.natural_policy_gradient_step, config, 16, 5))()
    np.testing.assert_allclose(metrics["step_scale"] ** 2 * metrics["quadratic_form"] / 2, 1e-6, rtol=1e-4)
    np.testing.assert_allclose(kl, 1e-6, rtol=0.2)
    assert np.all(np.asarray(metrics["expected_improvement"]) > 0)
    # The linear model predicts the surrogate's gain to first order.
    np.testing.assert_allclose(metrics["actual_improvement"], metrics["expected_improvement"], rtol=0.05)


@pytest.mark.parametrize("step_fn", [tr.trpo_step, tr.natural_policy_gradient_step])
def test_zero_advantages_give_no_step_and_finite_metrics(step_fn):
    params, obs, old_logits, kl_fn = categorical_problem(jax.random.PRNGKey(12))

    def surrogate_fn(p):  # all advantages zero: the surrogate is constant
        return jnp.mean(jnp.zeros(obs.shape[0]) * jnp.exp(jax.nn.log_softmax(mlp(p, obs))[:, 0]))

    new_params, metrics = jax.jit(step_fn, static_argnums=(0, 1, 3))(
        surrogate_fn, kl_fn, params, tr.TrustRegionConfig()
    )
    np.testing.assert_array_equal(ravel_pytree(new_params)[0], ravel_pytree(params)[0])
    assert all(np.isfinite(float(value)) for value in metrics.values())
    assert float(metrics["step_scale"]) == 0.0 and float(metrics["kl"]) == 0.0


def test_trust_region_config_rejects_bad_values():
    for bad in (dict(max_kl=0.0), dict(cg_iterations=0), dict(damping=-0.1), dict(backtrack_factor=1.0),
                dict(max_backtracks=0), dict(line_search="random"), dict(cg_residual_tol=-1.0),
                dict(cg_iterations=2.5), dict(max_backtracks=True)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            tr.TrustRegionConfig(**bad)


def test_line_search_none_is_the_natural_policy_gradient_step():
    params, surrogate_fn, kl_fn = random_policy_batch(jax.random.PRNGKey(20))
    config = tr.TrustRegionConfig(**STEP_CONFIG, line_search="none")
    trpo_params, trpo_metrics = tr.trpo_step(surrogate_fn, kl_fn, params, config)
    npg_params, npg_metrics = tr.natural_policy_gradient_step(surrogate_fn, kl_fn, params, config)
    np.testing.assert_array_equal(ravel_pytree(trpo_params)[0], ravel_pytree(npg_params)[0])
    assert trpo_metrics.keys() == npg_metrics.keys()
    # backtracking_line_search with "none" takes the full step untested.
    full_step, surrogate_old, _ = tr.natural_gradient_direction(surrogate_fn, kl_fn, params, config)
    searched, metrics = tr.backtracking_line_search(surrogate_fn, kl_fn, params, full_step, surrogate_old,
                                                    config)
    np.testing.assert_allclose(ravel_pytree(searched)[0], ravel_pytree(npg_params)[0], rtol=1e-6)
    assert float(metrics["step_fraction"]) == 1.0 and float(metrics["line_search_steps"]) == 0.0
    np.testing.assert_allclose(metrics["kl"], npg_metrics["kl"], rtol=1e-6)


# --- the natural gradient of a tabular softmax policy, against polygrad.tabular ---------------------------


@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_npg_direction_on_tabular_softmax_is_the_exact_natural_gradient(damping):
    """Exact surrogate (eq. 65 without its constant) and d_pi-weighted KL (eq. 67) of a random finite MDP:
    g is the exact policy gradient, A the exact Fisher matrix, so s = A^+ g is Kakade's natural gradient."""
    num_states, num_actions = 4, 3
    mdp = tabular_envs.random_mdp(jax.random.PRNGKey(13), num_states, num_actions, gamma=0.9)
    logits = 0.5 * jax.random.normal(jax.random.PRNGKey(14), (num_states, num_actions))
    pi_old = tabular.softmax_policy(logits)
    occupancy = tabular.state_occupancy(mdp, pi_old)
    advantages = tabular.advantages(mdp, pi_old)

    def surrogate_fn(theta):
        return jnp.sum(occupancy[:, None] * tabular.softmax_policy(theta) * advantages) / (1.0 - mdp.gamma)

    def kl_fn(theta):
        return jnp.sum(occupancy * log_softmax_kl(logits, theta))

    np.testing.assert_allclose(
        jax.grad(surrogate_fn)(logits), tabular.softmax_policy_gradient(mdp, logits), rtol=1e-4, atol=1e-6
    )
    config = tr.TrustRegionConfig(max_kl=0.01, cg_iterations=num_states * num_actions, cg_residual_tol=0.0,
                                  damping=damping)
    new_logits, metrics = jax.jit(tr.natural_policy_gradient_step, static_argnums=(0, 1, 3))(
        surrogate_fn, kl_fn, logits, config
    )
    direction = (new_logits - logits) / metrics["step_scale"]
    expected = tabular.softmax_natural_gradient(mdp, logits, damping=damping)
    np.testing.assert_allclose(direction, expected, rtol=2e-3, atol=2e-4 * np.abs(expected).max())
    # beta of eq. (74) with the exact direction and the exact (damped) Fisher matrix.
    fisher = tabular.softmax_fisher_matrix(mdp, logits) + damping * jnp.eye(num_states * num_actions)
    exact_scale = np.sqrt(2 * config.max_kl / (expected.reshape(-1) @ fisher @ expected.reshape(-1)))
    np.testing.assert_allclose(metrics["step_scale"], exact_scale, rtol=2e-3)
