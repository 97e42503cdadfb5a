"""Supervised learning of a language model on fixed data: SFT, a Bradley-Terry reward model, DPO.

The stages of the RLHF pipeline (004, "PPO - RLHF"; Ouyang et al. 2022) that need no sampling:

- SFT: maximum likelihood of response tokens given prompts, the masked next-token NLL
  -sum_{i,t} m_{i,t} log pi(y_{i,t} | x_i, y_{i,<t}) / sum m                     -> `supervised_loss`,
  `fit_supervised`
- reward model: the SFT transformer with its LM head replaced by a scalar head (here the model's optional
  value head) read at the last response token, r(x, y) = v(x, y)_{last}, trained with the Bradley-Terry
  loss -log sigmoid(r(x, y_w) - r(x, y_l)) (Ouyang et al. 2022, eq. 1)          -> `sequence_scores`,
  `reward_model_loss`, `fit_reward_model`
- DPO (Rafailov et al. 2023, eq. 7) on the same comparisons                      -> `dpo_model_loss`

`fit` is the one loop: `num_steps` optimiser steps (`polygrad.optim.gradient_step`), each on `batch_size`
rows drawn uniformly with replacement from the data. Everything here is a pure function; `fit*` jit with
the model, optimiser, step count and batch size static. Token batches are ``[B, T]``: prompts
``[B, P]`` (left-padded), responses ``[B, L]`` with a float response mask ``[B, L]`` (1 up to and
including EOS, `sampling.response_mask`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from polygrad import optim
from polygrad.estimators import statistics
from polygrad.lm import sampling
from polygrad.lm.transformer import TransformerLM
from polygrad.losses import preference


class FitResult(NamedTuple):
    """Parameters and optimiser state after `fit`, and its per-step metrics ``{name: [num_steps]}``."""

    params: Any
    opt_state: Any
    metrics: dict[str, jax.Array]


def fit(loss_fn: optim.LossFn, tx: optax.GradientTransformation, params: Any, data: Any, key: jax.Array,
        num_steps: int, batch_size: int, opt_state: Any = None, num_rows: int | jax.Array | None = None
        ) -> FitResult:
    """``num_steps`` gradient steps on ``loss_fn(params, batch) -> (loss, metrics)``.

    Step s draws ``batch_size`` row indices uniformly (with replacement) from the first ``num_rows`` rows
    (all rows if None; a traced integer is fine, so one compilation serves data sets of several sizes padded
    to one shape) with the s-th key of ``jax.random.split(key, num_steps)`` and takes one
    `optim.gradient_step` on those rows of ``data`` (a pytree whose leaves share the leading axis
    ``[N, ...]``). ``opt_state`` None: ``tx.init(params)``; pass the returned state to continue a fit in
    several calls. Jittable with ``loss_fn``, ``tx``, ``num_steps`` and ``batch_size`` static;
    ``num_steps = 0`` returns the inputs.
    """
    n = jax.tree.leaves(data)[0].shape[0] if num_rows is None else num_rows
    opt_state = tx.init(params) if opt_state is None else opt_state
    metric_shapes = jax.eval_shape(lambda p, b: optim.gradient_step(loss_fn, tx, p, opt_state, b)[2], params,
                                   jax.tree.map(lambda x: x[:batch_size], data))

    def step(carry, step_key):
        params, opt_state = carry
        rows = jax.random.randint(step_key, (batch_size,), 0, n)
        batch = jax.tree.map(lambda x: x[rows], data)
        params, opt_state, metrics = optim.gradient_step(loss_fn, tx, params, opt_state, batch)
        return (params, opt_state), metrics

    if num_steps == 0:
        empty = jax.tree.map(lambda s: jnp.zeros((0, *s.shape), s.dtype), metric_shapes)
        return FitResult(params, opt_state, empty)
    (params, opt_state), metrics = jax.lax.scan(step, (params, opt_state), jax.random.split(key, num_steps))
    return FitResult(params, opt_state, metrics)


def sequence_log_prob(model: TransformerLM, params, prompts: jax.Array, responses: jax.Array,
                      mask: jax.Array) -> jax.Array:
    """log pi(y | x) = sum_t m_t log pi(y_t | x, y_<t) of each response, ``[B]`` (teacher-forced)."""
    forced = sampling.sequence_log_probs(model, params, prompts, responses)
    chex.assert_equal_shape([forced.log_probs, mask])
    return jnp.sum(jnp.where(mask > 0, forced.log_probs, 0.0), axis=1)


def supervised_loss(model: TransformerLM, params, prompts: jax.Array, responses: jax.Array,
                    mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked next-token NLL of ``responses [B, L]`` given ``prompts [B, P]``, averaged over the active
    tokens of the batch (``mask [B, L]``): the SFT loss (maximum likelihood). Metrics: ``nll`` (the
    loss, stop-gradient)."""
    chex.assert_rank([prompts, responses, mask], 2)
    chex.assert_equal_shape([responses, mask])
    forced = sampling.sequence_log_probs(model, params, prompts, responses)
    loss = -statistics.masked_mean(forced.log_probs, mask)
    return loss, {"nll": jax.lax.stop_gradient(loss)}


