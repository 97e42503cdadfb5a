"""Toy language models end to end: supervised warm start, then GRPO-family RL against the frozen reference.

    python -m experiments.lm                                    # grpo on reverse, 4 seeds
    python -m experiments.lm --algo dapo --dynamic-sampling --task scratchpad_sum --overlong soft
    python -m experiments.lm --algo gspo --clip-low 1e-3 --clip-high 1e-3
    python -m experiments.lm --help

The RLHF pipeline of 004 and 002 at toy scale, on a task of `envs.text_tasks`:

1. Warm start ("SFT"): a small causal transformer (`polygrad.transformer`) is fitted by maximum likelihood
   to the task's deliberately imperfect base corpus. The result is cached in the run folder
   (`warm_start-<hash>.npz`) and becomes both the initial policy and the frozen reference pi_ref.
2. RL (003 sections 5.3.2, 5.4, 5.5.4, 5.6.5), one update per step: freeze pi_old <- pi_theta; sample
   `num_prompts` training prompts and G completions each from pi_old (`polygrad.sampling`, KV cache);
   score them; optionally resample until the batch holds `num_prompts` groups whose rewards differ (DAPO
   dynamic sampling, up to `max_sampling_rounds` rounds); shape or mask truncated completions (DAPO's
   overlong handling); compute advantages; then `num_epochs` x `num_minibatches` Adam steps on the
   chosen loss with the KL to pi_ref.

`--algo` is a preset of `polygrad.grpo` (grpo, dr_grpo, dapo, gspo, sapo, ...) or one of the baselines:
`reinforce` (sequence reward times the sequence log-likelihood, no baseline: the score-function
gradient of 003 eq. 87), `rloo` (the same with the leave-one-out group baseline, Ahmadian et al. 2024)
and `ppo` (token-level critic on a value head of the same transformer, GAE with gamma = 1, clipped value
loss). Seeds are vmapped and trained in checkpointed chunks (`experiments.runs`): the same command
restarted after a kill resumes with identical results; a folder holding another config is refused.
Held-out evaluation (pass@1 greedy and sampled, pass@k, lengths, truncation, entropy, KL to the
reference) is logged every update on a fixed set of test prompts and in full at the end (`eval.json`).
"""

import os

# Must precede the first JAX import: XLA:CPU's concurrency-optimised scheduler can stall vmapped runs.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import dataclasses  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import tyro  # noqa: E402
from flax import struct  # noqa: E402

from envs import text_tasks  # noqa: E402
from experiments import runs  # noqa: E402
from polygrad import grpo, losses, returns, sampling, updates  # noqa: E402
from polygrad.transformer import TransformerLM, init_params  # noqa: E402

BASELINES = ("reinforce", "rloo", "ppo")
OVERLONG_MODES = ("none", "mask", "soft")
WARM_START_FIELDS = ("task", "task_knobs", "d_model", "num_layers", "num_heads", "corpus_size", "sft_steps",
                     "sft_batch_size", "sft_learning_rate", "seed")
