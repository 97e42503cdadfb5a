"""Throughput of sharded training at 1, 2, 4, 8 devices: PPO on CartPole and one LM RL update.

    python -m experiments.benchmark_scaling                          # 64 envs x 128 steps; 16 prompts x G 8
    python -m experiments.benchmark_scaling --num-envs 64 1024 --devices 1 2 4 8

For each device count n, the same training program runs on a mesh of n devices on the `data` axis
(`experiments.runs.build_mesh`; n = 1 is the unsharded program): the environments of the seed (or the
prompt groups of the LM batch) are split over the devices. Every timed chunk is compiled first; the
figures are the medians over `repeats` chunks. Prints a table and writes `<out>/benchmark_scaling.json`.

On a CPU-only machine the script forces 8 XLA host devices (`--xla_force_host_platform_device_count=8`,
set before JAX starts) when the environment does not already force a count: these share the machine's
cores, so the table shows the overhead of sharding (collectives, partitioned gathers), not a speed-up.
On a GPU/TPU host the real devices are used.
"""

import os

_flags = os.environ.get("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = _flags

import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402

from experiments import control, lm, runs  # noqa: E402
from polygrad.lm.transformer import init_params  # noqa: E402


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    devices: tuple[int, ...] = (1, 2, 4, 8)
    """device counts (each must divide num_envs and num_prompts)."""
    num_envs: tuple[int, ...] = (64,)
    """PPO CartPole environments of one seed (split over the devices), one row each."""
    num_steps: int = 128
    """PPO rollout length."""
    ppo_updates: int = 10
    """PPO updates per timed chunk."""
    num_prompts: int = 16
    """LM prompt groups per update (split over the devices)."""
    group_size: int = 8
    """LM completions per prompt."""
    lm_updates: int = 1
    """LM RL updates per timed chunk."""
    repeats: int = 3
    """timed chunks per figure (median)."""
    skip_lm: bool = False
    """time only PPO."""
    out: str = "runs/benchmark_scaling"


def _time_chunks(program: runs.Program, mesh, n: int, repeats: int) -> tuple[float, float]:
    """(compile + first chunk seconds, median seconds of a chunk of n updates) of one seed."""
    with runs.mesh_context(mesh):
        carry = runs.init_carry(program, runs.seed_keys(0, 1), mesh)
        chunk = runs.make_chunk(program, n, mesh)
        start = time.perf_counter()
        carry, metrics = chunk(carry, n)
        jax.block_until_ready((carry, metrics))
        first = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            carry, metrics = chunk(carry, n)
            jax.block_until_ready((carry, metrics))
            times.append(time.perf_counter() - start)
    return first, float(np.median(times))


def _mesh(n: int, batch: int):
    return runs.build_mesh(runs.MeshConfig(data=n), 1, batch, jax.devices()[:n])


def main(bench: BenchmarkConfig) -> dict:
    results = {"device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
               "devices_available": jax.device_count(), "date": datetime.datetime.now(datetime.UTC).isoformat(
                   timespec="minutes"), "ppo": [], "lm": []}
    for envs in bench.num_envs:
        for n in bench.devices:
            config = control.default_config("ppo", num_envs=envs, num_steps=bench.num_steps, num_seeds=1,
                                            total_steps=envs * bench.num_steps * bench.ppo_updates)
            first, seconds = _time_chunks(control.make_program(config), _mesh(n, envs), bench.ppo_updates,
                                          bench.repeats)
            row = {"devices": n, "num_envs": envs, "num_steps": bench.num_steps, "compile_s": round(first, 2),
                   "steps_per_s": envs * bench.num_steps * bench.ppo_updates / seconds}
            results["ppo"].append(row)
            print(f"PPO CartPole {envs:5d} envs x {bench.num_steps} steps, {n} devices: "
                  f"{row['steps_per_s']:12,.0f} env steps/s (first chunk {first:.1f} s)", flush=True)
    if not bench.skip_lm:
        config = lm.default_config("grpo", num_prompts=bench.num_prompts, group_size=bench.group_size,
                                   num_seeds=1, eval_prompts=0, num_updates=bench.lm_updates)
        params = init_params(config.make_model(), jax.random.PRNGKey(0))
        program = lm.make_program(config, params)
        tokens = config.batch_size * config.make_task().max_response_len
        for n in bench.devices:
            mesh = _mesh(n, bench.num_prompts)
            first, seconds = _time_chunks(program, mesh, bench.lm_updates, bench.repeats)
            row = {"devices": n, "batch": f"{bench.num_prompts} prompts x G {bench.group_size}",
                   "compile_s": round(first, 2), "updates_per_s": bench.lm_updates / seconds,
                   "sampled_tokens_per_s": tokens * bench.lm_updates / seconds}
            results["lm"].append(row)
            print(f"LM GRPO update {row['batch']}, {n} devices: {row['updates_per_s']:.2f} updates/s, "
                  f"{row['sampled_tokens_per_s']:,.0f} sampled tokens/s (first chunk {first:.1f} s)",
                  flush=True)
    print()
    print(table(results))
    os.makedirs(bench.out, exist_ok=True)
    with open(os.path.join(bench.out, "benchmark_scaling.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def table(results: dict) -> str:
    """The results as a Markdown table."""
    lines = ["| workload | devices | throughput | vs 1 device | compile + first chunk |",
             "| --- | ---: | ---: | ---: | ---: |"]
    workloads = (("ppo", "steps_per_s", "env steps/s"), ("lm", "sampled_tokens_per_s", "tokens/s"))
    for key, unit, name in workloads:
        base = {}
        for row in results[key]:
            if key == "ppo":
                label = f"PPO CartPole, {row['num_envs']} envs x {row.get('num_steps', 128)}"
            else:
                label = f"LM GRPO update, {row['batch']}"
            base.setdefault(label, row[unit])
            lines.append(f"| {label} | {row['devices']} | {row[unit]:,.0f} {name} | "
                         f"{row[unit] / base[label]:.2f}x | {row['compile_s']:.1f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(tyro.cli(BenchmarkConfig))
