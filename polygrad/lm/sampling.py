"""Autoregressive sampling from a causal language model, and teacher-forced log-probabilities.

Generation is the episodic MDP of 003 section 5.1: the state is the prompt and the prefix, the action the
next token, drawn from pi_theta(. | x, y_<t) (eq. 86) until EOS or ``max_new_tokens``. Batches are
``[B, T]``; the response mask is 1 on every generated token up to and including the first EOS, 0 after
it (those positions hold PAD). ``sample`` runs under ``lax.scan`` with a key/value cache (one model call
per token on a ``[B, 1]`` slice), or, with ``use_cache=False``, recomputes the whole prefix at every step
(the slow reference the benchmark compares against). Both return the per-token log-probabilities that the
policy-gradient losses need as ``logp_old``; ``sequence_log_probs`` recomputes them teacher-forced, which
is what every update does, and the two agree (tests/polygrad/test_sampling.py).

Arguments are checked at once with a clear ``ValueError`` (``polygrad.validate``): ``max_new_tokens`` a
positive integer, ``temperature`` a finite number >= 0 (NaN is refused). Token ids must lie in
``[0, vocab_size)``: concrete ids outside are refused; ids that are traced (under ``jit``) cannot be
checked and are clipped into ``[0, vocab_size - 1]`` (an embedding lookup out of range would give NaN).
Log-probabilities and entropies are computed in float32 or wider (the logits' dtype if wider, so float64
under ``jax_enable_x64`` with float64 parameters); a temperature so small that ``logits / temperature``
overflows still gives finite results (the logits are shifted by their maximum first, so the argmax gets
log-probability 0 and the rest -inf): sampling at temperature 1e-10 is greedy decoding.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from polygrad import validate
from polygrad.lm.transformer import TransformerLM


class Completion(NamedTuple):
    """A batch of sampled responses: ``tokens [B, L]`` int32 (PAD after EOS), per-token ``log_probs``
    and ``entropies [B, L]`` of the distribution sampled from (0 where masked), ``mask [B, L]`` (float32,
    or float64 with float64 logits), ``lengths [B]`` int32 (tokens up to and including EOS) and
    ``truncated [B]`` (no EOS within L)."""

    tokens: jax.Array
    log_probs: jax.Array
    entropies: jax.Array
    mask: jax.Array
    lengths: jax.Array
    truncated: jax.Array


def response_mask(responses: jax.Array, eos_id: int) -> jax.Array:
    """``[B, L]`` mask in the default float dtype: 1 up to and including the first ``eos_id`` of each row,
    then 0."""
    chex.assert_rank(responses, 2)
    is_eos = (responses == eos_id).astype(jnp.int32)
    eos_before = jnp.cumsum(is_eos, axis=1) - is_eos
    return (eos_before == 0).astype(jnp.result_type(float))


def _check_tokens(name: str, tokens: jax.Array, vocab_size: int) -> jax.Array:
    """Token ids in [0, vocab_size): concrete ids outside are refused, traced ids are clipped."""
    if not isinstance(tokens, jax.core.Tracer):
        ids = np.asarray(tokens)
        if not np.issubdtype(ids.dtype, np.integer):
            validate.fail(f"{name} must hold integer token ids, got dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= vocab_size)
        if np.any(bad):
            validate.fail(
                f"{name} holds token ids outside [0, {vocab_size}): {sorted(set(ids[bad].tolist()))[:8]}")
    return jnp.clip(tokens, 0, vocab_size - 1)


def _stats_dtype(logits: jax.Array):
    """float32, or the logits' dtype if it is wider (float64)."""
    return jnp.promote_types(logits.dtype, jnp.float32)


def _token_statistics(logits, tokens):
    """Log-probabilities of ``tokens`` and entropies under ``softmax(logits)`` (last axis).

    Tokens of probability 0 contribute 0 to the entropy (no 0 * -inf).
    """
    log_p = jax.nn.log_softmax(logits.astype(_stats_dtype(logits)), axis=-1)
    chosen = jnp.take_along_axis(log_p, tokens[..., None], axis=-1)[..., 0]
    p = jnp.exp(log_p)
    zero = jnp.zeros((), log_p.dtype)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.where(p > 0, log_p, zero), zero), axis=-1)
    return chosen, entropy


def _scaled(logits, temperature: float):
    """``logits / temperature`` (unchanged for greedy, temperature 0), computed from the logits shifted by
    their maximum so that a tiny temperature cannot produce inf - inf: the maximum maps to 0, the rest to
    finite negatives or -inf. The softmax is unchanged by the shift."""
    if temperature == 0.0:
        return logits
    logits = logits.astype(_stats_dtype(logits))
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    return shifted / temperature


def _check_temperature(temperature) -> float:
    """A concrete, finite temperature >= 0 as a Python float (NaN and inf are refused)."""
    if isinstance(temperature, jax.core.Tracer):
        validate.fail("temperature must be a concrete Python number, not a traced value")
    return float(validate.non_negative("temperature", float(temperature)))


SAMPLER_DTYPES = ("float64", "float32", "bfloat16", "float16")


