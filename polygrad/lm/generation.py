"""Group generation, scoring, dynamic sampling, token-level advantages and held-out evaluation.

The sampling side of RL on language models (003 section 5): `generate_groups` samples G completions per
prompt with the KV-cache sampler and scores them with a task; `collect` builds one update's batch of
groups, with DAPO's dynamic sampling (Yu et al. 2025, section 3.2) and overlong penalty (eq. 13) when
asked; `token_advantages` is GAE over the tokens of a response for a token critic (PPO); `evaluate`
scores a policy on held-out prompts.

A task is any object with `max_response_len`, `sample_prompts(key, num, split) -> [num, prompt_len]`
and `score(prompts, responses) -> (reward, correct, ...)` of `[num]` arrays (see `envs.text_tasks`);
`polygrad` never imports `envs`, so token ids (EOS, PAD) are arguments.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from polygrad import validate
from polygrad.estimators import returns, statistics
from polygrad.lm import sampling, shaping

OVERLONG_MODES = ("none", "mask", "soft")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How one update's batch of groups is sampled."""

    num_prompts: int = 16
    """groups (prompts) per update."""
    group_size: int = 8
    """G completions per prompt."""
    temperature: float = 1.0
    """sampling temperature of training rollouts."""
    dynamic_sampling: bool = False
    """DAPO: resample until every group in the batch has rewards that differ."""
    max_sampling_rounds: int = 4
    """cap on generation rounds per update with dynamic sampling."""
    overlong: str = "none"
    """truncated completions: none (the task's reward), mask (drop from the loss), soft (DAPO penalty)."""
    overlong_cache: int = 4
    """length of DAPO's soft-penalty interval before max_response_len."""

    def __post_init__(self):
        validate.integer("sampling.num_prompts", self.num_prompts, minimum=1)
        validate.integer("sampling.group_size", self.group_size, minimum=2)
        validate.positive("sampling.temperature", self.temperature)
        validate.integer("sampling.max_sampling_rounds", self.max_sampling_rounds, minimum=1)
        validate.one_of("sampling.overlong", self.overlong, OVERLONG_MODES)
        validate.integer("sampling.overlong_cache", self.overlong_cache, minimum=1)

    @property
    def batch_size(self) -> int:
        return self.num_prompts * self.group_size


class Groups(NamedTuple):
    """Sampled groups, leaves `[num_prompts, G, ...]`: prompt and response tokens, behaviour log-probs
    and entropies, response mask, lengths, truncation, shaped reward and correctness."""

    prompts: jax.Array
    tokens: jax.Array
    log_probs: jax.Array
    entropies: jax.Array
    mask: jax.Array
    lengths: jax.Array
    truncated: jax.Array
    reward: jax.Array
    correct: jax.Array


def generate_groups(task, model, params, key, prompts, group_size: int, *, eos_id: int, pad_id: int,
                    temperature: float = 1.0, overlong_cache: int | None = None) -> Groups:
    """`group_size` completions for each prompt of `prompts [P, prompt_len]`, scored; with
    `overlong_cache` DAPO's soft overlong penalty (DAPO eq. 13) is added to the reward."""
    repeated = jnp.repeat(prompts, group_size, axis=0)
    out = sampling.sample(model, params, key, repeated, task.max_response_len,
                          temperature=temperature, eos_id=eos_id, pad_id=pad_id)
    score = task.score(repeated, out.tokens)
    reward = score.reward
    if overlong_cache is not None:
        # a truncated response counts as one token longer than the limit, so it gets the full -1
        length = jnp.where(out.truncated, task.max_response_len + 1, out.lengths)
        reward = reward + shaping.overlong_penalty(length, task.max_response_len, overlong_cache)
    flat = Groups(repeated, out.tokens, out.log_probs, out.entropies, out.mask, out.lengths, out.truncated,
                  reward, score.correct)
    return jax.tree.map(lambda x: x.reshape((prompts.shape[0], group_size, *x.shape[1:])), flat)


