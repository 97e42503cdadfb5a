"""Group-relative advantages: closed forms, conventions, degenerate groups."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from polygrad import advantages as adv


def test_group_normalized_by_hand():
    r = jnp.array([[1.0, 0.0, 0.0, 1.0]])  # mean 0.5, population std 0.5, sample std 0.57735
    np.testing.assert_allclose(
        adv.group_normalized_advantages(r, eps=0.0), [[1.0, -1.0, -1.0, 1.0]], rtol=1e-6
    )
    trl = adv.group_normalized_advantages(r, eps=1e-4, ddof=1)
    np.testing.assert_allclose(trl, np.array([[0.5, -0.5, -0.5, 0.5]]) / (np.sqrt(1 / 3) + 1e-4), rtol=1e-6)
    eq90 = adv.group_normalized_advantages(r, eps=1e-2, eps_in_sqrt=True)
    np.testing.assert_allclose(eq90, np.array([[0.5, -0.5, -0.5, 0.5]]) / np.sqrt(0.25 + 1e-2), rtol=1e-6)


def test_other_modes_by_hand():
    r = jnp.array([[3.0, 1.0, 2.0], [0.0, 0.0, 3.0]])
    np.testing.assert_allclose(adv.group_centered_advantages(r), [[1, -1, 0], [-1, -1, 2]], atol=1e-6)
    np.testing.assert_allclose(adv.leave_one_out_advantages(r), [[1.5, -1.5, 0], [-1.5, -1.5, 3]], atol=1e-6)
    batch_std = np.sqrt(np.mean(np.array([1, 1, 0, 1, 1, 4.0])))
    np.testing.assert_allclose(
        adv.batch_normalized_advantages(r, eps=0.0),
        np.array([[1, -1, 0], [-1, -1, 2]]) / batch_std,
        rtol=1e-6,
    )


def test_constant_groups_and_singletons_are_exactly_zero():
    r = jnp.array([[0.1, 0.1, 0.1], [7.0, 7.0, 7.0], [0.0, 1.0, 0.0]])
    for fn in (
        adv.group_normalized_advantages,
        adv.group_centered_advantages,
        adv.batch_normalized_advantages,
        adv.leave_one_out_advantages,
    ):
        out = fn(r)
        assert jnp.all(out[:2] == 0.0), fn.__name__
        assert jnp.all(jnp.isfinite(out))
        single = fn(jnp.array([[1.0], [2.0]]))
        assert jnp.all(single == 0.0), fn.__name__
    assert jnp.all(adv.batch_normalized_advantages(jnp.ones((3, 4))) == 0.0)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(2, 6), st.integers(0, 2**31 - 1))
def test_groups_sum_to_zero_and_leave_one_out_matches_definition(num_prompts, group_size, seed):
    r = jax.random.normal(jax.random.PRNGKey(seed), (num_prompts, group_size))
    for fn in (adv.group_normalized_advantages, adv.group_centered_advantages, adv.leave_one_out_advantages):
        np.testing.assert_allclose(jnp.sum(fn(r), axis=1), 0.0, atol=1e-4)
    rn = np.asarray(r)
    loo = np.stack([rn[:, i] - np.delete(rn, i, axis=1).mean(axis=1) for i in range(group_size)], axis=1)
    np.testing.assert_allclose(adv.leave_one_out_advantages(r), loo, rtol=1e-4, atol=1e-5)


def test_jit_vmap_and_gradients(maybe_jit):
    r = jax.random.normal(jax.random.PRNGKey(0), (5, 4))
    fn = maybe_jit(adv.group_normalized_advantages)
    np.testing.assert_allclose(
        fn(r), jax.vmap(lambda x: adv.group_normalized_advantages(x[None])[0])(r), rtol=1e-5
    )
    grad = jax.grad(lambda x: jnp.sum(adv.group_normalized_advantages(x) * jnp.arange(4.0)))(r)
    assert jnp.all(jnp.isfinite(grad))
