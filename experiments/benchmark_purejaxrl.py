"""PPO on CartPole-v1 at the CleanRL config, polygrad beside PureJaxRL, side by side in one script run.

    python -m experiments.benchmark_purejaxrl --purejaxrl ../peers/purejaxrl --python ../peers/venv/bin/python

PureJaxRL's own, unmodified `purejaxrl/ppo.py` (commit 31756b1) runs from its checkout outside this
repository, in its own environment (`--python`: a venv with the same jax, flax, optax and gymnax as this
one, plus distrax). It is adapted from the outside only: gymnax 1.0's `LegacyStepAPIWrapper` gives it the
five-value step it expects, and the `brax` and `navix` imports of its `wrappers.py` (unused by `ppo.py`)
are stubbed. Its `DEBUG` printing callback is off. Both sides run the same algorithm at the same config:
4 envs x 128 steps, 4 epochs x 4 minibatches, 500k env steps per seed, learning-rate annealing.

Each round runs every case once per system, alternating systems, each in a fresh process with the same
XLA flags: compile, one untimed warm-up run, then one timed run of the whole jitted training. The table
reports medians over rounds and every seed's final return (mean episode return over the last 10 updates).
"""

import argparse
import json
import os
import statistics
import sys

from experiments import benchmark_versions

REPO = benchmark_versions.REPO
CASES = benchmark_versions.CASES

PUREJAXRL_TIMING = r"""
import json, sys, time, types
for name in ("brax", "brax.envs", "brax.envs.wrappers", "brax.envs.wrappers.training", "navix"):
    sys.modules[name] = types.ModuleType(name)  # wrappers.py imports these; ppo.py never uses them
sys.modules["brax.envs.wrappers.training"].EpisodeWrapper = None
sys.modules["brax.envs.wrappers.training"].AutoResetWrapper = None
sys.modules["brax"].envs = sys.modules["brax.envs"]
import gymnax
from gymnax.wrappers.compat import LegacyStepAPIWrapper
_make = gymnax.make
gymnax.make = lambda *a, **k: (lambda env, params: (LegacyStepAPIWrapper(env), params))(*_make(*a, **k))
import jax, numpy as np
import ppo
num_seeds = int(sys.argv[1])
config = {"LR": 2.5e-4, "NUM_ENVS": 4, "NUM_STEPS": 128, "TOTAL_TIMESTEPS": 5e5, "UPDATE_EPOCHS": 4,
          "NUM_MINIBATCHES": 4, "GAMMA": 0.99, "GAE_LAMBDA": 0.95, "CLIP_EPS": 0.2, "ENT_COEF": 0.01,
          "VF_COEF": 0.5, "MAX_GRAD_NORM": 0.5, "ACTIVATION": "tanh", "ENV_NAME": "CartPole-v1",
          "ANNEAL_LR": True, "DEBUG": False}
keys = jax.random.split(jax.random.PRNGKey(0), num_seeds)
start = time.perf_counter()
compiled = jax.jit(jax.vmap(ppo.make_train(config))).lower(keys).compile()
compile_s = time.perf_counter() - start
jax.block_until_ready(compiled(keys))
start = time.perf_counter()
out = jax.block_until_ready(compiled(keys))
run_s = time.perf_counter() - start
returns = np.asarray(out["metrics"]["returned_episode_returns"])[:, -10:].mean(axis=(1, 2, 3))
print(json.dumps({"compile_s": compile_s, "run_s": run_s,
                  "steps_per_s": num_seeds * config["TOTAL_TIMESTEPS"] / run_s,
                  "final_returns": [round(float(r), 1) for r in returns]}))
"""


# polygrad only: the seeds sharded over two CPU devices (`--mesh.seeds 2`), one per core; PureJaxRL has
# no multi-device path on CPU (its scripts jit one device).
SHARDED_TIMING = r"""
import json, os, sys, time
os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"
from experiments import control, runs
import jax, numpy as np
num_seeds = int(sys.argv[1])
config = control.default_config("ppo", "CartPole-v1", num_seeds=num_seeds, **{"mesh.seeds": 2})
program = control.make_program(config)
mesh = runs.build_mesh(config.mesh, num_seeds, config.num_envs)
keys = runs.seed_keys(0, num_seeds)
with runs.mesh_context(mesh):
    carry = runs.init_carry(program, keys, mesh)
    start = time.perf_counter()
    chunk = runs.make_chunk(program, program.num_updates, mesh)
    jax.block_until_ready(chunk(carry, program.num_updates))  # compile and warm up (donates the carry)
    compile_and_run_s = time.perf_counter() - start
    carry = runs.init_carry(program, keys, mesh)
    start = time.perf_counter()
    _, metrics = jax.block_until_ready(chunk(carry, program.num_updates))
    run_s = time.perf_counter() - start
returns = np.asarray(metrics["episode_return"])[:, -10:].mean(axis=1)
print(json.dumps({"compile_s": compile_and_run_s - run_s, "run_s": run_s,
                  "steps_per_s": num_seeds * config.num_updates * config.batch_size / run_s,
                  "final_returns": [round(float(r), 1) for r in returns]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--purejaxrl", required=True, help="PureJaxRL checkout (commit 31756b1)")
    parser.add_argument("--python", required=True, help="python of a venv with PureJaxRL's dependencies")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", default="runs/benchmark_purejaxrl.json")
    args = parser.parse_args()
    systems = {
        "polygrad": (REPO, benchmark_versions.TIMING, sys.executable),
        "PureJaxRL": (os.path.join(os.path.abspath(args.purejaxrl), "purejaxrl"), PUREJAXRL_TIMING,
                      os.path.abspath(args.python)),
    }
    sharded = {"polygrad, 2 devices": (REPO, SHARDED_TIMING, sys.executable)}
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}  load average {os.getloadavg()[0]:.2f}")
    results = benchmark_versions.interleaved_rounds(
        lambda case: systems | (sharded if case == "8seeds" else {}), args.cases, args.rounds)
    print(f"\nmedians over {args.rounds} rounds (load average now {os.getloadavg()[0]:.2f}):")
    print("| case | system | env steps/s | compile s | lowest final return | against PureJaxRL |")
    print("| --- | --- | --- | --- | --- | --- |")
    for case, per_system in results.items():
        peer = statistics.median(r["steps_per_s"] for r in per_system["PureJaxRL"])
        for name, rs in per_system.items():
            speed = statistics.median(r["steps_per_s"] for r in rs)
            print(f"| {case} | {name} | {speed:,.0f} | {statistics.median(r['compile_s'] for r in rs):.1f} | "
                  f"{min(min(r['final_returns']) for r in rs):.0f} | {speed / peer:.2f}x |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
