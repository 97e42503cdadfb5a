"""Tests of the GRPO-family losses: hand-computed presets, reference formulas (TRL / verl), gradient
identities of 003 eq. 110-112 and 121-122, on-policy equivalence, micro-batch exactness, masking and
degenerate inputs."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polygrad import grpo

ALL_PRESETS = sorted(grpo.PRESETS)


# --- helpers ------------------------------------------------------------------------------------


def random_batch(seed, batch=6, length=5, spread=0.3, empty_row=False):
    """Random logp_new/old/ref, per-sequence advantages, a ragged mask, entropy and critic arrays."""
    rng = np.random.default_rng(seed)
    logp_old = np.log(rng.uniform(0.05, 0.95, (batch, length))).astype(np.float32)
    logp_new = (logp_old + spread * rng.standard_normal((batch, length))).astype(np.float32)
    logp_ref = (logp_old + spread * rng.standard_normal((batch, length))).astype(np.float32)
    lengths = rng.integers(1, length + 1, batch)
    if empty_row:
        lengths[-1] = 0
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.float32)
    adv = rng.standard_normal(batch).astype(np.float32)
    entropy = rng.uniform(0.0, 2.0, (batch, length)).astype(np.float32)
    values = rng.standard_normal((batch, length)).astype(np.float32)
    values_old = (values + 0.3 * rng.standard_normal((batch, length))).astype(np.float32)
    returns = rng.standard_normal((batch, length)).astype(np.float32)
    return dict(
        logp_new=logp_new, logp_old=logp_old, logp_ref=logp_ref, adv=adv, mask=mask, entropy=entropy,
        values=values, values_old=values_old, returns=returns,
    )


def call(loss_fn, b, logp_new=None, **kw):
    """Call a made loss on a batch dict; the critic arrays are passed only to configs that use them."""
    config = loss_fn.config
    extra = {}
    if config.value_coef > 0:
        extra = dict(values=b["values"], values_old=b["values_old"], returns=b["returns"])
    adv = b["adv"] if config.advantage != "token" else jnp.broadcast_to(b["adv"][:, None], b["mask"].shape)
    return loss_fn(
        b["logp_new"] if logp_new is None else logp_new, b["logp_old"], adv, b["mask"],
        logp_ref=b["logp_ref"], entropy=b["entropy"], **extra, **kw,
    )


def grad_logp(loss_fn, b, **kw):
    return jax.grad(lambda x: call(loss_fn, b, logp_new=x, **kw)[0])(jnp.asarray(b["logp_new"]))


# --- hand-computed cases, one per preset --------------------------------------------------------
# Two responses, T = 2: response 0 has both tokens (A = +1, ratios 1.5 and 0.9), response 1 only its
# first token (A = -1, ratio 0.5). logp_old = 0 so logp_new = log r.

HAND_RATIO = np.array([[1.5, 0.9], [0.5, 1.0]], np.float32)
HAND_MASK = np.array([[1.0, 1.0], [1.0, 0.0]], np.float32)
HAND_ADV = np.array([1.0, -1.0], np.float32)
HAND_LOGP = np.log(HAND_RATIO)

HAND_EXPECTED = {
    # per-sequence token means: (1.2 + 0.9) / 2 = 1.05 and -max(0.5, 0.8) = -0.8; mean 0.125
    "grpo": -0.125,
    # token sums / T = 2: 2.1 / 2 and -0.8 / 2; mean over 2 responses 0.325
    "dr_grpo": -0.325,
    # token mean with eps_high 0.28: (1.28 + 0.9 - 0.8) / 3
    "dapo": -(1.28 + 0.9 - 0.8) / 3,
    "bnpo": -(1.2 + 0.9 - 0.8) / 3,
    # sequence ratios sqrt(1.35) -> clipped to 1.0004 (A > 0); 0.5 -> held at 0.9997 (A < 0)
    "gspo": -(1.0004 - 0.9997) / 2,
    # f(r) = (4 / tau) sigmoid(tau (r - 1)), tau 1.0 for A > 0 and 1.05 for A < 0
    "sapo": -(
        0.5 * (4 * (1 / (1 + math.exp(-0.5))) + 4 * (1 / (1 + math.exp(0.1))))
        - (4 / 1.05) / (1 + math.exp(1.05 * 0.5))
    )
    / 2,
    # -sg(min(r, 5)) A log pi, token mean
    "cispo": -(1.5 * math.log(1.5) + 0.9 * math.log(0.9) - 0.5 * math.log(0.5)) / 3,
    # log-space clip at 0.4: exp(mean(0.4, log 0.9)) for A > 0 and exp(-0.4) for A < 0
    "gmpo": -(math.exp((0.4 + math.log(0.9)) / 2) - math.exp(-0.4)) / 2,
}


@pytest.mark.parametrize("name", sorted(HAND_EXPECTED))
def test_hand_computed_presets(name, maybe_jit):
    loss_fn = grpo.make_loss(name, kl_coef=0.0)
    loss, metrics = maybe_jit(loss_fn)(HAND_LOGP, np.zeros_like(HAND_LOGP), HAND_ADV, HAND_MASK)
    np.testing.assert_allclose(loss, HAND_EXPECTED[name], rtol=1e-5, atol=1e-7)
    assert set(metrics) == set(grpo.METRIC_NAMES)


def test_hand_computed_grpo_with_k3_penalty_and_metrics():
    # log(ref / pi) = d; k3 = e^d - 1 - d; GRPO aggregates it like the policy term, beta = 0.04.
    d = np.array([[0.1, -0.2], [0.3, 0.0]], np.float32)
    k3 = np.exp(d) - 1 - d
    kl_term = 0.04 * ((k3[0, 0] + k3[0, 1]) / 2 + k3[1, 0]) / 2
    loss, metrics = grpo.make_loss("grpo")(
        HAND_LOGP, np.zeros_like(HAND_LOGP), HAND_ADV, HAND_MASK, logp_ref=HAND_LOGP + d
    )
    np.testing.assert_allclose(loss, -0.125 + kl_term, rtol=1e-5)
    # Token 0 of response 0 is clipped high, token 0 of response 1 clipped low, of 3 active tokens.
    np.testing.assert_allclose(metrics["clip_frac_high"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_frac_low"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["gate_mean"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["ratio_mean"], (1.5 + 0.9 + 0.5) / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["ratio_min"], 0.5, rtol=1e-6)
    np.testing.assert_allclose(metrics["ratio_max"], 1.5, rtol=1e-6)
    np.testing.assert_allclose(metrics["kl_ref"], (k3[0, 0] + k3[0, 1] + k3[1, 0]) / 3, rtol=1e-5)
    r = np.array([1.5, 0.9, 0.5])
    np.testing.assert_allclose(metrics["approx_kl_old"], np.mean(r - 1 - np.log(r)), rtol=1e-5)


def test_hand_computed_ppo_with_clipped_value_loss():
    token_adv = np.array([[1.0, 0.5], [-1.0, 0.0]], np.float32)
    values = np.array([[1.0, 2.0], [0.0, 9.0]], np.float32)
    values_old = np.array([[0.5, 2.0], [0.5, 9.0]], np.float32)
    returns = np.array([[0.0, 1.0], [1.0, 9.0]], np.float32)
    loss, metrics = grpo.make_loss("ppo", normalize_advantages=False, entropy_coef=0.0)(
        HAND_LOGP, np.zeros_like(HAND_LOGP), token_adv, HAND_MASK,
        values=values, values_old=values_old, returns=returns,
    )
    # policy: token mean of (1.2, 0.45, -0.8); value: 0.5 max(unclipped, clipped) = 0.5 on each token.
    policy = -(1.2 + 0.45 - 0.8) / 3
    np.testing.assert_allclose(loss, policy + 0.5 * 0.5, rtol=1e-5)
    np.testing.assert_allclose(metrics["value_loss"], 0.5, rtol=1e-6)
    np.testing.assert_allclose(metrics["value_clip_frac"], 0.0)


def test_dual_clip_holds_large_ratios_with_negative_advantage():
    gate = grpo.HardClip(0.2, 0.2, dual_clip=3.0)
    log_ratio = jnp.log(jnp.array([[4.0, 2.0, 4.0]]))
    adv = jnp.array([[-1.0, -1.0, 1.0]])
    out = gate(log_ratio, adv, log_ratio)
    np.testing.assert_allclose(out.objective, [[-3.0, -2.0, 1.2]], rtol=1e-6)
    np.testing.assert_array_equal(out.dual_clipped, [[True, False, False]])
    np.testing.assert_array_equal(out.gate, [[0.0, 1.0, 0.0]])


# --- reference formulas of TRL and verl on random inputs ----------------------------------------


def reference_loss(name, b):
    """Independent numpy transcriptions of TRL's `_compute_loss` and verl's `core_algos` losses."""
    lp, old, ref, m = (b[k].astype(np.float64) for k in ("logp_new", "logp_old", "logp_ref", "mask"))
    A = b["adv"].astype(np.float64)[:, None]
    coef_1 = np.exp(lp - old)
    m_local = m

    def token_mean(mat):
        return (mat * m_local).sum() / m_local.sum()

    def trl(eps_low, eps_high, beta, loss_type, level="token"):
        if level == "sequence":
            lengths = np.maximum(m.sum(-1, keepdims=True), 1)
            coef_1_ = np.exp(((lp - old) * m).sum(-1, keepdims=True) / lengths)
        else:
            coef_1_ = coef_1
        coef_2 = np.clip(coef_1_, 1 - eps_low, 1 + eps_high)
        per_token = -np.minimum(coef_1_ * A, coef_2 * A)
        if beta:
            per_token = per_token + beta * (np.exp(ref - lp) - (ref - lp) - 1)
        if loss_type == "grpo":
            return ((per_token * m).sum(-1) / np.maximum(m.sum(-1), 1)).mean()
        if loss_type in ("dapo", "bnpo"):
            return (per_token * m).sum() / np.maximum(m.sum(), 1)
        if loss_type == "dr_grpo":
            return (per_token * m).sum() / (per_token.shape[0] * per_token.shape[1])
        raise AssertionError(loss_type)

    def seq_mean_token_mean(mat):
        return ((mat * m).sum(-1) / m.sum(-1)).mean()

    if name == "grpo":
        return trl(0.2, 0.2, 0.04, "grpo")
    if name == "dr_grpo":
        return trl(0.2, 0.2, 0.0, "dr_grpo")
    if name == "dapo":
        return trl(0.2, 0.28, 0.0, "dapo")
    if name == "bnpo":
        return trl(0.2, 0.2, 0.0, "bnpo")
    if name == "gspo":
        return trl(3e-4, 4e-4, 0.0, "grpo", level="sequence")
    if name == "sapo":  # verl compute_policy_loss_sapo
        tau = np.where(A > 0, 1.0, 1.05)
        return seq_mean_token_mean(-(4.0 / tau) / (1 + np.exp(-tau * (coef_1 - 1))) * A)
    if name == "cispo":  # verl compute_policy_loss_cispo, token-mean
        return (-np.clip(coef_1, 0.0, 5.0) * A * lp * m).sum() / m.sum()
    if name == "gmpo":  # verl compute_policy_loss_geo_mean
        x = lp - old
        sgn = np.sign(A)
        x_min = sgn * np.minimum(sgn * x, sgn * np.clip(x, -0.4, 0.4))
        ratio = np.exp((x_min * m).sum(-1) / m.sum(-1))
        return np.mean(-A[:, 0] * ratio)
    # Control presets (PureJaxRL / CleanRL): advantages whitened over the batch with the population std
    # and eps 1e-8, value loss 0.5 (v - R)^2 (clipped for PPO), entropy bonus, KL(old || new) as k3.
    active = m > 0
    token_adv = np.broadcast_to(A, m.shape)
    mu = token_adv[active].mean()
    white = (token_adv - mu) / (np.sqrt(((token_adv[active] - mu) ** 2).mean()) + 1e-8)
    v, v_old, ret = (b[k].astype(np.float64) for k in ("values", "values_old", "returns"))
    H = b["entropy"].astype(np.float64)

    def seq_mean_token_sum(mat):
        return (mat * m).sum(-1).mean()

    if name == "ppo":  # verl vanilla (token-mean, no dual clip) + 0.5 * verl compute_value_loss
        per_token = -np.minimum(coef_1 * white, np.clip(coef_1, 0.8, 1.2) * white)
        v_clip = np.clip(v, v_old - 0.2, v_old + 0.2)
        vf = 0.5 * np.maximum((v - ret) ** 2, (v_clip - ret) ** 2)
        return token_mean(per_token + 0.5 * vf - 0.01 * H)
    if name == "ppo_kl":  # PPO paper eq. 8 with the k3 estimate of KL(old || new), beta = 1
        k3_old = coef_1 - 1 - np.log(coef_1)
        return token_mean(-coef_1 * white + 1.0 * k3_old + 0.5 * 0.5 * (v - ret) ** 2 - 0.01 * H)
    if name == "trpo":  # the surrogate of TRPO eq. 14
        return token_mean(-coef_1 * white)
    if name == "reinforce":
        return seq_mean_token_sum(-white * lp + 0.5 * 0.5 * (v - ret) ** 2)
    if name == "a2c":
        return seq_mean_token_sum(-token_adv * lp + 0.5 * 0.5 * (v - ret) ** 2)
    if name == "rloo":  # unclipped r A, summed over each response, mean over responses
        return seq_mean_token_sum(-coef_1 * A)
    if name == "gpg":  # verl compute_policy_loss_gpg, token-mean
        return token_mean(-lp * A)
    if name == "dro":  # verl compute_policy_loss_dro with dro_beta = 0.1
        return token_mean(-(lp * A - 0.5 * 0.1 * (lp - old) ** 2))
    if name in ("dppo_tv", "dppo_kl"):  # verl compute_policy_loss_dppo_*, clip 0.15 / 0.05, cap 1e4
        prob, old_prob = np.exp(lp), np.exp(old)
        if name == "dppo_tv":
            valid = np.where(A > 0, prob - old_prob <= 0.15, prob - old_prob >= -0.15)
        else:
            with np.errstate(invalid="ignore"):  # log-probs above 0 in the random batch: NaN, never valid
                tail = np.log((1 - old_prob + 1e-8) / (1 - prob + 1e-8))
                kl = old_prob * (old - lp) + (1 - old_prob) * tail
            valid = np.where(A > 0, (kl <= 0.05) | (prob <= old_prob), (kl <= 0.05) | (prob >= old_prob))
        per_token = -A * np.minimum(coef_1, 1e4) * lp * valid
        return ((per_token * m).sum(-1) / m.shape[1]).mean()  # seq-mean-token-sum-norm, T = padded length
    if name in ("clip_cov", "kl_cov"):  # verl compute_policy_loss_clip_cov / kl_cov
        active = m > 0
        adv_t = np.broadcast_to(A, m.shape)
        cov = (adv_t - adv_t[active].mean()) * (lp - lp[active].mean())
        if name == "kl_cov":  # top max(1, int(n * 2e-3)) = 1 covariance token gets + |log r|
            top = np.unravel_index(np.argmax(np.where(active, cov, -np.inf)), m.shape)
            per_token = -adv_t * coef_1
            per_token[top] += np.abs(lp - old)[top]
            return token_mean(per_token)
        l1, l2 = -adv_t * coef_1, -adv_t * np.clip(coef_1, 0.0, 2.0)  # clip ratio 1 / 1
        candidates = active & ~(l2 > l1) & (cov > 1.0) & (cov < 5.0)
        corr = np.ones_like(cov)
        if candidates.any():  # verl draws max(int(2e-4 n), 1) = 1 of them at random; without a key,
            corr[np.unravel_index(np.argmax(np.where(candidates, cov, -np.inf)), m.shape)] = 0  # the largest
        return token_mean(np.maximum(l1, l2) * corr)
    if name == "luspo":  # TRL loss_type="luspo", importance_sampling_level="sequence", GSPO's clip
        lengths = m.sum(-1, keepdims=True)
        s_ratio = np.exp(((lp - old) * m).sum(-1, keepdims=True) / lengths)
        per_seq = -np.minimum(s_ratio * A, np.clip(s_ratio, 1 - 3e-4, 1 + 4e-4) * A)
        return (per_seq * lengths).mean()
    if name == "vespo":  # TRL get_gamma_weights + loss_type="vespo" (dapo normaliser)
        log_w = np.clip((np.clip(lp - old, -20, 20) * m).sum(-1, keepdims=True), np.log(1e-8), 20.0)
        k = np.where(A >= 0, 2.0, 3.0)
        lam = np.where(A >= 0, 3.0, 2.0)
        phi = np.exp(lam + k * log_w - lam * np.exp(log_w))
        return token_mean(-phi * A * lp)
    raise AssertionError(name)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", ALL_PRESETS)
def test_presets_match_trl_and_verl_formulas(name, seed):
    b = random_batch(seed, spread=0.3)  # no empty rows: TRL divides sequence means by all B rows
    loss, _ = call(grpo.make_loss(name), b)
    np.testing.assert_allclose(loss, reference_loss(name, b), rtol=2e-5, atol=1e-6)


@dataclasses.dataclass(frozen=True)
class TwoSidedClip:
    """A new gate in a few lines: INTELLECT-2's two-sided clip (TRL's `delta`: r held at delta if A < 0)."""

    eps: float = 0.2
    delta: float = 4.0

    def __call__(self, log_ratio, advantages, logp_new):
        out = grpo.HardClip(self.eps, self.eps)(log_ratio, advantages, logp_new)
        capped = (advantages < 0) & (jnp.exp(log_ratio) > self.delta)
        objective = jnp.where(capped, self.delta * advantages, out.objective)
        return out._replace(objective=objective, gate=jnp.where(capped, 0.0, out.gate), dual_clipped=capped)


def test_a_new_gate_plugs_into_a_preset():
    grpo.register_preset("test_two_sided", dataclasses.replace(grpo.PRESETS["dapo"], gate=TwoSidedClip()))
    try:
        b = random_batch(14, spread=2.0)
        loss, metrics = call(grpo.make_loss("test_two_sided"), b)
    finally:
        del grpo.PRESETS["test_two_sided"]
    m, A = b["mask"], b["adv"][:, None]
    coef_1 = np.exp(b["logp_new"].astype(np.float64) - b["logp_old"])
    coef_2 = np.clip(coef_1, 0.8, 1.2)
    per_token = -np.minimum(np.minimum(coef_1, 4.0) * A, coef_2 * A)  # TRL with args.delta = 4
    np.testing.assert_allclose(loss, (per_token * m).sum() / m.sum(), rtol=1e-5)
    assert float(metrics["dual_clip_frac"]) > 0


def test_vmap_over_independent_batches():
    batches = [random_batch(seed) for seed in (15, 16)]
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    loss_fn = grpo.make_loss("grpo")
    losses, metrics = jax.jit(jax.vmap(lambda b: call(loss_fn, b)))(stacked)
    for i, b in enumerate(batches):
        np.testing.assert_allclose(losses[i], call(loss_fn, b)[0], rtol=1e-6)
    assert metrics["clip_frac_high"].shape == (2,)


def test_k3_value_k2_gradient_matches_verl_straight_through():
    logp = jnp.array([-1.0, -0.5, -2.0])
    logp_ref = jnp.array([-1.2, -0.1, -2.0])
    value = grpo.kl_k3_value_k2_gradient(logp, logp_ref)
    d = logp_ref - logp
    np.testing.assert_allclose(value, np.exp(d) - 1 - d, rtol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(grpo.kl_k3_value_k2_gradient(x, logp_ref)))(logp)
    np.testing.assert_allclose(grad, logp - logp_ref, rtol=1e-6)  # d/dlogp of (logp - logp_ref)^2 / 2


# --- gradients ----------------------------------------------------------------------------------


# GSPO's clip range (3e-4 on a mean of log-ratios) is far narrower than any float32 finite-difference
# step, so GSPO's sequence ratio is checked under a 0.2 clip ("gspo_wide").
@pytest.mark.parametrize("name", [n for n in ALL_PRESETS if n != "gspo"] + ["gspo_wide"])
def test_gradients_match_finite_differences(name):
    if name == "gspo_wide":
        loss_fn = grpo.make_loss("gspo", gate=grpo.HardClip(0.2, 0.2))
    else:
        loss_fn = grpo.make_loss(name, entropy_coef=0.01)
    b = random_batch(3, spread=0.05)
    b["logp_ref"] = b["logp_new"] + 0.1  # a nonzero KL with a non-trivial gradient
    grad = np.asarray(grad_logp(loss_fn, b))
    # CISPO, DPPO and VESPO stop the gradient of their IS weights: hold the weights fixed by moving logp_old
    # along (DPPO's mask moves a little with it, but stays away from its thresholds at this spread).
    move_old = name in ("cispo", "dppo_tv", "dppo_kl", "vespo")
    value = jax.jit(lambda new, old: call(loss_fn, dict(b, logp_old=old), logp_new=new)[0])
    eps = 1e-2
    numeric = np.zeros_like(b["logp_new"])
    for idx in np.ndindex(b["logp_new"].shape):
        step = np.zeros_like(b["logp_new"])
        step[idx] = eps
        old_step = step if move_old else 0.0
        up = value(b["logp_new"] + step, b["logp_old"] + old_step)
        down = value(b["logp_new"] - step, b["logp_old"] - old_step)
        numeric[idx] = (float(up) - float(down)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=3e-3, rtol=2e-2)
    assert np.all(grad[b["mask"] == 0] == 0)


def test_sequence_ratio_weights_every_token_of_a_response_equally():
    """003 eq. 110-111: dJ/dlog pi_{i,t} = s_i A_i / (N |y_i|), the same for every token of response i."""
    b = random_batch(4, spread=0.2)
    loss_fn = grpo.make_loss("gspo", gate=grpo.NoGate())
    grad = -np.asarray(grad_logp(loss_fn, b))
    lengths = b["mask"].sum(-1)
    s = np.exp(((b["logp_new"] - b["logp_old"]) * b["mask"]).sum(-1) / lengths)
    expected = (s * b["adv"] / (len(lengths) * lengths))[:, None] * b["mask"]
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)


def test_token_ratio_weights_tokens_by_their_ratio():
    """003 eq. 112: dJ/dlog pi_{i,t} = A_i r_{i,t} / (N |y_i|) for unclipped GRPO."""
    b = random_batch(5, spread=0.2)
    loss_fn = grpo.make_loss("grpo", gate=grpo.NoGate(), kl_coef=0.0)
    grad = -np.asarray(grad_logp(loss_fn, b))
    lengths = b["mask"].sum(-1, keepdims=True)
    r = np.exp(b["logp_new"] - b["logp_old"])
    expected = b["adv"][:, None] * r / (len(lengths) * lengths) * b["mask"]
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)


def test_sapo_gate_is_one_on_policy_and_in_unit_interval():
    """003 eq. 120 (with the errata) and 121: g = sech^2(tau (r - 1) / 2), g(1) = 1, 0 < g <= 1."""
    ratios = jnp.array([1e-3, 0.5, 0.9, 1.0, 1.1, 2.0, 50.0])
    for adv in (1.0, -1.0):
        out = grpo.SoftGate(1.0, 1.05)(jnp.log(ratios), jnp.full_like(ratios, adv), ratios)
        tau = 1.0 if adv > 0 else 1.05
        np.testing.assert_allclose(out.gate, 1 / np.cosh(tau * (np.asarray(ratios) - 1) / 2) ** 2, rtol=1e-5)
        assert float(out.gate[3]) == 1.0
        assert np.all((np.asarray(out.gate) > 0) & (np.asarray(out.gate) <= 1))


def test_sapo_gradient_is_gate_times_ratio_times_advantage():
    """003 eq. 122: dJ/dlog pi_{i,t} = g_{i,t} r_{i,t} A_i / (N |y_i|)."""
    b = random_batch(6, spread=0.5)
    grad = -np.asarray(grad_logp(grpo.make_loss("sapo"), b))
    r = np.exp(b["logp_new"] - b["logp_old"])
    tau = np.where(b["adv"] > 0, 1.0, 1.05)[:, None]
    gate = 1 / np.cosh(tau * (r - 1) / 2) ** 2
    lengths = b["mask"].sum(-1, keepdims=True)
    expected = gate * r * b["adv"][:, None] / (len(lengths) * lengths) * b["mask"]
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_on_policy_gradient_is_the_plain_policy_gradient(name):
    """At r = 1 every preset's gradient is that of -sum_t w_t A log pi / N with its own aggregation."""
    b = random_batch(7)
    b["logp_old"] = b["logp_new"].copy()
    loss_fn = grpo.make_loss(name, kl_coef=0.0)
    config = loss_fn.config
    weights = np.asarray(config.aggregation.token_weights(jnp.asarray(b["mask"])))
    adv = np.broadcast_to(b["adv"][:, None], b["mask"].shape).astype(np.float64)
    if config.normalize_advantages:  # whitened over the active tokens of the batch
        active = b["mask"] > 0
        adv = (adv - adv[active].mean()) / (adv[active].std() + 1e-8)
    expected = -weights * adv / float(config.aggregation.normaliser(jnp.asarray(b["mask"])))
    np.testing.assert_allclose(grad_logp(loss_fn, b), expected, rtol=1e-5, atol=1e-7)


