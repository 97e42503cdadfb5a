"""The small causal transformer: shapes, causality, cached decoding equals the full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polygrad.lm.transformer import TransformerLM, init_params

MODEL = TransformerLM(vocab_size=11, max_len=12, d_model=32, num_layers=2, num_heads=4, value_head=True)


@pytest.fixture(scope="module")
def params():
    return init_params(MODEL, jax.random.PRNGKey(0))


def test_shapes_and_value_head(params):
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 12), 0, 11)
    out = MODEL.apply(params, tokens)
    assert out.logits.shape == (3, 12, 11) and out.values.shape == (3, 12) and out.cache is None
    assert out.logits.dtype == jnp.float32
    plain = TransformerLM(vocab_size=11, max_len=12, d_model=32)
    out = plain.apply(init_params(plain, jax.random.PRNGKey(0)), tokens)
    np.testing.assert_array_equal(out.values, 0.0)


def test_causal(params):
    """Changing a token changes no logit at an earlier position."""
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, 11)
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 11)
    a, b = MODEL.apply(params, tokens).logits, MODEL.apply(params, changed).logits
    np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-5)
    assert float(jnp.max(jnp.abs(a[:, 7:] - b[:, 7:]))) > 1e-4


def test_cached_decoding_matches_full_pass(params):
    """Prefill 5 tokens, then feed the rest one at a time: same logits and values as one full pass."""
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 12), 0, 11)
    full = MODEL.apply(params, tokens)
    step = jax.jit(lambda p, t, c, s: MODEL.apply(p, t, cache=c, start=s))
    out = step(params, tokens[:, :5], MODEL.init_cache(2), 0)
    logits, values, cache = [out.logits], [out.values], out.cache
    for s in range(5, 12):
        out = step(params, tokens[:, s: s + 1], cache, s)
        logits.append(out.logits)
        values.append(out.values)
        cache = out.cache
    np.testing.assert_allclose(jnp.concatenate(logits, 1), full.logits, atol=1e-4)
    np.testing.assert_allclose(jnp.concatenate(values, 1), full.values, atol=1e-4)


def test_bad_config():
    with pytest.raises(ValueError, match="divisible"):
        init_params(TransformerLM(vocab_size=5, max_len=4, d_model=30, num_heads=4), jax.random.PRNGKey(0))
