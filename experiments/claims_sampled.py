"""The sampled part of the GRPO-family claims study (issue 13, item 3): runs where each mechanism can act.

    python -m experiments.grpo_claims --part sampled      # this part only (runs/claims/sampled/)
    python -m experiments.grpo_claims                     # the whole study: exact part, then this

The policy is the toy LM of `polygrad.tabular_sequences`: an autoregressive softmax with one logit
vector per prefix over a tiny vocabulary with EOS. Each update samples groups of G responses token by
token from pi_old (`ts.sample_responses`), scores them, computes group advantages and takes `epochs` x
`minibatches` plain gradient steps on polygrad's own `losses.policy_loss` over the sampled `[n, L]` batch
(differentiated with respect to the logits), exactly as a trainer does. Because the policy is tabular,
every statistic of every seed's policy (J, expected lengths of correct and incorrect responses,
entropies) is read off *exactly* after each update: the only noise left is the training noise, which
is what the seed spread measures.

Beside each sampled run, the exact prediction of the tabular model: the same updates with the sampled
batch replaced by its expectation over groups (`ts.expected_update`, all multisets of G responses
enumerated; with pi_old fixed during the epochs, so the epochs and minibatches become E x M steps on
the exact expected loss), from the same start. Sampled runs with plain gradient steps (no Adam) follow
this trajectory up to the batch noise, so the comparison is quantitative.

1. Length bias (Dr. GRPO, arXiv 2503.20783 section 3.1): answer first, vocabulary {EOS, A, B}, reward 1
   iff the first token is A; what follows the answer only adds length, so incorrect answers can be
   lengthened freely up to L. A hard prompt: the answer's probability is fixed at 1/2 (the empty
   prefix's logits are not trained: the model cannot learn the answer), so every update keeps its full
   signal and any change of length is the aggregation's doing. GRPO (per-response token mean), Dr. GRPO
   (constant normaliser), DAPO (token mean over the batch).
2. Staleness (SAPO, 003 eq. 116-122; GSPO, arXiv 2507.18071; the hard clip): the two prompts of the
   exact gates study (a rare correct token; a common correct and a rare wrong one), several epochs and
   minibatches per batch so that ratios move far from 1 and the gates differ.
3. Clip-higher in a low-entropy setting (DAPO, arXiv 2503.14476 section 3.1): the correct first token
   rare (0.029), a wrong one dominant (0.943), entropy 0.26 nats; DAPO's loss with eps_high 0.28 vs 0.2,
   4 epochs x 4 minibatches per batch, so that the upper clip binds on the rare token; the entropy and
   P(correct) over updates.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import dataclasses  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from polygrad import losses  # noqa: E402
from polygrad import tabular_sequences as ts  # noqa: E402

EOS, A, B, C = 0, 1, 2, 3

FIGURES = {
    "length": "claims_sampled_length_bias.png",
    "staleness": "claims_sampled_staleness.png",
    "clip_higher": "claims_sampled_clip_higher.png",
}


@dataclasses.dataclass(frozen=True)
class SampledConfig:
    """Sizes of the sampled runs (every run: `num_seeds` seeds vmapped, plain gradient steps)."""

    num_seeds: int = 16
    """seeds per setting (spread = min..max and std over seeds)."""
    seed: int = 0
    """base PRNG seed."""
    # 1. length bias
    length_max_length: int = 4
    """L (vocabulary EOS, A, B: R = 31 responses)."""
    length_group_size: int = 4
    length_groups: int = 32
    """groups of G per update (one prompt; DAPO's token mean normalises by the whole batch)."""
    length_updates: int = 150
    length_step_size: float = 2.0
    length_eos_logit: float = 1.0
    """initial EOS logit at every non-empty prefix (E[T] about 2.3: room to lengthen up to L)."""
    # 2. staleness
    stale_group_size: int = 4
    stale_groups: int = 16
    """groups per prompt per update."""
    stale_updates: int = 10
    stale_step_size: float = 0.25
    stale_settings: tuple[tuple[int, int], ...] = ((1, 4), (4, 4))
    """(epochs, minibatches) per batch: 4 and 16 gradient steps per batch."""
    # 3. clip-higher
    clip_group_size: int = 4
    clip_groups: int = 32
    clip_updates: int = 15
    clip_step_size: float = 1.0
    clip_epochs: int = 4
    clip_minibatches: int = 4

    def __post_init__(self):
        if self.num_seeds < 2:
            raise ValueError(f"num_seeds must be at least 2 (the spread), got {self.num_seeds}")
        for name in ("length_groups", "stale_groups", "clip_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        for e, m in self.stale_settings + ((self.clip_epochs, self.clip_minibatches),):
            if e < 1 or m < 1:
                raise ValueError(f"epochs and minibatches must be positive, got {(e, m)}")
        if (
            self.stale_groups % max(m for _, m in self.stale_settings)
            or self.clip_groups % self.clip_minibatches
        ):
            raise ValueError("minibatches must divide the groups per update")


# --------------------------------------------------------------------------------------------------------
# The two trainers: sampled groups, and their exact expectation.
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setting:
    """One training setting: the loss, G, groups per update, epochs x minibatches, step size."""

    loss: losses.LossConfig
    group_size: int
    num_groups: int
    epochs: int = 1
    minibatches: int = 1
    step_size: float = 1.0


def _sampled_program(
    space: ts.ResponseSpace, setting: Setting, num_updates: int, observe: Callable[[jax.Array], dict]
):
    """(key, logits0 [C, S, V], rewards [C, R], trainable [C, S, V]) -> observations per update `[U + 1]`."""
    cfg, G, N, M = setting.loss, setting.group_size, setting.num_groups, setting.minibatches
    mask_all = space.mask.astype(jnp.float32)

    def context_loss(logits, ids, lp_old, adv):
        lp = ts.token_log_probs(space, logits)[ids]
        value, _ = losses.policy_loss(cfg, lp, lp_old, adv, mask_all[ids])
        return value

    def minibatch_loss(logits, ids, lp_old, adv):  # contexts: each its own batch, summed
        return jnp.sum(jax.vmap(context_loss)(logits, ids, lp_old, adv))

    grad = jax.grad(minibatch_loss)

    def program(key, logits0, rewards, trainable):
        C = logits0.shape[0]

        def update(logits, key):
            sample_key, perm_key = jax.random.split(key)
            keys = jax.random.split(sample_key, C)
            ids = jax.vmap(lambda k, z: ts.sample_responses(k, space, z, N * G))(keys, logits)  # [C, N G]
            group_rewards = jnp.take_along_axis(rewards, ids, axis=1).reshape(C, N, G)
            adv = jax.vmap(lambda r: losses.group_advantages(cfg, r))(group_rewards).reshape(C, N, G)
            lp_old = jax.vmap(lambda z, i: ts.token_log_probs(space, z)[i])(logits, ids).reshape(C, N, G, -1)
            ids = ids.reshape(C, N, G)

            def epoch(z, k):
                order = jax.random.permutation(k, N).reshape(M, N // M)

                def step(z, rows):
                    g = grad(
                        z,
                        ids[:, rows].reshape(C, -1),
                        lp_old[:, rows].reshape(C, -1, lp_old.shape[-1]),
                        adv[:, rows].reshape(C, -1),
                    )
                    return z - setting.step_size * trainable * g, None

                return jax.lax.scan(step, z, order)[0], None

            logits, _ = jax.lax.scan(epoch, logits, jax.random.split(perm_key, setting.epochs))
            return logits, observe(logits)

        _, history = jax.lax.scan(update, logits0, jax.random.split(key, num_updates))
        start = jax.tree.map(lambda x: x[None], observe(logits0))
        return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), start, history)

    return program


def run_sampled(
    space, setting: Setting, num_updates: int, observe, key, logits0, rewards, trainable, num_seeds: int
) -> dict:
    """`num_seeds` sampled runs (vmapped), observations `[seeds, U + 1, ...]` as numpy."""
    program = _sampled_program(space, setting, num_updates, observe)
    run = jax.jit(jax.vmap(program, in_axes=(0, None, None, None)))
    return jax.tree.map(np.asarray, run(jax.random.split(key, num_seeds), logits0, rewards, trainable))


def run_expected(
    space,
    setting: Setting,
    num_updates: int,
    observe,
    logits0,
    rewards,
    trainable,
    token_mean_normaliser: bool = False,
) -> dict:
    """The exact prediction: each update is epochs x minibatches steps on the exact expected loss over
    groups of the update's pi_old (all multisets enumerated). `token_mean_normaliser`: the batch's token
    count normalises (DAPO's token mean over many groups), i.e. G E_old[T] per group."""
    groups = ts.enumerate_groups(space.num_responses, setting.group_size)
    steps = setting.epochs * setting.minibatches

    def program(logits0, rewards, trainable, groups):
        def update(logits, _):
            normaliser = (
                setting.group_size * ts.expected_length(space, logits) if token_mean_normaliser else None
            )

            def step(z, _):
                u = ts.expected_update(
                    space,
                    z,
                    rewards,
                    setting.loss,
                    setting.group_size,
                    logits_old=logits,
                    groups=groups,
                    normaliser=normaliser,
                )
                return z - setting.step_size * trainable * u, None

            new, _ = jax.lax.scan(step, logits, None, length=steps)
            return new, observe(new)

        _, history = jax.lax.scan(update, logits0, None, length=num_updates)
        start = jax.tree.map(lambda x: x[None], observe(logits0))
        return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), start, history)

    return jax.tree.map(np.asarray, jax.jit(program)(logits0, rewards, trainable, groups))


