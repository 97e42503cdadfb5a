"""The optimiser and the one gradient-step / minibatch loop that every learner uses.

A loss here is any `loss_fn(params, batch) -> (loss, metrics)` with `batch` a pytree whose leaves share a
leading axis `[N, ...]`. The control learners, the trust-region value fit, the language-model RL update
and the supervised warm start all step through `gradient_step` (and `minibatch_epochs`).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from polygrad import validate

LossFn = Callable[[Any, Any], tuple[jax.Array, dict[str, jax.Array]]]


def make_optimizer(
    learning_rate: float,
    max_grad_norm: float | None,
    anneal_steps: int | None = None,
    eps: float = 1e-5,
) -> optax.GradientTransformation:
    """Adam (eps 1e-5, as CleanRL) after global-norm gradient clipping (`max_grad_norm`; None or 0: none),
    with the learning rate annealed linearly to 0 over `anneal_steps` gradient steps if given.

    The (initial) learning rate lives in the optimiser state (`optax.inject_hyperparams`), at
    `opt_state.hyperparams["learning_rate"]`, so one compiled program can train several learning rates
    at once: `set_learning_rate(opt_state, lr)` after `init`, vmapped over `lr` (`experiments.sweep`).
    The annealing schedule starts from that state value; the updates are the same as those of
    `optax.adam(optax.linear_schedule(learning_rate, 0, anneal_steps))` (or a constant rate).
    """
    validate.positive("learning_rate", learning_rate)
    if max_grad_norm:
        validate.positive("max_grad_norm", max_grad_norm)
    return optax.inject_hyperparams(_clipped_adam, static_args=("max_grad_norm", "anneal_steps", "eps"))(
        learning_rate=learning_rate, max_grad_norm=max_grad_norm or None, anneal_steps=anneal_steps or None,
        eps=eps)


def _clipped_adam(learning_rate, max_grad_norm, anneal_steps, eps) -> optax.GradientTransformation:
    lr = optax.linear_schedule(learning_rate, 0.0, anneal_steps) if anneal_steps else learning_rate
    clip = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    return optax.chain(*clip, optax.adam(lr, eps=eps))


def flattened(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` applied to all parameters raveled into one vector.

    Adam and global-norm clipping act elementwise or on the global norm, so the updates are those of `tx`
    (up to float reassociation in the norm); the state holds one vector per moment instead of one per
    parameter array. A speed knob for small networks, where every array costs a few kernel launches per
    step (the control experiments use it: the compiled PPO minibatch step on CartPole has 165 instead of 195
    operations).
    """

    def init(params):
        return tx.init(ravel_pytree(params)[0])

    def update(grads, state, params=None):
        flat_grads, unravel = ravel_pytree(grads)
        updates, state = tx.update(flat_grads, state, None if params is None else ravel_pytree(params)[0])
        return unravel(updates), state

    return optax.GradientTransformation(init, update)


def set_learning_rate(opt_state: Any, learning_rate: float | jax.Array) -> Any:
    """`opt_state` of `make_optimizer` with its (initial) learning rate replaced: a traced value works, so
    `jax.vmap` over it gives one optimiser per learning rate. Every optimiser state inside `opt_state`
    (e.g. a learner's) is changed."""
    current = optax.tree.get_all_with_path(opt_state, "learning_rate")
    if not current:
        raise ValueError("this optimiser state holds no learning rate (not one of optim.make_optimizer)")
    dtype = jnp.result_type(current[0][1])
    return optax.tree.set(opt_state, learning_rate=jnp.asarray(learning_rate, dtype))


def gradient_step(
    loss_fn: LossFn, tx: optax.GradientTransformation, params: Any, opt_state: Any, batch: Any
) -> tuple[Any, Any, dict[str, jax.Array]]:
    """One optimiser step on `loss_fn(params, batch)`; the metrics gain `grad_norm` (before clipping)."""
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    flat_grads = ravel_pytree(grads)[0]  # one reduction (shared with `flattened`'s), not one per array
    metrics = {**metrics, "grad_norm": jnp.sqrt(jnp.sum(jnp.square(flat_grads)))}
    return optax.apply_updates(params, updates), opt_state, metrics


def minibatch_epochs(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    params: Any,
    opt_state: Any,
    batch: Any,
    key: jax.Array,
    num_epochs: int,
    num_minibatches: int,
) -> tuple[Any, Any, dict[str, jax.Array]]:
    """`num_epochs` passes over `batch` (leaves `[N, ...]`), each a fresh random partition into
    `num_minibatches` minibatches with one gradient step each (Schulman et al. 2017, Algorithm 1;
    003 section 4.7.4, step 3).

    Returns the parameters, optimiser state and the metrics averaged over all gradient steps.
    """
    n = jax.tree.leaves(batch)[0].shape[0]
    if n % num_minibatches:
        raise validate.ConfigError(f"batch size {n} is not divisible by num_minibatches={num_minibatches}")
    size = n // num_minibatches

    def epoch(carry, epoch_key):
        order = jax.random.permutation(epoch_key, n)
        minibatches = jax.tree.map(lambda x: x[order].reshape((num_minibatches, size, *x.shape[1:])), batch)

        def step(carry, minibatch):
            params, opt_state, metrics = gradient_step(loss_fn, tx, *carry, minibatch)
            if not names:
                names.extend(sorted(metrics))
            # All metrics in one array: one write per step instead of one per metric.
            dtype = jnp.result_type(jnp.float32, *metrics.values())
            return (params, opt_state), jnp.stack([jnp.asarray(metrics[k], dtype) for k in names])

        return jax.lax.scan(step, carry, minibatches)

    names: list[str] = []  # the metric names, filled when `step` is traced
    (params, opt_state), stacked = jax.lax.scan(epoch, (params, opt_state), jax.random.split(key, num_epochs))
    means = jnp.mean(stacked, axis=(0, 1))
    return params, opt_state, {k: means[i] for i, k in enumerate(names)}
