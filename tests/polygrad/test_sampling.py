"""Cached autoregressive sampling: log-probs equal a full forward pass; EOS handling; greedy; masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polygrad.lm.sampling import response_mask, sample, sequence_log_probs
from polygrad.lm.transformer import TransformerLM, init_params


@pytest.fixture(autouse=True, scope="module")
def _no_implicit_rank_promotion():
    """Every test here (and every module fixture) runs with jax_numpy_rank_promotion="raise"."""
    with jax.numpy_rank_promotion("raise"):
        yield

EOS, PAD = 3, 0
MODEL = TransformerLM(vocab_size=8, max_len=16, d_model=32, num_layers=2, num_heads=4)
PROMPTS = jnp.asarray([[1, 4, 5, 2], [0, 1, 6, 2], [1, 7, 7, 2]], jnp.int32)


@pytest.fixture(scope="module")
def params():
    return init_params(MODEL, jax.random.PRNGKey(0))


def _eos_heavy(params, bias):
    """The same network with the EOS logit raised by ``bias`` (to make stopping frequent)."""
    head = params["params"]["lm_head"]
    return {"params": {**params["params"], "lm_head": {**head, "bias": head["bias"].at[EOS].add(bias)}}}


def test_response_mask():
    responses = jnp.asarray([[4, 3, 0, 0], [3, 0, 0, 0], [4, 5, 6, 7], [4, 3, 4, 3]])
    np.testing.assert_array_equal(response_mask(responses, EOS),
                                  [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_cached_log_probs_equal_full_forward_pass(params, temperature):
    heavy = _eos_heavy(params, 1.5)
    fn = jax.jit(lambda p, k: sample(MODEL, p, k, PROMPTS, 10, temperature=temperature))
    out = fn(heavy, jax.random.PRNGKey(1))
    forced = sequence_log_probs(MODEL, heavy, PROMPTS, out.tokens, temperature=temperature)
    mask = np.asarray(out.mask)
    np.testing.assert_allclose(out.log_probs, forced.log_probs * mask, atol=2e-5)
    np.testing.assert_allclose(out.entropies, forced.entropies * mask, atol=2e-5)
    np.testing.assert_array_equal(mask, response_mask(out.tokens, EOS))


def test_cache_and_no_cache_sample_the_same_tokens(params):
    key = jax.random.PRNGKey(2)
    cached = jax.jit(lambda p: sample(MODEL, p, key, PROMPTS, 8))(params)
    uncached = jax.jit(lambda p: sample(MODEL, p, key, PROMPTS, 8, use_cache=False))(params)
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)
    np.testing.assert_allclose(cached.log_probs, uncached.log_probs, atol=2e-5)


def test_eos_stops_and_pads(params):
    out = jax.jit(lambda p, k: sample(MODEL, p, k, jnp.tile(PROMPTS, (20, 1)), 12))(
        params, jax.random.PRNGKey(3))
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    assert 0 < out.truncated.mean() < 1 and np.all(out.truncated == ~np.any(tokens == EOS, axis=1))
    for row, m, length in zip(tokens, mask, np.asarray(out.lengths), strict=True):
        eos = np.flatnonzero(row == EOS)
        end = eos[0] + 1 if len(eos) else 12
        assert length == end and m.sum() == end and np.all(m[:end] == 1)
        assert len(eos) <= 1 and np.all(row[end:] == PAD)
    assert np.all(out.log_probs[mask == 0] == 0) and np.all(out.log_probs[mask == 1] < 0)


def test_greedy_is_argmax_and_deterministic(params):
    fn = jax.jit(lambda p, k: sample(MODEL, p, k, PROMPTS, 6, temperature=0.0))
    a, b = fn(params, jax.random.PRNGKey(4)), fn(params, jax.random.PRNGKey(5))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    logits = MODEL.apply(params, jnp.concatenate([PROMPTS, a.tokens], 1)).logits[:, 3:9]
    greedy = np.asarray(jnp.argmax(logits, -1))
    mask = np.asarray(a.mask) == 1
    np.testing.assert_array_equal(np.asarray(a.tokens)[mask], greedy[mask])
    forced = sequence_log_probs(MODEL, params, PROMPTS, a.tokens)
    np.testing.assert_allclose(a.log_probs, forced.log_probs * a.mask, atol=2e-5)


def test_bad_arguments(params):
    with pytest.raises(ValueError, match="max_len"):
        sample(MODEL, params, jax.random.PRNGKey(0), PROMPTS, 13)
    with pytest.raises(ValueError, match="temperature"):
        sample(MODEL, params, jax.random.PRNGKey(0), PROMPTS, 4, temperature=-1.0)
