"""Toy language models end to end: supervised warm start, then RL with any loss preset against a reference.

    python -m experiments.lm                                    # grpo on reverse, 4 seeds
    python -m experiments.lm --algo dapo --dynamic-sampling --task scratchpad_sum --overlong soft
    python -m experiments.lm --algo gspo --loss.gate.eps-low 1e-3 --loss.gate.eps-high 1e-3
    python -m experiments.lm --algo cispo --loss.gate.eps-high 4
    python -m experiments.lm --sampler-dtype bfloat16 --loss.correction tis:cap_max=2 opsm:delta=0.5
    python -m experiments.lm --reference.kind ema --reference.every 4 --reference.alpha 0.6
    python -m experiments.lm --help                             # every field, the loss parts included

The RLHF pipeline of 004 and 002 at toy scale, on a task of `envs.text_tasks`:

1. Warm start ("SFT"): a small causal transformer (`polygrad.lm.transformer`) is fitted by maximum
   likelihood to the task's deliberately imperfect base corpus. The result is cached
   (`warm_start-<hash>.npz`) and becomes both the initial policy and the frozen reference pi_ref.
2. RL (003 sections 5.3.2, 5.4, 5.5.4, 5.6.5), one update per step: freeze pi_old <- pi_theta; sample
   `num_prompts` training prompts and G completions each from pi_old (`polygrad.lm.generation`); score
   them; optionally resample until the batch holds `num_prompts` groups whose rewards differ (DAPO
   dynamic sampling); shape or mask truncated completions (DAPO's overlong handling); compute
   advantages; then `num_epochs` x `num_minibatches` Adam steps on the loss with the KL to pi_ref.

Three policies (the rollout-trainer mismatch): a copy of pi_theta in `--sampler-dtype` (bfloat16: a
low-precision rollout engine) samples, and its log-probs of the sampled tokens go to the loss as
`logp_sampler`; `--loss.correction` adds TIS / MIS / OPSM parts (specs as in
`losses.correction_from_spec`) that weigh tokens by pi_old / pi_sampler. pi_old and pi_ref each follow the
policy as a `losses.ReferenceConfig` says (`--old-policy.*`, `--reference.*`: fixed, synced every k
updates, or an EMA of past iterates).

`--algo` names a preset of `polygrad.losses` (grpo, dr_grpo, dapo, gspo, sapo, cispo, rloo, ppo, ...)
and `--loss.*` overrides any field of any of its parts. Advantages follow the loss: a group estimator
(`loss.advantage`), or for "token" advantages token-level GAE with gamma 1 on the transformer's value
head when the loss has a value term (PPO), else the raw sequence reward. Seeds are vmapped and trained in
checkpointed chunks (`experiments.runs`): the same command restarted after a kill resumes with identical
results; a folder holding another config is refused. Held-out evaluation (pass@1 greedy and sampled,
pass@k, lengths, truncation, entropy, KL to the reference) is logged every update on a fixed set of test
prompts and in full at the end (`eval.json`).
"""

from experiments import runs  # noqa: I001  (first: sets XLA's flags before JAX starts)

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from envs import text_tasks
from polygrad import losses, optim, sharding, validate
from polygrad.estimators import statistics
from polygrad.lm import generation, sampling, shaping
from polygrad.lm.transformer import TransformerLM, init_params

WARM_START_FIELDS = ("task", "task_knobs", "d_model", "num_layers", "num_heads", "corpus_size", "sft_steps",
                     "sft_batch_size", "sft_learning_rate", "seed")
