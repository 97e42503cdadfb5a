"""The GRPO family as composable pure losses (003 section 5; see `presets.py` for the table).

    from polygrad import grpo
    loss_fn = grpo.make_loss("dapo")                       # a preset, optionally with overrides
    loss, metrics = loss_fn(logp_new, logp_old, advantages, mask, logp_ref=None, entropy=None)

Parts (`parts.py`): ratios, gates, aggregations, KL estimators. Assembly and micro-batch-exact
normalisation (`loss.py`). Presets and the registry (`presets.py`). Dynamic sampling, overlong
punishment, truncation masks, reward combination (`shaping.py`).
"""

from polygrad.grpo.loss import (
    ADVANTAGES,
    METRIC_NAMES,
    LossConfig,
    batch_normaliser,
    clipped_value_loss,
    group_advantages,
    grpo_loss,
    loss_terms,
)
from polygrad.grpo.parts import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    ClippedISWeight,
    GateOut,
    GeometricMeanClippedRatio,
    HardClip,
    NoGate,
    RatioOut,
    SeqMeanTokenMean,
    SeqMeanTokenSum,
    SeqMeanTokenSumNorm,
    SequenceRatio,
    SoftGate,
    TokenMean,
    TokenRatio,
    TokenSum,
    kl_k3_value_k2_gradient,
)
from polygrad.grpo.presets import PRESETS, make_loss, register_preset, resolve
from polygrad.grpo.shaping import (
    combine_rewards,
    fill_batch,
    groups_with_signal,
    mask_truncated,
    overlong_penalty,
    zero_signal_fraction,
)

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "METRIC_NAMES",
    "PRESETS",
    "ClippedISWeight",
    "GateOut",
    "GeometricMeanClippedRatio",
    "HardClip",
    "LossConfig",
    "NoGate",
    "RatioOut",
    "SeqMeanTokenMean",
    "SeqMeanTokenSum",
    "SeqMeanTokenSumNorm",
    "SequenceRatio",
    "SoftGate",
    "TokenMean",
    "TokenRatio",
    "TokenSum",
    "batch_normaliser",
    "clipped_value_loss",
    "combine_rewards",
    "fill_batch",
    "group_advantages",
    "grpo_loss",
    "groups_with_signal",
    "kl_k3_value_k2_gradient",
    "loss_terms",
    "make_loss",
    "mask_truncated",
    "overlong_penalty",
    "register_preset",
    "resolve",
    "zero_signal_fraction",
]