NUM_LENGTH_BUCKETS = 4


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Every field of a run (the command line, parsed by tyro)."""

    task: str = "reverse"
    """one of envs.text_tasks.TASKS."""
    task_knobs: str = "{}"
    """JSON object of task knobs, e.g. '{"n_min": 3, "n_max": 8}'."""
    algo: str = "grpo"
    """a polygrad.grpo preset (grpo, dr_grpo, dapo, gspo, sapo, ...) or reinforce, rloo, ppo."""
    clip_low: float | None = None
    """override eps_low of the preset's hard clip (None: the preset's)."""
    clip_high: float | None = None
    """override eps_high of the preset's hard clip."""
    tau_pos: float | None = None
    """override SAPO's positive-advantage temperature."""
    tau_neg: float | None = None
    """override SAPO's negative-advantage temperature."""
    kl_coef: float | None = None
    """KL-to-reference coefficient beta (None: the preset's; grpo 0.04 with k3, the others 0)."""
    entropy_coef: float = 0.0
    num_seeds: int = 4
    seed: int = 0
    num_updates: int = 40
    num_prompts: int = 16
    """groups (prompts) per update."""
    group_size: int = 8
    """G completions per prompt."""
    num_epochs: int = 2
    """mu: passes over each batch."""
    num_minibatches: int = 2
    """optimiser steps per epoch (must divide num_prompts * group_size)."""
    learning_rate: float = 3e-4
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    """sampling temperature of training rollouts."""
    dynamic_sampling: bool = False
    """DAPO: resample until every group in the batch has rewards that differ."""
    max_sampling_rounds: int = 4
    """cap on generation rounds per update with dynamic sampling."""
    overlong: str = "none"
    """truncated completions: none (the task's reward, 0), mask (drop from the loss), soft (DAPO penalty)."""
    overlong_cache: int = 4
    """length of DAPO's soft-penalty interval before max_response_len."""
    gae_lambda: float = 0.95
    """ppo only: GAE lambda of the token-level advantages (gamma = 1)."""
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    corpus_size: int = 8000
    sft_steps: int = 800
    sft_batch_size: int = 64
    sft_learning_rate: float = 2e-3
    eval_prompts: int = 64
    """held-out prompts scored every update (one sampled and one greedy answer each); 0: none."""
    final_eval_prompts: int = 256
    pass_k: int = 8
    """samples per held-out prompt in the final evaluation (pass@k)."""
    updates_per_chunk: int = 20
    run_dir: str | None = None
    """run folder; default runs/lm/<algo>-<task>-<hash of the config>."""
    warm_start_dir: str | None = None
    """folder caching the warm start (default: the run folder); equal warm-start fields share one file."""

    def __post_init__(self):
        def check(ok: bool, message: str):
            if not ok:
                raise ValueError(f"bad config: {message}")

        check(self.task in text_tasks.TASKS,
              f"unknown task {self.task!r}; choose one of {sorted(text_tasks.TASKS)}")
        try:
            knobs = json.loads(self.task_knobs)
        except json.JSONDecodeError as e:
            raise ValueError(f"bad config: task_knobs is not JSON: {e}") from None
        check(isinstance(knobs, dict), f"task_knobs must be a JSON object, got {self.task_knobs!r}")
        try:
            text_tasks.make_task(self.task, **knobs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad config: task knobs: {e}") from None
        check(self.algo in BASELINES or self.algo in grpo.PRESETS,
              f"unknown algo {self.algo!r}; choose a preset {sorted(grpo.PRESETS)} or one of {BASELINES}")
        check(self.group_size >= 2, f"group_size must be >= 2 (group baselines), got {self.group_size}")
        for name in ("num_seeds", "num_updates", "num_prompts", "num_epochs", "num_minibatches",
                     "max_sampling_rounds", "d_model", "num_layers", "num_heads", "corpus_size",
                     "sft_batch_size", "final_eval_prompts", "pass_k", "updates_per_chunk"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.sft_steps >= 0, f"sft_steps must be >= 0, got {self.sft_steps}")
        check(self.eval_prompts >= 0, f"eval_prompts must be >= 0, got {self.eval_prompts}")
        check((self.num_prompts * self.group_size) % self.num_minibatches == 0,
              f"num_minibatches={self.num_minibatches} does not divide the batch num_prompts * group_size = "
              f"{self.num_prompts * self.group_size}")
        check(self.learning_rate > 0 and self.sft_learning_rate > 0, "learning rates must be > 0")
        check(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        check(self.temperature > 0, f"temperature must be > 0 for training rollouts, got {self.temperature}")
        check(self.overlong in OVERLONG_MODES,
              f"overlong must be one of {OVERLONG_MODES}, got {self.overlong!r}")
        check(0.0 <= self.gae_lambda <= 1.0, f"gae_lambda must be in [0, 1], got {self.gae_lambda}")
        check(self.d_model % self.num_heads == 0, f"d_model {self.d_model} not divisible by num_heads")
        if self.overlong == "soft":
            length = self.make_task().max_response_len
            check(1 <= self.overlong_cache <= length,
                  f"overlong_cache must be in [1, max_response_len={length}], got {self.overlong_cache}")
        self.loss_config()  # validates the clip / temperature / KL overrides against the preset

    def make_task(self):
        return text_tasks.make_task(self.task, **json.loads(self.task_knobs))

    def make_model(self) -> TransformerLM:
        task = self.make_task()
        return TransformerLM(
            vocab_size=text_tasks.VOCAB_SIZE, max_len=task.prompt_len + task.max_response_len,
            d_model=self.d_model, num_layers=self.num_layers, num_heads=self.num_heads, value_head=True)

    def loss_config(self) -> grpo.LossConfig:
        """The preset's `LossConfig` with this config's overrides (baselines: see the module docstring)."""
        if self.algo == "reinforce":
            # advantage field unused: reinforce's advantages are the raw rewards (see `advantages`)
            base = grpo.LossConfig(gate=grpo.NoGate(), aggregation="seq_mean_token_sum")
        elif self.algo == "rloo":
            base = grpo.LossConfig(gate=grpo.NoGate(), aggregation="seq_mean_token_sum",
                                   advantage="leave_one_out")
        else:
            base = grpo.PRESETS[self.algo]
        overrides: dict[str, Any] = {"entropy_coef": self.entropy_coef}
        if self.kl_coef is not None:
            overrides["kl_coef"] = self.kl_coef
        gate = base.gate
        if self.clip_low is not None or self.clip_high is not None:
            if not isinstance(gate, grpo.HardClip):
                raise ValueError(f"bad config: clip_low/clip_high need a hard-clip preset; {self.algo} uses "
                                 f"{type(gate).__name__}")
            low = gate.eps_low if self.clip_low is None else self.clip_low
            high = (gate.eps_high if gate.eps_high is not None else gate.eps_low) if self.clip_high is None \
                else self.clip_high
            overrides["gate"] = dataclasses.replace(gate, eps_low=low, eps_high=high)
        if self.tau_pos is not None or self.tau_neg is not None:
            if not isinstance(gate, grpo.SoftGate):
                raise ValueError(f"bad config: tau_pos/tau_neg need a soft-gate preset (sapo); {self.algo} "
                                 "uses "
                                 f"{type(gate).__name__}")
            overrides["gate"] = grpo.SoftGate(
                gate.tau_pos if self.tau_pos is None else self.tau_pos,
                gate.tau_neg if self.tau_neg is None else self.tau_neg)
        try:
            return grpo.resolve(base, **overrides)
        except ValueError as e:
            raise ValueError(f"bad config: {e}") from None


def config_hash(config: LMConfig, fields=None) -> str:
    data = runs.config_to_dict(config)
    if fields is not None:
        data = {k: data[k] for k in fields}
    data.pop("run_dir", None)
    data.pop("warm_start_dir", None)
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


def default_run_dir(config: LMConfig) -> str:
    return os.path.join("runs", "lm", f"{config.algo}-{config.task}-{config_hash(config)}")


# --- warm start -------------------------------------------------------------------------------------


def supervised_warm_start(config: LMConfig, key: jax.Array) -> Any:
    """Fit the model to the task's base corpus by maximum likelihood of the response tokens (the SFT stage
    of 004's RLHF pipeline): `sft_steps` Adam steps on minibatches of `sft_batch_size`. Returns params."""
    task, model = config.make_task(), config.make_model()
    corpus_key, init_key, batch_key = jax.random.split(key, 3)
    prompts, responses = task.base_corpus(corpus_key, config.corpus_size)
    mask = sampling.response_mask(responses, text_tasks.EOS)
    params = init_params(model, init_key)
    tx = updates.make_optimizer(config.sft_learning_rate, 1.0, config.sft_steps or None)

    def nll(params, rows):
        forced = sampling.sequence_log_probs(model, params, prompts[rows], responses[rows])
        return -jnp.sum(forced.log_probs * mask[rows]) / jnp.sum(mask[rows])

    def step(state, step_key):
        params, opt_state = state
        rows = jax.random.randint(step_key, (config.sft_batch_size,), 0, config.corpus_size)
        grads = jax.grad(nll)(params, rows)
        changes, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, changes), opt_state), None

    step_keys = jax.random.split(batch_key, config.sft_steps)
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), step_keys)
    return params