# --- aggregation: micro-batches, equal lengths, masking -----------------------------------------


@pytest.mark.parametrize("aggregation", sorted(grpo.AGGREGATIONS))
@pytest.mark.parametrize("preset", ["grpo", "gspo", "ppo"])
def test_micro_batch_accumulation_is_exact(aggregation, preset):
    b = random_batch(8, spread=0.3, empty_row=True)
    # Advantage whitening uses the statistics of the batch the loss sees, so it is the one documented
    # exception to micro-batch exactness: whiten the full batch's advantages beforehand instead.
    loss_fn = grpo.make_loss(preset, aggregation=aggregation, entropy_coef=0.01, normalize_advantages=False)
    full_loss, _ = call(loss_fn, b)
    full_grad = grad_logp(loss_fn, b)
    normaliser = grpo.batch_normaliser(loss_fn.config, b["mask"])
    total, grads, numerators, micro_normalisers = 0.0, [], 0.0, 0.0

    def micro(part, normaliser):
        def loss(x):
            return call(loss_fn, part, logp_new=x, normaliser=normaliser)[0]

        return jax.value_and_grad(loss)(jnp.asarray(part["logp_new"]))

    for rows in (slice(0, 2), slice(2, 4), slice(4, 6)):
        part = {k: v[rows] for k, v in b.items()}
        loss, grad = micro(part, normaliser)
        total, grads = total + loss, grads + [grad]
        extra = {}
        if loss_fn.config.value_coef > 0:
            extra = dict(values=part["values"], values_old=part["values_old"], returns=part["returns"])
        numerator, own, _ = grpo.loss_terms(
            loss_fn.config, part["logp_new"], part["logp_old"], part["adv"], part["mask"], part["logp_ref"],
            part["entropy"], **extra,
        )
        numerators, micro_normalisers = numerators + numerator, micro_normalisers + own
    np.testing.assert_allclose(total, full_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.concatenate(grads), full_grad, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(numerators / normaliser, full_loss, rtol=1e-5, atol=1e-7)
    if aggregation != "token_sum":  # count normalisers add up over micro-batches
        np.testing.assert_allclose(micro_normalisers, normaliser)


def test_equal_lengths_grpo_dapo_dr_grpo_differ_by_constant_factors():
    b = random_batch(9, spread=0.3)
    b["mask"][:] = 0.0
    b["mask"][:, :3] = 1.0  # every response has 3 tokens, padded to T = 5
    losses, grads = {}, {}
    for aggregation in ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"):
        loss_fn = grpo.make_loss("grpo", kl_coef=0.0, aggregation=aggregation)
        losses[aggregation], grads[aggregation] = call(loss_fn, b)[0], grad_logp(loss_fn, b)
    np.testing.assert_allclose(losses["seq_mean_token_mean"], losses["token_mean"], rtol=1e-5)
    np.testing.assert_allclose(losses["seq_mean_token_sum_norm"], 3 / 5 * losses["token_mean"], rtol=1e-5)
    np.testing.assert_allclose(grads["seq_mean_token_mean"], grads["token_mean"], rtol=1e-5)
    np.testing.assert_allclose(grads["seq_mean_token_sum_norm"], 3 / 5 * grads["token_mean"], rtol=1e-5)


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_masked_tokens_never_change_loss_or_gradient(name):
    b = random_batch(10, spread=0.3)
    loss_fn = grpo.make_loss(name, entropy_coef=0.01, kl_coef=0.05)
    clean_loss, clean_metrics = call(loss_fn, b)
    clean_grad = grad_logp(loss_fn, b)
    dirty = {k: v.copy() for k, v in b.items()}
    masked = b["mask"] == 0
    garbage = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30])
    for key in ("logp_new", "logp_old", "logp_ref", "entropy", "values", "values_old", "returns"):
        dirty[key][masked] = np.resize(garbage, masked.sum())
    loss, metrics = call(loss_fn, dirty)
    np.testing.assert_allclose(loss, clean_loss, rtol=1e-6)
    np.testing.assert_allclose(grad_logp(loss_fn, dirty), clean_grad, rtol=1e-6)
    for key in grpo.METRIC_NAMES:
        np.testing.assert_allclose(metrics[key], clean_metrics[key], rtol=1e-6, err_msg=key)
    # An extra all-masked response changes nothing either.
    padded = {k: np.concatenate([v, v[:1]]) for k, v in b.items()}
    padded["mask"][-1] = 0.0
    np.testing.assert_allclose(call(loss_fn, padded)[0], clean_loss, rtol=1e-6)


