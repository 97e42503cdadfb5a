"""Where the KL to the reference goes, and which estimator: the bias of each expected gradient, exactly.

    python -m experiments.kl_placement                     # writes runs/kl_placement/
    python -m experiments.kl_placement --out /tmp/kl --vocab 6 --scales 0.1 1.0

The regularised objective is J(theta) - beta KL(pi_theta || pi_ref). Every configuration below adds a
per-sample term to polygrad's loss (`losses.policy_loss`, the same code a training run uses); its expected
gradient is computed exactly by enumerating the outcomes (sum_x q(x) grad loss(x), the sampling
distribution q held fixed, as a sampled gradient is) and compared with the exact gradient of the KL:

    bias = || E[grad loss] - grad KL || / || grad KL ||      (0: unbiased; 1: as wrong as no penalty)

Settings:
  - token, on-policy: one categorical token, x ~ pi_theta.
  - token, off-policy: x ~ pi_old != pi_theta (the data of the second and later PPO / GRPO steps).
  - sequence: two tokens y1 ~ pi(.), y2 ~ pi(. | y1), on-policy; the KL is that of the sequence
    distribution, sum_t E[KL(pi(. | s_t) || ref(. | s_t))].
Placements (see `polygrad.losses.parts`, "KL to the reference policy"):
  - loss: kl_estimator in the loss (k1, k2, k3, abs; "+" = the estimator's value with k2's gradient;
    "k * r" = times pi_theta / pi_old per token, DeepSeek-V3.2 eq. 7 / TRL use_bias_correction_kl).
  - reward: -k folded into the rewards (`fold_kl_into_rewards`) and differentiated by the score function:
    REINFORCE with the reward-to-go of the shaped rewards (InstructGPT, REINFORCE++); off-policy with the
    importance weight r (NoGate, r A).
Reference policies at several distances from pi_theta: ref logits = theta logits + scale * noise.

The run folder gets table.md / table.csv (the printed table), numbers.json, config.json and
kl_placement.png (bias against KL(pi || ref) for each configuration).
"""

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from polygrad import losses
from polygrad.estimators import distributions

LOSS_ESTIMATORS = ("k1", "k2", "k3", "abs", "k1+", "k3+", "abs+")
CORRECTED = ("k1", "k3")  # with kl_is_correction="token"
REWARD_ESTIMATORS = ("k1", "k2", "k3")


@dataclasses.dataclass(frozen=True)
class KLPlacementConfig:
    """Sizes and distances of the exact KL-gradient study."""

    out: str = "runs/kl_placement"
    """run folder for the table, numbers.json and the figure."""
    vocab: int = 8
    """outcomes of each token."""
    scales: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)
    """reference logits = policy logits + scale * standard normal noise."""
    old_scale: float = 0.5
    """off-policy: pi_old logits = policy logits + old_scale * noise."""
    seed: int = 0
    """seed of the logits."""

    def __post_init__(self):
        from polygrad import validate

        validate.integer("vocab", self.vocab, minimum=2, maximum=64)
        for scale in self.scales:
            validate.positive("scales", scale)
        validate.positive("old_scale", self.old_scale)


def _config(placement: str, estimator: str) -> losses.LossConfig:
    """The loss of one configuration: a KL term in the loss, or a score-function loss on shaped rewards."""
    if placement == "reward":
        return losses.LossConfig(gate=losses.ScoreFunction(), aggregation="token_sum")
    if placement == "reward_is":
        return losses.LossConfig(gate=losses.NoGate(), aggregation="token_sum")
    correction = "token" if placement == "loss_corrected" else "none"
    return losses.LossConfig(gate=losses.NoGate(), aggregation="token_sum", kl_coef=1.0,
                             kl_estimator=estimator, kl_is_correction=correction)


