"""The GRPO-family claims, settled exactly on tabular sequence models, then in sampled runs (issue 13).

    python -m experiments.grpo_claims                       # the whole study: exact part, then sampled part
    python -m experiments.grpo_claims --part exact          # the exact part only (under a minute)
    python -m experiments.grpo_claims --part sampled        # the sampled runs (experiments.claims_sampled)
    python -m experiments.grpo_claims --out /tmp/c --figures "" --results "" --mc-groups 0
    python -m experiments.grpo_claims --help

Outputs: runs/claims/ (numbers.json, summary.txt; sampled/summary.json, summary.txt), the figures
docs/figures/claims_*.png and claims_sampled_*.png, and the sampled part's numbers
docs/results/claims_sampled.json.

Every number below is an exact expectation over all responses (and all groups of G responses) of a
tabular softmax policy with one logit vector per prefix (`polygrad.tabular_sequences`), computed with
polygrad's own losses (`losses.policy_loss` on each group's [G, L] batch); only the optional Monte-Carlo
check of the length drift at a larger group size samples (with a standard error).

1. Length bias (Liu et al. 2025, Dr. GRPO, arXiv 2503.20783, section 3.1): with GRPO's per-response
   token mean (003 eq. 97) the expected update lengthens incorrect responses and shortens correct ones
   although the reward ignores length; Dr. GRPO's constant normaliser (eq. 100) removes the drift; DAPO's
   token mean (eq. 102, Yu et al. 2025, arXiv 2503.14476) removes it in the many-prompt limit and leaves
   a small drift when one group is the whole batch. Drift per update against the length distribution.
2. Difficulty bias of the group std (Dr. GRPO, section 3.1): the weight c_G(p) a prompt of success
   probability p receives, expected update = c_G(p) grad p, for std-normalised vs mean-centred
   advantages (003 eq. 90-91 vs 98) and G in {4, 8, 16}.
3. KL estimators (Schulman 2020; DeepSeekMath's k3; 003 eq. 87): the expected gradient of k1, k2, k3,
   k3-value-k2-gradient in the loss and of k1 folded into the reward, against the exact gradient of
   KL(pi_theta || pi_ref), as pi_theta moves away from pi_ref.
4. GSPO vs the token ratio (Zheng et al. 2025, arXiv 2507.18071; 003 eq. 107-112): variance of the
   sampled gradient against response length at equal staleness.
5. SAPO's soft gate vs DAPO's clip-higher vs the hard clip 0.2 (003 eq. 116-122, 101): entropy and
   low-probability tokens after several off-policy epochs on the same batch expectation.
6. Dynamic sampling (DAPO section 3.2): the zero-signal fraction p^G + (1 - p)^G, and what discarding
   those groups does to the expected update.
"""

import os

# Must precede the first JAX import (see README, "Pitfalls").
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any, Literal  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402

from experiments import claims_sampled  # noqa: E402
from polygrad import losses  # noqa: E402
from polygrad import tabular_sequences as ts  # noqa: E402
from polygrad.estimators import advantages as advantages_lib  # noqa: E402

FIGURES = {
    "length": "claims_length_bias.png",
    "difficulty": "claims_difficulty_bias.png",
    "kl": "claims_kl_estimators.png",
    "ratio": "claims_ratio_variance.png",
    "gates": "claims_gates.png",
    "zero_signal": "claims_zero_signal.png",
}

EOS, A, B, C = 0, 1, 2, 3  # token ids: EOS and content tokens; "A" is the correct answer everywhere


@dataclasses.dataclass(frozen=True)
class ClaimsConfig:
    """Sizes of the exact studies (defaults: the numbers of docs/grpo_claims.md)."""

    part: Literal["all", "exact", "sampled"] = "all"
    """exact: the exact studies; sampled: the sampled runs (experiments.claims_sampled); all: both."""
    out: str = "runs/claims"
    """run folder: numbers.json, summary.txt, config.json and the figures (the sampled part in sampled/)."""
    figures: str = "docs/figures"
    """where the claims_*.png figures also go ("" for the run folder only)."""
    results: str = "docs/results"
    """where the sampled part's summary goes as claims_sampled.json ("" for the run folder only)."""
    sampled: claims_sampled.SampledConfig = claims_sampled.SampledConfig()
    """sizes of the sampled runs."""
    compilation_cache: str = "runs/jax_cache"
    """JAX's persistent compilation cache ("" for none): a second run skips most XLA compilation."""
    seed: int = 0
    """seed of the random logit tables (the KL and ratio studies) and of the Monte-Carlo check."""
    # 1. length bias
    length_max_length: int = 4
    """L of the length study (vocabulary EOS, A, B: R = 31 responses)."""
    length_group_size: int = 4
    """G of the exact length study (C(R + G - 1, G) groups are enumerated)."""
    eos_logit_min: float = -3.0
    eos_logit_max: float = 3.0
    eos_points: int = 13
    """EOS logits of the sweep (the same at every non-empty prefix; the empty response is excluded)."""
    mc_group_size: int = 8
    """G of the Monte-Carlo check of the length drift (0 or mc_groups = 0 to skip it)."""
    mc_groups: int = 200_000
    """groups sampled for the Monte-Carlo check (its standard errors are reported)."""
    # 2. difficulty bias
    difficulty_group_sizes: tuple[int, ...] = (4, 8, 16)
    difficulty_points: int = 99
    """success probabilities p on a grid in (0, 1) (an odd number puts 1/2 on it)."""
    difficulty_check_group_size: int = 8
    """G at which the closed form is checked against the enumerated expected update."""
    # 3. KL estimators
    kl_max_length: int = 4
    kl_group_size: int = 4
    kl_distance_min: float = 0.05
    kl_distance_max: float = 3.0
    kl_points: int = 12
    """pi_theta = pi_ref + delta * direction (logits), delta log-spaced in [min, max]."""
    # 4. token vs sequence ratio
    ratio_max_length: int = 6
    """responses of exactly T = 2..L tokens (T - 1 content tokens and EOS)."""
    ratio_group_size: int = 2
    staleness: tuple[float, ...] = (0.3, 1.0)
    """stds of the fixed Gaussian perturbation of every content logit that makes pi_old."""
    # 5. gates
    gate_group_size: int = 4
    gate_epochs: int = 12
    """gradient steps on the same expectation over groups of pi_old."""
    gate_step_size: float = 1.0
    gate_tau_negs: tuple[float, ...] = (1.05, 2.0, 5.0)
    """SAPO's tau_neg values (tau_pos = 1)."""
    # 6. dynamic sampling
    zero_signal_group_sizes: tuple[int, ...] = (2, 4, 8, 16)
    """closed-form curves; the groups are also enumerated where C(R + G - 1, G) <= 100000."""
    dynamic_sampling_group_size: int = 4

    def __post_init__(self):
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        for name in ("length_max_length", "kl_max_length"):
            check(getattr(self, name) >= 2, f"{name} must be at least 2; got {getattr(self, name)}")
        check(self.ratio_max_length >= 3, f"ratio_max_length must be at least 3; got {self.ratio_max_length}")
        for name in ("length_group_size", "kl_group_size", "ratio_group_size", "gate_group_size"):
            check(getattr(self, name) >= 2, f"{name} must be at least 2; got {getattr(self, name)}")
        check(self.eos_points >= 2 and self.eos_logit_min < self.eos_logit_max, "need an EOS logit range")
        check(self.difficulty_points >= 3, "difficulty_points must be at least 3")
        check(0 < self.kl_distance_min < self.kl_distance_max and self.kl_points >= 2, "need a KL range")
        check(all(s > 0 for s in self.staleness), "staleness must be positive")
        check(self.gate_step_size > 0 and self.gate_epochs >= 1, "gate_step_size > 0 and gate_epochs >= 1")
        check(all(t > 0 for t in self.gate_tau_negs), "tau_neg must be positive")
        check(all(g >= 2 for g in self.difficulty_group_sizes + self.zero_signal_group_sizes), "G >= 2")


