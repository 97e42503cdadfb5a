"""The GRPO-family names, kept where users first imported them (`from polygrad import grpo`).

The losses now live in `polygrad.losses` (one vocabulary for every policy-gradient method) and the
sampling-side helpers in `polygrad.lm.shaping`; this module re-exports both.
"""

from polygrad.lm.shaping import (  # noqa: F401
    combine_rewards,
    fill_batch,
    groups_with_signal,
    mask_truncated,
    overlong_penalty,
    zero_signal_fraction,
)
from polygrad.losses import *  # noqa: F401,F403
from polygrad.losses import __all__ as _loss_names

__all__ = [*_loss_names, "combine_rewards", "fill_batch", "groups_with_signal", "mask_truncated",
           "overlong_penalty", "zero_signal_fraction"]
