"""RLHF at toy scale: SFT, preference pairs, a Bradley-Terry reward model, RL against it, DPO, best-of-n,
and reward-model over-optimisation (Gao, Schulman, Hilton 2022).

    python -m experiments.rlhf                                   # the default study (see docs/rlhf.md)
    python -m experiments.rlhf --num-pairs 500 --ppo-kl-coefs 0.0 0.05 --methods ppo bon
    python -m experiments.rlhf --help

The pipeline of 004 ("PPO - RLHF") and InstructGPT (Ouyang et al. 2022) on `envs.preferences.
GradedLetters`, a task whose gold reward is hidden from every learner:

1. SFT: a small causal transformer fit by maximum likelihood to the task's corpus (`polygrad.lm.supervised`).
2. pool: ``bon_prompts x bon_n_max`` SFT samples on held-out prompts; they standardise the gold and proxy
   rewards (mean 0, std 1 under the SFT policy) and serve best-of-n.
3. preferences: pairs of SFT samples for the same training prompt, labelled by Bradley-Terry on the gold
   reward at ``label_temperature`` (`envs.preferences.label_pairs`), in blocks of fixed keys so that the
   first n pairs do not depend on how many are drawn; held-out pairs on held-out prompts.
4. reward models: the SFT transformer with its value head read at the last response token as the scalar
   head, fit with the Bradley-Terry loss; one on ``num_pairs`` pairs and one per ``rm_data_scales`` entry.
5. RL against the frozen reward model, the SFT model frozen as the reference:
   ``ppo``: token-level PPO with a critic on the policy's value head, GAE (gamma 1) over per-token rewards
   that fold in the KL penalty -beta (log pi_old - log pi_SFT) (InstructGPT eq. 2), one run per
   ``ppo_kl_coefs`` entry and one per extra reward model (vmapped: one compilation);
   ``grpo``: the GRPO preset of `polygrad.losses` (group-normalised advantages, k3 KL in the loss).
6. ``dpo``: DPO (Rafailov et al. 2023) on the same pairs from the same SFT model, one run per ``dpo_betas``.
7. ``bon``: best-of-n from the SFT pool for n = 1, 2, 4, ... (KL = log n - (n - 1)/n).
8. evaluation and the figure: gold and proxy reward against d = sqrt(KL(pi || pi_SFT)) for every method.

Every stage is cached in the cache folder (the run folder unless ``--cache-dir``) under a hash of the fields
it depends on, so a rerun, or a run that changes only later stages, reuses the earlier ones; the RL stages
are `experiments.runs` programs, checkpointed every ``updates_per_chunk`` updates and resumed after a kill.
A bad config fails at once with one line and exit code 2.
"""

import os

# Must precede the first JAX import: XLA:CPU's concurrency-optimised scheduler can stall vmapped runs.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import dataclasses  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402
from flax import traverse_util  # noqa: E402

from envs import preferences, text_tasks  # noqa: E402
from experiments import runs  # noqa: E402
from polygrad import losses, optim, validate  # noqa: E402
from polygrad.estimators import statistics  # noqa: E402
from polygrad.lm import generation, sampling, supervised  # noqa: E402
from polygrad.lm.transformer import TransformerLM, init_params  # noqa: E402
from polygrad.losses import preference  # noqa: E402

METHODS = ("ppo", "grpo", "dpo", "bon")
PAIR_BLOCK = 250  # pairs are drawn in blocks with fixed keys: the first n pairs never depend on the total
RM_CHUNK = 25  # reward-model steps per jitted call (one compilation serves every reward model)
NUM_EXAMPLES = 3  # responses of each policy shown in the log and the summary
EOS, PAD = text_tasks.EOS, text_tasks.PAD