def answer_first_rewards(space: ts.ResponseSpace) -> jax.Array:
    """R(y) = 1 if the first token is A (the answer comes first; what follows only adds length)."""
    return (space.tokens[:, 0] == A).astype(jnp.float32)


# --------------------------------------------------------------------------------------------------------
# 1. Length bias (Dr. GRPO section 3.1; 003 eq. 97, 100, 102).
# --------------------------------------------------------------------------------------------------------


def length_losses() -> dict[str, losses.LossConfig]:
    """The presets (GRPO without its KL term: at pi = pi_ref the k3 penalty has zero gradient) and GRPO
    with only its aggregation replaced by Dr. GRPO's constant normaliser."""
    return {
        "GRPO": losses.resolve("grpo", kl_coef=0.0),
        "Dr. GRPO": losses.resolve("dr_grpo"),
        "DAPO, one group per batch": losses.resolve("dapo"),
        "DAPO, many prompts": losses.resolve("dapo"),
        "GRPO with a constant normaliser": losses.resolve(
            "grpo", kl_coef=0.0, aggregation="seq_mean_token_sum_norm"),
    }


def length_policies(space: ts.ResponseSpace, eos_logits: np.ndarray) -> jax.Array:
    """Logits `[K, S, V]`: EOS logit e at every non-empty prefix, content logits 0, and no empty
    response (EOS logit -30 at the empty prefix), so p = P(first token A) = 1/2 and the length
    distribution is the same for correct and incorrect responses."""
    base = np.zeros((len(eos_logits), space.num_prefixes, space.num_tokens), np.float32)
    base[:, :, EOS] = np.asarray(eos_logits, np.float32)[:, None]
    base[:, 0, EOS] = -30.0
    return jnp.asarray(base)


def _length_stats(space: ts.ResponseSpace, rewards: jax.Array):
    """logits `[K, S, V]` -> J and the expected lengths (all, correct, incorrect), each `[K]`."""

    def stats(logits):
        rw = jnp.broadcast_to(rewards, logits.shape[:-2] + rewards.shape[-1:])
        return {
            "J": ts.expected_reward(space, logits, rw),
            "length": ts.expected_length(space, logits),
            "length_correct": ts.expected_length(space, logits, rw > 0.5),
            "length_incorrect": ts.expected_length(space, logits, rw < 0.5),
        }

    return stats


def length_bias(config: ClaimsConfig) -> dict[str, Any]:
    """Expected drift per unit step of J and of the expected lengths, for each loss, over the EOS sweep."""
    space = ts.enumerate_responses(3, config.length_max_length)
    G = config.length_group_size
    groups = ts.enumerate_groups(space.num_responses, G)
    eos_logits = np.linspace(config.eos_logit_min, config.eos_logit_max, config.eos_points)
    logits = length_policies(space, eos_logits)
    rewards = jnp.broadcast_to(answer_first_rewards(space), logits.shape[:-2] + (space.num_responses,))
    stats = _length_stats(space, answer_first_rewards(space))

    @jax.jit
    def compute(logits, rewards, groups):
        base = stats(logits)
        drifts = {}
        for name, loss in length_losses().items():
            normaliser = G * base["length"] if name == "DAPO, many prompts" else None
            update = ts.expected_update(space, logits, rewards, loss, G, groups=groups, normaliser=normaliser)
            drifts[name] = ts.first_order_change(stats, logits, update)
        return base, drifts

    base, drifts = jax.tree.map(np.asarray, compute(logits, rewards, groups))
    drifts = {name: drifts[name] for name in length_losses()}  # pytrees come back with sorted keys
    for d in drifts.values():
        d["length_incorrect_per_J"] = d["length_incorrect"] / d["J"]
        d["length_correct_per_J"] = d["length_correct"] / d["J"]
    return {"eos_logit": eos_logits, "group_size": G, "num_groups": len(groups.indices),
            "max_length": config.length_max_length, **base, "losses": drifts}