def fit_supervised(model: TransformerLM, params, tx: optax.GradientTransformation, prompts: jax.Array,
                   responses: jax.Array, mask: jax.Array, key: jax.Array, num_steps: int,
                   batch_size: int) -> FitResult:
    """SFT: ``num_steps`` steps of `supervised_loss` on minibatches of ``batch_size`` (prompt, response)
    rows drawn with replacement (see `fit`). Returns `FitResult` with metrics ``nll`` and ``grad_norm``
    per step. Jit it with ``model``, ``tx``, ``num_steps`` and ``batch_size`` static."""
    chex.assert_equal_shape_prefix([prompts, responses, mask], 1)

    def loss_fn(params, batch):
        return supervised_loss(model, params, *batch)

    return fit(loss_fn, tx, params, (prompts, responses, jnp.asarray(mask, jnp.float32)), key, num_steps,
               batch_size)


def sequence_scores(model: TransformerLM, params, prompts: jax.Array, responses: jax.Array,
                    mask: jax.Array) -> jax.Array:
    """Scalar scores r(x, y) ``[B]``: the model's value head read at the last response token (EOS when
    there is one), i.e. after the whole prompt and response have been seen. An all-masked row reads the
    last prompt token. ``model.value_head`` must be True."""
    chex.assert_rank([prompts, responses, mask], 2)
    chex.assert_equal_shape([responses, mask])
    if not model.value_head:
        raise ValueError("sequence_scores needs a model with value_head=True (the scalar head)")
    out = model.apply(params, jnp.concatenate([prompts, responses], axis=1))
    last = prompts.shape[1] + jnp.sum(mask > 0, axis=1) - 1
    return jnp.take_along_axis(out.values, last[:, None].astype(jnp.int32), axis=1)[:, 0]


def reward_model_loss(model: TransformerLM, params, prompts: jax.Array, chosen: jax.Array,
                      rejected: jax.Array, chosen_mask: jax.Array, rejected_mask: jax.Array,
                      label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Bradley-Terry loss (`preference.bradley_terry_loss`) of the `sequence_scores` of the chosen and
    rejected responses ``[B, L]`` to ``prompts [B, P]``; one forward pass over both. Metrics: those of
    `bradley_terry_loss` (accuracy, margin, mean chosen and rejected scores)."""
    both = sequence_scores(model, params, jnp.concatenate([prompts, prompts]),
                           jnp.concatenate([chosen, rejected]), jnp.concatenate([chosen_mask, rejected_mask]))
    r_w, r_l = jnp.split(both, 2)
    return preference.bradley_terry_loss(r_w, r_l, label_smoothing)


def fit_reward_model(model: TransformerLM, params, tx: optax.GradientTransformation, prompts: jax.Array,
                     chosen: jax.Array, rejected: jax.Array, chosen_mask: jax.Array, rejected_mask: jax.Array,
                     key: jax.Array, num_steps: int, batch_size: int, label_smoothing: float = 0.0,
                     opt_state: Any = None, num_rows: int | jax.Array | None = None) -> FitResult:
    """Fit a reward model (initialised from the SFT parameters, value head as the scalar head) to
    comparisons with the Bradley-Terry loss: ``num_steps`` steps on ``batch_size`` pairs drawn from the
    first ``num_rows`` (see `fit`). Metrics per step: loss, accuracy, margin, reward_chosen,
    reward_rejected, grad_norm."""
    chex.assert_equal_shape([chosen, rejected, chosen_mask, rejected_mask])

    def loss_fn(params, batch):
        return reward_model_loss(model, params, *batch, label_smoothing=label_smoothing)

    def with_loss(params, batch):
        loss, metrics = loss_fn(params, batch)
        return loss, {"loss": loss, **metrics}

    data = (prompts, chosen, rejected, jnp.asarray(chosen_mask, jnp.float32),
            jnp.asarray(rejected_mask, jnp.float32))
    return fit(with_loss, tx, params, data, key, num_steps, batch_size, opt_state, num_rows)


def dpo_model_loss(model: TransformerLM, params, prompts: jax.Array, chosen: jax.Array, rejected: jax.Array,
                   chosen_mask: jax.Array, rejected_mask: jax.Array, ref_logp_chosen: jax.Array,
                   ref_logp_rejected: jax.Array, beta: float | jax.Array, label_smoothing: float = 0.0
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`preference.dpo_loss` of the policy's sequence log-probabilities of chosen and rejected responses
    ``[B, L]`` (one forward pass over both), with the reference's ``[B]`` log-probabilities precomputed."""
    both = sequence_log_prob(model, params, jnp.concatenate([prompts, prompts]),
                             jnp.concatenate([chosen, rejected]),
                             jnp.concatenate([chosen_mask, rejected_mask]))
    logp_w, logp_l = jnp.split(both, 2)
    return preference.dpo_loss(logp_w, logp_l, ref_logp_chosen, ref_logp_rejected, beta, label_smoothing)

