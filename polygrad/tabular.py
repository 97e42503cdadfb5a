"""Exact analysis of finite MDPs: the ground truth that sampled estimators are checked against.

An MDP is any object with the array fields of 003 eq. (10) (``envs.tabular.FiniteMDP`` is one; this module
duck-types it and never imports ``envs``):

- ``mdp.P [S, A, S]`` transitions, ``mdp.r [S, A]`` rewards, ``mdp.rho0 [S]`` initial distribution,
  ``mdp.gamma`` scalar discount in [0, 1), and optionally ``mdp.action_mask [S, A]`` (bool, or ``None``).

Policies are arrays ``pi [S, A]`` (rows are distributions); softmax policies are ``logits [S, A]``.
Everything is a pure, jittable, differentiable function of arrays: values and occupancies come from linear
solves with ``I - gamma P_pi`` (which is invertible for gamma < 1), so ``jax.grad`` differentiates through
them exactly.

Section and equation numbers refer to the main seed text (003).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

MDP = Any  # anything with fields P, r, rho0, gamma and optionally action_mask (see the module docstring)


def _action_mask(mdp: MDP) -> jax.Array | None:
    return getattr(mdp, "action_mask", None)


def _check_policy(mdp: MDP, pi: jax.Array) -> None:
    chex.assert_rank([mdp.P, mdp.r, mdp.rho0, pi], [3, 2, 1, 2])
    chex.assert_equal_shape([mdp.r, pi])


# --------------------------------------------------------------------------------------------------------
# Policy evaluation (003 sections 2.2 and 2.3).
# --------------------------------------------------------------------------------------------------------


def policy_transition_matrix(mdp: MDP, pi: jax.Array) -> jax.Array:
    """State-to-state transition matrix under pi: ``P_pi[s, s'] = sum_a pi(a|s) P(s'|s, a)``; ``[S, S]``."""
    _check_policy(mdp, pi)
    return jnp.einsum("sa,sat->st", pi, mdp.P)


def policy_rewards(mdp: MDP, pi: jax.Array) -> jax.Array:
    """Expected one-step reward under pi: ``r_pi[s] = sum_a pi(a|s) r(s, a)``; ``[S]``."""
    _check_policy(mdp, pi)
    return jnp.sum(pi * mdp.r, axis=-1)


def state_values(mdp: MDP, pi: jax.Array) -> jax.Array:
    """``V^pi [S]`` (003 eq. 21) from the Bellman equation (eq. 26): ``(I - gamma P_pi) V = r_pi``."""
    P_pi = policy_transition_matrix(mdp, pi)
    eye = jnp.eye(P_pi.shape[0], dtype=P_pi.dtype)
    return jnp.linalg.solve(eye - mdp.gamma * P_pi, policy_rewards(mdp, pi))


def action_values(mdp: MDP, pi: jax.Array) -> jax.Array:
    """``Q^pi [S, A]`` by eq. (25): ``Q(s, a) = r(s, a) + gamma sum_s' P(s'|s, a) V^pi(s')``."""
    return mdp.r + mdp.gamma * jnp.einsum("sat,t->sa", mdp.P, state_values(mdp, pi))


def advantages(mdp: MDP, pi: jax.Array) -> jax.Array:
    """``A^pi [S, A] = Q^pi - V^pi`` (eq. 23), centred under pi at every state (eq. 28)."""
    q = action_values(mdp, pi)
    return q - jnp.sum(pi * q, axis=-1, keepdims=True)


def state_occupancy(mdp: MDP, pi: jax.Array) -> jax.Array:
    """Normalised discounted state occupancy ``d_pi [S]`` (eq. 19), summing to 1.

    ``d_pi = (1 - gamma) rho0^T (I - gamma P_pi)^{-1}``, i.e. the solve
    ``(I - gamma P_pi)^T d = (1 - gamma) rho0``.
    """
    P_pi = policy_transition_matrix(mdp, pi)
    eye = jnp.eye(P_pi.shape[0], dtype=P_pi.dtype)
    return jnp.linalg.solve((eye - mdp.gamma * P_pi).T, (1.0 - mdp.gamma) * mdp.rho0)


def state_action_occupancy(mdp: MDP, pi: jax.Array) -> jax.Array:
    """Discounted state-action occupancy ``d_pi(s, a) = d_pi(s) pi(a|s)`` (eq. 20); ``[S, A]``."""
    return state_occupancy(mdp, pi)[:, None] * pi


def expected_return(mdp: MDP, pi: jax.Array) -> jax.Array:
    """``J(pi) = E_{s0~rho0} V^pi(s0)`` (eq. 17); scalar."""
    return jnp.dot(mdp.rho0, state_values(mdp, pi))


# --------------------------------------------------------------------------------------------------------
# Performance difference, local surrogate, distribution shift penalty (003 sections 4.2 and 4.3).
# --------------------------------------------------------------------------------------------------------


def expected_advantage_under(mdp: MDP, pi: jax.Array, pi_new: jax.Array) -> jax.Array:
    """``E_{a~pi_new(.|s)} A^pi(s, a)`` for every state; ``[S]``.

    Equal to the importance-weighted ``E_{a~pi(.|s)}[pi_new(a|s)/pi(a|s) A^pi(s, a)]`` of eq. (50)-(52)
    whenever pi_new is absolutely continuous w.r.t. pi; written without the ratio so that it stays finite.
    """
    chex.assert_equal_shape([pi, pi_new])
    return jnp.sum(pi_new * advantages(mdp, pi), axis=-1)


def performance_difference(mdp: MDP, pi: jax.Array, pi_new: jax.Array) -> jax.Array:
    """Right-hand side of the performance difference lemma (eq. 48), which equals ``J(pi_new) - J(pi)``:

    ``1/(1 - gamma) sum_s d_{pi_new}(s) E_{a~pi_new(.|s)} A^pi(s, a)``; scalar.
    """
    weights = state_occupancy(mdp, pi_new)
    return jnp.dot(weights, expected_advantage_under(mdp, pi, pi_new)) / (1.0 - mdp.gamma)


def surrogate(mdp: MDP, pi: jax.Array, pi_new: jax.Array) -> jax.Array:
    """Local surrogate ``L_pi(pi_new)`` (eq. 51): J(pi) plus the advantage of pi_new weighted by the OLD
    occupancy d_pi, ``J(pi) + 1/(1 - gamma) sum_s d_pi(s) E_{a~pi_new} A^pi(s, a)``; scalar."""
    gain = jnp.dot(state_occupancy(mdp, pi), expected_advantage_under(mdp, pi, pi_new)) / (1.0 - mdp.gamma)
    return expected_return(mdp, pi) + gain


def distribution_shift_penalty(mdp: MDP, pi: jax.Array, pi_new: jax.Array) -> jax.Array:
    """``DSP_pi(pi_new)`` (eq. 52): ``1/(1 - gamma) sum_s (d_{pi_new}(s) - d_pi(s)) E_{a~pi_new} A^pi(s, a)``.

    With ``surrogate`` it gives the exact identity ``J(pi_new) = L_pi(pi_new) + DSP_pi(pi_new)`` (eq. 53).
    """
    shift = state_occupancy(mdp, pi_new) - state_occupancy(mdp, pi)
    return jnp.dot(shift, expected_advantage_under(mdp, pi, pi_new)) / (1.0 - mdp.gamma)


# --------------------------------------------------------------------------------------------------------
# Conservative policy updates and CPI (003 sections 4.4 and 4.5).
# --------------------------------------------------------------------------------------------------------


def mixture_policy(pi: jax.Array, pi_new: jax.Array, alpha) -> jax.Array:
    """Conservative mixture ``pi_alpha = (1 - alpha) pi + alpha pi_new`` (eq. 55); ``[S, A]``.

    ``alpha`` is a scalar; the result has the dtype of the policies (promoted).
    """
    chex.assert_equal_shape([pi, pi_new])
    dtype = jnp.result_type(pi, pi_new)
    alpha = jnp.asarray(alpha, dtype)
    chex.assert_rank(alpha, 0)
    return (1 - alpha) * pi + alpha * pi_new


def greedy_policy(mdp: MDP, pi: jax.Array) -> jax.Array:
    """Deterministic policy maximising ``A^pi(s, .)`` at every state, among available actions: a maximiser of
    the surrogate ``L_pi`` (eq. 54); one-hot ``[S, A]`` (ties go to the lowest action index)."""
    adv = advantages(mdp, pi)
    mask = _action_mask(mdp)
    if mask is not None:
        adv = jnp.where(mask, adv, -jnp.inf)
    return jax.nn.one_hot(jnp.argmax(adv, axis=-1), pi.shape[-1], dtype=pi.dtype)


class CPITerms(NamedTuple):
    """The quantities of eq. (58): surrogate gain ``g = L_pi(pi_new) - J(pi)`` and
    ``epsilon = max_s |E_{a~pi_new} A^pi(s, a)|`` (scalars)."""

    gain: jax.Array
    epsilon: jax.Array


def cpi_terms(mdp: MDP, pi: jax.Array, pi_new: jax.Array) -> CPITerms:
    """``g`` and ``epsilon`` of eq. (58) computed exactly."""
    expected_adv = expected_advantage_under(mdp, pi, pi_new)
    gain = jnp.dot(state_occupancy(mdp, pi), expected_adv) / (1.0 - mdp.gamma)
    return CPITerms(gain=gain, epsilon=jnp.max(jnp.abs(expected_adv)))


def cpi_penalty_coefficient(gamma) -> jax.Array:
    """The coefficient ``2 gamma / (1 - gamma)^2`` of ``epsilon alpha^2`` in the CPI bound (eq. 59)."""
    return 2.0 * gamma / (1.0 - gamma) ** 2


def _cpi_bound(expected_return_pi, terms: CPITerms, alpha, gamma) -> jax.Array:
    return expected_return_pi + alpha * terms.gain - cpi_penalty_coefficient(gamma) * terms.epsilon * alpha**2


def cpi_lower_bound(mdp: MDP, pi: jax.Array, pi_new: jax.Array, alpha) -> jax.Array:
    """Lower bound on ``J(pi_alpha)`` for the mixture of eq. (55), from eq. (59)-(60):

    ``J(pi) + alpha g - 2 gamma epsilon alpha^2 / (1 - gamma)^2``; scalar (broadcasts over ``alpha`` arrays).
    The result has the dtype of ``J(pi)`` (that of the MDP's arrays and the policies).
    """
    ret = expected_return(mdp, pi)
    alpha = jnp.asarray(alpha, ret.dtype)
    return _cpi_bound(ret, cpi_terms(mdp, pi, pi_new), alpha, jnp.asarray(mdp.gamma, ret.dtype))


def cpi_step_size(gain, epsilon, gamma) -> jax.Array:
    """Step size maximising the bound (60) over ``alpha in [0, 1]`` (eq. 61):

    ``alpha* = min(1, (1 - gamma)^2 / (4 gamma) * g / epsilon)``, and 0 when ``g <= 0`` (no step is safe).
    Defined everywhere: ``epsilon = 0`` or ``gamma = 0`` (no penalty) give 1 if ``g > 0`` and 0 otherwise.
    The result has the dtype of the inputs (promoted; Python floats take the default float dtype).
    """
    dtype = jnp.result_type(gain, epsilon, gamma, float)
    gain, epsilon, gamma = (jnp.asarray(x, dtype) for x in (gain, epsilon, gamma))
    one, zero = jnp.ones((), dtype), jnp.zeros((), dtype)
    denominator = 4 * gamma * epsilon
    safe = jnp.where(denominator > 0, denominator, one)
    ratio = jnp.where(denominator > 0, (1 - gamma) ** 2 * gain / safe, jnp.where(gain > 0, one, zero))
    return jnp.clip(ratio, zero, one)


class CPIHistory(NamedTuple):
    """Per-iteration record of ``conservative_policy_iteration`` (leading axis: iterations ``[K]``).

    ``policy [K, S, A]`` is pi_k before the update, ``expected_return`` J(pi_k), ``alpha`` the step taken,
    ``gain``/``epsilon`` the terms of eq. (58) and ``bound`` the guaranteed ``J(pi_{k+1})`` of eq. (60).
    """

    policy: jax.Array
    expected_return: jax.Array
    alpha: jax.Array
    gain: jax.Array
    epsilon: jax.Array
    bound: jax.Array


def conservative_policy_iteration(
    mdp: MDP,
    pi0: jax.Array,
    num_iterations: int,
    candidate: Callable[[MDP, jax.Array], jax.Array] = greedy_policy,
) -> tuple[jax.Array, CPIHistory]:
    """Exact CPI (003 section 4.5): ``pi_{k+1} = (1 - alpha_k) pi_k + alpha_k pi'_k``, alpha_k of eq. (61).

    ``candidate(mdp, pi_k)`` proposes pi'_k (default: the surrogate maximiser ``greedy_policy``, eq. 54
    and 62); all quantities are exact rather than estimated. Returns the final policy ``[S, A]`` and a
    ``CPIHistory``. Runs under ``lax.scan``; ``num_iterations`` and ``candidate`` are static.
    """

    def step(pi, _):
        pi_new = candidate(mdp, pi)
        terms = cpi_terms(mdp, pi, pi_new)
        alpha = cpi_step_size(terms.gain, terms.epsilon, mdp.gamma)
        ret = expected_return(mdp, pi)
        bound = _cpi_bound(ret, terms, alpha, mdp.gamma)
        record = CPIHistory(pi, ret, alpha, terms.gain, terms.epsilon, bound)
        return mixture_policy(pi, pi_new, alpha), record

    return jax.lax.scan(step, pi0, None, length=num_iterations)


# --------------------------------------------------------------------------------------------------------
# Softmax tabular policies: exact gradient, Fisher matrix, natural gradient (003 sections 3.2 and 4.6.3).
# --------------------------------------------------------------------------------------------------------


def softmax_policy(logits: jax.Array, action_mask: jax.Array | None = None) -> jax.Array:
    """``pi(a|s) = softmax(logits[s])`` over available actions; masked actions get probability 0; [S, A]."""
    chex.assert_rank(logits, 2)
    if action_mask is not None:
        logits = jnp.where(action_mask, logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1)


def softmax_expected_return(mdp: MDP, logits: jax.Array) -> jax.Array:
    """``J(softmax(logits))``; scalar, differentiable in ``logits [S, A]``."""
    return expected_return(mdp, softmax_policy(logits, _action_mask(mdp)))


def softmax_policy_gradient(mdp: MDP, logits: jax.Array) -> jax.Array:
    """Exact ``grad_logits J`` by differentiating J through the linear solve (reverse mode); ``[S, A]``."""
    return jax.grad(softmax_expected_return, argnums=1)(mdp, logits)


def softmax_policy_gradient_from_occupancy(mdp: MDP, logits: jax.Array) -> jax.Array:
    """Exact ``grad_logits J`` by the occupancy form of the policy gradient theorem (eq. 36); ``[S, A]``.

    ``1/(1 - gamma) E_{(s,a)~d_pi}[grad log pi(a|s) Q^pi(s, a)]`` with the tabular softmax score
    ``d log pi(a|s) / d logits[s', b] = 1[s = s'] (1[a = b] - pi(b|s))`` reduces to
    ``d_pi(s) pi(b|s) A^pi(s, b) / (1 - gamma)``. Independent of autodiff; must equal
    ``softmax_policy_gradient``.
    """
    pi = softmax_policy(logits, _action_mask(mdp))
    return state_action_occupancy(mdp, pi) * advantages(mdp, pi) / (1.0 - mdp.gamma)


def softmax_fisher_matrix(mdp: MDP, logits: jax.Array, state_weights: jax.Array | None = None) -> jax.Array:
    """Exact Fisher information of a tabular softmax policy w.r.t. the flattened logits; ``[S*A, S*A]``.

    ``F = sum_s w(s) E_{a~pi(.|s)}[grad log pi(a|s) grad log pi(a|s)^T]``, block diagonal with blocks
    ``w(s) (diag(pi_s) - pi_s pi_s^T)``. This is also the Hessian at ``pi`` of the w-averaged
    ``KL(pi(.|s) || pi_theta(.|s))``, TRPO's matrix A (eq. 72). ``state_weights w [S]`` defaults to the
    occupancy d_pi (eq. 67); pass a batch's empirical state frequencies to match a sampled estimate.
    Flattening is row-major: index ``s * A + a``. F is singular (each block annihilates the constant vector).
    """
    pi = softmax_policy(logits, _action_mask(mdp))
    weights = state_occupancy(mdp, pi) if state_weights is None else state_weights
    chex.assert_shape(weights, (pi.shape[0],))
    S, A = pi.shape
    blocks = weights[:, None, None] * (jax.vmap(jnp.diag)(pi) - pi[:, :, None] * pi[:, None, :])
    eye_states = jnp.eye(S, dtype=pi.dtype)
    return jnp.einsum("st,sab->satb", eye_states, blocks).reshape(S * A, S * A)


def softmax_natural_gradient(
    mdp: MDP, logits: jax.Array, state_weights: jax.Array | None = None, damping: float = 0.0
) -> jax.Array:
    """Exact natural gradient ``F^+ grad J`` of a tabular softmax policy (003 section 4.6.3, eq. 73); [S, A].

    ``damping = 0``: the minimum-norm solution of ``F x = grad J`` (what conjugate gradient started at 0
    converges to), in closed form (Kakade, 2001): at every state with ``w(s) > 0``,
    ``x[s, a] = d_pi(s) / (w(s) (1 - gamma)) (A^pi(s, a) - mean_b A^pi(s, b))`` over available actions, and 0
    at masked actions and at states with ``w(s) = 0``. With the default ``w = d_pi`` this is the centred
    advantage divided by ``1 - gamma``.
    ``damping > 0`` (a Python float): the dense solve ``(F + damping I) x = grad J``, which a damped
    conjugate gradient approximates.
    ``F`` is ``softmax_fisher_matrix(mdp, logits, state_weights)``.
    """
    mask = _action_mask(mdp)
    pi = softmax_policy(logits, mask)
    occupancy = state_occupancy(mdp, pi)
    weights = occupancy if state_weights is None else state_weights
    chex.assert_shape(weights, (pi.shape[0],))
    if damping > 0:
        fisher = softmax_fisher_matrix(mdp, logits, weights)
        gradient = softmax_policy_gradient_from_occupancy(mdp, logits).reshape(-1)
        eye = jnp.eye(fisher.shape[0], dtype=fisher.dtype)
        return jnp.linalg.solve(fisher + damping * eye, gradient).reshape(pi.shape)
    available = jnp.ones(pi.shape, bool) if mask is None else mask
    adv = jnp.where(available, advantages(mdp, pi), 0.0)
    centred = adv - jnp.sum(adv, axis=-1, keepdims=True) / jnp.sum(available, axis=-1, keepdims=True)
    positive = weights > 0
    scale = jnp.where(positive, occupancy / jnp.where(positive, weights, 1.0), 0.0) / (1.0 - mdp.gamma)
    return jnp.where(available, scale[:, None] * centred, 0.0)


# --------------------------------------------------------------------------------------------------------
# Sampling episodes and score-function gradient estimates (003 sections 3.3 and 3.4).
# --------------------------------------------------------------------------------------------------------


class TabularEpisodes(NamedTuple):
    """Episodes of a finite MDP, time-major: ``states``, ``actions`` (int32) and ``rewards`` (the dtype of
    ``mdp.r``), each ``[T, N]``; ``rewards[t] = r(states[t], actions[t])``."""

    states: jax.Array
    actions: jax.Array
    rewards: jax.Array


def _normalised_cdf(probs: jax.Array) -> jax.Array:
    """Cumulative sums over the last axis, divided by the total so that the last entry is exactly 1."""
    cdf = jnp.cumsum(probs, axis=-1)
    return cdf / cdf[..., -1:]


def _sample_from_cdf(key: jax.Array, cdf: jax.Array) -> jax.Array:
    """One index per row of ``cdf [N, K]`` by inversion: ``#{k : cdf[k] <= u}`` with ``u ~ U[0, 1)``.

    Zero-probability entries are never returned (their cdf equals the previous entry's). One uniform per
    draw: much cheaper than Gumbel-max sampling, which draws K noises per draw.
    """
    u = jax.random.uniform(key, cdf.shape[:-1] + (1,), cdf.dtype)
    return jnp.sum(cdf <= u, axis=-1).astype(jnp.int32)


def sample_episodes(
    key: jax.Array, mdp: MDP, pi: jax.Array, horizon: int, num_episodes: int
) -> TabularEpisodes:
    """Sample ``num_episodes`` independent trajectories of length ``horizon`` (eq. 14) under ``lax.scan``.

    ``s_0 ~ rho0``, ``a_t ~ pi(.|s_t)``, ``s_{t+1} ~ P(.|s_t, a_t)``. Episodes are truncated at ``horizon``:
    choose it so that ``gamma^horizon`` is negligible, or use MDPs whose episodes end in an absorbing
    zero-reward state. ``horizon`` and ``num_episodes`` are static.
    """
    _check_policy(mdp, pi)
    init_key, scan_key = jax.random.split(key)
    policy_cdf, transition_cdf = _normalised_cdf(pi), _normalised_cdf(mdp.P)
    initial_cdf = jnp.broadcast_to(_normalised_cdf(mdp.rho0), (num_episodes,) + mdp.rho0.shape)
    first_states = _sample_from_cdf(init_key, initial_cdf)

    def step(states, step_key):
        action_key, next_key = jax.random.split(step_key)
        actions = _sample_from_cdf(action_key, policy_cdf[states])
        next_states = _sample_from_cdf(next_key, transition_cdf[states, actions])
        return next_states, (states, actions, mdp.r[states, actions])

    _, (states, actions, rewards) = jax.lax.scan(step, first_states, jax.random.split(scan_key, horizon))
    return TabularEpisodes(states, actions, rewards)


def softmax_score_gradients(
    pi: jax.Array, states: jax.Array, actions: jax.Array, weights: jax.Array
) -> jax.Array:
    """Per-episode score-function estimates ``sum_t weights[t] grad_logits log pi(a_t|s_t)``; ``[N, S, A]``.

    For a tabular softmax policy ``pi = softmax(logits) [S, A]`` the score of ``(s_t, a_t)`` is
    ``onehot(s_t) (onehot(a_t) - pi(.|s_t))``. ``states``, ``actions``, ``weights`` are ``[T, N]``. With
    ``weights[t] = gamma^t G_t`` this is REINFORCE with reward-to-go, an unbiased estimate of grad J;
    ``gamma^t (G_t - b(s_t))`` adds a baseline (eq. 42); ``gamma^t A^pi(s_t, a_t)`` is the exact-advantage
    form.
    The ``gamma^t`` factor comes from eq. (34): eq. (35) and (39) as printed drop it, and without it the
    estimate is biased for the discounted objective J of eq. (17).
    """
    chex.assert_rank([pi, states, actions, weights], [2, 2, 2, 2])
    chex.assert_equal_shape([states, actions, weights])
    S, A = pi.shape
    score_rows = jax.nn.one_hot(actions, A, dtype=pi.dtype) - pi[states]
    return jnp.einsum("tn,tns,tna->nsa", weights, jax.nn.one_hot(states, S, dtype=pi.dtype), score_rows)
