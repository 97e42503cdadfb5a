"""Tests of the parts added for the GRPO family as practitioners use it now (issue 12): rollout-engine
corrections (TIS, MIS / IcePop, OPSM) and their metrics, the KL estimators and their placement (checked
against the exact gradient of the KL on small categoricals), DRO, DPPO, Clip-Cov, KL-Cov, VESPO, LUSPO,
and the new advantage estimators (batch std, GPG, GDPO, REINFORCE++, REINFORCE++-baseline).

Each part: a numpy transcription of the library formula it follows, a hand-computed case, a finite-difference
gradient, micro-batch exactness, degenerate inputs, and the dtype of its outputs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polygrad import grpo, losses
from polygrad.estimators import advantages as adv_lib
from polygrad.estimators import distributions


def batch(seed, rows=6, length=5, spread=0.3, mismatch=0.3, empty_row=False):
    """logp_new / old / sampler / ref `[rows, length]` (probabilities below 1), per-response advantages, a
    ragged mask."""
    rng = np.random.default_rng(seed)
    logp_old = np.log(rng.uniform(0.05, 0.9, (rows, length)))
    logp_new = np.minimum(logp_old + spread * rng.standard_normal((rows, length)), -1e-3)
    logp_sampler = np.minimum(logp_old + mismatch * rng.standard_normal((rows, length)), -1e-3)
    logp_ref = np.minimum(logp_old + spread * rng.standard_normal((rows, length)), -1e-3)
    lengths = rng.integers(1, length + 1, rows)
    if empty_row:
        lengths[-1] = 0
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.float32)
    adv = rng.standard_normal(rows)
    f32 = np.float32
    return dict(logp_new=logp_new.astype(f32), logp_old=logp_old.astype(f32),
                logp_sampler=logp_sampler.astype(f32), logp_ref=logp_ref.astype(f32), mask=mask,
                adv=adv.astype(f32))


def run(loss_fn, b, logp_new=None, **kw):
    return loss_fn(b["logp_new"] if logp_new is None else logp_new, b["logp_old"], b["adv"], b["mask"],
                   logp_ref=b["logp_ref"], logp_sampler=b["logp_sampler"], **kw)


def grad_new(loss_fn, b, **kw):
    return jax.grad(lambda x: run(loss_fn, b, logp_new=x, **kw)[0])(jnp.asarray(b["logp_new"]))


KEYS = ("logp_new", "logp_old", "mask", "adv", "logp_sampler")


def token_mean(mat, m):
    return (mat * m).sum() / m.sum()


# --- rollout-engine corrections ---------------------------------------------------------------------


def trl_is_ratio(old, sampler, m, mode, c_min, c_max):
    """TRL `_generate_and_score_completions`: vllm_importance_sampling_ratio for each mode."""
    diff = (old - sampler) * m
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdims=True)
    ratio = np.exp(diff)
    if mode.endswith("truncate"):
        return np.clip(ratio, c_min, c_max)
    low = -np.inf if c_min is None else c_min
    high = np.inf if c_max is None else c_max
    return np.where((ratio < low) | (ratio > high), 0.0, ratio)


def trl_opsm(adv, logp_new, sampler, m, delta):
    """TRL `get_off_policy_mask`, `(B, 1)`."""
    seq_kl = ((sampler - logp_new) * m).sum(1, keepdims=True) / np.maximum(m.sum(1, keepdims=True), 1.0)
    return ((adv[:, None] >= 0) | (seq_kl <= delta)).astype(float)


CORRECTION_CASES = {
    "token_truncate": (grpo.TruncatedIS("token", cap_max=3.0, cap_min=0.5), ("token_truncate", 0.5, 3.0)),
    "sequence_truncate": (grpo.TruncatedIS("sequence", cap_max=3.0), ("sequence_truncate", None, 3.0)),
    "token_mask": (grpo.MaskedIS("token", low=0.5, high=5.0), ("token_mask", 0.5, 5.0)),
    "sequence_mask": (grpo.MaskedIS("sequence", low=None, high=3.0), ("sequence_mask", None, 3.0)),
}


@pytest.mark.parametrize("case", sorted(CORRECTION_CASES))
def test_corrections_match_trl_dapo_with_vllm_is(case):
    part, (mode, c_min, c_max) = CORRECTION_CASES[case]
    b = batch(0, mismatch=0.6)
    loss, metrics = run(grpo.make_loss("dapo", correction=part), b)
    lp, old, m, A = (b[k].astype(np.float64) for k in ("logp_new", "logp_old", "mask", "adv"))
    coef_1 = np.exp(lp - old)
    per_token = -np.minimum(coef_1 * A[:, None], np.clip(coef_1, 0.8, 1.28) * A[:, None])
    ratio = trl_is_ratio(old, b["logp_sampler"].astype(np.float64), m, mode, c_min, c_max)
    np.testing.assert_allclose(loss, token_mean(per_token * ratio, m), rtol=2e-5)
    # the mismatch metrics: k1 and k3 estimates of KL(pi_sampler || pi_old) on the sampler's tokens
    d = old - b["logp_sampler"]
    np.testing.assert_allclose(metrics["mismatch_kl"], token_mean(-d, m), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["mismatch_k3"], token_mean(np.exp(d) - 1 - d, m), rtol=1e-5)
    rho = np.exp(d) if mode.startswith("token") else np.exp((d * m).sum(-1, keepdims=True)) + 0 * m
    outside = (rho > c_max) | (rho < (c_min or 0.0))
    np.testing.assert_allclose(metrics["mismatch_outside_frac"], token_mean(outside, m), rtol=1e-6)
    assert 0 < float(metrics["mismatch_outside_frac"]) < 1


def test_opsm_matches_trl_and_combines_with_is():
    b = batch(1, spread=0.5, mismatch=0.8)
    b["adv"][:3] = -np.abs(b["adv"][:3])
    part = grpo.OffPolicySequenceMask(delta=0.1)
    loss_fn = grpo.make_loss("grpo", kl_coef=0.0, correction=(part, grpo.TruncatedIS("token", cap_max=2.0)))
    loss, metrics = run(loss_fn, b)
    lp, old, m, A, s = (b[k].astype(np.float64) for k in KEYS)
    coef_1 = np.exp(lp - old)
    per_token = -np.minimum(coef_1 * A[:, None], np.clip(coef_1, 0.8, 1.2) * A[:, None])
    opsm = trl_opsm(A, lp, s, m, 0.1)
    assert 0 < opsm.sum() < len(A)  # some responses dropped, some kept
    per_token = per_token * opsm * trl_is_ratio(old, s, m, "token_truncate", None, 2.0)
    expected = ((per_token * m).sum(-1) / m.sum(-1)).mean()  # TRL loss_type="grpo"
    np.testing.assert_allclose(loss, expected, rtol=2e-5)
    assert float(metrics["correction_weight_mean"]) < 1


def test_corrections_by_hand():
    # One response of 3 tokens, log(pi_old / pi_sampler) = (log 3, log 0.3, 0).
    old = jnp.log(jnp.array([[0.6, 0.3, 0.5]]))
    sampler = old - jnp.log(jnp.array([[3.0, 0.3, 1.0]]))
    mask, adv, new = jnp.ones((1, 3)), jnp.ones((1, 3)), old

    def weight(part):
        return np.asarray(part(new, old, sampler, mask, adv).weight)[0]

    np.testing.assert_allclose(weight(grpo.TruncatedIS("token", cap_max=2.0)), [2.0, 0.3, 1.0], rtol=1e-6)
    np.testing.assert_allclose(weight(grpo.TruncatedIS("token", 2.0, 0.5)), [2.0, 0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(weight(grpo.TruncatedIS("sequence", cap_max=2.0)), [0.9] * 3, rtol=1e-6)
    np.testing.assert_allclose(weight(grpo.MaskedIS("token")), [3.0, 0.0, 1.0], rtol=1e-6)  # IcePop [0.5, 5]
    np.testing.assert_allclose(weight(grpo.MaskedIS("token", reweight=False)), [1.0, 0.0, 1.0])
    np.testing.assert_allclose(weight(grpo.MaskedIS("sequence", low=0.95, high=2.0)), [0.0] * 3)
    # OPSM: mean log(pi_sampler / pi_theta) = -(log 3 + log 0.3) / 3 = 0.0351; dropped only with A < 0
    # and delta below it.
    def opsm(delta, a, s=sampler):
        return np.asarray(grpo.OffPolicySequenceMask(delta)(new, old, s, mask, a).weight)

    assert np.all(opsm(0.01, adv) == 1) and np.all(opsm(0.05, -adv) == 1) and np.all(opsm(0.01, -adv) == 0)
    sampler2 = old + 0.2  # the sampler gave every token 0.2 more log-probability: mean KL 0.2
    assert np.all(opsm(0.1, -adv, sampler2) == 0) and np.all(opsm(0.1, adv, sampler2) == 1)


@pytest.mark.parametrize("case", sorted(CORRECTION_CASES))
def test_corrections_scale_the_gradient_and_match_finite_differences(case):
    part = CORRECTION_CASES[case][0]
    b = batch(2, spread=0.05, mismatch=0.6)
    loss_fn = grpo.make_loss("dapo", correction=part)
    grad = np.asarray(grad_new(loss_fn, b))
    value = jax.jit(lambda x: run(loss_fn, b, logp_new=x)[0])
    eps, numeric = 1e-2, np.zeros_like(b["logp_new"])
    for idx in np.ndindex(b["logp_new"].shape):
        step = np.zeros_like(b["logp_new"])
        step[idx] = eps
        numeric[idx] = (float(value(b["logp_new"] + step)) - float(value(b["logp_new"] - step))) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=3e-3, rtol=2e-2)
    # the correction is a constant weight on each token's gradient
    plain = np.asarray(grad_new(grpo.make_loss("dapo"), b))
    w = np.asarray(part(b["logp_new"], b["logp_old"], b["logp_sampler"], b["mask"], b["adv"][:, None]).weight)
    np.testing.assert_allclose(grad, plain * w * b["mask"], rtol=1e-5, atol=1e-8)


NEW_LOSSES = {
    "tis": dict(preset="dapo", correction=grpo.TruncatedIS("sequence", cap_max=2.0)),
    "icepop": dict(preset="grpo", kl_coef=0.0, correction=grpo.MaskedIS()),
    "opsm": dict(preset="dr_grpo", correction=grpo.OffPolicySequenceMask(0.05)),
    "gpg": dict(preset="gpg"),
    "dro": dict(preset="dro"),
    "dppo_tv": dict(preset="dppo_tv"),
    "dppo_kl": dict(preset="dppo_kl"),
    "luspo": dict(preset="luspo", gate=grpo.HardClip(0.2, 0.2)),
    "vespo": dict(preset="vespo"),
    "vespo_tis": dict(preset="vespo", correction=grpo.TruncatedIS("token", cap_max=2.0)),
    "k3_token_corrected": dict(preset="grpo", kl_is_correction="token"),
    "abs_plus": dict(preset="grpo", kl_estimator="abs+"),
}


def make(name):
    spec = dict(NEW_LOSSES[name])
    return grpo.make_loss(spec.pop("preset"), **spec)


@pytest.mark.parametrize("name", sorted(NEW_LOSSES))
def test_new_losses_micro_batches_sum_to_the_full_batch(name):
    b = batch(3, spread=0.3, mismatch=0.5, empty_row=True)
    loss_fn = make(name)
    full, _ = run(loss_fn, b)
    full_grad = grad_new(loss_fn, b)
    normaliser = grpo.batch_normaliser(loss_fn.config, b["mask"])
    total, grads = 0.0, []
    for rows in (slice(0, 2), slice(2, 5), slice(5, 6)):
        part = {k: v[rows] for k, v in b.items()}
        def f(x, p=part):
            return run(loss_fn, p, logp_new=x, normaliser=normaliser)[0]

        loss, grad = jax.value_and_grad(f)(jnp.asarray(part["logp_new"]))
        total, grads = total + loss, grads + [grad]
    np.testing.assert_allclose(total, full, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.concatenate(grads), full_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", sorted(NEW_LOSSES))
def test_new_losses_degenerate_inputs_are_finite(name):
    loss_fn = make(name)
    b = batch(4)
    empty = dict(b, mask=np.zeros_like(b["mask"]))
    loss, metrics = run(loss_fn, empty)
    assert float(loss) == 0.0 and all(np.isfinite(v) for v in metrics.values())
    assert np.all(np.asarray(grad_new(loss_fn, empty)) == 0)
    for gap in (-1e4, 1e4):  # extreme log-ratios, to pi_old and between sampler and trainer
        extreme = dict(b, logp_new=np.minimum(b["logp_old"] + gap, 0.0).astype(np.float32),
                       logp_sampler=(b["logp_old"] - gap).astype(np.float32))
        loss, metrics = run(loss_fn, extreme)
        assert np.isfinite(loss) and all(np.isfinite(v) for v in metrics.values()), gap
        assert np.all(np.isfinite(np.asarray(grad_new(loss_fn, extreme))))
    zero_adv = dict(b, adv=np.zeros_like(b["adv"]))  # all-equal rewards
    loss, _ = run(loss_fn, zero_adv)
    assert np.isfinite(loss)


@pytest.mark.parametrize("name", sorted(NEW_LOSSES) + ["clip_cov", "kl_cov"])
def test_new_losses_follow_the_input_dtype(name):
    loss_fn = make(name) if name in NEW_LOSSES else grpo.make_loss(name)
    b = batch(5)
    with jax.enable_x64(True):
        b64 = {k: v.astype(np.float64) for k, v in b.items()}
        loss, metrics = run(loss_fn, b64)
        assert loss.dtype == jnp.float64 and all(v.dtype == jnp.float64 for v in metrics.values())
        assert grad_new(loss_fn, b64).dtype == jnp.float64
        # float64 inputs give float64-exact results: the float32 loss agrees to float32 precision
        np.testing.assert_allclose(run(loss_fn, b)[0], loss, rtol=1e-5, atol=1e-6)
    b16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in b.items()}
    loss, metrics = run(loss_fn, b16)
    assert loss.dtype == jnp.bfloat16 and all(v.dtype == jnp.bfloat16 for v in metrics.values())
    assert np.isfinite(float(loss))


# --- DRO, DPPO, Clip-Cov, KL-Cov, VESPO by hand -------------------------------------------------------


def test_dro_by_hand_and_gradient():
    # log r = 0.5, A = 2, log pi = -1: objective 2 (-1) - 0.5 * 0.1 * 0.25; gradient (A - beta log r)
    out = grpo.DRO(0.1)(jnp.array([[0.5]]), jnp.array([[2.0]]), jnp.array([[-1.0]]))
    np.testing.assert_allclose(out.objective, [[-2.0 - 0.0125]], rtol=1e-6)
    loss_fn = grpo.make_loss("dro", aggregation="token_sum")
    g = jax.grad(lambda x: loss_fn(x, jnp.array([[-1.5]]), jnp.array([2.0]))[0])(jnp.array([[-1.0]]))
    np.testing.assert_allclose(g, [[-(2.0 - 0.1 * 0.5)]], rtol=1e-6)


def test_dppo_masks_by_probability_shift_not_ratio():
    # A rare token whose probability doubles (0.01 -> 0.02, ratio 2) stays inside the TV trust region,
    # a frequent one moving 0.5 -> 0.7 (ratio 1.4) leaves it; PPO's clip drops both.
    old = jnp.log(jnp.array([[0.01, 0.5, 0.5, 0.5]]))
    new = jnp.log(jnp.array([[0.02, 0.7, 0.3, 0.6]]))
    adv = jnp.array([[1.0, 1.0, -1.0, -1.0]])
    ctx = grpo.GateContext(jnp.ones((1, 4)), old, None)
    out = grpo.DivergenceMask("tv", 0.15)(new - old, adv, new, ctx)
    np.testing.assert_array_equal(np.asarray(out.gate) > 0, [[True, False, False, True]])
    np.testing.assert_allclose(out.objective[0, 0], 2.0 * 1.0 * math.log(0.02), rtol=1e-5)  # sg(r) A log pi
    clip = grpo.HardClip(0.2, 0.2)(new - old, adv, new)  # the clip also drops the rare token
    np.testing.assert_array_equal(np.asarray(clip.gate) > 0, [[False, False, False, True]])
    # binary KL of Bernoulli(0.5) -> Bernoulli(0.7): 0.5 log(0.5/0.7) + 0.5 log(0.5/0.3) = 0.0872 > 0.05
    kl = grpo.DivergenceMask("binary_kl", 0.05, cap=1.5)(new - old, adv, new, ctx)
    np.testing.assert_array_equal(np.asarray(kl.gate) > 0, [[True, False, False, True]])
    np.testing.assert_allclose(kl.objective[0, 0], 1.5 * math.log(0.02), rtol=1e-5)  # IS weight capped
    assert bool(kl.dual_clipped[0, 0])


def test_clip_cov_detaches_a_covariance_selected_token_and_a_key_draws_it_at_random():
    # 4 tokens, A = (3, 1, -1, -3), log pi = (0, -1, -2, -3) + small: cov = (A - 0)(lp + 1.5)
    lp = jnp.array([[-0.1, -1.0, -2.0, -2.9]])
    adv = jnp.array([[3.0, 1.0, -1.0, -3.0]])
    ctx = grpo.GateContext(jnp.ones((1, 4)), lp, None)  # on-policy: nothing clipped
    cov = (np.array([3.0, 1, -1, -3]) - 0) * (np.asarray(lp)[0] - np.mean(np.asarray(lp)))
    # covariances (4.2, 0.5, 0.5, 4.2): tokens 0 and 3 are candidates in (1, 5); fraction 0.5 -> 2 tokens
    np.testing.assert_allclose(cov, [4.2, 0.5, 0.5, 4.2], rtol=1e-6)
    part = grpo.CovarianceClip(0.2, 0.2, fraction=0.3, cov_low=1.0, cov_high=5.0)  # floor(1.2) = 1 token
    out = part(jnp.zeros((1, 4)), adv, lp, ctx)
    assert int(np.sum(np.asarray(out.gate) == 0)) == 1
    draws = set()
    for seed in range(12):
        out = part(jnp.zeros((1, 4)), adv, lp, ctx._replace(key=jax.random.PRNGKey(seed)))
        dropped = np.flatnonzero(np.asarray(out.gate)[0] == 0)
        assert len(dropped) == 1 and dropped[0] in (0, 3)
        draws.add(int(dropped[0]))
    assert draws == {0, 3}  # both candidates get drawn


def test_kl_cov_penalises_the_top_covariance_tokens():
    lp = jnp.array([[-0.1, -1.0, -2.0, -2.9]])
    old = lp - jnp.array([[0.3, 0.0, 0.0, -0.2]])  # log r = (0.3, 0, 0, -0.2)
    adv = jnp.array([[3.0, 1.0, -1.0, -3.0]])
    ctx = grpo.GateContext(jnp.ones((1, 4)), old, None)
    out = grpo.CovarianceKL(fraction=0.5, coef=2.0)(lp - old, adv, lp, ctx)  # 2 tokens: 0 and 3 (cov 4.2)
    r = np.exp([0.3, 0.0, 0.0, -0.2])
    expected = r * np.array([3.0, 1, -1, -3]) - 2.0 * np.abs([0.3, 0.0, 0.0, -0.2]) * np.array([1, 0, 0, 1])
    np.testing.assert_allclose(out.objective[0], expected, rtol=1e-5)


def test_vespo_gamma_weight_by_hand_and_sampler_folding():
    # phi(1) = 1; phi(w) = e^3 w^2 e^(-3 w) for A >= 0
    ones = jnp.ones((1, 2))
    out = grpo.GammaWeight()(jnp.log(jnp.array([[1.0, 2.0]])), ones, -ones)
    np.testing.assert_allclose(out.objective, [[-1.0, -math.exp(3) * 4 * math.exp(-6)]], rtol=1e-5)
    # TRL folds the token IS ratios into w: w = prod_t r_t * prod_t min(rho_t, 2)
    b = batch(6, mismatch=0.6)
    loss, _ = run(grpo.make_loss("vespo", correction=grpo.TruncatedIS("token", cap_max=2.0)), b)
    lp, old, m, A, s = (b[k].astype(np.float64) for k in KEYS)
    is_ratio = np.minimum(np.exp((old - s) * m), 2.0)
    log_w = (np.clip(lp - old, -20, 20) * m).sum(-1, keepdims=True) + np.log(is_ratio).sum(-1, keepdims=True)
    log_w = np.clip(log_w, np.log(1e-8), 20)
    k = np.where(A[:, None] >= 0, 2.0, 3.0)
    lam = np.where(A[:, None] >= 0, 3.0, 2.0)
    phi = np.exp(lam + k * log_w - lam * np.exp(log_w))
    np.testing.assert_allclose(loss, token_mean(-phi * A[:, None] * lp, m), rtol=2e-5)


def test_luspo_weights_each_sequence_term_by_its_length():
    b = batch(7)
    b["mask"][:] = 0
    b["mask"][0, :2] = b["mask"][1, :4] = 1
    b = {k: v[:2] for k, v in b.items()}
    loss_fn = grpo.make_loss("luspo", gate=grpo.NoGate())
    gspo_fn = grpo.make_loss("gspo", gate=grpo.NoGate())
    per_seq = []
    for i in range(2):  # GSPO's per-response term, one response at a time
        one = {k: v[i:i + 1] for k, v in b.items()}
        per_seq.append(float(run(gspo_fn, one)[0]))
    np.testing.assert_allclose(run(loss_fn, b)[0], (2 * per_seq[0] + 4 * per_seq[1]) / 2, rtol=1e-5)


# --- KL estimators and their placement, against the exact gradient ---------------------------------


def categorical(seed, size=5, distance=1.0):
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal(size)
    ref = theta + distance * rng.standard_normal(size)
    return jnp.asarray(theta, jnp.float64), jnp.asarray(ref, jnp.float64)


def loss_gradient_per_outcome(config, theta, ref_logits, old_logits=None, advantages=None):
    """grad_theta of the polygrad loss with x as the only sample, for every outcome x `[A, A]`."""
    size = theta.shape[0]
    old_logits = jax.lax.stop_gradient(theta) if old_logits is None else old_logits
    log_ref = jax.nn.log_softmax(ref_logits)
    log_old = jax.nn.log_softmax(old_logits)
    adv = jnp.zeros(size) if advantages is None else advantages

    def loss(t, x):
        logp = jax.nn.log_softmax(t)[x]
        return losses.policy_loss(config, logp[None, None], log_old[x][None, None], adv[x][None],
                                  logp_ref=log_ref[x][None, None])[0]

    return jax.vmap(lambda x: jax.grad(loss)(theta, x))(jnp.arange(size))


def exact_kl_gradients(theta, ref_logits):
    forward = jax.grad(lambda t: distributions.categorical_kl(t, ref_logits))(theta)  # KL(pi || ref)
    reverse = jax.grad(lambda t: distributions.categorical_kl(ref_logits, t))(theta)  # KL(ref || pi)
    return forward, reverse


@pytest.mark.parametrize("seed", [0, 1])
def test_in_loss_kl_estimators_against_the_exact_gradient(seed):
    """Single categorical, x ~ pi_theta: expected sampled gradient sum_x pi(x) grad loss(x) vs exact."""
    with jax.enable_x64(True):
        theta, ref = categorical(seed)
        pi = jax.nn.softmax(theta)
        kl_grad, reverse_grad = exact_kl_gradients(theta, ref)
        assert float(jnp.linalg.norm(kl_grad)) > 0.1

        def expected(**kw):
            config = grpo.LossConfig(gate=grpo.NoGate(), aggregation="token_sum", kl_coef=1.0, **kw)
            return pi @ loss_gradient_per_outcome(config, theta, ref)

        for estimator in ("k2", "k1+", "k3+", "abs+", "k3_value_k2_grad"):  # k2's gradient: unbiased
            np.testing.assert_allclose(expected(kl_estimator=estimator), kl_grad, atol=1e-12,
                                       err_msg=estimator)
        for estimator in ("k1", "k3"):  # times pi_theta / pi_old (with gradient): unbiased
            np.testing.assert_allclose(expected(kl_estimator=estimator, kl_is_correction="token"), kl_grad,
                                       atol=1e-12, err_msg=estimator)
        np.testing.assert_allclose(expected(kl_estimator="k1"), 0.0, atol=1e-12)  # k1 in the loss: no force
        np.testing.assert_allclose(expected(kl_estimator="k3"), reverse_grad, atol=1e-12)  # KL(ref || pi)
        assert float(jnp.linalg.norm(expected(kl_estimator="k3") - kl_grad)) > 0.01
        assert float(jnp.linalg.norm(expected(kl_estimator="abs") - kl_grad)) > 0.01
        # the values: k1 and k3 are unbiased for KL(pi || ref), k2 is not
        log_pi, log_ref = jax.nn.log_softmax(theta), jax.nn.log_softmax(ref)
        kl = distributions.categorical_kl(theta, ref)
        np.testing.assert_allclose(pi @ distributions.kl_k1(log_pi, log_ref), kl, rtol=1e-12)
        np.testing.assert_allclose(pi @ distributions.kl_k3(log_pi, log_ref), kl, rtol=1e-12)
        assert abs(float(pi @ distributions.kl_k2(log_pi, log_ref) - kl)) > 1e-3


def test_bias_corrected_k3_is_unbiased_off_policy():
    """x ~ pi_old != pi_theta: only the pi_theta / pi_old corrected estimators keep the exact gradient."""
    with jax.enable_x64(True):
        theta, ref = categorical(2)
        old = theta + 0.5 * jnp.asarray(np.random.default_rng(9).standard_normal(theta.shape[0]))
        pi_old = jax.nn.softmax(old)
        kl_grad, _ = exact_kl_gradients(theta, ref)

        def expected(**kw):
            config = grpo.LossConfig(gate=grpo.NoGate(), aggregation="token_sum", kl_coef=1.0, **kw)
            return pi_old @ loss_gradient_per_outcome(config, theta, ref, old_logits=old)

        for estimator in ("k1", "k3"):
            np.testing.assert_allclose(expected(kl_estimator=estimator, kl_is_correction="token"), kl_grad,
                                       atol=1e-12)
        assert float(jnp.linalg.norm(expected(kl_estimator="k2") - kl_grad)) > 1e-2  # k2: off-policy bias


def test_k1_in_the_reward_is_the_unbiased_sequence_gradient():
    """Two tokens y1 ~ pi(.), y2 ~ pi(.|y1): k1 folded into the rewards gives the exact gradient of the
    sequence KL through the score function; k2 in the loss gives only the per-state term."""
    with jax.enable_x64(True):
        size = 3
        rng = np.random.default_rng(3)
        def tabular():
            return {"t1": jnp.asarray(rng.standard_normal(size)),
                    "t2": jnp.asarray(rng.standard_normal((size, size)))}

        theta, ref = tabular(), tabular()

        def seq_kl(th):
            kl1 = distributions.categorical_kl(th["t1"], ref["t1"])
            pi1 = jax.nn.softmax(th["t1"])
            return kl1 + pi1 @ distributions.categorical_kl(th["t2"], ref["t2"])

        exact = jax.grad(seq_kl)(theta)
        outcomes = [(a, b) for a in range(size) for b in range(size)]

        def token_logps(th, y):
            return jnp.stack([jax.nn.log_softmax(th["t1"])[y[0]], jax.nn.log_softmax(th["t2"][y[0]])[y[1]]])

        def sample_grad(y, placement):
            lp_ref = token_logps(ref, y)
            lp_old = jax.lax.stop_gradient(token_logps(theta, y))
            mask = jnp.ones((1, 2))
            if placement == "reward_k1":  # REINFORCE with reward-to-go of the KL-shaped rewards
                zero = jnp.zeros((1, 2))
                shaped = grpo.fold_kl_into_rewards(zero, lp_old[None], lp_ref[None], mask, 1.0, "k1")
                returns = jnp.cumsum(shaped[:, ::-1], axis=1)[:, ::-1]
                config = grpo.LossConfig(gate=grpo.ScoreFunction(), aggregation="token_sum")

                def f(th):
                    return losses.policy_loss(config, token_logps(th, y)[None], lp_old[None], returns,
                                              mask)[0]
            else:
                config = grpo.LossConfig(gate=grpo.NoGate(), aggregation="token_sum", kl_coef=1.0,
                                         kl_estimator="k2")

                def f(th):
                    return losses.policy_loss(config, token_logps(th, y)[None], lp_old[None], jnp.zeros(1),
                                              mask, logp_ref=lp_ref[None])[0]
            return jax.grad(f)(theta)

        def expectation(placement):
            total = jax.tree.map(jnp.zeros_like, theta)
            for y in outcomes:
                p = jnp.exp(jnp.sum(jax.lax.stop_gradient(token_logps(theta, y))))
                total = jax.tree.map(lambda t, g, p=p: t + p * g, total, sample_grad(y, placement))
            return total

        in_reward = expectation("reward_k1")
        for key in theta:
            np.testing.assert_allclose(in_reward[key], exact[key], atol=1e-12)
        in_loss = expectation("loss_k2")
        gap = sum(float(jnp.sum((in_loss[k] - exact[k]) ** 2)) for k in theta)
        assert gap > 1e-4  # misses how the first token changes the second state's KL


def test_kl_value_clip_and_abs_gradient_follow_verl():
    logp, ref = jnp.array([-1.0, -20.0, -2.0]), jnp.array([-1.0, -1.0, -2.5])
    clipped = grpo.kl_penalty("k3", logp, ref, k3_clip=10.0)
    np.testing.assert_allclose(clipped[1], 10.0)  # exp(19) - 20: clamped to 10, as verl's low_var_kl
    g = jax.grad(lambda x: jnp.sum(grpo.kl_abs(x, ref)))(logp)
    np.testing.assert_allclose(g, [0.0, -1.0, 1.0])  # torch's abs: gradient 0 where log pi = log ref


def test_fold_kl_into_rewards_by_hand():
    logp = jnp.array([[-1.0, -2.0, -3.0]])
    ref = jnp.array([[-1.5, -1.0, -3.0]])
    mask = jnp.array([[1.0, 1.0, 0.0]])
    rewards = grpo.outcome_token_rewards(jnp.array([2.0]), mask)
    np.testing.assert_allclose(rewards, [[0.0, 2.0, 0.0]])
    shaped = grpo.fold_kl_into_rewards(rewards, logp, ref, mask, 0.1)
    np.testing.assert_allclose(shaped, [[-0.05, 2.0 + 0.1, 0.0]], rtol=1e-6)
    k3 = grpo.fold_kl_into_rewards(rewards, logp, ref, mask, 0.1, "k3")
    np.testing.assert_allclose(k3[0, 0], -0.1 * (math.exp(-0.5) - 1 + 0.5), rtol=1e-6)
    assert jax.grad(lambda x: jnp.sum(grpo.fold_kl_into_rewards(rewards, x, ref, mask, 0.1)))(logp).sum() == 0


# --- advantages ---------------------------------------------------------------------------------------


def test_batch_std_advantages_match_trl():
    rewards = np.array([[1.0, 0.0, 0.5], [2.0, 2.0, 2.0], [0.0, 3.0, 1.0]])
    expected = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(ddof=1) + 1e-4)
    got = adv_lib.batch_std_advantages(jnp.asarray(rewards, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(adv_lib.batch_std_advantages(jnp.ones((2, 3))), 0.0)


def test_gpg_advantages_by_hand():
    rewards = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 1.0]])  # 2 of 4 groups have signal
    centered = np.array([[0.5, -0.5], [0, 0], [0, 0], [-0.5, 0.5]])
    np.testing.assert_allclose(adv_lib.gpg_advantages(rewards), 2 * centered)  # alpha = 4 groups / 2
    # verl: alpha = B / number of nonzero rewards = 8 / 4
    np.testing.assert_allclose(adv_lib.gpg_advantages(rewards, alpha="nonzero_rewards"), 2 * centered)
    np.testing.assert_allclose(adv_lib.gpg_advantages(jnp.zeros((2, 2))), 0.0)


def test_multi_reward_advantages_match_trl_and_verl():
    rng = np.random.default_rng(8)
    rewards = rng.integers(0, 3, (4, 3, 2)).astype(np.float64)
    rewards[1, :, 0] = 1.0  # a constant reward in one group
    weights = np.array([1.0, 0.5])

    def group_norm(r, eps):
        std = r.std(1, ddof=1, keepdims=True)
        return np.where(std == 0, 0.0, (r - r.mean(1, keepdims=True)) / (std + eps))

    summed = sum(weights[k] * group_norm(rewards[..., k], 1e-4) for k in range(2))
    trl = (summed - summed.mean()) / (summed.std(ddof=1) + 1e-4)  # TRL normalize_then_sum
    r32, w32 = jnp.asarray(rewards, jnp.float32), jnp.asarray(weights, jnp.float32)
    got = adv_lib.multi_reward_advantages(r32, w32)
    np.testing.assert_allclose(got, trl, rtol=1e-4, atol=1e-5)
    # verl gdpo: eps 1e-6 per reward, then masked_whiten over tokens (lengths)
    lengths = rng.integers(1, 5, (4, 3)).astype(np.float64)
    summed = sum(weights[k] * group_norm(rewards[..., k], 1e-6) for k in range(2))
    tokens = np.repeat(summed.reshape(-1), lengths.reshape(-1).astype(int))
    verl = (summed - tokens.mean()) / np.sqrt(tokens.var(ddof=1) + 1e-8)
    got = adv_lib.multi_reward_advantages(r32, w32, eps=1e-6, batch_eps=1e-8, batch_eps_in_sqrt=True,
                                          lengths=lengths)
    np.testing.assert_allclose(got, verl, rtol=1e-4, atol=1e-5)
    assert np.all(adv_lib.multi_reward_advantages(jnp.ones((2, 3, 2))) == 0)


def verl_masked_whiten(values, mask):
    mean = (values * mask).sum() / mask.sum()
    var = (((values - mean) ** 2) * mask).sum() / mask.sum() * mask.sum() / (mask.sum() - 1)
    return (values - mean) / np.sqrt(var + 1e-8)


def test_reinforce_plus_plus_matches_verl():
    rng = np.random.default_rng(10)
    mask = (np.arange(5)[None] < rng.integers(1, 6, (6, 1))).astype(np.float64)
    token_rewards = rng.standard_normal((6, 5)) * mask
    gamma = 0.9
    returns = np.zeros_like(token_rewards)  # verl compute_reinforce_plus_plus_outcome_advantage
    running = np.zeros(6)
    for t in reversed(range(5)):
        running = token_rewards[:, t] + gamma * running
        returns[:, t] = running
        running = running * mask[:, t]
    expected = verl_masked_whiten(returns, mask) * mask
    adv, ret = adv_lib.reinforce_plus_plus_advantages(jnp.asarray(token_rewards, jnp.float32),
                                                      jnp.asarray(mask, jnp.float32), gamma=gamma)
    np.testing.assert_allclose(ret, returns * mask, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adv, expected, rtol=1e-4, atol=1e-5)


def test_reinforce_plus_plus_baseline_matches_verl():
    rng = np.random.default_rng(11)
    rewards = rng.integers(0, 2, (3, 4)).astype(np.float64)
    mask = (np.arange(6)[None] < rng.integers(1, 7, (12, 1))).astype(np.float64)
    scores = (rewards - rewards.mean(1, keepdims=True)).reshape(-1, 1) * mask
    expected = verl_masked_whiten(scores, mask) * mask
    got = adv_lib.reinforce_plus_plus_baseline_advantages(jnp.asarray(rewards, jnp.float32),
                                                          jnp.asarray(mask, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(adv_lib.reinforce_plus_plus_baseline_advantages(jnp.ones((3, 4)), mask), 0.0)


def test_advantage_config_with_kl_in_the_reward():
    rng = np.random.default_rng(12)
    rewards = jnp.asarray(rng.integers(0, 2, (2, 3)), jnp.float32)
    mask = jnp.asarray((np.arange(4)[None] < rng.integers(1, 5, (6, 1))), jnp.float32)
    logp = jnp.asarray(np.log(rng.uniform(0.1, 0.9, (6, 4))), jnp.float32)
    ref = jnp.asarray(np.log(rng.uniform(0.1, 0.9, (6, 4))), jnp.float32)
    config = grpo.AdvantageConfig.of("group_centered", kl_coef=0.1)
    k1 = np.asarray(((logp - ref) * mask).sum(-1)).reshape(2, 3)
    expected = np.asarray(rewards) - 0.1 * k1
    expected = expected - expected.mean(1, keepdims=True)
    got = config.compute(rewards, mask, logp, ref)
    np.testing.assert_allclose(got, expected.reshape(-1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mask, logp and logp_ref"):
        config.compute(rewards)
    pp = grpo.AdvantageConfig.of("reinforce_pp", kl_coef=0.1)
    assert pp.token_level and pp.compute(rewards, mask, logp, ref).shape == (6, 4)


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_new_advantages_follow_the_input_dtype_and_degenerate_batches(dtype):
    rng = np.random.default_rng(13)
    rewards, mask = rng.integers(0, 3, (3, 4)).astype(np.float64), np.ones((12, 5))
    with jax.enable_x64(dtype == "float64"):
        r = jnp.asarray(rewards, dtype)
        m = jnp.asarray(mask, dtype)
        outputs = [
            adv_lib.batch_std_advantages(r),
            adv_lib.gpg_advantages(r),
            adv_lib.multi_reward_advantages(jnp.stack([r, 2 * r], -1)),
            adv_lib.whiten_tokens(jnp.broadcast_to(r.reshape(-1, 1), (12, 5)), m),
            adv_lib.reinforce_plus_plus_advantages(grpo.outcome_token_rewards(r.reshape(-1), m), m)[0],
            adv_lib.reinforce_plus_plus_baseline_advantages(r, m),
        ]
        for out in outputs:
            assert out.dtype == jnp.dtype(dtype) and np.all(np.isfinite(np.asarray(out, np.float64)))
        # one active token, a single response, all-equal rewards: 0, never NaN
        one = jnp.zeros((2, 3), dtype).at[0, 0].set(1)
        assert np.all(np.asarray(adv_lib.whiten_tokens(jnp.ones((2, 3), dtype), one), np.float64) == 0)
        assert np.all(np.asarray(adv_lib.batch_std_advantages(jnp.ones((1, 1), dtype)), np.float64) == 0)
        assert np.all(np.asarray(adv_lib.gpg_advantages(jnp.ones((2, 1), dtype)), np.float64) == 0)
