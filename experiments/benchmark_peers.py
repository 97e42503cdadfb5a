"""polygrad beside its peers on CartPole-v1, side by side in one script run: PPO, A2C and TRPO against
PureJaxRL and Stable-Baselines3 / sb3-contrib, at polygrad's defaults for each algorithm.

    python -m experiments.benchmark_peers --purejaxrl ../peers/purejaxrl --python ../peers/venv/bin/python
    python -m experiments.benchmark_peers --algos a2c trpo --python ../peers/venv/bin/python \\
        --purejaxrl ../peers/purejaxrl --sb3-python ../peers/sb3venv/bin/python

The peers run outside this repository, each in its own environment; none of their code is in it.

- **PureJaxRL** (`--purejaxrl`: a checkout at commit 31756b1; `--python`: a venv with the same jax, flax,
  optax and gymnax as this one, plus distrax): its own, unmodified `purejaxrl/ppo.py`, adapted from the
  outside only. gymnax 1.0's `LegacyStepAPIWrapper` gives it the five-value step it expects; the `brax` and
  `navix` imports of its `wrappers.py` (unused by `ppo.py`) are stubbed; its `DEBUG` callback is off. For
  A2C the same `ppo.py` runs one epoch of one minibatch: every ratio is then exactly 1, the clip never
  binds and its gradient is A2C's (it still normalises advantages, which polygrad's A2C does not).
  PureJaxRL has no TRPO.
- **Stable-Baselines3 2.9 and sb3-contrib 2.9** (`--sb3-python`: a venv with torch 2.13 CPU, both
  libraries and gymnasium's CartPole-v1): `PPO`, `A2C` (with Adam, as polygrad) and sb3-contrib's `TRPO`
  on `make_vec_env`, one seed (they have no vmapped seeds; 8 seeds would run one after another), torch
  with its default threads (one per core; one thread measured no faster here).

Every peer's hyperparameters are derived from polygrad's config of the algorithm (`peer_configs`): the same
batch (envs x steps), epochs and minibatches, learning rate and its annealing, discount, GAE lambda,
clip, entropy and value coefficients (SB3's value loss is a plain mean squared error, polygrad's and
PureJaxRL's are halved), gradient clip, 64 x 64 tanh MLPs, and for TRPO the KL bound, conjugate-gradient
iterations, damping, line search and critic epochs.

Each round runs every case once per system, alternating systems, each in a fresh process with the same XLA
flags. The JAX systems compile, run once untimed, then run the whole jitted training once timed; SB3 times
`learn`. The table reports medians over rounds and the lowest final return over seeds and rounds (the
JAX systems: mean logged episode return over the last 10 updates; SB3: the mean of its last 20
episodes).
"""

import argparse
import json
import os
import statistics
import sys

from experiments import benchmark_versions, control
from polygrad.control import trpo

REPO = benchmark_versions.REPO
System = benchmark_versions.System
ALGOS = ("ppo", "a2c", "trpo")

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
num_seeds, config = int(sys.argv[1]), json.loads(sys.argv[2])["purejaxrl"]
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

SB3_TIMING = r"""
import json, sys, time
import torch
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.env_util import make_vec_env
from sb3_contrib import TRPO
num_seeds, spec = int(sys.argv[1]), json.loads(sys.argv[2])["sb3"]
assert num_seeds == 1, "SB3 trains one seed per process"
kwargs = dict(spec["kwargs"])
if spec["anneal_lr"]:
    kwargs["learning_rate"] = lambda remaining, lr=kwargs["learning_rate"]: remaining * lr
kwargs["policy_kwargs"] = {"net_arch": spec["hidden_sizes"], "activation_fn": torch.nn.Tanh}
algo = {"PPO": PPO, "A2C": A2C, "TRPO": TRPO}[spec["class"]]
env = make_vec_env("CartPole-v1", n_envs=spec["n_envs"], seed=0)
model = algo("MlpPolicy", env, seed=0, device="cpu", stats_window_size=20, **kwargs)
start = time.perf_counter()
model.learn(total_timesteps=spec["total_timesteps"])
run_s = time.perf_counter() - start
final = sum(e["r"] for e in model.ep_info_buffer) / len(model.ep_info_buffer)
print(json.dumps({"compile_s": 0.0, "run_s": run_s, "steps_per_s": spec["total_timesteps"] / run_s,
                  "final_returns": [round(final, 1)], "torch_threads": torch.get_num_threads()}))
"""


