"""Exact analysis of tabular sequence models: the ground truth of the GRPO family in the LM setting.

`polygrad.tabular` solves finite MDPs exactly; this module does the same for the language-model setting
of 003 section 5.1 (eq. 86: tokens as actions, prefixes as states, deterministic concatenation until EOS
or a maximum length). The policy is *tabular*: one logit vector per prefix,

    pi(y_t | x, y_<t) = softmax(logits[x, prefix(y_<t)])_{y_t},    logits  [S, V]  or  [C, S, V],

over a vocabulary of V tokens (optionally one of them EOS) and responses of at most L tokens, so that
every response can be enumerated (R of them), and with it every expectation over responses, and over
groups of G responses (R^G tuples, or the far fewer multisets), exactly. C contexts (prompts) each have
their own table and their own rewards `[C, R]` (correctness, possibly length-dependent).

Layout (`enumerate_responses`): with n content tokens (all tokens but EOS), the S = sum_{k<L} n^k
prefixes are ordered by length, then lexicographically (prefix 0 is the empty prompt-only state); a
response that ends with EOS after k content tokens has the id of its content prefix, and the n^L
responses truncated at L tokens follow them (R = S + n^L). Without EOS every response has exactly L
tokens (R = n^L). A response's length T counts its EOS token, which is scored like any other token
(as in TRL and verl).

What is computed exactly: per-token and per-response log-probs, J = E[R] (003 eq. 87 without KL),
expected lengths (overall, of correct and of incorrect responses), per-prefix and sequence entropies,
KL(pi || pi_ref), the probability of reaching each prefix, and, for any `losses.LossConfig`, the
*expected update* E_{groups ~ pi_old^G}[grad_logits loss(group)] of polygrad's own `losses.policy_loss`
on the group's `[G, L]` batch (group advantages from the preset's estimator, 003 eq. 88-91): exactly,
by enumerating all multisets of G responses with their multinomial probabilities (`expected_update`,
`update_moments`), or by Monte Carlo with a standard error (`sampled_update`). The expected first-order
change of any statistic f after one step of size eta is then -eta grad f . update (`first_order_change`).

Every function is pure; the ones taking arrays are jittable (`space`, configs and sizes are static or
pytrees) and follow the dtype of `logits`. Under `jax.jit`, pass `rewards` and `groups` as arguments
rather than closing over them: XLA constant-folds work on closed-over arrays at compile time, which for
hundreds of thousands of groups takes minutes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from polygrad import losses

# --------------------------------------------------------------------------------------------------------
# The response space.
# --------------------------------------------------------------------------------------------------------


@struct.dataclass
class ResponseSpace:
    """Every response of a tabular sequence model, padded to `[R, L]` (see the module docstring).

    tokens: `[R, L]` int32 token ids (EOS last in a terminated response; 0 on padding).
    mask: `[R, L]` bool, True on the response's tokens (EOS included).
    prefixes: `[R, L]` int32 row of the logit table that emits each token (the prefix y_<t); 0 on padding.
    lengths: `[R]` int32 number of tokens T(y), EOS included.
    terminated: `[R]` bool, True if the response ended with EOS (False: truncated at L).
    prefix_parent, prefix_token: `[S]` int32 parent prefix and last token of each prefix (0 and -1 for
      the empty prefix).
    num_tokens (V), max_length (L), eos (EOS id or None), num_prefixes (S), num_responses (R): static.
    """

    tokens: jax.Array
    mask: jax.Array
    prefixes: jax.Array
    lengths: jax.Array
    terminated: jax.Array
    prefix_parent: jax.Array
    prefix_token: jax.Array
    num_tokens: int = struct.field(pytree_node=False)
    max_length: int = struct.field(pytree_node=False)
    eos: int | None = struct.field(pytree_node=False)
    num_prefixes: int = struct.field(pytree_node=False)
    num_responses: int = struct.field(pytree_node=False)

    @property
    def content_tokens(self) -> tuple[int, ...]:
        """The token ids other than EOS, in order (a prefix is a sequence of these)."""
        return tuple(t for t in range(self.num_tokens) if t != self.eos)


def enumerate_responses(num_tokens: int, max_length: int, eos: int | None = 0) -> ResponseSpace:
    """All responses of at most `max_length` tokens over `num_tokens` tokens, one of them `eos`.

    With n = num_tokens - 1 content tokens: S = sum_{k<L} n^k prefixes, R = S + n^L responses (k content
    tokens then EOS, k < L, or L content tokens, truncated). `eos=None`: no EOS, all n^L responses of
    exactly L = max_length tokens (n = num_tokens). The sizes are static Python ints; the arrays are
    built with numpy (e.g. V = 3, L = 5: S = 31, R = 63). Layout in the module docstring.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    if eos is not None and not 0 <= eos < num_tokens:
        raise ValueError(f"eos must be a token id in [0, {num_tokens}), got {eos}")
    content = [t for t in range(num_tokens) if t != eos]
    n = len(content)
    if n < 1:
        raise ValueError("the vocabulary needs at least one token besides EOS")
    offsets = np.concatenate([[0], np.cumsum([n**k for k in range(max_length + 1)])])  # offsets[k]
    num_prefixes = int(offsets[max_length])
    num_truncated = n**max_length
    num_responses = num_truncated + (num_prefixes if eos is not None else 0)
    if num_responses > 1_000_000:
        raise ValueError(f"{num_responses} responses: too many to enumerate")

    def digits(m: int, k: int) -> list[int]:
        return [(m // n ** (k - 1 - j)) % n for j in range(k)]

    def prefix_ids(ds: list[int]) -> list[int]:
        """Row of each emitting prefix of the content digits ds: ids of ds[:0], ds[:1], ..."""
        ids, m = [], 0
        for k, d in enumerate(ds):
            ids.append(int(offsets[k]) + m)
            m = m * n + d
        return ids

    L = max_length
    tokens = np.zeros((num_responses, L), np.int32)
    mask = np.zeros((num_responses, L), bool)
    prefixes = np.zeros((num_responses, L), np.int32)
    lengths = np.zeros(num_responses, np.int32)
    terminated = np.zeros(num_responses, bool)
    parent = np.zeros(num_prefixes, np.int32)
    last = np.full(num_prefixes, -1, np.int32)
    row = 0
    if eos is not None:
        for k in range(L):  # k content tokens, then EOS: the response id is the prefix id offsets[k] + m
            for m in range(n**k):
                ds = digits(m, k)
                ids = prefix_ids(ds)
                tokens[row, :k] = [content[d] for d in ds]
                tokens[row, k] = eos
                prefixes[row, : k + 1] = ids + [int(offsets[k]) + m]
                mask[row, : k + 1] = True
                lengths[row], terminated[row] = k + 1, True
                if k > 0:
                    parent[row], last[row] = ids[-1], content[ds[-1]]
                row += 1
    else:
        for k in range(1, L):
            for m in range(n**k):
                ds = digits(m, k)
                parent[int(offsets[k]) + m], last[int(offsets[k]) + m] = prefix_ids(ds)[-1], content[ds[-1]]
    for m in range(num_truncated):
        ds = digits(m, L)
        tokens[row] = [content[d] for d in ds]
        prefixes[row] = prefix_ids(ds)
        mask[row], lengths[row] = True, L
        row += 1
    return ResponseSpace(
        tokens=jnp.asarray(tokens), mask=jnp.asarray(mask), prefixes=jnp.asarray(prefixes),
        lengths=jnp.asarray(lengths), terminated=jnp.asarray(terminated),
        prefix_parent=jnp.asarray(parent), prefix_token=jnp.asarray(last), num_tokens=num_tokens,
        max_length=max_length, eos=eos, num_prefixes=num_prefixes, num_responses=num_responses,
    )


def prefix_index(space: ResponseSpace, content: tuple[int, ...] | list[int]) -> int:
    """Row of the logit table for the prefix made of these content token ids (() is the empty prefix 0).

    Also the response id of `content` followed by EOS. Python ints (static).
    """
    order = space.content_tokens
    n, k = len(order), len(content)
    if k >= space.max_length:
        raise ValueError(f"a prefix has fewer than L = {space.max_length} tokens, got {k}")
    m = 0
    for token in content:
        m = m * n + order.index(token)
    return sum(n**j for j in range(k)) + m


def _check_logits(space: ResponseSpace, logits: jax.Array) -> None:
    chex.assert_rank(logits, {2, 3})
    chex.assert_type(logits, float)
    chex.assert_axis_dimension(logits, -2, space.num_prefixes)
    chex.assert_axis_dimension(logits, -1, space.num_tokens)


def _check_per_response(space: ResponseSpace, logits: jax.Array, values: jax.Array, name: str) -> None:
    expected = logits.shape[:-2] + (space.num_responses,)
    if values.shape != expected:
        raise ValueError(f"{name} must have shape {expected} ([..., R] like the logits' contexts), "
                         f"got {values.shape}")


# --------------------------------------------------------------------------------------------------------
# Exact quantities of one policy (003 eq. 86-87).
# --------------------------------------------------------------------------------------------------------


def token_log_probs(space: ResponseSpace, logits: jax.Array) -> jax.Array:
    """log pi(y_t | x, y_<t) of every token of every response (003 eq. 86): logits `[..., S, V]` ->
    `[..., R, L]`, 0 on padding."""
    _check_logits(space, logits)
    log_pi = jax.nn.log_softmax(logits, axis=-1)
    out = log_pi[..., space.prefixes, space.tokens]
    return jnp.where(space.mask, out, jnp.zeros((), out.dtype))


def token_entropies(space: ResponseSpace, logits: jax.Array) -> jax.Array:
    """Entropy of the next-token distribution at every position of every response, `[..., R, L]`
    (0 on padding): the per-token `entropy` input of `losses.policy_loss`."""
    _check_logits(space, logits)
    log_pi = jax.nn.log_softmax(logits, axis=-1)
    entropy = -jnp.sum(jnp.exp(log_pi) * log_pi, axis=-1)  # [..., S]
    out = entropy[..., space.prefixes]
    return jnp.where(space.mask, out, jnp.zeros((), out.dtype))


def response_log_probs(space: ResponseSpace, logits: jax.Array) -> jax.Array:
    """log pi(y | x) = sum_t log pi(y_t | x, y_<t) (003 eq. 86, 103) of every response, `[..., R]`."""
    return jnp.sum(token_log_probs(space, logits), axis=-1)


def response_probs(space: ResponseSpace, logits: jax.Array) -> jax.Array:
    """pi(y | x) of every response, `[..., R]`; sums to 1 over R."""
    return jnp.exp(response_log_probs(space, logits))


def prefix_probs(space: ResponseSpace, logits: jax.Array) -> jax.Array:
    """Probability that generation reaches each prefix (emits its tokens, no EOS before), `[..., S]`.

    sum_s P(s) KL(pi(.|s) || ref(.|s)) = KL(pi(.|x) || ref(.|x)) (the chain rule of the KL): the
    state-visitation weights of 003 eq. 19 for the sequence MDP of section 5.1.
    """
    _check_logits(space, logits)
    log_pi = jax.nn.log_softmax(logits, axis=-1)
    is_root = space.prefix_token < 0
    token = jnp.maximum(space.prefix_token, 0)
    step = jnp.where(is_root, 0.0, log_pi[..., space.prefix_parent, token])  # [..., S]
    log_reach = jnp.zeros_like(step)
    for _ in range(space.max_length):  # depth <= L - 1: a fixed point after L sweeps
        log_reach = step + jnp.where(is_root, 0.0, log_reach[..., space.prefix_parent])
    return jnp.exp(log_reach)


def expected_reward(space: ResponseSpace, logits: jax.Array, rewards: jax.Array) -> jax.Array:
    """J = E_{y ~ pi(.|x)}[R(x, y)] (003 eq. 87 with beta = 0) for rewards `[..., R]`, `[...]`."""
    _check_per_response(space, logits, rewards, "rewards")
    return jnp.sum(response_probs(space, logits) * rewards, axis=-1)


def expected_length(space: ResponseSpace, logits: jax.Array, where: jax.Array | None = None) -> jax.Array:
    """E[T(y)], or E[T(y) | y in where] for a 0/1 (or weight) array `where [..., R]`; `[...]`.

    `where = rewards > 0.5` gives the expected length of correct responses, its complement that of
    incorrect ones (Liu et al., 2025, arXiv 2503.20783, section 3.1). An event of probability 0 gives 0.
    """
    probs = response_probs(space, logits)
    lengths = space.lengths.astype(probs.dtype)
    if where is None:
        return jnp.sum(probs * lengths, axis=-1)
    _check_per_response(space, logits, where, "where")
    weights = probs * jnp.asarray(where, probs.dtype)
    total = jnp.sum(weights, axis=-1)
    return jnp.sum(weights * lengths, axis=-1) / jnp.where(total > 0, total, 1.0)


def sequence_entropy(space: ResponseSpace, logits: jax.Array) -> jax.Array:
    """H(pi(.|x)) = -sum_y pi(y|x) log pi(y|x) over whole responses, `[...]`."""
    log_probs = response_log_probs(space, logits)
    return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def sequence_kl(space: ResponseSpace, logits: jax.Array, logits_ref: jax.Array) -> jax.Array:
    """KL(pi(.|x) || pi_ref(.|x)) = E_{y~pi}[log pi(y|x) - log pi_ref(y|x)] (003 eq. 87, 97), `[...]`.

    Differentiable: `jax.grad` of it is the exact gradient the KL-penalty estimators aim at.
    """
    chex.assert_equal_shape([logits, logits_ref])
    log_probs = response_log_probs(space, logits)
    return jnp.sum(jnp.exp(log_probs) * (log_probs - response_log_probs(space, logits_ref)), axis=-1)


def first_order_change(stat_fn: Callable[[jax.Array], jax.Array], logits: jax.Array, update: jax.Array,
                       step_size: float | jax.Array = 1.0) -> jax.Array:
    """d/d eta of stat_fn(logits - eta * step_size * update) at eta = 0: -step_size grad f . update.

    With `update` the expected gradient of a loss (`expected_update`), this is the expected change of
    the statistic per unit step of gradient descent on that loss (e.g. of `expected_length` of incorrect
    responses, the Dr. GRPO length drift). Same shape as `stat_fn(logits)`.
    """
    chex.assert_equal_shape([logits, update])
    direction = -jnp.asarray(step_size, logits.dtype) * update
    return jax.jvp(stat_fn, (logits,), (direction,))[1]


def sample_responses(key: jax.Array, space: ResponseSpace, logits: jax.Array, num_samples: int) -> jax.Array:
    """Response ids `[num_samples]` (int32) sampled autoregressively, token by token, from `logits [S, V]`.

    An independent path to the enumeration (used to check it): y_t ~ softmax(logits[prefix(y_<t)]) until
    EOS or L tokens. `space.tokens[ids]`, `space.mask[ids]` and `space.prefixes[ids]` give the `[N, L]`
    batch.
    """
    chex.assert_rank(logits, 2)
    _check_logits(space, logits)
    order = space.content_tokens
    n = len(order)
    digit_of = np.full(space.num_tokens, -1, np.int32)
    digit_of[list(order)] = np.arange(n)
    digit_of = jnp.asarray(digit_of)
    prefix = jnp.zeros(num_samples, jnp.int32)  # current prefix row = offsets[k] + m
    m = jnp.zeros(num_samples, jnp.int32)
    done = jnp.zeros(num_samples, bool)
    ids = jnp.zeros(num_samples, jnp.int32)
    offset = 0
    for k, step_key in enumerate(jax.random.split(key, space.max_length)):
        token = jax.random.categorical(step_key, logits[prefix]).astype(jnp.int32)
        stop = (~done) & (token == space.eos) if space.eos is not None else jnp.zeros_like(done)
        ids = jnp.where(stop, prefix, ids)
        done = done | stop
        m = jnp.where(done, m, m * n + digit_of[token])
        offset += n**k
        prefix = jnp.where(done, prefix, offset + m)
    truncated_base = space.num_prefixes if space.eos is not None else 0
    return jnp.where(done, ids, truncated_base + m).astype(jnp.int32)


# --------------------------------------------------------------------------------------------------------
# Groups of G responses and the expected update of a loss (003 eq. 88-97; the GRPO family).
# --------------------------------------------------------------------------------------------------------


class Groups(NamedTuple):
    """Groups of G response ids and their log-weights.

    indices: `[N, G]` int32 response ids.
    log_multiplicity: `[N]` float64 (numpy): log of the number of ordered G-tuples each row stands for
      (multinomial coefficient G! / prod_k m_k! of a multiset), or 0 for ordered tuples / samples.
    """

    indices: np.ndarray
    log_multiplicity: np.ndarray


def num_multisets(num_responses: int, group_size: int) -> int:
    """Number of multisets of size G from R responses, C(R + G - 1, G): what `enumerate_groups` makes."""
    return math.comb(num_responses + group_size - 1, group_size)


def enumerate_groups(num_responses: int, group_size: int, max_groups: int = 5_000_000) -> Groups:
    """Every multiset of G response ids (non-decreasing rows) with its multinomial log-multiplicity.

    The loss of a group is invariant to the order of its responses (every aggregation and group advantage
    is), so E over the R^G ordered i.i.d. tuples equals the sum over the C(R + G - 1, G) multisets of
    (G! / prod_k m_k!) prod_i pi_old(y_i) loss(group). Built with numpy; ValueError beyond `max_groups`.
    """
    if group_size < 1 or num_responses < 1:
        raise ValueError(f"need group_size >= 1 and num_responses >= 1, got {group_size}, {num_responses}")
    total = num_multisets(num_responses, group_size)
    if total > max_groups:
        raise ValueError(f"{total} groups (C({num_responses} + {group_size} - 1, {group_size})) exceed "
                         f"max_groups={max_groups}: use sampled_update")
    rows = np.arange(num_responses, dtype=np.int32)[:, None]
    for _ in range(group_size - 1):
        last = rows[:, -1]
        counts = num_responses - last  # next id in [last, R)
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        new = (np.arange(counts.sum()) - starts + np.repeat(last, counts)).astype(np.int32)
        rows = np.concatenate([np.repeat(rows, counts, axis=0), new[:, None]], axis=1)
    run = np.ones(rows.shape[0])
    log_prod_factorials = np.zeros(rows.shape[0])
    for j in range(1, group_size):
        run = np.where(rows[:, j] == rows[:, j - 1], run + 1, 1.0)
        log_prod_factorials += np.log(run)
    return Groups(rows, math.lgamma(group_size + 1) - log_prod_factorials)


class UpdateMoments(NamedTuple):
    """First and second moments of the per-group loss gradient w.r.t. the logits.

    mean: E[g], shape of the logits. second_moment: E[g * g] per coordinate (same shape), so that
    `sum(second_moment - mean**2)` over a context's table is the trace of the covariance of g (the
    variance of a one-group gradient estimate).
    """

    mean: jax.Array
    second_moment: jax.Array


class SampledUpdate(NamedTuple):
    """Monte-Carlo estimate of the expected update: the mean over groups, its standard error per
    coordinate (std of the per-group gradient / sqrt(num_groups)), and, for each given direction d,
    the mean of d . g and its standard error (`[K, ...]`, empty when no directions were given)."""

    mean: jax.Array
    stderr: jax.Array
    projection_mean: jax.Array
    projection_stderr: jax.Array


def _group_advantages(config: losses.LossConfig, advantage_fn: Callable | None, rewards: jax.Array):
    """Group advantages `[G]` of one group's rewards `[G]` (the preset's estimator, or advantage_fn)."""
    if advantage_fn is None:
        return losses.group_advantages(config, rewards[None, :])
    return advantage_fn(rewards[None, :]).reshape(-1)


def _per_group_cotangents(config, advantage_fn, normaliser, lp, lp_old, lp_ref, ent, mask, rewards, idx):
    """d loss / d (token log-probs, token entropies) `[G, L]` each, of one group of response ids `[G]`.

    The loss is polygrad's `losses.policy_loss` on the group's `[G, L]` batch: logp_new = lp[idx] (the
    variable), logp_old = lp_old[idx] (constant), advantages from the group's rewards.
    """
    group_rewards = rewards[idx]
    advantages = jax.lax.stop_gradient(_group_advantages(config, advantage_fn, group_rewards))
    logp_ref = None if lp_ref is None else lp_ref[idx]
    use_entropy = config.entropy_coef > 0

    def loss(logp_new, entropy):
        value, _ = losses.policy_loss(
            config, logp_new, lp_old[idx], advantages, mask[idx], logp_ref,
            entropy if use_entropy else None, normaliser=normaliser)
        return value

    return jax.grad(loss, argnums=(0, 1))(lp[idx], ent[idx])


def _group_gradient(space: ResponseSpace, log_pi: jax.Array, idx: jax.Array, d_lp: jax.Array,
                    d_ent: jax.Array) -> jax.Array:
    """grad_logits of one group's loss `[S, V]` from its cotangents d loss / d (logp, entropy) `[G, L]`.

    The chain rule through the softmax, written out: d log pi(y|s) / d logits[s] = onehot(y) - pi(.|s)
    and d H(s) / d logits[s] = -pi(.|s) (log pi(.|s) + H(s)), scattered into the emitting prefix rows
    (checked against `jax.vjp` of `token_log_probs` and `token_entropies` in the tests).
    """
    pi = jnp.exp(log_pi)
    entropy = -jnp.sum(pi * log_pi, axis=-1)
    rows, tokens, mask = space.prefixes[idx], space.tokens[idx], space.mask[idx]  # [G, L]
    p = pi[rows]  # [G, L, V]
    score = jax.nn.one_hot(tokens, space.num_tokens, dtype=p.dtype) - p
    d_entropy = -p * (log_pi[rows] + entropy[rows][..., None])
    contrib = d_lp[..., None] * score + d_ent[..., None] * d_entropy
    contrib = jnp.where(mask[..., None], contrib, jnp.zeros((), p.dtype))
    zeros = jnp.zeros((space.num_prefixes, space.num_tokens), p.dtype)
    return zeros.at[rows.reshape(-1)].add(contrib.reshape(-1, space.num_tokens))


def _pad_chunks(indices: jax.Array, log_weights: jax.Array, chunk_size: int):
    """Pad `[N, G]` ids and `[N]` log-weights to a multiple of chunk_size (weight 0), as `[K, c, ...]`."""
    num = indices.shape[0]
    chunk = min(chunk_size, num)
    pad = (-num) % chunk
    indices = jnp.concatenate([indices, jnp.zeros((pad,) + indices.shape[1:], indices.dtype)])
    log_weights = jnp.concatenate([log_weights, jnp.full((pad,), -jnp.inf, log_weights.dtype)])
    return indices.reshape(-1, chunk, indices.shape[-1]), log_weights.reshape(-1, chunk)


def _validate_update_inputs(space, logits, rewards, config, group_size, logits_old, logits_ref):
    _check_logits(space, logits)
    _check_per_response(space, logits, rewards, "rewards")
    if logits_old is not None:
        chex.assert_equal_shape([logits, logits_old])
    if logits_ref is not None:
        chex.assert_equal_shape([logits, logits_ref])
    elif config.kl_coef > 0:
        raise ValueError(f"kl_coef={config.kl_coef} > 0 needs logits_ref")
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")


def _one_context_update(space, logits, logits_old, logits_ref, rewards, groups_indices, log_multiplicity,
                        config, advantage_fn, normaliser, chunk_size, moments):
    """Exact E_{groups ~ pi_old^G}[grad loss] (and E[g*g] if `moments`) for one context `[S, V]`."""
    dtype = logits.dtype
    lp_old = jax.lax.stop_gradient(token_log_probs(space, logits_old))
    resp_lp_old = jnp.sum(lp_old, axis=-1)
    lp_ref = None if logits_ref is None else jax.lax.stop_gradient(token_log_probs(space, logits_ref))
    rewards = jax.lax.stop_gradient(jnp.asarray(rewards, dtype))
    mask = space.mask.astype(dtype)
    (lp, ent), vjp = jax.vjp(lambda z: (token_log_probs(space, z), token_entropies(space, z)), logits)
    log_weights = jnp.asarray(log_multiplicity, dtype) + jnp.sum(resp_lp_old[groups_indices], axis=-1)
    chunks, chunk_log_weights = _pad_chunks(groups_indices, log_weights, chunk_size)
    cotangents = jax.vmap(lambda idx: _per_group_cotangents(
        config, advantage_fn, normaliser, lp, lp_old, lp_ref, ent, mask, rewards, idx))

    if not moments:
        def body(carry, chunk):
            idx, lw = chunk
            d_lp, d_ent = cotangents(idx)
            w = jnp.exp(lw)[:, None, None]
            cot_lp, cot_ent = carry
            return (cot_lp.at[idx].add(w * d_lp), cot_ent.at[idx].add(w * d_ent)), None

        zeros = jnp.zeros_like(lp)
        (cot_lp, cot_ent), _ = jax.lax.scan(body, (zeros, zeros), (chunks, chunk_log_weights))
        mean = vjp((cot_lp, cot_ent))[0]
        return UpdateMoments(mean, jnp.zeros_like(mean))

    log_pi = jax.nn.log_softmax(logits, axis=-1)

    def body(carry, chunk):
        idx, lw = chunk
        d_lp, d_ent = cotangents(idx)
        grads = jax.vmap(lambda i, a, b: _group_gradient(space, log_pi, i, a, b))(idx, d_lp, d_ent)
        w = jnp.exp(lw)[:, None, None]
        first, second = carry
        return (first + jnp.sum(w * grads, 0), second + jnp.sum(w * grads**2, 0)), None

    zeros = jnp.zeros_like(logits)
    (first, second), _ = jax.lax.scan(body, (zeros, zeros), (chunks, chunk_log_weights))
    return UpdateMoments(first, second)


def update_moments(
    space: ResponseSpace,
    logits: jax.Array,
    rewards: jax.Array,
    config: losses.LossConfig,
    group_size: int,
    *,
    logits_old: jax.Array | None = None,
    logits_ref: jax.Array | None = None,
    advantage_fn: Callable[[jax.Array], jax.Array] | None = None,
    normaliser: float | jax.Array | None = None,
    groups: Groups | None = None,
    chunk_size: int = 2048,
    moments: bool = True,
) -> UpdateMoments:
    """Exact mean and per-coordinate second moment of g = grad_logits loss(group), groups ~ pi_old^G.

    For each context (prompt) x, a group y^(1..G) ~ pi_old(.|x) i.i.d. (003 eq. 88) is scored with
    `rewards [..., R]`, its advantages come from the config's group estimator (`losses.group_advantages`,
    003 eq. 90-91, 98) or `advantage_fn(rewards [1, G]) -> [1, G]`, and the loss is polygrad's own
    `losses.policy_loss(config, logp_new, logp_old, A, mask, logp_ref, entropy, normaliser=normaliser)`
    on the group's `[G, L]` batch, with logp_new the token log-probs under `logits` (differentiated),
    logp_old under `logits_old` (default: `logits`, i.e. on-policy, r = 1), logp_ref under
    `logits_ref` (needed if `config.kl_coef > 0`). Each group is its own batch (one prompt per step):
    `normaliser=None` is the group's own (for token_mean: its token count); pass a constant (a scalar,
    or one per context `[C]`), e.g. G E[T], for the many-prompt limit of token_mean (DAPO), where the
    batch's token count per group concentrates at G E[T].

    Exact: the expectation is a sum over all multisets of G responses (`enumerate_groups`, or `groups`)
    weighted by their multinomial probabilities under pi_old. The mean is computed by accumulating
    d loss / d logp per response and pulling it back once through `token_log_probs` (chain rule); the
    second moment needs every group's own gradient (`moments=True`, slower).

    Args:
      space: from `enumerate_responses`.
      logits: `[S, V]` or `[C, S, V]` (C contexts, each with its own table and rewards).
      rewards: `[R]` or `[C, R]`.
      config: any `losses.LossConfig` (a preset from `losses.PRESETS`), static.
      group_size: G, static.

    Returns:
      `UpdateMoments` with `mean` (the expected update, shape of `logits`) and `second_moment`
      (zeros if `moments=False`). One gradient-descent step of size eta moves the logits by
      -eta * mean in expectation.
    """
    _validate_update_inputs(space, logits, rewards, config, group_size, logits_old, logits_ref)
    if groups is None:
        groups = enumerate_groups(space.num_responses, group_size)
    chex.assert_shape(groups.indices, (None, group_size))
    logits_old = logits if logits_old is None else logits_old
    if normaliser is not None:
        normaliser = jnp.broadcast_to(jnp.asarray(normaliser, logits.dtype), logits.shape[:-2])
    indices = jnp.asarray(groups.indices, jnp.int32)

    def one(lg, lg_old, lg_ref, rw, norm):
        return _one_context_update(space, lg, lg_old, lg_ref, rw, indices, groups.log_multiplicity, config,
                                   advantage_fn, norm, chunk_size, moments)

    if logits.ndim == 2:
        return one(logits, logits_old, logits_ref, rewards, normaliser)
    in_axes = (0, 0, None if logits_ref is None else 0, 0, None if normaliser is None else 0)
    return jax.vmap(one, in_axes=in_axes)(logits, logits_old, logits_ref, rewards, normaliser)


def expected_update(
    space: ResponseSpace,
    logits: jax.Array,
    rewards: jax.Array,
    config: losses.LossConfig,
    group_size: int,
    **kwargs: Any,
) -> jax.Array:
    """The expected update E_{groups ~ pi_old^G}[grad_logits loss(group)], exactly; shape of `logits`.

    `update_moments(..., moments=False).mean`; see there for the arguments (`logits_old`, `logits_ref`,
    `advantage_fn`, `normaliser`, `groups`, `chunk_size`). On-policy with Dr. GRPO's loss it equals
    -(G - 1) / (G L) grad J exactly (003 eq. 98-100: E[(R_i - mean R) grad log pi(y_i)] =
    (1 - 1/G) grad J), which the tests check in float64.
    """
    return update_moments(space, logits, rewards, config, group_size, moments=False, **kwargs).mean


def sampled_update(
    key: jax.Array,
    space: ResponseSpace,
    logits: jax.Array,
    rewards: jax.Array,
    config: losses.LossConfig,
    group_size: int,
    num_groups: int,
    *,
    logits_old: jax.Array | None = None,
    logits_ref: jax.Array | None = None,
    advantage_fn: Callable[[jax.Array], jax.Array] | None = None,
    normaliser: float | jax.Array | None = None,
    directions: jax.Array | None = None,
    chunk_size: int = 2048,
) -> SampledUpdate:
    """Monte-Carlo expected update over `num_groups` groups sampled from pi_old, with standard errors.

    Same loss and arguments as `update_moments`, for sizes where C(R + G - 1, G) is too large to
    enumerate (millions of groups are cheap at these sizes). Each group's full gradient g_n is computed;
    mean = (1/N) sum g_n, stderr = std(g_n) / sqrt(N) per coordinate. `directions [K, ...]` (each of the
    shape of `logits`) also give the mean and standard error of d_k . g (e.g. d = grad of a statistic:
    the drift of that statistic per step, -d . mean, with its error). `num_groups` and `chunk_size` are
    static; contexts get independent keys.
    """
    _validate_update_inputs(space, logits, rewards, config, group_size, logits_old, logits_ref)
    logits_old = logits if logits_old is None else logits_old
    if normaliser is not None:
        normaliser = jnp.broadcast_to(jnp.asarray(normaliser, logits.dtype), logits.shape[:-2])
    if directions is None:
        directions = jnp.zeros((0,) + logits.shape, logits.dtype)
    chex.assert_shape(directions, (None,) + logits.shape)
    chunk = min(chunk_size, num_groups)
    num_chunks = -(-num_groups // chunk)
    dtype = logits.dtype

    def one(key, lg, lg_old, lg_ref, rw, dirs, normaliser):
        lp_old = jax.lax.stop_gradient(token_log_probs(space, lg_old))
        resp_lp_old = jnp.sum(lp_old, axis=-1)
        lp_ref = None if lg_ref is None else jax.lax.stop_gradient(token_log_probs(space, lg_ref))
        rw = jax.lax.stop_gradient(jnp.asarray(rw, dtype))
        mask = space.mask.astype(dtype)
        lp, ent = token_log_probs(space, lg), token_entropies(space, lg)
        log_pi = jax.nn.log_softmax(lg, axis=-1)
        cotangents = jax.vmap(lambda idx: _per_group_cotangents(
            config, advantage_fn, normaliser, lp, lp_old, lp_ref, ent, mask, rw, idx))

        def body(carry, xs):
            chunk_key, position = xs
            idx = jax.random.categorical(chunk_key, resp_lp_old, shape=(chunk, group_size)).astype(jnp.int32)
            valid = (position * chunk + jnp.arange(chunk)) < num_groups  # the last chunk may be partial
            d_lp, d_ent = cotangents(idx)
            grads = jax.vmap(lambda i, a, b: _group_gradient(space, log_pi, i, a, b))(idx, d_lp, d_ent)
            grads = jnp.where(valid[:, None, None], grads, 0.0)
            proj = jnp.einsum("ksv,csv->ck", dirs, grads)
            s1, s2, p1, p2 = carry
            return (s1 + grads.sum(0), s2 + (grads**2).sum(0), p1 + proj.sum(0), p2 + (proj**2).sum(0)), None

        init = (jnp.zeros_like(lg), jnp.zeros_like(lg), jnp.zeros(dirs.shape[0], dtype),
                jnp.zeros(dirs.shape[0], dtype))
        xs = (jax.random.split(key, num_chunks), jnp.arange(num_chunks))
        (s1, s2, p1, p2), _ = jax.lax.scan(body, init, xs)
        n = jnp.asarray(num_groups, dtype)

        def stderr(first, second):
            return jnp.sqrt(jnp.maximum(second / n - (first / n) ** 2, 0.0) / jnp.maximum(n - 1, 1.0))

        return SampledUpdate(s1 / n, stderr(s1, s2), p1 / n, stderr(p1, p2))

    if logits.ndim == 2:
        return one(key, logits, logits_old, logits_ref, rewards, directions, normaliser)
    keys = jax.random.split(key, logits.shape[0])
    in_axes = (0, 0, 0, None if logits_ref is None else 0, 0, 1, None if normaliser is None else 0)
    args = (keys, logits, logits_old, logits_ref, rewards, directions, normaliser)
    out = jax.vmap(one, in_axes=in_axes)(*args)
    # projections were per context: d_k restricted to context c; sum over contexts for the full d_k . g
    proj_mean = jnp.sum(out.projection_mean, axis=0)
    proj_err = jnp.sqrt(jnp.sum(out.projection_stderr**2, axis=0))
    return SampledUpdate(out.mean, out.stderr, proj_mean, proj_err)


# --------------------------------------------------------------------------------------------------------
# Binary rewards: closed forms over the number of correct responses in a group.
# --------------------------------------------------------------------------------------------------------


class BinaryGroupStatistics(NamedTuple):
    """Exact group statistics of binary (0/1) rewards with success probability p, all `[...]` like p.

    advantage_correct / advantage_incorrect: E[A_i | R_i = 1], E[A_i | R_i = 0].
    weight: their difference c_G(p). For any loss whose per-response gradient is A_i grad log pi(y_i)
      (on-policy, token-sum or single-token responses) the expected update of a prompt is
      c_G(p) grad p, since sum_y pi(y) grad log pi(y) = 0: c_G(p) is the weight the prompt receives
      (Dr. GRPO's question-difficulty bias, Liu et al. 2025, arXiv 2503.20783, section 3.1).
    mean_abs_advantage: E[(1/G) sum_i |A_i|], the advantage mass of a group.
    zero_signal: P(all advantages are 0), by summing over the number of correct responses; equals
      p^G + (1 - p)^G for the usual estimators (DAPO's dynamic sampling, Yu et al. 2025, arXiv 2503.14476).
    """

    advantage_correct: jax.Array
    advantage_incorrect: jax.Array
    weight: jax.Array
    mean_abs_advantage: jax.Array
    zero_signal: jax.Array


def _binomial_pmf(k: jax.Array, n: int, p: jax.Array) -> jax.Array:
    """P(K = k) for K ~ Binomial(n, p); k `[K]`, p `[...]` -> `[..., K]`, exact at p = 0 and 1."""
    p = p[..., None]
    log_comb = (jax.scipy.special.gammaln(n + 1.0) - jax.scipy.special.gammaln(k + 1.0)
                - jax.scipy.special.gammaln(n - k + 1.0)).astype(p.dtype)
    return jnp.exp(log_comb) * jnp.where(k == 0, 1.0, p**k) * jnp.where(k == n, 1.0, (1 - p) ** (n - k))


def binary_group_statistics(
    p: jax.Array, group_size: int, advantage_fn: Callable[[jax.Array], jax.Array]
) -> BinaryGroupStatistics:
    """Exact statistics of G i.i.d. Bernoulli(p) rewards under a group-advantage estimator.

    Sums over the number of correct responses (Binomial(G - 1, p) among the others of a given response,
    Binomial(G, p) for the group), evaluating `advantage_fn` (rewards `[P, G]` -> `[P, G]`, e.g.
    `estimators.advantages.group_normalized_advantages`) on the G + 1 distinct groups. p `[...]` float.
    """
    p = jnp.asarray(p)
    chex.assert_type(p, float)
    G, dtype = group_size, p.dtype
    k = jnp.arange(G + 1)
    # Row k: k correct responses first, then G - k incorrect ones.
    groups = (jnp.arange(G)[None, :] < k[:, None]).astype(dtype)  # [G + 1, G]
    # The barrier keeps XLA from constant-folding the estimator on this constant table at compile time
    # (its HLO evaluator is slow: seconds per call).
    adv = advantage_fn(jax.lax.optimization_barrier(groups))
    chex.assert_equal_shape([adv, groups])
    # A correct response with k others correct sits in row k + 1 (take its first entry); an incorrect
    # response with k others correct sits in row k (its last entry).
    others = jnp.arange(G)
    pmf_others = _binomial_pmf(others, G - 1, p)  # [..., G]
    adv_correct = jnp.sum(pmf_others * adv[others + 1, 0], axis=-1)
    adv_incorrect = jnp.sum(pmf_others * adv[others, G - 1], axis=-1)
    pmf = _binomial_pmf(k, G, p)  # [..., G + 1]
    mean_abs = jnp.sum(pmf * jnp.mean(jnp.abs(adv), axis=-1), axis=-1)
    zero = jnp.sum(pmf * jnp.all(adv == 0, axis=-1).astype(dtype), axis=-1)
    return BinaryGroupStatistics(adv_correct, adv_incorrect, adv_correct - adv_incorrect, mean_abs, zero)


def zero_signal_fraction(
    space: ResponseSpace,
    logits: jax.Array,
    rewards: jax.Array,
    config: losses.LossConfig,
    group_size: int,
    *,
    advantage_fn: Callable[[jax.Array], jax.Array] | None = None,
    groups: Groups | None = None,
) -> jax.Array:
    """P(a group of G responses ~ pi(.|x) gets all-zero advantages), by enumerating the groups; `[...]`.

    The fraction of prompts that carry no policy-gradient signal and that DAPO's dynamic sampling
    discards (Yu et al. 2025, arXiv 2503.14476, section 3.2); p^G + (1 - p)^G for 0/1 rewards with
    p = J. Advantages from the config's estimator or `advantage_fn`.
    """
    _check_logits(space, logits)
    _check_per_response(space, logits, rewards, "rewards")
    if groups is None:
        groups = enumerate_groups(space.num_responses, group_size)
    indices = jnp.asarray(groups.indices, jnp.int32)

    def one(lg, rw):
        lp = response_log_probs(space, lg)
        weights = jnp.exp(jnp.asarray(groups.log_multiplicity, lg.dtype) + jnp.sum(lp[indices], axis=-1))
        adv = jax.vmap(lambda idx: _group_advantages(config, advantage_fn, jnp.asarray(rw, lg.dtype)[idx]))(
            indices)
        return jnp.sum(weights * jnp.all(adv == 0, axis=-1).astype(lg.dtype))

    return one(logits, rewards) if logits.ndim == 2 else jax.vmap(one)(logits, rewards)
