"""Benchmark of the jitted TRPO update: its time split and the end-to-end environment steps per second.

    python -m experiments.benchmark_trpo                          # CartPole-v1, batch 4 x 512 = 2048 steps
    python -m experiments.benchmark_trpo --env Pendulum-v1 --num-envs 16 --num-steps 128

It collects one batch with the `trpo` configuration of `experiments.control` and times, each as its own
jitted function (median over `--repeats` calls, after one call that compiles it):

- rollout: collecting the batch (num_envs x num_steps environment steps);
- gradient: GAE, the surrogate and its gradient g (003 eqs. 69, 71);
- CG: the natural-gradient direction (CG on Fisher-vector products, eqs. 72-74) minus the gradient;
- line search: the backtracking line search (section 4.6.4, step 5), sequential and parallel;
- value fit: the Adam epochs on the critic;
- update: the whole learner update (GAE, TRPO step, value fit), as used in training;

then the end-to-end throughput of `experiments.control.make_train` (rollouts and updates of one seed in
one jitted `lax.scan`), compile time excluded. Timings on a shared CPU are noisy: compare numbers from
one run of the script.
"""


import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import tyro

from experiments import control
from polygrad import trust_region
from polygrad.control import learners, networks, rollout, trpo


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    env: str = "CartPole-v1"
    num_envs: int = 4
    num_steps: int = 512
    """batch = num_envs * num_steps environment steps per update."""
    cg_iterations: int = 10
    cg_residual_tol: float = 0.0
    """0 runs all cg_iterations every update (a fixed cost, for comparisons); training uses 1e-5."""
    repeats: int = 20
    """timed calls per component (median reported)."""
    end_to_end_updates: int = 20
    """updates in the end-to-end run (0 skips it)."""
    seed: int = 0


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn()` (blocked until its outputs are ready) after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(config: BenchmarkConfig) -> dict[str, float]:
    """Time every component; return `{name: seconds}` (plus `env_steps_per_second`)."""
    control_config = control.default_config(
        "trpo", config.env, num_envs=config.num_envs, num_steps=config.num_steps, num_seeds=1,
        total_steps=max(config.end_to_end_updates, 1) * config.num_envs * config.num_steps,
        **{"learner.step.cg_iterations": config.cg_iterations,
           "learner.step.cg_residual_tol": config.cg_residual_tol},
    )
    tr_config = control_config.learner.step
    env = control.make_env(control_config)
    network = control.make_network(control_config, env)
    program = control.make_program(control_config)
    carry = jax.jit(program.init)(jax.random.PRNGKey(config.seed))
    params = carry.learner.params
    key = jax.random.PRNGKey(config.seed + 1)

    @jax.jit
    def collect(params, env_state, obs, key):
        return rollout.rollout(
            lambda o: network.apply(params, o, method=networks.ActorCritic.policy),
            lambda o: network.apply(params, o, method=networks.ActorCritic.value),
            env.step, env_state, obs, key, control_config.num_steps,
        )[0]

    traj = collect(params, carry.env_state, carry.obs, key)

    def objectives(params, traj):
        flat = learners.learner_batch(control_config.advantage, traj, with_old_policy=False)
        surrogate_fn, kl_fn = trpo.policy_objectives(control_config.loss, network.apply, params, flat)
        return surrogate_fn, kl_fn, flat

    @jax.jit
    def gradient(params, traj):
        surrogate_fn, _, _ = objectives(params, traj)
        return jax.value_and_grad(surrogate_fn)(params)

    @jax.jit
    def direction(params, traj):
        surrogate_fn, kl_fn, _ = objectives(params, traj)
        return trust_region.natural_gradient_direction(surrogate_fn, kl_fn, params, tr_config)

    def line_search(mode):
        search_config = dataclasses.replace(tr_config, line_search=mode)

        @jax.jit
        def search(params, traj, full_step, surrogate_old):
            surrogate_fn, kl_fn, _ = objectives(params, traj)
            return trust_region.backtracking_line_search(surrogate_fn, kl_fn, params, full_step,
                                                         surrogate_old, search_config)

        return search

    value_tx = control.make_optimizer(control_config)
    opt_state = value_tx.init(params)

    @jax.jit
    def value_fit(params, opt_state, traj, key):
        _, _, flat = objectives(params, traj)
        return trpo.fit_value(network.apply, value_tx, params, opt_state, flat, key,
                              control_config.learner.value_epochs, control_config.learner.value_minibatches)

    learner_update = jax.jit(program.update)

    full_step, surrogate_old, direction_metrics = direction(params, traj)
    sequential, parallel = line_search("sequential"), line_search("parallel")
    repeats = config.repeats
    times = {
        "rollout": median_seconds(lambda: collect(params, carry.env_state, carry.obs, key), repeats),
        "gradient": median_seconds(lambda: gradient(params, traj), repeats),
        "direction": median_seconds(lambda: direction(params, traj), repeats),
        "line_search_sequential": median_seconds(
            lambda: sequential(params, traj, full_step, surrogate_old), repeats),
        "line_search_parallel": median_seconds(
            lambda: parallel(params, traj, full_step, surrogate_old), repeats),
        "value_fit": median_seconds(lambda: value_fit(params, opt_state, traj, key), repeats),
        "rollout_and_update": median_seconds(lambda: learner_update(carry), repeats),
    }
    times["cg"] = max(times["direction"] - times["gradient"], 0.0)
    times["cg_iterations"] = float(direction_metrics["cg_iterations"])
    _, search_metrics = sequential(params, traj, full_step, surrogate_old)
    times["line_search_steps"] = float(search_metrics["line_search_steps"])

    if config.end_to_end_updates > 0:
        train = jax.jit(control.make_train(control_config))
        start = time.perf_counter()
        compiled = train.lower(jax.random.PRNGKey(config.seed)).compile()
        times["end_to_end_compile"] = time.perf_counter() - start
        times["end_to_end_run"] = median_seconds(lambda: compiled(jax.random.PRNGKey(config.seed)), 3)
        times["env_steps_per_second"] = control_config.num_updates * control_config.batch_size / times[
            "end_to_end_run"]
    return times


def report(config: BenchmarkConfig, times: dict[str, float]) -> str:
    batch = config.num_envs * config.num_steps
    policy_step = times["direction"] + times["line_search_sequential"]
    rows = [
        (f"rollout ({batch} env steps)", times["rollout"]),
        ("gradient g (GAE, surrogate)", times["gradient"]),
        (f"CG ({times['cg_iterations']:.0f} Fisher-vector products)", times["cg"]),
        (f"line search, sequential ({times['line_search_steps']:.0f} candidate)",
         times["line_search_sequential"]),
        ("line search, parallel (all candidates)", times["line_search_parallel"]),
        ("policy step (gradient + CG + search)", policy_step),
        ("value fit (Adam epochs)", times["value_fit"]),
        ("rollout + full update (as trained)", times["rollout_and_update"]),
    ]
    lines = [
        f"TRPO on {config.env}, batch {config.num_envs} x {config.num_steps} = {batch} steps, jax "
        f"{jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device), "
        f"median of {config.repeats} calls",
        *(f"  {label:42s} {1e3 * seconds:9.2f} ms" for label, seconds in rows),
    ]
    if "env_steps_per_second" in times:
        lines.append(f"  end to end: {times['env_steps_per_second']:,.0f} env steps/s "
                     f"({times['end_to_end_run']:.2f} s run, {times['end_to_end_compile']:.1f} s compile)")
    return "\n".join(lines)


def main() -> None:
    config = tyro.cli(BenchmarkConfig)
    print(report(config, run(config)))


if __name__ == "__main__":
    main()