def run_both(space, setting: Setting, num_updates: int, observe, key, start, num_seeds: int) -> tuple:
    """The sampled runs and the exact prediction of one setting from the same start (logits0, rewards,
    trainable). A token-mean loss (DAPO) is predicted in the many-group limit of its batch normaliser."""
    logits0, rewards, trainable = start
    sampled = run_sampled(space, setting, num_updates, observe, key, logits0, rewards, trainable, num_seeds)
    token_mean = isinstance(setting.loss.aggregation, losses.TokenMean)
    exact = run_expected(space, setting, num_updates, observe, logits0, rewards, trainable, token_mean)
    return sampled, exact


def spread(values: np.ndarray) -> dict[str, Any]:
    """mean, std, min, max over seeds (axis 0)."""
    v = np.asarray(values, np.float64)
    return {"mean": v.mean(0), "std": v.std(0, ddof=1), "min": v.min(0), "max": v.max(0)}


def separated(a: np.ndarray, b: np.ndarray) -> bool:
    """The effect exceeds the seed spread: the ranges [min, max] over seeds of a and b do not overlap."""
    return bool(np.max(a) < np.min(b) or np.max(b) < np.min(a))


# --------------------------------------------------------------------------------------------------------
# 1. Length bias.
# --------------------------------------------------------------------------------------------------------


