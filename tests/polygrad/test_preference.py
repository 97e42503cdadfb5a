"""Preference learning: Bradley-Terry and DPO losses against hand computations, closed-form gradients and
finite differences; best-of-n KL and estimator against exact answers; SFT / reward-model / DPO steps."""

import math
from itertools import combinations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from polygrad import optim, validate
from polygrad.lm import TransformerLM, init_params, sampling, supervised
from polygrad.losses import preference


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_bradley_terry_loss_by_hand(maybe_jit):
    r_w = jnp.asarray([1.0, 0.0, -2.0])
    r_l = jnp.asarray([0.0, 0.0, 1.0])
    loss, metrics = maybe_jit(preference.bradley_terry_loss)(r_w, r_l)
    expected = np.mean([math.log1p(math.exp(-1.0)), math.log(2.0), math.log1p(math.exp(3.0))])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], (1 + 0.5 + 0) / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["margin"], (1 + 0 - 3) / 3, rtol=1e-6)


def test_bradley_terry_gradient_closed_form_and_finite_differences():
    key_w, key_l = jax.random.split(jax.random.PRNGKey(0))
    r_w = jax.random.normal(key_w, (5,))
    r_l = jax.random.normal(key_l, r_w.shape, r_w.dtype)
    grad_w, grad_l = jax.grad(lambda a, b: preference.bradley_terry_loss(a, b)[0], argnums=(0, 1))(r_w, r_l)
    closed = -_sigmoid(-(np.asarray(r_w) - np.asarray(r_l))) / 5
    np.testing.assert_allclose(grad_w, closed, rtol=1e-5)
    np.testing.assert_allclose(grad_l, -closed, rtol=1e-5)
    # central finite differences in float64 numpy on the formula itself
    def f(a, b):
        return np.mean(np.log1p(np.exp(-(a - b))))

    a, b, h = np.asarray(r_w, np.float64), np.asarray(r_l, np.float64), 1e-6
    fd = [(f(a + h * e, b) - f(a - h * e, b)) / (2 * h) for e in np.eye(5)]
    np.testing.assert_allclose(grad_w, fd, rtol=1e-4, atol=1e-7)


def test_bradley_terry_extreme_margins_and_smoothing():
    r_w = jnp.asarray([200.0, -200.0])
    r_l = jnp.zeros(2)
    loss, _ = preference.bradley_terry_loss(r_w, r_l)
    np.testing.assert_allclose(loss, 100.0, rtol=1e-6)  # (0 + 200) / 2, finite
    grads = jax.grad(lambda a: preference.bradley_terry_loss(a, r_l)[0])(r_w)
    assert np.all(np.isfinite(grads))
    eps = 0.1
    smooth, _ = preference.bradley_terry_loss(jnp.asarray([2.0]), jnp.asarray([0.0]), label_smoothing=eps)
    np.testing.assert_allclose(smooth, (1 - eps) * math.log1p(math.exp(-2)) + eps * math.log1p(math.exp(2)),
                               rtol=1e-6)
    weighted, _ = preference.bradley_terry_loss(jnp.asarray([1.0, 5.0]), jnp.zeros(2),
                                                weights=jnp.asarray([1.0, 0.0]))
    np.testing.assert_allclose(weighted, math.log1p(math.exp(-1.0)), rtol=1e-6)
    empty, _ = preference.bradley_terry_loss(jnp.asarray([1.0]), jnp.zeros(1), weights=jnp.zeros(1))
    assert float(empty) == 0.0
    with pytest.raises(validate.ConfigError, match="label_smoothing"):
        preference.bradley_terry_loss(r_w, r_l, label_smoothing=0.5)


def test_dpo_loss_by_hand_and_gradient(maybe_jit):
    lw, ll = jnp.asarray([-3.0, -5.0]), jnp.asarray([-4.0, -2.0])
    rw, rl = jnp.asarray([-3.5, -4.0]), jnp.asarray([-3.5, -3.0])
    beta = 0.5
    loss, metrics = maybe_jit(preference.dpo_loss)(lw, ll, rw, rl, beta)
    z = beta * ((np.asarray(lw) - np.asarray(rw)) - (np.asarray(ll) - np.asarray(rl)))  # [0.5, -1.0]
    np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-z))), rtol=1e-6)
    np.testing.assert_allclose(metrics["reward_chosen"], beta * np.mean(np.asarray(lw) - np.asarray(rw)),
                               rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], 0.5)
    # Rafailov et al. eq. 8: d loss / d log pi(y_w) = -beta sigmoid(-z) / B, and the reference gets none
    def loss(a, b, c, d):
        return preference.dpo_loss(a, b, c, d, beta)[0]

    grads = jax.grad(loss, argnums=(0, 1, 2))(lw, ll, rw, rl)
    np.testing.assert_allclose(grads[0], -beta * _sigmoid(-z) / 2, rtol=1e-5)
    np.testing.assert_allclose(grads[1], beta * _sigmoid(-z) / 2, rtol=1e-5)
    np.testing.assert_allclose(grads[2], 0.0)
    # finite differences of the loss in log pi(y_l)
    h = 1e-3
    for i in range(2):
        e = jnp.zeros(2).at[i].set(h)
        fd = (loss(lw, ll + e, rw, rl) - loss(lw, ll - e, rw, rl)) / (2 * h)
        np.testing.assert_allclose(fd, grads[1][i], rtol=2e-2)
    with pytest.raises(validate.ConfigError, match="beta"):
        preference.dpo_loss(lw, ll, rw, rl, 0.0)


