"""The two toy pathologies of 003 section 4.1 and conservative policy iteration (4.4-4.5), computed exactly.

    python -m experiments.pathologies                      # writes runs/pathologies/
    python -m experiments.pathologies --out /tmp/p --eta 1e-3 --max-horizon 12
    python -m experiments.pathologies --help

Example 1 (4.1.1, distribution shift): the local surrogate L (eq. 51) predicts an improvement of about
0.79994 for a candidate policy whose true return is -90; the distribution shift penalty (eq. 52) closes the
gap exactly (eq. 53). A sweep over eta shows where the surrogate stops predicting the sign of the change.
CPI on the same MDP: the step size alpha* (eq. 61), the bound (eq. 60) against the true J(pi_alpha), and CPI
iterations that improve J monotonically where the full step collapses.
Example 2 (4.1.2, trajectory importance sampling): the variance (q^2/p + (1-q)^2/(1-p))^H - 1 of the
trajectory weight against Monte Carlo for H = 1..max_horizon, the effective sample size collapsing with H,
and the spread of ordinary, per-decision and self-normalised IS estimates.

The run folder gets summary.txt (the screen summary), numbers.json, config.json and four figures.
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

from envs import tabular as tabular_mdps
from polygrad import importance, tabular

FIGURES = {
    "eta_sweep": "example1_eta_sweep.png",
    "cpi_bound": "cpi_bound.png",
    "cpi_iterations": "cpi_iterations.png",
    "is_variance": "example2_importance_sampling.png",
}


@dataclasses.dataclass(frozen=True)
class PathologiesConfig:
    """Parameters of the two toy pathologies (defaults: the seed's numbers, 003 section 4.1)."""

    out: str = "runs/pathologies"
    """run folder for figures, summary.txt and numbers.json."""
    gamma: float = 0.9
    """Example 1 discount."""
    penalty: float = 100.0
    """Example 1: the notes' M, r(s1, b) = -M."""
    eta: float = 1e-4
    """Example 1: pi(a1|s0)."""
    eta2: float = 1e-3
    """Example 1: pi(b|s1)."""
    sweep_points: int = 161
    """etas in the sweep, log-spaced over [1e-6, 0.5]."""
    alpha_points: int = 401
    """alphas in [0, 1] at which the CPI bound is compared with the true J."""
    cpi_iterations: int = 400
    chain_p: float = 0.5
    """Example 2: behaviour policy pi(1|s) = p."""
    chain_q: float = 0.9
    """Example 2: target policy pi'(1|s) = q."""
    chain_gamma: float = 0.99
    """Example 2 discount (the return is gamma^H for every policy)."""
    max_horizon: int = 20
    batch_size: int = 100
    """Example 2: episodes per off-policy estimate."""
    num_batches: int = 2000
    """Example 2: independent estimates (all their episodes together give the Monte-Carlo variance)."""
    seed: int = 0

    def __post_init__(self):
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(0.0 < self.gamma < 1.0, f"gamma must lie in (0, 1); got {self.gamma}")
        check(self.penalty > 0, f"penalty must be positive; got {self.penalty}")
        for name in ("eta", "eta2", "chain_p", "chain_q"):
            value = getattr(self, name)
            check(0.0 < value < 1.0, f"{name} must lie in (0, 1); got {value}")
        check(0.0 < self.chain_gamma < 1.0, f"chain_gamma must lie in (0, 1); got {self.chain_gamma}")
        for name in ("sweep_points", "alpha_points", "cpi_iterations", "max_horizon"):
            check(getattr(self, name) >= 2, f"{name} must be at least 2; got {getattr(self, name)}")
        for name in ("batch_size", "num_batches"):
            check(getattr(self, name) >= 2, f"{name} must be at least 2; got {getattr(self, name)}")


# --------------------------------------------------------------------------------------------------------
# Example 1 and CPI (003 sections 4.1.1, 4.3-4.5).
# --------------------------------------------------------------------------------------------------------


def example1_problem(config: PathologiesConfig) -> tabular_mdps.DistributionShiftExample:
    """The MDP of 003 section 4.1.1 with the old policy pi and the candidate pi' of the config."""
    return tabular_mdps.distribution_shift_example(config.gamma, config.penalty, config.eta, config.eta2)


@jax.jit
def _example1_exact(mdp, pi, pi_new) -> dict[str, jax.Array]:
    j_old, j_new = tabular.expected_return(mdp, pi), tabular.expected_return(mdp, pi_new)
    surrogate = tabular.surrogate(mdp, pi, pi_new)
    dsp = tabular.distribution_shift_penalty(mdp, pi, pi_new)
    adv = tabular.advantages(mdp, pi)
    return {
        "J_pi": j_old,
        "J_pi_new": j_new,
        "surrogate": surrogate,
        "predicted_change": surrogate - j_old,
        "true_change": j_new - j_old,
        "dsp": dsp,
        "surrogate_plus_dsp": surrogate + dsp,
        "performance_difference": tabular.performance_difference(mdp, pi, pi_new),
        "V_s1": tabular.state_values(mdp, pi)[tabular_mdps.S1],
        "A_s0_a1": adv[tabular_mdps.S0, tabular_mdps.A1],
        "A_s1_b": adv[tabular_mdps.S1, tabular_mdps.BAD],
        "d_pi_s1": tabular.state_occupancy(mdp, pi)[tabular_mdps.S1],
        "d_pi_new_s1": tabular.state_occupancy(mdp, pi_new)[tabular_mdps.S1],
    }


def example1(config: PathologiesConfig) -> dict[str, float]:
    """The exact quantities of 003 section 4.1.1, beside the seed's closed forms."""
    numbers = {name: float(value) for name, value in _example1_exact(*example1_problem(config)).items()}
    gamma, M, eta, eta2 = config.gamma, config.penalty, config.eta, config.eta2
    v_s1 = 1.0 - eta2 * (1.0 + M)
    # The seed's closed forms (003 section 4.1.1), for comparison.
    numbers["seed_J_pi"] = eta * gamma * v_s1
    numbers["seed_J_pi_new"] = -gamma * M
    numbers["seed_predicted_change"] = gamma * ((1 - eta) * v_s1 - eta * (1 + M) * (1 - eta2))
    return numbers


def eta_sweep(config: PathologiesConfig) -> dict[str, np.ndarray | float]:
    """Predicted (L - J) and true (J(pi') - J(pi)) change of Example 1 over a log grid of eta."""
    mdp = tabular_mdps.distribution_shift_mdp(config.gamma, config.penalty)
    etas = np.logspace(-6, np.log10(0.5), config.sweep_points)
    olds = jnp.stack([tabular_mdps.distribution_shift_policies(e, config.eta2)[0] for e in etas])
    _, pi_new = tabular_mdps.distribution_shift_policies(config.eta, config.eta2)

    @jax.jit
    def changes(pi):
        j_old = tabular.expected_return(mdp, pi)
        predicted = tabular.surrogate(mdp, pi, pi_new) - j_old
        return predicted, tabular.expected_return(mdp, pi_new) - j_old, tabular.distribution_shift_penalty(
            mdp, pi, pi_new
        )

    predicted, true, dsp = (np.asarray(x) for x in jax.vmap(changes)(olds))
    wrong_sign = np.sign(predicted) != np.sign(true)
    v_s1 = 1.0 - config.eta2 * (1.0 + config.penalty)
    return {
        "eta": etas,
        "predicted_change": predicted,
        "true_change": true,
        "dsp": dsp,
        "largest_eta_with_wrong_sign": float(etas[wrong_sign].max()) if wrong_sign.any() else float("nan"),
        # L - J = 0 solved for eta from the seed's closed form.
        "seed_eta_sign_flip": v_s1 / (v_s1 + (1.0 + config.penalty) * (1.0 - config.eta2)),
    }


@jax.jit
def _cpi_exact(mdp, pi, pi_new) -> dict[str, jax.Array]:
    terms = tabular.cpi_terms(mdp, pi, pi_new)
    alpha_star = tabular.cpi_step_size(terms.gain, terms.epsilon, mdp.gamma)
    # Policy iteration from pi (exact greedy steps) reaches the optimum of this small MDP.
    optimal = jax.lax.fori_loop(0, mdp.r.shape[0] + 1, lambda _, p: tabular.greedy_policy(mdp, p), pi)
    return {
        "gain": terms.gain,
        "epsilon": terms.epsilon,
        "alpha_star": alpha_star,
        "J_pi": tabular.expected_return(mdp, pi),
        "J_alpha_star": tabular.expected_return(mdp, tabular.mixture_policy(pi, pi_new, alpha_star)),
        "bound_alpha_star": tabular.cpi_lower_bound(mdp, pi, pi_new, alpha_star),
        "J_full_step": tabular.expected_return(mdp, pi_new),
        "J_optimal": tabular.expected_return(mdp, optimal),
    }


def cpi_study(config: PathologiesConfig) -> dict[str, Any]:
    """CPI on Example 1: alpha* (eq. 61), bound (eq. 60) vs true J over alpha, and CPI iterations."""
    mdp, pi, pi_new = example1_problem(config)
    result: dict[str, Any] = {name: float(value) for name, value in _cpi_exact(mdp, pi, pi_new).items()}

    @jax.jit
    def along(alpha_grid):
        mixtures = jax.vmap(lambda a: tabular.mixture_policy(pi, pi_new, a))(alpha_grid)
        true = jax.vmap(lambda p: tabular.expected_return(mdp, p))(mixtures)
        linear = jax.vmap(lambda p: tabular.surrogate(mdp, pi, p))(mixtures)
        return true, linear, tabular.cpi_lower_bound(mdp, pi, pi_new, alpha_grid)

    # The whole of [0, 1], and a grid that resolves the region around alpha* (the bound's useful range).
    grids = {
        "alpha": np.linspace(0.0, 1.0, config.alpha_points),
        "alpha_zoom": np.linspace(0.0, 4.0 * result["alpha_star"], config.alpha_points),
    }
    for name, grid in grids.items():
        true, linear, bound = (np.asarray(x) for x in along(jnp.asarray(grid, jnp.float32)))
        result[name] = {"alpha": grid, "J": true, "surrogate": linear, "bound": bound}
    result["bound_holds"] = bool(all(np.all(result[n]["J"] >= result[n]["bound"] - 1e-5) for n in grids))

    iterate = jax.jit(tabular.conservative_policy_iteration, static_argnums=(2, 3))
    candidates = {"fixed_candidate": lambda m, p: pi_new, "greedy_candidate": tabular.greedy_policy}
    for name, candidate in candidates.items():
        _, history = iterate(mdp, pi, config.cpi_iterations, candidate)
        result[f"{name}_returns"] = np.asarray(history.expected_return)
        result[f"{name}_alphas"] = np.asarray(history.alpha)
        result[f"{name}_monotone"] = bool(np.all(np.diff(result[f"{name}_returns"]) >= -1e-6))
    return result


# --------------------------------------------------------------------------------------------------------
# Example 2 (003 section 4.1.2).
# --------------------------------------------------------------------------------------------------------


def example2(config: PathologiesConfig) -> dict[str, np.ndarray | float]:
    """Trajectory-IS weights of the H-step chain for H = 1..max_horizon.

    Episodes of the longest chain are sampled once under pi (``num_batches * batch_size`` of them); the
    first H decisions of each are exactly an episode of the H-step chain, whose only reward, 1, comes at
    step H (after all H decisions). Per H: the Monte-Carlo variance and effective sample size of the
    trajectory weight beside the closed forms ``base^H - 1`` and ``base^-H``, and the mean and spread over
    ``num_batches`` batches of the ordinary, per-decision and self-normalised IS estimates of
    J(pi') = gamma^H.
    """
    H_max, p, q = config.max_horizon, config.chain_p, config.chain_q
    mdp = tabular_mdps.importance_sampling_chain(H_max, config.chain_gamma)
    pi, pi_target = tabular_mdps.chain_policy(H_max, p), tabular_mdps.chain_policy(H_max, q)
    num_episodes = config.num_batches * config.batch_size
    key = jax.random.key(config.seed)
    episodes = jax.jit(tabular.sample_episodes, static_argnums=(3, 4))(key, mdp, pi, H_max + 1, num_episodes)
    step_log_ratios = importance.log_ratios(
        jnp.log(pi_target[episodes.states, episodes.actions]), jnp.log(pi[episodes.states, episodes.actions])
    )  # [H_max + 1, N]; the last step (state s_perp, action perp) has ratio 1
    horizons = jnp.arange(1, H_max + 1)

    @jax.jit
    def per_horizon(horizon):
        steps = jnp.arange(H_max + 1)[:, None]
        decisions = jnp.broadcast_to(steps < horizon, step_log_ratios.shape).astype(jnp.float32)
        rewards = jnp.broadcast_to(steps == horizon, step_log_ratios.shape).astype(jnp.float32)
        weights = importance.trajectory_weights(step_log_ratios, decisions)  # [N]
        ret = config.chain_gamma**horizon  # G_0, the same for every episode
        batched = lambda x: x.reshape(x.shape[0], config.num_batches, config.batch_size)  # noqa: E731
        by_batch = weights.reshape(config.num_batches, config.batch_size)
        returns = jnp.full_like(by_batch, ret)
        ordinary = jax.vmap(importance.ordinary_is)(by_batch, returns)
        self_normalised = jax.vmap(importance.self_normalised_is)(by_batch, returns)
        # Step H of the H-step chain is s_perp, whose only action has ratio 1: keep decision ratios only.
        per_decision = jax.vmap(
            lambda log_ratios, r: importance.per_decision_is(log_ratios, r, config.chain_gamma), in_axes=1
        )(batched(step_log_ratios * decisions), batched(rewards))
        ess = jax.vmap(importance.effective_sample_size)(by_batch)
        return {
            "weight_mean": jnp.mean(weights),
            "weight_variance": jnp.var(weights),
            "ess_fraction_all": importance.effective_sample_size(weights) / weights.shape[0],
            "ess_fraction_batch": jnp.mean(ess) / config.batch_size,
            "true_value": ret,
            **{
                f"{name}_{stat}": fn(estimates)
                for name, estimates in (
                    ("ordinary", ordinary),
                    ("per_decision", per_decision),
                    ("self_normalised", self_normalised),
                )
                for stat, fn in (("mean", jnp.mean), ("std", jnp.std))
            },
        }

    stats = {name: np.asarray(values) for name, values in jax.lax.map(per_horizon, horizons).items()}
    base = q**2 / p + (1 - q) ** 2 / (1 - p)
    h = np.arange(1, H_max + 1)
    stats.update(
        horizon=h,
        base=base,
        closed_form_variance=base**h - 1.0,
        closed_form_ess_fraction=base ** (-h.astype(float)),
        closed_form_ordinary_std=config.chain_gamma**h * np.sqrt((base**h - 1.0) / config.batch_size),
    )
    return stats


# --------------------------------------------------------------------------------------------------------
# Figures (each returns a matplotlib Figure; ``run`` saves them).
# --------------------------------------------------------------------------------------------------------


def plot_eta_sweep(sweep: dict, config: PathologiesConfig):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(sweep["eta"], sweep["predicted_change"], label=r"surrogate: $L_\pi(\pi') - J(\pi)$")
    ax.plot(sweep["eta"], sweep["true_change"], label=r"true: $J(\pi') - J(\pi)$")
    ax.plot(sweep["eta"], sweep["dsp"], ls=":", label=r"$\mathrm{DSP}_\pi(\pi')$ (eq. 52)")
    ax.axvline(sweep["seed_eta_sign_flip"], color="gray", ls="--", lw=1, label="surrogate changes sign")
    ax.axvline(config.eta, color="k", lw=0.8, alpha=0.5, label=rf"seed's $\eta$ = {config.eta:g}")
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(-300.0, 10.0)
    ax.set_xlabel(r"$\eta = \pi(a_1 \mid s_0)$")
    ax.set_ylabel("change in return")
    ax.set_title("Example 1: the surrogate predicts the wrong sign for small $\\eta$")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_cpi_bound(cpi: dict):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    titles = (r"$\alpha \in [0, 1]$", r"near $\alpha^*$")
    for ax, name, title in zip(axes, ("alpha", "alpha_zoom"), titles, strict=True):
        curves = cpi[name]
        ax.plot(curves["alpha"], curves["J"], label=r"true $J(\pi_\alpha)$")
        ax.plot(curves["alpha"], curves["surrogate"], ls="--", label=r"$L_\pi(\pi_\alpha)$ (eq. 57)")
        ax.plot(curves["alpha"], curves["bound"], ls=":", label="CPI bound (eq. 60)")
        ax.axvline(cpi["alpha_star"], color="gray", lw=1, label=rf"$\alpha^*$ = {cpi['alpha_star']:.3g}")
        ax.set_xlabel(r"mixture weight $\alpha$")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("return")
    axes[0].set_ylim(min(cpi["J_full_step"], cpi["alpha"]["J"].min()) - 5, 5)
    axes[1].legend(fontsize=8)
    fig.suptitle("CPI on Example 1: the bound lies below the true return; the surrogate does not")
    fig.tight_layout()
    return fig


def plot_cpi_iterations(cpi: dict):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    fixed, greedy = cpi["fixed_candidate_returns"], cpi["greedy_candidate_returns"]
    axes[0].plot(np.arange(len(fixed)), fixed, label="CPI, candidate $\\pi'$ of Example 1")
    axes[0].set_title(f"candidate $\\pi'$ (full step: J = {cpi['J_full_step']:.4g})")
    axes[1].plot(np.arange(len(greedy)), greedy, label="CPI, greedy candidate (eq. 54)")
    axes[1].axhline(cpi["J_optimal"], color="gray", ls="--", label="optimal J")
    axes[1].set_title("greedy candidate")
    for ax in axes:
        ax.set_xlabel("CPI iteration k")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(r"$J(\pi_k)$")
    fig.suptitle("CPI improves J monotonically (eq. 60-61)")
    fig.tight_layout()
    return fig


def plot_importance_sampling(stats: dict):
    import matplotlib.pyplot as plt

    h = stats["horizon"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    closed_form_label = rf"closed form ${stats['base']:.3g}^H - 1$"
    axes[0].semilogy(h, stats["closed_form_variance"], "k-", label=closed_form_label)
    axes[0].semilogy(h, stats["weight_variance"], "o", ms=4, label="Monte Carlo")
    axes[0].set_ylabel(r"Var$_\pi[w(\tau)]$")
    axes[0].set_title("trajectory weight variance")
    axes[1].semilogy(h, stats["closed_form_ess_fraction"], "k-", label=r"$1 / E[w^2]$")
    axes[1].semilogy(h, stats["ess_fraction_all"], "o", ms=4, label="ESS / N, all episodes")
    axes[1].semilogy(h, stats["ess_fraction_batch"], "s", ms=4, label="ESS / N, per batch")
    axes[1].set_title("effective sample size")
    axes[2].semilogy(h, stats["closed_form_ordinary_std"], "k-", label="ordinary IS, closed form")
    axes[2].semilogy(h, stats["ordinary_std"], "o", ms=4, label="ordinary IS")
    axes[2].semilogy(h, stats["per_decision_std"], "x", ms=6, label="per-decision IS")
    axes[2].plot([], [], " ", label="self-normalised IS: std ~ 0 ($G_0$ is constant)")
    axes[2].set_title("std of the estimate of $J(\\pi')$ over batches")
    for ax in axes:
        ax.set_xlabel("horizon H")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Example 2: trajectory importance sampling degrades exponentially with the horizon")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------------
# Summary and the run.
# --------------------------------------------------------------------------------------------------------


def summary_text(config: PathologiesConfig, ex1: dict, sweep: dict, cpi: dict, ex2: dict) -> str:
    """The one-screen summary printed by the script."""
    c = config
    lines = [
        f"Example 1 (003 4.1.1): gamma={c.gamma:g} M={c.penalty:g} eta={c.eta:g} eta2={c.eta2:g}",
        f"  J(pi)  = {ex1['J_pi']:.4g}   (seed: {ex1['seed_J_pi']:.4g})",
        f"  J(pi') = {ex1['J_pi_new']:.6g}   (seed: {ex1['seed_J_pi_new']:.6g})",
        f"  surrogate predicted change L - J(pi) = {ex1['predicted_change']:.5f}"
        f"   (seed: {ex1['seed_predicted_change']:.5f})",
        f"  true change J(pi') - J(pi) = {ex1['true_change']:.6g};"
        f"  PDL (eq. 48) = {ex1['performance_difference']:.6g}",
        f"  DSP (eq. 52) = {ex1['dsp']:.6g};  L + DSP = {ex1['surrogate_plus_dsp']:.6g} = J(pi') (eq. 53)",
        f"  eta sweep: the surrogate predicts an improvement (wrong sign) for every grid eta <="
        f" {sweep['largest_eta_with_wrong_sign']:.4g} (closed form: eta < {sweep['seed_eta_sign_flip']:.4g})",
        "CPI (003 4.4-4.5) on Example 1 with candidate pi':",
        f"  g = {cpi['gain']:.5f}, epsilon = {cpi['epsilon']:.6g}, alpha* = {cpi['alpha_star']:.4g} (eq. 61)",
        f"  J(pi_alpha*) = {cpi['J_alpha_star']:.6g} >= bound {cpi['bound_alpha_star']:.6g}"
        f" >= J(pi) = {cpi['J_pi']:.4g};  full step J(pi') = {cpi['J_full_step']:.4g}",
        f"  bound (eq. 60) <= true J at every alpha: {cpi['bound_holds']}",
        f"  {c.cpi_iterations} CPI iterations, candidate pi': J {cpi['fixed_candidate_returns'][0]:.4g} ->"
        f" {cpi['fixed_candidate_returns'][-1]:.4g} (monotone: {cpi['fixed_candidate_monotone']})",
        f"  {c.cpi_iterations} CPI iterations, greedy candidate: J {cpi['greedy_candidate_returns'][0]:.4g}"
        " ->"
        f" {cpi['greedy_candidate_returns'][-1]:.4g} (monotone: {cpi['greedy_candidate_monotone']};"
        f" optimum {cpi['J_optimal']:.4g})",
        f"Example 2 (003 4.1.2): p={c.chain_p:g} q={c.chain_q:g}, q^2/p + (1-q)^2/(1-p) = {ex2['base']:.4g};"
        f" {c.num_batches * c.batch_size} episodes, batches of {c.batch_size}; std of estimates of J(pi'):",
    ]
    for h in (h for h in (1, 2, 5, 10, 15, 20) if h <= c.max_horizon):
        i = h - 1
        lines.append(
            f"  H={h:2d}  Var(w) closed {ex2['closed_form_variance'][i]:9.4g}"
            f"  MC {ex2['weight_variance'][i]:9.4g}"
            f"  ESS/N {ex2['ess_fraction_all'][i]:8.3g}  IS {ex2['ordinary_std'][i]:7.3g}"
            f"  PDIS {ex2['per_decision_std'][i]:7.3g}  SNIS {ex2['self_normalised_std'][i]:7.2g}"
        )
    lines.append(
        "  (PDIS = IS here: the only reward follows all H decisions; SNIS is exact: G_0 is constant;"
        " at large H the MC variance rests on a few rare, huge weights and is unreliable)"
    )
    return "\n".join(lines)


def _jsonable(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _jsonable(v) for k, v in tree.items()}
    if isinstance(tree, np.ndarray | jax.Array):
        return np.asarray(tree).tolist()
    if isinstance(tree, np.generic):
        return tree.item()
    return tree


def run(config: PathologiesConfig, log=print) -> dict[str, Any]:
    """Compute everything, write the run folder, print the summary; returns the numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ex1, sweep, cpi, ex2 = example1(config), eta_sweep(config), cpi_study(config), example2(config)
    os.makedirs(config.out, exist_ok=True)
    figures = {
        "eta_sweep": plot_eta_sweep(sweep, config),
        "cpi_bound": plot_cpi_bound(cpi),
        "cpi_iterations": plot_cpi_iterations(cpi),
        "is_variance": plot_importance_sampling(ex2),
    }
    for name, fig in figures.items():
        fig.savefig(os.path.join(config.out, FIGURES[name]), dpi=110)
        plt.close(fig)
    text = summary_text(config, ex1, sweep, cpi, ex2)
    numbers = {"example1": ex1, "eta_sweep": sweep, "cpi": cpi, "example2": ex2}
    with open(os.path.join(config.out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(config.out, "numbers.json"), "w") as f:
        json.dump(_jsonable(numbers), f, indent=1)
    with open(os.path.join(config.out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=1)
    log(text)
    log(f"figures, summary.txt and numbers.json in {config.out}/")
    return numbers


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    # tyro reports a config that fails validation (a ValueError in __post_init__) and exits with status 2.
    return run(tyro.cli(PathologiesConfig, args=argv))


if __name__ == "__main__":
    main()
