"""Learning from pairwise preferences: the Bradley-Terry reward-model loss, DPO, the KL-penalised RLHF
reward, and best-of-n sampling.

The RLHF pipeline of 004 ("PPO - RLHF") and 002 (Part II, phase 3) in pure functions of arrays:

- reward model (Christiano et al. 2017; Ouyang et al. 2022, eq. 1): a scalar r(x, y) fit to comparisons
  "y_w preferred to y_l" by maximum likelihood under the Bradley-Terry model
  P(y_w > y_l | x) = sigmoid(r(x, y_w) - r(x, y_l))                                  -> `bradley_terry_loss`
- RL against the frozen reward model with the KL to the SFT policy folded into the reward (Ziegler et al.
  2019; Ouyang et al. 2022, eq. 2): R(x, y) = r(x, y) - beta log(pi(y|x) / pi_SFT(y|x)), paid per token as
  -beta (log pi - log pi_SFT) at every token plus r at the last                -> `kl_penalized_rewards`
- DPO (Rafailov et al. 2023, eq. 7): the same KL-regularised objective solved in closed form,
  pi*(y|x) proportional to pi_ref(y|x) exp(r(x, y) / beta), so that r = beta log(pi / pi_ref) + beta log Z(x)
  and the Bradley-Terry likelihood becomes a loss on the policy itself                 -> `dpo_loss`
- best-of-n (Stiennon et al. 2020; Gao, Schulman, Hilton 2022): sample n responses from the reference, keep
  the one the proxy reward ranks highest; KL(pi_bon || pi_ref) = log n - (n - 1) / n   -> `best_of_n_kl`,
  `best_of_n_estimate`, `best_of_n_distribution`

Shapes: one row per comparison or response, `[B]` sequence quantities (a sequence log-probability is the
masked sum of its token log-probabilities), `[B, T]` token quantities with a response mask. Every loss
returns `(loss, metrics)` with `loss` a scalar to minimise; every function follows the dtype of its
inputs.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from polygrad import validate
from polygrad.losses import parts


def _bt_terms(margin: jax.Array, label_smoothing: float) -> jax.Array:
    """-(1 - eps) log sigmoid(m) - eps log sigmoid(-m), elementwise (stable for any m)."""
    loss = -jax.nn.log_sigmoid(margin)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * jax.nn.log_sigmoid(-margin)
    return loss


def bradley_terry_loss(rewards_chosen: jax.Array, rewards_rejected: jax.Array, label_smoothing: float = 0.0,
                       weights: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Negative log-likelihood of preferences under the Bradley-Terry model (Ouyang et al. 2022, eq. 1).

        loss = mean_i -log sigmoid(r_w,i - r_l,i)

    with ``label_smoothing`` eps the conservative variant -(1 - eps) log sigmoid(m) - eps log sigmoid(-m)
    (labels flipped with probability eps). Gradient: d loss / d r_w,i = -sigmoid(-(r_w,i - r_l,i)) / B and
    d loss / d r_l,i = +sigmoid(-(r_w,i - r_l,i)) / B (eps = 0).

    Args:
      rewards_chosen: ``[B]`` scores r(x, y_w) of the preferred responses.
      rewards_rejected: ``[B]`` scores r(x, y_l) of the other responses.
      label_smoothing: eps in [0, 0.5).
      weights: optional ``[B]`` non-negative weights (e.g. a validity mask); the loss is their weighted mean
        (0 when they sum to 0).

    Returns:
      ``(loss, metrics)``: metrics ``accuracy`` (share of pairs with r_w > r_l; ties count half),
      ``margin`` (mean r_w - r_l), ``reward_chosen``, ``reward_rejected`` (means), all stop-gradient.
    """
    chex.assert_rank([rewards_chosen, rewards_rejected], 1)
    chex.assert_equal_shape([rewards_chosen, rewards_rejected])
    validate.in_range("label_smoothing", label_smoothing, 0.0, 0.5, high_open=True)
    dtype = rewards_chosen.dtype
    w = jnp.ones(rewards_chosen.shape, dtype) if weights is None else jnp.asarray(weights, dtype)
    chex.assert_equal_shape([w, rewards_chosen])
    total = jnp.sum(w)
    safe = jnp.where(total > 0, total, jnp.ones((), dtype))

    def mean(x):
        return jnp.sum(w * x) / safe

    margin = rewards_chosen - rewards_rejected
    loss = mean(_bt_terms(margin, label_smoothing))
    sg = jax.lax.stop_gradient
    correct = jnp.where(margin > 0, 1.0, jnp.where(margin == 0, 0.5, 0.0)).astype(dtype)
    metrics = {
        "accuracy": sg(mean(correct)),
        "margin": sg(mean(margin)),
        "reward_chosen": sg(mean(rewards_chosen)),
        "reward_rejected": sg(mean(rewards_rejected)),
    }
    return loss, metrics


