"""The optimiser and the minibatch loop: `optim.flattened` gives the updates of the optimiser it wraps, and
`minibatch_epochs` equals a plain Python loop over the same permutations, in float32 and float64."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from polygrad import optim


def _params(dtype):
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.standard_normal((3, 4)), dtype),
            "b": jnp.asarray(rng.standard_normal(4), dtype),
            "head": {"v": jnp.asarray(rng.standard_normal((4, 1)), dtype)}}


def _loss(params, batch):
    pred = jnp.tanh(batch["x"] @ params["w"] + params["b"]) @ params["head"]["v"]
    loss = jnp.mean((pred[:, 0] - batch["y"]) ** 2)
    return loss, {"loss": loss, "count": jnp.asarray(batch["y"].shape[0], jnp.int32)}


def _batch(dtype, n=12):
    rng = np.random.default_rng(1)
    return {"x": jnp.asarray(rng.standard_normal((n, 3)), dtype),
            "y": jnp.asarray(rng.standard_normal(n), dtype)}


@pytest.mark.parametrize("x64", [False, True])
def test_flattened_gives_the_updates_of_the_wrapped_optimiser(x64):
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        params, batch = _params(dtype), _batch(dtype)
        tx = optim.make_optimizer(1e-2, 0.5, anneal_steps=10)
        flat = optim.flattened(tx)
        p1, s1, p2, s2 = params, tx.init(params), params, flat.init(params)
        for _ in range(5):
            p1, s1, _ = optim.gradient_step(_loss, tx, p1, s1, batch)
            p2, s2, _ = optim.gradient_step(_loss, flat, p2, s2, batch)
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
            assert a.dtype == b.dtype == dtype
            np.testing.assert_allclose(a, b, rtol=1e-12 if x64 else 1e-5, atol=1e-12 if x64 else 1e-6)
        assert optim.set_learning_rate(s2, 0.5) is not None  # the learning rate is still in the state


@pytest.mark.parametrize("x64", [False, True])
def test_minibatch_epochs_equals_a_plain_loop(x64):
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        params, batch, key = _params(dtype), _batch(dtype), jax.random.PRNGKey(3)
        tx = optax.sgd(0.1)
        got_params, _, metrics = jax.jit(optim.minibatch_epochs, static_argnums=(0, 1, 6, 7))(
            _loss, tx, params, tx.init(params), batch, key, 2, 3)
        expected, state, losses = params, tx.init(params), []
        for epoch_key in jax.random.split(key, 2):
            order = jax.random.permutation(epoch_key, 12)
            for i in range(3):
                rows = order[4 * i: 4 * (i + 1)]
                minibatch = {k: v[rows] for k, v in batch.items()}
                losses.append(_loss(expected, minibatch)[0])
                expected, state, _ = optim.gradient_step(_loss, tx, expected, state, minibatch)
        tol = 1e-12 if x64 else 1e-5
        for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
        assert metrics["loss"].dtype == dtype
        np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=tol)
        assert float(metrics["count"]) == 4.0 and "grad_norm" in metrics
