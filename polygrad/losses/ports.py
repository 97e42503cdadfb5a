"""TRL's and verl's loss settings as polygrad parts: `from_trl(**GRPOConfig fields)`, `from_verl(config)`.

Each returns a `Port`: the `LossConfig` whose `policy_loss` computes what that library's trainer computes
(value and gradient) for the given settings, with the library's default for every field not given, and
the `AdvantageConfig` of its advantage estimator. A field this module does not know, or a combination
polygrad cannot reproduce exactly, raises a `ConfigError` naming it, rather than being silently ignored.

    port = losses.from_trl(loss_type="grpo", beta=0.04, epsilon_high=0.28)
    adv = port.advantage.compute(rewards)                  # rewards [P, G] -> [P * G]
    loss, metrics = losses.policy_loss(port.loss, logp_new, logp_old, adv, mask, logp_ref=logp_ref,
                                       normaliser=port.normaliser(full_batch_mask))

    port = losses.from_verl({"actor": {"policy_loss": {"loss_mode": "gspo"}, "clip_ratio_low": 3e-4,
                                       "clip_ratio_high": 4e-4},
                             "algorithm": {"adv_estimator": "grpo"}})

What the ports assume about the batch (`Port.notes` lists the conditions of each port):
  - prompt-major groups: `rewards[p, g]` is response g of prompt p, and the loss rows are
    `rewards.reshape(-1)` in the same order (TRL's `repeat_interleave`; verl's `uid` index).
  - no response of the batch is entirely masked (TRL divides sequence means by all B rows, polygrad and
    verl by the non-empty ones).
  - the normaliser of a global token mean (TRL's dapo, cispo, vespo `num_items_in_batch`; verl's
    `batch_num_tokens`) is that of the whole generation / mini-batch: `Port.normaliser(mask)` of the full
    batch, passed to every micro-batch. TRL's bnpo, grpo, sapo, dr_grpo, luspo normalise each micro-batch
    on its own: call the loss per micro-batch without `normaliser=`.

Sources: TRL `trl/trainer/grpo_config.py` and `grpo_trainer.py` at 1.10.0.dev0 (July 2026) with the
release 1.10.0 default `use_bias_correction_kl=True` (PR #6503); verl `verl/trainer/ppo/core_algos.py`,
`verl/workers/utils/losses.py`, `verl/trainer/ppo/rollout_corr_helper.py` and the config dataclasses and
yaml files (`verl/workers/config/actor.py`, `verl/trainer/config/*.yaml`) at main of August 2026.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from polygrad import validate
from polygrad.losses import parts
from polygrad.losses.loss import AdvantageConfig, LossConfig, batch_normaliser


@dataclasses.dataclass(frozen=True)
class Port:
    """A library's loss and advantage settings as polygrad parts.

    loss: the `LossConfig` (pass it to `policy_loss` / `make_loss`).
    advantage: the `AdvantageConfig` of the library's advantage estimator, or None when the advantages
      come from a critic (verl's "gae").
    library: "trl" or "verl".
    settings: every setting the port used, the library's defaults filled in, as (name, value) pairs.
    notes: conditions for exactness and what the caller must do outside the loss.
    """

    loss: LossConfig
    advantage: AdvantageConfig | None
    library: str
    settings: tuple[tuple[str, Any], ...]
    notes: tuple[str, ...] = ()

    def normaliser(self, full_mask: jax.Array) -> jax.Array:
        """`batch_normaliser(self.loss, full_mask)`: the normaliser of the whole batch, for micro-batches."""
        return batch_normaliser(self.loss, full_mask)


def _unsupported(library: str, what: str) -> None:
    validate.fail(f"{library} setting not reproducible by polygrad: {what}")


# --- TRL ------------------------------------------------------------------------------------------

# GRPOConfig's loss-related fields and their defaults (TRL 1.10).
TRL_DEFAULTS: dict[str, Any] = {
    "loss_type": "dapo",
    "beta": 0.0,
    "epsilon": 0.2,
    "epsilon_high": None,
    "delta": None,
    "importance_sampling_level": "token",
    "scale_rewards": "group",
    "multi_objective_aggregation": "sum_then_normalize",
    "reward_weights": None,
    "use_bias_correction_kl": True,
    "sapo_temperature_pos": 1.0,
    "sapo_temperature_neg": 1.05,
    "vespo_k_pos": 2.0,
    "vespo_lambda_pos": 3.0,
    "vespo_k_neg": 3.0,
    "vespo_lambda_neg": 2.0,
    "max_completion_length": 512,
    "mask_truncated_completions": False,
    "top_entropy_quantile": 1.0,
    "entropy_coef": 0.0,
    "use_adaptive_entropy": False,
    "use_vllm": False,
    "vllm_importance_sampling_correction": True,
    "vllm_importance_sampling_mode": "sequence_mask",
    "vllm_importance_sampling_clip_max": 3.0,
    "vllm_importance_sampling_clip_min": None,
    "vllm_importance_sampling_cap": None,
    "off_policy_mask_threshold": None,
    "use_liger_kernel": False,
}

TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")


def from_trl(**kwargs: Any) -> Port:
    """TRL's `GRPOTrainer` loss for the given `GRPOConfig` fields (TRL's defaults for the others).

    Accepted fields (`TRL_DEFAULTS`): loss_type, beta, epsilon, epsilon_high, delta,
    importance_sampling_level, scale_rewards, multi_objective_aggregation, reward_weights,
    use_bias_correction_kl, sapo_temperature_pos/neg, vespo_k_pos/lambda_pos/k_neg/lambda_neg,
    max_completion_length, mask_truncated_completions, top_entropy_quantile, entropy_coef,
    use_adaptive_entropy, use_vllm, vllm_importance_sampling_correction / _mode / _clip_max / _clip_min /
    _cap, off_policy_mask_threshold, use_liger_kernel. Any other name raises `ConfigError`.

    The mapping (TRL `_compute_loss`):
      - ratio: token r_t, or GSPO's sequence geometric mean (`importance_sampling_level="sequence"`);
        VESPO: the product over the response.
      - gate: grpo / bnpo / dr_grpo / dapo / luspo: clip [1 - epsilon, 1 + epsilon_high] (epsilon_high
        defaults to epsilon), `delta` = dual clip of negative advantages (TRL's two-sided clip, identical
        when delta > 1 + epsilon_high); cispo: sg(min(r, epsilon_high)) A log pi (TRL caps at
        `epsilon_high` itself, so the default cap is 0.2; TRL recommends epsilon_high=5); sapo: soft gate;
        vespo: gamma weight.
      - aggregation: grpo, sapo: per-response token mean; bnpo: token mean of the micro-batch; dr_grpo:
        token sums / max_completion_length; dapo, cispo, vespo: token mean of the generation batch
        (`Port.normaliser`); luspo: token sums (length-weighted sequence terms).
      - beta > 0: k3 in the loss, times the policy ratio if `use_bias_correction_kl` (default True
        since TRL 1.10.0; pass False for earlier versions).
      - use_vllm with the IS correction: TruncatedIS / MaskedIS on pi_old / pi_sampler (pass
        `logp_sampler=`); off_policy_mask_threshold: OffPolicySequenceMask.
      - advantages: group mean and std (ddof 1, eps 1e-4), batch std ("batch") or none ("none");
        "normalize_then_sum": GDPO.
    """
    unknown = sorted(set(kwargs) - set(TRL_DEFAULTS))
    if unknown:
        validate.fail(f"from_trl: unknown or unsupported GRPOConfig fields {unknown}; "
                      f"supported: {sorted(TRL_DEFAULTS)}")
    c = {**TRL_DEFAULTS, **kwargs}
    notes = []
    loss_type = validate.one_of("loss_type", c["loss_type"], TRL_LOSS_TYPES)
    level = validate.one_of("importance_sampling_level", c["importance_sampling_level"],
                            ("token", "sequence"))
    scale = {True: "group", False: "none"}.get(c["scale_rewards"], c["scale_rewards"])
    validate.one_of("scale_rewards", scale, ("group", "batch", "none"))
    eps_low = validate.positive("epsilon", c["epsilon"])
    eps_high = eps_low if c["epsilon_high"] is None else validate.positive("epsilon_high", c["epsilon_high"])
    beta = validate.non_negative("beta", c["beta"])
    if c["use_liger_kernel"]:
        _unsupported("TRL", "use_liger_kernel=True (the Liger loss is a separate implementation)")
    if c["top_entropy_quantile"] != 1.0:
        _unsupported("TRL", f"top_entropy_quantile={c['top_entropy_quantile']} (entropy-selected tokens)")
    if c["use_adaptive_entropy"]:
        _unsupported("TRL", "use_adaptive_entropy=True (a stateful entropy coefficient)")
    token_mean_types = ("bnpo", "dapo", "cispo", "vespo")
    if c["entropy_coef"] != 0.0 and loss_type not in token_mean_types:
        _unsupported("TRL", f"entropy_coef with loss_type={loss_type!r} (TRL's entropy bonus is a token "
                     "mean, the policy term is not)")

    # ratio and gate
    ratio = parts.SequenceRatio() if level == "sequence" else parts.TokenRatio()
    if loss_type == "cispo":
        gate = parts.ClippedISWeight(eps_low=None, eps_high=eps_high - 1.0)
    elif loss_type == "sapo":
        gate = parts.SoftGate(c["sapo_temperature_pos"], c["sapo_temperature_neg"])
    elif loss_type == "vespo":
        ratio = parts.SequenceProductRatio()
        gate = parts.GammaWeight(c["vespo_k_pos"], c["vespo_lambda_pos"], c["vespo_k_neg"],
                                 c["vespo_lambda_neg"])
    else:
        delta = c["delta"]
        if delta is not None and delta <= 1.0 + eps_high:
            _unsupported("TRL", f"delta={delta} <= 1 + epsilon_high (TRL's cap then also binds for A > 0)")
        gate = parts.HardClip(eps_low, eps_high, dual_clip=delta)
    if c["delta"] is not None and loss_type in ("cispo", "sapo", "vespo"):
        notes.append(f"delta is ignored by loss_type={loss_type!r}, as in TRL")

    # aggregation
    aggregation = {
        "grpo": "seq_mean_token_mean", "sapo": "seq_mean_token_mean", "bnpo": "token_mean",
        "dapo": "token_mean", "cispo": "token_mean", "vespo": "token_mean", "luspo": "seq_mean_token_sum",
        "dr_grpo": parts.SeqMeanTokenSumNorm(float(validate.positive("max_completion_length",
                                                                     c["max_completion_length"]))),
    }[loss_type]
    if loss_type in ("dapo", "cispo", "vespo"):
        notes.append("token mean over the generation batch: pass normaliser=port.normaliser(full_mask)")
    else:
        notes.append("TRL normalises each micro-batch: call the loss per micro-batch without normaliser= "
                     "and average over the gradient-accumulation steps")
    if loss_type == "luspo" and (level != "sequence" or beta > 0):
        _unsupported("TRL", "loss_type='luspo' needs importance_sampling_level='sequence' and beta=0 (TRL "
                     "otherwise averages length-weighted token losses over padding too)")

    # KL to the reference
    kl_correction = "none"
    if beta > 0 and c["use_bias_correction_kl"]:
        if loss_type == "vespo" and level == "sequence":
            _unsupported("TRL", "vespo with importance_sampling_level='sequence' and the KL bias correction")
        kl_correction = "token" if loss_type == "vespo" else "policy_ratio"
        if level == "sequence":
            notes.append("use_bias_correction_kl at sequence level multiplies the KL by the sequence "
                         "ratio, as TRL does (TRL issue #6586); it is not the unbiased per-token correction")

    # rollout-engine corrections
    correction = []
    if c["off_policy_mask_threshold"] is not None:
        correction.append(parts.OffPolicySequenceMask(c["off_policy_mask_threshold"]))
    if c["use_vllm"] and c["vllm_importance_sampling_correction"]:
        mode = validate.one_of("vllm_importance_sampling_mode", c["vllm_importance_sampling_mode"],
                               ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"))
        high = c["vllm_importance_sampling_clip_max"]
        if c["vllm_importance_sampling_cap"] is not None:
            high = c["vllm_importance_sampling_cap"]
        low = c["vllm_importance_sampling_clip_min"]
        if loss_type == "vespo" and not mode.startswith("token"):
            validate.fail(f"from_trl: vespo requires a token-level vllm_importance_sampling_mode, got "
                          f"{mode!r} (TRL raises too)")
        if low is None and high is None:
            _unsupported("TRL", "vLLM IS without clip_min and clip_max (TRL refuses truncation and keeps "
                         "plain IS weights for masking)")
        is_level = "sequence" if mode.startswith("sequence") else "token"
        if loss_type == "luspo" and is_level == "token":
            _unsupported("TRL", "luspo with a token-level vLLM IS mode")
        if mode.endswith("truncate"):
            correction.append(parts.TruncatedIS(is_level, cap_max=high, cap_min=low))
        else:
            correction.append(parts.MaskedIS(is_level, low=low, high=high, reweight=True))
        notes.append("pass the rollout engine's log-probs as logp_sampler=")
    if c["mask_truncated_completions"]:
        notes.append("mask_truncated_completions: zero the mask of truncated responses first "
                     "(polygrad.lm.shaping.mask_truncated)")

    loss = LossConfig(
        ratio=ratio, gate=gate, aggregation=aggregation, correction=tuple(correction), kl_estimator="k3",
        kl_coef=beta, kl_is_correction=kl_correction, entropy_coef=c["entropy_coef"], advantage="token",
    )

    # advantages
    weights = None if c["reward_weights"] is None else tuple(float(w) for w in c["reward_weights"])
    aggregation_mode = validate.one_of("multi_objective_aggregation", c["multi_objective_aggregation"],
                                       ("sum_then_normalize", "normalize_then_sum"))
    if aggregation_mode == "normalize_then_sum":
        advantage = AdvantageConfig.of("multi_reward", weights=weights, eps=1e-4, ddof=1, batch_eps=1e-4,
                                       batch_ddof=1)
        notes.append("normalize_then_sum: pass rewards [P, G, K], one column per reward function")
    elif scale == "group":
        advantage = AdvantageConfig.of("group_normalized", reward_weights=weights, eps=1e-4, ddof=1)
    elif scale == "batch":
        advantage = AdvantageConfig.of("batch_std", reward_weights=weights, eps=1e-4, ddof=1)
    else:
        advantage = AdvantageConfig.of("group_centered", reward_weights=weights)
    return Port(loss, advantage, "trl", tuple(sorted(c.items())), tuple(notes))


# --- verl -----------------------------------------------------------------------------------------

# ActorConfig / PolicyLossConfig / AlgoConfig defaults (verl/trainer/config/actor/actor.yaml,
# ppo_trainer.yaml, algorithm/rollout_correction.yaml).
VERL_ACTOR_DEFAULTS: dict[str, Any] = {
    "clip_ratio": 0.2,
    "clip_ratio_low": 0.2,
    "clip_ratio_high": 0.2,
    "clip_ratio_c": 3.0,
    "loss_agg_mode": "token-mean",
    "loss_scale_factor": None,
    "entropy_coeff": 0.0,
    "tau_pos": 1.0,
    "tau_neg": 1.05,
    "use_kl_loss": False,
    "kl_loss_coef": 0.001,
    "kl_loss_type": "low_var_kl",
}
VERL_POLICY_LOSS_DEFAULTS: dict[str, Any] = {
    "loss_mode": "vanilla",
    "clip_cov_ratio": 0.0002,
    "clip_cov_lb": 1.0,
    "clip_cov_ub": 5.0,
    "kl_cov_ratio": 0.0002,
    "ppo_kl_coef": 0.1,
    "dro_beta": None,
}
VERL_ALGORITHM_DEFAULTS: dict[str, Any] = {
    "gamma": 1.0,
    "lam": 1.0,
    "adv_estimator": "gae",
    "norm_adv_by_std_in_grpo": True,
    "use_kl_in_reward": False,
    "kl_penalty": "kl",
    "gdpo_reward_keys": None,
    "gdpo_reward_weights": None,
}
VERL_KL_CTRL_DEFAULTS: dict[str, Any] = {
    "type": "fixed", "kl_coef": 0.001, "horizon": 10000, "target_kl": 0.1}
VERL_ROLLOUT_CORRECTION_DEFAULTS: dict[str, Any] = {
    "rollout_is": None,
    "rollout_is_threshold": 2.0,
    "rollout_is_batch_normalize": False,
    "rollout_rs": None,
    "rollout_rs_threshold": None,
    "bypass_mode": False,
    "loss_type": "ppo_clip",
}

_VERL_AGGREGATIONS = {
    "token-mean": "token_mean",
    "token-sum": "token_sum",
    "seq-mean-token-sum": "seq_mean_token_sum",
    "seq-mean-token-mean": "seq_mean_token_mean",
    "seq-mean-token-sum-norm": None,  # SeqMeanTokenSumNorm(loss_scale_factor)
}
# verl kl_penalty / kl_loss_type names -> (polygrad estimator, k3 clamp).
_VERL_KL = {
    "kl": ("k1", None), "k1": ("k1", None), "abs": ("abs", None), "mse": ("k2", None), "k2": ("k2", None),
    "low_var_kl": ("k3", 10.0), "k3": ("k3", 10.0),
    "kl+": ("k1+", None), "k1+": ("k1+", None), "abs+": ("abs+", None), "mse+": ("k2", None),
    "k2+": ("k2", None), "low_var_kl+": ("k3+", 10.0), "k3+": ("k3+", 10.0),
}
VERL_LOSS_MODES = ("vanilla", "gspo", "sapo", "gpg", "clip_cov", "kl_cov", "geo_mean", "cispo", "dro",
                   "dppo_tv", "dppo_kl")
VERL_ADV_ESTIMATORS = ("gae", "grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "reinforce_plus_plus",
                       "reinforce_plus_plus_baseline", "gpg", "gdpo")


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested and dotted keys -> {"a.b.c": value} (mappings are descended into)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _section(flat: dict[str, Any], prefix: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """Pop the keys under `prefix` from `flat` into a copy of `defaults`; unknown keys raise."""
    out = dict(defaults)
    for name in [n for n in flat if n.startswith(prefix) and "." not in n[len(prefix):]]:
        field = name[len(prefix):]
        if field not in defaults:
            validate.fail(f"from_verl: unknown or unsupported setting {name!r}; supported under {prefix!r}: "
                          f"{sorted(defaults)}")
        out[field] = flat.pop(name)
    return out


def from_verl(config: Mapping[str, Any]) -> Port:
    """verl's actor loss and advantage estimator for the given settings (verl's defaults for the others).

    `config` holds an "actor" section (verl's `actor_rollout_ref.actor`: clip_ratio, clip_ratio_low,
    clip_ratio_high, clip_ratio_c, loss_agg_mode, loss_scale_factor, entropy_coeff, tau_pos, tau_neg,
    use_kl_loss, kl_loss_coef, kl_loss_type, and policy_loss: loss_mode, clip_cov_ratio, clip_cov_lb,
    clip_cov_ub, kl_cov_ratio, ppo_kl_coef, dro_beta) and an "algorithm" section (gamma, lam,
    adv_estimator, norm_adv_by_std_in_grpo, use_kl_in_reward, kl_penalty, kl_ctrl, rollout_correction,
    gdpo_reward_keys, gdpo_reward_weights), nested or as dotted keys ("actor.policy_loss.loss_mode";
    the prefix "actor_rollout_ref." is accepted). Any other key raises `ConfigError` naming it.

    The mapping (verl `core_algos.py`):
      - loss_mode: vanilla = clip [1 - clip_ratio_low, 1 + clip_ratio_high] with the dual clip
        clip_ratio_c (3) for A < 0, always on in verl; gspo, sapo (both force seq-mean-token-mean); gpg;
        clip_cov; kl_cov; geo_mean (GMPO, log-space clip, mean over responses); cispo (clip both sides of
        the IS weight); dro (dro_beta required); dppo_tv, dppo_kl (thresholds clip_ratio_low/high, IS cap
        clip_ratio_c).
      - clip_ratio_low / clip_ratio_high default to 0.2 themselves: setting only `clip_ratio` changes
        nothing in verl's default configs (the fallback to clip_ratio applies only when they are null).
      - loss_agg_mode: token-mean, token-sum, seq-mean-token-sum, seq-mean-token-mean,
        seq-mean-token-sum-norm (sequence sums / loss_scale_factor, default the padded length).
      - use_kl_loss: kl_loss_type in the loss (low_var_kl = k3 clamped to [-10, 10]; "+" names:
        straight-through k2 gradient); use_kl_in_reward: kl_penalty folded into the rewards.
      - rollout_correction (decoupled mode): rollout_is "token" / "sequence" with a float threshold =
        TruncatedIS, with "low_high" = MaskedIS (IcePop). Rejection sampling (rollout_rs), batch
        normalisation and bypass mode are refused.
      - adv_estimator: grpo (ddof 1, eps 1e-6; norm_adv_by_std_in_grpo=False: group mean only), rloo,
        reinforce_plus_plus, reinforce_plus_plus_baseline, gpg (verl's alpha), gdpo; gae: advantages
        from a critic (`Port.advantage` is None).
    """
    flat = {}
    for name, value in _flatten(config).items():
        flat[name.removeprefix("actor_rollout_ref.")] = value
    actor = _section(flat, "actor.", VERL_ACTOR_DEFAULTS)
    policy_loss = _section(flat, "actor.policy_loss.", VERL_POLICY_LOSS_DEFAULTS)
    algorithm = _section(flat, "algorithm.", VERL_ALGORITHM_DEFAULTS)
    kl_ctrl = _section(flat, "algorithm.kl_ctrl.", VERL_KL_CTRL_DEFAULTS)
    rollout = _section(flat, "algorithm.rollout_correction.", VERL_ROLLOUT_CORRECTION_DEFAULTS)
    if flat:
        validate.fail(f"from_verl: unknown or unsupported settings {sorted(flat)}; use the sections 'actor' "
                      "(with 'policy_loss') and 'algorithm' (with 'kl_ctrl', 'rollout_correction')")
    notes = []
    mode = validate.one_of("actor.policy_loss.loss_mode", policy_loss["loss_mode"], VERL_LOSS_MODES)
    low = actor["clip_ratio_low"] if actor["clip_ratio_low"] is not None else actor["clip_ratio"]
    high = actor["clip_ratio_high"] if actor["clip_ratio_high"] is not None else actor["clip_ratio"]
    agg_name = validate.one_of("actor.loss_agg_mode", actor["loss_agg_mode"], _VERL_AGGREGATIONS)
    if agg_name == "seq-mean-token-sum-norm":
        factor = actor["loss_scale_factor"]
        aggregation = parts.SeqMeanTokenSumNorm(None if factor is None else float(factor))
    else:
        aggregation = _VERL_AGGREGATIONS[agg_name]

    ratio = parts.TokenRatio()
    if mode == "vanilla":
        c = actor["clip_ratio_c"]
        if c <= 1.0 + high:
            _unsupported("verl", f"clip_ratio_c={c} <= 1 + clip_ratio_high={high}")
        gate = parts.HardClip(low, high, dual_clip=c)
    elif mode == "gspo":
        ratio, gate, aggregation = parts.SequenceRatio(), parts.HardClip(low, high), "seq_mean_token_mean"
        notes.append("gspo: verl clamps the log sequence ratio at 10 (polygrad at 20 per token)")
    elif mode == "sapo":
        gate, aggregation = parts.SoftGate(actor["tau_pos"], actor["tau_neg"]), "seq_mean_token_mean"
    elif mode == "gpg":
        gate = parts.ScoreFunction()
    elif mode == "clip_cov":
        gate = parts.CovarianceClip(low, high, fraction=policy_loss["clip_cov_ratio"],
                                    cov_low=policy_loss["clip_cov_lb"], cov_high=policy_loss["clip_cov_ub"])
        notes.append("clip_cov: verl draws the detached tokens at random; pass key= for the same law")
    elif mode == "kl_cov":
        gate = parts.CovarianceKL(fraction=policy_loss["kl_cov_ratio"], coef=policy_loss["ppo_kl_coef"])
    elif mode == "geo_mean":
        ratio, gate = parts.GeometricMeanClippedRatio(low, high), parts.NoGate()
        aggregation = "seq_mean_token_mean"  # verl: mean over responses of -A_i s_i, A_i the token mean
    elif mode == "cispo":
        gate = parts.ClippedISWeight(eps_low=low, eps_high=high)
    elif mode == "dro":
        if policy_loss["dro_beta"] is None:
            validate.fail("from_verl: policy_loss.dro_beta must be set for loss_mode 'dro' (verl raises too)")
        gate = parts.DRO(policy_loss["dro_beta"])
    else:  # dppo_tv, dppo_kl
        divergence = "tv" if mode == "dppo_tv" else "binary_kl"
        gate = parts.DivergenceMask(divergence, low, high, cap=actor["clip_ratio_c"])

    kl_name = validate.one_of("actor.kl_loss_type", actor["kl_loss_type"], _VERL_KL)
    kl_estimator, k3_clip = _VERL_KL[kl_name]
    kl_coef = actor["kl_loss_coef"] if actor["use_kl_loss"] else 0.0
    correction = ()
    if rollout["bypass_mode"]:
        _unsupported("verl", "rollout_correction.bypass_mode=True")
    if rollout["rollout_rs"] is not None:
        _unsupported("verl", "rollout_correction.rollout_rs (rejection sampling changes the response mask "
                     "and hence the normalisers)")
    if rollout["rollout_is_batch_normalize"]:
        _unsupported("verl", "rollout_correction.rollout_is_batch_normalize=True")
    if rollout["rollout_is"] is not None:
        level = validate.one_of("algorithm.rollout_correction.rollout_is", rollout["rollout_is"],
                                ("token", "sequence"))
        threshold = rollout["rollout_is_threshold"]
        if isinstance(threshold, str) and "_" in threshold:
            lo, hi = (float(x) for x in threshold.split("_", 1))
            correction = (parts.MaskedIS(level, low=lo, high=hi, reweight=True),)
        else:
            correction = (parts.TruncatedIS(level, cap_max=float(threshold)),)
        notes.append("pass the rollout engine's log-probs as logp_sampler= (verl's rollout_log_probs)")
    loss = LossConfig(
        ratio=ratio, gate=gate, aggregation=aggregation, correction=correction, kl_estimator=kl_estimator,
        kl_coef=kl_coef, kl_k3_clip=k3_clip, entropy_coef=actor["entropy_coeff"], advantage="token",
    )
    notes.append("token-mean and seq-mean normalisers are those of the mini-batch (verl's batch_num_tokens, "
                 "global_batch_size): pass normaliser=port.normaliser(mini_batch_mask) to every micro-batch")

    estimator = validate.one_of("algorithm.adv_estimator", algorithm["adv_estimator"], VERL_ADV_ESTIMATORS)
    in_reward = {}
    if algorithm["use_kl_in_reward"]:
        if kl_ctrl["type"] != "fixed":
            _unsupported("verl", "algorithm.kl_ctrl.type='adaptive' (a stateful coefficient)")
        name = validate.one_of("algorithm.kl_penalty", algorithm["kl_penalty"], _VERL_KL)
        in_reward = {"kl_coef": kl_ctrl["kl_coef"], "kl_estimator": _VERL_KL[name][0]}
        notes.append("KL in the reward: pass mask, logp (verl's old_log_probs) and logp_ref to "
                     "advantage.compute")
    norm = algorithm["norm_adv_by_std_in_grpo"]
    if estimator in ("grpo", "grpo_vectorized"):
        advantage = (AdvantageConfig.of("group_normalized", eps=1e-6, ddof=1, **in_reward) if norm
                     else AdvantageConfig.of("group_centered", **in_reward))
        notes.append("grpo: verl gives a group of one response the advantage score / (1 + 1e-6); polygrad 0")
    elif estimator in ("rloo", "rloo_vectorized"):
        advantage = AdvantageConfig.of("leave_one_out", **in_reward)
    elif estimator == "reinforce_plus_plus":
        advantage = AdvantageConfig.of("reinforce_pp", gamma=float(algorithm["gamma"]), **in_reward)
    elif estimator == "reinforce_plus_plus_baseline":
        advantage = AdvantageConfig.of("reinforce_pp_baseline", **in_reward)
    elif estimator == "gpg":
        advantage = AdvantageConfig.of("gpg", alpha="nonzero_rewards", **in_reward)
    elif estimator == "gdpo":
        if not norm:
            _unsupported("verl", "gdpo with norm_adv_by_std_in_grpo=False")
        if in_reward:
            _unsupported("verl", "gdpo with use_kl_in_reward")
        weights = algorithm["gdpo_reward_weights"]
        advantage = AdvantageConfig.of(
            "multi_reward", weights=None if weights is None else tuple(float(w) for w in weights), eps=1e-6,
            ddof=1, batch_eps=1e-8, batch_ddof=1, batch_eps_in_sqrt=True, token_weighted=True)
        notes.append("gdpo: pass rewards [P, G, K] in the order of gdpo_reward_keys, and the mask")
    else:  # gae
        advantage = None
        notes.append("gae: advantages from a critic (token-level GAE with algorithm.gamma and lam, whitened)")
    settings = {**{f"actor.{k}": v for k, v in actor.items()},
                **{f"actor.policy_loss.{k}": v for k, v in policy_loss.items()},
                **{f"algorithm.{k}": v for k, v in algorithm.items()},
                **{f"algorithm.kl_ctrl.{k}": v for k, v in kl_ctrl.items()},
                **{f"algorithm.rollout_correction.{k}": v for k, v in rollout.items()}}
    return Port(loss, advantage, "verl", tuple(sorted(settings.items(), key=lambda kv: kv[0])), tuple(notes))
