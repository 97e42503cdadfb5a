"""Trust-region policy steps on parameter pytrees: conjugate gradient, Fisher-vector products, TRPO and NPG.

Everything here follows 003 section 4.6 (TRPO). The caller supplies two pure functions of the policy
parameters, evaluated on one fixed batch collected by pi_old = pi_{theta_old}:

- ``surrogate_fn(params) -> scalar``: the empirical surrogate L_hat(theta) of 003 eq. (69), an objective to
  MAXIMISE (mean of ratio times advantage; its gradient at theta_old is the policy gradient g of eq. 71);
- ``kl_fn(params) -> scalar``: the batch-mean KL(pi_old(.|s_t) || pi_theta(.|s_t)) of eq. (70). The old
  distribution must be a constant inside ``kl_fn`` (computed once from theta_old, or wrapped in
  ``jax.lax.stop_gradient``); otherwise the KL is identically zero and so is its Hessian.

The Hessian A of ``kl_fn`` at theta_old (eq. 72, the batch-averaged Fisher information) is only ever applied
to vectors (forward-over-reverse differentiation), never formed. The search direction s solves A s = g
(eq. 73) by conjugate gradient; the step is scaled by beta = sqrt(2 delta / s^T A s) (eq. 74); TRPO then
backtracks along that step until the surrogate has not decreased and the mean KL is at most delta
(section 4.6.4, step 5), while the natural policy gradient (NPG) takes the scaled step as it is.

Every function is pure and jittable (``lax.while_loop`` or ``vmap`` inside, no Python control flow on
traced values); the configuration is a frozen dataclass and therefore static under ``jax.jit``. Scalars
and metrics follow the floating dtype of the parameters (float32 by default, float64 under
``jax_enable_x64`` with float64 parameters).
"""

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from polygrad import validate

Params = Any
Metrics = dict[str, jax.Array]

# Below this value a curvature (p^T A p in CG, s^T A s for the step scale) is treated as zero: the operator
# gives no information along that direction, so CG stops and no step is taken instead of dividing by ~0.
_TINY_CURVATURE = 1e-12


def _float_dtype(tree: Params) -> jnp.dtype:
    """The promoted dtype of the floating leaves of ``tree`` (the default float dtype if there are none)."""
    leaves = [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)]
    return jnp.result_type(*leaves) if leaves else jnp.result_type(float)


def conjugate_gradient(
    matvec: Callable[[Params], Params],
    b: Params,
    max_iterations: int = 10,
    residual_tol: float = 1e-5,
) -> tuple[Params, Metrics]:
    """Approximately solve ``A x = b`` for a symmetric positive (semi-)definite operator, on pytrees.

    Plain conjugate gradient (Hestenes and Stiefel 1952; used by TRPO for eq. 73 of 003) started at x = 0.
    It stops after ``max_iterations`` products with ``matvec``, when the residual norm ||b - A x|| drops to
    ``residual_tol`` or below, or when a search direction p has p^T A p <= 1e-12 (the Krylov space is
    exhausted, or A is only semi-definite). Started at zero, the iterates stay in the range of a singular
    PSD operator, so for b in that range CG converges to the minimum-norm solution A^+ b.

    Args:
      matvec: ``v -> A v`` mapping a pytree to a pytree of the same structure (e.g. a Fisher-vector product).
      b: right-hand side, a pytree of float arrays.
      max_iterations: the largest number of ``matvec`` calls (>= 1); static.
      residual_tol: stop once ||r|| <= residual_tol, where r = b - A x is tracked by the CG recursion.

    Returns:
      ``(x, metrics)``: x has the structure of b; metrics holds scalars ``cg_iterations`` (matvec calls
      made) and ``cg_residual`` (the final residual norm ||r||).
    """
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
    if residual_tol < 0:
        raise ValueError(f"residual_tol must be >= 0, got {residual_tol}")
    dtype = _float_dtype(b)
    tol_sq = jnp.asarray(residual_tol, dtype) ** 2
    tiny = jnp.finfo(dtype).tiny

    def cond(carry):
        _, _, _, rr, iteration, breakdown = carry
        return (iteration < max_iterations) & (rr > tol_sq) & ~breakdown

    def body(carry):
        x, r, p, rr, iteration, _ = carry
        ap = matvec(p)
        p_ap = otu.tree_vdot(p, ap)
        breakdown = ~(p_ap > _TINY_CURVATURE)  # also catches NaN
        alpha = jnp.where(breakdown, 0.0, rr / jnp.where(breakdown, 1.0, p_ap)).astype(dtype)
        x = otu.tree_add_scale(x, alpha, p)
        r = otu.tree_add_scale(r, -alpha, ap)
        rr_new = otu.tree_vdot(r, r).astype(dtype)
        p = otu.tree_add_scale(r, rr_new / jnp.maximum(rr, tiny), p)
        return x, r, p, rr_new, iteration + 1, breakdown

    rr0 = otu.tree_vdot(b, b).astype(dtype)
    init = (otu.tree_zeros_like(b), b, b, rr0, jnp.int32(0), jnp.bool_(False))
    x, _, _, rr, iterations, _ = jax.lax.while_loop(cond, body, init)
    return x, {"cg_iterations": iterations, "cg_residual": jnp.sqrt(rr)}


