"""Control losses against hand-computed values, their gradients, and the adaptive-beta rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polygrad import losses

LOGP_OLD = jnp.log(jnp.array([0.5, 0.5, 0.25, 0.8]))
LOGP_NEW = jnp.log(jnp.array([0.75, 0.3, 0.25, 0.4]))  # ratios 1.5, 0.6, 1.0, 0.5
ADV = jnp.array([2.0, 1.0, -1.0, -3.0])
ENT = jnp.array([0.5, 0.7, 0.6, 0.2])
VALUES = jnp.array([1.0, 0.0, 2.0, -1.0])
TARGETS = jnp.array([1.5, 1.0, 1.0, -1.0])
OLD_VALUES = jnp.array([0.5, 0.5, 2.0, -1.5])


def test_ppo_clip_loss_matches_hand_computation(maybe_jit):
    loss, m = maybe_jit(
        lambda *a: losses.ppo_clip_loss(
            *a, clip_eps=0.2, value_clip_eps=0.3, value_coef=0.5, entropy_coef=0.1
        )
    )(LOGP_NEW, LOGP_OLD, ADV, ENT, VALUES, TARGETS, OLD_VALUES)
    # min(r A, clip(r) A): r = 1.5, A = 2 -> min(3, 2.4); r = 0.6, A = 1 -> min(0.6, 0.8);
    # r = 1, A = -1 -> -1; r = 0.5, A = -3 -> min(-1.5, -2.4).
    surrogate = np.array([2.4, 0.6, -1.0, -2.4])
    # clipped values: 0.5 + clip(0.5) = 0.8; 0.5 + clip(-0.5) = 0.2; 2; -1.5 + 0.3 = -1.2.
    unclipped = (np.array(VALUES) - np.array(TARGETS)) ** 2  # .25, 1, 1, 0
    clipped = (np.array([0.8, 0.2, 2.0, -1.2]) - np.array(TARGETS)) ** 2  # .49, .64, 1, .04
    v_loss = 0.5 * np.mean(np.maximum(unclipped, clipped))
    expected = -surrogate.mean() + 0.5 * v_loss - 0.1 * np.mean(ENT)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(m["policy_loss"], -surrogate.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["value_loss"], v_loss, rtol=1e-5)
    np.testing.assert_allclose(m["clip_fraction"], 0.75)  # |r - 1| > 0.2 for 1.5, 0.6, 0.5
    r = np.array([1.5, 0.6, 1.0, 0.5])
    np.testing.assert_allclose(m["approx_kl"], np.mean(r - 1 - np.log(r)), rtol=1e-5)
    np.testing.assert_allclose(m["entropy"], np.mean(ENT), rtol=1e-6)


def test_ppo_clip_gradient_vanishes_only_where_clipping_binds():
    grad = jax.grad(lambda lp: losses.ppo_clip_loss(lp, LOGP_OLD, ADV, ENT, VALUES, TARGETS)[0])(LOGP_NEW)
    # d/dlogp of -min(rA, clip(r)A)/N is -r A / N where the unclipped term is the minimum, else 0.
    # Samples 0 and 3 are clipped (gradient 0); 1: -0.6 / 4; 2: r = 1 inside the range, -(1 * -1) / 4.
    np.testing.assert_allclose(grad, np.array([0.0, -0.15, 0.25, 0.0]), rtol=1e-5, atol=1e-7)


def test_value_loss_unclipped_and_requires_old_values():
    np.testing.assert_allclose(losses.value_loss(VALUES, TARGETS), 0.5 * np.mean([0.25, 1, 1, 0]), rtol=1e-6)
    with pytest.raises(ValueError, match="old_values"):
        losses.value_loss(VALUES, TARGETS, clip_eps=0.2)


def test_reinforce_without_baseline_gradient_is_minus_return_over_n(maybe_jit):
    returns = jnp.array([3.0, 2.0, 1.0, 0.5])
    fn = maybe_jit(lambda lp: losses.reinforce_loss(lp, returns, ENT)[0])
    np.testing.assert_allclose(fn(LOGP_NEW), -np.mean(np.array(LOGP_NEW) * np.array(returns)), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(fn)(LOGP_NEW), -np.array(returns) / 4, rtol=1e-6)


def test_reinforce_with_baseline_and_mask():
    returns = jnp.array([3.0, 2.0, 1.0, 0.5])
    mask = jnp.array([1.0, 1.0, 1.0, 0.0])

    def fn(lp, v):
        return losses.reinforce_loss(lp, returns, ENT, v, mask, value_coef=0.5)

    (loss, m), (g_lp, g_v) = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(LOGP_NEW, VALUES)
    adv = np.array(returns - VALUES)
    # The policy term uses G - V with V's gradient stopped; V is fitted by 0.5 (V - G)^2; sample 3 masked.
    np.testing.assert_allclose(g_lp, -adv * np.array(mask) / 3, rtol=1e-6)
    np.testing.assert_allclose(
        g_v, 0.5 * (np.array(VALUES) - np.array(returns)) * np.array(mask) / 3, rtol=1e-6
    )
    np.testing.assert_allclose(m["value_loss"], 0.5 * np.sum((adv**2)[:3]) / 3, rtol=1e-6)
    np.testing.assert_allclose(
        loss, -np.sum((np.array(LOGP_NEW) * adv)[:3]) / 3 + 0.5 * m["value_loss"], rtol=1e-5
    )
    assert m["approx_kl"] == 0 and m["clip_fraction"] == 0


def test_reinforce_normalized_advantages_are_standardised():
    returns = jnp.array([3.0, 2.0, 1.0, 0.5])
    grad = jax.grad(lambda lp: losses.reinforce_loss(lp, returns, ENT, normalize=True)[0])(LOGP_NEW)
    a = np.array(returns)
    z = (a - a.mean()) / (a.std() + 1e-8)
    np.testing.assert_allclose(grad, -z / 4, rtol=1e-5)


def test_a2c_loss_matches_hand_computation(maybe_jit):
    loss, m = maybe_jit(lambda *a: losses.a2c_loss(*a, value_coef=0.25, entropy_coef=0.01))(
        LOGP_NEW, ADV, ENT, VALUES, TARGETS
    )
    expected = (
        -np.mean(np.array(LOGP_NEW) * np.array(ADV))
        + 0.25 * 0.5 * np.mean([0.25, 1, 1, 0])
        - 0.01 * np.mean(ENT)
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert set(m) >= {
        "loss",
        "policy_loss",
        "value_loss",
        "entropy",
        "approx_kl",
        "clip_fraction",
        "explained_variance",
    }


def test_kl_penalty_loss_matches_hand_computation():
    kl = jnp.array([0.1, 0.2, 0.0, 0.4])
    loss, m = losses.ppo_kl_penalty_loss(
        LOGP_NEW, LOGP_OLD, ADV, kl, ENT, VALUES, TARGETS, beta=2.0, value_coef=0.0, entropy_coef=0.0
    )
    r = np.array([1.5, 0.6, 1.0, 0.5])
    np.testing.assert_allclose(loss, -np.mean(r * np.array(ADV) - 2.0 * np.array(kl)), rtol=1e-5)
    np.testing.assert_allclose(m["kl"], np.mean(kl), rtol=1e-6)
    assert m["beta"] == 2.0
    # The penalty's gradient reaches the KL term; beta itself is not differentiated.
    g = jax.grad(
        lambda k: losses.ppo_kl_penalty_loss(LOGP_NEW, LOGP_OLD, ADV, k, ENT, VALUES, TARGETS, 2.0)[0]
    )(kl)
    np.testing.assert_allclose(g, np.full(4, 2.0 / 4), rtol=1e-6)


@pytest.mark.parametrize(
    ("kl", "expected"), [(0.001, 0.5), (0.0066, 0.5), (0.007, 1.0), (0.015, 1.0), (0.0151, 2.0), (1.0, 2.0)]
)
def test_adaptive_kl_beta_paper_rule(kl, expected):
    # target 0.01, threshold 1.5, factor 2: halve below 0.00667, double above 0.015.
    np.testing.assert_allclose(losses.adaptive_kl_beta(1.0, kl, 0.01), expected)


def test_adaptive_kl_beta_parameters_and_errors():
    np.testing.assert_allclose(losses.adaptive_kl_beta(1.0, 0.004, 0.01, threshold=2.0, factor=3.0), 1 / 3)
    np.testing.assert_allclose(losses.adaptive_kl_beta(1.0, 0.006, 0.01, threshold=2.0, factor=3.0), 1.0)
    np.testing.assert_allclose(losses.adaptive_kl_beta(1.0, 0.021, 0.01, threshold=2.0, factor=3.0), 3.0)
    with pytest.raises(ValueError):
        losses.adaptive_kl_beta(1.0, 0.01, 0.01, threshold=1.0)
    # beta stays inside [min_beta, max_beta] however long the KL stays off target.
    np.testing.assert_allclose(losses.adaptive_kl_beta(1.5e-6, 0.0, 0.01), 1e-6)
    np.testing.assert_allclose(losses.adaptive_kl_beta(8e5, 1.0, 0.01), 1e6)


def test_explained_variance_cases():
    targets = jnp.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(losses.explained_variance(targets, targets), 1.0)
    np.testing.assert_allclose(losses.explained_variance(jnp.full(4, 2.5), targets), 0.0, atol=1e-7)
    np.testing.assert_allclose(
        losses.explained_variance(targets + 1.0, targets), 1.0
    )  # a bias is not variance
    values = jnp.array([1.0, 3.0, 2.0, 5.0])
    expected = 1 - np.var(np.array(targets - values)) / np.var(np.array(targets))
    np.testing.assert_allclose(losses.explained_variance(values, targets), expected, rtol=1e-6)
    assert losses.explained_variance(values, jnp.ones(4)) == 0.0  # constant targets: defined, not NaN


def test_masked_mean_and_normalisation_degenerate_inputs():
    x = jnp.array([1.0, 2.0, 3.0])
    assert losses.masked_mean(x, jnp.zeros(3)) == 0.0
    np.testing.assert_allclose(losses.masked_mean(x, jnp.array([1.0, 0.0, 1.0])), 2.0)
    np.testing.assert_array_equal(losses.normalize_advantages(jnp.full(5, 3.0)), np.zeros(5))
