"""Learning-rate sweeps of a control algorithm, every (value x seed) trained in one compiled program.

    python -m experiments.sweep --sweep.learning-rate 1e-4 3e-4 1e-3 --num-seeds 2
    python -m experiments.sweep --algo a2c --env Acrobot-v1 --sweep.learning-rate 3e-4 1e-3 3e-3 \\
        --num-seeds 4 --total-steps 200000 --run-dir runs/sweep/a2c-acrobot

Every other flag is a flag of `experiments.control` (`--algo`, `--env`, `--num-seeds`, any field of any
part). The learning rate lives in the optimiser state (`polygrad.optim.make_optimizer`), so one program
`(key, learning rate) -> (final carry, metrics)` is vmapped over all values x seeds and compiled once (as
rejax does): V values and S seeds cost one compilation and run as one batch of V * S members. Each member
trains exactly as `python -m experiments.control --learning-rate VALUE` would (the same annealing, from
VALUE to 0 when `anneal_lr`); seed s of every value starts from the same key, as seed s of that run.

The sweep folder (`--run-dir`, default runs/sweep/<algo>-<env>-lr-<hash>) receives:

    config.json     the base config and the swept values
    results.json    per value: the final return of every seed (mean of the last 5% of updates), their
                    mean, standard deviation, min and max; the best value by mean final return
    curves.npz      env_steps [U] and episode_return [V, S, U]
    sweep.png       left: learning curves (mean over seeds, min-max band) per value; right: final return
                    per value, every seed a dot, the mean with the min-max spread over seeds

A sweep is one jitted call: it is not checkpointed (rerun it after a kill).
"""

from experiments import runs  # noqa: I001  (first: sets XLA's flags before JAX starts)

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import control
from polygrad import optim, validate

RESULTS_FILE = "results.json"
CURVES_FILE = "curves.npz"
FIGURE_FILE = "sweep.png"


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """Learning rates `[V]`, metrics `{name: [V, S, U]}`, env steps `[U]`, and the final returns `[V, S]`."""

    learning_rates: tuple[float, ...]
    metrics: dict[str, np.ndarray]
    env_steps: np.ndarray
    final_returns: np.ndarray


def with_learning_rate(carry: control.TrainCarry, learning_rate: jax.Array) -> control.TrainCarry:
    """A freshly initialised carry whose optimiser starts from `learning_rate` (traced: vmappable)."""
    opt_state = optim.set_learning_rate(carry.learner.opt_state, learning_rate)
    return carry.replace(learner=carry.learner.replace(opt_state=opt_state))


def make_sweep(config: control.ControlConfig) -> Callable[[jax.Array, jax.Array], tuple[Any, dict[str, Any]]]:
    """A jitted `(keys [M, 2], learning_rates [M]) -> (final carries [M, ...], {metric: [M, num_updates]})`
    training M members of `config`'s algorithm, member m with learning rate `learning_rates[m]`."""
    program = control.make_program(config)

    def member(key, learning_rate):
        carry = with_learning_rate(program.init(key), learning_rate)
        return jax.lax.scan(lambda c, _: program.update(c), carry, None, length=program.num_updates)

    return jax.jit(runs.vmap_seeds(member))


def sweep_configs(config: control.ControlConfig, learning_rates: Sequence[float]
                  ) -> list[control.ControlConfig]:
    """`config` with each learning rate (each validated: positive and finite)."""
    if len(learning_rates) == 0:
        raise validate.ConfigError("--sweep.learning-rate needs at least one value")
    if len(set(learning_rates)) != len(learning_rates):
        raise validate.ConfigError(f"--sweep.learning-rate values repeat: {list(learning_rates)}")
    return [dataclasses.replace(config, learning_rate=float(lr)) for lr in learning_rates]


def train_sweep(config: control.ControlConfig, learning_rates: Sequence[float]) -> SweepResult:
    """Train `config.num_seeds` seeds of every learning rate in one jitted, vmapped program."""
    sweep_configs(config, learning_rates)
    num_values, num_seeds = len(learning_rates), config.num_seeds
    keys = jnp.tile(runs.seed_keys(config.seed, num_seeds), (num_values, 1))  # seed s: the same key per value
    rates = jnp.repeat(jnp.asarray(learning_rates, jnp.float32), num_seeds)
    _, metrics = make_sweep(config)(keys, rates)
    metrics = {k: np.asarray(v).reshape(num_values, num_seeds, -1) for k, v in metrics.items()}
    env_steps = np.arange(1, config.num_updates + 1) * config.batch_size
    finals = np.stack([runs.final_values(np.asarray(m, np.float64)) for m in metrics["episode_return"]])
    return SweepResult(tuple(float(x) for x in learning_rates), metrics, env_steps, finals)