def load_or_train_warm_start(config: LMConfig, directory: str, log: Callable[[str], None] = print) -> Any:
    """The warm-start params cached in `directory` for this config's warm-start fields, trained if absent."""
    path = os.path.join(directory, f"warm_start-{config_hash(config, WARM_START_FIELDS)}.npz")
    template = jax.eval_shape(lambda: init_params(config.make_model(), jax.random.PRNGKey(0)))
    leaves, treedef = jax.tree.flatten(template)
    if os.path.exists(path):
        with np.load(path) as data:
            loaded = [jnp.asarray(data[f"leaf_{i:05d}"]) for i in range(len(leaves))]
        log(f"warm start loaded from {path}")
        return jax.tree.unflatten(treedef, loaded)
    log(f"warm start: {config.sft_steps} supervised steps on {config.corpus_size} corpus examples ...")
    fit = jax.jit(supervised_warm_start, static_argnums=0)
    params = fit(config, jax.random.PRNGKey(config.seed + 10_000))
    os.makedirs(directory, exist_ok=True)
    arrays = {f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))}
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    log(f"warm start saved to {path}")
    return params


# --- rollouts -----------------------------------------------------------------------------------------


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


def generate_groups(task, model, params, key, prompts, group_size: int, temperature: float = 1.0,
                    overlong_cache: int | None = None) -> Groups:
    """`group_size` completions for each prompt of `prompts [P, prompt_len]`, scored; with
    `overlong_cache` DAPO's soft overlong penalty (DAPO eq. 13) is added to the reward."""
    repeated = jnp.repeat(prompts, group_size, axis=0)
    out = sampling.sample(model, params, key, repeated, task.max_response_len,
                          temperature=temperature, eos_id=text_tasks.EOS, pad_id=text_tasks.PAD)
    score = task.score(repeated, out.tokens)
    reward = score.reward
    if overlong_cache is not None:
        # a truncated response counts as one token longer than the limit, so it gets the full -1
        length = jnp.where(out.truncated, task.max_response_len + 1, out.lengths)
        reward = reward + grpo.overlong_penalty(length, task.max_response_len, overlong_cache)
    flat = Groups(repeated, out.tokens, out.log_probs, out.entropies, out.mask, out.lengths, out.truncated,
                  reward, score.correct)
    return jax.tree.map(lambda x: x.reshape((prompts.shape[0], group_size, *x.shape[1:])), flat)


