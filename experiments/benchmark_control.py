"""Compile time and throughput of PPO on CartPole-v1 at the CleanRL config (4 envs x 128 steps, 4 epochs x 4
minibatches, 500k steps per seed), for 1 seed, 8 vmapped seeds, and 64 environments per seed.

    python -m experiments.benchmark_control                 # all cases, 3 timed repeats each
    python -m experiments.benchmark_control --cases 1seed --repeats 5 --profile

Steps per second count environment steps of all seeds, learning included (the whole jitted training
function), after compilation. `--profile` also times the two halves of one update (rollout of 512 steps;
the 16 minibatch gradient steps) separately. Timings on a shared 2-core machine are noisy: the script
prints the load average, CPU time next to wall time, and the median over repeats.
"""

import argparse
import os
import statistics
import time

import jax
import numpy as np

from experiments import control, runs
from polygrad.control import networks, rollout

CASES = {
    "1seed": {"num_seeds": 1},
    "8seeds": {"num_seeds": 8},
    "64envs": {"num_seeds": 1, "num_envs": 64},
}


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _timed(fn, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - wall, time.process_time() - cpu


def benchmark_case(name: str, repeats: int, **overrides) -> dict:
    config = control.default_config("ppo", "CartPole-v1", **{**CASES[name], **overrides})
    keys = runs.seed_keys(0, config.num_seeds)
    wall, cpu = time.perf_counter(), time.process_time()
    compiled = jax.jit(runs.vmap_seeds(control.make_train(config))).lower(keys).compile()
    compile_wall, compile_cpu = time.perf_counter() - wall, time.process_time() - cpu
    walls, cpus = [], []
    for _ in range(repeats):
        (_, metrics), w, c = _timed(compiled, keys)
        walls.append(w)
        cpus.append(c)
    returns = np.asarray(metrics["episode_return"])
    steps = config.num_seeds * config.num_updates * config.batch_size
    run_wall = statistics.median(walls)
    return {
        "case": name,
        "compile_s": compile_wall,
        "compile_cpu_s": compile_cpu,
        "run_s": run_wall,
        "run_cpu_s": statistics.median(cpus),
        "steps_per_s": steps / run_wall,
        "lowest_final_return": float(np.min(np.nanmean(returns[:, -10:], axis=1))),
    }


def profile_update(repeats: int) -> None:
    """Times one update's rollout and its learner step separately (1 seed, jitted, after compilation)."""
    config = control.default_config("ppo", "CartPole-v1", num_seeds=1)
    program = control.make_program(config)
    env = control.make_env(config)
    network = control.make_network(config, env)
    learner = control.make_learner(config, network.apply)
    carry = jax.jit(program.init)(jax.random.PRNGKey(0))

    def collect(carry):
        params = carry.learner.params
        key, rollout_key = jax.random.split(carry.key)
        traj, env_state, obs, _ = rollout.rollout(
            lambda o: network.apply(params, o, method=networks.ActorCritic.policy),
            lambda o: network.apply(params, o, method=networks.ActorCritic.value),
            env.step, carry.env_state, carry.obs, rollout_key, config.num_steps, config.rollout_unroll,
        )
        return traj, carry.replace(env_state=env_state, obs=obs, key=key)

    traj, _ = jax.jit(collect)(carry)
    n = 50
    # Each loop carries its state through, so XLA cannot hoist the work out of the loop.
    loops = {
        "rollout (512 env steps, values)": jax.jit(
            lambda c: jax.lax.fori_loop(0, n, lambda i, c: collect(c)[1], c)),
        "learner (GAE, 4 x 4 Adam steps)": jax.jit(
            lambda c: jax.lax.fori_loop(0, n, lambda i, s: learner.update(s, traj, c.key)[0], c.learner)),
        "whole update": jax.jit(lambda c: jax.lax.fori_loop(0, n, lambda i, c: program.update(c)[0], c)),
    }
    for label, fn in loops.items():
        jax.block_until_ready(fn(carry))
        times = [_timed(fn, carry)[1:] for _ in range(repeats)]
        wall = statistics.median(t[0] for t in times) / n
        cpu = statistics.median(t[1] for t in times) / n
        print(f"  {label:34s} {1e3 * wall:7.2f} ms wall {1e3 * cpu:7.2f} ms cpu per update")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="time rollout and learner separately")
    parser.add_argument("--rollout-unroll", type=int, default=1)
    args = parser.parse_args()
    platform = jax.devices()[0].platform
    print(f"jax {jax.__version__} on {platform}, {os.cpu_count()} CPUs, load average {_load()}")
    # The columns of `experiments.benchmark_peers`' side-by-side table, plus CPU times.
    print("| case | system | env steps/s | compile s | lowest final return | run s (cpu s) | compile cpu s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.cases:
        r = benchmark_case(name, args.repeats, rollout_unroll=args.rollout_unroll)
        print(f"| {r['case']} | polygrad | {r['steps_per_s']:,.0f} | {r['compile_s']:.1f} | "
              f"{r['lowest_final_return']:.0f} | {r['run_s']:.2f} ({r['run_cpu_s']:.2f}) | "
              f"{r['compile_cpu_s']:.1f} |")
    if args.profile:
        print("profile of one update (1 seed):")
        profile_update(args.repeats)
    print(f"load average at the end {_load()}")


if __name__ == "__main__":
    main()