def length_bias_monte_carlo(config: ClaimsConfig) -> dict[str, Any]:
    """The length drift at a larger G by Monte Carlo (C(R + G - 1, G) groups are too many to enumerate),
    at the middle of the EOS sweep, with standard errors: drift = -grad(stat) . mean update."""
    space = ts.enumerate_responses(3, config.length_max_length)
    G = config.mc_group_size
    sweep = np.linspace(config.eos_logit_min, config.eos_logit_max, config.eos_points)
    eos = float(sweep[config.eos_points // 2])
    logits = length_policies(space, np.array([eos]))[0]
    rewards = answer_first_rewards(space)
    names = ("J", "length_correct", "length_incorrect")
    mc_losses = {n: length_losses()[n] for n in ("GRPO", "Dr. GRPO")}

    @jax.jit
    def compute(key, logits, rewards):
        stats = _length_stats(space, rewards)
        directions = jnp.stack([jax.grad(lambda z, n=n: stats(z)[n])(logits) for n in names])
        keys = jax.random.split(key, len(mc_losses))
        return {name: ts.sampled_update(k, space, logits, rewards, loss, G, config.mc_groups,
                                        directions=directions)
                for k, (name, loss) in zip(keys, mc_losses.items(), strict=True)}

    out = compute(jax.random.key(config.seed), logits, rewards)
    result: dict[str, Any] = {"group_size": G, "num_groups": config.mc_groups, "eos_logit": eos}
    for name, sampled in out.items():
        pairs = zip(names, sampled.projection_mean, sampled.projection_stderr, strict=True)
        result[name] = {n: {"drift": -float(m), "stderr": float(e)} for n, m, e in pairs}
    return result


# --------------------------------------------------------------------------------------------------------
# 2. Difficulty bias of the group std (Dr. GRPO section 3.1; 003 eq. 90-91 vs 98).
# --------------------------------------------------------------------------------------------------------

ADVANTAGE_ESTIMATORS = {
    "std-normalised (GRPO)": (advantages_lib.group_normalized_advantages,
                              losses.resolve("grpo", kl_coef=0.0)),
    "mean-centred (Dr. GRPO)": (advantages_lib.group_centered_advantages, losses.resolve("dr_grpo")),
}


def difficulty_bias(config: ClaimsConfig) -> dict[str, Any]:
    """c_G(p) = E[A | correct] - E[A | incorrect] over a p grid (closed form over the number correct), and
    the expected update of one-token prompts (a tabular bandit, exact enumeration) against -c_G(p) grad p
    at `difficulty_check_group_size`."""
    p = np.linspace(0.0, 1.0, config.difficulty_points + 2)[1:-1].astype(np.float32)
    half = int(np.argmin(np.abs(p - 0.5)))
    bandit = ts.enumerate_responses(2, 1, eos=None)  # two one-token responses: token 0 (correct) and 1
    p_check = np.array([0.05, 0.2, 0.5, 0.8, 0.95], np.float32)
    logits = jnp.asarray(np.stack([np.log(p_check), np.log1p(-p_check)], -1)[:, None, :])  # [K, 1, 2]
    rewards = jnp.asarray(np.tile([1.0, 0.0], (len(p_check), 1)), jnp.float32)
    G_check = config.difficulty_check_group_size

    @jax.jit
    def compute(p, p_check, logits, rewards, groups):
        curves, checks = {}, {}
        for G in config.difficulty_group_sizes:
            for name, (fn, _) in ADVANTAGE_ESTIMATORS.items():
                s = ts.binary_group_statistics(p, G, fn)._asdict()
                s["weight_relative_to_half"] = s["weight"] / s["weight"][half]
                curves[f"{name}, G={G}"] = s
        grad_p = jax.vmap(jax.grad(lambda z: jax.nn.softmax(z[0])[0]))(logits)  # [K, 1, 2]
        for name, (fn, loss) in ADVANTAGE_ESTIMATORS.items():
            update = ts.expected_update(bandit, logits, rewards, loss, G_check, groups=groups)
            weight = ts.binary_group_statistics(p_check, G_check, fn).weight
            checks[name] = {"update_norm": jnp.sqrt(jnp.sum(update**2, axis=(-2, -1))),
                            "max_abs_error": jnp.max(jnp.abs(update + weight[:, None, None] * grad_p))}
        return curves, checks

    groups = ts.enumerate_groups(bandit.num_responses, G_check)
    curves, checks = jax.tree.map(np.asarray, compute(jnp.asarray(p), jnp.asarray(p_check), logits, rewards,
                                                      groups))
    curves = {f"{name}, G={G}": curves[f"{name}, G={G}"]
              for G in config.difficulty_group_sizes for name in ADVANTAGE_ESTIMATORS}
    return {"p": p, "p_check": p_check, "check_group_size": G_check, "curves": curves, "check": checks}


# --------------------------------------------------------------------------------------------------------
# 3. KL estimators (003 eq. 87; Schulman 2020; Shao et al. 2024).
# --------------------------------------------------------------------------------------------------------


def kl_options() -> dict[str, tuple[losses.LossConfig, bool]]:
    """name -> (loss, KL folded into the reward). In-loss options: GRPO's loss with a token-sum
    aggregation (the sequence KL is the sum of the per-token terms), zero rewards (so only the KL term
    has a gradient) and coefficient 1. Folded: rewards -sum_t k1_t (a stop-gradient reward), advantages
    and aggregation of RLOO or of Dr. GRPO with a token sum."""
    in_loss = {f"{k} in the loss": (losses.resolve("grpo", aggregation="seq_mean_token_sum", kl_coef=1.0,
                                                   kl_estimator=k), False)
               for k in ("k1", "k2", "k3", "k3_value_k2_grad")}
    folded = {
        "k1 in the reward (RLOO)": (losses.resolve("rloo"), True),
        "k1 in the reward (Dr. GRPO, token sum)": (
            losses.resolve("dr_grpo", aggregation="seq_mean_token_sum"), True),
    }
    return {**in_loss, **folded}


def kl_estimators(config: ClaimsConfig) -> dict[str, Any]:
    """Expected gradient of each KL option (on-policy) against grad KL(pi || pi_ref), the state-frozen
    forward KL sum_s sg(P(s)) KL(pi_s || ref_s) and the state-frozen reverse KL sum_s sg(P(s))
    KL(ref_s || pi_s), as relative errors and cosines over the distance delta."""
    space = ts.enumerate_responses(3, config.kl_max_length)
    G = config.kl_group_size
    groups = ts.enumerate_groups(space.num_responses, G)
    rng = np.random.default_rng(config.seed)
    ref = rng.normal(size=(space.num_prefixes, space.num_tokens)).astype(np.float32)
    direction = rng.normal(size=ref.shape).astype(np.float32)
    direction /= np.sqrt(np.mean(direction**2))
    delta = np.geomspace(config.kl_distance_min, config.kl_distance_max, config.kl_points).astype(np.float32)
    logits = jnp.asarray(ref[None] + delta[:, None, None] * direction[None])
    logits_ref = jnp.broadcast_to(jnp.asarray(ref), logits.shape)

    def frozen(logits, logits_ref, reverse):
        reach = jax.lax.stop_gradient(ts.prefix_probs(space, logits))  # [S]
        log_pi, log_ref = jax.nn.log_softmax(logits), jax.nn.log_softmax(logits_ref)
        if reverse:
            return jnp.sum(reach * jnp.sum(jnp.exp(log_ref) * (log_ref - log_pi), -1))
        return jnp.sum(reach * jnp.sum(jnp.exp(log_pi) * (log_pi - log_ref), -1))

    @jax.jit
    def compute(logits, logits_ref, groups):
        def grad(fn):
            return jax.vmap(jax.grad(fn))(logits, logits_ref)

        targets = {
            "exact": grad(lambda z, r: ts.sequence_kl(space, z, r)),
            "state-frozen forward KL": grad(lambda z, r: frozen(z, r, False)),
            "state-frozen reverse KL": grad(lambda z, r: frozen(z, r, True)),
        }
        seq_k1 = ts.response_log_probs(space, logits) - ts.response_log_probs(space, logits_ref)  # [K, R]
        updates = {}
        for name, (loss, folded) in kl_options().items():
            rewards = -seq_k1 if folded else jnp.zeros_like(seq_k1)
            updates[name] = ts.expected_update(space, logits, rewards, loss, G, logits_ref=logits_ref,
                                               groups=groups)
        return ts.sequence_kl(space, logits, logits_ref), targets, updates

    kl, targets, updates = jax.tree.map(np.asarray, compute(logits, logits_ref, groups))
    updates = {name: updates[name] for name in kl_options()}

    def flat(x):
        return x.reshape(len(delta), -1)

    options = {}
    for name, update in updates.items():
        u, entry = flat(update), {}
        for target_name, target in targets.items():
            t = flat(target)
            norm_t = np.linalg.norm(t, axis=-1)
            entry[f"relative_error_vs_{target_name}"] = np.linalg.norm(u - t, axis=-1) / norm_t
            entry[f"cosine_vs_{target_name}"] = np.sum(u * t, -1) / np.maximum(
                np.linalg.norm(u, axis=-1) * norm_t, 1e-30)
        entry["norm_ratio"] = np.linalg.norm(u, axis=-1) / np.linalg.norm(flat(targets["exact"]), axis=-1)
        options[name] = entry
    return {"delta": delta, "kl": kl, "max_length": config.kl_max_length, "group_size": G, "options": options}


# --------------------------------------------------------------------------------------------------------
# 4. Token ratio vs GSPO's sequence ratio: gradient variance against length (003 eq. 107-112).
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProductRatio:
    """Exact sequence importance weight w = prod_t r_t = exp(sum_t log r_t), broadcast over tokens
    (003 eq. 105): a ratio part written here, outside polygrad, as any new part can be."""

    def __call__(self, log_ratio, mask, advantages):
        del advantages
        log_w = jnp.sum(log_ratio * mask, axis=-1, keepdims=True)
        no = jnp.zeros(log_ratio.shape, bool)
        return losses.RatioOut(jnp.broadcast_to(log_w, log_ratio.shape), no, no)


def ratio_losses() -> dict[str, losses.LossConfig]:
    """GRPO's aggregation and advantages (GSPO's preset has the same), no KL; ratio and gate vary."""
    unclipped = losses.NoGate()
    return {
        "token ratio (GRPO), no clip": losses.resolve("grpo", kl_coef=0.0, gate=unclipped),
        "sequence ratio (GSPO), no clip": losses.resolve("gspo", gate=unclipped),
        "product ratio (exact IS), no clip": losses.resolve("grpo", kl_coef=0.0, gate=unclipped,
                                                            ratio=ProductRatio()),
        "token ratio, clip 0.2 (GRPO)": losses.resolve("grpo", kl_coef=0.0),
        "sequence ratio, clip 3e-4/4e-4 (GSPO)": losses.resolve("gspo"),
    }


def fixed_length_policies(space: ts.ResponseSpace, content: np.ndarray) -> np.ndarray:
    """Logits `[L - 1, S, V]`: context k makes every response exactly T = k + 2 tokens long (k + 1
    content tokens, then EOS: EOS logit -30 before depth k + 1, +30 from it on), content logits
    `content [S, V]` (its EOS column is ignored)."""
    depth = np.zeros(space.num_prefixes, np.int64)
    parent = np.asarray(space.prefix_parent)
    for s in range(1, space.num_prefixes):
        depth[s] = depth[parent[s]] + 1
    out = np.repeat(content[None], space.max_length - 1, axis=0).copy()
    for k in range(space.max_length - 1):
        out[k, :, EOS] = np.where(depth < k + 1, -30.0, 30.0)
    return out.astype(np.float32)


def ratio_variance(config: ClaimsConfig) -> dict[str, Any]:
    """Trace of the covariance of the one-group gradient, stale (pi_old = a fixed perturbation of every
    content logit of pi_theta) and on-policy, for responses of exactly T tokens, T = 2..L, at each
    staleness."""
    space = ts.enumerate_responses(3, config.ratio_max_length)
    G = config.ratio_group_size
    groups = ts.enumerate_groups(space.num_responses, G)
    rng = np.random.default_rng(config.seed + 1)
    content = rng.normal(scale=0.5, size=(space.num_prefixes, space.num_tokens)).astype(np.float32)
    unit_noise = rng.normal(size=content.shape).astype(np.float32)
    unit_noise[:, EOS] = 0.0
    lengths = np.arange(2, space.max_length + 1)
    logits = jnp.asarray(np.concatenate([fixed_length_policies(space, content)] * len(config.staleness)))
    logits_old = jnp.asarray(np.concatenate([fixed_length_policies(space, content + sigma * unit_noise)
                                             for sigma in config.staleness]))
    rewards = jnp.broadcast_to(answer_first_rewards(space), logits.shape[:-2] + (space.num_responses,))
    token_kl = []
    for sigma in config.staleness:  # mean over prefixes of KL(pi_old || pi_theta) of the content tokens
        old, new = jnp.asarray((content + sigma * unit_noise)[:, 1:]), jnp.asarray(content[:, 1:])
        kl = jnp.sum(jax.nn.softmax(old) * (jax.nn.log_softmax(old) - jax.nn.log_softmax(new)), -1)
        token_kl.append(float(jnp.mean(kl)))

    @jax.jit
    def compute(logits, logits_old, rewards, groups):
        out, fresh_token = {}, None
        for name, loss in ratio_losses().items():
            stale = ts.update_moments(space, logits, rewards, loss, G, logits_old=logits_old, groups=groups)
            # On-policy (r = 1) the token and sequence ratios, clipped or not, give the same gradient
            # A / T sum_t grad log pi_t (003 eq. 111-112 at r = 1): computed once. The product ratio's is
            # A sum_t grad log pi_t, T times larger.
            if name.startswith("product"):
                fresh = ts.update_moments(space, logits, rewards, loss, G, groups=groups)
            else:
                if fresh_token is None:
                    fresh_token = ts.update_moments(space, logits, rewards, loss, G, groups=groups)
                fresh = fresh_token
            out[name] = {
                "variance_stale": jnp.sum(stale.second_moment - stale.mean**2, axis=(-2, -1)),
                "variance_on_policy": jnp.sum(fresh.second_moment - fresh.mean**2, axis=(-2, -1)),
                "mean_norm_stale": jnp.sqrt(jnp.sum(stale.mean**2, axis=(-2, -1))),
                "mean_norm_on_policy": jnp.sqrt(jnp.sum(fresh.mean**2, axis=(-2, -1))),
            }
        return out

    out = jax.tree.map(np.asarray, compute(logits, logits_old, rewards, groups))
    out = {name: out[name] for name in ratio_losses()}
    shape = (len(config.staleness), len(lengths))
    for d in out.values():
        for k in list(d):
            d[k] = d[k].reshape(shape)
        d["variance_ratio"] = d["variance_stale"] / d["variance_on_policy"]
        d["mean_norm_ratio"] = d["mean_norm_stale"] / d["mean_norm_on_policy"]
    return {"length": lengths, "group_size": G, "staleness": np.asarray(config.staleness),
            "token_kl_old_new": np.asarray(token_kl), "losses": out}


# --------------------------------------------------------------------------------------------------------
# 5. Gates after several off-policy epochs (003 eq. 101, 116-122).
# --------------------------------------------------------------------------------------------------------


def gate_losses(tau_negs: Sequence[float]) -> dict[str, losses.LossConfig]:
    """Only the gate differs: GRPO's aggregation and std-normalised advantages, no KL."""
    gates = {"no gate": losses.NoGate(), "hard clip 0.2 (GRPO)": losses.HardClip(0.2, 0.2),
             "clip-higher 0.2/0.28 (DAPO)": losses.HardClip(0.2, 0.28)}
    gates.update({f"SAPO tau_neg={t:g}": losses.SoftGate(1.0, t) for t in tau_negs})
    return {name: losses.resolve("grpo", kl_coef=0.0, gate=gate) for name, gate in gates.items()}


def gate_policies() -> np.ndarray:
    """Two prompts over EOS, A, B, C with L = 2. Prompt 1: the answer A is rare (p about 0.04);
    prompt 2: A is common (about 0.78) and C is rare. After the first token, EOS is likely."""
    logits = np.zeros((2, 4, 4), np.float32)  # [prompt, prefix (root, A, B, C), token]
    logits[0, 0] = [-3.0, -1.5, 1.5, 0.0]
    logits[1, 0] = [-3.0, 1.5, 0.0, -1.5]
    logits[:, 1:, EOS] = 2.0
    return logits


def gates(config: ClaimsConfig) -> dict[str, Any]:
    """K gradient steps theta <- theta - eta E_{groups ~ pi_old}[grad loss(theta)] with pi_old fixed (the
    exact expected objective of K epochs over one batch): first-token probabilities, entropies, J."""
    space = ts.enumerate_responses(4, 2)
    G = config.gate_group_size
    groups = ts.enumerate_groups(space.num_responses, G)
    logits0 = jnp.asarray(gate_policies())
    rewards = jnp.broadcast_to(answer_first_rewards(space), (2, space.num_responses))

    def observe(logits, rewards):
        first = jax.nn.log_softmax(logits[:, 0])
        return {
            "first_token_probs": jnp.exp(first),  # [2, V]
            "first_token_entropy": -jnp.sum(jnp.exp(first) * first, -1),
            "sequence_entropy": ts.sequence_entropy(space, logits),
            "J": ts.expected_reward(space, logits, rewards),
        }

    @jax.jit
    def compute(logits0, rewards, groups):
        out = {}
        for name, loss in gate_losses(config.gate_tau_negs).items():
            def step(logits, _, loss=loss):
                update = ts.expected_update(space, logits, rewards, loss, G, logits_old=logits0,
                                            groups=groups)
                new = logits - config.gate_step_size * update
                return new, observe(new, rewards)

            _, history = jax.lax.scan(step, logits0, None, length=config.gate_epochs)
            start = jax.tree.map(lambda x: x[None], observe(logits0, rewards))
            out[name] = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), start, history)
        return out

    out = jax.tree.map(np.asarray, compute(logits0, rewards, groups))
    out = {name: out[name] for name in gate_losses(config.gate_tau_negs)}
    return {"group_size": G, "epochs": config.gate_epochs, "step_size": config.gate_step_size, "losses": out}