NUM_LENGTH_BUCKETS = 4
TOKENS = {"eos_id": text_tasks.EOS, "pad_id": text_tasks.PAD}


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Every field of a run (the command line, parsed by tyro)."""

    task: str = "reverse"
    """one of envs.text_tasks.TASKS."""
    task_knobs: str = "{}"
    """JSON object of task knobs, e.g. '{"n_min": 3, "n_max": 8}'."""
    algo: str = "grpo"
    """a preset of polygrad.losses (grpo, dr_grpo, dapo, gspo, sapo, cispo, gmpo, rloo, ppo, ...)."""
    loss: losses.LossConfig | None = None
    """the loss: its parts and coefficients (None: the preset named by algo)."""
    num_seeds: int = 4
    """seeds trained together (vmapped)."""
    seed: int = 0
    """base seed of the run (and of the warm start)."""
    num_updates: int = 40
    """RL updates per seed."""
    num_prompts: int = 16
    """groups (prompts) per update."""
    group_size: int = 8
    """G completions per prompt."""
    num_epochs: int = 2
    """mu: passes over each batch."""
    num_minibatches: int = 2
    """optimiser steps per epoch (must divide num_prompts * group_size)."""
    learning_rate: float = 3e-4
    """Adam learning rate of the RL updates."""
    max_grad_norm: float = 1.0
    """global gradient-norm clip (0 disables)."""
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
    """GAE lambda of token-level advantages (losses with a value term, gamma = 1)."""
    sampler_dtype: str = "float32"
    """precision of the rollout engine: float32 (the trainer's), bfloat16 or float16 (a copy of the
    parameters in that dtype samples, activations and KV cache included; the trainer stays float32). Its
    log-probs of the sampled tokens are the loss's logp_sampler (the three-policy setup); at a temperature
    other than 1 they are the tempered distribution's, so the mismatch includes the temperature."""
    mismatch_band: tuple[float, float] = (0.5, 5.0)
    """band of rho = pi_theta / pi_sampler per token; the fraction of tokens outside it is logged as
    sampler_outside_band (default: IcePop's [0.5, 5])."""
    old_policy: losses.ReferenceConfig = losses.ReferenceConfig("sync", every=1)
    """pi_old of the ratio: sync every 1 update (the policy that sampled the batch), or sync every k, or
    an EMA of past iterates (Hilton et al. 2021; pair with --loss.correction tis)."""
    reference: losses.ReferenceConfig = losses.ReferenceConfig("fixed")
    """pi_ref of the KL term: fixed (the warm start), sync every k updates, or an EMA (TRL's
    sync_ref_model, ref_model_sync_steps, ref_model_mixup_alpha)."""
    d_model: int = 64
    """transformer width."""
    num_layers: int = 2
    """transformer blocks."""
    num_heads: int = 4
    """attention heads (must divide d_model)."""
    corpus_size: int = 8000
    """examples in the warm start's base corpus."""
    sft_steps: int = 800
    """Adam steps of the supervised warm start."""
    sft_batch_size: int = 64
    """examples per warm-start step."""
    sft_learning_rate: float = 2e-3
    """Adam learning rate of the warm start."""
    eval_prompts: int = 64
    """held-out prompts scored every update (one sampled and one greedy answer each); 0: none."""
    final_eval_prompts: int = 256
    """held-out prompts of the final evaluation."""
    pass_k: int = 8
    """samples per held-out prompt in the final evaluation (pass@k)."""
    updates_per_chunk: int = 20
    """updates per jitted chunk: progress line, metrics and checkpoint after each chunk."""
    tensorboard: bool = True
    """write TensorBoard event files next to metrics.jsonl (--no-tensorboard: none). Never saved."""
    mesh: runs.MeshConfig = runs.MeshConfig()
    """device mesh: seeds x data devices, the prompt groups of each seed split over data (default: all
    devices on data, or the most of them that divide num_prompts). Never saved: a run resumes on any mesh."""
    run_dir: str | None = None
    """run folder; default runs/lm/<algo>-<task>-<hash of the config>. Never saved in the config."""
    warm_start_dir: str | None = None
    """folder caching the warm start (default: the run folder); equal warm-start fields share one file."""

    def __post_init__(self):
        validate.one_of("task", self.task, sorted(text_tasks.TASKS))
        try:
            knobs = json.loads(self.task_knobs)
        except json.JSONDecodeError as e:
            validate.fail(f"task_knobs is not JSON: {e}")
        validate.check(isinstance(knobs, dict), f"task_knobs must be a JSON object, got {self.task_knobs!r}")
        try:
            text_tasks.make_task(self.task, **knobs)
        except (TypeError, ValueError) as e:
            validate.fail(f"task knobs: {e}")
        validate.one_of("algo", self.algo, sorted(losses.PRESETS))
        if self.loss is None:
            object.__setattr__(self, "loss", losses.PRESETS[self.algo])
        validate.check(isinstance(self.loss, losses.LossConfig),
                       f"loss must be a LossConfig, got {self.loss!r}")
        for name in ("num_seeds", "num_updates", "num_epochs", "num_minibatches", "d_model", "num_layers",
                     "num_heads", "corpus_size", "sft_batch_size", "final_eval_prompts", "pass_k",
                     "updates_per_chunk"):
            validate.integer(name, getattr(self, name), minimum=1)
        validate.integer("seed", self.seed, minimum=0, maximum=runs.MAX_SEED)
        validate.integer("sft_steps", self.sft_steps, minimum=0)
        validate.integer("eval_prompts", self.eval_prompts, minimum=0)
        validate.check(self.batch_size % self.num_minibatches == 0,
                       f"num_minibatches={self.num_minibatches} does not divide the batch num_prompts * "
                       f"group_size = {self.batch_size}")
        validate.positive("learning_rate", self.learning_rate)
        validate.positive("sft_learning_rate", self.sft_learning_rate)
        validate.non_negative("max_grad_norm", self.max_grad_norm)
        validate.in_range("gae_lambda", self.gae_lambda, 0.0, 1.0)
        validate.one_of("sampler_dtype", self.sampler_dtype, sampling.SAMPLER_DTYPES)
        validate.check(len(self.mismatch_band) == 2,
                       f"mismatch_band is (low, high), got {self.mismatch_band!r}")
        for bound in self.mismatch_band:
            validate.positive("mismatch_band", bound)
        validate.check(self.mismatch_band[0] < self.mismatch_band[1],
                       f"mismatch_band needs low < high, got {self.mismatch_band!r}")
        for name in ("old_policy", "reference"):
            validate.check(isinstance(getattr(self, name), losses.ReferenceConfig),
                           f"{name} must be a ReferenceConfig, got {getattr(self, name)!r}")
        validate.check(self.d_model % self.num_heads == 0,
                       f"d_model {self.d_model} not divisible by num_heads")
        validate.integer("pass_k", self.pass_k, minimum=1)
        if self.overlong == "soft":
            length = self.make_task().max_response_len
            validate.integer("overlong_cache", self.overlong_cache, minimum=1, maximum=length)

    @property
    def sampling(self) -> generation.SamplingConfig:
        """The sampling fields as the library's `SamplingConfig` (validated there)."""
        return generation.SamplingConfig(
            num_prompts=self.num_prompts, group_size=self.group_size, temperature=self.temperature,
            dynamic_sampling=self.dynamic_sampling, max_sampling_rounds=self.max_sampling_rounds,
            overlong=self.overlong, overlong_cache=self.overlong_cache)

    @property
    def batch_size(self) -> int:
        return self.sampling.batch_size

    def make_task(self):
        return text_tasks.make_task(self.task, **json.loads(self.task_knobs))

    def make_model(self) -> TransformerLM:
        task = self.make_task()
        return TransformerLM(
            vocab_size=text_tasks.VOCAB_SIZE, max_len=task.prompt_len + task.max_response_len,
            d_model=self.d_model, num_layers=self.num_layers, num_heads=self.num_heads, value_head=True)


