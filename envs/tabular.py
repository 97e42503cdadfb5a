"""Finite MDPs: a small data type and the named toy MDPs of the notes.

A finite MDP (003 section 2.1, eq. 10) is held as arrays:

- ``P[s, a, s']``   transition probabilities, shape ``[S, A, S]``;
- ``r[s, a]``       deterministic reward (003 eq. 1), shape ``[S, A]``;
- ``rho0[s]``       initial-state distribution, shape ``[S]``;
- ``gamma``         discount factor in ``[0, 1)`` (a scalar array);
- ``action_mask[s, a]`` optional bool ``[S, A]``: which actions exist in each state (the notes give states
  different action sets, e.g. ``A(s_perp) = {perp}``). ``None`` means every action is available.

A policy is an array ``pi[s, a]`` whose rows are distributions putting no mass on masked actions.
The exact analysis of such MDPs lives in ``polygrad.tabular``; it duck-types these fields, so this module
never imports polygrad.

``make_mdp`` validates its inputs and raises ``ValueError`` with a clear message; ``random_mdp`` and
``random_contextual_bandit`` build valid MDPs from a key and stay jittable and vmappable (no validation on
traced values).

Every builder takes ``dtype=None``: the default float dtype (``jnp.result_type(float)``: float32, or
float64 under ``jax_enable_x64``), so that the exact analysis of ``polygrad.tabular`` is float64-exact
when 64-bit mode is on.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

_TOLERANCE = 1e-5


def _float_dtype(dtype=None):
    """``dtype`` if given, else the default float dtype (float64 under ``jax_enable_x64``)."""
    return jnp.result_type(float) if dtype is None else jnp.dtype(dtype)


@struct.dataclass
class FiniteMDP:
    """A finite discounted MDP (003 eq. 10) as arrays; see the module docstring for the fields."""

    P: jax.Array
    r: jax.Array
    rho0: jax.Array
    gamma: jax.Array
    action_mask: jax.Array | None = None

    @property
    def num_states(self) -> int:
        return self.r.shape[0]

    @property
    def num_actions(self) -> int:
        return self.r.shape[1]


def validate_mdp(mdp: FiniteMDP) -> None:
    """Raise ``ValueError`` if ``mdp`` is malformed (needs concrete arrays, not traced values)."""
    P, r, rho0 = np.asarray(mdp.P), np.asarray(mdp.r), np.asarray(mdp.rho0)
    gamma = np.asarray(mdp.gamma)
    if r.ndim != 2:
        raise ValueError(f"r must have shape [S, A]; got shape {r.shape}")
    S, A = r.shape
    if S < 1 or A < 1:
        raise ValueError(f"an MDP needs at least one state and one action; r has shape {r.shape}")
    if P.shape != (S, A, S):
        raise ValueError(f"P must have shape [S, A, S] = {(S, A, S)} to match r {r.shape}; got {P.shape}")
    if rho0.shape != (S,):
        raise ValueError(f"rho0 must have shape [S] = {(S,)}; got {rho0.shape}")
    if gamma.shape != ():
        raise ValueError(f"gamma must be a scalar; got shape {gamma.shape}")
    for name, array in (("P", P), ("r", r), ("rho0", rho0), ("gamma", gamma)):
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} contains non-finite values")
    if not 0.0 <= float(gamma) < 1.0:
        raise ValueError(f"gamma must lie in [0, 1); got {float(gamma)}")
    if np.any(P < 0):
        s, a, s_next = np.argwhere(P < 0)[0]
        raise ValueError(f"P has a negative probability: P[{s}, {a}, {s_next}] = {P[s, a, s_next]}")
    row_sums = P.sum(axis=-1)
    bad = np.abs(row_sums - 1.0) > _TOLERANCE
    if np.any(bad):
        s, a = np.argwhere(bad)[0]
        raise ValueError(f"P[{s}, {a}, :] sums to {row_sums[s, a]:.6g}, not 1 (every row of P must)")
    if np.any(rho0 < 0) or abs(rho0.sum() - 1.0) > _TOLERANCE:
        raise ValueError(f"rho0 must be a probability distribution; got {rho0} (sum {rho0.sum():.6g})")
    if mdp.action_mask is not None:
        mask = np.asarray(mdp.action_mask)
        if mask.shape != (S, A):
            raise ValueError(f"action_mask must have shape [S, A] = {(S, A)}; got {mask.shape}")
        if mask.dtype != np.bool_:
            raise ValueError(f"action_mask must be boolean; got dtype {mask.dtype}")
        empty = ~mask.any(axis=-1)
        if np.any(empty):
            states = np.flatnonzero(empty)
            raise ValueError(f"every state needs an available action; states {states} have none")


def make_mdp(P, r, rho0, gamma, action_mask=None, dtype=None) -> FiniteMDP:
    """Build and validate a ``FiniteMDP`` (float arrays of ``dtype``, by default the default float dtype;
    bool mask). Raises ``ValueError`` if malformed."""
    dtype = _float_dtype(dtype)
    mdp = FiniteMDP(
        P=jnp.asarray(P, dtype),
        r=jnp.asarray(r, dtype),
        rho0=jnp.asarray(rho0, dtype),
        gamma=jnp.asarray(gamma, dtype),
        action_mask=None if action_mask is None else jnp.asarray(action_mask),
    )
    validate_mdp(mdp)
    return mdp


def validate_policy(mdp: FiniteMDP, pi) -> None:
    """Raise ``ValueError`` unless ``pi [S, A]`` is a policy of ``mdp`` (rows are distributions on available
    actions)."""
    pi = np.asarray(pi)
    S, A = mdp.num_states, mdp.num_actions
    if pi.shape != (S, A):
        raise ValueError(f"a policy of this MDP must have shape [S, A] = {(S, A)}; got {pi.shape}")
    if not np.all(np.isfinite(pi)) or np.any(pi < 0):
        raise ValueError("policy probabilities must be finite and non-negative")
    row_sums = pi.sum(axis=-1)
    bad = np.abs(row_sums - 1.0) > _TOLERANCE
    if np.any(bad):
        s = int(np.flatnonzero(bad)[0])
        raise ValueError(f"pi[{s}, :] sums to {row_sums[s]:.6g}, not 1")
    if mdp.action_mask is not None:
        off_mask = (pi > 0) & ~np.asarray(mdp.action_mask)
        if np.any(off_mask):
            s, a = np.argwhere(off_mask)[0]
            raise ValueError(f"pi puts mass {pi[s, a]} on action {a}, which is not available in state {s}")


# --------------------------------------------------------------------------------------------------------
# Example 1 (003 section 4.1.1): the distribution-shift MDP.
# --------------------------------------------------------------------------------------------------------

# State and action indices of the distribution-shift MDP.
S0, S1, S_PERP = 0, 1, 2
A0, A1 = 0, 1  # actions in s0: a0 ends the episode, a1 moves to s1
GOOD, BAD = 0, 1  # actions in s1: g earns 1, b earns -M
PERP = 0  # the only action of the absorbing state


class DistributionShiftExample(NamedTuple):
    """The MDP of 003 section 4.1.1 with its old policy ``pi`` and candidate ``pi_new`` (both ``[3, 2]``)."""

    mdp: FiniteMDP
    pi: jax.Array
    pi_new: jax.Array


def distribution_shift_mdp(gamma: float = 0.9, penalty: float = 100.0, dtype=None) -> FiniteMDP:
    """The three-state MDP of 003 section 4.1.1: states (s0, s1, s_perp), s_perp absorbing.

    From s0, a0 goes to s_perp and a1 goes to s1 (reward 0); from s1, g earns 1 and b earns ``-penalty``
    (the notes' M), both ending in s_perp. ``rho0(s0) = 1``. s_perp has one action (the second is masked).
    """
    if penalty <= 0:
        raise ValueError(f"the penalty M must be positive; got {penalty}")
    P = np.zeros((3, 2, 3))
    P[S0, A0, S_PERP] = 1.0
    P[S0, A1, S1] = 1.0
    P[S1, :, S_PERP] = 1.0
    P[S_PERP, :, S_PERP] = 1.0
    r = np.zeros((3, 2))
    r[S1, GOOD] = 1.0
    r[S1, BAD] = -penalty
    mask = np.array([[True, True], [True, True], [True, False]])
    return make_mdp(P, r, [1.0, 0.0, 0.0], gamma, mask, dtype)


def distribution_shift_policies(
    eta: float = 1e-4, eta2: float = 1e-3, dtype=None
) -> tuple[jax.Array, jax.Array]:
    """The old policy pi (``pi(a1|s0) = eta``, ``pi(b|s1) = eta2``) and the candidate pi' that takes a1 then b
    deterministically (003 section 4.1.1); each ``[3, 2]``."""
    for name, value in (("eta", eta), ("eta2", eta2)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must lie in (0, 1) so that pi' is absolutely continuous; got {value}")
    dtype = _float_dtype(dtype)
    pi = jnp.array([[1.0 - eta, eta], [1.0 - eta2, eta2], [1.0, 0.0]], dtype)
    pi_new = jnp.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]], dtype)
    return pi, pi_new


def distribution_shift_example(
    gamma: float = 0.9, penalty: float = 100.0, eta: float = 1e-4, eta2: float = 1e-3, dtype=None
) -> DistributionShiftExample:
    """Example 1 of 003 section 4.1.1 with the seed's default parameters (gamma 0.9, M 100, eta 1e-4,
    eta2 1e-3)."""
    pi, pi_new = distribution_shift_policies(eta, eta2, dtype)
    return DistributionShiftExample(distribution_shift_mdp(gamma, penalty, dtype), pi, pi_new)


# --------------------------------------------------------------------------------------------------------
# Example 2 (003 section 4.1.2): the H-step importance-sampling chain.
# --------------------------------------------------------------------------------------------------------


def importance_sampling_chain(horizon: int, gamma: float = 0.99, dtype=None) -> FiniteMDP:
    """The H-step chain of 003 section 4.1.2 as a Markov MDP with ``H + 2`` states.

    States ``0..H-1`` are the decision steps (the notes' state s at time t, two actions {0, 1}, reward 0,
    both moving to the next step); state ``H`` is s_perp, whose single action perp earns the reward 1 and
    moves to state ``H + 1``, an absorbing zero-reward state. The time index is part of the state so that
    "after H actions" is Markov; every policy has return ``G_0 = gamma^H`` exactly.
    """
    if horizon < 1:
        raise ValueError(f"horizon must be at least 1; got {horizon}")
    S = horizon + 2
    P = np.zeros((S, 2, S))
    for t in range(horizon + 1):
        P[t, :, t + 1] = 1.0
    P[S - 1, :, S - 1] = 1.0
    r = np.zeros((S, 2))
    r[horizon, 0] = 1.0
    mask = np.ones((S, 2), bool)
    mask[horizon:, 1] = False
    rho0 = np.zeros(S)
    rho0[0] = 1.0
    return make_mdp(P, r, rho0, gamma, mask, dtype)


def chain_policy(horizon: int, prob_one: float, dtype=None) -> jax.Array:
    """The Bernoulli policy ``pi(1|s) = prob_one`` of 003 section 4.1.2 on ``importance_sampling_chain``:
    ``[H + 2, 2]``, with the single action of the last two states taken with probability 1."""
    if not 0.0 <= prob_one <= 1.0:
        raise ValueError(f"prob_one must lie in [0, 1]; got {prob_one}")
    dtype = _float_dtype(dtype)
    decisions = jnp.tile(jnp.array([[1.0 - prob_one, prob_one]], dtype), (horizon, 1))
    ends = jnp.tile(jnp.array([[1.0, 0.0]], dtype), (2, 1))
    return jnp.concatenate([decisions, ends])


# --------------------------------------------------------------------------------------------------------
# Contextual bandits (000) and random MDPs.
# --------------------------------------------------------------------------------------------------------


def contextual_bandit(rewards, context_distribution, dtype=None) -> FiniteMDP:
    """A contextual bandit (000; 003 Example 1.6) as the ``gamma = 0`` MDP whose states are the contexts.

    ``rewards [S, A]`` is r(s, a); ``context_distribution [S]`` is d(s). Every step draws a fresh context
    from d, so with gamma = 0, ``J(pi) = E_{s~d} E_{a~pi} r(s, a)`` and the occupancy is d itself.
    """
    rewards = np.asarray(rewards, np.float64)
    context_distribution = np.asarray(context_distribution, np.float64)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must have shape [S, A]; got {rewards.shape}")
    S, A = rewards.shape
    if context_distribution.shape != (S,):
        shape = context_distribution.shape
        raise ValueError(f"context_distribution must have shape [S] = {(S,)}; got {shape}")
    P = np.broadcast_to(context_distribution, (S, A, S))
    return make_mdp(P, rewards, context_distribution, 0.0, dtype=dtype)


def _uniform_simplex(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """Points uniform on the simplex over the last axis (Dirichlet(1), as normalised exponentials)."""
    draws = jax.random.exponential(key, shape, dtype)
    return draws / jnp.sum(draws, axis=-1, keepdims=True)


def random_contextual_bandit(key: jax.Array, num_contexts: int, num_actions: int, dtype=None) -> FiniteMDP:
    """A contextual bandit with rewards uniform in [0, 1] and Dirichlet(1) contexts (jittable, vmappable)."""
    dtype = _float_dtype(dtype)
    reward_key, context_key = jax.random.split(key)
    rewards = jax.random.uniform(reward_key, (num_contexts, num_actions), dtype)
    contexts = _uniform_simplex(context_key, (num_contexts,), dtype)
    P = jnp.broadcast_to(contexts, (num_contexts, num_actions, num_contexts))
    return FiniteMDP(P=P, r=rewards, rho0=contexts, gamma=jnp.zeros((), dtype))


def random_mdp(
    key: jax.Array, num_states: int, num_actions: int, gamma: float = 0.9, dtype=None
) -> FiniteMDP:
    """A random MDP: rows of P and rho0 uniform on the simplex (Dirichlet(1)), rewards uniform in [0, 1].

    Jittable and vmappable over ``key`` (no validation on traced values; valid by construction). Every
    state has positive initial probability almost surely, so every state is visited.
    """
    dtype = _float_dtype(dtype)
    p_key, r_key, rho_key = jax.random.split(key, 3)
    P = _uniform_simplex(p_key, (num_states, num_actions, num_states), dtype)
    r = jax.random.uniform(r_key, (num_states, num_actions), dtype)
    rho0 = _uniform_simplex(rho_key, (num_states,), dtype)
    return FiniteMDP(P=P, r=r, rho0=rho0, gamma=jnp.asarray(gamma, dtype))