def collect(config: LMConfig, task, model, params, key) -> tuple[Groups, jax.Array, dict[str, jax.Array]]:
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
        return generate_groups(task, model, params, sample_key, prompts, config.group_size,
                               config.temperature, cache)

    first = generate(jax.random.fold_in(key, 0))
    keep, num_signal = grpo.groups_with_signal(first.reward)
    stats = {"zero_variance_groups": 1.0 - num_signal / p}
    if not config.dynamic_sampling:
        stats.update(effective_prompts=num_signal.astype(jnp.float32), sampling_rounds=jnp.float32(1.0))
        return first, jnp.ones((p,), bool), stats

    def add(buffer, count, groups):
        keep, num_kept = grpo.groups_with_signal(groups.reward)
        indices, valid = grpo.fill_batch(keep, p)
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


def token_gae(rewards, values, mask, lam: float):
    """Per-token GAE advantages and value targets `[B, L]` for a sequence reward paid at the last token
    (gamma = 1; the episode ends at EOS or at the length limit). Uses `polygrad.returns.gae`."""
    last = (jnp.sum(mask, axis=1) - 1).astype(jnp.int32)
    column = jnp.arange(mask.shape[1])[None]
    at_end = column == last[:, None]
    values = values * mask
    token_rewards = jnp.where(at_end, rewards[:, None], 0.0)
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1) * (1.0 - at_end)
    terminated = at_end | (mask == 0)
    advantages = returns.gae(token_rewards.T, values.T, next_values.T, terminated.T,
                             jnp.zeros_like(terminated.T), 1.0, lam).T * mask
    return advantages, (advantages + values) * mask