def length_losses() -> dict[str, losses.LossConfig]:
    return {
        "GRPO": losses.resolve("grpo", kl_coef=0.0),
        "Dr. GRPO": losses.resolve("dr_grpo"),
        "DAPO": losses.resolve("dapo"),
    }


def learning_speeds(space, logits0, rewards, group_size: int) -> dict[str, float]:
    """dJ per unit step of each length loss at the start if the answer were trainable (exact, first
    order): the step sizes are scaled by GRPO's / this so that every loss learns the answer at the same
    rate, and the lengths are compared at equal progress (as the exact study's drift per unit J)."""
    groups = ts.enumerate_groups(space.num_responses, group_size)
    normaliser = group_size * ts.expected_length(space, logits0)
    speeds = {}
    for name, loss in length_losses().items():
        norm = normaliser if isinstance(loss.aggregation, losses.TokenMean) else None
        update = ts.expected_update(space, logits0, rewards, loss, group_size, groups=groups, normaliser=norm)
        speeds[name] = float(
            ts.first_order_change(lambda z: ts.expected_reward(space, z, rewards)[0], logits0, update)
        )
    return speeds


def length_study(config: SampledConfig, log=print) -> dict[str, Any]:
    space = ts.enumerate_responses(3, config.length_max_length)
    logits0 = np.zeros((1, space.num_prefixes, 3), np.float32)
    logits0[:, :, EOS] = config.length_eos_logit
    logits0[:, 0, EOS] = -30.0  # no empty response; P(first token A) = 1/2
    trainable = np.ones_like(logits0)
    trainable[:, 0] = 0.0  # the answer cannot be learned: p stays 1/2
    rewards = (space.tokens[:, 0] == A).astype(jnp.float32)[None]
    logits0, trainable = jnp.asarray(logits0), jnp.asarray(trainable)
    start = (logits0, rewards, trainable)

    def observe(logits):
        return {
            "J": ts.expected_reward(space, logits, rewards)[0],
            "length_incorrect": ts.expected_length(space, logits, rewards < 0.5)[0],
            "length_correct": ts.expected_length(space, logits, rewards > 0.5)[0],
        }

    out: dict[str, Any] = {
        "max_length": config.length_max_length,
        "group_size": config.length_group_size,
        "groups_per_update": config.length_groups,
        "updates": config.length_updates,
        "step_size": config.length_step_size,
        "num_seeds": config.num_seeds,
        "losses": {},
    }
    key = jax.random.key(config.seed)
    speeds = learning_speeds(space, logits0, rewards, config.length_group_size)
    for i, (name, loss) in enumerate(length_losses().items()):
        t = time.perf_counter()
        step_size = config.length_step_size * speeds["GRPO"] / speeds[name]
        setting = Setting(loss, config.length_group_size, config.length_groups, step_size=step_size)
        sampled, exact = run_both(
            space, setting, config.length_updates, observe, jax.random.fold_in(key, i), start,
            config.num_seeds)
        drift = sampled["length_incorrect"][:, -1] - sampled["length_incorrect"][:, 0]
        drift_right = sampled["length_correct"][:, -1] - sampled["length_correct"][:, 0]
        out["losses"][name] = {
            "sampled": sampled,
            "exact": exact,
            "first_update_drift_exact": float(exact["length_incorrect"][1] - exact["length_incorrect"][0]),
            "first_update_drift_sampled": spread(
                sampled["length_incorrect"][:, 1] - sampled["length_incorrect"][:, 0]
            ),
            "total_drift_incorrect": spread(drift),
            "total_drift_correct": spread(drift_right),
            "total_drift_incorrect_exact": float(
                exact["length_incorrect"][-1] - exact["length_incorrect"][0]
            ),
            "total_drift_correct_exact": float(exact["length_correct"][-1] - exact["length_correct"][0]),
            "step_size": step_size,
            "dJ_per_unit_step_if_trainable": speeds[name],
            "seconds": time.perf_counter() - t,
        }
        log(f"    length {name}: {out['losses'][name]['seconds']:.1f} s")
    L = out["losses"]
    out["grpo_vs_dr_grpo_separated"] = separated(
        L["GRPO"]["sampled"]["length_incorrect"][:, -1], L["Dr. GRPO"]["sampled"]["length_incorrect"][:, -1]
    )
    out["grpo_vs_dapo_separated"] = separated(
        L["GRPO"]["sampled"]["length_incorrect"][:, -1], L["DAPO"]["sampled"]["length_incorrect"][:, -1]
    )
    return out


