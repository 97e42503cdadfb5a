"""Categorical and diagonal-Gaussian policy distributions, exact KL and entropy, and sampled KL.

Small pure functions on distribution parameters (logits; mean and log-std), so that losses stay
functions of arrays. Exact KL and entropy are closed forms; `kl_k1`, `kl_k2`, `kl_k3` are the sampled
estimators of KL(p || ref) from per-sample log-probabilities of samples x ~ p (Schulman, 2020,
"Approximating KL divergence"; 003 eq. 87 uses k1, DeepSeekMath uses k3).
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
from flax import struct

from polygrad.estimators.importance import DEFAULT_LOG_RATIO_CLIP

# --- categorical --------------------------------------------------------------------------------


def categorical_log_prob(logits: jax.Array, actions: jax.Array) -> jax.Array:
    """log pi(a) for logits `[..., A]` and integer actions `[...]` -> `[...]`."""
    chex.assert_rank(actions, logits.ndim - 1)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(log_p, actions[..., None].astype(jnp.int32), axis=-1)[..., 0]


def categorical_entropy(logits: jax.Array) -> jax.Array:
    """Entropy -sum_a pi(a) log pi(a), logits `[..., A]` -> `[...]`.

    Exact; actions of probability 0 (-inf logits) contribute 0, to the value and to the gradient (the
    log-probabilities are replaced with `where` before the product, so 0 * -inf never appears).
    """
    log_p = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(log_p)
    zero = jnp.zeros((), log_p.dtype)
    return -jnp.sum(jnp.where(p > 0, p * jnp.where(p > 0, log_p, zero), zero), axis=-1)


def categorical_kl(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
    """Exact KL(p || q) = sum_a p(a) (log p(a) - log q(a)), logits `[..., A]` -> `[...]`.

    Actions with p(a) = 0 contribute 0 (also where q(a) = 0; value and gradient); an action with p(a) > 0
    and q(a) = 0 makes the KL +inf, as it should.
    """
    chex.assert_equal_shape([logits_p, logits_q])
    log_p = jax.nn.log_softmax(logits_p, axis=-1)
    log_q = jax.nn.log_softmax(logits_q, axis=-1)
    p = jnp.exp(log_p)
    zero = jnp.zeros((), log_p.dtype)
    log_ratio = jnp.where(p > 0, log_p - jnp.where(p > 0, log_q, zero), zero)
    return jnp.sum(jnp.where(p > 0, p * log_ratio, zero), axis=-1)


def categorical_sample(key: jax.Array, logits: jax.Array) -> jax.Array:
    """Sample integer actions `[...]` from logits `[..., A]`."""
    return jax.random.categorical(key, logits, axis=-1)


# --- diagonal Gaussian --------------------------------------------------------------------------

_LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_prob(mean: jax.Array, log_std: jax.Array, x: jax.Array) -> jax.Array:
    """log N(x; mean, diag(exp(log_std)^2)) summed over the last axis: `[..., D]` -> `[...]`.

    `log_std` broadcasts against `mean` (e.g. a state-independent `[D]` parameter).
    """
    chex.assert_equal_shape([mean, x])
    log_std = jnp.broadcast_to(log_std, mean.shape)
    z = (x - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z**2 - log_std - 0.5 * _LOG_2PI, axis=-1)


def gaussian_entropy(mean: jax.Array, log_std: jax.Array) -> jax.Array:
    """Entropy sum_d (log_std_d + (1 + log 2 pi) / 2) of a diagonal Gaussian, `[..., D]` -> `[...]`."""
    log_std = jnp.broadcast_to(log_std, mean.shape)
    return jnp.sum(log_std + 0.5 * (1.0 + _LOG_2PI), axis=-1)


def gaussian_kl(
    mean_p: jax.Array, log_std_p: jax.Array, mean_q: jax.Array, log_std_q: jax.Array
) -> jax.Array:
    """Exact KL(p || q) of diagonal Gaussians, summed over the last axis: `[..., D]` -> `[...]`.

    KL = sum_d [log s_q - log s_p + (s_p^2 + (m_p - m_q)^2) / (2 s_q^2) - 1/2].
    """
    chex.assert_equal_shape([mean_p, mean_q])
    log_std_p = jnp.broadcast_to(log_std_p, mean_p.shape)
    log_std_q = jnp.broadcast_to(log_std_q, mean_q.shape)
    var_ratio = jnp.exp(2.0 * (log_std_p - log_std_q))
    mean_term = ((mean_p - mean_q) * jnp.exp(-log_std_q)) ** 2
    return jnp.sum(log_std_q - log_std_p + 0.5 * (var_ratio + mean_term) - 0.5, axis=-1)


def gaussian_sample(key: jax.Array, mean: jax.Array, log_std: jax.Array) -> jax.Array:
    """Sample `[..., D]` from a diagonal Gaussian; `log_std` broadcasts against `mean`."""
    log_std = jnp.broadcast_to(log_std, mean.shape)
    return mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape, mean.dtype)


# --- sampled KL estimators ----------------------------------------------------------------------
#
# For samples x ~ p, with log r = log ref(x) - log p(x) (clamped):
#   k1 = -log r            unbiased for KL(p || ref), can be negative, high variance;
#   k2 = (log r)^2 / 2      biased, non-negative, low variance; its gradient in p's parameters, in
#                           expectation, is the gradient of KL(p || ref);
#   k3 = r - 1 - log r      unbiased for KL(p || ref) and non-negative (Schulman, 2020).
# All three estimate the *reverse* KL(p || ref) of the sampling policy p to the reference, which is
# the direction GRPO's penalty uses (003 eq. 87; DeepSeekMath eq. 4).


def _log_ref_ratio(logp: jax.Array, logp_ref: jax.Array, clip: float) -> jax.Array:
    """Clamped log ref(x) - log p(x); exactly 0 where the two are equal (both -inf included, never NaN)."""
    chex.assert_equal_shape([logp, logp_ref])
    diff = jnp.where(logp_ref == logp, jnp.zeros((), logp.dtype), logp_ref - logp)
    return jnp.clip(diff, -clip, clip)


def kl_k1(logp: jax.Array, logp_ref: jax.Array, clip: float = DEFAULT_LOG_RATIO_CLIP) -> jax.Array:
    """k1 = log p(x) - log ref(x), elementwise; unbiased estimate of KL(p || ref) for x ~ p."""
    return -_log_ref_ratio(logp, logp_ref, clip)


def kl_k2(logp: jax.Array, logp_ref: jax.Array, clip: float = DEFAULT_LOG_RATIO_CLIP) -> jax.Array:
    """k2 = (log ref(x) - log p(x))^2 / 2, elementwise; biased, non-negative estimate of KL(p || ref)."""
    return 0.5 * _log_ref_ratio(logp, logp_ref, clip) ** 2


def kl_k3(logp: jax.Array, logp_ref: jax.Array, clip: float = DEFAULT_LOG_RATIO_CLIP) -> jax.Array:
    """k3 = r - 1 - log r with r = ref(x)/p(x), elementwise; unbiased, non-negative, for KL(p || ref)."""
    log_r = _log_ref_ratio(logp, logp_ref, clip)
    return jnp.expm1(log_r) - log_r


# --- distribution objects (what a policy network outputs) ---------------------------------------


@struct.dataclass
class Categorical:
    """Categorical distribution over the last axis of `logits` `[..., A]`; actions are ints `[...]`."""

    logits: jax.Array

    def sample(self, key: jax.Array) -> jax.Array:
        return categorical_sample(key, self.logits)

    def log_prob(self, actions: jax.Array) -> jax.Array:
        return categorical_log_prob(self.logits, actions)

    def entropy(self) -> jax.Array:
        return categorical_entropy(self.logits)

    def kl(self, other: Categorical) -> jax.Array:
        """Exact KL(self || other), `[...]`."""
        return categorical_kl(self.logits, other.logits)

    def mode(self) -> jax.Array:
        return jnp.argmax(self.logits, axis=-1)


@struct.dataclass
class DiagGaussian:
    """Diagonal Gaussian with `mean` `[..., D]` and `log_std` `[..., D]`; actions are `[..., D]`."""

    mean: jax.Array
    log_std: jax.Array

    def sample(self, key: jax.Array) -> jax.Array:
        return gaussian_sample(key, self.mean, self.log_std)

    def log_prob(self, actions: jax.Array) -> jax.Array:
        return gaussian_log_prob(self.mean, self.log_std, actions)

    def entropy(self) -> jax.Array:
        return gaussian_entropy(self.mean, self.log_std)

    def kl(self, other: DiagGaussian) -> jax.Array:
        """Exact KL(self || other), `[...]`."""
        return gaussian_kl(self.mean, self.log_std, other.mean, other.log_std)

    def mode(self) -> jax.Array:
        return self.mean


Distribution = Categorical | DiagGaussian