def fisher_vector_product(
    kl_fn: Callable[[Params], jax.Array], params: Params, damping: float = 0.0
) -> Callable[[Params], Params]:
    """Return ``v -> (A + damping I) v`` with A the Hessian of the mean KL at ``params`` (003 eq. 72).

    A = grad^2_theta KL_hat(theta_old, theta) at theta = theta_old is the batch-averaged Fisher information
    of the policy. The product is taken by forward-over-reverse differentiation: ``jax.linearize`` of
    ``jax.grad(kl_fn)`` at ``params`` evaluates the forward and backward passes once and returns the
    linear map v -> A v (a Jacobian-vector product of the gradient), which CG then calls once per
    iteration. The dense matrix is never formed. ``damping`` adds a multiple of the identity (Tikhonov
    damping, as in the TRPO paper's implementation) so that A + damping I is positive definite.

    Args:
      kl_fn: ``params -> scalar`` batch-mean KL(pi_old || pi_params), with pi_old held constant.
      params: theta_old, the point at which the Hessian is taken.
      damping: non-negative multiple of the identity added to A.

    Returns:
      A function mapping a pytree like ``params`` to a pytree like ``params``.
    """
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    _, hessian_vector_product = jax.linearize(jax.grad(kl_fn), params)

    def product(vector: Params) -> Params:
        return otu.tree_add_scale(hessian_vector_product(vector), damping, vector)

    return product


@dataclasses.dataclass(frozen=True)
class TrustRegionConfig:
    """Hyperparameters of a TRPO / NPG step (Schulman et al. 2015, appendix C; 003 section 4.6.4)."""

    max_kl: float = 0.01
    """delta, the trust-region radius on the batch-mean KL(pi_old || pi) (eqs. 70 and 74)."""
    cg_iterations: int = 10
    """conjugate-gradient iterations (Fisher-vector products) for A s = g (eq. 73)."""
    cg_residual_tol: float = 1e-5
    """CG stops early once the residual norm is at most this."""
    damping: float = 0.1
    """multiple of the identity added to the Fisher matrix (CG and s^T A s both use A + damping I)."""
    backtrack_factor: float = 0.8
    """xi in (0, 1), the shrink factor of the line search (step 5 of 4.6.4)."""
    max_backtracks: int = 10
    """candidates beta s, xi beta s, xi^2 beta s, ... tried before giving up."""
    line_search: Literal["sequential", "parallel", "none"] = "sequential"
    """sequential (a lax.while_loop, stops at the first accepted step; cheapest on CPU), parallel (all
    candidates at once with vmap; no sequential dependency) or none (the natural policy gradient step)."""

    def __post_init__(self):
        validate.positive("max_kl", self.max_kl)
        validate.integer("cg_iterations", self.cg_iterations, minimum=1)
        validate.non_negative("cg_residual_tol", self.cg_residual_tol)
        validate.non_negative("damping", self.damping)
        validate.in_range("backtrack_factor", self.backtrack_factor, 0.0, 1.0, low_open=True, high_open=True)
        validate.integer("max_backtracks", self.max_backtracks, minimum=1)
        validate.one_of("line_search", self.line_search, ("sequential", "parallel", "none"))