# polygrad only: the seeds sharded over two CPU devices (`--mesh.seeds 2`), one per core; PureJaxRL has
# no multi-device path on CPU (its scripts jit one device).
SHARDED_TIMING = r"""
import json, os, sys, time
os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"
from experiments import control, runs
import jax, numpy as np
num_seeds, spec = int(sys.argv[1]), json.loads(sys.argv[2])
config = control.default_config(spec["algo"], "CartPole-v1", num_seeds=num_seeds, **spec["overrides"],
                                **{"mesh.seeds": 2})
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


def peer_configs(algo: str, total_steps: int) -> dict:
    """polygrad's config of `algo` on CartPole-v1 (its overrides of the defaults), and the peers' configs
    derived from it."""
    overrides = {"total_steps": total_steps}
    config = control.default_config(algo, "CartPole-v1", **overrides)
    loss, advantage, learner = config.loss, config.advantage, config.learner
    total = config.num_updates * config.batch_size
    spec = {"algo": algo, "overrides": overrides}
    # polygrad's value loss is 0.5 (v - R)^2 (PureJaxRL's too); SB3's is (v - R)^2.
    sb3 = {"learning_rate": config.learning_rate, "n_steps": config.num_steps, "gamma": advantage.gamma,
           "gae_lambda": advantage.gae_lambda, "normalize_advantage": loss.normalize_advantages}
    if algo == "trpo":
        step = learner.step
        sb3 |= {"batch_size": config.batch_size // learner.value_minibatches,
                "n_critic_updates": learner.value_epochs, "cg_max_steps": step.cg_iterations,
                "cg_damping": step.damping, "line_search_shrinking_factor": step.backtrack_factor,
                "line_search_max_iter": step.max_backtracks, "target_kl": step.max_kl}
    else:
        clip = getattr(loss.gate, "eps_low", None)
        spec["purejaxrl"] = {
            "LR": config.learning_rate, "NUM_ENVS": config.num_envs, "NUM_STEPS": config.num_steps,
            "TOTAL_TIMESTEPS": total, "UPDATE_EPOCHS": learner.num_epochs,
            "NUM_MINIBATCHES": learner.num_minibatches, "GAMMA": advantage.gamma,
            "GAE_LAMBDA": advantage.gae_lambda, "CLIP_EPS": clip or 0.2, "ENT_COEF": loss.entropy_coef,
            "VF_COEF": loss.value_coef, "MAX_GRAD_NORM": config.max_grad_norm,
            "ACTIVATION": config.activation, "ENV_NAME": config.env, "ANNEAL_LR": config.anneal_lr,
            "DEBUG": False}
        sb3 |= {"ent_coef": loss.entropy_coef, "vf_coef": 0.5 * loss.value_coef,
                "max_grad_norm": config.max_grad_norm}
        if algo == "ppo":
            sb3 |= {"batch_size": config.batch_size // learner.num_minibatches,
                    "n_epochs": learner.num_epochs, "clip_range": clip, "clip_range_vf": loss.value_clip}
        else:
            sb3 |= {"use_rms_prop": False}  # Adam, as polygrad
    spec["sb3"] = {"class": algo.upper(), "n_envs": config.num_envs, "total_timesteps": total,
                   "anneal_lr": config.anneal_lr and algo != "trpo",
                   "hidden_sizes": list(config.hidden_sizes), "kwargs": sb3}
    assert isinstance(learner, trpo.TrustRegionLearnerConfig) == (algo == "trpo")
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algos", nargs="+", default=["ppo"], choices=ALGOS)
    parser.add_argument("--purejaxrl", help="PureJaxRL checkout (commit 31756b1); omit to leave it out")
    parser.add_argument("--python", help="python of a venv with PureJaxRL's dependencies")
    parser.add_argument("--sb3-python", help="python of a venv with torch, stable-baselines3, sb3-contrib")
    parser.add_argument("--total-steps", type=int, default=500_000, help="environment steps per seed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=list(benchmark_versions.CASES),
                        choices=list(benchmark_versions.CASES))
    parser.add_argument("--out", default="runs/benchmark_peers.json")
    args = parser.parse_args()
    if args.purejaxrl and not args.python:
        parser.error("--purejaxrl needs --python (a venv with distrax)")
    configs = {algo: peer_configs(algo, args.total_steps) for algo in args.algos}

    def systems(case: str) -> dict[str, System]:
        algo, seeds = case.split(" ", 1)
        spec = json.dumps(configs[algo])
        out = {"polygrad": System(REPO, args=(spec,))}  # benchmark_versions.TIMING
        if args.purejaxrl and algo != "trpo":
            out["PureJaxRL"] = System(os.path.join(os.path.abspath(args.purejaxrl), "purejaxrl"),
                                      PUREJAXRL_TIMING, os.path.abspath(args.python), (spec,))
        if args.sb3_python and seeds == "1seed":
            out["SB3"] = System(REPO, SB3_TIMING, os.path.abspath(args.sb3_python), (spec,))
        if seeds == "8seeds":
            out["polygrad, 2 devices"] = System(REPO, SHARDED_TIMING, sys.executable, (spec,))
        return out

    cases = [f"{algo} {case}" for algo in args.algos for case in args.cases]
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}  load average {os.getloadavg()[0]:.2f}")
    results = benchmark_versions.interleaved_rounds(systems, cases, args.rounds)
    print(f"\nmedians over {args.rounds} rounds (load average now {os.getloadavg()[0]:.2f}):")
    print("| algorithm | case | system | env steps/s | compile s | lowest final return | x PureJaxRL "
          "| x SB3 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for case, per_system in results.items():
        speeds = {name: statistics.median(r["steps_per_s"] for r in rs) for name, rs in per_system.items()}
        for name, rs in per_system.items():
            ratios = [f"{speeds[name] / speeds[peer]:.2f}x" if peer in speeds else ""
                      for peer in ("PureJaxRL", "SB3")]
            print(f"| {case.replace(' ', ' | ')} | {name} | {speeds[name]:,.0f} | "
                  f"{statistics.median(r['compile_s'] for r in rs):.1f} | "
                  f"{min(min(r['final_returns']) for r in rs):.0f} | {' | '.join(ratios)} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"configs": configs, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