def default_config(algo: str = "grpo", **overrides: Any) -> LMConfig:
    """The config of `algo` with `overrides`; keys may be dotted paths into the loss
    (`default_config("dapo", **{"loss.gate.eps_high": 0.3})`)."""
    return runs.replace_fields(LMConfig(algo=algo), overrides)


# --- warm start -------------------------------------------------------------------------------------


def supervised_warm_start(config: LMConfig, key: jax.Array) -> Any:
    """Fit the model to the task's base corpus by maximum likelihood of the response tokens (the SFT stage
    of 004's RLHF pipeline): `sft_steps` Adam steps on minibatches of `sft_batch_size`. Returns params."""
    task, model = config.make_task(), config.make_model()
    corpus_key, init_key, batch_key = jax.random.split(key, 3)
    prompts, responses = task.base_corpus(corpus_key, config.corpus_size)
    mask = sampling.response_mask(responses, text_tasks.EOS)
    params = init_params(model, init_key)
    tx = optim.make_optimizer(config.sft_learning_rate, 1.0, config.sft_steps or None)

    def nll(params, rows):
        forced = sampling.sequence_log_probs(model, params, prompts[rows], responses[rows])
        loss = -statistics.masked_mean(forced.log_probs, mask[rows])
        return loss, {}

    def step(state, step_key):
        rows = jax.random.randint(step_key, (config.sft_batch_size,), 0, config.corpus_size)
        params, opt_state, _ = optim.gradient_step(nll, tx, *state, rows)
        return (params, opt_state), None

    keys = jax.random.split(batch_key, config.sft_steps)
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), keys)
    return params