def _tree_all_finite(tree: Params) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def natural_gradient_direction(
    surrogate_fn: Callable[[Params], jax.Array],
    kl_fn: Callable[[Params], jax.Array],
    params: Params,
    config: TrustRegionConfig,
) -> tuple[Params, jax.Array, Metrics]:
    """The scaled natural-gradient step beta s of 003 eqs. (71)-(74), shared by TRPO and NPG.

    g = grad L_hat at theta_old (eq. 71); s ~= (A + damping I)^{-1} g by CG (eq. 73); beta =
    sqrt(2 delta / s^T (A + damping I) s) (eq. 74), so that the quadratic model of the KL, beta^2 s^T A s / 2,
    equals delta. When s^T A s <= 1e-12 (zero gradient) or the step is not finite, the step is zero.

    Returns:
      ``(full_step, surrogate_old, metrics)``: full_step = beta s as a pytree like ``params``; surrogate_old =
      L_hat(theta_old); metrics: ``cg_iterations``, ``cg_residual``, ``gradient_norm`` (||g||),
      ``quadratic_form`` (s^T (A + damping I) s), ``step_scale`` (beta) and ``expected_improvement``
      (g^T beta s, the first-order prediction of the surrogate's gain from the full step).
    """
    surrogate_old, gradient = jax.value_and_grad(surrogate_fn)(params)
    fvp = fisher_vector_product(kl_fn, params, config.damping)
    direction, cg_metrics = conjugate_gradient(fvp, gradient, config.cg_iterations, config.cg_residual_tol)
    quadratic_form = otu.tree_vdot(direction, fvp(direction))
    has_curvature = quadratic_form > _TINY_CURVATURE  # False for NaN too
    step_scale = jnp.where(
        has_curvature, jnp.sqrt(2.0 * config.max_kl / jnp.where(has_curvature, quadratic_form, 1.0)), 0.0
    )
    full_step = otu.tree_scale(step_scale, direction)
    step_is_finite = _tree_all_finite(full_step)
    full_step = jax.tree.map(lambda leaf: jnp.where(step_is_finite, leaf, 0.0), full_step)
    metrics = {
        **cg_metrics,
        "gradient_norm": otu.tree_norm(gradient),
        "quadratic_form": quadratic_form,
        "step_scale": jnp.where(step_is_finite, step_scale, 0.0),
        "expected_improvement": otu.tree_vdot(gradient, full_step),
    }
    return full_step, surrogate_old, metrics


def natural_policy_gradient_step(
    surrogate_fn: Callable[[Params], jax.Array],
    kl_fn: Callable[[Params], jax.Array],
    params: Params,
    config: TrustRegionConfig,
) -> tuple[Params, Metrics]:
    """One natural policy gradient step: theta_new = theta_old + beta s (003 eqs. 73-74, no line search).

    The same direction and scale as TRPO, taken without checking the surrogate or the KL, so the KL reached
    is only approximately delta (to second order). ``config.backtrack_factor``, ``max_backtracks`` and
    ``line_search`` are unused.

    Returns:
      ``(new_params, metrics)`` (scalars in the parameters' float dtype) with the metrics of
      ``natural_gradient_direction`` plus
      ``actual_improvement`` (L_hat(theta_new) - L_hat(theta_old)), ``kl`` (mean KL at theta_new),
      ``line_search_steps`` (0), and ``step_accepted`` and ``step_fraction`` (1, or 0 when there was no
      step: a zero gradient or a non-finite direction).
    """
    full_step, surrogate_old, metrics = natural_gradient_direction(surrogate_fn, kl_fn, params, config)
    new_params = otu.tree_add(params, full_step)
    took_step = metrics["step_scale"] > 0
    # Without a step the parameters are unchanged: improvement and KL are exactly 0 (not rounding noise).
    metrics.update(
        actual_improvement=jnp.where(took_step, surrogate_fn(new_params) - surrogate_old, 0.0),
        kl=jnp.where(took_step, kl_fn(new_params), 0.0),
        line_search_steps=0,
        step_accepted=took_step,
        step_fraction=took_step,
    )
    return new_params, _as_dtype(metrics, _float_dtype(params))