# --------------------------------------------------------------------------------------------------------
# 2. Staleness: SAPO vs GSPO vs the hard clip.
# --------------------------------------------------------------------------------------------------------


def stale_losses() -> dict[str, losses.LossConfig]:
    return {
        "hard clip 0.2 (GRPO)": losses.resolve("grpo", kl_coef=0.0),
        "GSPO (3e-4/4e-4)": losses.resolve("gspo"),
        "SAPO tau_neg=1.05": losses.resolve("sapo"),
        "no gate": losses.resolve("grpo", kl_coef=0.0, gate=losses.NoGate()),
    }


def _first_token_observer(space, rewards):
    def observe(logits):
        first = jax.nn.log_softmax(logits[:, 0])
        return {
            "first_token_probs": jnp.exp(first),
            "first_token_entropy": -jnp.sum(jnp.exp(first) * first, -1),
            "J": ts.expected_reward(space, logits, rewards),
        }

    return observe


def staleness_study(config: SampledConfig, log=print) -> dict[str, Any]:
    space = ts.enumerate_responses(4, 2)
    from experiments import grpo_claims  # the exact gates study's two prompts (imports this module)

    logits0 = jnp.asarray(grpo_claims.gate_policies())
    rewards = jnp.broadcast_to((space.tokens[:, 0] == A).astype(jnp.float32), (2, space.num_responses))
    trainable = jnp.ones_like(logits0)
    start = (logits0, rewards, trainable)
    observe = _first_token_observer(space, rewards)
    out: dict[str, Any] = {
        "group_size": config.stale_group_size,
        "groups_per_update": config.stale_groups,
        "updates": config.stale_updates,
        "step_size": config.stale_step_size,
        "num_seeds": config.num_seeds,
        "settings": {},
    }
    key = jax.random.key(config.seed + 1)
    for e, m in config.stale_settings:
        label = f"{e} epochs x {m} minibatches"
        block = {}
        for i, (name, loss) in enumerate(stale_losses().items()):
            t = time.perf_counter()
            setting = Setting(
                loss, config.stale_group_size, config.stale_groups, e, m, config.stale_step_size
            )
            key_em = jax.random.fold_in(key, 100 * e + 10 * m + i)
            sampled, exact = run_both(
                space, setting, config.stale_updates, observe, key_em, start, config.num_seeds
            )
            block[name] = {"sampled": sampled, "exact": exact, "seconds": time.perf_counter() - t}
            log(f"    staleness {label}, {name}: {block[name]['seconds']:.1f} s")
        out["settings"][label] = block
    return out