def load_or_train_warm_start(config: LMConfig, directory: str, log: Callable[[str], None] = print) -> Any:
    """The warm-start params cached in `directory` for this config's warm-start fields, trained if absent."""
    path = os.path.join(directory, f"warm_start-{runs.config_hash(config, WARM_START_FIELDS)}.npz")
    template = jax.eval_shape(lambda: init_params(config.make_model(), jax.random.PRNGKey(0)))
    if os.path.exists(path):
        log(f"warm start loaded from {path}")
        return runs.load_tree(path, template)
    log(f"warm start: {config.sft_steps} supervised steps on {config.corpus_size} corpus examples ...")
    key = jax.random.PRNGKey(config.seed + 10_000)
    params = jax.jit(supervised_warm_start, static_argnums=0)(config, key)
    os.makedirs(directory, exist_ok=True)
    runs.save_tree(path, params)
    log(f"warm start saved to {path}")
    return params


# --- training -------------------------------------------------------------------------------------------


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
        tok_mean = statistics.masked_mean(token_ratio, tok_mask)
        tok_var = statistics.masked_mean((token_ratio - tok_mean) ** 2, tok_mask)
        out[f"seq_ratio_var_len{b}"] = seq_var
        out[f"token_ratio_var_len{b}"] = tok_var
        out[f"share_len{b}"] = n_rows / jnp.maximum(jnp.sum(valid_row), 1)
    return out


@struct.dataclass
class LMCarry:
    """One seed's training state: policy params (with value head), optimiser state, PRNG key, the params
    of pi_old and pi_ref (`LMConfig.old_policy`, `LMConfig.reference`) and the number of updates done."""

    params: Any
    opt_state: Any
    key: jax.Array
    old_params: Any
    ref_params: Any
    step: jax.Array