def _sample_loss(config, logp, logp_old, logp_ref, placement, estimator):
    """polygrad's loss for one sampled sequence `[T]` of log-probs (logp differentiated)."""
    mask = jnp.ones((1, logp.shape[0]), logp.dtype)
    if placement.startswith("reward"):
        shaped = losses.fold_kl_into_rewards(jnp.zeros_like(mask), logp_old[None], logp_ref[None], mask, 1.0,
                                             estimator)
        returns = jnp.cumsum(shaped[:, ::-1], axis=1)[:, ::-1]  # reward-to-go
        return losses.policy_loss(config, logp[None], logp_old[None], returns, mask)[0]
    zero = jnp.zeros((1, logp.shape[0]), logp.dtype)
    return losses.policy_loss(config, logp[None], logp_old[None], zero, mask, logp_ref=logp_ref[None])[0]


def token_study(theta, ref, old, placement, estimator):
    """Expected gradient of one categorical token; x ~ softmax(old) (old = theta: on-policy)."""
    config = _config(placement, estimator)
    log_old = jax.nn.log_softmax(old)
    log_ref = jax.nn.log_softmax(ref)

    def grad_at(x):
        def f(t):
            logp = jax.nn.log_softmax(t)[x][None]
            return _sample_loss(config, logp, log_old[x][None], log_ref[x][None], placement, estimator)

        return jax.grad(f)(theta)

    per_outcome = jax.vmap(grad_at)(jnp.arange(theta.shape[0]))
    return jnp.exp(log_old) @ per_outcome


def sequence_study(theta, ref, placement, estimator):
    """Expected gradient for two tokens y1 ~ pi(.), y2 ~ pi(.|y1), on-policy. theta = (t1 [A], t2 [A, A])."""
    config = _config(placement, estimator)
    size = theta[0].shape[0]
    y1, y2 = jnp.meshgrid(jnp.arange(size), jnp.arange(size), indexing="ij")
    y1, y2 = y1.reshape(-1), y2.reshape(-1)

    def logps(params, a, b):
        return jnp.stack([jax.nn.log_softmax(params[0])[a], jax.nn.log_softmax(params[1][a])[b]])

    def grad_at(a, b):
        lp_old = jax.lax.stop_gradient(logps(theta, a, b))
        lp_ref = logps(ref, a, b)

        def f(params):
            return _sample_loss(config, logps(params, a, b), lp_old, lp_ref, placement, estimator)

        return jax.grad(f)(theta)

    grads = jax.vmap(grad_at)(y1, y2)
    prob = jnp.exp(jax.vmap(lambda a, b: jnp.sum(logps(theta, a, b)))(y1, y2))
    return jax.tree.map(lambda g: jnp.tensordot(prob, g, axes=1), grads)


def sequence_kl(theta, ref):
    """KL of the two-token sequence distributions: KL_1 + sum_a pi(a) KL_2(. | a)."""
    pi1 = jax.nn.softmax(theta[0])
    second = distributions.categorical_kl(theta[1], ref[1])
    return distributions.categorical_kl(theta[0], ref[0]) + pi1 @ second


def _relative(got, exact) -> float:
    got, exact = jax.tree.leaves(got), jax.tree.leaves(exact)
    diff = sum(float(jnp.sum((g - e) ** 2)) for g, e in zip(got, exact, strict=True))
    norm = sum(float(jnp.sum(e**2)) for e in exact)
    return float(np.sqrt(diff / norm))


def configurations(setting: str) -> list[tuple[str, str, str]]:
    """(label, placement, estimator) of every configuration studied in a setting."""
    rows = [(f"{e} in loss", "loss", e) for e in LOSS_ESTIMATORS]
    rows += [(f"{e} * r in loss", "loss_corrected", e) for e in CORRECTED]
    if setting == "token, off-policy":
        rows += [(f"{e} in reward (IS)", "reward_is", e) for e in REWARD_ESTIMATORS]
    else:
        rows += [(f"{e} in reward", "reward", e) for e in REWARD_ESTIMATORS]
    return rows