# --------------------------------------------------------------------------------------------------------
# 6. Dynamic sampling: zero-signal groups (DAPO section 3.2).
# --------------------------------------------------------------------------------------------------------


def zero_signal(config: ClaimsConfig) -> dict[str, Any]:
    """p^G + (1 - p)^G against the enumerated groups of a sequence model (V = 3, L = 2, answer first,
    advantages of polygrad's GRPO estimator); and the expected update with and without the zero-signal
    groups (what dynamic sampling changes)."""
    p = np.linspace(0.0, 1.0, 101).astype(np.float32)
    space = ts.enumerate_responses(3, 2)
    p_check = np.array([0.1, 0.3, 0.5, 0.7, 0.9], np.float32)
    logits = np.zeros((len(p_check), space.num_prefixes, 3), np.float32)
    logits[:, 0, EOS] = -30.0
    logits[:, 0, A] = np.log(p_check / (1 - p_check))  # P(first token A) = p_check
    logits = jnp.asarray(logits)
    rewards = jnp.broadcast_to(answer_first_rewards(space), (len(p_check), space.num_responses))
    grpo = losses.resolve("grpo")
    enumerable = [G for G in config.zero_signal_group_sizes
                  if ts.num_multisets(space.num_responses, G) <= 100_000]
    all_groups = {G: ts.enumerate_groups(space.num_responses, G) for G in enumerable}
    # Dynamic sampling keeps only signal groups. Per prompt, E[g | signal] = E[g 1{signal}] / (1 - z);
    # a batch filled with signal groups weights prompt c by rho_c (1 - z_c) / Z, so its expected update
    # is sum_c rho_c E[g_c 1{signal}] / Z: E[g] / Z when zero-signal groups carry no gradient (no KL).
    G_ds = config.dynamic_sampling_group_size
    groups = ts.enumerate_groups(space.num_responses, G_ds)
    group_rewards = np.asarray(answer_first_rewards(space))[groups.indices]
    signal = group_rewards.min(1) != group_rewards.max(1)
    kept = ts.Groups(groups.indices[signal], groups.log_multiplicity[signal])
    two = logits[jnp.array([0, 2])]  # p = 0.1 and 0.5
    noise = np.random.default_rng(config.seed).normal(size=two.shape).astype(np.float32)
    ref = two + 0.5 * jnp.asarray(noise)

    @jax.jit
    def compute(logits, rewards, all_groups, groups, kept, two, ref):
        enumerated = {G: ts.zero_signal_fraction(space, logits, rewards, grpo, G, groups=all_groups[G])
                      for G in enumerable}
        direction = {}
        for name, loss in (("no KL", losses.resolve("grpo", kl_coef=0.0)), ("GRPO, KL 0.04", grpo)):
            full, filtered = (ts.expected_update(space, two, rewards[:2], loss, G_ds, logits_ref=ref,
                                                 groups=gr).ravel() for gr in (groups, kept))
            norm_full, norm_filtered = jnp.linalg.norm(full), jnp.linalg.norm(filtered)
            direction[name] = {"cosine": full @ filtered / (norm_full * norm_filtered),
                               "norm_ratio": norm_filtered / norm_full}
        return enumerated, direction

    enumerated, direction = jax.tree.map(
        np.asarray, compute(logits, rewards, all_groups, groups, kept, two, ref))
    j_check = np.asarray(ts.expected_reward(space, logits, rewards))
    return {
        "p": p, "p_check": p_check, "J_check": j_check, "enumerated": enumerated,
        "closed_form": {G: p**G + (1 - p) ** G for G in config.zero_signal_group_sizes},
        "max_abs_error_enumerated": max(
            float(np.max(np.abs(enumerated[G] - (j_check**G + (1 - j_check) ** G)))) for G in enumerated),
        "dynamic_sampling_group_size": G_ds,
        "dynamic_sampling_direction": jax.tree.map(float, direction),
    }


