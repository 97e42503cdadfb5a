"""Degenerate inputs have defined results, never NaN; bad hyperparameters are refused with a clear error.

Masks are applied with `where` (a -inf or NaN under a mask cannot leak, in values or gradients); weights
and effective sample sizes are computed in log space or rescaled, so huge weights do not overflow.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polygrad import trust_region
from polygrad.estimators import advantages, distributions, importance
from polygrad.lm.sampling import sample, sequence_log_probs
from polygrad.lm.transformer import TransformerLM, init_params


@pytest.fixture(autouse=True, scope="module")
def _no_implicit_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


def finite(*arrays):
    return all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(arrays))


# --- importance sampling ------------------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [-jnp.inf, jnp.nan, jnp.inf])
def test_masked_steps_never_leak(maybe_jit, garbage):
    """Trajectories of different lengths, padded with -inf / NaN / inf log-ratios after they ended."""
    step = jnp.log(jnp.array([[2.0, 0.5], [3.0, 0.5], [0.5, 4.0]]))  # [T=3, N=2]
    mask = jnp.array([[1.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    padded = step.at[2, 0].set(garbage)
    rewards = jnp.ones((3, 2)).at[2, 0].set(garbage)
    np.testing.assert_allclose(maybe_jit(importance.trajectory_weights)(padded, mask), [6.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(maybe_jit(importance.cumulative_weights)(padded, mask),
                               [[2.0, 0.5], [6.0, 0.25], [6.0, 1.0]], rtol=1e-6)
    # 2 + 0.9 * 6 on the first trajectory; 0.5 + 0.9 * 0.25 + 0.81 * 1 on the second.
    want = np.mean([2 + 0.9 * 6, 0.5 + 0.9 * 0.25 + 0.81])
    estimate = maybe_jit(importance.per_decision_is)(padded, rewards, 0.9, mask)
    np.testing.assert_allclose(estimate, want, rtol=1e-6)
    grads = jax.grad(lambda s: jnp.sum(importance.trajectory_weights(s, mask))
                     + importance.per_decision_is(s, rewards, 0.9, mask))(padded)
    assert finite(grads) and float(grads[2, 0]) == 0.0
    log_w = importance.trajectory_log_weights(padded, mask)
    np.testing.assert_allclose(importance.effective_sample_size_from_log_weights(log_w),
                               (6 + 1) ** 2 / (36 + 1), rtol=1e-6)


def test_log_ratio_of_two_impossible_actions_is_zero():
    minus_inf = jnp.full(3, -jnp.inf)
    np.testing.assert_array_equal(importance.log_ratios(minus_inf, minus_inf), 0.0)
    np.testing.assert_array_equal(importance.ratios(minus_inf, minus_inf), 1.0)
    # One impossible side: clamped, finite.
    np.testing.assert_allclose(importance.ratios(minus_inf, jnp.zeros(3)), math.exp(-20.0), rtol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(importance.ratios(x, minus_inf)))(minus_inf)
    assert finite(grad)
    for kl in (distributions.kl_k1, distributions.kl_k2, distributions.kl_k3):
        np.testing.assert_array_equal(kl(minus_inf, minus_inf), 0.0)
        assert finite(jax.grad(lambda x, kl=kl: jnp.sum(kl(x, minus_inf)))(minus_inf))


def test_effective_sample_size_of_huge_weights():
    ess = importance.effective_sample_size
    np.testing.assert_allclose(ess(jnp.array([1e30, 1e30, 1e30, 0.0], jnp.float32)), 3.0, rtol=1e-6)
    np.testing.assert_allclose(ess(jnp.array([3e38, 1e38], jnp.float32)), 16 / 10, rtol=1e-6)
    np.testing.assert_allclose(ess(jnp.array([1e-30, 1e-30], jnp.float32)), 2.0, rtol=1e-6)  # no underflow
    np.testing.assert_allclose(ess(jnp.array([jnp.inf, jnp.inf, 5.0])), 2.0)  # infinite weights dominate
    assert float(ess(jnp.zeros(3))) == 0.0
    from_logs = importance.effective_sample_size_from_log_weights
    np.testing.assert_allclose(from_logs(jnp.array([1000.0, 1000.0, -jnp.inf, 0.0])), 2.0, rtol=1e-6)
    np.testing.assert_allclose(from_logs(jnp.array([-1000.0, -1000.0])), 2.0, rtol=1e-6)
    assert float(from_logs(jnp.full(3, -jnp.inf))) == 0.0
    assert float(from_logs(jnp.zeros(3), mask=jnp.zeros(3))) == 0.0
    np.testing.assert_allclose(from_logs(jnp.array([jnp.nan, 0.0, 0.0]), mask=jnp.array([0, 1, 1])), 2.0)


def test_self_normalised_is_of_zero_weights_and_bad_caps():
    assert float(importance.self_normalised_is(jnp.zeros(4), jnp.ones(4))) == 0.0
    for cap in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cap"):
            importance.capped_weights(jnp.ones(2), cap)


# --- distributions -----------------------------------------------------------------------------------------


def test_categorical_entropy_and_kl_gradients_with_impossible_actions():
    logits = jnp.array([0.3, -jnp.inf, 1.0])
    grad = jax.grad(distributions.categorical_entropy)(logits)
    assert finite(grad) and float(grad[1]) == 0.0
    np.testing.assert_allclose(jnp.sum(grad), 0.0, atol=1e-6)
    other = jnp.array([0.0, -jnp.inf, -0.5])
    assert finite(distributions.categorical_kl(logits, other))
    grads = jax.grad(distributions.categorical_kl, argnums=(0, 1))(logits, other)
    assert finite(grads)
    # q(a) = 0 where p(a) > 0: the KL is +inf, as it should be (not NaN).
    assert float(distributions.categorical_kl(jnp.zeros(2), jnp.array([0.0, -jnp.inf]))) == jnp.inf


# --- group advantages ---------------------------------------------------------------------------------------


NORMALISED = [advantages.group_normalized_advantages, advantages.batch_normalized_advantages]


@pytest.mark.parametrize("fn", NORMALISED)
def test_group_advantages_of_huge_rewards_are_finite_and_scale_free(fn):
    rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [3.0, -1.0, 2.0, 0.5], [2.0, 2.0, 2.0, 2.0]], jnp.float32)
    for scale in (1e30, 1e-30, 3e37):  # 3e37: the largest reward is 9e37, near float32's 3.4e38
        huge = fn(rewards * scale, eps=0.0)
        assert finite(huge)
        np.testing.assert_allclose(huge, fn(rewards, eps=0.0), rtol=1e-5, atol=1e-6)
    assert finite(fn(rewards * 1e30))  # with the default eps too
    if fn is advantages.group_normalized_advantages:
        assert finite(fn(rewards * 1e30, eps=1e-4, eps_in_sqrt=True, ddof=1))
        tiny = fn(rewards * 1e-30, eps=1e-4, eps_in_sqrt=True)  # sqrt(var + eps) = sqrt(eps): no overflow
        np.testing.assert_allclose(tiny, fn(rewards, eps=0.0) * 1e-30 * np.sqrt(
            np.var(np.asarray(rewards), axis=1, keepdims=True)) / 1e-2, rtol=1e-4)


@pytest.mark.parametrize("fn", NORMALISED)
@pytest.mark.parametrize("eps", [-1e-4, float("nan"), float("inf")])
def test_bad_eps_is_refused(fn, eps):
    with pytest.raises(ValueError, match="eps"):
        fn(jnp.ones((2, 3)), eps=eps)


def test_all_constant_batch_with_zero_eps():
    out = advantages.batch_normalized_advantages(jnp.ones((3, 4)), eps=0.0)
    np.testing.assert_array_equal(out, 0.0)
    np.testing.assert_array_equal(advantages.group_normalized_advantages(jnp.ones((3, 1)), eps=0.0), 0.0)


# --- trust-region configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["max_kl", "cg_residual_tol", "damping", "backtrack_factor"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_trust_region_config_refuses_non_finite_values(field, value):
    with pytest.raises(ValueError, match=field):
        trust_region.TrustRegionConfig(**{field: value})


# --- sampling -----------------------------------------------------------------------------------------------

EOS, PAD, VOCAB = 3, 0, 8
MODEL = TransformerLM(vocab_size=VOCAB, max_len=10, d_model=16, num_layers=1, num_heads=2)
PROMPTS = np.array([[1, 4, 5, 2], [0, 1, 6, 2]], np.int32)


@pytest.fixture(scope="module")
def params():
    return init_params(MODEL, jax.random.PRNGKey(0))


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0])
def test_sampling_refuses_bad_temperatures(params, temperature):
    with pytest.raises(ValueError, match="temperature"):
        sample(MODEL, params, jax.random.PRNGKey(0), PROMPTS, 4, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        sequence_log_probs(MODEL, params, PROMPTS, PROMPTS, temperature=temperature)


@pytest.mark.parametrize("max_new_tokens", [-1, 0, 2.0])
def test_sampling_refuses_bad_lengths(params, max_new_tokens):
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample(MODEL, params, jax.random.PRNGKey(0), PROMPTS, max_new_tokens)


def test_sampling_refuses_out_of_vocabulary_ids(params):
    for bad in (PROMPTS + VOCAB, PROMPTS - 5):
        with pytest.raises(ValueError, match="outside"):
            sample(MODEL, params, jax.random.PRNGKey(0), bad, 4)
        with pytest.raises(ValueError, match="outside"):
            sequence_log_probs(MODEL, params, PROMPTS, bad)


def test_tiny_temperature_is_greedy_and_traced_ids_are_clipped(params):
    run = jax.jit(lambda prompts, key, temperature: sample(MODEL, params, key, prompts, 5,
                                                           temperature=temperature), static_argnums=2)
    greedy = run(jnp.asarray(PROMPTS), jax.random.PRNGKey(1), 0.0)
    for seed in (2, 3):
        cold = run(jnp.asarray(PROMPTS), jax.random.PRNGKey(seed), 1e-10)
        np.testing.assert_array_equal(cold.tokens, greedy.tokens)
        np.testing.assert_array_equal(cold.mask, greedy.mask)
        assert finite(cold.log_probs, cold.entropies)
        np.testing.assert_allclose(cold.log_probs, 0.0, atol=1e-6)  # the argmax has probability 1
        np.testing.assert_allclose(cold.entropies, 0.0, atol=1e-6)
    forced = sequence_log_probs(MODEL, params, PROMPTS, greedy.tokens, temperature=1e-10)
    assert finite(forced.log_probs, forced.entropies)
    # Under jit the ids cannot be checked: they are clipped into [0, VOCAB - 1].
    out_of_range = jnp.asarray(PROMPTS).at[0, 1].set(VOCAB + 5).at[1, 0].set(-3)
    clipped = jnp.clip(out_of_range, 0, VOCAB - 1)
    np.testing.assert_array_equal(run(out_of_range, jax.random.PRNGKey(1), 0.0).tokens,
                                  run(clipped, jax.random.PRNGKey(1), 0.0).tokens)
    assert finite(run(out_of_range, jax.random.PRNGKey(1), 0.0).log_probs)