@dataclasses.dataclass(frozen=True)
class RLHFConfig:
    """Every field of the RLHF study (the command line, parsed by tyro)."""

    task_knobs: str = "{}"
    """JSON object of envs.preferences.GradedLetters knobs, e.g. '{"w_repeat": 1.0}'."""
    seed: int = 0
    """one integer seed for every stage."""
    d_model: int = 64
    """transformer width (policy, reference and reward model)."""
    num_layers: int = 2
    """transformer blocks."""
    num_heads: int = 4
    """attention heads (must divide d_model)."""
    corpus_size: int = 8000
    """SFT corpus examples."""
    sft_steps: int = 600
    """SFT Adam steps."""
    sft_batch_size: int = 64
    """SFT minibatch size."""
    sft_learning_rate: float = 2e-3
    """SFT learning rate (annealed linearly to 0)."""
    num_pairs: int = 2000
    """preference pairs of the main reward model (and of DPO)."""
    label_temperature: float = 0.5
    """Bradley-Terry temperature of the labels, P(a > b) = sigmoid((g_a - g_b) / T): the label noise."""
    heldout_pairs: int = 1000
    """held-out pairs (on held-out prompts) for the reward-model accuracy."""
    rm_epochs: float = 4.0
    """reward-model passes over its pairs (ceil(epochs * pairs / batch) steps, rounded up to 25s)."""
    rm_batch_size: int = 64
    """pairs per reward-model step."""
    rm_learning_rate: float = 5e-4
    """reward-model learning rate (constant)."""
    rm_data_scales: tuple[float, ...] = (0.25, 4.0)
    """extra reward models on round(scale * num_pairs) pairs, for the over-optimisation peak study."""
    reward_model_path: str | None = None
    """use a saved reward model (an rm-*.npz of a cache folder) as the main one instead of training it."""
    methods: tuple[str, ...] = METHODS
    """stages to run after the reward models: any of ppo, grpo, dpo, bon."""
    ppo_kl_coefs: tuple[float, ...] = (0.0, 0.01, 0.03, 0.1)
    """beta of the KL penalty in the reward, one PPO run each against the main reward model."""
    scale_kl_coef: float = 0.0
    """beta of the PPO runs against the extra reward models of rm_data_scales."""
    num_updates: int = 100
    """RL updates per run (PPO and GRPO)."""
    rollout_batch: int = 64
    """PPO: responses (one per prompt) per update."""
    ppo_epochs: int = 4
    """PPO: passes over each batch."""
    ppo_minibatches: int = 4
    """PPO: minibatches per pass (must divide rollout_batch)."""
    gae_lambda: float = 0.95
    """PPO: GAE lambda over the tokens (gamma = 1)."""
    learning_rate: float = 3e-4
    """RL learning rate (PPO and GRPO)."""
    max_grad_norm: float = 1.0
    """global gradient-norm clip of every stage (0: none)."""
    grpo_kl_coef: float = 0.04
    """GRPO: beta of the k3 KL to the SFT model in the loss."""
    grpo_prompts: int = 8
    """GRPO: prompts per update."""
    grpo_group_size: int = 8
    """GRPO: responses per prompt."""
    grpo_minibatches: int = 2
    """GRPO: minibatches per pass (must divide grpo_prompts * grpo_group_size); passes = ppo_epochs."""
    dpo_betas: tuple[float, ...] = (0.03, 0.1, 0.3)
    """DPO: beta of each run."""
    dpo_epochs: float = 4.0
    """DPO: passes over the num_pairs pairs."""
    dpo_batch_size: int = 64
    """DPO: pairs per step."""
    dpo_learning_rate: float = 3e-4
    """DPO: learning rate (annealed linearly to 0)."""
    bon_prompts: int = 128
    """held-out prompts of the SFT pool (best-of-n, reward normalisation)."""
    bon_n_max: int = 64
    """SFT samples per pool prompt; best-of-n for n = 1, 2, 4, ... up to it."""
    eval_prompts: int = 256
    """held-out prompts of the final evaluation of every policy."""
    eval_samples: int = 4
    """samples per evaluation prompt."""
    smooth: int = 5
    """moving-average window (updates) of the RL trajectories in the figure and the peaks."""
    curve_bin: float = 0.2
    """width of the bins of d = sqrt(KL) over which an RL trajectory is averaged (figure and peaks)."""
    updates_per_chunk: int = 20
    """RL updates between progress lines and checkpoints."""
    run_dir: str | None = None
    """run folder (summary, figure, config); default runs/rlhf/rlhf-<hash of the config>."""
    cache_dir: str | None = None
    """folder of the cached stages (default: the run folder); runs may share one."""

    def __post_init__(self):
        self.make_task()  # checks the knobs
        validate.integer("seed", self.seed, minimum=0, maximum=2**32 - 1)
        for name in ("d_model", "num_layers", "num_heads", "corpus_size", "sft_batch_size", "rm_batch_size",
                     "num_updates", "rollout_batch", "ppo_epochs", "ppo_minibatches", "grpo_prompts",
                     "grpo_minibatches", "dpo_batch_size", "bon_prompts", "bon_n_max", "eval_prompts",
                     "eval_samples", "smooth", "updates_per_chunk", "heldout_pairs"):
            validate.integer(name, getattr(self, name), minimum=1)
        validate.integer("num_pairs", self.num_pairs, minimum=1)
        validate.integer("sft_steps", self.sft_steps, minimum=0)
        validate.integer("grpo_group_size", self.grpo_group_size, minimum=2)
        validate.check(self.d_model % self.num_heads == 0,
                       f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        validate.positive("label_temperature", self.label_temperature)
        for name in ("sft_learning_rate", "rm_learning_rate", "learning_rate", "dpo_learning_rate",
                     "rm_epochs", "dpo_epochs"):
            validate.positive(name, getattr(self, name))
        validate.non_negative("max_grad_norm", self.max_grad_norm)
        validate.in_range("gae_lambda", self.gae_lambda, 0.0, 1.0)
        validate.non_negative("grpo_kl_coef", self.grpo_kl_coef)
        validate.non_negative("scale_kl_coef", self.scale_kl_coef)
        validate.positive("curve_bin", self.curve_bin)
        for method in self.methods:
            validate.one_of("methods", method, METHODS)
        validate.check("ppo" not in self.methods or len(self.ppo_kl_coefs) > 0,
                       "ppo_kl_coefs is empty; give at least one coefficient or drop ppo from methods")
        for beta in self.ppo_kl_coefs:
            validate.non_negative("ppo_kl_coefs", beta)
        validate.check("dpo" not in self.methods or len(self.dpo_betas) > 0,
                       "dpo_betas is empty; give at least one beta or drop dpo from methods")
        for beta in self.dpo_betas:
            validate.positive("dpo_betas", beta)
        for scale in self.rm_data_scales:
            validate.positive("rm_data_scales", scale)
            validate.check(round(scale * self.num_pairs) >= 1,
                           f"rm_data_scales: {scale} x num_pairs {self.num_pairs} leaves no pairs")
        validate.check(self.rollout_batch % self.ppo_minibatches == 0,
                       f"ppo_minibatches={self.ppo_minibatches} does not divide "
                       f"rollout_batch={self.rollout_batch}")
        validate.check((self.grpo_prompts * self.grpo_group_size) % self.grpo_minibatches == 0,
                       f"grpo_minibatches={self.grpo_minibatches} does not divide "
                       "grpo_prompts * grpo_group_size")
        if self.reward_model_path is not None:
            check_reward_model_file(self.reward_model_path, self.make_model())

    def make_task(self) -> preferences.GradedLetters:
        try:
            knobs = json.loads(self.task_knobs)
        except json.JSONDecodeError as e:
            validate.fail(f"task_knobs is not JSON: {e}")
        validate.check(isinstance(knobs, dict), f"task_knobs must be a JSON object, got {self.task_knobs!r}")
        try:
            return preferences.GradedLetters(**knobs)
        except (TypeError, ValueError) as e:
            validate.fail(f"task_knobs: {e}")

    def make_model(self) -> TransformerLM:
        task = self.make_task()
        return TransformerLM(vocab_size=text_tasks.VOCAB_SIZE,
                             max_len=task.prompt_len + task.max_response_len, d_model=self.d_model,
                             num_layers=self.num_layers, num_heads=self.num_heads, value_head=True)

    def pair_counts(self) -> list[int]:
        """Pairs of the main reward model, then of each extra one."""
        return [self.num_pairs] + [round(s * self.num_pairs) for s in self.rm_data_scales]


# --- files -------------------------------------------------------------------------------------------


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _fields(config: RLHFConfig, *names: str) -> dict[str, Any]:
    return {name: getattr(config, name) for name in names}


def _model_meta(model: TransformerLM) -> dict[str, int]:
    return {"vocab_size": model.vocab_size, "max_len": model.max_len, "d_model": model.d_model,
            "num_layers": model.num_layers, "num_heads": model.num_heads}


def save_params(path: str, params: Any, model: TransformerLM, **info: Any) -> None:
    """Parameters (keys are their paths, e.g. ``params/token_embedding/embedding``), the model's shape and
    any JSON-able ``info``, atomically."""
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    arrays = {f"param:{k}": np.asarray(v) for k, v in flat.items()}
    arrays["meta"] = np.asarray(json.dumps({"model": _model_meta(model), **info}))
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_params(path: str) -> tuple[Any, dict[str, Any]]:
    """``(params, meta)`` saved by `save_params`."""
    with np.load(path) as data:
        flat = {k[len("param:"):]: jnp.asarray(data[k]) for k in data.files if k.startswith("param:")}
        meta = json.loads(str(data["meta"]))
    return traverse_util.unflatten_dict(flat, sep="/"), meta


def check_reward_model_file(path: str, model: TransformerLM) -> None:
    """Refuse (ConfigError, one line) a saved reward model that this task and model cannot use."""
    validate.check(os.path.exists(path), f"reward_model_path {path} does not exist")
    try:
        params, meta = load_params(path)
        embedding = params["params"]["token_embedding"]["embedding"]
        params["params"]["value_out"]  # noqa: B018  (a scalar head must be there)
    except Exception as e:  # noqa: BLE001  (any unreadable file gets the same one-line message)
        validate.fail(f"reward_model_path {path} is not a saved reward model ({type(e).__name__}: {e})")
    vocab = int(embedding.shape[0])
    validate.check(vocab == model.vocab_size,
                   f"reward model {path} has a vocabulary of {vocab} tokens, the task has {model.vocab_size}")
    want = _model_meta(model)
    got = meta.get("model", {})
    diffs = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
    validate.check(not diffs, f"reward model {path} has another shape than the policy model (saved vs now: "
                              f"{diffs})")


def _json_dump(path: str, data: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


# --- stages: SFT, pool, preferences, reward models ----------------------------------------------------


class Context(NamedTuple):
    """What every stage needs: the config, task, model, folders and the log."""

    config: RLHFConfig
    task: preferences.GradedLetters
    model: TransformerLM
    cache: str
    log: Callable[[str], None]


def _timed(ctx: Context, what: str):
    start = time.perf_counter()

    def done(extra: str = ""):
        ctx.log(f"[{what}] done in {time.perf_counter() - start:.1f} s{extra}")

    ctx.log(f"[{what}] ...")
    return done


def sft_key(config: RLHFConfig) -> str:
    return _hash(_fields(config, "task_knobs", "seed", "d_model", "num_layers", "num_heads", "corpus_size",
                         "sft_steps", "sft_batch_size", "sft_learning_rate", "max_grad_norm"))


def sft_stage(ctx: Context) -> Any:
    """The SFT policy (also the reference and the reward models' initialisation), cached."""
    c = ctx.config
    path = os.path.join(ctx.cache, f"sft-{sft_key(c)}.npz")
    if os.path.exists(path):
        ctx.log(f"[sft] cached: {path}")
        return load_params(path)[0]
    done = _timed(ctx, f"sft: {c.sft_steps} steps on {c.corpus_size} corpus examples")
    corpus_key, init_key, batch_key = jax.random.split(jax.random.PRNGKey(c.seed), 3)
    prompts, responses = ctx.task.base_corpus(corpus_key, c.corpus_size)
    mask = sampling.response_mask(responses, EOS)
    params = jax.jit(init_params, static_argnums=0)(ctx.model, init_key)
    tx = optim.make_optimizer(c.sft_learning_rate, c.max_grad_norm or None, c.sft_steps or None)
    fit = jax.jit(supervised.fit_supervised, static_argnums=(0, 2, 7, 8))
    out = fit(ctx.model, params, tx, prompts, responses, mask, batch_key, c.sft_steps, c.sft_batch_size)
    nll = np.asarray(out.metrics["nll"])
    save_params(path, out.params, ctx.model, nll_first=float(nll[0]) if len(nll) else None,
                nll_last=float(nll[-1]) if len(nll) else None)
    done(f"; nll {nll[0]:.3f} -> {nll[-1]:.3f}" if len(nll) else "")
    return out.params


class Pool(NamedTuple):
    """SFT samples ``[bon_prompts * bon_n_max, ...]`` on held-out prompts (prompt-major) and the gold
    reward's mean and std under the SFT policy."""

    prompts: jax.Array
    responses: jax.Array
    mask: jax.Array
    gold: jax.Array
    gold_mean: float
    gold_std: float


def _sample(ctx: Context, params, key, prompts):
    out = sampling.sample(ctx.model, params, key, prompts, ctx.task.max_response_len, eos_id=EOS, pad_id=PAD)
    return out.tokens, out.mask


def pool_stage(ctx: Context, sft) -> Pool:
    c = ctx.config
    path = os.path.join(ctx.cache, f"pool-{_hash([sft_key(c), c.bon_prompts, c.bon_n_max])}.npz")
    if os.path.exists(path):
        with np.load(path) as d:
            prompts, responses = jnp.asarray(d["prompts"]), jnp.asarray(d["responses"])
        ctx.log(f"[pool] cached: {path}")
    else:
        done = _timed(ctx, f"pool: {c.bon_n_max} SFT samples on each of {c.bon_prompts} held-out prompts")

        @jax.jit
        def make(key):
            prompt_key, sample_key = jax.random.split(key)
            prompts = ctx.task.sample_prompts(prompt_key, c.bon_prompts, "test")
            prompts = jnp.repeat(prompts, c.bon_n_max, axis=0)
            return prompts, _sample(ctx, sft, sample_key, prompts)[0]

        prompts, responses = make(jax.random.fold_in(jax.random.PRNGKey(c.seed), 1))
        tmp = f"{path}.tmp.npz"
        np.savez(tmp, prompts=np.asarray(prompts), responses=np.asarray(responses))
        os.replace(tmp, path)
        done()
    gold = ctx.task.gold_reward(prompts, responses)
    return Pool(prompts, responses, sampling.response_mask(responses, EOS), gold, float(jnp.mean(gold)),
                float(jnp.std(gold)))


def preference_stage(ctx: Context, sft) -> tuple[preferences.PreferencePairs, preferences.PreferencePairs]:
    """Training pairs (as many as the largest reward model needs) and held-out pairs, cached."""
    c = ctx.config
    total = max(c.pair_counts())
    blocks = math.ceil(total / PAIR_BLOCK)
    key = jax.random.fold_in(jax.random.PRNGKey(c.seed), 2)
    digest = _hash([sft_key(c), c.label_temperature, blocks, c.heldout_pairs])
    path = os.path.join(ctx.cache, f"pairs-{digest}.npz")
    fields = preferences.PreferencePairs._fields
    if os.path.exists(path):
        with np.load(path) as d:
            train = preferences.PreferencePairs(*(jnp.asarray(d[f"train_{f}"]) for f in fields))
            heldout = preferences.PreferencePairs(*(jnp.asarray(d[f"heldout_{f}"]) for f in fields))
        ctx.log(f"[preferences] cached: {path}")
        return train, heldout
    done = _timed(ctx, f"preferences: {blocks * PAIR_BLOCK} training pairs, {c.heldout_pairs} held-out, "
                       f"label temperature {c.label_temperature}")

    def draw(key, num, split):
        prompt_key, key_a, key_b, label_key = jax.random.split(key, 4)
        prompts = ctx.task.sample_prompts(prompt_key, num, split)
        a = _sample(ctx, sft, key_a, prompts)[0]
        b = _sample(ctx, sft, key_b, prompts)[0]
        gold_a, gold_b = ctx.task.gold_reward(prompts, a), ctx.task.gold_reward(prompts, b)
        return preferences.label_pairs(label_key, prompts, a, b, gold_a, gold_b, c.label_temperature)

    block = jax.jit(lambda k: draw(k, PAIR_BLOCK, "train"))
    parts = [block(jax.random.fold_in(key, b)) for b in range(blocks)]
    train = jax.tree.map(lambda *x: jnp.concatenate(x), *parts)
    heldout = jax.jit(lambda k: draw(k, c.heldout_pairs, "test"))(jax.random.fold_in(key, 10**6))
    arrays = {f"train_{f}": np.asarray(v) for f, v in train._asdict().items()}
    arrays.update({f"heldout_{f}": np.asarray(v) for f, v in heldout._asdict().items()})
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    ties = float(jnp.mean(train.gold_chosen == train.gold_rejected))
    agree = float(jnp.mean(train.gold_chosen > train.gold_rejected))
    done(f"; labels agree with the gold order on {agree:.3f} of the pairs ({ties:.3f} gold ties)")
    return train, heldout


def _take(pairs: preferences.PreferencePairs, n: int) -> preferences.PreferencePairs:
    return jax.tree.map(lambda x: x[:n], pairs)


def rm_key(config: RLHFConfig, n: int) -> str:
    return _hash([sft_key(config), n, _fields(config, "label_temperature", "heldout_pairs", "rm_epochs",
                                              "rm_batch_size", "rm_learning_rate")])


@functools.partial(jax.jit, static_argnums=0)
def _scores(model, params, prompts, responses):
    mask = sampling.response_mask(responses, EOS)
    return supervised.sequence_scores(model, params, prompts, responses, mask)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _reward_model_steps(model, tx_args, num_steps, batch_size, params, opt_state, pairs, key, num_rows):
    """``num_steps`` Bradley-Terry steps on pairs drawn from the first ``num_rows`` (traced) of ``pairs``."""
    tx = optim.make_optimizer(*tx_args)
    mask_w = sampling.response_mask(pairs.chosen, EOS)
    mask_l = sampling.response_mask(pairs.rejected, EOS)
    return supervised.fit_reward_model(model, params, tx, pairs.prompts, pairs.chosen, pairs.rejected, mask_w,
                                       mask_l, key, num_steps, batch_size, opt_state=opt_state,
                                       num_rows=num_rows)


def reward_model_stats(ctx: Context, rm, heldout: preferences.PreferencePairs, pool: Pool
                       ) -> dict[str, float]:
    """Held-out accuracy against the drawn labels and against the noiseless gold order (gold ties left
    out), the normalisation of the scores under the SFT policy, and their correlation with gold there."""
    r_w = _scores(ctx.model, rm, heldout.prompts, heldout.chosen)
    r_l = _scores(ctx.model, rm, heldout.prompts, heldout.rejected)
    gold_diff = heldout.gold_chosen - heldout.gold_rejected
    untied = gold_diff != 0
    right_by_gold = (r_w > r_l) == (gold_diff > 0)
    pool_scores = jnp.concatenate([_scores(ctx.model, rm, p, r) for p, r in zip(
        jnp.split(pool.prompts, 8), jnp.split(pool.responses, 8), strict=True)])
    bt_loss, _ = preference.bradley_terry_loss(r_w, r_l)
    return {
        "heldout_accuracy": float(jnp.mean(r_w > r_l)),
        "heldout_accuracy_gold_order": float(jnp.sum(right_by_gold & untied)
                                             / jnp.maximum(jnp.sum(untied), 1)),
        "heldout_bt_loss": float(bt_loss),
        "label_accuracy_of_gold": float(jnp.mean(heldout.gold_chosen > heldout.gold_rejected)),
        "score_mean_sft": float(jnp.mean(pool_scores)),
        "score_std_sft": float(jnp.std(pool_scores)),
        "gold_correlation_sft": float(jnp.corrcoef(pool_scores, pool.gold)[0, 1]),
    }


def reward_model_stage(ctx: Context, sft, train: preferences.PreferencePairs,
                       heldout: preferences.PreferencePairs, pool: Pool, n: int,
                       path_override: str | None = None) -> tuple[Any, dict[str, Any]]:
    """A reward model on the first ``n`` training pairs (or the saved one at ``path_override``), cached,
    with `reward_model_stats`. Adam at a constant learning rate for ceil(rm_epochs * n / rm_batch_size)
    steps rounded up to a multiple of RM_CHUNK."""
    c = ctx.config
    if path_override is not None:
        rm, meta = load_params(path_override)
        stats = reward_model_stats(ctx, rm, heldout, pool)
        ctx.log(f"[reward model] loaded {path_override}: held-out accuracy {stats['heldout_accuracy']:.3f}")
        return rm, {**meta.get("stats", {}), **stats, "pairs": meta.get("pairs"), "path": path_override}
    path = os.path.join(ctx.cache, f"rm-{rm_key(c, n)}.npz")
    if os.path.exists(path):
        rm, meta = load_params(path)
        ctx.log(f"[reward model, {n} pairs] cached: {path}")
        return rm, {**meta["stats"], "pairs": n, "path": path}
    calls = max(1, math.ceil(c.rm_epochs * n / c.rm_batch_size / RM_CHUNK))
    steps = calls * RM_CHUNK
    done = _timed(ctx, f"reward model, {n} pairs: {steps} Bradley-Terry steps from the SFT parameters")
    tx_args = (c.rm_learning_rate, c.max_grad_norm or None)
    params, opt_state = sft, optim.make_optimizer(*tx_args).init(sft)
    key = jax.random.fold_in(jax.random.PRNGKey(c.seed), 3)
    accuracy = []
    for i in range(calls):
        out = _reward_model_steps(ctx.model, tx_args, RM_CHUNK, c.rm_batch_size, params, opt_state, train,
                                  jax.random.fold_in(key, i), n)
        params, opt_state = out.params, out.opt_state
        accuracy.append(np.asarray(out.metrics["accuracy"]))
    accuracy = np.concatenate(accuracy)
    stats = reward_model_stats(ctx, params, heldout, pool)
    stats["train_accuracy"] = float(np.mean(accuracy[-max(1, steps // 10):]))
    stats["steps"] = steps
    save_params(path, params, ctx.model, stats=stats, pairs=n)
    done(f"; train accuracy {stats['train_accuracy']:.3f}, held-out {stats['heldout_accuracy']:.3f} "
         f"(gold order {stats['heldout_accuracy_gold_order']:.3f}), corr with gold on SFT samples "
         f"{stats['gold_correlation_sft']:.3f}")
    return params, {**stats, "pairs": n, "path": path}


# --- RL against the frozen reward model ------------------------------------------------------------------


class Scorer(NamedTuple):
    """The frozen reward models ``[R, ...]`` (stacked), their normalisation under the SFT policy ``[R]`` and
    the gold reward's: proxy = (r - mean) / std, gold_z = (g - gold_mean) / gold_std."""

    rm_params: Any
    rm_mean: jax.Array
    rm_std: jax.Array
    gold_mean: float
    gold_std: float


class PolicyCarry(NamedTuple):
    params: Any
    opt_state: Any
    key: jax.Array


def _proxy(ctx: Context, scorer: Scorer, rm_index, prompts, responses, mask):
    rm = jax.tree.map(lambda x: x[rm_index], scorer.rm_params)
    raw = supervised.sequence_scores(ctx.model, rm, prompts, responses, mask)
    return (raw - scorer.rm_mean[rm_index]) / scorer.rm_std[rm_index]


def _batch_metrics(ctx: Context, scorer: Scorer, prompts, responses, mask, entropies, proxy, kl):
    gold = (ctx.task.gold_reward(prompts, responses) - scorer.gold_mean) / scorer.gold_std
    features = ctx.task.features(prompts, responses)
    return {
        "proxy": jnp.mean(proxy),
        "gold": jnp.mean(gold),
        "kl": jnp.mean(kl),
        "length": jnp.mean(features["length"]),
        "repetition": jnp.mean(features["repetition"]),
        "liked": jnp.mean(features["liked"]),
        "entropy": statistics.masked_mean(entropies, mask),
    }


def ppo_program(ctx: Context, sft, scorer: Scorer, betas: list[float], rm_indices: list[int],
                labels: list[str]) -> runs.Program:
    """Token-level PPO against frozen reward models, KL to the SFT model in the reward (InstructGPT eq. 2),
    one entry per (beta, reward model), vmapped. Metrics ``<label>/<name>`` per update: proxy and gold
    reward (standardised under the SFT policy), kl (mean sum of log pi_old / pi_SFT per response, an
    unbiased estimate of KL(pi_old || pi_SFT)), length, repetition, liked letters, entropy, the KL-penalised
    objective, clip fraction and the critic's explained variance."""
    c = ctx.config
    tx = optim.make_optimizer(c.learning_rate, c.max_grad_norm or None)
    loss_fn = losses.make_loss("ppo", entropy_coef=0.0)  # clip 0.2, clipped value loss, whitened advantages
    betas_arr, rm_arr = jnp.asarray(betas, jnp.float32), jnp.asarray(rm_indices, jnp.int32)
    model = ctx.model

    def one_update(carry: PolicyCarry, beta, rm_index):
        key, prompt_key, sample_key, epoch_key = jax.random.split(carry.key, 4)
        params = carry.params
        prompts = ctx.task.sample_prompts(prompt_key, c.rollout_batch, "train")
        out = sampling.sample(model, params, sample_key, prompts, ctx.task.max_response_len, eos_id=EOS,
                              pad_id=PAD)
        old = sampling.sequence_log_probs(model, params, prompts, out.tokens)
        ref = sampling.sequence_log_probs(model, sft, prompts, out.tokens)
        proxy = _proxy(ctx, scorer, rm_index, prompts, out.tokens, out.mask)
        token_rewards, kl = preference.kl_penalized_rewards(proxy, old.log_probs, ref.log_probs, out.mask,
                                                            beta)
        advantages, targets = generation.token_advantages(token_rewards, old.values, out.mask, c.gae_lambda)
        batch = (prompts, out.tokens, out.mask, old.log_probs, old.values, advantages, targets)

        def minibatch_loss(p, b):
            prompts, tokens, mask, logp_old, values_old, adv, ret = b
            forced = sampling.sequence_log_probs(model, p, prompts, tokens)
            return loss_fn(forced.log_probs, logp_old, adv, mask, None, forced.entropies,
                           values=forced.values, values_old=values_old, returns=ret)

        params, opt_state, loss_metrics = optim.minibatch_epochs(
            minibatch_loss, tx, params, carry.opt_state, batch, epoch_key, c.ppo_epochs, c.ppo_minibatches)
        metrics = _batch_metrics(ctx, scorer, prompts, out.tokens, out.mask, out.entropies, proxy, kl)
        metrics.update(objective=metrics["proxy"] - beta * metrics["kl"],
                       clip_frac=loss_metrics["clip_frac_low"] + loss_metrics["clip_frac_high"],
                       explained_variance=loss_metrics["explained_variance"])
        return PolicyCarry(params, opt_state, key), metrics

    def init(key):
        keys = jax.random.split(key, len(betas))
        return jax.vmap(lambda k: PolicyCarry(sft, tx.init(sft), k))(keys)

    def update(carry):
        carry, metrics = jax.vmap(one_update)(carry, betas_arr, rm_arr)
        flat = {f"{label}/{name}": v[i] for name, v in metrics.items() for i, label in enumerate(labels)}
        return carry, {k: v.astype(jnp.float32) for k, v in flat.items()}

    return runs.Program(init, update, c.num_updates, c.rollout_batch)


def grpo_program(ctx: Context, sft, scorer: Scorer, label: str) -> runs.Program:
    """GRPO against the main reward model: group-normalised advantages of the proxy reward, the preset's
    clipped loss with the k3 KL to the SFT model in the loss (`losses.make_loss("grpo", kl_coef=...)`).
    Metrics as `ppo_program`."""
    c = ctx.config
    tx = optim.make_optimizer(c.learning_rate, c.max_grad_norm or None)
    loss_fn = losses.make_loss("grpo", kl_coef=c.grpo_kl_coef)
    model, p, g = ctx.model, c.grpo_prompts, c.grpo_group_size

    def update(carry: PolicyCarry):
        key, prompt_key, sample_key, epoch_key = jax.random.split(carry.key, 4)
        params = carry.params
        prompts = jnp.repeat(ctx.task.sample_prompts(prompt_key, p, "train"), g, axis=0)
        out = sampling.sample(model, params, sample_key, prompts, ctx.task.max_response_len, eos_id=EOS,
                              pad_id=PAD)
        old = sampling.sequence_log_probs(model, params, prompts, out.tokens)
        ref = sampling.sequence_log_probs(model, sft, prompts, out.tokens)
        proxy = _proxy(ctx, scorer, 0, prompts, out.tokens, out.mask)
        advantages = losses.group_advantages(loss_fn.config, proxy.reshape(p, g))
        kl = jnp.sum((old.log_probs - ref.log_probs) * out.mask, axis=1)
        batch = (prompts, out.tokens, out.mask, old.log_probs, ref.log_probs, advantages)

        def minibatch_loss(q, b):
            prompts, tokens, mask, logp_old, logp_ref, adv = b
            forced = sampling.sequence_log_probs(model, q, prompts, tokens)
            return loss_fn(forced.log_probs, logp_old, adv, mask, logp_ref, forced.entropies)

        params, opt_state, loss_metrics = optim.minibatch_epochs(
            minibatch_loss, tx, params, carry.opt_state, batch, epoch_key, c.ppo_epochs, c.grpo_minibatches)
        metrics = _batch_metrics(ctx, scorer, prompts, out.tokens, out.mask, out.entropies, proxy, kl)
        metrics.update(clip_frac=loss_metrics["clip_frac_low"] + loss_metrics["clip_frac_high"],
                       kl_ref_loss_term=loss_metrics["kl_ref"])
        metrics = {f"{label}/{k}": v.astype(jnp.float32) for k, v in metrics.items()}
        return PolicyCarry(params, opt_state, key), metrics

    def init(key):
        return PolicyCarry(sft, tx.init(sft), key)

    return runs.Program(init, update, c.num_updates, p * g)


def rl_stage(ctx: Context, name: str, program: runs.Program, stage_config: dict[str, Any], curve: str
             ) -> tuple[Any, dict[str, np.ndarray]]:
    """Run (or resume) an RL program in its own folder of the cache; returns the final carry (seed axis
    squeezed) and the metrics ``{name: [num_updates]}``."""
    # the training state's structure is part of the key: a code change to it (an optimiser that keeps more
    # state) starts a new folder instead of refusing the old checkpoint
    state = jax.eval_shape(program.init, jax.random.PRNGKey(0))
    leaves = [(x.shape, str(x.dtype)) for x in jax.tree.leaves(state)]
    stage_config = {**stage_config, "state": _hash([str(jax.tree.structure(state)), leaves])}
    folder = os.path.join(ctx.cache, f"{name}-{_hash(stage_config)}")
    ctx.log(f"[{name}] {program.num_updates} updates in {folder}")
    result = runs.run(program, stage_config, folder, seed=ctx.config.seed, num_seeds=1,
                      updates_per_chunk=ctx.config.updates_per_chunk, curve_metric=curve, title=name,
                      log=ctx.log)
    return jax.tree.map(lambda x: x[0], result.carry), {k: v[0] for k, v in result.metrics.items()}


# --- DPO -------------------------------------------------------------------------------------------------


def dpo_stage(ctx: Context, sft, train: preferences.PreferencePairs) -> tuple[Any, dict[str, np.ndarray]]:
    """DPO from the SFT model on the main reward model's pairs, one run per beta (vmapped), cached. Returns
    params ``[num_betas, ...]`` and per-step metrics ``[num_betas, steps]``."""
    c = ctx.config
    n = c.num_pairs
    steps = math.ceil(c.dpo_epochs * n / c.dpo_batch_size)
    key = _hash([sft_key(c), n, _fields(c, "label_temperature", "dpo_betas", "dpo_epochs", "dpo_batch_size",
                                        "dpo_learning_rate")])
    path = os.path.join(ctx.cache, f"dpo-{key}.npz")
    metrics_path = os.path.join(ctx.cache, f"dpo-{key}.json")
    if os.path.exists(path) and os.path.exists(metrics_path):
        ctx.log(f"[dpo] cached: {path}")
        with open(metrics_path) as f:
            return load_params(path)[0], {k: np.asarray(v) for k, v in json.load(f).items()}
    done = _timed(ctx, f"dpo: {steps} steps on {n} pairs for beta in {list(c.dpo_betas)}")
    pairs = _take(train, n)
    mask_w = sampling.response_mask(pairs.chosen, EOS)
    mask_l = sampling.response_mask(pairs.rejected, EOS)
    tx = optim.make_optimizer(c.dpo_learning_rate, c.max_grad_norm or None, steps)
    model = ctx.model

    @jax.jit
    def train_all(betas):
        ref_w = supervised.sequence_log_prob(model, sft, pairs.prompts, pairs.chosen, mask_w)
        ref_l = supervised.sequence_log_prob(model, sft, pairs.prompts, pairs.rejected, mask_l)
        data = (pairs.prompts, pairs.chosen, pairs.rejected, mask_w, mask_l, ref_w, ref_l)

        def one(beta):
            def loss_fn(params, batch):
                return supervised.dpo_model_loss(model, params, *batch, beta=beta)

            key = jax.random.fold_in(jax.random.PRNGKey(c.seed), 4)
            out = supervised.fit(loss_fn, tx, sft, data, key, steps, c.dpo_batch_size)
            return out.params, out.metrics

        return jax.vmap(one)(betas)

    params, metrics = train_all(jnp.asarray(c.dpo_betas, jnp.float32))
    metrics = {k: np.asarray(v) for k, v in metrics.items()}
    save_params(path, params, model)
    _json_dump(metrics_path, {k: v.tolist() for k, v in metrics.items()})
    tail = max(1, steps // 10)
    done("; final implicit-reward accuracy " + ", ".join(
        f"beta {b}: {metrics['accuracy'][i, -tail:].mean():.3f}" for i, b in enumerate(c.dpo_betas)))
    return params, metrics


# --- evaluation, best-of-n, figure -------------------------------------------------------------------------


def evaluate_policy(ctx: Context, params, sft, scorer: Scorer, key
                    ) -> tuple[dict[str, jax.Array], tuple[jax.Array, jax.Array]]:
    """Held-out evaluation of one policy: ``eval_samples`` samples on each of ``eval_prompts`` test prompts;
    mean standardised gold and proxy (main reward model) rewards, KL(pi || pi_SFT) as the mean sampled sum
    of log-ratios with its standard error, d = sqrt(KL), the correlation of proxy and gold on these
    samples, length and repetition; and ``NUM_EXAMPLES`` (prompt, response) examples. Jittable."""
    c = ctx.config
    prompt_key, sample_key = jax.random.split(key)
    prompts = jnp.repeat(ctx.task.sample_prompts(prompt_key, c.eval_prompts, "test"), c.eval_samples, axis=0)
    out = sampling.sample(ctx.model, params, sample_key, prompts, ctx.task.max_response_len, eos_id=EOS,
                          pad_id=PAD)
    ref = sampling.sequence_log_probs(ctx.model, sft, prompts, out.tokens)
    kl = jnp.sum((out.log_probs - ref.log_probs) * out.mask, axis=1)
    proxy = _proxy(ctx, scorer, 0, prompts, out.tokens, out.mask)
    metrics = _batch_metrics(ctx, scorer, prompts, out.tokens, out.mask, out.entropies, proxy, kl)
    gold = (ctx.task.gold_reward(prompts, out.tokens) - scorer.gold_mean) / scorer.gold_std
    metrics.update(kl_stderr=jnp.std(kl) / jnp.sqrt(kl.shape[0]), d=jnp.sqrt(jnp.maximum(jnp.mean(kl), 0.0)),
                   gold_raw=jnp.mean(ctx.task.gold_reward(prompts, out.tokens)),
                   gold_stderr=jnp.std(gold) / jnp.sqrt(kl.shape[0]),
                   proxy_gold_correlation=jnp.corrcoef(proxy, gold)[0, 1])
    rows = jnp.arange(NUM_EXAMPLES) * c.eval_samples  # one sample of each of the first prompts
    return metrics, (prompts[rows], out.tokens[rows])


def best_of_n_curves(ctx: Context, pool: Pool, scorer: Scorer) -> dict[str, Any]:
    """Best-of-n from the SFT pool for every reward model: n, KL = log n - (n - 1)/n, d, and the unbiased
    estimates of the mean standardised gold and proxy reward of the proxy-best of n (Gao et al. 2022)."""
    c = ctx.config
    ns = [2**k for k in range(int(math.log2(c.bon_n_max)) + 1)]
    num_rms = scorer.rm_mean.shape[0]
    shape = (c.bon_prompts, c.bon_n_max)
    gold = ((pool.gold - scorer.gold_mean) / scorer.gold_std).reshape(shape)
    curves = []
    for i in range(num_rms):
        rm = jax.tree.map(lambda x, i=i: x[i], scorer.rm_params)
        raw = jnp.concatenate([_scores(ctx.model, rm, p, r) for p, r in zip(
            jnp.split(pool.prompts, 8), jnp.split(pool.responses, 8), strict=True)])
        proxy = ((raw - scorer.rm_mean[i]) / scorer.rm_std[i]).reshape(shape)
        curves.append({
            "gold": [float(jnp.mean(preference.best_of_n_estimate(proxy, gold, n))) for n in ns],
            "proxy": [float(jnp.mean(preference.best_of_n_estimate(proxy, proxy, n))) for n in ns],
        })
    oracle = [float(jnp.mean(preference.best_of_n_estimate(gold, gold, n))) for n in ns]
    kl = [float(preference.best_of_n_kl(n)) for n in ns]
    return {"n": ns, "kl": kl, "d": [math.sqrt(k) for k in kl], "per_rm": curves, "gold_oracle": oracle}


def _smooth(x: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(x) < window:
        return x
    kernel = np.ones(window) / window
    return np.convolve(np.pad(x, (window // 2, window - 1 - window // 2), mode="edge"), kernel, mode="valid")


def trajectory_curve(trajectory: dict[str, np.ndarray], window: int, bin_width: float
                     ) -> dict[str, np.ndarray]:
    """Gold and proxy reward against d of one RL run: the per-update batch estimates (gold, proxy, kl
    ``[U]``) smoothed over ``window`` updates, then averaged over the updates whose smoothed
    d = sqrt(KL) falls in the same bin of width ``bin_width`` (so a run that stalls at one distance gives
    one point, not a scribble). Returns ``d``, ``gold``, ``proxy`` and ``updates`` (per bin), by
    increasing d."""
    d = np.sqrt(np.maximum(_smooth(trajectory["kl"], window), 0.0))
    gold, proxy = _smooth(trajectory["gold"], window), _smooth(trajectory["proxy"], window)
    bins = np.floor(d / bin_width).astype(int)
    keys = np.unique(bins)
    return {"d": np.asarray([d[bins == k].mean() for k in keys]),
            "gold": np.asarray([gold[bins == k].mean() for k in keys]),
            "proxy": np.asarray([proxy[bins == k].mean() for k in keys]),
            "updates": np.asarray([np.sum(bins == k) for k in keys])}


def _peak(trajectory: dict[str, np.ndarray], window: int, bin_width: float) -> dict[str, float]:
    """Where the run's gold curve (`trajectory_curve`) peaks, and where the run ends (the last ``window``
    updates)."""
    curve = trajectory_curve(trajectory, window, bin_width)
    i = int(np.argmax(curve["gold"]))
    tail = slice(-window, None)
    return {"peak_gold": float(curve["gold"][i]), "peak_proxy": float(curve["proxy"][i]),
            "peak_d": float(curve["d"][i]), "final_gold": float(np.mean(trajectory["gold"][tail])),
            "final_proxy": float(np.mean(trajectory["proxy"][tail])),
            "final_d": float(np.sqrt(max(np.mean(trajectory["kl"][tail]), 0.0)))}


def plot_overoptimisation(path: str, summary: dict[str, Any], trajectories: dict[str, dict[str, np.ndarray]],
                          window: int, bin_width: float) -> None:
    """One figure, three panels: gold reward against d = sqrt(KL(pi || pi_SFT)) for best-of-n, every RL run
    (its per-update estimates along training, `trajectory_curve`; a circle: its final policy evaluated on
    held-out prompts) and DPO (final evaluations); the proxy reward likewise; and the
    reward-model data study (best-of-n and PPO against reward models fit on different numbers of pairs).
    Rewards are standardised under the SFT policy (0 = SFT)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    bon = summary.get("best_of_n")
    rms = summary["reward_models"]
    main_label = rms[0]["label"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, what in zip(axes[:2], ("gold", "proxy"), strict=True):
        if bon is not None:
            ax.plot(bon["d"], bon["per_rm"][0][what], "k-o", ms=4,
                    label=f"best-of-n (n = 1 ... {bon['n'][-1]})")
        k = 0
        for label, traj in trajectories.items():
            if traj["rm"] != main_label:
                continue
            curve = trajectory_curve(traj, window, bin_width)
            ax.plot(curve["d"], curve[what], "-", color=colors[k % len(colors)], lw=1.5, label=label)
            final = summary["methods"].get(label)
            if final is not None:
                ax.plot(final["d"], final[what], "o", color=colors[k % len(colors)], ms=6, mec="k")
            k += 1
        for label, final in summary["methods"].items():
            if label.startswith("dpo"):
                ax.plot(final["d"], final[what], "*", color=colors[k % len(colors)], ms=13, mec="k",
                        label=label)
                k += 1
        ax.axhline(0.0, color="gray", lw=0.8)
        ax.set_xlabel("d = sqrt(KL(pi || pi_SFT))  [sqrt nats]")
        ax.set_ylabel(f"{what} reward (standardised under SFT)")
        ax.set_title(f"{what} reward vs distance from SFT (RM: {rms[0]['pairs']} pairs)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    ax = axes[2]
    order = sorted(range(len(rms)), key=lambda i: rms[i]["pairs"] or 0)
    for k, i in enumerate(order):
        rm = rms[i]
        color = colors[k % len(colors)]
        name = f"RM on {rm['pairs']} pairs (held-out acc. {rm['heldout_accuracy_gold_order']:.2f})"
        traj = next((t for t in trajectories.values() if t["rm"] == rm["label"] and t.get("scale_run")), None)
        ax.plot([], [], "s", color=color, label=name)
        if traj is not None:
            curve = trajectory_curve(traj, window, bin_width)
            ax.plot(curve["d"], curve["gold"], "-", color=color, lw=1.8)
            ax.plot(curve["d"], curve["proxy"], "--", color=color, lw=1.0)
        if bon is not None:
            ax.plot(bon["d"], bon["per_rm"][i]["gold"], "o:", color=color, ms=3, lw=1.0)
    for style, what in (("k-", "PPO gold"), ("k--", "PPO proxy (its own RM)"), ("ko:", "best-of-n gold")):
        ax.plot([], [], style, ms=3, lw=1.0, label=what)
    if bon is not None:
        ax.plot(bon["d"], bon["gold_oracle"], "-", color="gray", lw=0.8, label="best-of-n on gold itself")
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set_xlabel("d = sqrt(KL(pi || pi_SFT))  [sqrt nats]")
    ax.set_ylabel("reward (standardised under SFT)")
    ax.set_title(f"more preference data (PPO beta = {summary['config']['scale_kl_coef']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", ncol=1)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the whole study ---------------------------------------------------------------------------------------


def default_run_dir(config: RLHFConfig) -> str:
    data = runs.config_to_dict(config)
    data.pop("run_dir", None)
    data.pop("cache_dir", None)
    return os.path.join("runs", "rlhf", f"rlhf-{_hash(data)}")


def _rm_label(n: int) -> str:
    return f"rm{n}"


def run(config: RLHFConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every stage of the study (cached), then the evaluation, `summary.json` and
    `rlhf_overoptimisation.png` in the run folder. Returns the summary."""
    start = time.perf_counter()
    run_dir = config.run_dir or default_run_dir(config)
    saved = runs.config_to_dict(config)
    saved.pop("run_dir", None)
    saved.pop("cache_dir", None)
    runs.prepare_run_dir(run_dir, saved)
    cache = config.cache_dir or run_dir
    os.makedirs(cache, exist_ok=True)
    ctx = Context(config, config.make_task(), config.make_model(), cache, log)
    c = config

    sft = sft_stage(ctx)
    pool = pool_stage(ctx, sft)
    log(f"[pool] SFT gold reward {pool.gold_mean:.3f} +- {pool.gold_std:.3f} (mean +- std over samples)")
    train, heldout = preference_stage(ctx, sft)
    rm_params, rm_info = [], []
    for i, n in enumerate(c.pair_counts()):
        override = c.reward_model_path if i == 0 else None
        params, info = reward_model_stage(ctx, sft, train, heldout, pool, n, override)
        rm_params.append(params)
        rm_info.append({"label": _rm_label(n) if override is None else "rm_loaded", **info})
    scorer = Scorer(jax.tree.map(lambda *x: jnp.stack(x), *rm_params),
                    jnp.asarray([r["score_mean_sft"] for r in rm_info], jnp.float32),
                    jnp.asarray([max(r["score_std_sft"], 1e-6) for r in rm_info], jnp.float32),
                    pool.gold_mean, max(pool.gold_std, 1e-6))

    policies: dict[str, Any] = {}
    trajectories: dict[str, dict[str, Any]] = {}
    upstream = [sft_key(c)] + [r["path"] for r in rm_info]
    if "ppo" in c.methods:
        betas, indices = list(c.ppo_kl_coefs), [0] * len(c.ppo_kl_coefs)
        labels = [f"ppo_kl{b:g}" for b in betas]
        scale_labels = []
        if len(rm_info) > 1:  # the data study: PPO at scale_kl_coef against every reward model
            if c.scale_kl_coef not in betas:
                betas, indices = betas + [c.scale_kl_coef], indices + [0]
                labels.append(f"ppo_kl{c.scale_kl_coef:g}")
            scale_labels.append(labels[betas.index(c.scale_kl_coef)])
            for r in range(1, len(rm_info)):
                betas, indices = betas + [c.scale_kl_coef], indices + [r]
                labels.append(f"ppo_kl{c.scale_kl_coef:g}_{rm_info[r]['label']}")
                scale_labels.append(labels[-1])
        stage_config = {"upstream": upstream, "betas": betas, "rm_indices": indices, "labels": labels,
                        **_fields(c, "num_updates", "rollout_batch", "ppo_epochs", "ppo_minibatches",
                                  "gae_lambda", "learning_rate", "max_grad_norm", "seed")}
        program = ppo_program(ctx, sft, scorer, betas, indices, labels)
        carry, metrics = rl_stage(ctx, "ppo", program, stage_config, f"{labels[0]}/gold")
        for e, label in enumerate(labels):
            policies[label] = jax.tree.map(lambda x, e=e: x[e], carry.params)
            trajectories[label] = {name: metrics[f"{label}/{name}"] for name in ("gold", "proxy", "kl")}
            trajectories[label].update(rm=rm_info[indices[e]]["label"], scale_run=label in scale_labels)
    if "grpo" in c.methods:
        label = f"grpo_kl{c.grpo_kl_coef:g}"
        stage_config = {"upstream": upstream[:2],
                        **_fields(c, "num_updates", "grpo_prompts", "grpo_group_size", "grpo_minibatches",
                                  "ppo_epochs", "grpo_kl_coef", "learning_rate", "max_grad_norm", "seed")}
        program = grpo_program(ctx, sft, scorer, label)
        carry, metrics = rl_stage(ctx, "grpo", program, stage_config, f"{label}/gold")
        policies[label] = carry.params
        trajectories[label] = {name: metrics[f"{label}/{name}"] for name in ("gold", "proxy", "kl")}
        trajectories[label].update(rm=rm_info[0]["label"], scale_run=False)
    if "dpo" in c.methods:
        dpo_params, _ = dpo_stage(ctx, sft, train)
        for i, beta in enumerate(c.dpo_betas):
            policies[f"dpo_beta{beta:g}"] = jax.tree.map(lambda x, i=i: x[i], dpo_params)

    done = _timed(ctx, f"evaluation of {len(policies) + 1} policies on {c.eval_prompts} x {c.eval_samples} "
                       "held-out samples")
    evaluate = jax.jit(lambda params, key: evaluate_policy(ctx, params, sft, scorer, key))
    eval_key = jax.random.fold_in(jax.random.PRNGKey(c.seed), 5)
    methods = {}
    for label, params in {"sft": sft, **policies}.items():
        metrics, (prompts, responses) = evaluate(params, eval_key)
        methods[label] = {k: float(v) for k, v in metrics.items()}
        methods[label]["examples"] = [text_tasks.decode(p) + text_tasks.decode(r)
                                      for p, r in zip(prompts, responses, strict=True)]
        m = methods[label]
        log(f"  {label:26s} gold {m['gold']:+.3f}  proxy {m['proxy']:+.3f}  KL {m['kl']:6.2f}  "
            f"d {m['d']:.2f}  length {m['length']:.1f}  repetition {m['repetition']:.2f}  "
            f"e.g. {'  '.join(m['examples'])}")
    done()
    bon = best_of_n_curves(ctx, pool, scorer) if "bon" in c.methods else None
    if bon is not None:
        for j, n in enumerate(bon["n"]):
            curve = bon["per_rm"][0]
            methods[f"bon_n{n}"] = {"gold": curve["gold"][j], "proxy": curve["proxy"][j], "kl": bon["kl"][j],
                                    "d": bon["d"][j]}
    peaks = {label: {"rm": t["rm"], **_peak(t, c.smooth, c.curve_bin)} for label, t in trajectories.items()}
    if bon is not None:
        for i, rm in enumerate(rm_info):
            j = int(np.argmax(bon["per_rm"][i]["gold"]))
            rm["best_of_n_peak"] = {"n": bon["n"][j], "d": bon["d"][j], "gold": bon["per_rm"][i]["gold"][j]}
    data_study = []
    for rm in rm_info:
        scale_run = next((label for label, t in trajectories.items()
                          if t["rm"] == rm["label"] and t.get("scale_run")), None)
        data_study.append({"pairs": rm["pairs"], "heldout_accuracy": rm["heldout_accuracy"],
                           "heldout_accuracy_gold_order": rm["heldout_accuracy_gold_order"],
                           "ppo_run": scale_run, "ppo": peaks.get(scale_run),
                           "best_of_n_peak": rm.get("best_of_n_peak")})
    summary = {
        "units": "gold and proxy rewards standardised under the SFT policy (mean 0, std 1 over SFT samples); "
                 "kl in nats per response, d = sqrt(kl)",
        "sft_gold_raw": {"mean": pool.gold_mean, "std": pool.gold_std},
        "reward_models": rm_info,
        "methods": methods,
        "rl_trajectory_peaks": peaks,
        "data_study": data_study,
        "best_of_n": bon,
        "wall_time_s": round(time.perf_counter() - start, 1),
        "config": saved,
    }
    figure = os.path.join(run_dir, "rlhf_overoptimisation.png")
    plot_overoptimisation(figure, summary, trajectories, c.smooth, c.curve_bin)
    _json_dump(os.path.join(run_dir, "summary.json"), summary)
    log(f"summary: {os.path.join(run_dir, 'summary.json')}\nfigure: {figure}\n"
        f"total {summary['wall_time_s']:.0f} s")
    return summary


def main(argv=None) -> None:
    refused = (validate.ConfigError, getattr(runs, "RunFolderError", validate.ConfigError))
    try:
        with validate.deferred():  # tyro would turn a ConfigError into a multi-line report
            config = tyro.cli(RLHFConfig, args=argv)
        run(config)
    except refused as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