def _as_dtype(metrics: Metrics, dtype) -> Metrics:
    """All metrics as scalars of one float dtype (the parameters'), so that they stack and average
    uniformly across updates and seeds."""
    return {name: jnp.asarray(value, dtype) for name, value in metrics.items()}


def trpo_step(
    surrogate_fn: Callable[[Params], jax.Array],
    kl_fn: Callable[[Params], jax.Array],
    params: Params,
    config: TrustRegionConfig,
) -> tuple[Params, Metrics]:
    """One TRPO update (003 section 4.6.4, steps 3-6) on a parameter pytree.

    ``natural_gradient_direction`` (the scaled step beta s of eqs. 71-74), then
    ``backtracking_line_search``: the first theta_k = theta_old + xi^k beta s, k = 0, ..., max_backtracks - 1,
    with L_hat(theta_k) >= L_hat(theta_old) and KL_hat(theta_old, theta_k) <= delta (both finite) is
    accepted; if none is, or the step is zero (a zero gradient), theta_old is returned unchanged (no step).
    With ``config.line_search == "none"`` this is ``natural_policy_gradient_step``.

    Returns:
      ``(new_params, metrics)``. Metrics (scalars in the parameters' float dtype): ``cg_iterations``,
      ``cg_residual``, ``gradient_norm``, ``quadratic_form`` (s^T A s), ``step_scale`` (beta),
      ``expected_improvement`` (g^T (theta_new - theta_old), 0 without a step), ``actual_improvement``
      (L_hat(theta_new) - L_hat(theta_old)), ``kl`` (mean KL at theta_new), ``line_search_steps``
      (candidates evaluated), ``step_fraction`` (xi^k of the accepted candidate, 0 if none) and
      ``step_accepted`` (1.0 or 0.0).
    """
    if config.line_search == "none":
        return natural_policy_gradient_step(surrogate_fn, kl_fn, params, config)
    full_step, surrogate_old, metrics = natural_gradient_direction(surrogate_fn, kl_fn, params, config)
    new_params, search_metrics = backtracking_line_search(
        surrogate_fn, kl_fn, params, full_step, surrogate_old, config
    )
    metrics.update(search_metrics)
    metrics["expected_improvement"] = search_metrics["step_fraction"] * metrics["expected_improvement"]
    return new_params, _as_dtype(metrics, _float_dtype(params))


