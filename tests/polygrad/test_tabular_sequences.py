"""Tabular sequence models: enumeration, exact expectations and the expected update of polygrad's losses,
checked against autoregressive sampling, direct gradients of the losses, closed forms and float64
identities."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polygrad import losses
from polygrad import tabular_sequences as ts
from polygrad.estimators import advantages as advantages_lib

EOS, A = 0, 1


def answer_first(space):
    return (space.tokens[:, 0] == A).astype(jnp.float32)


def random_logits(space, seed, scale=1.0, contexts=None):
    shape = (space.num_prefixes, space.num_tokens) if contexts is None else (
        contexts, space.num_prefixes, space.num_tokens)
    return jnp.asarray(np.random.default_rng(seed).normal(scale=scale, size=shape), jnp.float32)


@pytest.fixture(scope="module")
def space():
    return ts.enumerate_responses(3, 3)  # EOS, A, B; L = 3: S = 7 prefixes, R = 15 responses


# ----------------------------------------------------------------------------------------------------------
# Enumeration.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens,max_length,eos", [(3, 3, 0), (4, 2, 2), (2, 4, None), (3, 1, 0)])
def test_enumeration_layout(num_tokens, max_length, eos):
    space = ts.enumerate_responses(num_tokens, max_length, eos)
    n = num_tokens - (eos is not None)
    S = sum(n**k for k in range(max_length))
    assert space.num_prefixes == S
    assert space.num_responses == n**max_length + (S if eos is not None else 0)
    tokens, mask, prefixes = (np.asarray(x) for x in (space.tokens, space.mask, space.prefixes))
    lengths, terminated = np.asarray(space.lengths), np.asarray(space.terminated)
    np.testing.assert_array_equal(mask.sum(1), lengths)
    # Every response is distinct, EOS appears exactly once at the end of the terminated ones.
    assert len({tuple(t[m]) for t, m in zip(tokens, mask, strict=True)}) == space.num_responses
    for r in range(space.num_responses):
        body = tokens[r, : lengths[r]]
        if terminated[r]:
            assert body[-1] == eos and eos not in body[:-1]
            assert ts.prefix_index(space, tuple(body[:-1])) == r  # a terminated response has its prefix's id
        else:
            assert lengths[r] == max_length and (eos is None or eos not in body)
        for t in range(lengths[r]):  # the emitting prefix is the parent chain of the tokens before t
            assert prefixes[r, t] == ts.prefix_index(space, tuple(body[:t]))
            if t > 0:
                assert space.prefix_parent[prefixes[r, t]] == prefixes[r, t - 1]
                assert space.prefix_token[prefixes[r, t]] == body[t - 1]


def test_probabilities_sum_to_one_and_prefix_probs(space):
    maybe_jit = jax.jit
    logits = random_logits(space, 0, contexts=2)
    probs = np.asarray(maybe_jit(ts.response_probs)(space, logits))
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    # P(reach s) = sum of the probabilities of the responses that emit a token from s.
    emits = np.zeros((space.num_responses, space.num_prefixes))
    for r in range(space.num_responses):
        emits[r, np.asarray(space.prefixes)[r, np.asarray(space.mask)[r]]] = 1
    reach = maybe_jit(ts.prefix_probs)(space, logits)
    np.testing.assert_allclose(reach, probs @ emits, rtol=1e-5, atol=1e-7)
    # Chain rule of the KL: KL(pi || ref) = sum_s P(s) KL(pi(.|s) || ref(.|s)).
    ref = random_logits(space, 1, contexts=2)
    per_state = jnp.sum(jax.nn.softmax(logits) * (jax.nn.log_softmax(logits) - jax.nn.log_softmax(ref)), -1)
    np.testing.assert_allclose(maybe_jit(ts.sequence_kl)(space, logits, ref), jnp.sum(reach * per_state, -1),
                               rtol=1e-5)


def test_enumerate_groups_multiplicities():
    R, G = 5, 4
    groups = ts.enumerate_groups(R, G)
    assert groups.indices.shape == (math.comb(R + G - 1, G), G) == (ts.num_multisets(R, G), G)
    assert np.all(np.diff(groups.indices, axis=1) >= 0)
    assert len({tuple(row) for row in groups.indices}) == len(groups.indices)
    np.testing.assert_allclose(np.exp(groups.log_multiplicity).sum(), R**G)  # all ordered tuples
    # Group probabilities of any response distribution sum to one.
    probs = np.random.default_rng(0).dirichlet(np.ones(R))
    weights = np.exp(groups.log_multiplicity) * np.prod(probs[groups.indices], axis=1)
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="max_groups"):
        ts.enumerate_groups(63, 8)


# ----------------------------------------------------------------------------------------------------------
# Exact quantities against autoregressive sampling.
# ----------------------------------------------------------------------------------------------------------


def test_exact_quantities_match_autoregressive_sampling(space):
    logits = random_logits(space, 2)
    rewards = answer_first(space)
    n = 200_000
    ids = np.asarray(jax.jit(ts.sample_responses, static_argnums=3)(jax.random.key(0), space, logits, n))
    probs = np.asarray(ts.response_probs(space, logits))
    counts = np.bincount(ids, minlength=space.num_responses) / n
    z = (counts - probs) / np.sqrt(probs * (1 - probs) / n)
    assert np.max(np.abs(z)) < 4.5
    lengths, correct = np.asarray(space.lengths, float)[ids], np.asarray(rewards)[ids] > 0.5

    @jax.jit
    def exact(logits, rewards):
        return (ts.expected_reward(space, logits, rewards), ts.expected_length(space, logits),
                ts.expected_length(space, logits, rewards > 0.5),
                ts.expected_length(space, logits, rewards < 0.5),
                ts.sequence_entropy(space, logits), ts.response_log_probs(space, logits))

    *values, log_probs = exact(logits, rewards)
    samples = (correct.astype(float), lengths, lengths[correct], lengths[~correct],
               -np.asarray(log_probs)[ids])
    for value, sample in zip(values, samples, strict=True):
        assert abs(float(value) - sample.mean()) / (sample.std() / np.sqrt(len(sample))) < 4


def test_first_order_change_matches_a_finite_difference(space):
    with jax.enable_x64(True):
        logits = random_logits(space, 3).astype(jnp.float64)
        rewards = answer_first(space).astype(jnp.float64)

        def stat(z):
            return ts.expected_length(space, z, rewards < 0.5)

        @jax.jit
        def check(logits, rewards):
            update = ts.expected_update(space, logits, rewards, losses.PRESETS["dapo"], 3)
            eps = 1e-4
            finite = (stat(logits - eps * update) - stat(logits + eps * update)) / (2 * eps)
            return ts.first_order_change(stat, logits, update), finite

        analytic, finite = check(logits, rewards)
        assert analytic.dtype == jnp.float64 and abs(float(analytic)) > 1e-4
        np.testing.assert_allclose(analytic, finite, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# The expected update against direct gradients of polygrad's losses on sampled groups.
# ----------------------------------------------------------------------------------------------------------


def sampled_loss_gradients(key, space, logits, logits_old, logits_ref, rewards, config, group_size,
                           num_groups):
    """Per-group grad_logits of `losses.policy_loss` for groups sampled token by token from logits_old,
    with log-probs gathered straight from log_softmax (independent of the enumeration's code)."""
    ids = ts.sample_responses(key, space, logits_old, num_groups * group_size).reshape(num_groups, group_size)

    def gather(z, pre, tok, msk):
        return jnp.where(msk, jax.nn.log_softmax(z)[pre, tok], 0.0)

    def one(idx):
        pre, tok, msk = space.prefixes[idx], space.tokens[idx], space.mask[idx]
        adv = losses.group_advantages(config, rewards[idx][None, :])
        ref = None if logits_ref is None else gather(logits_ref, pre, tok, msk)

        def loss(z):
            log_pi = jax.nn.log_softmax(z)
            entropy = jnp.where(msk, -jnp.sum(jnp.exp(log_pi) * log_pi, -1)[pre], 0.0)
            logp_new, logp_old = gather(z, pre, tok, msk), gather(logits_old, pre, tok, msk)
            return losses.policy_loss(config, logp_new, logp_old, adv, msk.astype(z.dtype), ref, entropy)[0]

        return jax.grad(loss)(logits)

    return jax.lax.map(one, ids, batch_size=4096)


CONFIGS = {  # between them: hard clip, KL to a reference, entropy bonus, token mean, sequence ratio
    "grpo_off_policy_kl_entropy": losses.resolve("grpo", entropy_coef=0.05),
    "dapo": losses.resolve("dapo"),
    "gspo_no_gate": losses.resolve("gspo", gate=losses.NoGate()),
}


def test_expected_update_matches_sampled_loss_gradients(space):
    G, n = 3, 30_000
    logits, rewards = random_logits(space, 4), answer_first(space)
    logits_old = logits + random_logits(space, 5, scale=0.3)
    logits_ref = logits + random_logits(space, 6, scale=0.5)

    @jax.jit
    def both(key, logits, logits_old, logits_ref, rewards):
        out = {}
        for name, config in CONFIGS.items():
            exact = ts.expected_update(space, logits, rewards, config, G, logits_old=logits_old,
                                       logits_ref=logits_ref)
            grads = sampled_loss_gradients(key, space, logits, logits_old, logits_ref, rewards, config, G, n)
            out[name] = (exact, grads.mean(0), grads.std(0) / np.sqrt(n))
        return out

    results = both(jax.random.key(1), logits, logits_old, logits_ref, rewards)
    for name, (exact, mean, stderr) in results.items():
        exact, mean, stderr = np.asarray(exact), np.asarray(mean), np.asarray(stderr)
        varying = stderr > 1e-7
        assert varying.sum() >= 10, name  # the test has coordinates to compare
        assert np.max(np.abs(mean - exact)[varying] / stderr[varying]) < 4.5, name
        np.testing.assert_allclose(mean[~varying], exact[~varying], atol=1e-6, err_msg=name)
        assert np.max(np.abs(exact)) > 10 * np.max(stderr), name  # the update is resolved, not noise


def test_moments_and_monte_carlo_agree_with_the_exact_mean(space):
    """update_moments (chain rule written out per group) and sampled_update against expected_update
    (one pull-back through jax.vjp), off-policy, with KL and entropy terms, two contexts."""
    config, G, n = losses.resolve("grpo", entropy_coef=0.05), 3, 40_000
    logits, rewards = random_logits(space, 7, contexts=2), jnp.stack([answer_first(space)] * 2)
    logits_old = logits + random_logits(space, 8, scale=0.3, contexts=2)
    logits_ref = logits + random_logits(space, 9, scale=0.5, contexts=2)

    @jax.jit
    def compute(key, logits, logits_old, logits_ref, rewards):
        kw = dict(logits_old=logits_old, logits_ref=logits_ref)
        stat = jax.grad(lambda z: jnp.sum(ts.expected_length(space, z, rewards < 0.5)))(logits)
        return (ts.expected_update(space, logits, rewards, config, G, **kw),
                ts.update_moments(space, logits, rewards, config, G, **kw), stat,
                ts.sampled_update(key, space, logits, rewards, config, G, n, directions=stat[None], **kw))

    mean, moments, stat, sampled = compute(jax.random.key(2), logits, logits_old, logits_ref, rewards)
    np.testing.assert_allclose(moments.mean, mean, atol=2e-7, rtol=1e-5)
    varying = sampled.stderr > 1e-7
    assert np.max(np.abs(sampled.mean - mean)[varying] / sampled.stderr[varying]) < 4.5
    # The per-coordinate variance of one group's gradient: exact against the sampled one.
    exact_var = np.asarray(moments.second_moment - moments.mean**2)
    sampled_var = np.asarray(sampled.stderr) ** 2 * (n - 1)
    np.testing.assert_allclose(sampled_var.sum((-2, -1)), exact_var.sum((-2, -1)), rtol=0.04)
    # The projection on a statistic's gradient: its drift per step, with a standard error.
    projection = float(jnp.sum(stat * mean))
    assert abs(float(sampled.projection_mean[0]) - projection) < 4.5 * float(sampled.projection_stderr[0])


# ----------------------------------------------------------------------------------------------------------
# Exact identities (float64) and closed forms.
# ----------------------------------------------------------------------------------------------------------


def test_dr_grpo_expected_update_is_the_scaled_policy_gradient_float64():
    """On-policy, E[(R_i - mean R) grad log pi(y_i)] = (1 - 1/G) grad J, so Dr. GRPO's expected update is
    exactly -(G - 1) / (G L) grad J (003 eq. 98-100); GRPO's token mean is not proportional to it."""
    with jax.enable_x64(True):
        space = ts.enumerate_responses(3, 3)
        logits = jnp.asarray(np.random.default_rng(10).normal(size=(2, space.num_prefixes, 3)))
        rewards = jnp.stack([answer_first(space), (space.lengths == 2).astype(float)]).astype(jnp.float64)
        G = 3

        @jax.jit
        def compute(logits, rewards):
            grad_j = jax.grad(lambda z: jnp.sum(ts.expected_reward(space, z, rewards)))(logits)
            return (grad_j, ts.expected_update(space, logits, rewards, losses.PRESETS["dr_grpo"], G),
                    ts.expected_update(space, logits, rewards, losses.resolve("grpo", kl_coef=0.0), G))

        grad_j, update, grpo = compute(logits, rewards)
        assert logits.dtype == update.dtype == jnp.float64
        np.testing.assert_allclose(update, -(G - 1) / (G * space.max_length) * grad_j, atol=1e-14)
        cosine = jnp.sum(grpo * grad_j) / (jnp.linalg.norm(grpo) * jnp.linalg.norm(grad_j))
        assert -cosine < 0.999  # an ascent direction, but not the policy gradient's


def test_length_drift_signs_float64():
    """Reward ignores length and correct/incorrect responses share one length distribution: GRPO's token
    mean lengthens incorrect responses and shortens correct ones; Dr. GRPO's constant normaliser does not
    (exactly 0 in float64)."""
    with jax.enable_x64(True):
        space = ts.enumerate_responses(3, 4)
        logits = np.zeros((space.num_prefixes, 3))
        logits[0, EOS] = -30.0  # no empty response: p = 1/2
        logits = jnp.asarray(logits)
        rewards = answer_first(space).astype(jnp.float64)

        @jax.jit
        def drifts(logits, rewards):
            out = []
            for config in (losses.resolve("grpo", kl_coef=0.0), losses.PRESETS["dr_grpo"]):
                update = ts.expected_update(space, logits, rewards, config, 2)
                out.append([ts.first_order_change(lambda z, w=w: ts.expected_length(space, z, w), logits,
                                                  update) for w in (rewards < 0.5, rewards > 0.5)])
            return out

        (wrong, right), dr_grpo = drifts(logits, rewards)
        assert wrong > 1e-3 and right < -1e-3
        np.testing.assert_allclose(dr_grpo, 0.0, atol=1e-14)


def test_zero_signal_fraction_closed_form():
    space = ts.enumerate_responses(3, 2)
    logits = random_logits(space, 11, contexts=3)
    rewards = jnp.stack([answer_first(space)] * 3)
    sizes = (2, 5)

    @jax.jit
    def compute(logits, rewards):
        p = ts.expected_reward(space, logits, rewards)
        enumerated = [ts.zero_signal_fraction(space, logits, rewards, losses.PRESETS["grpo"], G)
                      for G in sizes]
        binomial = [ts.binary_group_statistics(p, G, advantages_lib.group_normalized_advantages).zero_signal
                    for G in sizes]
        edge = ts.binary_group_statistics(jnp.array([0.0, 1.0]), 4, advantages_lib.group_centered_advantages)
        return p, enumerated, binomial, edge

    p, enumerated, binomial, edge = compute(logits, rewards)
    for G, e, b in zip(sizes, enumerated, binomial, strict=True):
        closed = p**G + (1 - p) ** G
        np.testing.assert_allclose(e, closed, rtol=1e-5)
        np.testing.assert_allclose(b, closed, rtol=1e-5)
    # Degenerate p: every group is constant; E[A | correct] is its limit (G - 1) / G at p = 0.
    np.testing.assert_allclose(edge.zero_signal, 1.0, atol=1e-6)
    np.testing.assert_allclose(edge.mean_abs_advantage, 0.0, atol=1e-7)
    np.testing.assert_allclose(edge.weight, 0.75, rtol=1e-6)


def test_binary_group_weight_is_the_expected_update_of_a_bandit():
    """For one-token responses the expected update is -c_G(p) grad p, c_G(p) = E[A|1] - E[A|0]; for
    mean-centred advantages c_G = (G - 1) / G exactly, for std-normalised ones it grows towards p = 0, 1
    (for G >= 4; it is constant for G = 2 and 3)."""
    bandit = ts.enumerate_responses(2, 1, eos=None)
    p = np.array([0.05, 0.3, 0.5, 0.9], np.float32)
    logits = jnp.asarray(np.stack([np.log(p), np.log1p(-p)], -1)[:, None, :])
    rewards = jnp.asarray(np.tile([1.0, 0.0], (len(p), 1)), jnp.float32)
    pairs = ((advantages_lib.group_normalized_advantages, losses.resolve("grpo", kl_coef=0.0)),
             (advantages_lib.group_centered_advantages, losses.PRESETS["dr_grpo"]))

    @jax.jit
    def compute(p, logits, rewards):
        grad_p = jax.vmap(jax.grad(lambda z: jax.nn.softmax(z[0])[0]))(logits)
        return grad_p, [(ts.binary_group_statistics(p, G, estimator).weight,
                         ts.expected_update(bandit, logits, rewards, config, G))
                        for G in (3, 6) for estimator, config in pairs]

    grad_p, results = compute(jnp.asarray(p), logits, rewards)
    for weight, update in results:
        np.testing.assert_allclose(update, -weight[:, None, None] * grad_p, atol=1e-6)
    for i, G in enumerate((3, 6)):
        normalised, centred = results[2 * i][0], results[2 * i + 1][0]
        np.testing.assert_allclose(centred, (G - 1) / G, rtol=1e-5)
        if G == 3:  # every mixed group of 3 has |A| in {1/sqrt 2, sqrt 2}: c_3(p) = sqrt(2) for all p
            np.testing.assert_allclose(normalised, normalised[2], rtol=1e-5)
            np.testing.assert_allclose(normalised, np.sqrt(2.0), rtol=1e-3)  # up to the std's eps 1e-4
        else:
            assert normalised[0] > 1.05 * normalised[2] and normalised[3] > 1.05 * normalised[2]


def test_kl_estimators_expected_gradients(space):
    """k1 folded into a stop-gradient reward with a leave-one-out baseline is unbiased for grad KL(pi || ref);
    k1 in the loss has zero expected gradient; k2 in the loss is the gradient of the state-frozen KL
    sum_s sg(P(s)) KL(pi_s || ref_s), biased for L > 1."""
    logits, ref = random_logits(space, 12), random_logits(space, 13)

    @jax.jit
    def compute(logits, ref):
        grad_kl = jax.grad(lambda z: ts.sequence_kl(space, z, ref))(logits)
        seq_k1 = ts.response_log_probs(space, logits) - ts.response_log_probs(space, ref)
        rloo = ts.expected_update(space, logits, -seq_k1, losses.PRESETS["rloo"], 3)
        in_loss = [ts.expected_update(space, logits, jnp.zeros_like(seq_k1), losses.resolve(
            "grpo", aggregation="seq_mean_token_sum", kl_coef=1.0, kl_estimator=k), 2, logits_ref=ref)
                   for k in ("k1", "k2")]
        reach = jax.lax.stop_gradient(ts.prefix_probs(space, logits))
        frozen = jax.grad(lambda z: jnp.sum(reach * jnp.sum(
            jax.nn.softmax(z) * (jax.nn.log_softmax(z) - jax.nn.log_softmax(ref)), -1)))(logits)
        return grad_kl, rloo, in_loss, frozen

    grad_kl, rloo, (k1, k2), frozen = compute(logits, ref)
    np.testing.assert_allclose(rloo, grad_kl, atol=2e-6)
    np.testing.assert_allclose(k1, 0.0, atol=1e-6)
    np.testing.assert_allclose(k2, frozen, atol=2e-6)
    assert np.linalg.norm(k2 - grad_kl) > 0.05 * np.linalg.norm(grad_kl)  # biased for L > 1


def test_bad_inputs_are_refused(space):
    logits, rewards = random_logits(space, 0), answer_first(space)
    with pytest.raises(ValueError, match="logits_ref"):
        ts.expected_update(space, logits, rewards, losses.PRESETS["grpo"], 2)
    with pytest.raises(ValueError, match="rewards"):
        ts.expected_update(space, logits, rewards[:-1], losses.PRESETS["dapo"], 2)
    with pytest.raises(ValueError):
        ts.enumerate_responses(3, 0)