def params_dtype(params) -> jnp.dtype:
    """The floating dtype of a parameter tree (its widest floating leaf; float32 if it has none)."""
    dtypes = [x.dtype for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.result_type(*dtypes) if dtypes else jnp.dtype(jnp.float32)


def cast_params(params, dtype) -> object:
    """A copy of ``params`` with every floating leaf cast to ``dtype`` (e.g. "bfloat16").

    A sampler built from it runs its matmuls, attention and KV cache in ``dtype`` (flax layers follow
    their parameters' dtype; LayerNorm reduces in float32): the low-precision rollout engine of the
    rollout-trainer mismatch (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy
    RL Training"; inference engines sample in bf16 while the trainer computes in fp32). Log-probabilities
    are still read in float32 or wider from its logits (``_stats_dtype``).
    """
    validate.one_of("sampler dtype", str(jnp.dtype(dtype)), SAMPLER_DTYPES)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def sample(model: TransformerLM, params, key: jax.Array, prompts: jax.Array, max_new_tokens: int,
           temperature: float = 1.0, eos_id: int = 3, pad_id: int = 0, use_cache: bool = True) -> Completion:
    """Sample ``max_new_tokens`` tokens after each prompt ``[B, P]``, stopping each row at its first EOS.

    ``temperature`` (a Python number, finite and >= 0) divides the logits; 0 means greedy decoding, and a
    tiny positive temperature (1e-10) samples the argmax as well (ties aside) with finite statistics. The
    log-probabilities and entropies are those of the distribution sampled from
    (``softmax(logits / temperature)``; the unscaled policy when greedy). ``max_new_tokens`` is an integer
    >= 1 and ``model.max_len`` must be at least ``P + max_new_tokens``. Prompt ids outside the vocabulary
    are refused (concrete prompts) or clipped (traced prompts); see the module docstring.
    """
    chex.assert_rank(prompts, 2)
    batch, prompt_len = prompts.shape
    validate.integer("max_new_tokens", max_new_tokens, minimum=1)
    temperature = _check_temperature(temperature)
    if prompt_len + max_new_tokens > model.max_len:
        raise ValueError(f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"max_len {model.max_len}")
    prompts = _check_tokens("prompts", prompts, model.vocab_size)

    def choose(step_key, logits):
        logits = _scaled(logits, temperature)
        if temperature == 0.0:
            token = jnp.argmax(logits, axis=-1)
        else:
            token = jax.random.categorical(step_key, logits, axis=-1)
        log_prob, entropy = _token_statistics(logits, token)
        return token.astype(jnp.int32), log_prob, entropy

    def record(done, token, log_prob, entropy):
        active = ~done
        token = jnp.where(active, token, pad_id)
        zero = jnp.zeros((), log_prob.dtype)
        out = (token, jnp.where(active, log_prob, zero), jnp.where(active, entropy, zero),
               active.astype(log_prob.dtype))
        return done | (token == eos_id), out

    keys = jax.random.split(key, max_new_tokens)
    done0 = jnp.zeros((batch,), bool)
    if use_cache:
        prefill = model.apply(params, prompts, cache=model.init_cache(batch, params_dtype(params)), start=0)

        def step(carry, inputs):
            cache, logits, done = carry
            step_key, t = inputs
            done, out = record(done, *choose(step_key, logits))
            nxt = model.apply(params, out[0][:, None], cache=cache, start=prompt_len + t)
            return (nxt.cache, nxt.logits[:, -1], done), out

        carry0 = (prefill.cache, prefill.logits[:, -1], done0)
        _, outs = jax.lax.scan(step, carry0, (keys, jnp.arange(max_new_tokens)))
    else:
        buffer0 = jnp.concatenate([prompts, jnp.full((batch, max_new_tokens), pad_id, prompts.dtype)], axis=1)

        def step(carry, inputs):
            buffer, done = carry
            step_key, t = inputs
            logits = model.apply(params, buffer).logits
            logits = jax.lax.dynamic_index_in_dim(logits, prompt_len + t - 1, axis=1, keepdims=False)
            done, out = record(done, *choose(step_key, logits))
            buffer = jax.lax.dynamic_update_slice(buffer, out[0][:, None], (0, prompt_len + t))
            return (buffer, done), out

        (_, done), outs = jax.lax.scan(step, (buffer0, done0), (keys, jnp.arange(max_new_tokens)))
    tokens, log_probs, entropies, mask = (jnp.swapaxes(x, 0, 1) for x in outs)
    lengths = jnp.sum(mask, axis=1).astype(jnp.int32)
    truncated = ~jnp.any(tokens == eos_id, axis=1)
    return Completion(tokens, log_probs, entropies, mask, lengths, truncated)


class TeacherForced(NamedTuple):
    """Per response token ``[B, L]``: log-probability, entropy of the policy at that state, and the value
    head's V(s_t) of the state before the token (zeros without a value head)."""

    log_probs: jax.Array
    entropies: jax.Array
    values: jax.Array


def sequence_log_probs(model: TransformerLM, params, prompts: jax.Array, responses: jax.Array,
                       temperature: float = 1.0) -> TeacherForced:
    """Teacher-forced statistics of ``responses [B, L]`` after ``prompts [B, P]`` in one forward pass.

    The distribution at response position j is read from the logits at column ``P - 1 + j``.
    ``temperature`` is a finite number >= 0; 0 reads the unscaled policy (what greedy sampling reports).
    Token ids outside the vocabulary are refused (concrete) or clipped (traced); see the module docstring.
    """
    chex.assert_rank([prompts, responses], 2)
    chex.assert_equal_shape_prefix([prompts, responses], 1)
    temperature = _check_temperature(temperature)
    prompts = _check_tokens("prompts", prompts, model.vocab_size)
    responses = _check_tokens("responses", responses, model.vocab_size)
    prompt_len, length = prompts.shape[1], responses.shape[1]
    out = model.apply(params, jnp.concatenate([prompts, responses], axis=1))
    logits = _scaled(out.logits[:, prompt_len - 1: prompt_len - 1 + length], temperature)
    log_probs, entropies = _token_statistics(logits, responses)
    return TeacherForced(log_probs, entropies, out.values[:, prompt_len - 1: prompt_len - 1 + length])
