"""Device meshes and data-parallel helpers on JAX's own SPMD engine (no `pmap`, no home-made layer).

polygrad's training programs are written for one device. They scale out by *sharding their arrays*, not
by rewriting them: an experiment builds a mesh with two named axes,

    seeds   independent seeds (the vmapped leading axis of the training state)
    data    the batch of one seed: the environments of a control run, the prompt groups of an LM run

places the training state on it (`NamedSharding`, parameters and optimiser state replicated over
`data`, environment state split over it) and jits the unchanged program. XLA's SPMD partitioner then
runs each device's share of the batch and inserts the collectives (all-reduce of the gradient sums,
of the normalisation statistics, of the loss normaliser). Because the partitioned program computes the
same function of the same global arrays, results equal the single-device ones up to the reassociation
of float sums, and the loss normaliser of every aggregation is global by construction (verl's
dp_size-dependent sequence-mean losses cannot arise).

`constrain` pins the sharding of intermediate arrays (the rollout's `[T, B]` trajectory, an LM batch
`[B, ...]`) inside such a program; outside a mesh it is the identity, so library code can call it
unconditionally. `sharded_policy_loss` is the same loss written with explicit collectives for
`jax.shard_map`, for programs that manage their own per-device code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from polygrad import losses

SEEDS = "seeds"
DATA = "data"
AXES = (SEEDS, DATA)


def make_mesh(seeds: int = 1, data: int | None = None, devices: Sequence[Any] | None = None
              ) -> jax.sharding.Mesh:
    """A `(seeds, data)` mesh of `seeds * data` devices (`data=None`: all the remaining devices), with
    automatic (GSPMD) axes. `devices` defaults to `jax.devices()` (every process's devices)."""
    devices = list(jax.devices() if devices is None else devices)
    if seeds < 1:
        raise ValueError(f"mesh seeds must be >= 1, got {seeds}")
    if data is None:
        data = len(devices) // seeds
    if data < 1 or seeds * data > len(devices):
        raise ValueError(f"a mesh of {seeds} x {data} devices needs {seeds * data} devices; "
                         f"{len(devices)} are available")
    return jax.make_mesh((seeds, data), AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[: seeds * data])


def _active_axes() -> dict[str, int]:
    mesh = jax.sharding.get_abstract_mesh()
    return {} if mesh.empty else dict(mesh.shape)


def constrain(tree: Any, batch_axis: int = 0, axis_name: str = DATA) -> Any:
    """`tree` with axis `batch_axis` of every leaf sharded over the mesh axis `axis_name` (the other axes
    replicated), via `jax.lax.with_sharding_constraint`. The identity outside a mesh context, when the
    mesh has no such axis or it has size 1, and for leaves of too low rank or an indivisible axis."""
    axes = _active_axes()
    size = axes.get(axis_name, 1)
    if size == 1:
        return tree

    def one(x):
        if x.ndim <= batch_axis or x.shape[batch_axis] % size:
            return x
        spec = [None] * x.ndim
        spec[batch_axis] = axis_name
        return jax.lax.with_sharding_constraint(x, P(*spec))

    return jax.tree.map(one, tree)


def carry_shardings(mesh: jax.sharding.Mesh, data_axes: Any, leading_seeds: bool = True) -> Any:
    """`NamedSharding`s of a training state from `data_axes`, a pytree (of the state's structure, with
    the shapes of one seed) whose leaves are `None` (replicated over `data`) or the index of the axis
    split over `data`. With `leading_seeds` the arrays carry a leading seeds axis, split over `seeds`."""

    def one(axis):
        parts = [] if axis is None else [None] * axis + [DATA]
        return NamedSharding(mesh, P(*([SEEDS] if leading_seeds else []), *parts))

    return jax.tree.map(one, data_axes, is_leaf=lambda x: x is None)


def sharded_policy_loss(
    config: losses.LossConfig,
    axis_name: str,
    logp_new: jax.Array,
    logp_old: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    logp_ref: jax.Array | None = None,
    entropy: jax.Array | None = None,
    **inputs: Any,
) -> jax.Array:
    """The global-batch `losses.policy_loss` from inside `jax.shard_map`, each device holding a share of
    the rows (whole sequences, `[B_local, T]`; or `[N_local]` samples).

    The normaliser is the global one, `losses.batch_normaliser(config, all_gathered_mask)`, each device's
    numerator is divided by it and the parts are summed with `psum`, so the loss (and its gradient, with
    parameters replicated) equals the single-device loss of the whole batch for every aggregation.
    Advantage whitening (`normalize_advantages`) uses the global masked mean and variance (psum of sums).
    Parts whose statistics couple rows beyond the normaliser (`losses` presets that select tokens by a
    batch covariance, e.g. clip_cov, kl_cov) are refused: run them under jit auto-sharding instead.
    Returns the scalar loss (replicated).
    """
    if type(getattr(config, "gate", None)).__name__ in ("CovarianceClip", "CovarianceKL"):
        raise ValueError(f"{type(config.gate).__name__} selects tokens by a whole-batch statistic; use jit "
                         "auto-sharding (experiments' mesh) rather than shard_map for it")
    full_mask = jax.lax.all_gather(mask, axis_name, tiled=True)
    normaliser = losses.batch_normaliser(config, full_mask)
    if config.normalize_advantages:
        dtype = advantages.dtype
        active = jnp.broadcast_to(jnp.asarray(mask, dtype) > 0, advantages.shape).astype(dtype)
        count = jax.lax.psum(jnp.sum(active), axis_name)
        mean = jax.lax.psum(jnp.sum(advantages * active), axis_name) / jnp.maximum(count, 1)
        var = jax.lax.psum(jnp.sum(jnp.square(advantages - mean) * active), axis_name) / jnp.maximum(count, 1)
        advantages = _whiten_with(advantages, active, mean, var)
        config = dataclasses.replace(config, normalize_advantages=False)
    local, _ = losses.policy_loss(config, logp_new, logp_old, advantages, mask, logp_ref, entropy,
                                  normaliser=normaliser, **inputs)
    return jax.lax.psum(local, axis_name)


def _whiten_with(x: jax.Array, active: jax.Array, mean: jax.Array, var: jax.Array, eps: float = 1e-8
                 ) -> jax.Array:
    """`statistics.whiten` with given (global) statistics."""
    out = (x - mean) / (jnp.sqrt(var) + eps)
    return jnp.where(active > 0, out, jnp.zeros((), x.dtype))
