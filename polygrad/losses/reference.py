"""The reference point of a policy update: fixed, synced every k updates, or a moving average of iterates.

Two policies anchor a policy-gradient update: the old policy pi_old of the ratio pi_theta / pi_old (the
proximal point of PPO's trust region) and the reference pi_ref of the KL penalty. Each can be

- `fixed`: never moves (the usual pi_ref: the SFT model);
- `sync`: set to the current policy every `every` updates (the usual pi_old: `every=1`, the policy
  that sampled the batch; TRL's `sync_ref_model=True` with `ref_model_mixup_alpha=1`);
- `ema`: every `every` updates, ref <- alpha * theta + (1 - alpha) * ref, an exponential moving average
  of past iterates (TRL's `SyncRefModelCallback`: `ref_model_sync_steps`, `ref_model_mixup_alpha`,
  defaults 512 and 0.6, after Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good
  Alignment", arXiv 2404.09656, eq. 4-5; as the old policy of the ratio, the EMA proximal policy of
  Hilton, Cobbe and Schulman 2021, "Batch size-invariance for policy optimization", arXiv 2110.00641,
  section 3, whose decoupled objective is the three-policy loss with a TIS correction pi_old / pi_sampler).

The proximal-point view (Schulman et al. 2017; note 000): each update maximises the surrogate minus a
distance to the anchor; a fixed anchor bounds the total drift, a synced one only the drift per k updates,
an EMA sits in between (its effective horizon is about `every / alpha` updates).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp

from polygrad import validate

REFERENCE_KINDS = ("fixed", "sync", "ema")


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """How a reference policy follows the trained one (see the module docstring)."""

    kind: str = "fixed"
    """fixed (never moves), sync (copy the policy every `every` updates) or ema (mix it in)."""
    every: int = 1
    """k: updates between syncs or EMA steps (TRL's ref_model_sync_steps)."""
    alpha: float = 0.6
    """EMA weight of the policy, ref <- alpha * theta + (1 - alpha) * ref (TRL's ref_model_mixup_alpha);
    ignored unless kind is ema."""

    def __post_init__(self):
        validate.one_of("ReferenceConfig.kind", self.kind, REFERENCE_KINDS)
        validate.integer("ReferenceConfig.every", self.every, minimum=1)
        validate.in_range("ReferenceConfig.alpha", self.alpha, 0.0, 1.0, low_open=True)


def update_reference(config: ReferenceConfig, reference: Any, params: Any, step: jax.Array) -> Any:
    """The reference after `step` updates of the policy, given the policy `params` now.

    Call it once per update with the number of updates done so far (`step`, an int scalar, may be
    traced): when `step % every == 0` a `sync` reference becomes `params` and an `ema` reference becomes
    alpha * params + (1 - alpha) * reference (Gorbatovski et al. 2024, eq. 5); otherwise, and always for
    `fixed`, it is returned unchanged. Pytrees of equal structure; every leaf keeps the reference's dtype.
    After n EMA steps from ref_0 with policies theta_1..theta_n:
    ref_n = (1 - alpha)^n ref_0 + sum_j alpha (1 - alpha)^(n - j) theta_j.
    """
    chex.assert_trees_all_equal_shapes(reference, params)
    if config.kind == "fixed":
        return reference
    due = (jnp.asarray(step) % config.every) == 0

    def mix(ref, new):
        target = new if config.kind == "sync" else config.alpha * new + (1.0 - config.alpha) * ref
        return jnp.where(due, target, ref).astype(ref.dtype)

    return jax.tree.map(mix, reference, params)