def make_program(config: LMConfig, warm_params) -> runs.Program:
    """One seed's RL from the warm start (the initial pi_ref) as a `runs.Program`.

    Each update, pi_old and pi_ref follow the policy as `config.old_policy` and `config.reference` say
    (`losses.update_reference`); a copy of the policy in `config.sampler_dtype` samples the batch, and its
    log-probs of the sampled tokens go to the loss as `logp_sampler` (the rollout engine, the third policy
    beside pi_old and pi_theta; `loss.correction` parts weigh the tokens with them).

    Metrics per update: the rollout-trainer mismatch on the sampled tokens, with rho = pi_theta /
    pi_sampler at the sampling params (`sampler_kl_k1` = mean log(pi_sampler / pi_theta), `sampler_kl_k3`
    = mean(rho - 1 - log rho), both estimates of KL(pi_sampler || pi_theta); `sampler_outside_band`, the
    fraction of tokens with rho outside `mismatch_band`; `sampler_abs_log_ratio`, mean |log rho|);
    `kl_to_initial`, the k3 estimate of KL(pi_theta || pi_warm) on the batch; training reward and pass@1
    on the batch, mean response length (of correct and of
    incorrect answers), truncation rate, sampling entropy, the fraction of zero-variance groups in the
    first round, effective prompts (groups with signal in the batch), sampling rounds, the loss metrics of
    `polygrad.losses` (clip fractions, ratio statistics, approx KL to pi_old, KL to pi_ref, entropy, ...),
    the variance of token and sequence ratios per response-length bucket after the update, and held-out
    `eval_pass1_sampled` / `eval_pass1_greedy` on `eval_prompts` fixed test prompts (if > 0).
    """
    task, model, loss_config = config.make_task(), config.make_model(), config.loss
    tx = optim.make_optimizer(config.learning_rate, config.max_grad_norm or None)
    eval_prompts = task.sample_prompts(jax.random.PRNGKey(12345), max(config.eval_prompts, 1), "test")
    critic = loss_config.value_coef > 0
    old_is_sampler = config.old_policy == losses.ReferenceConfig("sync", every=1)  # pi_old = params
    ref_is_initial = config.reference.kind == "fixed"  # pi_ref = the warm start
    band_low, band_high = config.mismatch_band

    def teacher_forced(params, prompts, tokens):
        return sampling.sequence_log_probs(model, params, prompts, tokens)

    def advantages_of(rewards, mask, values_old):
        """Per-response `[B]` or per-token `[B, T]` advantages and the critic's targets (or None)."""
        if loss_config.advantage != "token":
            return losses.group_advantages(loss_config, rewards), None
        if critic:
            return generation.token_advantages(rewards.reshape(-1), values_old, mask, config.gae_lambda)
        return rewards.reshape(-1), None

    def loss_fn(params, mb):
        forced = teacher_forced(params, mb["prompts"], mb["tokens"])
        extra = dict(values=forced.values, values_old=mb["values"], returns=mb["returns"]) if critic else {}
        return losses.policy_loss(loss_config, forced.log_probs, mb["log_probs"], mb["advantages"],
                                  mb["mask"], mb["ref_log_probs"], forced.entropies,
                                  logp_sampler=mb["sampler_log_probs"], **extra)

    def init(key):
        return LMCarry(warm_params, tx.init(warm_params), key, warm_params, warm_params, jnp.int32(0))

    def update(carry: LMCarry):
        key, collect_key, epoch_key, eval_key = jax.random.split(carry.key, 4)
        params = carry.params
        old_params = losses.update_reference(config.old_policy, carry.old_params, params, carry.step)
        ref_params = losses.update_reference(config.reference, carry.ref_params, params, carry.step)
        sampler_params = sampling.cast_params(params, config.sampler_dtype)
        groups, valid, stats = generation.collect(config.sampling, task, model, sampler_params, collect_key,
                                                  **TOKENS)
        # whole groups per device on the mesh's data axis (the identity on one device)
        groups, valid = sharding.constrain((groups, valid), batch_axis=0)
        flat = jax.tree.map(lambda x: x.reshape((config.batch_size, *x.shape[2:])), groups)
        valid_rows = jnp.repeat(valid, config.group_size)
        mask = flat.mask * valid_rows[:, None]
        if config.overlong == "mask":
            mask = shaping.mask_truncated(mask, flat.truncated)
        current = teacher_forced(params, flat.prompts, flat.tokens)
        old = current if old_is_sampler else teacher_forced(old_params, flat.prompts, flat.tokens)
        initial = teacher_forced(warm_params, flat.prompts, flat.tokens)
        ref = initial if ref_is_initial else teacher_forced(ref_params, flat.prompts, flat.tokens)
        advantages, value_targets = advantages_of(groups.reward, mask, current.values)
        batch = {"prompts": flat.prompts, "tokens": flat.tokens, "log_probs": old.log_probs,
                 "ref_log_probs": ref.log_probs, "sampler_log_probs": flat.log_probs,
                 "advantages": advantages, "mask": mask}
        if critic:
            batch.update(values=current.values, returns=value_targets)
        batch = sharding.constrain(batch, batch_axis=0)
        new_params, opt_state, loss_metrics = optim.minibatch_epochs(
            loss_fn, tx, params, carry.opt_state, batch, epoch_key, config.num_epochs, config.num_minibatches)

        after = teacher_forced(new_params, flat.prompts, flat.tokens)
        log_ratio = jnp.clip(after.log_probs - old.log_probs, -20.0, 20.0) * mask
        ratio_stats = _length_bucket_variances(log_ratio, mask, flat.lengths, task.max_response_len)

        response_mask = flat.mask * valid_rows[:, None]
        active = response_mask > 0
        log_rho = jnp.where(active, jnp.clip(current.log_probs - flat.log_probs, -20.0, 20.0), 0.0)
        outside_band = (log_rho < np.log(band_low)) | (log_rho > np.log(band_high))
        to_initial = jnp.where(active, initial.log_probs - current.log_probs, 0.0)
        mismatch = {
            "sampler_kl_k1": statistics.masked_mean(-log_rho, response_mask),
            "sampler_kl_k3": statistics.masked_mean(jnp.expm1(log_rho) - log_rho, response_mask),
            "sampler_outside_band": statistics.masked_mean(outside_band.astype(jnp.float32), response_mask),
            "sampler_abs_log_ratio": statistics.masked_mean(jnp.abs(log_rho), response_mask),
            "kl_to_initial": statistics.masked_mean(jnp.expm1(to_initial) - to_initial, response_mask),
        }
        row = valid_rows.astype(jnp.float32)
        correct = flat.correct.astype(jnp.float32) * row
        wrong = (1.0 - flat.correct.astype(jnp.float32)) * row
        length = flat.lengths.astype(jnp.float32)
        metrics = {
            "reward": statistics.masked_mean(flat.reward, row),
            "pass1_train": statistics.masked_mean(correct, row),
            "response_length": statistics.masked_mean(length, row),
            "length_correct": jnp.sum(length * correct) / jnp.maximum(jnp.sum(correct), 1.0),
            "length_incorrect": jnp.sum(length * wrong) / jnp.maximum(jnp.sum(wrong), 1.0),
            "truncation_rate": statistics.masked_mean(flat.truncated.astype(jnp.float32), row),
            "sample_entropy": statistics.masked_mean(flat.entropies, response_mask),
            **stats,
            **loss_metrics,
            **ratio_stats,
            **mismatch,
        }
        if config.eval_prompts:
            ev_sampled = generation.generate_groups(task, model, params, eval_key, eval_prompts, 1, **TOKENS)
            ev_greedy = sampling.sample(model, params, eval_key, eval_prompts, task.max_response_len,
                                        temperature=0.0, **TOKENS)
            metrics["eval_pass1_sampled"] = jnp.mean(ev_sampled.correct.astype(jnp.float32))
            metrics["eval_pass1_greedy"] = jnp.mean(task.score(eval_prompts, ev_greedy.tokens).correct)
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        return LMCarry(new_params, opt_state, key, old_params, ref_params, carry.step + 1), metrics

    return runs.Program(init, update, config.num_updates, config.batch_size)


