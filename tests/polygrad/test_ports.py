"""`from_trl` and `from_verl` against numpy transcriptions of TRL's `GRPOTrainer._compute_loss` (with its
advantages) and verl's `core_algos.py` policy losses, KL losses, aggregation and advantage estimators.

Values are compared in float64; gradients against central finite differences of the transcription, in
which every torch `.detach()` reads a frozen copy of the log-probs, so stop-gradients are reproduced
exactly (CISPO's weight, VESPO's phi, DPPO's mask and IS weight, GSPO's verl form, the "+" KL losses)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polygrad import grpo, losses, validate

P, G, T = 2, 4, 6


def batch(seed, spread=0.3, mismatch=0.3):
    """float64 inputs with probabilities below 1, no empty response."""
    rng = np.random.default_rng(seed)
    b = P * G
    old = np.log(rng.uniform(0.05, 0.9, (b, T)))
    new = np.minimum(old + spread * rng.standard_normal((b, T)), -1e-3)
    sampler = np.minimum(old + mismatch * rng.standard_normal((b, T)), -1e-3)
    ref = np.minimum(old + spread * rng.standard_normal((b, T)), -1e-3)
    mask = (np.arange(T)[None] < rng.integers(1, T + 1, (b, 1))).astype(np.float64)
    rewards = rng.integers(0, 3, (P, G)).astype(np.float64)
    entropy = rng.uniform(0.0, 2.0, (b, T))
    return dict(new=new, old=old, sampler=sampler, ref=ref, mask=mask, rewards=rewards, entropy=entropy)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def fd_gradient(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[idx] = eps
        g[idx] = (f(x + step) - f(x - step)) / (2 * eps)
    return g


def polygrad_value_and_grad(port, b, adv, **kw):
    """policy_loss of the port (float64), value and gradient in log pi."""
    with jax.enable_x64(True):
        def f(x):
            return losses.policy_loss(port.loss, x, b["old"], jnp.asarray(adv), b["mask"], logp_ref=b["ref"],
                                      entropy=b["entropy"], **kw)[0]

        value, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(b["new"]))
        return float(value), np.asarray(grad)


def check(port, b, adv, reference, sampler=True, rtol=1e-9):
    """polygrad's loss and gradient equal the transcription's value and finite-difference gradient."""
    kw = {"logp_sampler": b["sampler"]} if sampler else {}
    value, grad = polygrad_value_and_grad(port, b, adv, **kw)
    frozen = b["new"].copy()
    want = reference(b["new"], frozen)
    np.testing.assert_allclose(value, want, rtol=rtol, atol=1e-12)
    numeric = fd_gradient(lambda x: reference(x, frozen), b["new"])
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)
    assert np.all(grad[b["mask"] == 0] == 0)


# --- TRL --------------------------------------------------------------------------------------------


def trl_advantages(rewards, scale="group"):
    """TRL `_generate_and_score_completions`, sum_then_normalize, one reward function."""
    mean = rewards.mean(1, keepdims=True)
    std = rewards.std(1, ddof=1, keepdims=True) if scale in ("group", "none") else rewards.std(ddof=1)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return advantages.reshape(-1)


def trl_loss(args, b, adv):
    """TRL `_compute_loss` (single process, no gradient accumulation) as a function of (log pi, frozen)."""
    a = {**losses.ports.TRL_DEFAULTS, **args}
    eps_low = a["epsilon"]
    eps_high = a["epsilon_high"] if a["epsilon_high"] is not None else eps_low
    old, ref, m, s = b["old"], b["ref"], b["mask"], b["sampler"]
    A = adv[:, None]
    is_ratio = None
    if a["use_vllm"] and a["vllm_importance_sampling_correction"]:
        diff = (old - s) * m
        if a["vllm_importance_sampling_mode"].startswith("sequence"):
            diff = diff.sum(-1, keepdims=True)
        is_ratio = np.exp(diff)
        lo, hi = a["vllm_importance_sampling_clip_min"], a["vllm_importance_sampling_clip_max"]
        if a["vllm_importance_sampling_cap"] is not None:  # GRPOConfig.__post_init__: the deprecated alias
            hi = a["vllm_importance_sampling_cap"]
        if a["vllm_importance_sampling_mode"].endswith("truncate"):
            is_ratio = np.clip(is_ratio, lo, hi)
        else:
            low, high = (-math.inf if lo is None else lo), (math.inf if hi is None else hi)
            bad = (is_ratio < low) | (is_ratio > high)
            is_ratio = np.where(bad, 0.0, is_ratio)

    def loss(lp, lpd):
        if a["off_policy_mask_threshold"] is not None:
            sampling = s if a["use_vllm"] else old
            seq_kl = ((sampling - lpd) * m).sum(1, keepdims=True) / np.maximum(m.sum(1, keepdims=True), 1.0)
            opsm = ((A >= 0) | (seq_kl <= a["off_policy_mask_threshold"])).astype(float)
        log_ratio = lp - old
        if a["importance_sampling_level"] == "token":
            liw, liw_d = log_ratio, lpd - old
        else:
            liw = ((log_ratio * m).sum(-1) / np.maximum(m.sum(-1), 1.0))[:, None]
            liw_d = (((lpd - old) * m).sum(-1) / np.maximum(m.sum(-1), 1.0))[:, None]
        coef_1 = np.exp(liw)
        if a["beta"] != 0.0:
            kl = np.exp(ref - lp) - (ref - lp) - 1
            if a["use_bias_correction_kl"]:
                kl = kl * coef_1
        t = a["loss_type"]
        if t == "cispo":
            per_token = -np.minimum(np.exp(liw_d), eps_high) * A * lp
        elif t in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            coef_2 = np.clip(coef_1, 1 - eps_low, 1 + eps_high)
            c1 = coef_1 if a["delta"] is None else np.minimum(coef_1, a["delta"])
            per_token = -np.minimum(c1 * A, coef_2 * A)
        elif t == "sapo":
            temp = np.where(A > 0, a["sapo_temperature_pos"], a["sapo_temperature_neg"])
            per_token = -sigmoid(temp * (coef_1 - 1)) * 4 / temp * A
        else:  # vespo, get_gamma_weights on the frozen log-probs
            seq = (np.clip(lpd - old, -20, 20) * m).sum(-1, keepdims=True)
            if is_ratio is not None:
                with np.errstate(divide="ignore"):
                    seq = seq + np.clip(np.log(is_ratio), math.log(1e-8), 20.0).sum(-1, keepdims=True)
            log_w = np.clip(seq, math.log(1e-8), 20.0)
            k = np.where(A >= 0, a["vespo_k_pos"], a["vespo_k_neg"])
            lam = np.maximum(np.where(A >= 0, a["vespo_lambda_pos"], a["vespo_lambda_neg"]), 1e-4)
            per_token = -np.exp(lam + k * log_w - lam * np.exp(log_w)) * A * lp
        if a["off_policy_mask_threshold"] is not None:
            per_token = per_token * opsm
        if is_ratio is not None and t != "vespo":
            per_token = per_token * is_ratio
        if a["beta"] != 0.0:
            per_token = per_token + a["beta"] * kl
        per_token = np.broadcast_to(per_token, m.shape)
        if t in ("grpo", "sapo"):
            out = ((per_token * m).sum(-1) / np.maximum(m.sum(-1), 1.0)).mean()
        elif t in ("bnpo", "cispo", "dapo", "vespo"):
            out = (per_token * m).sum() / max(m.sum(), 1.0)
        elif t == "dr_grpo":
            out = (per_token * m).sum() / (per_token.shape[0] * a["max_completion_length"])
        else:  # luspo
            out = (per_token[:, :1] * m.sum(1, keepdims=True)).mean()
        if a["entropy_coef"]:
            out = out - a["entropy_coef"] * (b["entropy"] * m).sum() / m.sum()
        return out

    return loss


TRL_CASES = {
    "defaults_dapo": {},
    "grpo_beta": dict(loss_type="grpo", beta=0.04),
    "grpo_beta_no_bias_correction": dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=False),
    "gspo_beta": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4,
                      beta=0.04),
    "dr_grpo": dict(loss_type="dr_grpo", max_completion_length=8, scale_rewards="none"),
    "bnpo_batch_scale": dict(loss_type="bnpo", scale_rewards="batch", epsilon_high=0.28),
    "cispo_default_cap": dict(loss_type="cispo"),
    "cispo_cap5": dict(loss_type="cispo", epsilon_high=5.0),
    "sapo": dict(loss_type="sapo", beta=0.01, sapo_temperature_neg=2.0),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence", epsilon=0.1),
    "vespo": dict(loss_type="vespo", beta=0.02),
    "vespo_tis": dict(loss_type="vespo", use_vllm=True, vllm_importance_sampling_mode="token_truncate"),
    "dapo_delta": dict(epsilon_high=0.28, delta=1.5),
    "dapo_entropy": dict(entropy_coef=0.01),
    "vllm_token_truncate": dict(use_vllm=True, vllm_importance_sampling_mode="token_truncate",
                                vllm_importance_sampling_clip_min=0.5),
    "vllm_token_mask": dict(loss_type="grpo", use_vllm=True, vllm_importance_sampling_mode="token_mask",
                            vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=2.0),
    "vllm_sequence_truncate": dict(use_vllm=True, vllm_importance_sampling_mode="sequence_truncate"),
    "vllm_sequence_mask_default": dict(use_vllm=True, vllm_importance_sampling_cap=1.5),
    "opsm": dict(loss_type="grpo", off_policy_mask_threshold=0.02),
    "opsm_vllm": dict(off_policy_mask_threshold=0.02, use_vllm=True,
                      vllm_importance_sampling_mode="token_truncate"),
}


@pytest.mark.parametrize("case", sorted(TRL_CASES))
def test_from_trl_matches_trl(case):
    args = TRL_CASES[case]
    b = batch(0, mismatch=0.4)
    port = grpo.from_trl(**args)
    scale = {**losses.ports.TRL_DEFAULTS, **args}["scale_rewards"]
    adv = np.asarray(port.advantage.compute(jnp.asarray(b["rewards"], jnp.float32)), np.float64)
    np.testing.assert_allclose(adv, trl_advantages(b["rewards"], scale), rtol=1e-5, atol=1e-6)
    adv = trl_advantages(b["rewards"], scale)
    if case.startswith("opsm"):  # make some negative-advantage responses drift
        adv = np.where(np.arange(P * G) % 3 == 0, -np.abs(adv) - 0.5, adv)
    check(port, b, adv, trl_loss(args, b, adv), sampler="use_vllm" in args)


def test_from_trl_gdpo_advantages():
    rng = np.random.default_rng(1)
    rewards = rng.integers(0, 3, (3, 4, 2)).astype(np.float64)
    port = grpo.from_trl(multi_objective_aggregation="normalize_then_sum", reward_weights=[1.0, 0.3])
    grouped = rewards  # TRL: per reward, group mean / std (ddof 1) + 1e-4, weighted sum, batch standardise
    reward_k = (grouped - grouped.mean(1, keepdims=True)) / (grouped.std(1, ddof=1, keepdims=True) + 1e-4)
    summed = (reward_k * np.array([1.0, 0.3])).sum(-1).reshape(-1)
    expected = (summed - summed.mean()) / (summed.std(ddof=1) + 1e-4)
    np.testing.assert_allclose(port.advantage.compute(jnp.asarray(rewards, jnp.float32)), expected, rtol=1e-4,
                               atol=1e-5)
    # sum_then_normalize with weights: the weighted sum, then the group statistics
    port = grpo.from_trl(reward_weights=[1.0, 0.3])
    summed = (rewards * np.array([1.0, 0.3])).sum(-1)
    got = port.advantage.compute(jnp.asarray(rewards, jnp.float32))
    np.testing.assert_allclose(got, trl_advantages(summed), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss_typ="grpo"), "loss_typ"),
        (dict(learning_rate=1e-6, num_generations=8), "learning_rate"),
        (dict(loss_type="ppo"), "loss_type"),
        (dict(top_entropy_quantile=0.2), "top_entropy_quantile"),
        (dict(loss_type="grpo", entropy_coef=0.01), "entropy_coef"),
        (dict(delta=1.1), "delta"),
        (dict(loss_type="luspo"), "luspo"),
        (dict(loss_type="vespo", use_vllm=True), "vespo"),
        (dict(use_liger_kernel=True), "use_liger_kernel"),
        (dict(epsilon=float("nan")), "epsilon"),
    ],
)
def test_from_trl_refuses_unknown_and_unreproducible_settings(kwargs, message):
    with pytest.raises(validate.ConfigError, match=message):
        grpo.from_trl(**kwargs)


def test_from_trl_defaults_are_trl_1_10():
    port = grpo.from_trl()
    settings = dict(port.settings)
    assert settings["loss_type"] == "dapo" and settings["beta"] == 0.0 and settings["epsilon"] == 0.2
    assert settings["use_bias_correction_kl"] is True and settings["max_completion_length"] == 512
    assert port.loss.gate == grpo.HardClip(0.2, 0.2) and port.loss.correction == ()
    assert dict(port.advantage.options) == {"eps": 1e-4, "ddof": 1}
    assert grpo.from_trl(use_vllm=True).loss.correction == (grpo.MaskedIS("sequence", None, 3.0),)


# --- verl -------------------------------------------------------------------------------------------


def verl_agg(mat, m, mode, scale=None):
    """verl `agg_loss` without global batch info."""
    if mode == "token-mean":
        return (mat * m).sum() / m.sum()
    if mode == "token-sum":
        return (mat * m).sum()
    seq_mask = (m.sum(-1) > 0).astype(float)
    if mode == "seq-mean-token-mean":
        seq = (mat * m).sum(-1) / (m.sum(-1) + 1e-8)
        return (seq * seq_mask).sum() / seq_mask.sum()
    seq = (mat * m).sum(-1)
    out = (seq * seq_mask).sum() / seq_mask.sum()
    if mode == "seq-mean-token-sum-norm":
        out = out / (m.shape[-1] if scale is None else scale)
    return out


def verl_kl(lp, lpd, ref, kind):
    """verl `kl_penalty` with its "+" straight-through form (frozen copy for .detach())."""
    def forward(x, k):
        if k in ("kl", "k1"):
            return x - ref
        if k == "abs":
            return np.abs(x - ref)
        if k in ("mse", "k2"):
            return 0.5 * (x - ref) ** 2
        d = np.clip(ref - x, -20, 20)
        return np.clip(np.exp(d) - d - 1, -10, 10)

    if not kind.endswith("+") or kind in ("mse+", "k2+"):
        return forward(lp, kind.rstrip("+"))
    return 0.5 * (lp - ref) ** 2 - 0.5 * (lpd - ref) ** 2 + forward(lpd, kind[:-1])


def verl_loss(config, b, adv):
    """verl `ppo_loss` (workers/utils/losses.py) with the policy losses of core_algos.py."""
    actor = {**losses.ports.VERL_ACTOR_DEFAULTS, **config.get("actor", {})}
    pl = {**losses.ports.VERL_POLICY_LOSS_DEFAULTS, **config.get("actor", {}).get("policy_loss", {})}
    rc = {**losses.ports.VERL_ROLLOUT_CORRECTION_DEFAULTS,
          **config.get("algorithm", {}).get("rollout_correction", {})}
    old, ref, m = b["old"], b["ref"], b["mask"]
    A = np.broadcast_to(adv[:, None], m.shape)
    lo, hi, c = actor["clip_ratio_low"], actor["clip_ratio_high"], actor["clip_ratio_c"]
    mode, agg = pl["loss_mode"], actor["loss_agg_mode"]
    weights = None
    if rc["rollout_is"] is not None:  # rollout_corr_helper.compute_rollout_correction_weights
        d = old - b["sampler"]
        if rc["rollout_is"] == "sequence":
            d = np.broadcast_to((d * m).sum(-1, keepdims=True), m.shape)
        raw = np.exp(np.clip(d, -20, 20)) * m
        thr = rc["rollout_is_threshold"]
        if isinstance(thr, str):
            low, high = (float(x) for x in thr.split("_"))
            weights = np.where((raw >= low) & (raw <= high), raw, 0.0)
        else:
            weights = np.minimum(raw, thr)

    def loss(lp, lpd):
        active = m > 0
        if mode == "vanilla":
            r = np.exp(np.clip(lp - old, -20, 20))
            l1, l2 = -A * r, -A * np.clip(r, 1 - lo, 1 + hi)
            c1 = np.maximum(l1, l2)
            pg = np.where(A < 0, np.minimum(-A * c, c1), c1)
            mode_agg = agg
        elif mode == "gspo":
            seq = ((lpd - old) * m).sum(-1, keepdims=True) / np.maximum(m.sum(-1, keepdims=True), 1)
            s = np.exp(np.minimum(lp - lpd + seq, 10.0))
            pg = np.maximum(-A * s, -A * np.clip(s, 1 - lo, 1 + hi))
            mode_agg = "seq-mean-token-mean"
        elif mode == "sapo":
            r = np.exp(np.clip(lp - old, -20, 20))
            tau = np.where(A > 0, actor["tau_pos"], actor["tau_neg"])
            pg = -sigmoid(tau * (r - 1.0)) * (4.0 / tau) * A
            mode_agg = "seq-mean-token-mean"
        elif mode == "gpg":
            pg, mode_agg = -lp * A, agg
        elif mode in ("clip_cov", "kl_cov"):
            r = np.exp(lp - old)
            cov = (A - A[active].mean()) * (lpd - lpd[active].mean())
            if mode == "clip_cov":
                l1, l2 = -A * r, -A * np.clip(r, 1 - lo, 1 + hi)
                cand = active & ~(l2 > l1) & (cov > pl["clip_cov_lb"]) & (cov < pl["clip_cov_ub"])
                corr = np.ones_like(cov)
                count = max(int(pl["clip_cov_ratio"] * m.sum()), 1)
                order = np.argsort(-np.where(cand, cov, -np.inf), axis=None)[:count]  # verl: at random
                for i in order:
                    if cand.reshape(-1)[i]:
                        corr.reshape(-1)[i] = 0.0
                pg = np.maximum(l1, l2) * corr
            else:
                count = max(1, int(active.sum() * pl["kl_cov_ratio"]))
                top = np.argsort(-np.where(active, cov, -np.inf), axis=None)[:count]
                pg = -A * r
                pg.reshape(-1)[top] += pl["ppo_kl_coef"] * np.abs(lp - old).reshape(-1)[top]
            mode_agg = agg
        elif mode == "geo_mean":
            x = lp - old
            sgn = np.sign(A)
            x_min = sgn * np.minimum(sgn * x, sgn * np.clip(x, -lo, hi))
            ratio = np.exp((x_min * m).sum(-1) / (m.sum(-1) + 1e-8))
            adv_seq = (A * m).sum(-1) / (m.sum(-1) + 1e-8)
            return np.mean(-adv_seq * ratio) + kl_and_entropy(lp, lpd)
        elif mode == "cispo":
            cr = np.clip(np.exp(np.clip(lpd - old, -20, 20)), 1 - lo, 1 + hi)
            pg, mode_agg = -cr * A * lp, agg
        elif mode == "dro":
            pg, mode_agg = -(lp * A - 0.5 * pl["dro_beta"] * (lp - old) ** 2), agg
        else:  # dppo_tv, dppo_kl
            tr = np.minimum(np.exp(np.clip(lpd - old, -20, 20)), c)
            prob, old_prob = np.exp(lpd), np.exp(old)
            if mode == "dppo_tv":
                vp, vn = prob - old_prob <= hi, prob - old_prob >= -lo
            else:
                tail = np.log((1 - old_prob + 1e-8) / (1 - prob + 1e-8))
                bkl = old_prob * (old - lpd) + (1 - old_prob) * tail
                vp, vn = (bkl <= hi) | (prob <= old_prob), (bkl <= lo) | (prob >= old_prob)
            pg, mode_agg = -A * tr * lp * np.where(A > 0, vp, vn), agg
        if weights is not None:
            pg = pg * weights
        return verl_agg(pg, m, mode_agg, actor["loss_scale_factor"]) + kl_and_entropy(lp, lpd)

    def kl_and_entropy(lp, lpd):
        out = -actor["entropy_coeff"] * verl_agg(b["entropy"], m, agg, actor["loss_scale_factor"])
        if actor["use_kl_loss"]:
            kld = verl_kl(lp, lpd, ref, actor["kl_loss_type"])
            out = out + actor["kl_loss_coef"] * verl_agg(kld, m, agg, actor["loss_scale_factor"])
        return out

    return loss


VERL_CASES = {
    "defaults_vanilla": {},
    "vanilla_clip_higher_kl_entropy": {"actor": dict(
        clip_ratio_high=0.28, loss_agg_mode="seq-mean-token-mean", use_kl_loss=True, kl_loss_coef=0.01,
        entropy_coeff=0.01)},
    "vanilla_token_sum_k1": {"actor": dict(loss_agg_mode="token-sum", use_kl_loss=True, kl_loss_type="kl")},
    "vanilla_seq_sum_abs": {"actor": dict(loss_agg_mode="seq-mean-token-sum", use_kl_loss=True,
                                          kl_loss_type="abs", clip_ratio_c=10.0)},
    "vanilla_norm_mse": {"actor": dict(loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=9,
                                       use_kl_loss=True, kl_loss_type="mse")},
    "vanilla_low_var_kl_plus": {"actor": dict(use_kl_loss=True, kl_loss_type="low_var_kl+",
                                              kl_loss_coef=0.1)},
    "vanilla_k1_plus": {"actor": dict(use_kl_loss=True, kl_loss_type="k1+", kl_loss_coef=0.1)},
    "gspo": {"actor": dict(policy_loss={"loss_mode": "gspo"}, clip_ratio_low=3e-3, clip_ratio_high=4e-3)},
    "sapo": {"actor": dict(policy_loss={"loss_mode": "sapo"}, tau_neg=2.0)},
    "gpg": {"actor": dict(policy_loss={"loss_mode": "gpg"})},
    "clip_cov": {"actor": dict(policy_loss={"loss_mode": "clip_cov", "clip_cov_ratio": 0.05,
                                            "clip_cov_lb": 0.02, "clip_cov_ub": 5.0})},
    "kl_cov": {"actor": dict(policy_loss={"loss_mode": "kl_cov", "kl_cov_ratio": 0.1})},
    "geo_mean": {"actor": dict(policy_loss={"loss_mode": "geo_mean"}, clip_ratio_low=0.4,
                               clip_ratio_high=0.4)},
    "cispo": {"actor": dict(policy_loss={"loss_mode": "cispo"})},
    "dro": {"actor": dict(policy_loss={"loss_mode": "dro", "dro_beta": 0.05})},
    "dppo_tv": {"actor": dict(policy_loss={"loss_mode": "dppo_tv"}, clip_ratio_low=0.15, clip_ratio_high=0.15,
                              loss_agg_mode="seq-mean-token-sum-norm")},
    "dppo_kl": {"actor": dict(policy_loss={"loss_mode": "dppo_kl"}, clip_ratio_low=0.05,
                              clip_ratio_high=0.05)},
    "token_tis": {"algorithm": {"rollout_correction": {"rollout_is": "token", "rollout_is_threshold": 2.0}}},
    "sequence_icepop": {"algorithm": {"rollout_correction": {"rollout_is": "sequence",
                                                             "rollout_is_threshold": "0.5_5.0"}}},
}


@pytest.mark.parametrize("case", sorted(VERL_CASES))
def test_from_verl_matches_verl(case):
    config = VERL_CASES[case]
    b = batch(1, mismatch=0.15)
    port = grpo.from_verl(config)
    adv = np.random.default_rng(2).standard_normal(P * G)
    # verl divides per-response sums by (token count + 1e-8): relative differences of order 1e-8 / length,
    # amplified where a loss is a small difference of such terms
    check(port, b, adv, verl_loss(config, b, adv), rtol=1e-6)


def test_from_verl_accepts_dotted_and_actor_rollout_ref_keys():
    nested = grpo.from_verl({"actor": {"policy_loss": {"loss_mode": "cispo"}, "clip_ratio_high": 4.0}})
    dotted = grpo.from_verl({"actor_rollout_ref.actor.policy_loss.loss_mode": "cispo",
                             "actor_rollout_ref.actor.clip_ratio_high": 4.0})
    assert nested.loss == dotted.loss
    # verl's clip_ratio_low / high default to 0.2 themselves: clip_ratio alone changes nothing
    assert grpo.from_verl({"actor": {"clip_ratio": 0.3}}).loss.gate == grpo.HardClip(0.2, 0.2, dual_clip=3.0)


def verl_group_scores(rewards, eps=1e-6, norm=True):
    mean = rewards.mean(1, keepdims=True)
    std = rewards.std(1, ddof=1, keepdims=True)
    return ((rewards - mean) / (std + eps) if norm else rewards - mean).reshape(-1)


def test_from_verl_advantages_match_verl():
    b = batch(3)
    r, m = b["rewards"], b["mask"]
    f32 = {k: jnp.asarray(v, jnp.float32) for k, v in b.items()}

    def adv(algorithm, **kw):
        port = grpo.from_verl({"algorithm": algorithm})
        return np.asarray(port.advantage.compute(f32["rewards"], **kw))

    np.testing.assert_allclose(adv({"adv_estimator": "grpo"}), verl_group_scores(r), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adv({"adv_estimator": "grpo", "norm_adv_by_std_in_grpo": False}),
                               verl_group_scores(r, norm=False), rtol=1e-5, atol=1e-6)
    rloo = (r * G / (G - 1) - r.mean(1, keepdims=True) * G / (G - 1)).reshape(-1)
    np.testing.assert_allclose(adv({"adv_estimator": "rloo"}), rloo, atol=1e-5)
    alpha = r.size / max(np.count_nonzero(r), 1)
    gpg = alpha * (r - r.mean(1, keepdims=True)).reshape(-1)
    np.testing.assert_allclose(adv({"adv_estimator": "gpg"}), gpg, rtol=1e-5, atol=1e-6)
    # REINFORCE++ with the k1 KL in the reward (kl_ctrl.kl_coef 0.05, gamma 0.9)
    algorithm = {"adv_estimator": "reinforce_plus_plus", "use_kl_in_reward": True, "gamma": 0.9,
                 "kl_ctrl": {"kl_coef": 0.05}}
    scores = np.zeros_like(m)
    last = m.sum(-1).astype(int) - 1
    scores[np.arange(len(last)), last] = r.reshape(-1)
    token_rewards = scores - 0.05 * (b["old"] - b["ref"]) * m  # apply_kl_penalty, kl_penalty="kl"
    returns, running = np.zeros_like(m), np.zeros(len(m))
    for t in reversed(range(T)):
        running = token_rewards[:, t] + 0.9 * running
        returns[:, t] = running
        running = running * m[:, t]
    mean = (returns * m).sum() / m.sum()
    var = (((returns - mean) ** 2) * m).sum() / (m.sum() - 1)
    expected = (returns - mean) / np.sqrt(var + 1e-8) * m
    got = adv(algorithm, mask=f32["mask"], logp=f32["old"], logp_ref=f32["ref"])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # REINFORCE++-baseline
    centered = (r - r.mean(1, keepdims=True)).reshape(-1, 1) * m
    mean = (centered * m).sum() / m.sum()
    var = (((centered - mean) ** 2) * m).sum() / (m.sum() - 1)
    got = adv({"adv_estimator": "reinforce_plus_plus_baseline"}, mask=f32["mask"])
    np.testing.assert_allclose(got, (centered - mean) / np.sqrt(var + 1e-8) * m, rtol=1e-4, atol=1e-5)
    # GRPO with the KL in the reward: the token rewards are summed into the score
    got = adv({"adv_estimator": "grpo", "use_kl_in_reward": True}, mask=f32["mask"], logp=f32["old"],
              logp_ref=f32["ref"])
    shaped = r - 0.001 * ((b["old"] - b["ref"]) * m).sum(-1).reshape(P, G)
    np.testing.assert_allclose(got, verl_group_scores(shaped), rtol=1e-4, atol=1e-5)
    assert grpo.from_verl({}).advantage is None  # gae: a critic's advantages


@pytest.mark.parametrize(
    "config, message",
    [
        ({"actor": {"clip_ratio_lo": 0.1}}, "clip_ratio_lo"),
        ({"critic": {"cliprange_value": 0.5}}, "critic"),
        ({"actor": {"policy_loss": {"loss_mode": "bypass_mode"}}}, "loss_mode"),
        ({"actor": {"policy_loss": {"loss_mode": "dro"}}}, "dro_beta"),
        ({"actor": {"kl_loss_type": "full"}}, "kl_loss_type"),
        ({"actor": {"loss_agg_mode": "token_mean"}}, "loss_agg_mode"),
        ({"algorithm": {"adv_estimator": "opo"}}, "adv_estimator"),
        ({"algorithm": {"use_kl_in_reward": True, "kl_ctrl": {"type": "adaptive"}}}, "adaptive"),
        ({"algorithm": {"rollout_correction": {"rollout_rs": "token_k1"}}}, "rollout_rs"),
        ({"actor": {"clip_ratio_c": 1.1}}, "clip_ratio_c"),
    ],
)
def test_from_verl_refuses_unknown_and_unreproducible_settings(config, message):
    with pytest.raises(validate.ConfigError, match=message):
        grpo.from_verl(config)
