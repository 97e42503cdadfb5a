"""Small statistics over masked batches: means, whitening, explained variance, pass@k.

Masks are float or bool arrays of the shape of the data (1 = counts). Masked entries are excluded with
`where`, not by multiplication, so a NaN or inf in a masked entry never leaks into the result; an empty
mask gives the documented value (0), never NaN. Every function follows the dtype of its inputs.
"""

import chex
import jax
import jax.numpy as jnp


def masked_sum(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Sum of `x` over the entries where `mask` is nonzero (all entries without a mask). Scalar."""
    if mask is None:
        return jnp.sum(x)
    chex.assert_equal_shape([x, mask])
    return jnp.sum(jnp.where(mask > 0, x, jnp.zeros((), x.dtype)))


def masked_count(mask: jax.Array, dtype=None) -> jax.Array:
    """Number of nonzero mask entries (at least 1, so that it can divide), in `dtype`."""
    return jnp.maximum(jnp.sum(mask > 0).astype(dtype or jnp.result_type(float)), 1)


def masked_mean(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean of `x` over all entries, or over the entries where `mask` is nonzero (0 if it is empty)."""
    if mask is None:
        return jnp.mean(x)
    return masked_sum(x, mask) / masked_count(mask, x.dtype)


def masked_variance(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Population variance of `x` over the (masked) entries; 0 for an empty mask. Scalar."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def whiten(x: jax.Array, mask: jax.Array | None = None, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / (std + eps) over the (masked) batch: advantage normalisation (Schulman et al. 2017,
    as implemented in OpenAI baselines and CleanRL). Equal entries give exactly 0; masked entries give 0."""
    mean = masked_mean(x, mask)
    std = jnp.sqrt(masked_variance(x, mask))
    out = (x - mean) / (std + eps)
    return out if mask is None else jnp.where(mask > 0, out, jnp.zeros((), x.dtype))


def explained_variance(values: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """1 - Var[targets - values] / Var[targets]: 1 for a perfect critic, 0 for a constant one.

    Defined as 0 when the targets have no variance (instead of 0/0). Scalar.
    """
    chex.assert_equal_shape([values, targets])
    var_targets = masked_variance(targets, mask)
    var_residual = masked_variance(targets - values, mask)
    tiny = jnp.asarray(1e-8, var_targets.dtype)
    return jnp.where(var_targets > tiny, 1.0 - var_residual / jnp.maximum(var_targets, tiny), 0.0)


def pass_at_k(num_samples: int, num_correct: jax.Array, k: int) -> jax.Array:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021, eq. 1): 1 - C(n-c, k) / C(n, k).

    `num_correct` is any shape of counts; the result has its shape, in the default float dtype.
    """
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={num_samples}")
    c = jnp.asarray(num_correct, jnp.result_type(float))
    i = jnp.arange(k, dtype=c.dtype)
    # C(n-c, k) / C(n, k) = prod_{i<k} (n - c - i) / (n - i), 0 once n - c < k
    fail = jnp.prod(jnp.clip((num_samples - c[..., None] - i) / (num_samples - i), 0.0, 1.0), axis=-1)
    return 1.0 - fail