def dpo_implicit_reward(logp: jax.Array, ref_logp: jax.Array, beta: float | jax.Array) -> jax.Array:
    """DPO's implicit reward beta log(pi(y|x) / pi_ref(y|x)) (Rafailov et al. 2023, eq. 5 without the
    prompt-only term beta log Z(x), which cancels in every comparison). Any equal shapes, e.g. ``[B]``
    sequence log-probabilities."""
    chex.assert_equal_shape([logp, ref_logp])
    return beta * (logp - ref_logp)


def dpo_loss(logp_chosen: jax.Array, logp_rejected: jax.Array, ref_logp_chosen: jax.Array,
             ref_logp_rejected: jax.Array, beta: float | jax.Array, label_smoothing: float = 0.0,
             weights: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Direct Preference Optimisation (Rafailov et al. 2023, eq. 7): the Bradley-Terry loss of the implicit
    rewards,

        loss = mean_i -log sigmoid(beta [(log pi(y_w|x) - log pi_ref(y_w|x))
                                         - (log pi(y_l|x) - log pi_ref(y_l|x))])

    Its gradient (eq. 8) is -beta sigmoid(r_hat_l - r_hat_w) (grad log pi(y_w) - grad log pi(y_l)) per pair:
    d loss / d log pi(y_w|x)_i = -beta sigmoid(-z_i) / B with z_i the bracket times beta.

    Args:
      logp_chosen, logp_rejected: ``[B]`` sequence log-probabilities under the policy (differentiated).
      ref_logp_chosen, ref_logp_rejected: ``[B]`` the same under the frozen reference (constants).
      beta: the KL coefficient of the objective it solves (> 0; a float or a traced scalar).
      label_smoothing, weights: as in `bradley_terry_loss` (eps > 0: conservative DPO, Mitchell 2023).

    Returns:
      ``(loss, metrics)``: the `bradley_terry_loss` metrics of the implicit rewards (``accuracy``,
      ``margin``, ``reward_chosen``, ``reward_rejected``) plus ``logp_chosen``, ``logp_rejected`` (means).
    """
    chex.assert_rank([logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected], 1)
    chex.assert_equal_shape([logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected])
    if isinstance(beta, int | float):
        validate.positive("beta", beta)
    sg = jax.lax.stop_gradient
    chosen = dpo_implicit_reward(logp_chosen, sg(ref_logp_chosen), beta)
    rejected = dpo_implicit_reward(logp_rejected, sg(ref_logp_rejected), beta)
    loss, metrics = bradley_terry_loss(chosen, rejected, label_smoothing, weights)
    metrics = {**metrics, "logp_chosen": sg(jnp.mean(logp_chosen)),
               "logp_rejected": sg(jnp.mean(logp_rejected))}
    return loss, metrics


def kl_penalized_rewards(scores: jax.Array, logp: jax.Array, logp_ref: jax.Array, mask: jax.Array,
                         kl_coef: float | jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token RLHF rewards with the KL to the reference folded in (Ziegler et al. 2019; Ouyang et al.
    2022, eq. 2):

        r_t = -beta (log pi_old(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t))  +  [t = last token] r(x, y)

    so that sum_t r_t = r(x, y) - beta k1(y), k1 the sampled sequence log-ratio, an unbiased estimate of
    KL(pi_old || pi_ref) for y ~ pi_old (003 eq. 87). The per-token rewards are those of the loss
    vocabulary, `parts.fold_kl_into_rewards(parts.outcome_token_rewards(scores, mask), ..., "k1")`; this
    function adds the per-response KL that RLHF logs.

    Args:
      scores: ``[B]`` reward-model scores r(x, y).
      logp, logp_ref: ``[B, T]`` token log-probabilities of the sampled responses under the sampling policy
        and the reference (both treated as constants).
      mask: ``[B, T]`` response mask (1 up to and including EOS); the score goes to the last active token.
      kl_coef: beta >= 0 (a float or a traced scalar, so runs with several coefficients can be vmapped).

    Returns:
      ``(token_rewards [B, T], kl [B])``: zeros on padding, and the per-response sum of log-ratios.
    """
    chex.assert_rank([scores, logp, logp_ref, mask], [1, 2, 2, 2])
    chex.assert_equal_shape([logp, logp_ref, mask])
    chex.assert_axis_dimension(scores, 0, logp.shape[0])
    dtype = logp.dtype
    mask = jnp.asarray(mask, dtype)
    outcome = parts.outcome_token_rewards(jnp.asarray(scores, dtype), mask)
    rewards = parts.fold_kl_into_rewards(outcome, logp, logp_ref, mask, kl_coef, "k1")
    log_ratio = jnp.where(mask > 0, jax.lax.stop_gradient(logp - logp_ref), jnp.zeros((), dtype))
    return rewards, jnp.sum(log_ratio, axis=1)


def best_of_n_kl(n: int | jax.Array) -> jax.Array:
    """KL(pi_bon || pi_ref) = log n - (n - 1) / n of best-of-n sampling (Stiennon et al. 2020, appendix;
    Gao et al. 2022, section 2.2): exact when the proxy score has a continuous distribution under pi_ref
    (no ties), an upper bound for discrete ones (Beirami et al. 2024). Any shape of ``n >= 1``."""
    n = jnp.asarray(n, jnp.result_type(float))
    return jnp.log(n) - (n - 1.0) / n


def best_of_n_distribution(probs: jax.Array, scores: jax.Array, n: int | jax.Array) -> jax.Array:
    """Exact best-of-n distribution of a discrete reference ``probs [K]`` whose outcomes have distinct
    ``scores [K]``: P_n(k) = F(k)^n - F(k-)^n with F the reference CDF in increasing score order. ``[K]``."""
    chex.assert_rank([probs, scores], 1)
    chex.assert_equal_shape([probs, scores])
    order = jnp.argsort(scores)
    cdf = jnp.cumsum(probs[order])
    below = cdf - probs[order]
    sorted_bon = cdf**n - jnp.clip(below, 0.0, None) ** n
    return jnp.zeros_like(probs).at[order].set(sorted_bon)


def best_of_n_estimate(proxy: jax.Array, values: jax.Array, n: int | jax.Array) -> jax.Array:
    """Unbiased estimate of E[value of the proxy-best of n samples] from a pool of m >= n samples per
    prompt (Gao et al. 2022, appendix: the best of n drawn without replacement from m i.i.d. samples is
    distributed as the best of n i.i.d. samples).

    With the pool sorted by increasing proxy score, sample i (1-indexed) is the best of a random n-subset
    with probability C(i - 1, n - 1) / C(m, n); the estimate is the weighted sum of ``values``. Ties in the
    proxy are broken by the sort order.

    Args:
      proxy: ``[P, m]`` proxy scores of m samples for each of P prompts.
      values: ``[P, m]`` what to average (gold reward, proxy reward, ...).
      n: 1 <= n <= m (a Python int or a traced integer scalar).

    Returns:
      ``[P]`` per-prompt estimates (average them over prompts).
    """
    chex.assert_rank([proxy, values], 2)
    chex.assert_equal_shape([proxy, values])
    m = proxy.shape[1]
    if isinstance(n, int):
        validate.integer("n", n, minimum=1, maximum=m)
    order = jnp.argsort(proxy, axis=1)
    sorted_values = jnp.take_along_axis(values, order, axis=1)
    dtype = jnp.result_type(values.dtype, jnp.float32)
    i = jnp.arange(1, m + 1, dtype=dtype)
    nf = jnp.asarray(n, dtype)
    lg = jax.scipy.special.gammaln

    def log_choose(a, b):
        return lg(a + 1) - lg(b + 1) - lg(a - b + 1)

    log_w = log_choose(i - 1, nf - 1) - log_choose(jnp.asarray(m, dtype), nf)
    weights = jnp.where(i >= nf, jnp.exp(jnp.where(i >= nf, log_w, 0.0)), 0.0)
    return jnp.sum(weights[None] * sorted_values, axis=1).astype(values.dtype)