# --------------------------------------------------------------------------------------------------------
# Figures.
# --------------------------------------------------------------------------------------------------------


def plot_length(res: dict, mc: dict | None):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 5.0))
    x = res["length"]
    for name, d in res["losses"].items():
        style = "--" if name.startswith("GRPO with") else "-"
        axes[0].plot(x, d["length_incorrect"] / d["J"], style, marker="o", ms=3, label=name)
        axes[1].plot(x, d["length_correct"] / d["J"], style, marker="o", ms=3, label=name)
        axes[2].plot(x, d["length_incorrect"], style, marker="o", ms=3, label=name)
    if mc:
        x_mc = x[len(x) // 2]
        for name, marker in (("GRPO", "*"), ("Dr. GRPO", "P")):
            j = mc[name]["J"]["drift"]
            for ax, stat in ((axes[0], "length_incorrect"), (axes[1], "length_correct")):
                d = mc[name][stat]
                ax.errorbar([x_mc], [d["drift"] / j], yerr=[4 * d["stderr"] / abs(j)], fmt=marker, color="k",
                            ms=9, capsize=3, label=f"{name}, G = {mc['group_size']}, Monte Carlo (4 s.e.)")
    axes[0].set_title("incorrect responses: d E[T | wrong] / d J")
    axes[1].set_title("correct responses: d E[T | right] / d J")
    axes[2].set_title("d E[T | wrong] per unit step (raw)")
    for ax in axes:
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("expected response length E[T] (sweep of the EOS logit)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("drift of the expected length per unit gain in J")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=4)
    fig.suptitle(f"Length bias, exact (G = {res['group_size']}, L = {res['max_length']}, "
                 "reward ignores length, p = 1/2)")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig


def plot_difficulty(res: dict):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    p = res["p"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, c) in enumerate(res["curves"].items()):
        style = "-" if name.startswith("std") else "--"
        color = colors[i // 2 % len(colors)]
        axes[0].plot(p, c["weight"], style, color=color, label=name)
        axes[1].plot(p, c["weight"] * p * (1 - p) * np.sqrt(2), style, color=color, label=name)
        axes[2].plot(p, c["mean_abs_advantage"], style, color=color, label=name)
    for name, chk in res["check"].items():
        marker = "o" if name.startswith("std") else "s"
        axes[1].plot(res["p_check"], chk["update_norm"], marker, color="k", mfc="none", ms=6,
                     label=f"enumerated, {name.split(' ')[0]}, G={res['check_group_size']}")
    axes[0].plot(p, 1 / np.sqrt(p * (1 - p)), ":", color="gray", label=r"$1/\sqrt{p(1-p)}$ ($G \to \infty$)")
    axes[0].set_ylim(0, 6)
    axes[0].set_title(r"prompt weight $c_G(p)$: E[update] $= -c_G(p)\,\nabla p$")
    axes[1].set_title("norm of the expected update of a one-token prompt")
    axes[2].set_title(r"advantage mass E[$\frac{1}{G}\sum_i |A_i|$]")
    for ax in axes:
        ax.set_xlabel("success probability p")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.suptitle("Difficulty bias of the group std, exact (solid: std-normalised, dashed: mean-centred)")
    fig.tight_layout()
    return fig


def plot_kl(res: dict):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    for name, d in res["options"].items():
        style = dict(ls="--", marker="x", ms=6) if name.startswith("k3_value") else dict(marker="o", ms=3)
        axes[0].plot(res["delta"], d["relative_error_vs_exact"], label=name, **style)
        cosine = np.where(d["norm_ratio"] > 1e-3, d["cosine_vs_exact"], np.nan)  # undefined when E[g] = 0
        axes[1].plot(res["delta"], cosine, label=name, **style)
    axes[0].set_yscale("symlog", linthresh=1e-3)
    axes[0].set_title(r"$\|E[\hat g] - \nabla KL\| / \|\nabla KL\|$ (0 = unbiased)")
    axes[1].set_title(r"cosine$(E[\hat g], \nabla KL)$ (k1 in the loss: E[$\hat g$] = 0)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel(r"distance $\delta$ of $\pi_\theta$ from $\pi_{ref}$ (logit RMS)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"KL-penalty gradients, exact, on-policy (L = {res['max_length']}, G = {res['group_size']})")
    fig.tight_layout()
    return fig


def plot_ratio(res: dict):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.3))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ("-", "--", ":", "-.")
    for i, (name, d) in enumerate(res["losses"].items()):
        ax = axes[0] if "no clip" in name else axes[1]
        for j, sigma in enumerate(res["staleness"]):
            kl = res["token_kl_old_new"][j]
            ax.plot(res["length"], d["variance_ratio"][j], styles[j % 4], color=colors[i], marker="o", ms=3,
                    label=f"{name}, staleness {sigma:g} (KL {kl:.3f})")
        if "no clip" in name:
            axes[2].plot(res["length"], d["variance_on_policy"][0], color=colors[i], marker="o", ms=3,
                         label=name)
    axes[0].set_yscale("log")
    axes[0].axhline(1, color="k", lw=0.6)
    axes[0].set_title("unclipped: stale / on-policy variance of the one-group gradient")
    axes[1].set_title("clipped: stale / on-policy variance")
    axes[2].set_yscale("log")
    axes[2].set_title("on-policy variance (trace)\n(token = sequence ratio at r = 1)")
    for ax in axes:
        ax.set_xlabel("response length T (tokens, EOS included)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Token vs sequence ratios at equal per-token staleness, exact (G = {res['group_size']})")
    fig.tight_layout()
    return fig


def plot_gates(res: dict):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.3))
    for name, d in res["losses"].items():
        k = np.arange(len(d["J"]))
        style = dict(ls="--", marker="o", ms=3) if name.startswith("SAPO") else dict(marker="o", ms=3)
        if name.startswith("clip-higher"):
            style = dict(ls=":", marker="s", ms=5, mfc="none")
        axes[0].plot(k, d["first_token_probs"][:, 0, A], label=name, **style)
        axes[1].plot(k, d["first_token_entropy"][:, 0], label=name, **style)
        axes[2].plot(k, d["first_token_probs"][:, 1, C], label=name, **style)
        axes[3].plot(k, d["first_token_entropy"][:, 1], label=name, **style)
    axes[0].set_title("prompt 1: P(rare correct token A)")
    axes[1].set_title("prompt 1: first-token entropy")
    axes[2].set_title("prompt 2: P(rare incorrect token C)")
    axes[3].set_title("prompt 2: first-token entropy")
    for ax in axes:
        ax.set_xlabel("epoch (gradient steps on one batch's expectation)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Gates off-policy, exact (G = {res['group_size']}, step {res['step_size']:g})")
    fig.tight_layout()
    return fig


