"""One vocabulary of parts for every policy-gradient loss (003 sections 3 to 5).

    from polygrad import losses
    loss_fn = losses.make_loss("ppo")                       # a preset: reinforce, a2c, ppo, grpo, dapo, ...
    loss_fn = losses.make_loss("grpo", gate=losses.HardClip(0.2, 0.28))   # a preset with a part replaced
    loss_fn = losses.make_loss("dapo", correction=losses.MaskedIS())      # + IcePop against the sampler
    loss, metrics = loss_fn(logp_new, logp_old, advantages, mask, logp_ref=None, entropy=None,
                            logp_sampler=None)
    port = losses.from_trl(loss_type="grpo", beta=0.04)     # what TRL computes, as polygrad parts

`parts.py`: ratios, gates, rollout-engine corrections, aggregations, KL terms and their placement.
`reference.py`: how pi_old and pi_ref follow the policy (fixed, synced every k updates, EMA).
`loss.py`: the assembly (`policy_loss`, `loss_terms`), the value loss, micro-batch-exact normalisation
and `AdvantageConfig`. `presets.py`: every method's preset and the registry. `ports.py`: TRL's and verl's
settings translated into parts.
"""

from polygrad.losses.loss import (
    ADVANTAGES,
    METRIC_NAMES,
    MULTI_REWARD_ADVANTAGES,
    TOKEN_ADVANTAGES,
    AdvantageConfig,
    LossConfig,
    batch_normaliser,
    clipped_value_loss,
    group_advantages,
    grpo_loss,
    loss_terms,
    policy_loss,
)
from polygrad.losses.parts import (
    AGGREGATIONS,
    CORRECTION_NAMES,
    CORRECTIONS,
    DRO,
    KL_ESTIMATORS,
    KL_IS_CORRECTIONS,
    ClippedISWeight,
    CorrectionOut,
    CovarianceClip,
    CovarianceKL,
    DivergenceMask,
    GammaWeight,
    GateContext,
    GateOut,
    GeometricMeanClippedRatio,
    HardClip,
    KLToOld,
    MaskedIS,
    NoGate,
    OffPolicySequenceMask,
    RatioOut,
    ScoreFunction,
    SeqMeanTokenMean,
    SeqMeanTokenSum,
    SeqMeanTokenSumNorm,
    SequenceProductRatio,
    SequenceRatio,
    SoftGate,
    TokenMean,
    TokenRatio,
    TokenSum,
    TruncatedIS,
    adapt_kl_coef,
    correction_from_spec,
    correction_spec,
    fold_kl_into_rewards,
    kl_abs,
    kl_k3_value_k2_gradient,
    kl_penalty,
    outcome_token_rewards,
)
from polygrad.losses.ports import Port, from_trl, from_verl
from polygrad.losses.presets import PRESETS, make_loss, register_preset, resolve
from polygrad.losses.reference import REFERENCE_KINDS, ReferenceConfig, update_reference

__all__ = [
    "ADVANTAGES", "AGGREGATIONS", "CORRECTIONS", "DRO", "KL_ESTIMATORS", "KL_IS_CORRECTIONS", "METRIC_NAMES",
    "MULTI_REWARD_ADVANTAGES", "PRESETS", "TOKEN_ADVANTAGES", "AdvantageConfig", "ClippedISWeight",
    "CorrectionOut", "CovarianceClip", "CovarianceKL", "DivergenceMask", "GammaWeight", "GateContext",
    "GateOut", "GeometricMeanClippedRatio", "HardClip", "KLToOld", "LossConfig", "MaskedIS", "NoGate",
    "OffPolicySequenceMask", "Port", "RatioOut", "ScoreFunction", "SeqMeanTokenMean", "SeqMeanTokenSum",
    "SeqMeanTokenSumNorm", "SequenceProductRatio", "SequenceRatio", "SoftGate", "TokenMean", "TokenRatio",
    "TokenSum", "TruncatedIS", "adapt_kl_coef", "batch_normaliser", "clipped_value_loss",
    "fold_kl_into_rewards", "from_trl", "from_verl", "group_advantages", "grpo_loss", "kl_abs",
    "kl_k3_value_k2_gradient", "kl_penalty", "loss_terms", "make_loss", "outcome_token_rewards",
    "policy_loss", "register_preset", "resolve", "REFERENCE_KINDS", "ReferenceConfig", "update_reference",
    "CORRECTION_NAMES", "correction_from_spec", "correction_spec",
]
from polygrad.losses.preference import best_of_n_distribution, best_of_n_estimate, best_of_n_kl, bradley_terry_loss, dpo_implicit_reward, dpo_loss, kl_penalized_rewards  # noqa: E402,E501,I001
__all__ += ["best_of_n_distribution", "best_of_n_estimate", "best_of_n_kl", "bradley_terry_loss", "dpo_implicit_reward", "dpo_loss", "kl_penalized_rewards"]  # noqa: E501