def study(config: KLPlacementConfig) -> dict[str, Any]:
    """Bias of every configuration in every setting at every reference distance."""
    rng = np.random.default_rng(config.seed)
    size = config.vocab
    results = {"settings": {}, "kl": {}}
    with jax.enable_x64(True):
        theta = jnp.asarray(rng.standard_normal(size))
        noise = jnp.asarray(rng.standard_normal(size))
        old = theta + config.old_scale * jnp.asarray(rng.standard_normal(size))
        theta_seq = (theta, jnp.asarray(rng.standard_normal((size, size))))
        noise_seq = (noise, jnp.asarray(rng.standard_normal((size, size))))
        for setting in ("token, on-policy", "token, off-policy", "sequence"):
            table = {}
            for scale in config.scales:
                if setting == "sequence":
                    ref = jax.tree.map(lambda t, n, s=scale: t + s * n, theta_seq, noise_seq)
                    exact = jax.grad(lambda t, r=ref: sequence_kl(t, r))(theta_seq)
                    kl = float(sequence_kl(theta_seq, ref))
                else:
                    ref = theta + scale * noise
                    exact = jax.grad(lambda t, r=ref: distributions.categorical_kl(t, r))(theta)
                    kl = float(distributions.categorical_kl(theta, ref))
                results["kl"][f"{setting}|{scale}"] = kl
                for label, placement, estimator in configurations(setting):
                    if setting == "sequence":
                        got = sequence_study(theta_seq, ref, placement, estimator)
                    else:
                        sampler = old if setting == "token, off-policy" else theta
                        got = token_study(theta, ref, sampler, placement, estimator)
                    table.setdefault(label, {})[scale] = _relative(got, exact)
            results["settings"][setting] = table
    return results


def table_text(results: dict[str, Any], config: KLPlacementConfig, sep: str = " | ") -> str:
    """A markdown table: one row per (setting, configuration), one column per reference distance."""
    lines = []
    for setting, table in results["settings"].items():
        kls = [results["kl"][f"{setting}|{s}"] for s in config.scales]
        header = ["setting", "estimator, placement"] + [f"KL {kl:.3g}" for kl in kls]
        lines += [sep.join(header), sep.join(["---"] * len(header))]
        for label, row in table.items():
            lines.append(sep.join([setting, label] + [f"{row[s]:.3f}" for s in config.scales]))
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], config: KLPlacementConfig):
    import matplotlib.pyplot as plt

    floor = 1e-12  # float64 round-off: plotted at the floor means exact
    colours = plt.get_cmap("tab20").colors
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharey=True)
    for ax, (setting, table) in zip(axes, results["settings"].items(), strict=True):
        kls = [results["kl"][f"{setting}|{s}"] for s in config.scales]
        for i, (label, row) in enumerate(table.items()):
            style = "-" if "loss" in label else "--"
            ax.plot(kls, [max(row[s], floor) for s in config.scales], style, marker="o", label=label,
                    color=colours[(2 * i) % 20 + (i >= 10)])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("KL(pi || ref)")
        ax.set_title(setting)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="center right")
    axes[0].set_ylabel("relative bias of the expected gradient")
    fig.suptitle("Bias of each KL estimator and placement against the exact gradient "
                 f"(at {floor:g}: exact to round-off)")
    fig.tight_layout()
    return fig


def run(config: KLPlacementConfig, log=print) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = study(config)
    os.makedirs(config.out, exist_ok=True)
    text = table_text(results, config)
    with open(os.path.join(config.out, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(config.out, "table.csv"), "w") as f:
        f.write(table_text(results, config, sep=",").replace("---,", "").replace(",---", "") + "\n")
    with open(os.path.join(config.out, "numbers.json"), "w") as f:
        json.dump({"kl": results["kl"], "settings": {s: {k: {str(sc): v for sc, v in row.items()}
                                                         for k, row in t.items()}
                                                     for s, t in results["settings"].items()}}, f, indent=1)
    with open(os.path.join(config.out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=1)
    fig = plot(results, config)
    fig.savefig(os.path.join(config.out, "kl_placement.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)
    log(text)
    log(f"table.md, table.csv, numbers.json and kl_placement.png in {config.out}/")
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run(tyro.cli(KLPlacementConfig, args=argv))


if __name__ == "__main__":
    main()