def _json(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def results_dict(result: SweepResult) -> dict[str, Any]:
    per_value = []
    for lr, finals in zip(result.learning_rates, result.final_returns, strict=True):
        has = bool(np.any(~np.isnan(finals)))
        per_value.append({
            "learning_rate": lr,
            "final_return_per_seed": [_json(x) for x in finals],
            "mean": _json(np.nanmean(finals)) if has else None,
            "std": _json(np.nanstd(finals)) if has else None,
            "min": _json(np.nanmin(finals)) if has else None,
            "max": _json(np.nanmax(finals)) if has else None,
        })
    scored = [(v["mean"], v["learning_rate"]) for v in per_value if v["mean"] is not None]
    return {"swept": "learning_rate",
            "final_return": "per seed, the mean episode return of the last 5% of updates",
            "values": per_value, "best_learning_rate": max(scored)[1] if scored else None}


def plot_sweep(result: SweepResult, path: str, title: str = "") -> None:
    """Learning curves per value (left) and the final return per value with the spread over seeds (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10.5, 4.0))
    colors = plt.cm.viridis(np.linspace(0.0, 0.85, len(result.learning_rates)))
    returns = result.metrics["episode_return"]
    for lr, values, color in zip(result.learning_rates, returns, colors, strict=True):
        valid = ~np.all(np.isnan(values), axis=0)
        steps, values = result.env_steps[valid], values[:, valid]
        if not len(steps):
            continue
        left.plot(steps, np.nanmean(values, axis=0), color=color, label=f"lr {lr:g}")
        left.fill_between(steps, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=color, alpha=0.2)
    left.set_xlabel("environment steps (per seed)")
    left.set_ylabel("training episode return")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    lrs = np.asarray(result.learning_rates)
    finals = result.final_returns
    num_seeds = finals.shape[1]
    for i, (lr, color) in enumerate(zip(lrs, colors, strict=True)):
        right.scatter(np.full(num_seeds, lr), finals[i], color=color, s=18, alpha=0.7, zorder=3)
    with np.errstate(all="ignore"):
        mean = np.nanmean(finals, axis=1)
        low, high = np.nanmin(finals, axis=1), np.nanmax(finals, axis=1)
    right.errorbar(lrs, mean, yerr=[mean - low, high - mean], color="black", marker="o", capsize=4,
                   label=f"mean, min-max over {num_seeds} seeds")
    right.set_xscale("log")
    right.set_xlabel("learning rate")
    right.set_ylabel("final return (last 5% of updates)")
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    runs._atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def run(config: control.ControlConfig, learning_rates: Sequence[float], log: Callable[[str], None] = print
        ) -> SweepResult:
    """Train the sweep and write its folder (see the module docstring)."""
    sweep_configs(config, learning_rates)
    saved = {"base_config": runs.config_to_dict(config), "learning_rates": [float(x) for x in learning_rates]}
    digest = hashlib.sha256(json.dumps(saved, sort_keys=True).encode()).hexdigest()[:8]
    run_dir = config.run_dir or os.path.join("runs", "sweep", f"{config.algo}-{config.env}-lr-{digest}")
    members = len(learning_rates) * config.num_seeds
    values = ", ".join(f"{x:g}" for x in learning_rates)
    log(f"sweep of {config.algo} on {config.env}: learning rates {values} x {config.num_seeds} seeds = "
        f"{members} members, {config.num_updates} updates of {config.batch_size} steps each, one compiled "
        f"program; folder {run_dir}")
    lock = runs.lock_run_dir(run_dir)
    try:
        start = time.perf_counter()
        result = train_sweep(config, learning_rates)
        elapsed = time.perf_counter() - start
        results = {**results_dict(result), "wall_time_s": round(elapsed, 2),
                   "env_steps_per_member": int(config.num_updates * config.batch_size)}
        write = runs._atomic_write
        write(os.path.join(run_dir, runs.CONFIG_FILE), lambda f: json.dump(saved, f, indent=2), mode="w")
        write(os.path.join(run_dir, RESULTS_FILE), lambda f: json.dump(results, f, indent=2), mode="w")
        write(os.path.join(run_dir, CURVES_FILE), lambda f: np.savez(
            f, env_steps=result.env_steps, learning_rates=np.asarray(result.learning_rates),
            episode_return=result.metrics["episode_return"]))
        plot_sweep(result, os.path.join(run_dir, FIGURE_FILE),
                   title=f"{config.algo} on {config.env}: learning-rate sweep, {config.num_seeds} seeds each")
        for v in results["values"]:
            shown = "n/a" if v["mean"] is None else \
                f"{v['mean']:9.2f} (min {v['min']:.2f}, max {v['max']:.2f})"
            log(f"learning rate {v['learning_rate']:<10g} final return {shown}")
        steps = members * config.num_updates * config.batch_size
        log(f"{members} members in {elapsed:.1f} s ({steps / elapsed:,.0f} steps/s, compilation included); "
            f"best learning rate {results['best_learning_rate']}\n"
            f"sweep folder: {run_dir}")
        return result
    finally:
        lock.close()


def parse(argv: Sequence[str] | None = None) -> tuple[control.ControlConfig, list[float]]:
    """`--sweep.learning-rate V1 V2 ...` and every flag of experiments.control."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--sweep.learning-rate", "--sweep.learning_rate", dest="learning_rates", type=float,
                        nargs="+", default=None)
    argv = list(sys.argv[1:] if argv is None else argv)
    known, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(__doc__)
    config = control.parse_config(rest)
    if known.learning_rates is None:
        raise validate.ConfigError("give the values to sweep: --sweep.learning-rate V1 V2 ...")
    for lr in known.learning_rates:
        validate.positive("sweep.learning_rate", lr)
    sweep_configs(config, known.learning_rates)
    return config, known.learning_rates


def main(argv: Sequence[str] | None = None) -> None:
    runs.main(lambda: run(*parse(argv)))


if __name__ == "__main__":
    main()
