"""Returns, TD errors, n-step, lambda-returns and GAE against a plain-Python reference and identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polygrad import returns


@pytest.fixture(autouse=True, scope="module")
def _no_implicit_rank_promotion():
    """Every test here (and every module fixture) runs with jax_numpy_rank_promotion="raise"."""
    with jax.numpy_rank_promotion("raise"):
        yield

GAMMA = 0.9


def reference_n_step(rewards, next_values, terminated, truncated, gamma, n):
    """Loop over every start step, walking forward inside its episode (independent of the library)."""
    horizon = len(rewards)
    out = np.zeros(horizon)
    for t in range(horizon):
        g, discount = 0.0, 1.0
        for k in range(n):
            i = t + k
            g += discount * rewards[i]
            discount *= gamma
            ended = terminated[i] or truncated[i] or i == horizon - 1 or k == n - 1
            if ended:
                if not terminated[i]:
                    g += discount * next_values[i]
                break
        out[t] = g
    return out


def reference_lambda_return(rewards, next_values, terminated, truncated, gamma, lam):
    """Weighted average of n-step returns, (1 - lam) sum_n lam^(n-1) G^(n), with the tail weight on
    the longest return that stays inside the episode and the batch (Sutton and Barto eq. 12.3)."""
    horizon = len(rewards)
    out = np.zeros(horizon)
    for t in range(horizon):
        # The longest window: up to the episode end or the batch end.
        longest = 1
        while True:
            i = t + longest - 1
            if terminated[i] or truncated[i] or i == horizon - 1:
                break
            longest += 1
        g = 0.0
        for n in range(1, longest):
            g += (
                (1 - lam)
                * lam ** (n - 1)
                * reference_n_step(rewards, next_values, terminated, truncated, gamma, n)[t]
            )
        g += (
            lam ** (longest - 1)
            * reference_n_step(rewards, next_values, terminated, truncated, gamma, longest)[t]
        )
        out[t] = g
    return out


@st.composite
def episodes(draw, max_len=12):
    """A batch of one time-major stream with random episode boundaries and consistent values."""
    horizon = draw(st.integers(1, max_len))
    floats = st.floats(-3, 3, allow_nan=False, width=32)
    rewards = np.array(draw(st.lists(floats, min_size=horizon, max_size=horizon)), np.float32)
    values = np.array(draw(st.lists(floats, min_size=horizon, max_size=horizon)), np.float32)
    final_values = np.array(draw(st.lists(floats, min_size=horizon, max_size=horizon)), np.float32)
    ends = draw(st.lists(st.sampled_from([0, 0, 0, 1, 2]), min_size=horizon, max_size=horizon))
    terminated = np.array([e == 1 for e in ends])
    truncated = np.array([e == 2 for e in ends])
    done = terminated | truncated
    # next_values[t] is V(s_{t+1}) = values[t + 1] unless step t ended the episode (then the value of the
    # final observation) or is the last step of the batch.
    next_values = np.where(done, final_values, np.append(values[1:], final_values[-1])).astype(np.float32)
    return rewards, values, next_values, terminated, truncated


@settings(max_examples=30, deadline=None)
@given(episodes(), st.integers(1, 14))
def test_n_step_matches_reference(batch, n):
    rewards, _, next_values, terminated, truncated = batch
    got = returns.n_step_returns(rewards, next_values, terminated, truncated, GAMMA, n)
    want = reference_n_step(rewards, next_values, terminated, truncated, GAMMA, n)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(episodes(), st.floats(0.0, 1.0))
def test_lambda_return_is_weighted_average_of_n_step_returns(batch, lam):
    rewards, _, next_values, terminated, truncated = batch
    got = returns.lambda_returns(rewards, next_values, terminated, truncated, GAMMA, lam)
    want = reference_lambda_return(rewards, next_values, terminated, truncated, GAMMA, lam)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(episodes(), st.floats(0.0, 1.0))
def test_gae_plus_values_is_lambda_return(batch, lam):
    rewards, values, next_values, terminated, truncated = batch
    adv = returns.gae(rewards, values, next_values, terminated, truncated, GAMMA, lam)
    lam_ret = returns.lambda_returns(rewards, next_values, terminated, truncated, GAMMA, lam)
    np.testing.assert_allclose(adv + values, lam_ret, rtol=1e-4, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(episodes())
def test_gae_lambda_one_is_monte_carlo_minus_values(batch):
    rewards, values, next_values, terminated, truncated = batch
    adv = returns.gae(rewards, values, next_values, terminated, truncated, GAMMA, 1.0)
    mc = returns.discounted_returns(rewards, terminated, truncated, GAMMA, next_values)
    np.testing.assert_allclose(adv, mc - values, rtol=1e-4, atol=1e-4)
    # n-step with n >= T is the same Monte-Carlo return.
    long = returns.n_step_returns(rewards, next_values, terminated, truncated, GAMMA, len(rewards))
    np.testing.assert_allclose(long, mc, rtol=1e-4, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(episodes())
def test_gae_lambda_zero_is_td_error(batch):
    rewards, values, next_values, terminated, truncated = batch
    adv = returns.gae(rewards, values, next_values, terminated, truncated, GAMMA, 0.0)
    td = returns.td_errors(rewards, values, next_values, terminated, GAMMA)
    np.testing.assert_allclose(adv, td, rtol=1e-5, atol=1e-5)
    one_step = returns.n_step_returns(rewards, next_values, terminated, truncated, GAMMA, 1)
    np.testing.assert_allclose(one_step - values, td, rtol=1e-5, atol=1e-5)


def test_terminated_and_truncated_are_kept_apart():
    # Two episodes in one stream: the first ends at t=1, the second runs to the end of the batch.
    rewards = jnp.array([1.0, 1.0, 1.0, 1.0])
    values = jnp.zeros(4)
    next_values = jnp.array([0.0, 10.0, 0.0, 20.0])  # V(final obs) = 10 at t=1; V(s_4) = 20
    no_end = jnp.zeros(4, bool)
    ended = jnp.array([False, True, False, False])
    terminal = returns.discounted_returns(rewards, ended, no_end, GAMMA, next_values)
    cut = returns.discounted_returns(rewards, no_end, ended, GAMMA, next_values)
    np.testing.assert_allclose(terminal, [1.9, 1.0, 1 + 0.9 * (1 + 18), 1 + 18], rtol=1e-6)
    np.testing.assert_allclose(cut, [1 + 0.9 * 10, 10.0, 1 + 0.9 * 19, 19.0], rtol=1e-6)
    # The GAE trace does not cross the boundary either way: the advantage at t=1 only sees its own step.
    for term, trunc, want in [(ended, no_end, 1.0), (no_end, ended, 1.0 + 0.9 * 10)]:
        adv = returns.gae(rewards, values, next_values, term, trunc, GAMMA, 0.95)
        np.testing.assert_allclose(adv[1], want, rtol=1e-6)


def test_episode_of_length_one():
    # Every step is its own terminated episode: returns are the rewards, whatever the values say.
    rewards = jnp.array([[1.0], [2.0], [3.0]])
    ones = jnp.ones_like(rewards, bool)
    zeros = jnp.zeros_like(rewards, bool)
    big = jnp.full_like(rewards, 100.0)
    np.testing.assert_allclose(returns.discounted_returns(rewards, ones, zeros, GAMMA, big), rewards)
    np.testing.assert_allclose(returns.gae(rewards, big, big, ones, zeros, GAMMA, 0.95), rewards - 100.0)
    single = returns.gae(rewards[:1], big[:1], big[:1], zeros[:1], zeros[:1], GAMMA, 0.95)
    np.testing.assert_allclose(single, 1.0 + 0.9 * 100 - 100, rtol=1e-6)


def test_jit_and_vmap_agree(maybe_jit):
    key = jax.random.PRNGKey(0)
    k1, k2, k3 = jax.random.split(key, 3)
    rewards = jax.random.normal(k1, (7, 5))
    values = jax.random.normal(k2, (7, 5))
    next_values = jnp.concatenate([values[1:], jnp.zeros((1, 5))])
    terminated = jax.random.bernoulli(k3, 0.2, (7, 5))
    truncated = jnp.zeros((7, 5), bool)
    fn = maybe_jit(lambda *a: returns.gae(*a, GAMMA, 0.95))
    batched = fn(rewards, values, next_values, terminated, truncated)
    per_column = jax.vmap(
        lambda r, v, nv, te, tr: returns.gae(r, v, nv, te, tr, GAMMA, 0.95), in_axes=1, out_axes=1
    )(rewards, values, next_values, terminated, truncated)
    np.testing.assert_allclose(batched, per_column, rtol=1e-6, atol=1e-6)


def test_gradients_of_gae_with_respect_to_values():
    # dA_t/dV(s_t) = -1 and the gradient is finite everywhere.
    rewards = jnp.array([1.0, 0.0, 1.0])
    flags = jnp.zeros(3, bool)

    def total(values):
        nv = jnp.append(values[1:], 0.0)
        return returns.gae(rewards, values, nv, flags, flags, GAMMA, 0.5)[0]

    grad = jax.grad(total)(jnp.array([0.5, 0.2, 0.1]))
    # A_0 = d0 + 0.45 d1 + 0.2025 d2, d_t = r_t + 0.9 V_{t+1} - V_t.
    np.testing.assert_allclose(grad, [-1.0, 0.9 - 0.45, 0.45 * 0.9 - 0.2025], rtol=1e-6)


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="n >= 1"):
        returns.n_step_returns(jnp.ones(3), jnp.ones(3), jnp.zeros(3), jnp.zeros(3), GAMMA, 0)
    with pytest.raises(AssertionError):
        returns.gae(jnp.ones(3), jnp.ones(4), jnp.ones(3), jnp.zeros(3), jnp.zeros(3), GAMMA, 0.9)
