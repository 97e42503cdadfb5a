"""Under 64-bit mode every estimator, loss preset, tabular function and trust-region step is float64-exact.

Each test runs inside `jax.enable_x64(True)` (a context manager, so the rest of the suite keeps float32)
and compares polygrad's float64 results with plain numpy float64 re-implementations or numpy linear solves
to a relative 1e-12: a hidden float32 cast anywhere would show up as an error near 1e-7.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs import tabular as tabular_envs
from polygrad import losses, tabular, trust_region
from polygrad.estimators import advantages, distributions, importance, returns, statistics
from polygrad.losses import parts

RTOL = 1e-12


@pytest.fixture(autouse=True, scope="module")
def _float64_and_no_rank_promotion():
    with jax.enable_x64(True), jax.numpy_rank_promotion("raise"):
        yield


def close(got, want, rtol=RTOL):
    """`got` is float64 and equals `want` to `rtol`, relative to the largest magnitude of `want`."""
    got = np.asarray(got)
    want = np.asarray(want, np.float64)
    assert got.dtype == np.float64, got.dtype
    scale = max(float(np.max(np.abs(want))), 1e-300) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def rng(seed):
    return np.random.default_rng(seed)


# --- returns ------------------------------------------------------------------------------------------------


def stream(seed, horizon=11, batch=3):
    """A time-major batch [T, N] with episode ends, consistent next values and a per-step discount."""
    g = rng(seed)
    rewards, values, final = g.normal(size=(3, horizon, batch))
    ends = g.choice([0, 0, 0, 1, 2], size=(horizon, batch))
    terminated, truncated = ends == 1, ends == 2
    shifted = np.concatenate([values[1:], final[-1:]])
    next_values = np.where(terminated | truncated, final, shifted)
    discount = g.uniform(0.8, 0.99, size=(horizon, batch))
    return rewards, values, next_values, terminated, truncated, discount


def reference_lambda_returns(rewards, next_values, terminated, truncated, gamma, lam):
    gamma = np.broadcast_to(gamma, rewards.shape)
    out = np.zeros_like(rewards)
    g_next = np.zeros(rewards.shape[1])
    for t in reversed(range(len(rewards))):
        trace = lam * (1.0 - np.maximum(terminated[t], truncated[t])) * (t < len(rewards) - 1)
        g = rewards[t] + gamma[t] * (1.0 - terminated[t]) * ((1 - trace) * next_values[t] + trace * g_next)
        out[t] = g_next = g
    return out


def reference_gae(rewards, values, next_values, terminated, truncated, gamma, lam):
    gamma = np.broadcast_to(gamma, rewards.shape)
    deltas = rewards + gamma * (1.0 - terminated) * next_values - values
    out = np.zeros_like(rewards)
    a_next = np.zeros(rewards.shape[1])
    for t in reversed(range(len(rewards))):
        not_done = 1.0 - np.maximum(terminated[t], truncated[t])
        a_next = out[t] = deltas[t] + gamma[t] * lam * not_done * a_next
    return out


def reference_n_step(rewards, next_values, terminated, truncated, gamma, n):
    horizon, batch = rewards.shape
    out = np.zeros_like(rewards)
    for i in range(batch):
        for t in range(horizon):
            g, discount = 0.0, 1.0
            for k in range(n):
                j = t + k
                g += discount * rewards[j, i]
                discount *= gamma
                if terminated[j, i] or truncated[j, i] or j == horizon - 1 or k == n - 1:
                    if not terminated[j, i]:
                        g += discount * next_values[j, i]
                    break
            out[t, i] = g
    return out


def test_returns_and_advantages():
    rewards, values, next_values, terminated, truncated, discount = stream(0)
    r, v, nv = (jnp.asarray(x) for x in (rewards, values, next_values))
    te, tr = jnp.asarray(terminated), jnp.asarray(truncated)
    for gamma in (0.93, discount):
        close(returns.td_errors(r, v, nv, te, jnp.asarray(gamma)),
              rewards + gamma * (1.0 - terminated) * next_values - values)
        close(returns.gae(r, v, nv, te, tr, jnp.asarray(gamma), 0.9),
              reference_gae(rewards, values, next_values, terminated, truncated, gamma, 0.9))
        close(returns.lambda_returns(r, nv, te, tr, jnp.asarray(gamma), 0.7),
              reference_lambda_returns(rewards, next_values, terminated, truncated, gamma, 0.7))
        close(returns.discounted_returns(r, te, tr, jnp.asarray(gamma), nv),
              reference_lambda_returns(rewards, next_values, terminated, truncated, gamma, 1.0))
    for n in (1, 3, 20):
        close(returns.n_step_returns(r, nv, te, tr, 0.93, n),
              reference_n_step(rewards, next_values, terminated, truncated, 0.93, n))


# --- importance sampling ------------------------------------------------------------------------------------


def test_importance_sampling():
    g = rng(1)
    logp_new, logp_old = np.log(g.dirichlet(np.ones(4), size=(6, 5))).transpose(2, 0, 1)[:2]
    rewards = g.normal(size=(6, 5))
    mask = (g.uniform(size=(6, 5)) < 0.8).astype(np.float64)
    step = logp_new - logp_old
    a, b, s, r, m = (jnp.asarray(x) for x in (logp_new, logp_old, step, rewards, mask))

    close(importance.log_ratios(a, b), step)
    close(importance.ratios(a, b), np.exp(step))
    masked_step = step * mask
    close(importance.trajectory_log_weights(s, m), masked_step.sum(0))
    close(importance.trajectory_weights(s, m), np.exp(masked_step.sum(0)))
    prefix = np.exp(np.cumsum(masked_step, axis=0))
    close(importance.cumulative_weights(s, m), prefix)
    discounts = 0.9 ** np.arange(6)[:, None]
    close(importance.per_decision_is(s, r, 0.9, m), np.mean(np.sum(discounts * prefix * rewards * mask, 0)))
    unmasked = np.exp(np.cumsum(step, axis=0))
    close(importance.per_decision_is(s, r, 0.9), np.mean(np.sum(discounts * unmasked * rewards, 0)))

    w, f = np.exp(step[0]), rewards[0]
    close(importance.ordinary_is(jnp.asarray(w), jnp.asarray(f)), np.mean(w * f))
    close(importance.self_normalised_is(jnp.asarray(w), jnp.asarray(f)), np.sum(w * f) / np.sum(w))
    close(importance.capped_weights(jnp.asarray(w), 1.1), np.minimum(w, 1.1))
    kish = w.sum() ** 2 / (w**2).sum()
    close(importance.effective_sample_size(jnp.asarray(w)), kish)
    close(importance.effective_sample_size_from_log_weights(jnp.asarray(step[0])), kish)


# --- distributions ------------------------------------------------------------------------------------------


def np_log_softmax(x):
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_distributions():
    g = rng(2)
    logits_p, logits_q = g.normal(size=(2, 4, 5))
    actions = g.integers(0, 5, size=4)
    lp, lq = np_log_softmax(logits_p), np_log_softmax(logits_q)
    p = np.exp(lp)
    jp, jq = jnp.asarray(logits_p), jnp.asarray(logits_q)
    close(distributions.categorical_log_prob(jp, jnp.asarray(actions)), lp[np.arange(4), actions])
    close(distributions.categorical_entropy(jp), -(p * lp).sum(-1))
    close(distributions.categorical_kl(jp, jq), (p * (lp - lq)).sum(-1))
    close(distributions.Categorical(jp).kl(distributions.Categorical(jq)), (p * (lp - lq)).sum(-1))

    mean_p, mean_q, x = g.normal(size=(3, 4, 2))
    log_std_p, log_std_q = g.normal(size=(2, 2)) * 0.3
    mp, mq, jx, sp, sq = (jnp.asarray(v) for v in (mean_p, mean_q, x, log_std_p, log_std_q))
    std_p = np.exp(log_std_p)
    log_density = -0.5 * ((x - mean_p) / std_p) ** 2 - log_std_p - 0.5 * math.log(2 * math.pi)
    close(distributions.gaussian_log_prob(mp, sp, jx), log_density.sum(-1))
    entropy = (log_std_p + 0.5 * (1 + math.log(2 * math.pi))).sum()
    close(distributions.gaussian_entropy(mp, sp), np.full(4, entropy))
    var_p, var_q = np.exp(2 * log_std_p), np.exp(2 * log_std_q)
    kl = (log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5).sum(-1)
    close(distributions.gaussian_kl(mp, sp, mq, sq), kl)

    logp, logp_ref = lp[:, 0], lq[:, 0]
    log_r = logp_ref - logp
    a, b = jnp.asarray(logp), jnp.asarray(logp_ref)
    close(distributions.kl_k1(a, b), -log_r)
    close(distributions.kl_k2(a, b), 0.5 * log_r**2)
    close(distributions.kl_k3(a, b), np.expm1(log_r) - log_r)


# --- group advantages and statistics ------------------------------------------------------------------------


def test_group_advantages():
    rewards = rng(3).normal(size=(4, 6))
    mean = rewards.mean(1, keepdims=True)
    centered = rewards - mean
    r = jnp.asarray(rewards)
    std = rewards.std(1, keepdims=True)
    close(advantages.group_normalized_advantages(r, eps=1e-4), centered / (std + 1e-4))
    close(advantages.group_normalized_advantages(r, eps=1e-2, eps_in_sqrt=True, ddof=1),
          centered / np.sqrt(rewards.var(1, ddof=1, keepdims=True) + 1e-2))
    close(advantages.group_centered_advantages(r), centered)
    batch_std = np.sqrt(np.mean(centered**2))
    close(advantages.batch_normalized_advantages(r, eps=1e-4), centered / (batch_std + 1e-4))
    loo = np.stack([rewards[:, i] - np.delete(rewards, i, axis=1).mean(1) for i in range(6)], axis=1)
    close(advantages.leave_one_out_advantages(r), loo)


def test_statistics():
    g = rng(4)
    x, y = g.normal(size=(2, 5, 7))
    mask = g.uniform(size=(5, 7)) < 0.7
    jx, jy, jm = jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask)
    active = x[mask]
    close(statistics.masked_sum(jx, jm), active.sum())
    close(statistics.masked_mean(jx, jm), active.mean())
    close(statistics.masked_mean(jx), x.mean())
    close(statistics.masked_variance(jx, jm), active.var())
    close(statistics.whiten(jx, jm), np.where(mask, (x - active.mean()) / (active.std() + 1e-8), 0.0))
    residual = (y - x)[mask]
    close(statistics.explained_variance(jx, jy, jm), 1 - residual.var() / y[mask].var())
    counts = np.array([0, 1, 3, 7, 10])
    want = [1 - math.comb(10 - c, 4) / math.comb(10, 4) for c in counts]
    with jax.numpy_rank_promotion("allow"):  # pass_at_k broadcasts [..., 1] against [k] implicitly
        close(statistics.pass_at_k(10, jnp.asarray(counts), 4), want)


# --- every loss preset, against a numpy re-implementation of its parts -------------------------------------


def reference_loss(config, logp_new, logp_old, adv, mask, logp_ref, entropy, values, values_old, targets):
    """The loss of `config` in numpy float64 (003 sections 3-5; see polygrad/losses/parts.py)."""
    active = mask > 0
    logp_new, logp_old = np.where(active, logp_new, 0.0), np.where(active, logp_old, 0.0)
    adv = np.where(active, adv, 0.0)
    if config.normalize_advantages:
        a = adv[active]
        adv = np.where(active, (adv - a.mean()) / (a.std() + 1e-8), 0.0)
    log_ratio = np.clip(logp_new - logp_old, -config.log_ratio_clip, config.log_ratio_clip)
    lengths = mask.sum(-1, keepdims=True)
    safe_lengths = np.where(lengths > 0, lengths, 1.0)
    ratio_part = config.ratio
    if isinstance(ratio_part, parts.SequenceRatio):
        log_ratio = np.broadcast_to((log_ratio * mask).sum(-1, keepdims=True) / safe_lengths, mask.shape)
    elif isinstance(ratio_part, parts.GeometricMeanClippedRatio):
        high, low = ratio_part.clip_log_high, ratio_part.clip_log_low
        clipped = np.where((adv > 0) & (log_ratio > high), high,
                           np.where((adv < 0) & (log_ratio < -low), -low, log_ratio))
        log_ratio = np.broadcast_to((clipped * mask).sum(-1, keepdims=True) / safe_lengths, mask.shape)
    else:
        assert isinstance(ratio_part, parts.TokenRatio), ratio_part
    ratio = np.exp(log_ratio)
    gate = config.gate
    if isinstance(gate, parts.HardClip):
        eps_high = gate.eps_low if gate.eps_high is None else gate.eps_high
        objective = np.minimum(ratio * adv, np.clip(ratio, 1 - gate.eps_low, 1 + eps_high) * adv)
        assert gate.dual_clip is None
    elif isinstance(gate, parts.SoftGate):
        tau = np.where(adv > 0, gate.tau_pos, gate.tau_neg)
        objective = 4.0 / tau / (1.0 + np.exp(-tau * (ratio - 1.0))) * adv
    elif isinstance(gate, parts.ClippedISWeight):
        lower = 0.0 if gate.eps_low is None else 1.0 - gate.eps_low
        objective = np.clip(ratio, lower, 1.0 + gate.eps_high) * adv * logp_new
    elif isinstance(gate, parts.NoGate):
        objective = ratio * adv
    elif isinstance(gate, parts.ScoreFunction):
        objective = adv * logp_new
    else:
        raise AssertionError(f"no reference for {gate}")
    per_token = -objective
    if config.kl_coef > 0:
        assert config.kl_estimator == "k3"
        log_r = np.clip(np.where(active, logp_ref, 0.0) - logp_new, -20.0, 20.0)
        per_token = per_token + config.kl_coef * (np.expm1(log_r) - log_r)
    if config.kl_old is not None:
        log_r = np.clip(logp_new - logp_old, -20.0, 20.0)
        per_token = per_token + config.kl_old.coef * (np.expm1(log_r) - log_r)
    if config.entropy_coef > 0:
        per_token = per_token - config.entropy_coef * np.where(active, entropy, 0.0)
    if config.value_coef > 0:
        v, v_old, target = (np.where(active, z, 0.0) for z in (values, values_old, targets))
        loss = (v - target) ** 2
        if config.value_clip is not None:
            held = v_old + np.clip(v - v_old, -config.value_clip, config.value_clip)
            loss = np.maximum(loss, (held - target) ** 2)
        per_token = per_token + config.value_coef * 0.5 * loss
    nonempty_rows = float(np.any(active, axis=-1).sum())
    name = config.aggregation.name
    if name == "token_mean":
        weights, normaliser = mask, mask.sum()
    elif name == "seq_mean_token_mean":
        weights, normaliser = mask / safe_lengths, nonempty_rows
    elif name == "seq_mean_token_sum_norm":
        weights, normaliser = mask / mask.shape[-1], nonempty_rows
    elif name == "seq_mean_token_sum":
        weights, normaliser = mask, nonempty_rows
    else:
        raise AssertionError(f"no reference for {name}")
    return np.sum(np.where(active, weights * per_token, 0.0)) / normaliser


# The parts the numpy reference re-implements; presets built from other parts (added later) are covered by
# `test_every_loss_preset_is_float64_exact` below, which needs no reference.
_REFERENCE_PARTS = (parts.TokenRatio, parts.SequenceRatio, parts.GeometricMeanClippedRatio, parts.HardClip,
                    parts.SoftGate, parts.ClippedISWeight, parts.NoGate, parts.ScoreFunction)
_REFERENCE_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm",
                           "seq_mean_token_sum")
_ORIGINAL_PRESETS = {"reinforce", "a2c", "ppo", "ppo_kl", "trpo", "grpo", "dr_grpo", "dapo", "gspo", "sapo",
                     "bnpo", "cispo", "gmpo", "rloo"}


def _has_reference(config):
    neutral = losses.LossConfig()
    extras_neutral = all(getattr(config, field) == getattr(neutral, field)
                         for field in ("correction", "kl_is_correction", "kl_k3_clip")
                         if hasattr(neutral, field))
    return (extras_neutral and isinstance(config.ratio, _REFERENCE_PARTS)
            and isinstance(config.gate, _REFERENCE_PARTS)
            and config.aggregation.name in _REFERENCE_AGGREGATIONS
            and (config.kl_coef == 0 or config.kl_estimator == "k3")
            and (not isinstance(config.gate, parts.HardClip) or config.gate.dual_clip is None))


REFERENCED_PRESETS = sorted(name for name, config in losses.PRESETS.items() if _has_reference(config))


def test_the_reference_covers_the_original_presets():
    assert _ORIGINAL_PRESETS <= set(REFERENCED_PRESETS)


def loss_inputs(config, seed=5):
    """A [B, T] batch (float64 numpy): 3 prompts x 4 responses, 6 tokens, one empty response."""
    g = rng(seed)
    prompts, group, length = 3, 4, 6
    batch = prompts * group
    logp_old = np.log(g.uniform(0.05, 1.0, size=(batch, length)))
    inputs = {
        "logp_new": logp_old + 0.3 * g.normal(size=(batch, length)),
        "logp_old": logp_old,
        "logp_ref": logp_old + 0.2 * g.normal(size=(batch, length)),
        "entropy": g.uniform(0.1, 2.0, size=(batch, length)),
    }
    inputs["values"], inputs["values_old"], inputs["targets"] = g.normal(size=(3, batch, length))
    lengths = g.integers(1, length + 1, size=batch)
    lengths[1] = 0
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.float64)
    if config.advantage == "token":
        inputs["adv"] = g.normal(size=(batch, length))
    else:
        rows = np.asarray(losses.group_advantages(config, jnp.asarray(g.normal(size=(prompts, group)))))
        assert rows.dtype == np.float64
        inputs["adv"] = np.broadcast_to(rows[:, None], (batch, length)).copy()
    return inputs, mask


def call_loss(loss_fn, inputs, mask):
    j = {name: jnp.asarray(value) for name, value in inputs.items()}
    return loss_fn(j["logp_new"], j["logp_old"], j["adv"], jnp.asarray(mask), j["logp_ref"], j["entropy"],
                   values=j["values"], values_old=j["values_old"], returns=j["targets"])


@pytest.mark.parametrize("name", REFERENCED_PRESETS)
def test_loss_presets_against_numpy(name):
    config = losses.PRESETS[name]
    inputs, mask = loss_inputs(config)
    loss, metrics = call_loss(losses.make_loss(name), inputs, mask)
    i = inputs
    want = reference_loss(config, i["logp_new"], i["logp_old"], i["adv"], mask, i["logp_ref"], i["entropy"],
                          i["values"], i["values_old"], i["targets"])
    close(loss, want)
    close(metrics["loss"], want)


@pytest.mark.parametrize("name", sorted(losses.PRESETS))
def test_every_loss_preset_is_float64_exact(name):
    """No reference needed: central differences of the loss along a random direction of all its float
    inputs, at steps 1e-5 and 1e-6, agree to 1e-5. In float64 both are within ~1e-10 of the derivative;
    any float32 rounding inside the loss would put an error of ~1e-7 / 1e-6 = 0.1 into the second."""
    config = losses.PRESETS[name]
    inputs, mask = loss_inputs(config, seed=6)
    g = rng(7)
    direction = {key: g.normal(size=value.shape) for key, value in inputs.items()}
    loss_fn = losses.make_loss(name)
    loss, metrics = call_loss(loss_fn, inputs, mask)
    assert loss.dtype == jnp.float64
    for metric, value in metrics.items():
        assert jnp.asarray(value).dtype == jnp.float64, metric

    def moved(t):
        return float(call_loss(loss_fn, {k: v + t * direction[k] for k, v in inputs.items()}, mask)[0])

    def central(h):
        return (moved(h) - moved(-h)) / (2 * h)

    coarse, fine = central(1e-5), central(1e-6)
    np.testing.assert_allclose(fine, coarse, rtol=1e-5, atol=1e-6 * max(abs(float(loss)), 1.0))


# --- exact tabular analysis --------------------------------------------------------------------------------


def numpy_analysis(P, r, rho0, gamma, pi):
    """Values, advantages and occupancy of a finite MDP by numpy float64 linear solves."""
    S = len(rho0)
    P_pi = np.einsum("sa,sat->st", pi, P)
    v = np.linalg.solve(np.eye(S) - gamma * P_pi, (pi * r).sum(-1))
    q = r + gamma * P @ v
    d = np.linalg.solve((np.eye(S) - gamma * P_pi).T, (1 - gamma) * rho0)
    return v, q, q - v[:, None], d


@jax.jit
def polygrad_tabular(mdp, pi, pi_new, logits):
    """Every exact tabular quantity, in one compiled program (much faster than op by op)."""
    terms = tabular.cpi_terms(mdp, pi, pi_new)
    return {
        "v": tabular.state_values(mdp, pi),
        "q": tabular.action_values(mdp, pi),
        "adv": tabular.advantages(mdp, pi),
        "d": tabular.state_occupancy(mdp, pi),
        "d_sa": tabular.state_action_occupancy(mdp, pi),
        "j": tabular.expected_return(mdp, pi),
        "expected_adv": tabular.expected_advantage_under(mdp, pi, pi_new),
        "pdl": tabular.performance_difference(mdp, pi, pi_new),
        "surrogate": tabular.surrogate(mdp, pi, pi_new),
        "dsp": tabular.distribution_shift_penalty(mdp, pi, pi_new),
        "gain": terms.gain,
        "epsilon": terms.epsilon,
        "mixture": tabular.mixture_policy(pi, pi_new, 0.3),
        "bound": tabular.cpi_lower_bound(mdp, pi, pi_new, 0.3),
        "alpha": tabular.cpi_step_size(terms.gain, terms.epsilon, mdp.gamma),
        "gradient_occupancy": tabular.softmax_policy_gradient_from_occupancy(mdp, logits),
        "gradient_autodiff": tabular.softmax_policy_gradient(mdp, logits),
        "fisher": tabular.softmax_fisher_matrix(mdp, logits),
        "natural": tabular.softmax_natural_gradient(mdp, logits),
        "natural_damped": tabular.softmax_natural_gradient(mdp, logits, damping=0.1),
        "cpi": tabular.conservative_policy_iteration(mdp, pi, 3)[1],
    }


def test_tabular_functions():
    num_states, num_actions, gamma = 5, 3, 0.9
    mdp = tabular_envs.random_mdp(jax.random.PRNGKey(0), num_states, num_actions, gamma)
    assert mdp.P.dtype == mdp.r.dtype == mdp.gamma.dtype == jnp.float64
    P, r, rho0 = (np.asarray(x) for x in (mdp.P, mdp.r, mdp.rho0))
    g = rng(6)
    logits = g.normal(size=(num_states, num_actions))
    pi = np.exp(np_log_softmax(logits))
    pi_new = g.dirichlet(np.ones(num_actions), size=num_states)
    out = polygrad_tabular(mdp, jnp.asarray(pi), jnp.asarray(pi_new), jnp.asarray(logits))

    v, q, adv, d = numpy_analysis(P, r, rho0, gamma, pi)
    _, _, _, d_new = numpy_analysis(P, r, rho0, gamma, pi_new)
    j = rho0 @ v
    close(out["v"], v)
    close(out["q"], q)
    close(out["adv"], adv)
    close(out["d"], d)
    close(out["d_sa"], d[:, None] * pi)
    close(out["j"], j)
    expected_adv = (pi_new * adv).sum(-1)
    close(out["expected_adv"], expected_adv)
    close(out["pdl"], d_new @ expected_adv / (1 - gamma))
    gain = d @ expected_adv / (1 - gamma)
    close(out["surrogate"], j + gain)
    close(out["dsp"], (d_new - d) @ expected_adv / (1 - gamma))
    epsilon = np.abs(expected_adv).max()
    close(out["gain"], gain)
    close(out["epsilon"], epsilon)
    close(out["mixture"], 0.7 * pi + 0.3 * pi_new)
    coef = 2 * gamma / (1 - gamma) ** 2
    close(out["bound"], j + 0.3 * gain - coef * epsilon * 0.09)
    close(out["alpha"], np.clip((1 - gamma) ** 2 / (4 * gamma) * gain / epsilon, 0.0, 1.0))
    close(tabular.cpi_step_size(0.2, 1.5, 0.9), min(1.0, (1 - 0.9) ** 2 / (4 * 0.9) * 0.2 / 1.5))

    gradient = d[:, None] * pi * adv / (1 - gamma)  # eq. 36 for a tabular softmax
    close(out["gradient_occupancy"], gradient)
    close(out["gradient_autodiff"], gradient)
    fisher = np.zeros((num_states * num_actions,) * 2)
    for s in range(num_states):
        block = slice(s * num_actions, (s + 1) * num_actions)
        fisher[block, block] = d[s] * (np.diag(pi[s]) - np.outer(pi[s], pi[s]))
    close(out["fisher"], fisher)
    close(out["natural"], (adv - adv.mean(-1, keepdims=True)) / (1 - gamma))
    damped = np.linalg.solve(fisher + 0.1 * np.eye(len(fisher)), gradient.reshape(-1)).reshape(pi.shape)
    close(out["natural_damped"], damped)
    for field in out["cpi"]:
        assert field.dtype == jnp.float64


def test_example1_in_float64():
    """003 section 4.1.1 closed forms, exact in float64 (float32 would be off by ~1e-7 relative)."""
    gamma, penalty, eta, eta2 = 0.9, 100.0, 1e-4, 1e-3
    mdp, pi, pi_new = tabular_envs.distribution_shift_example(gamma, penalty, eta, eta2)
    assert mdp.P.dtype == pi.dtype == pi_new.dtype == jnp.float64
    v_s1 = 1 - eta2 * (1 + penalty)

    @jax.jit
    def example(m, a, b):
        return tabular.expected_return(m, a), tabular.expected_return(m, b), tabular.surrogate(m, a, b)

    j_old, j_new, surrogate = example(mdp, pi, pi_new)
    close(j_old, eta * gamma * v_s1)
    close(j_new, gamma * -penalty)
    close(surrogate - j_old, gamma * ((1 - eta) * v_s1 - eta * (1 + penalty) * (1 - eta2)))
    expected_return = jax.jit(tabular.expected_return)
    bandit = tabular_envs.contextual_bandit([[1.0, 0.0], [0.0, 2.0]], [0.25, 0.75])
    close(expected_return(bandit, jnp.asarray([[0.5, 0.5], [0.1, 0.9]])), 0.25 * 0.5 + 0.75 * 1.8)
    chain = tabular_envs.importance_sampling_chain(5, 0.95)
    close(expected_return(chain, tabular_envs.chain_policy(5, 0.3)), 0.95**5)
    assert tabular_envs.random_contextual_bandit(jax.random.PRNGKey(1), 3, 2).r.dtype == jnp.float64


# --- trust region -----------------------------------------------------------------------------------------


def spd(seed, n):
    q, _ = np.linalg.qr(rng(seed).normal(size=(n, n)))
    return (q * np.linspace(1.0, 10.0, n)[None, :]) @ q.T


def test_conjugate_gradient_and_npg_step():
    matrix, b = spd(7, 6), rng(8).normal(size=6)
    x, metrics = trust_region.conjugate_gradient(lambda v: jnp.asarray(matrix) @ v, jnp.asarray(b), 6, 0.0)
    close(x, np.linalg.solve(matrix, b), rtol=1e-11)
    assert metrics["cg_residual"].dtype == jnp.float64

    # Linear surrogate g.theta and quadratic KL theta^T F theta / 2 around theta_old = 0: the step is
    # beta s with s = (F + damping I)^{-1} g and beta = sqrt(2 delta / s^T (F + damping I) s) (003 eq.
    # 73-74). The damping keeps the KL reached strictly below delta, so TRPO accepts the full step.
    fisher = jnp.asarray(matrix)
    gradient = jnp.asarray(b)
    config = trust_region.TrustRegionConfig(max_kl=0.01, cg_iterations=6, cg_residual_tol=0.0, damping=0.1)
    params = {"theta": jnp.zeros(6)}

    def surrogate_fn(p):
        return gradient @ p["theta"]

    def kl_fn(p):
        return 0.5 * p["theta"] @ fisher @ p["theta"]

    direction = np.linalg.solve(matrix + 0.1 * np.eye(6), b)
    step = np.sqrt(2 * 0.01 / (b @ direction)) * direction
    for step_fn in (trust_region.natural_policy_gradient_step, trust_region.trpo_step):
        new_params, metrics = step_fn(surrogate_fn, kl_fn, params, config)
        close(new_params["theta"], step, rtol=1e-11)
        for name, value in metrics.items():
            assert value.dtype == jnp.float64, name
        close(metrics["kl"], 0.5 * step @ matrix @ step, rtol=1e-11)
        close(metrics["actual_improvement"], b @ step, rtol=1e-11)