# --- degenerate inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_all_masked_batch_and_all_equal_groups_are_finite(name):
    b = random_batch(11)
    loss_fn = grpo.make_loss(name)
    empty = dict(b, mask=np.zeros_like(b["mask"]))
    loss, metrics = call(loss_fn, empty)
    assert float(loss) == 0.0
    assert all(np.isfinite(v) for v in metrics.values())
    assert np.all(np.asarray(grad_logp(loss_fn, empty)) == 0)
    rewards = jnp.ones((3, 2))
    if loss_fn.config.advantage != "token":
        flat = dict(b, adv=np.asarray(grpo.group_advantages(loss_fn.config, rewards)))
        loss, metrics = call(loss_fn, flat, group_size=2)
        assert np.isfinite(loss)
        np.testing.assert_allclose(metrics["zero_adv_frac"], 1.0)


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(ALL_PRESETS),
    log_gap=st.floats(-1e4, 1e4, allow_nan=False),
    adv=st.floats(-1e3, 1e3, allow_nan=False),
    seed=st.integers(0, 1000),
)
def test_extreme_ratios_give_finite_loss_and_gradient(name, log_gap, adv, seed):
    b = random_batch(seed)
    b["logp_new"] = (b["logp_old"] + log_gap).astype(np.float32)
    b["adv"] = np.array([adv, -adv, 0.0, adv, -adv, 0.0], np.float32)
    loss_fn = grpo.make_loss(name, kl_coef=0.04)
    loss, metrics = call(loss_fn, b)
    assert np.isfinite(loss)
    assert all(np.isfinite(v) for v in metrics.values())
    assert np.all(np.isfinite(grad_logp(loss_fn, b)))