def collect(config: SamplingConfig, task, model, params, key, *, eos_id: int, pad_id: int
            ) -> tuple[Groups, jax.Array, dict[str, jax.Array]]:
    """One update's batch of `num_prompts` groups and a `[num_prompts]` validity flag.

    Without dynamic sampling this is one round of `generate_groups`. With it (DAPO, 003 section 5.4.2 (2)),
    rounds are generated until `num_prompts` groups whose rewards differ are collected or
    `max_sampling_rounds` is reached (a `lax.while_loop`); slots still empty are marked invalid.
    """
    p = config.num_prompts
    cache = config.overlong_cache if config.overlong == "soft" else None

    def generate(round_key):
        prompt_key, sample_key = jax.random.split(round_key)
        prompts = task.sample_prompts(prompt_key, p, "train")
        return generate_groups(task, model, params, sample_key, prompts, config.group_size, eos_id=eos_id,
                               pad_id=pad_id, temperature=config.temperature, overlong_cache=cache)

    first = generate(jax.random.fold_in(key, 0))
    keep, num_signal = shaping.groups_with_signal(first.reward)
    stats = {"zero_variance_groups": 1.0 - num_signal / p}
    if not config.dynamic_sampling:
        stats.update(effective_prompts=num_signal.astype(jnp.float32), sampling_rounds=jnp.float32(1.0))
        return first, jnp.ones((p,), bool), stats

    def add(buffer, count, groups):
        keep, num_kept = shaping.groups_with_signal(groups.reward)
        indices, valid = shaping.fill_batch(keep, p)
        slots = count + jnp.arange(p)
        target = jnp.where(valid & (slots < p), slots, p)  # p is out of range: dropped
        buffer = jax.tree.map(lambda b, x: b.at[target].set(x[indices], mode="drop"), buffer, groups)
        return buffer, jnp.minimum(count + num_kept, p)

    buffer, count = add(jax.tree.map(jnp.zeros_like, first), jnp.int32(0), first)

    def cond(state):
        _, count, rounds = state
        return (count < p) & (rounds < config.max_sampling_rounds)

    def body(state):
        buffer, count, rounds = state
        groups = generate(jax.random.fold_in(key, rounds))
        buffer, count = add(buffer, count, groups)
        return buffer, count, rounds + 1

    buffer, count, rounds = jax.lax.while_loop(cond, body, (buffer, count, jnp.int32(1)))
    stats.update(effective_prompts=count.astype(jnp.float32), sampling_rounds=rounds.astype(jnp.float32))
    return buffer, jnp.arange(p) < count, stats


def token_advantages(rewards: jax.Array, values: jax.Array, mask: jax.Array, lam: float
                     ) -> tuple[jax.Array, jax.Array]:
    """Per-token GAE advantages and value targets `[B, T]`, with gamma = 1 inside a response and a discount
    of 0 after its last token (`returns.gae` with a per-step discount; Ouyang et al. 2022, the token-level
    PPO of 003 section 5.1). `rewards` is a sequence reward `[B]`, paid at the last response token, or
    per-token rewards `[B, T]` (e.g. with a KL penalty folded in). Padding gets 0."""
    mask = jnp.asarray(mask, values.dtype)
    values = values * mask
    if rewards.ndim == 1:
        last = jnp.sum(mask, axis=1, keepdims=True) - 1
        at_end = jnp.arange(mask.shape[1])[None] == last
        rewards = jnp.where(at_end, rewards[:, None], 0.0)
    token_rewards = jnp.asarray(rewards, values.dtype)
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    discounts = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)  # 1 while the response goes on
    never = jnp.zeros(mask.shape, bool)
    advantages = returns.gae(token_rewards.T, values.T, next_values.T, never.T, never.T, discounts.T, lam).T
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def evaluate(task, model, params, ref_params, key, num_prompts: int, pass_k: int, *, eos_id: int, pad_id: int
             ) -> dict[str, jax.Array]:
    """Held-out evaluation of one policy: `num_prompts` test prompts, `pass_k` samples each at temperature
    1 and one greedy answer. Returns scalars: pass@1 sampled and greedy, pass@k, mean length of correct and
    incorrect answers, truncation rate, per-token entropy, and KL(pi || pi_ref) per response (the sampled
    sum of log-ratios, 003 eq. 87). Jittable (task, model and the sizes static); vmap it over seeds."""
    prompt_key, sample_key = jax.random.split(key)
    prompts = task.sample_prompts(prompt_key, num_prompts, "test")
    groups = generate_groups(task, model, params, sample_key, prompts, pass_k, eos_id=eos_id, pad_id=pad_id)
    flat = jax.tree.map(lambda x: x.reshape((-1, *x.shape[2:])), groups)
    ref = sampling.sequence_log_probs(model, ref_params, flat.prompts, flat.tokens)
    greedy = sampling.sample(model, params, key, prompts, task.max_response_len, temperature=0.0,
                             eos_id=eos_id, pad_id=pad_id)
    correct = flat.correct.astype(jnp.float32)
    length = flat.lengths.astype(jnp.float32)
    num_correct = jnp.sum(groups.correct, axis=1)
    return {
        "pass1_sampled": jnp.mean(correct),
        "pass1_greedy": jnp.mean(task.score(prompts, greedy.tokens).correct.astype(jnp.float32)),
        f"pass{pass_k}": jnp.mean(statistics.pass_at_k(pass_k, num_correct, pass_k)),
        "length_correct": jnp.sum(length * correct) / jnp.maximum(jnp.sum(correct), 1.0),
        "length_incorrect": jnp.sum(length * (1 - correct)) / jnp.maximum(jnp.sum(1 - correct), 1.0),
        "truncation_rate": jnp.mean(flat.truncated.astype(jnp.float32)),
        "entropy": statistics.masked_mean(flat.entropies, flat.mask),
        "kl_ref_per_response": jnp.mean(jnp.sum((flat.log_probs - ref.log_probs) * flat.mask, axis=1)),
    }