def test_dpo_is_bradley_terry_of_implicit_rewards():
    key = jax.random.PRNGKey(3)
    lw, ll, rw, rl = jax.random.normal(key, (4, 7))
    beta = 0.3
    dpo, _ = preference.dpo_loss(lw, ll, rw, rl, beta)
    bt, _ = preference.bradley_terry_loss(preference.dpo_implicit_reward(lw, rw, beta),
                                         preference.dpo_implicit_reward(ll, rl, beta))
    np.testing.assert_allclose(dpo, bt, rtol=1e-6)


def test_losses_follow_the_input_dtype():
    x = jnp.ones(3, jnp.bfloat16)
    loss, metrics = preference.bradley_terry_loss(x, 0 * x)
    assert loss.dtype == jnp.bfloat16 and metrics["accuracy"].dtype == jnp.bfloat16
    loss, _ = preference.dpo_loss(x, 0 * x, x, 0 * x, 0.1)
    assert loss.dtype == jnp.bfloat16


def test_kl_penalized_rewards_sum_to_score_minus_beta_k1():
    logp = jnp.asarray([[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0]])
    logp_ref = jnp.asarray([[-1.5, -1.0, -0.5], [-0.1, 0.0, 0.0]])
    mask = jnp.asarray([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    scores = jnp.asarray([2.0, -1.0])
    rewards, kl = preference.kl_penalized_rewards(scores, logp, logp_ref, mask, 0.1)
    np.testing.assert_allclose(kl, [0.5 - 1.0 + 0.0, -0.2], atol=1e-6)
    np.testing.assert_allclose(rewards, [[-0.05, 0.1, 2.0], [-1.0 + 0.02, 0.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(jnp.sum(rewards, 1), scores - 0.1 * kl, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 4, 16])
def test_best_of_n_kl_closed_form_matches_the_exact_distribution(n):
    """Many equally likely outcomes with distinct scores approach the continuous case, where
    KL(pi_bon || pi) = log n - (n - 1) / n exactly; with fewer outcomes the formula is an upper bound."""
    for k, tol in [(20000, 1e-3), (50, None)]:
        with jax.enable_x64(True):
            probs = jnp.full((k,), 1.0 / k, jnp.float64)
            scores = jax.random.permutation(jax.random.PRNGKey(k), k).astype(jnp.float64)
            bon = preference.best_of_n_distribution(probs, scores, n)
            assert bon.dtype == jnp.float64
            np.testing.assert_allclose(jnp.sum(bon), 1.0, atol=1e-9)
            kl = float(jnp.sum(jnp.where(bon > 0, bon * jnp.log(jnp.where(bon > 0, bon, 1.0) / probs), 0.0)))
            closed = float(preference.best_of_n_kl(n))
        if tol is not None:
            np.testing.assert_allclose(kl, closed, atol=tol)
        else:
            assert kl <= closed + 1e-6
    assert float(preference.best_of_n_kl(1)) == 0.0


def test_best_of_n_estimate_is_the_exact_subset_average():
    """Over a pool of m samples, the estimate is the average over all n-subsets of the value of the
    proxy-best member (checked by enumerating the subsets)."""
    m = 6
    key_p, key_v = jax.random.split(jax.random.PRNGKey(1))
    proxy = jax.random.normal(key_p, (3, m))
    values = jax.random.normal(key_v, (3, m))
    for n in range(1, m + 1):
        est = preference.best_of_n_estimate(proxy, values, n)
        for row in range(3):
            subsets = list(combinations(range(m), n))
            exact = np.mean([values[row, max(s, key=lambda i: proxy[row, i])] for s in subsets])
            np.testing.assert_allclose(est[row], exact, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(preference.best_of_n_estimate(proxy, values, 1), jnp.mean(values, 1),
                               rtol=1e-5)
    np.testing.assert_allclose(preference.best_of_n_estimate(proxy, values, m),
                               jnp.take_along_axis(values, jnp.argmax(proxy, 1)[:, None], 1)[:, 0])


# --- model-level steps (polygrad.lm.supervised) -------------------------------------------------------


def _tiny_model():
    return TransformerLM(vocab_size=7, max_len=6, d_model=8, num_layers=1, num_heads=2, value_head=True)


def test_sequence_scores_read_the_value_head_at_the_last_response_token():
    model = _tiny_model()
    params = init_params(model, jax.random.PRNGKey(0))
    prompts = jnp.asarray([[1, 4], [1, 5]])
    responses = jnp.asarray([[4, 5, 3, 0], [6, 3, 0, 0]])
    mask = sampling.response_mask(responses, eos_id=3)

    @jax.jit
    def scores_and_values(responses):
        values = model.apply(params, jnp.concatenate([prompts, responses], 1)).values
        return supervised.sequence_scores(model, params, prompts, responses, mask), values

    scores, values = scores_and_values(responses)
    np.testing.assert_allclose(scores, [values[0, 4], values[1, 3]], rtol=1e-6)
    # a change after EOS does not change the score (causal attention)
    np.testing.assert_allclose(scores_and_values(responses.at[0, 3].set(6))[0][0], scores[0], rtol=1e-6)


def test_fit_supervised_lowers_the_nll_and_is_deterministic():
    model = _tiny_model()
    params = init_params(model, jax.random.PRNGKey(0))
    prompts = jnp.tile(jnp.asarray([[1, 4]]), (16, 1))
    responses = jnp.tile(jnp.asarray([[5, 6, 3, 0]]), (16, 1))
    mask = sampling.response_mask(responses, eos_id=3)
    tx = optim.make_optimizer(1e-2, 1.0)
    fit = jax.jit(supervised.fit_supervised, static_argnums=(0, 2, 7, 8))
    out = fit(model, params, tx, prompts, responses, mask, jax.random.PRNGKey(1), 30, 4)
    assert out.metrics["nll"].shape == (30,)
    assert float(out.metrics["nll"][-1]) < 0.5 * float(out.metrics["nll"][0])
    again = fit(model, params, tx, prompts, responses, mask, jax.random.PRNGKey(1), 30, 4)
    chex_equal = jax.tree.map(lambda a, b: np.array_equal(a, b), out.params, again.params)
    assert all(jax.tree.leaves(chex_equal))
    zero = fit(model, params, tx, prompts, responses, mask, jax.random.PRNGKey(1), 0, 4)
    assert zero.metrics["nll"].shape == (0,)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(a, b), zero.params, params)))


def test_reward_model_and_dpo_steps_learn_a_preference():
    """Chosen responses start with token 5, rejected with 6: the reward model separates them and DPO
    raises the policy's log-probability of the chosen response relative to the reference."""
    model = _tiny_model()
    params = init_params(model, jax.random.PRNGKey(0))
    prompts = jnp.tile(jnp.asarray([[1, 4]]), (8, 1))
    chosen = jnp.tile(jnp.asarray([[5, 4, 3, 0]]), (8, 1))
    rejected = jnp.tile(jnp.asarray([[6, 4, 3, 0]]), (8, 1))
    mask = sampling.response_mask(chosen, eos_id=3)
    tx = optax.adam(1e-2)

    def loss_fn(p, batch):
        return supervised.dpo_model_loss(model, p, *batch, beta=0.5)

    @jax.jit
    def run(params):
        rm = supervised.fit_reward_model(model, params, tx, prompts, chosen, rejected, mask, mask,
                                         jax.random.PRNGKey(1), 20, 4)
        ref_w = supervised.sequence_log_prob(model, params, prompts, chosen, mask)
        ref_l = supervised.sequence_log_prob(model, params, prompts, rejected, mask)
        data = (prompts, chosen, rejected, mask, mask, ref_w, ref_l)
        dpo = supervised.fit(loss_fn, tx, params, data, jax.random.PRNGKey(2), 20, 4)
        return rm.metrics, dpo.metrics, loss_fn(params, data)[0]

    rm, dpo, loss0 = run(params)
    assert float(rm["accuracy"][-1]) == 1.0 and float(rm["loss"][-1]) < 0.1
    np.testing.assert_allclose(loss0, math.log(2.0), rtol=1e-5)  # policy = reference: margin 0
    assert float(dpo["margin"][-1]) > 1.0


def test_fit_draws_rows_from_the_first_num_rows_only():
    data = jnp.arange(10.0)

    def loss_fn(params, batch):
        return (params - jnp.mean(batch)) ** 2, {"largest_row": jnp.max(batch)}

    fit = jax.jit(supervised.fit, static_argnums=(0, 1, 5, 6))
    out = fit(loss_fn, optax.sgd(0.1), jnp.zeros(()), data, jax.random.PRNGKey(0), 50, 4, None, 3)
    assert float(jnp.max(out.metrics["largest_row"])) == 2.0
    out = fit(loss_fn, optax.sgd(0.1), jnp.zeros(()), data, jax.random.PRNGKey(0), 50, 4, None, 10)
    assert float(jnp.max(out.metrics["largest_row"])) == 9.0
