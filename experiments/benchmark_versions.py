"""PPO on CartPole at the CleanRL config, this checkout against an earlier commit, side by side.

    python -m experiments.benchmark_versions                       # against the first layout (23303b4)
    python -m experiments.benchmark_versions --old <commit> --rounds 3 --cases 1seed 8seeds

The earlier commit is checked out into a temporary git worktree. Each round runs every case once for each
version, alternating versions, each in a fresh process with the same interpreter, the same jax and the same
XLA flags: compile, one untimed warm-up run, then one timed run of the whole jitted training (500k steps per
seed, learning included). The table reports medians over rounds. Both versions must expose
`experiments.control.default_config`, `make_train` and `experiments.runs.vmap_seeds` / `seed_keys`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_LAYOUT = "23303b4"
CASES = {"1seed": 1, "8seeds": 8}

TIMING = r"""
import json, sys, time
from experiments import control, runs
import jax, numpy as np
num_seeds = int(sys.argv[1])
spec = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {"algo": "ppo", "overrides": {}}
config = control.default_config(spec["algo"], "CartPole-v1", num_seeds=num_seeds, **spec["overrides"])
keys = runs.seed_keys(0, num_seeds)
start = time.perf_counter()
compiled = jax.jit(runs.vmap_seeds(control.make_train(config))).lower(keys).compile()
compile_s = time.perf_counter() - start
jax.block_until_ready(compiled(keys))
start = time.perf_counter()
_, metrics = jax.block_until_ready(compiled(keys))
run_s = time.perf_counter() - start
returns = np.asarray(metrics["episode_return"])[:, -10:].mean(axis=1)
print(json.dumps({"compile_s": compile_s, "run_s": run_s,
                  "steps_per_s": num_seeds * config.num_updates * config.batch_size / run_s,
                  "final_returns": [round(float(r), 1) for r in returns]}))
"""


class System(NamedTuple):
    """One system under measurement: its checkout (the working directory and PYTHONPATH), the timing code
    (run as `python -c code num_seeds *args`; its last printed line is a JSON result), and its python."""

    checkout: str
    code: str = TIMING
    python: str = sys.executable
    args: tuple[str, ...] = ()


def measure(system: System, num_seeds: int) -> dict:
    """Run `system`'s timing code with `num_seeds` in a fresh process: the JSON of its last line."""
    env = {**os.environ, "PYTHONPATH": system.checkout}
    command = [system.python, "-c", system.code, str(num_seeds), *system.args]
    proc = subprocess.run(command, cwd=system.checkout, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"timing in {system.checkout} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def interleaved_rounds(systems: Callable[[str], dict[str, System]], cases: list[str],
                       rounds: int) -> dict[str, dict[str, list[dict]]]:
    """`rounds` rounds; in each, every case once for every system of `systems(case)`, alternating systems,
    each in a fresh process. A case's last word names its seeds (`CASES`). Prints a line per measurement
    and returns `{case: {system: [result of each round]}}`."""
    results: dict[str, dict[str, list[dict]]] = {case: {} for case in cases}
    for round_ in range(rounds):
        for case in cases:
            for name, system in systems(case).items():
                r = measure(system, CASES[case.split()[-1]])
                results[case].setdefault(name, []).append(r)
                print(f"round {round_ + 1} {case:12s} {name:22s} compile {r['compile_s']:5.1f} s  "
                      f"run {r['run_s']:6.2f} s  {r['steps_per_s']:9,.0f} steps/s  "
                      f"returns {r['final_returns']}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default=FIRST_LAYOUT, help="the earlier commit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", default="runs/benchmark_versions.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = os.path.join(tmp, "old")
        subprocess.run(["git", "worktree", "add", "--detach", old, args.old], cwd=REPO, check=True,
                       capture_output=True)
        try:
            versions = {f"old ({args.old})": System(old), "new (this checkout)": System(REPO)}
            results = interleaved_rounds(lambda case: versions, args.cases, args.rounds)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", old], cwd=REPO, capture_output=True)
    print(f"\nmedians over {args.rounds} rounds (load average now {os.getloadavg()[0]:.2f}):")
    print(f"{'case':8s} {'version':22s} {'compile s':>9s} {'steps/s':>10s}")
    for case, per_version in results.items():
        for name, rs in per_version.items():
            print(f"{case:8s} {name:22s} {statistics.median(r['compile_s'] for r in rs):9.1f} "
                  f"{statistics.median(r['steps_per_s'] for r in rs):10,.0f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