# --------------------------------------------------------------------------------------------------------
# 3. Clip-higher at low entropy.
# --------------------------------------------------------------------------------------------------------


def clip_policy() -> np.ndarray:
    """One prompt, vocabulary {EOS, A, B, C}, L = 2, low entropy (0.26 nats): the correct A rare (0.029),
    the wrong B dominant (0.943), the wrong C rare (0.029); EOS likely after the first token."""
    logits = np.zeros((1, 4, 4), np.float32)
    logits[0, 0] = [-30.0, -0.5, 3.0, -0.5]
    logits[0, 1:, EOS] = 3.0
    return logits


def clip_study(config: SampledConfig, log=print) -> dict[str, Any]:
    space = ts.enumerate_responses(4, 2)
    logits0 = jnp.asarray(clip_policy())
    rewards = (space.tokens[:, 0] == A).astype(jnp.float32)[None]
    trainable = jnp.ones_like(logits0)
    start = (logits0, rewards, trainable)
    observe = _first_token_observer(space, rewards)
    out: dict[str, Any] = {
        "group_size": config.clip_group_size,
        "groups_per_update": config.clip_groups,
        "updates": config.clip_updates,
        "step_size": config.clip_step_size,
        "epochs": config.clip_epochs,
        "minibatches": config.clip_minibatches,
        "num_seeds": config.num_seeds,
        "losses": {},
    }
    key = jax.random.key(config.seed + 2)
    for i, eps_high in enumerate((0.2, 0.28)):
        t = time.perf_counter()
        loss = losses.resolve("dapo", gate=losses.HardClip(0.2, eps_high))
        setting = Setting(
            loss,
            config.clip_group_size,
            config.clip_groups,
            config.clip_epochs,
            config.clip_minibatches,
            config.clip_step_size,
        )
        sampled, exact = run_both(
            space, setting, config.clip_updates, observe, jax.random.fold_in(key, i), start, config.num_seeds)
        name = f"eps_high {eps_high:g}"
        out["losses"][name] = {"sampled": sampled, "exact": exact, "seconds": time.perf_counter() - t}
        log(f"    clip-higher {name}: {out['losses'][name]['seconds']:.1f} s")
    return out


# --------------------------------------------------------------------------------------------------------
# Summary: the numbers of the README table (small, json-able).
# --------------------------------------------------------------------------------------------------------


def _stats(values) -> dict[str, Any]:
    v = np.asarray(values, np.float64)
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)),
        "min": float(v.min()),
        "max": float(v.max()),
        "per_seed": [round(float(x), 5) for x in v],
    }