# --- evaluation -------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1, 5, 6))
def _evaluate_many(task, model, params, ref_params, keys, num_prompts, pass_k):
    return jax.vmap(lambda p, k: generation.evaluate(task, model, p, ref_params, k, num_prompts, pass_k,
                                                     **TOKENS))(params, keys)


def evaluate_seeds(config: LMConfig, params, ref_params, seed: int = 0) -> dict[str, list[float]]:
    """`generation.evaluate` of every seed's params (leaves `[S, ...]`) with the config's final-evaluation
    sizes, as lists of floats per metric (compiled once per task, model and sizes)."""
    num_seeds = jax.tree.leaves(params)[0].shape[0]
    keys = jax.random.split(jax.random.PRNGKey(seed + 777), num_seeds)
    out = _evaluate_many(config.make_task(), config.make_model(), params, ref_params, keys,
                         config.final_eval_prompts, config.pass_k)
    return {k: [float(x) for x in np.asarray(v)] for k, v in out.items()}


def build_mesh(config: LMConfig, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh | None:
    """The run's device mesh (`runs.build_mesh` of `config.mesh` over the seeds and prompt groups)."""
    return runs.build_mesh(config.mesh, config.num_seeds, config.num_prompts, devices)


def train(config: LMConfig, run_dir: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Warm start (cached), RL in the run folder (resumable), final held-out evaluation (`eval.json`).

    Returns `{"run_dir", "warm_start": eval of the reference, "final": eval per seed, "metrics": {name:
    [S, U]}}`.
    """
    run_dir = run_dir or config.run_dir or runs.default_run_dir("lm", f"{config.algo}-{config.task}", config)
    warm = load_or_train_warm_start(config, config.warm_start_dir or run_dir, log)
    one = jax.tree.map(lambda x: x[None], warm)
    warm_eval = {k: v[0] for k, v in evaluate_seeds(config, one, warm, config.seed).items()}
    log("warm start (reference policy) on held-out prompts: "
        + ", ".join(f"{k} {v:.3f}" for k, v in warm_eval.items()))
    mesh = build_mesh(config)
    if mesh is not None:
        log(f"mesh {dict(mesh.shape)}")
    result = runs.run(
        make_program(config, warm), config, run_dir, seed=config.seed, num_seeds=config.num_seeds,
        updates_per_chunk=config.updates_per_chunk, curve_metric="eval_pass1_sampled",
        title=f"{config.algo} on {config.task}", log=log, mesh=mesh,
        tensorboard=config.tensorboard)
    final = evaluate_seeds(config, result.carry.params, warm, config.seed)
    log("final on held-out prompts (mean over seeds): "
        + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in final.items()))
    with open(os.path.join(run_dir, "eval.json"), "w") as f:
        json.dump({"warm_start": warm_eval, "final": final}, f, indent=2)
    return {"run_dir": run_dir, "warm_start": warm_eval, "final": final, "metrics": result.metrics}


def parse_config(argv: Sequence[str] | None = None) -> LMConfig:
    """`--algo` chooses the loss preset; tyro parses the rest (`--loss.gate.eps-high 4`, ...)."""
    (algo,) = runs.peek_args(argv, algo="grpo")
    return runs.parse(LMConfig, LMConfig(algo=algo), argv,
                      description=f"--algo {algo} (choose with --algo: {', '.join(sorted(losses.PRESETS))})")


def main(argv: Sequence[str] | None = None) -> None:
    runs.main(lambda: train(parse_config(argv)))


if __name__ == "__main__":
    main()
