"""Named presets of every policy-gradient method and `make_loss`, the entry point for training scripts.

    loss_fn = losses.make_loss("dapo")                        # or losses.make_loss(losses.PRESETS["dapo"])
    loss_fn = losses.make_loss("dapo", gate=losses.HardClip(0.2, 0.3), kl_coef=0.01)   # overrides
    loss, metrics = loss_fn(logp_new, logp_old, advantages, mask, logp_ref=None, entropy=None)

Each preset is a `LossConfig`, and this file is the one place that declares its defaults:

  name        ratio        gate                        aggregation               KL            extra
  reinforce   token        score function A log pi     seq_mean_token_sum        -             V 0.5, whiten
  a2c         token        score function A log pi     seq_mean_token_sum        -             V 0.5
  ppo         token        clip 0.2 / 0.2              token_mean                -             V 0.5 clip 0.2,
                                                                                               H 0.01, whiten
  ppo_kl      token        none (r A)                  token_mean                old, adaptive V 0.5, H 0.01,
                                                                                 0.01 target   whiten
  trpo        token        none (r A)                  token_mean                (constraint)  whiten
  grpo        token        clip 0.2 / 0.2              seq_mean_token_mean       ref k3, 0.04  group mean/std
  dr_grpo     token        clip 0.2 / 0.2              seq_mean_token_sum_norm   -             group mean
  dapo        token        clip 0.2 / 0.28             token_mean                -             group mean/std
  gspo        sequence     clip 3e-4 / 4e-4            seq_mean_token_mean       -             group mean/std
  sapo        token        soft, tau 1.0 / 1.05        seq_mean_token_mean       -             group mean/std
  bnpo        token        clip 0.2 / 0.2              token_mean (local)        -             group mean/std
  cispo       token        sg(clip(r, -, 5)) log pi    token_mean                -             group mean/std
  gmpo        geo-mean, log-clip 0.4 / 0.4, no gate    seq_mean_token_mean       -             group mean/std
  rloo        token        none (r A)                  seq_mean_token_sum        -             leave-one-out
  gpg         token        score function A log pi     token_mean                -             alpha x mean
  dro         token        A log pi - 0.05 (log r)^2   token_mean                -             group mean
  dppo_tv     token        TV mask 0.15, sg(r) log pi  seq_mean_token_sum_norm   -             group mean
  dppo_kl     token        binary-KL mask 0.05         seq_mean_token_sum_norm   -             group mean
  clip_cov    token        clip 1.0 + covariance drop  token_mean                -             group mean/std
  kl_cov      token        r A - |log r| on top cov    token_mean                -             group mean/std
  luspo       sequence     clip 3e-4 / 4e-4            seq_mean_token_sum        -             group mean/std
  vespo       seq. product gamma weight 2,3 / 3,2      token_mean                -             group mean/std

Control batches are `[N]` samples, one "token" per row, so every aggregation is a mean over samples
there; with language models `seq_mean_token_sum` makes REINFORCE the score function of the whole
response's log-likelihood (003 eq. 87).

Sources: reinforce Williams (1992), 003 eq. 38-42; a2c Mnih et al. (2016), 003 eq. 45-47; ppo and ppo_kl
Schulman et al. (2017), eq. 7 and 8 (003 eq. 76-85), with the CleanRL/PureJaxRL coefficients; trpo
Schulman et al. (2015), eq. 14 (003 eq. 69); grpo Shao et al. (DeepSeekMath, 2024), 003 eq. 96-97;
dr_grpo Liu et al. (2025, arXiv 2503.20783), 003 eq. 98-100; dapo Yu et al. (2025, arXiv 2503.14476),
003 eq. 101-102, with the DAPO paper's beta = 0 (seeds errata); gspo Zheng et al. (2025, arXiv
2507.18071), 003 eq. 107-109; sapo 003 eq. 117-119; bnpo is TRL's `loss_type="bnpo"`: DAPO's token mean
normalised by the tokens of the batch the loss sees (call it per micro-batch without `normaliser=` to get
TRL's behaviour); cispo MiniMax (2025, arXiv 2506.13585) with TRL's recommended cap 5; gmpo Zhao et al.
(2025, arXiv 2507.20673); rloo Ahmadian et al. (2024); gpg Chu et al. (2025, arXiv 2504.02546), verl's
token-mean; dro Richemond et al. (2024, arXiv 2405.19107) and Kimi k1.5, with beta 0.1 (no library default);
dppo Qi et al. (2026, arXiv 2602.04879) with the authors' thresholds, aggregation and advantages (verl
`examples/dppo_trainer`: group mean without std, seq-mean-token-sum-norm, clip_ratio_c 1e4); clip_cov and
kl_cov Cui et al. (2025, arXiv 2505.22617) with the authors' script values; luspo (arXiv 2602.05261) is
TRL's `loss_type="luspo"`: GSPO's sequence term weighted by the response length, i.e. summed over tokens,
with GSPO's clip range (the paper's own range could not be checked); vespo (arXiv 2602.10693) is TRL's
`loss_type="vespo"` with its defaults.

Rollout-engine corrections (`parts.TruncatedIS`, `MaskedIS`, `OffPolicySequenceMask`) combine with any
preset: `make_loss("dapo", correction=losses.MaskedIS())` is DAPO with IcePop.

Adding a variant takes one part (in `parts.py`, or anywhere) and one preset, and touches nothing else;
every field of every part is then reachable from the experiments' command lines:

    losses.register_preset("my_variant", dataclasses.replace(losses.PRESETS["grpo"], gate=MyGate()))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from polygrad.losses import parts
from polygrad.losses.loss import LossConfig, policy_loss

PRESETS: dict[str, LossConfig] = {}


def register_preset(name: str, config: LossConfig, *, overwrite: bool = False) -> LossConfig:
    """Add a named preset to `PRESETS` (ValueError if the name is taken and `overwrite` is False)."""
    if not isinstance(config, LossConfig):
        raise ValueError(f"a preset must be a LossConfig, got {type(config).__name__}")
    if name in PRESETS and not overwrite:
        raise ValueError(f"preset {name!r} already exists; pass overwrite=True to replace it")
    PRESETS[name] = config
    return config


_GROUP = "group_normalized"

register_preset("reinforce", LossConfig(
    gate=parts.ScoreFunction(), aggregation="seq_mean_token_sum", value_coef=0.5, normalize_advantages=True))
register_preset("a2c", LossConfig(
    gate=parts.ScoreFunction(), aggregation="seq_mean_token_sum", value_coef=0.5))
register_preset("ppo", LossConfig(
    gate=parts.HardClip(0.2, 0.2), aggregation="token_mean", value_coef=0.5, value_clip=0.2,
    entropy_coef=0.01, normalize_advantages=True))
register_preset("ppo_kl", LossConfig(
    gate=parts.NoGate(), aggregation="token_mean", kl_old=parts.KLToOld(coef=1.0, target=0.01),
    value_coef=0.5, entropy_coef=0.01, normalize_advantages=True))
register_preset("trpo", LossConfig(gate=parts.NoGate(), aggregation="token_mean", normalize_advantages=True))
register_preset("grpo", LossConfig(
    gate=parts.HardClip(0.2, 0.2), aggregation="seq_mean_token_mean", kl_estimator="k3", kl_coef=0.04,
    advantage=_GROUP))
register_preset("dr_grpo", LossConfig(
    gate=parts.HardClip(0.2, 0.2), aggregation="seq_mean_token_sum_norm", advantage="group_centered"))
register_preset("dapo", LossConfig(
    gate=parts.HardClip(0.2, 0.28), aggregation="token_mean", advantage=_GROUP))
register_preset("gspo", LossConfig(
    ratio=parts.SequenceRatio(), gate=parts.HardClip(3e-4, 4e-4), aggregation="seq_mean_token_mean",
    advantage=_GROUP))
register_preset("sapo", LossConfig(
    gate=parts.SoftGate(tau_pos=1.0, tau_neg=1.05), aggregation="seq_mean_token_mean", advantage=_GROUP))
register_preset("bnpo", LossConfig(gate=parts.HardClip(0.2, 0.2), aggregation="token_mean", advantage=_GROUP))
register_preset("cispo", LossConfig(
    gate=parts.ClippedISWeight(eps_low=None, eps_high=4.0), aggregation="token_mean", advantage=_GROUP))
register_preset("gmpo", LossConfig(
    ratio=parts.GeometricMeanClippedRatio(0.4, 0.4), gate=parts.NoGate(), aggregation="seq_mean_token_mean",
    advantage=_GROUP))
register_preset("rloo", LossConfig(
    gate=parts.NoGate(), aggregation="seq_mean_token_sum", advantage="leave_one_out"))
register_preset("gpg", LossConfig(gate=parts.ScoreFunction(), aggregation="token_mean", advantage="gpg"))
register_preset("dro", LossConfig(
    gate=parts.DRO(beta=0.1), aggregation="token_mean", advantage="group_centered"))
register_preset("dppo_tv", LossConfig(
    gate=parts.DivergenceMask("tv", 0.15, cap=1e4), aggregation="seq_mean_token_sum_norm",
    advantage="group_centered"))
register_preset("dppo_kl", LossConfig(
    gate=parts.DivergenceMask("binary_kl", 0.05, cap=1e4), aggregation="seq_mean_token_sum_norm",
    advantage="group_centered"))
register_preset("clip_cov", LossConfig(
    gate=parts.CovarianceClip(1.0, 1.0, fraction=2e-4, cov_low=1.0, cov_high=5.0), aggregation="token_mean",
    advantage=_GROUP))
register_preset("kl_cov", LossConfig(
    gate=parts.CovarianceKL(fraction=2e-3, coef=1.0), aggregation="token_mean", advantage=_GROUP))
register_preset("luspo", LossConfig(
    ratio=parts.SequenceRatio(), gate=parts.HardClip(3e-4, 4e-4), aggregation="seq_mean_token_sum",
    advantage=_GROUP))
register_preset("vespo", LossConfig(
    ratio=parts.SequenceProductRatio(), gate=parts.GammaWeight(2.0, 3.0, 3.0, 2.0), aggregation="token_mean",
    advantage=_GROUP))


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

    Returns `loss_fn(logp_new [B,T] or [N], logp_old, advantages, mask=None, logp_ref=None, entropy=None,
    *, normaliser=None, values=None, values_old=None, returns=None, kl_old=None, kl_old_coef=None,
    group_size=None) -> (loss, metrics)`, `loss` a scalar to minimise (see `loss.policy_loss`). The config
    is available as `loss_fn.config` (for `batch_normaliser(loss_fn.config, mask)`).
    """
    config = resolve(preset, **overrides)

    def loss_fn(logp_new, logp_old, advantages, mask=None, logp_ref=None, entropy=None, **kwargs):
        return policy_loss(config, logp_new, logp_old, advantages, mask, logp_ref, entropy, **kwargs)

    loss_fn.config = config
    return loss_fn