def _compare(a, b) -> dict[str, Any]:
    """a - b over seeds: the difference of means, the pooled seed std and whether the ranges separate."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return {
        "difference": float(a.mean() - b.mean()),
        "seed_std": float(np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)),
        "separated": separated(a, b),
    }


def summarise(numbers: dict[str, Any]) -> dict[str, Any]:
    """The claim-by-claim numbers: exact prediction, sampled mean / std / range over seeds, separation."""
    out: dict[str, Any] = {}
    if "length" in numbers:
        res = numbers["length"]
        block = {
            "setting": {
                k: res[k] for k in ("max_length", "group_size", "groups_per_update", "updates", "num_seeds")
            },
            "losses": {},
        }
        for name, d in res["losses"].items():
            s, e = d["sampled"], d["exact"]
            block["losses"][name] = {
                "step_size": d["step_size"],
                "exact_drift_first_update": d["first_update_drift_exact"],
                "exact_total_drift_incorrect": d["total_drift_incorrect_exact"],
                "exact_total_drift_correct": d["total_drift_correct_exact"],
                "sampled_total_drift_incorrect": _stats(
                    s["length_incorrect"][:, -1] - s["length_incorrect"][:, 0]
                ),
                "sampled_total_drift_correct": _stats(s["length_correct"][:, -1] - s["length_correct"][:, 0]),
                "exact_final_length_incorrect": float(e["length_incorrect"][-1]),
            }
        fin = {n: d["sampled"]["length_incorrect"][:, -1] for n, d in res["losses"].items()}
        block["GRPO - Dr. GRPO, final E[T|wrong]"] = _compare(fin["GRPO"], fin["Dr. GRPO"])
        block["GRPO - DAPO, final E[T|wrong]"] = _compare(fin["GRPO"], fin["DAPO"])
        block["DAPO - Dr. GRPO, final E[T|wrong]"] = _compare(fin["DAPO"], fin["Dr. GRPO"])
        block["start_length"] = float(res["losses"]["GRPO"]["exact"]["length_incorrect"][0])
        out["length"] = block
    if "staleness" in numbers:
        res = numbers["staleness"]
        block = {
            "setting": {
                k: res[k] for k in ("group_size", "groups_per_update", "updates", "step_size", "num_seeds")
            },
            "settings": {},
        }
        for label, runs in res["settings"].items():
            entry = {}
            for name, d in runs.items():
                s, e = d["sampled"], d["exact"]
                entry[name] = {
                    "exact_p_rare_correct": float(e["first_token_probs"][-1, 0, A]),
                    "sampled_p_rare_correct": _stats(s["first_token_probs"][:, -1, 0, A]),
                    "exact_entropy_prompt2": float(e["first_token_entropy"][-1, 1]),
                    "sampled_entropy_prompt2": _stats(s["first_token_entropy"][:, -1, 1]),
                }
            pa = {n: d["sampled"]["first_token_probs"][:, -1, 0, A] for n, d in runs.items()}
            entry["SAPO - hard clip, P(A)"] = _compare(pa["SAPO tau_neg=1.05"], pa["hard clip 0.2 (GRPO)"])
            entry["hard clip - GSPO, P(A)"] = _compare(pa["hard clip 0.2 (GRPO)"], pa["GSPO (3e-4/4e-4)"])
            entry["no gate - SAPO, P(A)"] = _compare(pa["no gate"], pa["SAPO tau_neg=1.05"])
            block["settings"][label] = entry
        out["staleness"] = block
    if "clip_higher" in numbers:
        res = numbers["clip_higher"]
        block = {
            "setting": {
                k: res[k]
                for k in (
                    "group_size",
                    "groups_per_update",
                    "updates",
                    "step_size",
                    "epochs",
                    "minibatches",
                    "num_seeds",
                )
            }
        }
        lo, hi = res["losses"]["eps_high 0.2"], res["losses"]["eps_high 0.28"]
        gap = hi["exact"]["first_token_entropy"][:, 0] - lo["exact"]["first_token_entropy"][:, 0]
        k_up, k_down = int(np.argmax(gap)), int(np.argmin(gap))
        for tag, k in (("largest predicted entropy gain", k_up), ("largest predicted entropy loss", k_down)):
            block[tag] = {
                "update": k,
                "exact_entropy": {
                    "0.2": float(lo["exact"]["first_token_entropy"][k, 0]),
                    "0.28": float(hi["exact"]["first_token_entropy"][k, 0]),
                },
                "sampled_entropy": {
                    "0.2": _stats(lo["sampled"]["first_token_entropy"][:, k, 0]),
                    "0.28": _stats(hi["sampled"]["first_token_entropy"][:, k, 0]),
                },
                "0.28 - 0.2": _compare(
                    hi["sampled"]["first_token_entropy"][:, k, 0],
                    lo["sampled"]["first_token_entropy"][:, k, 0],
                ),
            }
        for name, d in res["losses"].items():
            probs = d["sampled"]["first_token_probs"][:, :, 0, A]
            # the first update with P(A) > 1/2; U + 1 if the run never gets there
            crossed = np.where(np.any(probs > 0.5, 1), np.argmax(probs > 0.5, 1), probs.shape[1])
            exact = d["exact"]["first_token_probs"][:, 0, A] > 0.5
            block[f"{name}: updates until P(A) > 1/2"] = {
                "exact": int(np.argmax(exact)) if exact.any() else probs.shape[1],
                "sampled": _stats(crossed),
            }
        out["clip_higher"] = block
    return out


def _compare_text(c: dict) -> str:
    return f"{c['difference']:+.3f} (seed std {c['seed_std']:.3f}, separated: {c['separated']})"


def summary_text(summary: dict[str, Any]) -> str:
    def ms(s):
        return f"{s['mean']:+.3f} +- {s['std']:.3f} [{s['min']:+.3f}, {s['max']:+.3f}]"

    lines = []
    if "length" in summary:
        b = summary["length"]
        st = b["setting"]
        lines.append(
            f"S1. Length bias, sampled ({st['num_seeds']} seeds x {st['updates']} updates, "
            f"{st['groups_per_update']} groups of G={st['group_size']}, L={st['max_length']}, "
            f"p fixed at 1/2, E[T|wrong] starts at {b['start_length']:.3f}): change of E[T|wrong] / "
            "E[T|right] over the run, exact prediction vs sampled mean +- std [min, max]"
        )
        for name, d in b["losses"].items():
            lines.append(
                f"   {name:9s} step {d['step_size']:.2f}: exact {d['exact_total_drift_incorrect']:+.3f} / "
                f"{d['exact_total_drift_correct']:+.3f} (first update {d['exact_drift_first_update']:+.4f}); "
                f"sampled {ms(d['sampled_total_drift_incorrect'])} / "
                f"{ms(d['sampled_total_drift_correct'])}"
            )
        for key in (
            "GRPO - Dr. GRPO, final E[T|wrong]",
            "GRPO - DAPO, final E[T|wrong]",
            "DAPO - Dr. GRPO, final E[T|wrong]",
        ):
            lines.append(f"   {key}: {_compare_text(b[key])}")
    if "staleness" in summary:
        b = summary["staleness"]
        st = b["setting"]
        lines.append(
            f"S2. Staleness, sampled ({st['num_seeds']} seeds x {st['updates']} updates, "
            f"{st['groups_per_update']} groups of G={st['group_size']} per prompt, step "
            f"{st['step_size']:g}): prompt 1 P(rare correct A) and prompt 2 entropy at the end"
        )
        for label, entry in b["settings"].items():
            lines.append(f"   {label}:")
            for name, d in entry.items():
                if "exact_p_rare_correct" in d:
                    lines.append(
                        f"     {name:22s} P(A) exact {d['exact_p_rare_correct']:.3f}, sampled "
                        f"{ms(d['sampled_p_rare_correct'])}; H2 exact {d['exact_entropy_prompt2']:.3f},"
                        f" sampled {ms(d['sampled_entropy_prompt2'])}"
                    )
                else:
                    lines.append(f"     {name}: {_compare_text(d)}")
    if "clip_higher" in summary:
        b = summary["clip_higher"]
        st = b["setting"]
        lines.append(
            f"S3. Clip-higher at low entropy, sampled ({st['num_seeds']} seeds x {st['updates']} updates, "
            f"{st['groups_per_update']} groups of G={st['group_size']}, {st['epochs']} epochs x "
            f"{st['minibatches']} minibatches, step {st['step_size']:g}): first-token entropy"
        )
        for tag in ("largest predicted entropy gain", "largest predicted entropy loss"):
            d = b[tag]
            c = d["0.28 - 0.2"]
            lines.append(
                f"   {tag} (update {d['update']}): exact 0.2 {d['exact_entropy']['0.2']:.3f}, 0.28 "
                f"{d['exact_entropy']['0.28']:.3f}; sampled 0.2 {ms(d['sampled_entropy']['0.2'])}, "
                f"0.28 {ms(d['sampled_entropy']['0.28'])}; difference {c['difference']:+.3f} "
                f"(seed std {c['seed_std']:.3f}, separated: {c['separated']})"
            )
        for key, d in b.items():
            if key.endswith("P(A) > 1/2"):
                lines.append(f"   {key}: exact {d['exact']}, sampled {ms(d['sampled'])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Figures.
# --------------------------------------------------------------------------------------------------------


def _band(ax, values, color, label, exact=None):
    x = np.arange(values.shape[1])
    ax.plot(x, values.mean(0), color=color, label=f"{label}, sampled (mean, min-max band)")
    ax.fill_between(x, values.min(0), values.max(0), color=color, alpha=0.2)
    if exact is not None:
        ax.plot(x, exact, "--", color=color, lw=1.2, label=f"{label}, exact prediction")


def plot_length(res: dict):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, d) in enumerate(res["losses"].items()):
        s, e = d["sampled"], d["exact"]
        _band(axes[0], s["length_incorrect"], colors[i], name, e["length_incorrect"])
        _band(axes[1], s["length_correct"], colors[i], name, e["length_correct"])
        total = s["length_incorrect"][:, -1] - s["length_incorrect"][:, 0]
        axes[2].plot(
            np.full(len(total), i) + np.linspace(-0.15, 0.15, len(total)),
            total,
            "o",
            color=colors[i],
            ms=4,
            alpha=0.7,
        )
        axes[2].plot([i - 0.3, i + 0.3], [d["total_drift_incorrect_exact"]] * 2, "k--", lw=1.5)
    axes[2].plot([], [], "k--", label="exact prediction")
    axes[2].plot([], [], "o", color="gray", label="sampled seeds")
    axes[2].set_xticks(range(len(res["losses"])))
    axes[2].set_xticklabels(list(res["losses"]))
    axes[2].axhline(0, color="k", lw=0.6)
    axes[0].set_title("E[T | wrong] over updates")
    axes[1].set_title("E[T | right] over updates")
    axes[2].set_title(f"change of E[T | wrong] after {res['updates']} updates")
    for ax in axes[:2]:
        ax.set_xlabel("update")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=8)
    fig.suptitle(
        f"Length bias, sampled vs exact (answer first, p = 1/2 fixed, L = {res['max_length']}, "
        f"G = {res['group_size']}, {res['groups_per_update']} groups per update, {res['num_seeds']} seeds, "
        "steps matched to equal dJ)"
    )
    fig.tight_layout()
    return fig


def plot_staleness(res: dict):
    import matplotlib.pyplot as plt

    settings = list(res["settings"])
    fig, axes = plt.subplots(len(settings), 2, figsize=(13, 3.8 * len(settings)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, label in enumerate(settings):
        for i, (name, d) in enumerate(res["settings"][label].items()):
            s, e = d["sampled"], d["exact"]
            _band(
                axes[row, 0],
                s["first_token_probs"][:, :, 0, A],
                colors[i],
                name,
                e["first_token_probs"][:, 0, A],
            )
            _band(
                axes[row, 1],
                s["first_token_entropy"][:, :, 1],
                colors[i],
                name,
                e["first_token_entropy"][:, 1],
            )
        axes[row, 0].set_title(f"{label}: prompt 1, P(rare correct token A)")
        axes[row, 1].set_title(f"{label}: prompt 2, first-token entropy")
        for ax in axes[row]:
            ax.set_xlabel("update")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(
        f"Gates under staleness, sampled vs exact (G = {res['group_size']}, {res['groups_per_update']} "
        f"groups per prompt and update, step {res['step_size']:g}, {res['num_seeds']} seeds)"
    )
    fig.tight_layout()
    return fig


def plot_clip_higher(res: dict):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.3))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, d) in enumerate(res["losses"].items()):
        s, e = d["sampled"], d["exact"]
        _band(axes[0], s["first_token_entropy"][:, :, 0], colors[i], name, e["first_token_entropy"][:, 0])
        _band(axes[1], s["first_token_probs"][:, :, 0, A], colors[i], name, e["first_token_probs"][:, 0, A])
    axes[0].set_title("first-token entropy")
    axes[1].set_title("P(rare correct token A)")
    for ax in axes:
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"DAPO clip-higher at low entropy, sampled vs exact (G = {res['group_size']}, "
        f"{res['groups_per_update']} groups, {res['epochs']} epochs x {res['minibatches']} minibatches, "
        f"{res['num_seeds']} seeds)"
    )
    fig.tight_layout()
    return fig


STUDIES = {
    "length": (length_study, plot_length),
    "staleness": (staleness_study, plot_staleness),
    "clip_higher": (clip_study, plot_clip_higher),
}


def save_figures(numbers: dict[str, Any], out: str, figures: str = "") -> None:
    """The figures of the studies in `numbers` into `out` (and `figures`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, (_, plot) in STUDIES.items():
        if key not in numbers:
            continue
        fig = plot(numbers[key])
        for folder in [out] + ([figures] if figures else []):
            os.makedirs(folder, exist_ok=True)
            fig.savefig(os.path.join(folder, FIGURES[key]), dpi=100)
        plt.close(fig)


def run(config: SampledConfig, out: str, figures: str = "", log=print) -> dict[str, Any]:
    """Every sampled study: figures (in `out` and `figures`), summary.json and summary.txt in `out`, and
    every curve of every seed in numbers.pkl (`save_figures(pickle.load(...), out)` redraws them)."""
    import json
    import pickle

    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    numbers, timings = {}, {}
    for key, (study, _) in STUDIES.items():
        t = time.perf_counter()
        numbers[key] = study(config, log=log)
        timings[key] = time.perf_counter() - t
        log(f"  sampled {key}: {timings[key]:.1f} s")
    timings["sampled_total"] = time.perf_counter() - start
    with open(os.path.join(out, "numbers.pkl"), "wb") as f:
        pickle.dump(numbers, f)
    save_figures(numbers, out, figures)
    summary = summarise(numbers)
    summary["timings_s"] = timings
    summary["config"] = dataclasses.asdict(config)
    text = summary_text(summary)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    log(text)
    log(f"sampled part {timings['sampled_total']:.1f} s")
    return summary