def test_zero_advantage_fraction_counts_groups():
    b = random_batch(12)
    b["adv"] = np.array([0.0, 0.0, 1.0, -1.0, 0.5, 0.0], np.float32)
    _, per_response = call(grpo.make_loss("dapo"), b)
    _, per_group = call(grpo.make_loss("dapo"), b, group_size=2)
    np.testing.assert_allclose(per_response["zero_adv_frac"], 0.5)
    np.testing.assert_allclose(per_group["zero_adv_frac"], 1 / 3)
    b["adv"] = np.array([0.0, 1.0, 0.0, -1.0, 0.5, 0.0], np.float32)
    np.testing.assert_allclose(call(grpo.make_loss("dapo"), b, group_size=2)[1]["zero_adv_frac"], 0.0)


# --- configuration ------------------------------------------------------------------------------


# Every preset with ALL its defaults (clip ranges, KL coefficient and estimator, entropy and value
# coefficients, value clip, whitening, KL-to-old coefficient) on the hand batch above plus a reference,
# per-token entropies and a critic. Each default changes the number: a changed constant fails here.
HAND_D = np.array([[0.1, -0.2], [0.3, 0.0]])  # log(ref / pi)
HAND_K3 = np.exp(HAND_D) - 1 - HAND_D
HAND_H = np.array([[1.0, 0.5], [2.0, 0.0]])
HAND_V = np.array([[1.0, 2.0], [0.0, 9.0]])
HAND_V_OLD = np.array([[0.5, 2.0], [0.5, 9.0]])
HAND_RET = np.array([[2.0, 1.0], [1.0, 9.0]])
# 0.5 (v - R)^2 = 0.5 on the three active tokens; clipped at 0.2 around v_old, token (0, 0) is held at
# 0.7, 0.5 (0.7 - 2)^2 = 0.845 > 0.5 wins.
VF = np.array([0.5, 0.5, 0.5])
VF_CLIPPED = np.array([0.845, 0.5, 0.5])
# Per-token advantages (+1, +1, -1) whitened over the 3 active tokens: mean 1/3, std 2 sqrt(2) / 3.
W = np.array([1 / math.sqrt(2), 1 / math.sqrt(2), -math.sqrt(2)])
R = np.array([1.5, 0.9, 0.5])
H = np.array([1.0, 0.5, 2.0])
K3 = HAND_K3[HAND_MASK > 0]


