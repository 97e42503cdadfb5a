"""Named presets of the GRPO family and `make_loss`, the entry point for training scripts.

    loss_fn = grpo.make_loss("dapo")                        # or grpo.make_loss(grpo.PRESETS["dapo"])
    loss_fn = grpo.make_loss("dapo", gate=grpo.HardClip(0.2, 0.3), kl_coef=0.01)   # overrides
    loss, metrics = loss_fn(logp_new, logp_old, advantages, mask, logp_ref=None, entropy=None)

Each preset is a `LossConfig` with the paper's defaults:

  name     ratio           gate                        aggregation               KL         advantage
  grpo     token           clip 0.2 / 0.2              seq_mean_token_mean       k3, 0.04   group mean/std
  dr_grpo  token           clip 0.2 / 0.2              seq_mean_token_sum_norm   none       group mean
  dapo     token           clip 0.2 / 0.28             token_mean                none       group mean/std
  gspo     sequence        clip 3e-4 / 4e-4            seq_mean_token_mean       none       group mean/std
  sapo     token           soft, tau 1.0 / 1.05        seq_mean_token_mean       none       group mean/std
  bnpo     token           clip 0.2 / 0.2              token_mean (local)        none       group mean/std
  cispo    token           sg(clip(r, -, 5)) log pi    token_mean                none       group mean/std
  gmpo     geo-mean, log-clip 0.4 / 0.4, no gate       seq_mean_token_mean       none       group mean/std
  ppo      token           clip 0.2 / 0.2              token_mean                none       per token (GAE)
           + clipped value loss (coef 0.5, clip 0.2) for a token critic

Sources: grpo DeepSeekMath (2024) and 003 eq. 96-97; dr_grpo Liu et al. (arXiv 2503.20783), 003 eq.
98-100; dapo Yu et al. (arXiv 2503.14476), 003 eq. 101-102, with the DAPO paper's beta = 0 (seeds
errata); gspo Zheng et al. (arXiv 2507.18071), 003 eq. 107-109; sapo 003 eq. 117-119; bnpo is TRL's
`loss_type="bnpo"`: DAPO's token mean but normalised by the tokens of the batch the loss sees (call it
per micro-batch without `normaliser=` to get TRL's behaviour; with a global normaliser it is exactly
the token mean); cispo MiniMax-M1 (arXiv 2506.13585) with TRL's recommended cap 5; gmpo Zhao et al.
(arXiv 2507.20673); ppo Schulman et al. (2017) at token level, verl's default aggregation.

Adding a variant takes a few lines and touches nothing else:

    grpo.register_preset("my_variant", dataclasses.replace(grpo.PRESETS["grpo"], gate=MyGate()))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from polygrad.grpo import parts
from polygrad.grpo.loss import LossConfig, grpo_loss

PRESETS: dict[str, LossConfig] = {}


def register_preset(name: str, config: LossConfig, *, overwrite: bool = False) -> LossConfig:
    """Add a named preset to `PRESETS` (ValueError if the name is taken and `overwrite` is False)."""
    if not isinstance(config, LossConfig):
        raise ValueError(f"a preset must be a LossConfig, got {type(config).__name__}")
    if name in PRESETS and not overwrite:
        raise ValueError(f"preset {name!r} already exists; pass overwrite=True to replace it")
    PRESETS[name] = config
    return config


register_preset("grpo", LossConfig(gate=parts.HardClip(0.2, 0.2), kl_estimator="k3", kl_coef=0.04))
register_preset(
    "dr_grpo",
    LossConfig(
        gate=parts.HardClip(0.2, 0.2), aggregation="seq_mean_token_sum_norm", advantage="group_centered"
    ),
)
register_preset("dapo", LossConfig(gate=parts.HardClip(0.2, 0.28), aggregation="token_mean"))
register_preset("gspo", LossConfig(ratio=parts.SequenceRatio(), gate=parts.HardClip(3e-4, 4e-4)))
register_preset("sapo", LossConfig(gate=parts.SoftGate(tau_pos=1.0, tau_neg=1.05)))
register_preset("bnpo", LossConfig(gate=parts.HardClip(0.2, 0.2), aggregation="token_mean"))
register_preset(
    "cispo", LossConfig(gate=parts.ClippedISWeight(eps_low=None, eps_high=4.0), aggregation="token_mean")
)
register_preset("gmpo", LossConfig(ratio=parts.GeometricMeanClippedRatio(0.4, 0.4), gate=parts.NoGate()))
register_preset(
    "ppo",
    LossConfig(
        gate=parts.HardClip(0.2, 0.2), aggregation="token_mean", value_coef=0.5, value_clip=0.2,
        advantage="token",
    ),
)


def resolve(preset: str | LossConfig, **overrides) -> LossConfig:
    """A preset by name (or a config) with top-level fields replaced, e.g. `resolve("grpo", kl_coef=0)`."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        preset = PRESETS[preset]
    fields = {f.name for f in dataclasses.fields(LossConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown LossConfig fields {unknown}; valid fields are {sorted(fields)}")
    return dataclasses.replace(preset, **overrides)


def make_loss(preset: str | LossConfig = "grpo", **overrides) -> Callable[..., tuple[jax.Array, dict]]:
    """A pure loss function for a preset (with overrides), ready for `jax.grad(..., has_aux=True)`.

    Returns `loss_fn(logp_new [B,T], logp_old [B,T], advantages [B] or [B,T], mask [B,T],
    logp_ref=None, entropy=None, *, normaliser=None, values=None, values_old=None, returns=None,
    group_size=None) -> (loss, metrics)`, `loss` a scalar to minimise (see `loss.grpo_loss`). The config
    is available as `loss_fn.config` (for `batch_normaliser(loss_fn.config, mask)`).
    """
    config = resolve(preset, **overrides)

    def loss_fn(logp_new, logp_old, advantages, mask, logp_ref=None, entropy=None, **kwargs):
        return grpo_loss(config, logp_new, logp_old, advantages, mask, logp_ref, entropy, **kwargs)

    loss_fn.config = config
    return loss_fn
