"""A small causal transformer language model with an optional value head (Flax linen).

The policy pi_theta(y_t | x, y_<t) of 003 eq. (86): token logits at every position of a ``[B, T]`` token
array; with ``value_head=True`` also a per-position scalar V(s_t) for a token-level critic (PPO with GAE,
002 and 003 section 4). Pre-LayerNorm blocks, learned absolute positions, GELU MLP.

One code path serves the full forward pass and cached decoding: ``model.apply(params, tokens)`` attends
causally within ``tokens``; ``model.apply(params, tokens, cache=cache, start=s)`` writes the keys and values
of ``tokens`` (positions ``s .. s + S - 1``) into the cache and attends to every cached position up to its
own, so a prompt is prefilled with ``start=0`` and each new token is decoded with ``S = 1``. Padding
tokens are ordinary tokens to the model (prompts are left-padded, so that every response starts at the
same column); they are never masked out.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp


class KVCache(NamedTuple):
    """Keys and values of every layer, each ``[num_layers, B, max_len, num_heads, head_dim]``."""

    keys: jax.Array
    values: jax.Array


class LMOutput(NamedTuple):
    """``logits [B, S, V]``, ``values [B, S]`` (zeros without a value head), the updated cache or None."""

    logits: jax.Array
    values: jax.Array
    cache: KVCache | None


class CausalSelfAttention(nn.Module):
    num_heads: int
    head_dim: int

    @nn.compact
    def __call__(self, x, positions, layer_cache):
        batch, length, _ = x.shape
        qkv = nn.Dense(3 * self.num_heads * self.head_dim, name="qkv")(x)
        q, k, v = jnp.split(qkv.reshape(batch, length, 3 * self.num_heads, self.head_dim), 3, axis=2)
        if layer_cache is None:
            keys, values, key_positions = k, v, positions
            new_cache = None
        else:
            cached_k, cached_v = layer_cache
            start = positions[0]
            keys = jax.lax.dynamic_update_slice(cached_k, k.astype(cached_k.dtype), (0, start, 0, 0))
            values = jax.lax.dynamic_update_slice(cached_v, v.astype(cached_v.dtype), (0, start, 0, 0))
            key_positions = jnp.arange(cached_k.shape[1])
            new_cache = (keys, values)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, keys) / jnp.sqrt(self.head_dim).astype(x.dtype)
        causal = key_positions[None, :] <= positions[:, None]  # [S, K]
        scores = jnp.where(causal[None, None], scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, values).reshape(batch, length, -1)
        return nn.Dense(x.shape[-1], name="out")(out), new_cache


class Block(nn.Module):
    num_heads: int
    head_dim: int
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, x, positions, layer_cache):
        attended, new_cache = CausalSelfAttention(self.num_heads, self.head_dim)(
            nn.LayerNorm()(x), positions, layer_cache)
        x = x + attended
        hidden = nn.gelu(nn.Dense(self.mlp_ratio * x.shape[-1])(nn.LayerNorm()(x)))
        return x + nn.Dense(x.shape[-1])(hidden), new_cache


class TransformerLM(nn.Module):
    """Causal LM over ``vocab_size`` tokens, sequences up to ``max_len``.

    ``__call__(tokens [B, S] int, cache=None, start=0) -> LMOutput``; see the module docstring for the
    cache. ``d_model`` must be divisible by ``num_heads``.
    """

    vocab_size: int
    max_len: int
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    value_head: bool = False

    def setup(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        self.token_embedding = nn.Embed(self.vocab_size, self.d_model)
        self.position_embedding = nn.Embed(self.max_len, self.d_model)
        self.blocks = [Block(self.num_heads, self.d_model // self.num_heads) for _ in range(self.num_layers)]
        self.final_norm = nn.LayerNorm()
        self.lm_head = nn.Dense(self.vocab_size)
        if self.value_head:
            self.value_out = nn.Dense(1)

    def __call__(self, tokens: jax.Array, cache: KVCache | None = None, start=0) -> LMOutput:
        chex.assert_rank(tokens, 2)
        positions = start + jnp.arange(tokens.shape[1])
        x = self.token_embedding(tokens) + self.position_embedding(positions)[None]
        new_keys, new_values = [], []
        for layer, block in enumerate(self.blocks):
            layer_cache = None if cache is None else (cache.keys[layer], cache.values[layer])
            x, updated = block(x, positions, layer_cache)
            if updated is not None:
                new_keys.append(updated[0])
                new_values.append(updated[1])
        x = self.final_norm(x)
        logits = self.lm_head(x)
        values = self.value_out(x)[..., 0] if self.value_head else jnp.zeros(tokens.shape, x.dtype)
        new_cache = None if cache is None else KVCache(jnp.stack(new_keys), jnp.stack(new_values))
        return LMOutput(logits, values, new_cache)

    def init_cache(self, batch_size: int, dtype=jnp.float32) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_len`` tokens."""
        shape = (self.num_layers, batch_size, self.max_len, self.num_heads, self.d_model // self.num_heads)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def init_params(model: TransformerLM, key: jax.Array):
    """Parameters of ``model`` (a pytree), initialised from ``key`` on a dummy ``[1, max_len]`` batch."""
    return model.init(key, jnp.zeros((1, model.max_len), jnp.int32))