def plot_zero_signal(res: dict):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.3))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, G in enumerate(res["closed_form"]):
        ax.plot(res["p"], res["closed_form"][G], color=colors[i], label=f"$p^G + (1-p)^G$, G = {G}")
        if G in res["enumerated"]:
            ax.plot(res["J_check"], res["enumerated"][G], "o", color=colors[i], ms=5)
    ax.plot([], [], "ko", ms=5, label="enumerated groups of a sequence model")
    ax.set_xlabel("success probability p")
    ax.set_ylabel("fraction of groups with zero advantage")
    ax.set_title("Zero-signal groups (DAPO dynamic sampling), exact")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------------
# Summary and the run.
# --------------------------------------------------------------------------------------------------------


def summary_text(numbers: dict) -> str:
    length, diff, kl = numbers["length_bias"], numbers["difficulty_bias"], numbers["kl_estimators"]
    ratio, gate, zero = numbers["ratio_variance"], numbers["gates"], numbers["zero_signal"]
    mid = len(length["eos_logit"]) // 2
    lines = [
        f"1. Length bias (G={length['group_size']}, L={length['max_length']}, {length['num_groups']} groups, "
        f"p=1/2): d E[T|wrong]/dJ and d E[T|right]/dJ at E[T]={length['length'][mid]:.2f}"
        f" [range over E[T] in {length['length'].min():.2f}..{length['length'].max():.2f}]",
    ]
    for name, d in length["losses"].items():
        lines.append(f"   {name:34s} wrong {d['length_incorrect_per_J'][mid]:+.4f}"
                     f" [{d['length_incorrect_per_J'].min():+.4f}, {d['length_incorrect_per_J'].max():+.4f}]"
                     f"  right {d['length_correct_per_J'][mid]:+.4f}")
    if numbers.get("length_bias_mc"):
        mc = numbers["length_bias_mc"]
        for name in ("GRPO", "Dr. GRPO"):
            w, r, j = (mc[name][k] for k in ("length_incorrect", "length_correct", "J"))
            lines.append(f"   MC G={mc['group_size']} ({mc['num_groups']} groups) {name}: d E[T|wrong] "
                         f"{w['drift']:+.2e} +- {w['stderr']:.1e}, d E[T|right] {r['drift']:+.2e} +- "
                         f"{r['stderr']:.1e}, dJ {j['drift']:+.2e} +- {j['stderr']:.1e}")
    lines.append("2. Difficulty bias: weight c_G(p) relative to p=1/2 at p = 0.05 / 0.95 (exact; enumeration "
                 f"at G={diff['check_group_size']} agrees to "
                 f"{max(float(c['max_abs_error']) for c in diff['check'].values()):.1e})")
    p = diff["p"]
    i05, i95 = int(np.argmin(np.abs(p - 0.05))), int(np.argmin(np.abs(p - 0.95)))
    for name, c in diff["curves"].items():
        lines.append(f"   {name:32s} {c['weight_relative_to_half'][i05]:.3f} / "
                     f"{c['weight_relative_to_half'][i95]:.3f}   (c at 1/2: "
                     f"{c['weight'][len(p) // 2]:.3f})")
    lines.append(f"3. KL gradients (L={kl['max_length']}): relative error vs grad KL(pi||ref) at delta = "
                 f"{kl['delta'][0]:.2g} / {kl['delta'][len(kl['delta']) // 2]:.2g} / {kl['delta'][-1]:.2g}; "
                 "and vs the state-frozen forward / reverse KL")
    for name, d in kl["options"].items():
        e = d["relative_error_vs_exact"]
        lines.append(f"   {name:38s} {e[0]:.3g} / {e[len(e) // 2]:.3g} / {e[-1]:.3g}   frozen fwd "
                     f"{d['relative_error_vs_state-frozen forward KL'].max():.2g}, rev "
                     f"{d['relative_error_vs_state-frozen reverse KL'].max():.2g}")
    lines.append(f"4. Stale / on-policy gradient variance at T = {ratio['length'][0]} .. "
                 f"{ratio['length'][-1]}"
                 f" (G={ratio['group_size']}); and |E g| stale / on-policy at the longest T")
    for j, sigma in enumerate(ratio["staleness"]):
        lines.append(f"   staleness {sigma:g} (per-token KL {ratio['token_kl_old_new'][j]:.3f}):")
        for name, d in ratio["losses"].items():
            lines.append(f"     {name:38s} " + " ".join(f"{v:.3f}" for v in d["variance_ratio"][j])
                         + f"   |E g| x{d['mean_norm_ratio'][j, -1]:.3f}")
    lines.append(f"5. Gates after {gate['epochs']} epochs (step {gate['step_size']:g}, "
                 f"G={gate['group_size']}): "
                 "prompt 1 P(A) and H; prompt 2 P(C) and H; J")
    for name, d in gate["losses"].items():
        pa, h1 = d["first_token_probs"][:, 0, A], d["first_token_entropy"][:, 0]
        pc, h2 = d["first_token_probs"][:, 1, C], d["first_token_entropy"][:, 1]
        lines.append(f"   {name:28s} P(A) {pa[0]:.3f}->{pa[-1]:.3f}  H {h1[0]:.3f}->{h1[-1]:.3f}  "
                     f"P(C) {pc[0]:.3f}->{pc[-1]:.4f}  H {h2[0]:.3f}->{h2[-1]:.3f}  "
                     f"J {d['J'][-1, 0]:.3f}/{d['J'][-1, 1]:.3f}")
    ds = zero["dynamic_sampling_direction"]
    lines.append(f"6. Zero-signal fraction: max |enumerated - (p^G + (1-p)^G)| over G in "
                 f"{sorted(zero['enumerated'])}: {zero['max_abs_error_enumerated']:.1e}; dynamic sampling "
                 f"vs all groups: cosine {ds['no KL']['cosine']:.6f} (no KL), "
                 f"{ds['GRPO, KL 0.04']['cosine']:.6f} (KL 0.04)")
    return "\n".join(lines)