def seq_sums(per_token):
    """Per-response token sums of the 3 active tokens (response 0: tokens 0 and 1; response 1: token 2)."""
    return np.array([per_token[0] + per_token[1], per_token[2]])


DEFAULTS_EXPECTED = {
    "reinforce": np.mean(seq_sums(-W * np.log(R) + 0.5 * VF)),  # seq_mean_token_sum, V 0.5, whiten
    "a2c": np.mean(seq_sums(-np.array([1, 1, -1]) * np.log(R) + 0.5 * VF)),
    "ppo": np.mean(-np.array([1.2, 0.9, 0.8]) * W + 0.5 * VF_CLIPPED - 0.01 * H),  # clip 0.2, token mean
    "ppo_kl": np.mean(-R * W + 1.0 * (R - 1 - np.log(R)) + 0.5 * VF - 0.01 * H),
    "trpo": np.mean(-R * W),
    "grpo": -0.125 + 0.04 * ((K3[0] + K3[1]) / 2 + K3[2]) / 2,  # k3, beta 0.04, seq_mean_token_mean
    "rloo": np.mean(seq_sums(-R * np.array([1, 1, -1]))),
    # A log pi with logp_old = 0, so log pi = log r; token mean
    "gpg": -np.mean(np.array([1, 1, -1]) * np.log(R)),
    "dro": -np.mean(np.array([1, 1, -1]) * np.log(R) - 0.05 * np.log(R) ** 2),
    # q = pi_old = 1: p - q = (0.5, -0.1, -0.5); tokens 0 (A > 0, +0.5 > 0.15) and 2 (A < 0, -0.5 < -0.15)
    # are dropped (binary KL: 0.105 > 0.05 for token 1, which is kept since p <= q); sums / T = 2, mean
    # over 2 responses
    "dppo_tv": -(0.9 * math.log(0.9) / 2) / 2,
    "dppo_kl": -(0.9 * math.log(0.9) / 2) / 2,
    # clip range [0, 2] clips nothing; no covariance in (1, 5): r A token mean
    "clip_cov": -(1.5 + 0.9 - 0.5) / 3,
    # covariances (0.358, 0.017, 0.749): token 2 gets - |log 0.5|
    "kl_cov": -(1.5 + 0.9 - 0.5 - math.log(2)) / 3,
    # GSPO's terms -1.0004 (2 tokens) and +0.9997 (1 token), summed over tokens, mean over responses
    "luspo": (-2 * 1.0004 + 0.9997) / 2,
    # w = 1.35 (A >= 0: k 2, lambda 3) and 0.5 (A < 0: k 3, lambda 2); objective phi A log pi
    "vespo": -(math.exp(3 + 2 * math.log(1.35) - 3 * 1.35) * (math.log(1.5) + math.log(0.9))
               - math.exp(2 + 3 * math.log(0.5) - 2 * 0.5) * math.log(0.5)) / 3,
    **{name: HAND_EXPECTED[name] for name in ("dr_grpo", "dapo", "bnpo", "gspo", "sapo", "cispo", "gmpo")},
}


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_every_preset_with_its_defaults_on_a_hand_batch(name):
    loss_fn = grpo.make_loss(name)
    per_token = loss_fn.config.advantage == "token"
    adv = np.broadcast_to(HAND_ADV[:, None], HAND_MASK.shape) if per_token else HAND_ADV
    loss, _ = loss_fn(
        HAND_LOGP, np.zeros_like(HAND_LOGP), adv, HAND_MASK, logp_ref=HAND_LOGP + HAND_D, entropy=HAND_H,
        values=HAND_V, values_old=HAND_V_OLD, returns=HAND_RET,
    )
    np.testing.assert_allclose(loss, DEFAULTS_EXPECTED[name], rtol=1e-5, atol=1e-7)


