"""Group-relative advantages: closed forms, conventions, degenerate groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polygrad import advantages as adv


@pytest.fixture(autouse=True, scope="module")
def _no_implicit_rank_promotion():
    """Every test here (and every module fixture) runs with jax_numpy_rank_promotion="raise"."""
    with jax.numpy_rank_promotion("raise"):
        yield


def test_group_normalized_by_hand(maybe_jit):
    r = jnp.array([[1.0, 0.0, 0.0, 1.0]])  # mean 0.5, population std 0.5, sample std 0.57735
    group_normalized = maybe_jit(adv.group_normalized_advantages, static_argnames=("eps_in_sqrt", "ddof"))
    np.testing.assert_allclose(group_normalized(r, eps=0.0), [[1.0, -1.0, -1.0, 1.0]], rtol=1e-6)
    trl = group_normalized(r, eps=1e-4, ddof=1)
    np.testing.assert_allclose(trl, np.array([[0.5, -0.5, -0.5, 0.5]]) / (np.sqrt(1 / 3) + 1e-4), rtol=1e-6)
    eq90 = group_normalized(r, eps=1e-2, eps_in_sqrt=True)
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


# One compiled program per shape for all three (eager dispatch compiles every primitive per shape; jit ==
# eager is checked by test_jit_and_vmap_equal_eager).
ROW_WISE = (adv.group_normalized_advantages, adv.group_centered_advantages, adv.leave_one_out_advantages)
all_row_wise = jax.jit(lambda r: tuple(fn(r) for fn in ROW_WISE))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(2, 6), st.integers(0, 2**31 - 1))
def test_groups_sum_to_zero_and_leave_one_out_matches_definition(num_prompts, group_size, seed):
    r = jax.random.normal(jax.random.PRNGKey(seed), (num_prompts, group_size))
    outputs = all_row_wise(r)
    for out in outputs:
        np.testing.assert_allclose(jnp.sum(out, axis=1), 0.0, atol=1e-4)
    rn = np.asarray(r)
    loo = np.stack([rn[:, i] - np.delete(rn, i, axis=1).mean(axis=1) for i in range(group_size)], axis=1)
    np.testing.assert_allclose(outputs[2], loo, rtol=1e-4, atol=1e-5)


ALL_MODES = (
    adv.group_normalized_advantages,
    adv.group_centered_advantages,
    adv.batch_normalized_advantages,
    adv.leave_one_out_advantages,
)


@pytest.mark.parametrize("fn", ALL_MODES, ids=lambda fn: fn.__name__)
def test_jit_and_vmap_equal_eager(fn):
    r = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 4))  # 3 batches of 5 prompts x 4 responses
    eager = np.stack([np.asarray(fn(batch)) for batch in r])
    np.testing.assert_allclose(jax.jit(fn)(r[0]), eager[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(jax.vmap(fn)(r), eager, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(jax.jit(jax.vmap(fn))(r), eager, rtol=1e-6, atol=1e-7)
    if fn is not adv.batch_normalized_advantages:  # the others act on each prompt's group alone
        rows = jax.vmap(lambda row: fn(row[None])[0])(r[0])
        np.testing.assert_allclose(rows, eager[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fn", ALL_MODES, ids=lambda fn: fn.__name__)
def test_gradients_match_finite_differences(fn):
    """d/dr sum(c * A(r)) against central differences, in float64 so that h can be small."""
    with jax.enable_x64(True):
        r = jax.random.normal(jax.random.PRNGKey(1), (2, 4), jnp.float64)
        c = jax.random.normal(jax.random.PRNGKey(2), (2, 4), jnp.float64)

        def objective(x):
            return jnp.sum(c * fn(x))

        grad = np.asarray(jax.grad(objective)(r))
        h = 1e-6
        basis = np.eye(r.size).reshape(r.size, *r.shape)
        central = np.array([(objective(r + h * e) - objective(r - h * e)) / (2 * h) for e in basis])
        assert grad.dtype == np.float64
        np.testing.assert_allclose(grad.reshape(-1), central, rtol=1e-6, atol=1e-8)