def backtracking_line_search(
    surrogate_fn: Callable[[Params], jax.Array],
    kl_fn: Callable[[Params], jax.Array],
    params: Params,
    full_step: Params,
    surrogate_old: jax.Array,
    config: TrustRegionConfig,
) -> tuple[Params, Metrics]:
    """TRPO's backtracking line search along ``full_step`` (003 section 4.6.4, step 5).

    Tries theta_k = params + xi^k full_step for k = 0, ..., max_backtracks - 1 (xi = backtrack_factor)
    and returns the first with L_hat(theta_k) - surrogate_old >= 0 and KL_hat(theta_old, theta_k) <=
    max_kl (both finite), or ``params`` unchanged if there is none or ``full_step`` is zero (there is
    no step to take). ``config.line_search`` chooses a ``lax.while_loop`` that stops at the first accepted
    candidate ("sequential") or one ``vmap`` over all of them ("parallel"); "none" takes the full step
    without any test (the natural policy gradient).

    Returns:
      ``(new_params, metrics)``; metrics: ``actual_improvement`` and ``kl`` of the accepted candidate (0 if
      none), ``line_search_steps`` (candidates evaluated: k + 1, or max_backtracks if none was accepted;
      0 for "none"), ``step_fraction`` (xi^k, or 0) and ``step_accepted`` (1.0 or 0.0), all scalars in the
      parameters' float dtype.
    """
    dtype = _float_dtype(params)
    has_step = jnp.any(jnp.stack([jnp.any(leaf != 0) for leaf in jax.tree.leaves(full_step)]))
    if config.line_search == "none":
        candidate = otu.tree_add(params, full_step)
        accepted, fraction, steps = has_step, jnp.ones((), dtype), jnp.int32(0)
        improvement, kl = surrogate_fn(candidate) - surrogate_old, kl_fn(candidate)
    else:
        search = _sequential_line_search if config.line_search == "sequential" else _parallel_line_search
        accepted, fraction, steps, improvement, kl = search(surrogate_fn, kl_fn, params, full_step,
                                                            surrogate_old, config, dtype)
        accepted = accepted & has_step
    fraction = jnp.where(accepted, fraction, 0.0)
    metrics = {
        "actual_improvement": jnp.where(accepted, improvement, 0.0),
        "kl": jnp.where(accepted, kl, 0.0),
        "line_search_steps": steps,
        "step_fraction": fraction,
        "step_accepted": accepted,
    }
    return otu.tree_add_scale(params, fraction, full_step), _as_dtype(metrics, dtype)


def _candidate_test(surrogate_fn, kl_fn, params, full_step, surrogate_old, fraction, max_kl):
    """Evaluate theta_old + fraction * full_step: (accepted, improvement, kl) per 003 4.6.4 step 5."""
    candidate = otu.tree_add_scale(params, fraction, full_step)
    improvement = surrogate_fn(candidate) - surrogate_old
    kl = kl_fn(candidate)
    accepted = jnp.isfinite(improvement) & jnp.isfinite(kl) & (improvement >= 0) & (kl <= max_kl)
    return accepted, improvement, kl


def _sequential_line_search(surrogate_fn, kl_fn, params, full_step, surrogate_old, config, dtype):
    """Backtracking in a ``lax.while_loop`` that stops at the first accepted candidate."""
    factor = jnp.asarray(config.backtrack_factor, dtype)

    def cond(carry):
        steps, accepted, *_ = carry
        return (steps < config.max_backtracks) & ~accepted

    def body(carry):
        steps, _, _, _, _ = carry
        fraction = factor**steps
        accepted, improvement, kl = _candidate_test(surrogate_fn, kl_fn, params, full_step, surrogate_old,
                                                    fraction, config.max_kl)
        return steps + 1, accepted, fraction, improvement.astype(dtype), kl.astype(dtype)

    zero = jnp.zeros((), dtype)
    init = (jnp.int32(0), jnp.bool_(False), zero, zero, zero)
    steps, accepted, fraction, improvement, kl = jax.lax.while_loop(cond, body, init)
    return accepted, fraction, steps, improvement, kl


def _parallel_line_search(surrogate_fn, kl_fn, params, full_step, surrogate_old, config, dtype):
    """All candidates evaluated together with ``vmap``; the first accepted one (smallest k) wins."""
    fractions = jnp.asarray(config.backtrack_factor, dtype) ** jnp.arange(config.max_backtracks, dtype=dtype)
    accepted, improvement, kl = jax.vmap(
        lambda fraction: _candidate_test(surrogate_fn, kl_fn, params, full_step, surrogate_old, fraction,
                                         config.max_kl)
    )(fractions)
    first = jnp.argmax(accepted)  # index of the first True (0 when none; masked below)
    any_accepted = jnp.any(accepted)
    steps = jnp.where(any_accepted, first + 1, config.max_backtracks).astype(jnp.int32)
    return any_accepted, fractions[first], steps, improvement[first], kl[first]