def _length_bucket_variances(log_ratio, mask, lengths, max_len: int) -> dict[str, jax.Array]:
    """Variance of the token ratios and of GSPO's sequence ratios (003 eq. 93/107) per response-length
    bucket (NUM_LENGTH_BUCKETS equal bins of [1, max_len]) and the bucket's share of the responses; an
    empty bucket reports 0 (read the variances together with the share)."""
    token_ratio = jnp.exp(log_ratio)
    seq_log = jnp.sum(log_ratio * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    seq_ratio = jnp.exp(seq_log)
    bucket = jnp.clip((lengths - 1) * NUM_LENGTH_BUCKETS // max_len, 0, NUM_LENGTH_BUCKETS - 1)
    valid_row = jnp.sum(mask, axis=1) > 0
    out = {}
    for b in range(NUM_LENGTH_BUCKETS):
        rows = (bucket == b) & valid_row
        n_rows = jnp.sum(rows)
        seq_mean = jnp.sum(jnp.where(rows, seq_ratio, 0.0)) / jnp.maximum(n_rows, 1)
        seq_var = jnp.sum(jnp.where(rows, (seq_ratio - seq_mean) ** 2, 0.0)) / jnp.maximum(n_rows, 1)
        tok_mask = mask * rows[:, None]
        tok_mean = losses.masked_mean(token_ratio, tok_mask)
        tok_var = losses.masked_mean((token_ratio - tok_mean) ** 2, tok_mask)
        out[f"seq_ratio_var_len{b}"] = seq_var
        out[f"token_ratio_var_len{b}"] = tok_var
        out[f"share_len{b}"] = n_rows / jnp.maximum(jnp.sum(valid_row), 1)
    return out


# --- training -------------------------------------------------------------------------------------------


@struct.dataclass
class LMCarry:
    """One seed's training state: policy params (with value head), optimiser state, PRNG key."""

    params: Any
    opt_state: Any
    key: jax.Array


def make_program(config: LMConfig, warm_params) -> runs.Program:
    """One seed's RL from the warm start (also the frozen reference) as a `runs.Program`.

    Metrics per update: training reward and pass@1 on the batch, mean response length (of correct and of
    incorrect answers), truncation rate, sampling entropy, the fraction of zero-variance groups in the
    first round, effective prompts (groups with signal in the batch), sampling rounds, the loss metrics of
    `polygrad.grpo` (clip fractions, ratio statistics, approx KL to pi_old, KL to pi_ref, entropy, ...),
    the variance of token and sequence ratios per response-length bucket after the update, and held-out
    `eval_pass1_sampled` / `eval_pass1_greedy` on `eval_prompts` fixed test prompts (if > 0).
    """
    task, model = config.make_task(), config.make_model()
    loss_config = config.loss_config()
    loss_fn = grpo.make_loss(loss_config)
    batch = config.num_prompts * config.group_size
    minibatch = batch // config.num_minibatches
    tx = updates.make_optimizer(config.learning_rate, config.max_grad_norm or None)
    ref_params = warm_params
    eval_prompts = task.sample_prompts(jax.random.PRNGKey(12345), max(config.eval_prompts, 1), "test")
    use_values = loss_config.value_coef > 0

    def teacher_forced(params, prompts, tokens):
        return sampling.sequence_log_probs(model, params, prompts, tokens)

    def advantages_of(groups: Groups, mask, values_old):
        if config.algo == "ppo":
            return token_gae(groups.reward.reshape(-1), values_old, mask, config.gae_lambda)
        if config.algo == "reinforce":
            return groups.reward.reshape(-1), None
        return grpo.group_advantages(loss_config, groups.reward), None

    def init(key):
        return LMCarry(warm_params, tx.init(warm_params), key)

    def update(carry: LMCarry):
        key, collect_key, epoch_key, eval_key = jax.random.split(carry.key, 4)
        params = carry.params
        groups, valid, stats = collect(config, task, model, params, collect_key)
        flat = jax.tree.map(lambda x: x.reshape((batch, *x.shape[2:])), groups)
        valid_rows = jnp.repeat(valid, config.group_size)
        mask = flat.mask * valid_rows[:, None]
        if config.overlong == "mask":
            mask = grpo.mask_truncated(mask, flat.truncated)
        old = teacher_forced(params, flat.prompts, flat.tokens)
        ref = teacher_forced(ref_params, flat.prompts, flat.tokens)
        advantages, value_targets = advantages_of(groups, mask, old.values)
        if config.algo == "ppo":
            mean = losses.masked_mean(advantages, mask)
            std = jnp.sqrt(losses.masked_mean((advantages - mean) ** 2, mask))
            advantages = (advantages - mean) / (std + 1e-8) * mask

        def minibatch_loss(params, rows):
            forced = teacher_forced(params, flat.prompts[rows], flat.tokens[rows])
            extra = {}
            if use_values:
                extra = dict(values=forced.values, values_old=old.values[rows], returns=value_targets[rows])
            return loss_fn(forced.log_probs, old.log_probs[rows], advantages[rows], mask[rows],
                           ref.log_probs[rows], forced.entropies, **extra)

        def gradient_step(state, rows):
            params, opt_state = state
            (_, metrics), grads = jax.value_and_grad(minibatch_loss, has_aux=True)(params, rows)
            changes, opt_state = tx.update(grads, opt_state, params)
            metrics["grad_norm"] = optax.tree.norm(grads)
            return (optax.apply_updates(params, changes), opt_state), metrics

        def epoch(state, k):
            order = jax.random.permutation(k, batch).reshape(config.num_minibatches, minibatch)
            return jax.lax.scan(gradient_step, state, order)

        (new_params, opt_state), loss_metrics = jax.lax.scan(
            epoch, (params, carry.opt_state), jax.random.split(epoch_key, config.num_epochs))
        loss_metrics = jax.tree.map(jnp.mean, loss_metrics)

        after = teacher_forced(new_params, flat.prompts, flat.tokens)
        log_ratio = jnp.clip(after.log_probs - old.log_probs, -20.0, 20.0) * mask
        ratio_stats = _length_bucket_variances(log_ratio, mask, flat.lengths, task.max_response_len)

        response_mask = flat.mask * valid_rows[:, None]
        row = valid_rows.astype(jnp.float32)
        correct = flat.correct.astype(jnp.float32) * row
        wrong = (1.0 - flat.correct.astype(jnp.float32)) * row
        length = flat.lengths.astype(jnp.float32)
        metrics = {
            "reward": losses.masked_mean(flat.reward, row),
            "pass1_train": losses.masked_mean(correct, row),
            "response_length": losses.masked_mean(length, row),
            "length_correct": jnp.sum(length * correct) / jnp.maximum(jnp.sum(correct), 1.0),
            "length_incorrect": jnp.sum(length * wrong) / jnp.maximum(jnp.sum(wrong), 1.0),
            "truncation_rate": losses.masked_mean(flat.truncated.astype(jnp.float32), row),
            "sample_entropy": losses.masked_mean(flat.entropies, response_mask),
            **stats,
            **loss_metrics,
            **ratio_stats,
        }
        if config.eval_prompts:
            ev_sampled = generate_groups(task, model, params, eval_key, eval_prompts, 1)
            ev_greedy = sampling.sample(model, params, eval_key, eval_prompts, task.max_response_len,
                                        temperature=0.0, eos_id=text_tasks.EOS, pad_id=text_tasks.PAD)
            metrics["eval_pass1_sampled"] = jnp.mean(ev_sampled.correct.astype(jnp.float32))
            metrics["eval_pass1_greedy"] = jnp.mean(task.score(eval_prompts, ev_greedy.tokens).correct)
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        return LMCarry(new_params, opt_state, key), metrics

    return runs.Program(init, update, config.num_updates, batch)


# --- evaluation -------------------------------------------------------------------------------------------


def pass_at_k(num_samples: int, num_correct: jax.Array, k: int) -> jax.Array:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 1 <= k <= num_samples:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={num_samples}")
    c = jnp.asarray(num_correct, jnp.float32)
    i = jnp.arange(k, dtype=jnp.float32)
    # C(n-c, k) / C(n, k) = prod_{i<k} (n - c - i) / (n - i), 0 once n - c < k
    fail = jnp.prod(jnp.clip((num_samples - c[..., None] - i) / (num_samples - i), 0.0, 1.0), axis=-1)
    return 1.0 - fail


def evaluate(task, model: TransformerLM, params, ref_params, key, num_prompts: int, pass_k: int
             ) -> dict[str, jax.Array]:
    """Held-out evaluation of one policy: `num_prompts` test prompts, `pass_k` samples each at temperature
    1 and one greedy answer. Returns scalars: pass@1 sampled and greedy, pass@k, mean length of correct and
    incorrect answers, truncation rate, per-token entropy, and KL(pi || pi_ref) per response (the sampled
    sum of log-ratios, 003 eq. 87). Jittable (task, model and the sizes static); vmap it over seeds."""
    prompt_key, sample_key = jax.random.split(key)
    prompts = task.sample_prompts(prompt_key, num_prompts, "test")
    groups = generate_groups(task, model, params, sample_key, prompts, pass_k)
    flat = jax.tree.map(lambda x: x.reshape((-1, *x.shape[2:])), groups)
    ref = sampling.sequence_log_probs(model, ref_params, flat.prompts, flat.tokens)
    greedy = sampling.sample(model, params, key, prompts, task.max_response_len, temperature=0.0,
                             eos_id=text_tasks.EOS, pad_id=text_tasks.PAD)
    correct = flat.correct.astype(jnp.float32)
    length = flat.lengths.astype(jnp.float32)
    num_correct = jnp.sum(groups.correct, axis=1)
    return {
        "pass1_sampled": jnp.mean(correct),
        "pass1_greedy": jnp.mean(task.score(prompts, greedy.tokens).correct.astype(jnp.float32)),
        f"pass{pass_k}": jnp.mean(pass_at_k(pass_k, num_correct, pass_k)),
        "length_correct": jnp.sum(length * correct) / jnp.maximum(jnp.sum(correct), 1.0),
        "length_incorrect": jnp.sum(length * (1 - correct)) / jnp.maximum(jnp.sum(1 - correct), 1.0),
        "truncation_rate": jnp.mean(flat.truncated.astype(jnp.float32)),
        "entropy": losses.masked_mean(flat.entropies, flat.mask),
        "kl_ref_per_response": jnp.mean(jnp.sum((flat.log_probs - ref.log_probs) * flat.mask, axis=1)),
    }


@functools.partial(jax.jit, static_argnums=(0, 1, 5, 6))
def _evaluate_many(task, model, params, ref_params, keys, num_prompts, pass_k):
    return jax.vmap(lambda p, k: evaluate(task, model, p, ref_params, k, num_prompts, pass_k))(params, keys)


def evaluate_seeds(config: LMConfig, params, ref_params, seed: int = 0) -> dict[str, list[float]]:
    """`evaluate` of every seed's params (leaves `[S, ...]`) with the config's final-evaluation sizes, as
    lists of floats per metric (compiled once per task, model and sizes)."""
    num_seeds = jax.tree.leaves(params)[0].shape[0]
    keys = jax.random.split(jax.random.PRNGKey(seed + 777), num_seeds)
    out = _evaluate_many(config.make_task(), config.make_model(), params, ref_params, keys,
                         config.final_eval_prompts, config.pass_k)
    return {k: [float(x) for x in np.asarray(v)] for k, v in out.items()}


def train(config: LMConfig, run_dir: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Warm start (cached), RL in the run folder (resumable), final held-out evaluation (`eval.json`).

    Returns `{"run_dir", "warm_start": eval of the reference, "final": eval per seed, "metrics": {name:
    [S, U]}}`.
    """
    run_dir = run_dir or config.run_dir or default_run_dir(config)
    runs.prepare_run_dir(run_dir, runs.config_to_dict(config))
    warm = load_or_train_warm_start(config, config.warm_start_dir or run_dir, log)
    one = jax.tree.map(lambda x: x[None], warm)
    warm_eval = {k: v[0] for k, v in evaluate_seeds(config, one, warm, config.seed).items()}
    log("warm start (reference policy) on held-out prompts: "
        + ", ".join(f"{k} {v:.3f}" for k, v in warm_eval.items()))
    result = runs.run(
        make_program(config, warm), runs.config_to_dict(config), run_dir, seed=config.seed,
        num_seeds=config.num_seeds, updates_per_chunk=config.updates_per_chunk,
        curve_metric="eval_pass1_sampled", title=f"{config.algo} on {config.task}", log=log)
    final = evaluate_seeds(config, result.carry.params, warm, config.seed)
    log("final on held-out prompts (mean over seeds): "
        + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in final.items()))
    with open(os.path.join(run_dir, "eval.json"), "w") as f:
        json.dump({"warm_start": warm_eval, "final": final}, f, indent=2)
    return {"run_dir": run_dir, "warm_start": warm_eval, "final": final, "metrics": result.metrics}


def main(argv=None) -> None:
    train(tyro.cli(LMConfig, args=argv))


if __name__ == "__main__":
    main()
