"""`losses.update_reference`: fixed never moves, sync copies the policy every k updates, EMA's closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polygrad import losses, validate


def _tree(x):
    return {"w": jnp.asarray(x, jnp.float32), "b": {"c": 2.0 * jnp.asarray(x, jnp.float32)}}


def _follow(config, maybe_jit, policies, ref0):
    """The reference after each update u = 0, 1, ... with the policy `policies[u]` at its start."""
    step = maybe_jit(lambda r, p, s: losses.update_reference(config, r, p, s))
    ref, out = ref0, []
    for u, params in enumerate(policies):
        ref = step(ref, params, jnp.int32(u))
        out.append(ref)
    return out


POLICIES = [_tree(np.full(3, float(u + 1))) for u in range(7)]
REF0 = _tree(np.zeros(3))


def test_fixed_never_moves(maybe_jit):
    for ref in _follow(losses.ReferenceConfig("fixed"), maybe_jit, POLICIES, REF0):
        jax.tree.map(np.testing.assert_array_equal, ref, REF0)


@pytest.mark.parametrize("every", [1, 3])
def test_sync_equals_the_policy_every_k_updates(maybe_jit, every):
    refs = _follow(losses.ReferenceConfig("sync", every=every), maybe_jit, POLICIES, REF0)
    for u, ref in enumerate(refs):
        synced_at = u - u % every  # the last update whose start was a sync
        jax.tree.map(np.testing.assert_array_equal, ref, POLICIES[synced_at])


@pytest.mark.parametrize("every,alpha", [(1, 0.6), (2, 0.25), (3, 1.0)])
def test_ema_equals_the_closed_form(maybe_jit, every, alpha):
    """ref_n = (1 - a)^n ref_0 + sum_j a (1 - a)^(n - j) theta_j over the n EMA steps so far."""
    refs = _follow(losses.ReferenceConfig("ema", every=every, alpha=alpha), maybe_jit, POLICIES, REF0)
    for u, ref in enumerate(refs):
        steps = [j for j in range(u + 1) if j % every == 0]
        n = len(steps)
        expected = jax.tree.map(lambda r0, n=n: (1 - alpha) ** n * np.asarray(r0), REF0)
        for i, j in enumerate(steps, start=1):
            expected = jax.tree.map(lambda e, p, i=i, n=n: e + alpha * (1 - alpha) ** (n - i) * np.asarray(p),
                                    expected, POLICIES[j])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), ref, expected)


def test_dtype_follows_the_reference():
    ref = jax.tree.map(lambda x: x.astype(jnp.bfloat16), REF0)
    out = losses.update_reference(losses.ReferenceConfig("ema", alpha=0.5), ref, POLICIES[0], jnp.int32(0))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))


@pytest.mark.parametrize("fields,message", [
    (dict(kind="polyak"), "kind must be one of"),
    (dict(kind="sync", every=0), "every"),
    (dict(kind="ema", alpha=0.0), "alpha"),
    (dict(kind="ema", alpha=1.5), "alpha"),
    (dict(kind="ema", alpha=float("nan")), "alpha"),
])
def test_bad_configs_are_refused(fields, message):
    with pytest.raises(validate.ConfigError, match=message):
        losses.ReferenceConfig(**fields)