def test_cispo_default_cap_is_five():
    # One token, r = 6 > 5, A = 1: -5 log 6 (the cap binds; the clipped surrogates never see r = 6 here).
    loss, metrics = grpo.make_loss("cispo")(jnp.log(jnp.array([[6.0]])), jnp.zeros((1, 1)), jnp.ones(1))
    np.testing.assert_allclose(loss, -5 * math.log(6), rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_frac_high"], 1.0)


def test_make_loss_overrides_and_registry():
    loss_fn = grpo.make_loss("dapo", gate=grpo.HardClip(0.1, 0.5), kl_coef=0.01)
    assert loss_fn.config.gate.eps_high == 0.5 and loss_fn.config.kl_coef == 0.01
    assert grpo.PRESETS["dapo"].kl_coef == 0.0  # presets are not mutated
    sapo_on_sequences = dataclasses.replace(grpo.PRESETS["sapo"], ratio=grpo.SequenceRatio())
    config = grpo.register_preset("test_sapo_gspo", sapo_on_sequences)
    try:
        assert grpo.make_loss("test_sapo_gspo").config == config
        with pytest.raises(ValueError, match="already exists"):
            grpo.register_preset("test_sapo_gspo", config)
    finally:
        del grpo.PRESETS["test_sapo_gspo"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: grpo.make_loss("nope"), "unknown preset"),
        (lambda: grpo.make_loss("grpo", eps=0.1), "unknown LossConfig fields"),
        (lambda: grpo.make_loss("grpo", aggregation="mean"), "aggregation must be one of"),
        (lambda: grpo.make_loss("grpo", kl_estimator="k4"), "kl_estimator must be one of"),
        (lambda: grpo.HardClip(1.5), "eps_low"),
        (lambda: grpo.DivergenceMask("hellinger"), "divergence"),
        (lambda: grpo.TruncatedIS(cap_max=None), "at least one bound"),
        (lambda: grpo.MaskedIS(low=2.0, high=1.0), "lower bound must be < upper"),
        (lambda: grpo.OffPolicySequenceMask(float("nan")), "delta"),
        (lambda: grpo.make_loss("grpo", kl_is_correction="sequence"), "kl_is_correction"),
        (lambda: grpo.HardClip(0.2, 0.2, dual_clip=1.1), "dual_clip"),
        (lambda: grpo.SoftGate(0.0, 1.0), "tau_pos"),
        (lambda: grpo.SoftGate(1.0, float("nan")), "tau_neg"),
        (lambda: grpo.HardClip(float("inf")), "eps_low"),
        (lambda: grpo.make_loss("grpo", kl_coef=float("nan")), "kl_coef"),
        (lambda: grpo.SeqMeanTokenSumNorm(0.0), "constant"),
        (lambda: grpo.make_loss("grpo", kl_coef=-1.0), "kl_coef"),
    ],
)
def test_bad_configs_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_missing_inputs_raise():
    b = random_batch(13)
    with pytest.raises(ValueError, match="logp_ref"):
        grpo.make_loss("grpo")(b["logp_new"], b["logp_old"], b["adv"], b["mask"])
    with pytest.raises(ValueError, match="values"):
        grpo.make_loss("ppo")(b["logp_new"], b["logp_old"], b["adv"], b["mask"], entropy=b["entropy"])
    with pytest.raises(ValueError, match="entropy"):
        grpo.make_loss("ppo")(b["logp_new"], b["logp_old"], b["adv"], b["mask"])
    with pytest.raises(ValueError, match="per-token advantages"):
        grpo.group_advantages(grpo.PRESETS["ppo"], jnp.ones((2, 2)))
