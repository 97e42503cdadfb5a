"""One vocabulary of parts for every policy-gradient loss (003 sections 3 to 5).

    from polygrad import losses
    loss_fn = losses.make_loss("ppo")                       # a preset: reinforce, a2c, ppo, grpo, dapo, ...
    loss_fn = losses.make_loss("grpo", gate=losses.HardClip(0.2, 0.28))   # a preset with a part replaced
    loss, metrics = loss_fn(logp_new, logp_old, advantages, mask, logp_ref=None, entropy=None)

`parts.py`: ratios, gates, aggregations, KL terms. `loss.py`: the assembly (`policy_loss`,
`loss_terms`), the value loss and micro-batch-exact normalisation. `presets.py`: every method's preset
and the registry.
"""

from polygrad.losses.loss import (
    ADVANTAGES,
    METRIC_NAMES,
    LossConfig,
    batch_normaliser,
    clipped_value_loss,
    grpo_loss,
    group_advantages,
    loss_terms,
    policy_loss,
)
from polygrad.losses.parts import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    ClippedISWeight,
    GateOut,
    GeometricMeanClippedRatio,
    HardClip,
    KLToOld,
    NoGate,
    RatioOut,
    ScoreFunction,
    SeqMeanTokenMean,
    SeqMeanTokenSum,
    SeqMeanTokenSumNorm,
    SequenceRatio,
    SoftGate,
    TokenMean,
    TokenRatio,
    TokenSum,
    adapt_kl_coef,
    kl_k3_value_k2_gradient,
)
from polygrad.losses.presets import PRESETS, make_loss, register_preset, resolve

__all__ = [
    "ADVANTAGES", "AGGREGATIONS", "KL_ESTIMATORS", "METRIC_NAMES", "PRESETS", "ClippedISWeight", "GateOut",
    "GeometricMeanClippedRatio", "HardClip", "KLToOld", "LossConfig", "NoGate", "RatioOut", "ScoreFunction",
    "SeqMeanTokenMean", "SeqMeanTokenSum", "SeqMeanTokenSumNorm", "SequenceRatio", "SoftGate", "TokenMean",
    "TokenRatio", "TokenSum", "adapt_kl_coef", "batch_normaliser", "clipped_value_loss", "grpo_loss",
    "group_advantages", "kl_k3_value_k2_gradient", "loss_terms", "make_loss", "policy_loss",
    "register_preset", "resolve",
]
from polygrad.losses.preference import best_of_n_distribution, best_of_n_estimate, best_of_n_kl, bradley_terry_loss, dpo_implicit_reward, dpo_loss, kl_penalized_rewards  # noqa: E402,E501,I001
__all__ += ["best_of_n_distribution", "best_of_n_estimate", "best_of_n_kl", "bradley_terry_loss", "dpo_implicit_reward", "dpo_loss", "kl_penalized_rewards"]  # noqa: E501