def _jsonable(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _jsonable(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_jsonable(v) for v in tree]
    if isinstance(tree, np.ndarray | jax.Array):
        return np.asarray(tree).tolist()
    if isinstance(tree, np.generic):
        return tree.item()
    return tree


def run(config: ClaimsConfig, log=print) -> dict[str, Any]:
    """Compute every study, write the figures, numbers.json, summary.txt; returns the numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start, start_cpu = time.perf_counter(), time.process_time()
    numbers: dict[str, Any] = {}
    timings = {}
    for key, study in (("length_bias", length_bias), ("difficulty_bias", difficulty_bias),
                       ("kl_estimators", kl_estimators), ("ratio_variance", ratio_variance),
                       ("gates", gates), ("zero_signal", zero_signal)):
        t = time.perf_counter()
        numbers[key] = study(config)
        timings[key] = time.perf_counter() - t
        log(f"  {key}: {timings[key]:.1f} s")
    timings["exact_total"] = time.perf_counter() - start
    timings["exact_total_cpu"] = time.process_time() - start_cpu  # all threads of this process
    if config.mc_groups > 0 and config.mc_group_size > 0:
        t = time.perf_counter()
        numbers["length_bias_mc"] = length_bias_monte_carlo(config)
        timings["monte_carlo"] = time.perf_counter() - t
        log(f"  length_bias_mc: {timings['monte_carlo']:.1f} s")
    numbers["timings_s"] = timings

    figures = {
        "length": plot_length(numbers["length_bias"], numbers.get("length_bias_mc")),
        "difficulty": plot_difficulty(numbers["difficulty_bias"]),
        "kl": plot_kl(numbers["kl_estimators"]),
        "ratio": plot_ratio(numbers["ratio_variance"]),
        "gates": plot_gates(numbers["gates"]),
        "zero_signal": plot_zero_signal(numbers["zero_signal"]),
    }
    os.makedirs(config.out, exist_ok=True)
    folders = [config.out] + ([config.figures] if config.figures else [])
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
        for name, fig in figures.items():
            fig.savefig(os.path.join(folder, FIGURES[name]), dpi=100)
    for fig in figures.values():
        plt.close(fig)
    text = summary_text(numbers)
    with open(os.path.join(config.out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(config.out, "numbers.json"), "w") as f:
        json.dump(_jsonable(numbers), f, indent=1)
    with open(os.path.join(config.out, "config.json"), "w") as f:
        json.dump(_jsonable(dataclasses.asdict(config)), f, indent=1)
    log(text)
    log(f"exact part {timings['exact_total']:.1f} s ({timings['exact_total_cpu']:.1f} s CPU); "
        f"figures in {', '.join(folders)}; numbers in {config.out}/")
    return numbers


def run_sampled(config: ClaimsConfig, log=print) -> dict[str, Any]:
    """The sampled part (`experiments.claims_sampled`) into `<out>/sampled`, its figures into `figures`
    and its summary into `<results>/claims_sampled.json`."""
    import shutil

    out = os.path.join(config.out, "sampled")
    summary = claims_sampled.run(config.sampled, out, config.figures, log=log)
    if config.results:
        os.makedirs(config.results, exist_ok=True)
        shutil.copy(os.path.join(out, "summary.json"), os.path.join(config.results, "claims_sampled.json"))
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config = tyro.cli(ClaimsConfig, args=argv)
    if config.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    out: dict[str, Any] = {}
    if config.part in ("all", "exact"):
        out["exact"] = run(config)
    if config.part in ("all", "sampled"):
        out["sampled"] = run_sampled(config)
    return out


if __name__ == "__main__":
    main()
