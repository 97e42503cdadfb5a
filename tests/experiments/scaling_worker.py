"""Worker of tests/experiments/test_scaling.py: runs one case in a process with forced host devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.experiments.scaling_worker CASE [DIR]

`test_scaling.py` starts it in a subprocess (so that the other tests keep one device) with a timeout,
and reads the JSON object it prints on its last line.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments import runs  # noqa: I001  (first: sets XLA's flags before JAX starts)
from polygrad import losses, sharding


def rel_err(a, b) -> float:
    """max |a - b| / max |a| over the leaves of two pytrees."""
    out = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        out = max(out, float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(x))), 1e-30)))
    return out


# --- every loss preset: loss and gradient on 1, 2, 4, 8 devices --------------------------------------


def loss_batch(seed: int, rows: int = 16, length: int = 6, features: int = 5, vocab: int = 7):
    """A tiny softmax policy `logits = x W` over a ragged `[rows, length]` batch (one empty row), its
    old/ref log-probs, per-sequence advantages and critic arrays; returns (W, batch)."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    x = rng.standard_normal((rows, length, features)).astype(f32)
    w = (0.5 * rng.standard_normal((features, vocab + 1))).astype(f32)
    tokens = rng.integers(0, vocab, (rows, length))
    lengths = rng.integers(1, length + 1, rows)
    lengths[-1] = 0
    mask = (np.arange(length)[None] < lengths[:, None]).astype(f32)
    logits = x @ w[:, :vocab]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    logp = np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    batch = dict(
        x=x, tokens=tokens, mask=mask,
        logp_old=(logp + 0.2 * rng.standard_normal(logp.shape)).astype(f32),
        logp_ref=(logp + 0.2 * rng.standard_normal(logp.shape)).astype(f32),
        adv=rng.standard_normal(rows).astype(f32),
        values_old=rng.standard_normal((rows, length)).astype(f32),
        returns=rng.standard_normal((rows, length)).astype(f32),
    )
    return jnp.asarray(w), jax.tree.map(jnp.asarray, batch)


def preset_inputs(config, w, b):
    """The arguments of `losses.policy_loss` under parameters `w` (log-probs, entropy, values)."""
    vocab = w.shape[1] - 1
    logits = b["x"] @ w[:, :vocab]
    logp_all = jax.nn.log_softmax(logits)
    logp_new = jnp.take_along_axis(logp_all, b["tokens"][..., None], -1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, -1)
    adv = b["adv"] if config.advantage != "token" else jnp.broadcast_to(b["adv"][:, None], b["mask"].shape)
    extra = {}
    if config.value_coef > 0:
        extra = dict(values=b["x"] @ w[:, vocab], values_old=b["values_old"], returns=b["returns"])
    return (logp_new, b["logp_old"], adv, b["mask"], b["logp_ref"], entropy), extra


def preset_loss(config, w, b):
    args, extra = preset_inputs(config, w, b)
    return losses.policy_loss(config, *args, **extra)[0]


def shard_map_loss(config, mesh, w, b):
    """The same loss with explicit collectives: rows split over `data`, `sharded_policy_loss`."""
    spec = jax.sharding.PartitionSpec(sharding.DATA)

    def local(w, b):
        args, extra = preset_inputs(config, w, b)
        return sharding.sharded_policy_loss(config, sharding.DATA, *args, **extra)

    mapped = jax.shard_map(local, mesh=mesh, in_specs=(jax.sharding.PartitionSpec(), spec),
                           out_specs=jax.sharding.PartitionSpec())
    return mapped(w, b)


FULL_SWEEP = ("grpo", "dr_grpo", "dapo", "gspo", "ppo")


def case_presets(dtype: str = "float64") -> dict:
    """For every preset on 8 devices (and 2, 4 for those of `FULL_SWEEP`): the relative errors of loss and
    gradient (jit auto-sharding, and shard_map with `sharded_policy_loss` where the preset allows it)
    against one device, in `dtype` (float64 under x64: what is left is the reassociation of sums)."""
    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    w, b = loss_batch(0)
    w, b = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, (w, b))
    out = {"dtype": dtype}
    for name in sorted(losses.PRESETS):
        config = losses.PRESETS[name]
        ref = jax.jit(jax.value_and_grad(lambda w, b, c=config: preset_loss(c, w, b)))(w, b)
        errors = {}
        for n in (2, 4, 8) if name in FULL_SWEEP else (8,):
            mesh = sharding.make_mesh(1, n)
            data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.DATA))
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            bs = jax.device_put(b, data)
            ws = jax.device_put(w, replicated)
            got = jax.jit(jax.value_and_grad(lambda w, b, c=config: preset_loss(c, w, b)))(ws, bs)
            errors[f"jit{n}"] = rel_err(ref, got)
            if type(config.gate).__name__ not in ("CovarianceClip", "CovarianceKL"):
                fn = jax.value_and_grad(lambda w, b, c=config, m=mesh: shard_map_loss(c, m, w, b))
                got = jax.jit(fn)(ws, bs)
                errors[f"shard_map{n}"] = rel_err(ref, got)
        out[name] = errors
    return out


# --- the language-model RL loss with the transformer -------------------------------------------------


def case_lm_loss() -> dict:
    """The minibatch loss and gradient of experiments.lm's update (teacher-forced transformer, GRPO on 2, 4
    and 8 devices; Dr. GRPO, DAPO, GSPO on 8), prompt groups split over data, against one device."""
    from experiments import lm
    from polygrad.lm import sampling
    from polygrad.lm.transformer import init_params

    config = lm.default_config("grpo", num_prompts=8, group_size=4, num_seeds=1)
    task, model = config.make_task(), config.make_model()
    params = init_params(model, jax.random.PRNGKey(0))
    prompts = task.sample_prompts(jax.random.PRNGKey(1), config.num_prompts, "train")
    prompts = jnp.repeat(prompts, config.group_size, axis=0)
    completion = jax.jit(lambda p, k, x: sampling.sample(model, p, k, x, task.max_response_len, **lm.TOKENS))(
        params, jax.random.PRNGKey(2), prompts)
    # random rewards (a fresh model scores 0 everywhere), with one group of equal rewards
    rewards = jax.random.bernoulli(jax.random.PRNGKey(3), 0.5, (config.num_prompts, config.group_size))
    rewards = rewards.astype(jnp.float32).at[0].set(1.0)
    out = {}
    for name in ("grpo", "dr_grpo", "dapo", "gspo"):
        loss_config = losses.PRESETS[name]
        # old and reference log-probs off by noise (a constant offset makes GRPO's policy term cancel
        # within each group, leaving a loss near 0 whose float32 relative error means nothing)
        noise = 0.1 * jax.random.normal(jax.random.PRNGKey(4), (2, *completion.log_probs.shape))
        batch = {"prompts": prompts, "tokens": completion.tokens, "mask": completion.mask,
                 "log_probs": completion.log_probs + noise[0],
                 "ref_log_probs": completion.log_probs + noise[1],
                 "advantages": losses.group_advantages(loss_config, rewards).reshape(-1)}

        def loss_fn(p, mb, c=loss_config):
            forced = sampling.sequence_log_probs(model, p, mb["prompts"], mb["tokens"])
            return losses.policy_loss(c, forced.log_probs, mb["log_probs"], mb["advantages"], mb["mask"],
                                      mb["ref_log_probs"], forced.entropies)[0]

        ref = jax.jit(jax.value_and_grad(loss_fn))(params, batch)
        for n in (2, 4, 8) if name == "grpo" else (8,):
            mesh = sharding.make_mesh(1, n)
            data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.DATA))
            got = jax.jit(jax.value_and_grad(loss_fn))(
                jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())),
                jax.device_put(batch, data))
            out[f"{name}/{n}"] = rel_err(ref, got)
            out[f"{name}/{n}/loss"] = float(ref[0])
    return out


# --- PPO CartPole: 1 vs 8 devices, and resume on another mesh ---------------------------------------


def case_ppo(run_dir: str) -> dict:
    """PPO on CartPole, global batch 8 environments x 128 steps, 10 updates: final parameters on one
    device, on 8 (data), on 2 seeds x 4 (data) with 2 seeds; and a run folder interrupted after 5
    updates on 8 devices and resumed on 2."""
    from experiments import control

    def config(**mesh):
        return control.default_config("ppo", total_steps=8 * 128 * 10, num_envs=8, num_steps=128, num_seeds=1,
                                      updates_per_chunk=5, mesh=runs.MeshConfig(**mesh))

    one = config(data=1)
    keys = runs.seed_keys(0, 1)
    reference, ref_metrics = runs.train(control.make_program(one), keys, control.build_mesh(one))
    out = {"one_device_mesh": control.build_mesh(one) is None}
    eight = config(data=8)
    mesh8 = control.build_mesh(eight)
    carry, metrics = runs.train(control.make_program(eight), keys, mesh8)
    out["mesh8"] = dict(mesh8.shape)
    out["params_8"] = rel_err(reference.learner.params, carry.learner.params)
    out["env_state_sharded"] = not carry.obs.sharding.is_fully_replicated
    out["param_replicated"] = jax.tree.leaves(carry.learner.params)[0].sharding.is_fully_replicated

    class Kill(Exception):
        pass

    def log_then_kill(line):
        if line.startswith("update      5/"):
            raise Kill

    try:
        control.run(dataclasses_replace(eight, run_dir=run_dir), log=log_then_kill)
    except Kill:
        pass
    lines = []
    resumed = control.run(dataclasses_replace(config(data=2), run_dir=run_dir), log=lines.append)
    out["resumed_at_5"] = any(line.startswith("resuming") and "update 5/10" in line for line in lines)
    out["checkpoint"] = os.path.relpath(runs.latest_checkpoint(run_dir), run_dir)
    out["resumed_8_to_2_params"] = rel_err(reference.learner.params,
                                           jax.tree.map(np.asarray, resumed.carry.learner.params))
    out["resumed_8_to_2_returns"] = rel_err(np.nan_to_num(np.asarray(ref_metrics["episode_return"])),
                                            np.nan_to_num(resumed.metrics["episode_return"]))
    return out


def dataclasses_replace(config, **fields):
    import dataclasses

    return dataclasses.replace(config, **fields)


def case_ppo_learns(run_dir: str) -> dict:
    """A short PPO CartPole run on 2 seeds x 4 data devices (8 environments per seed) in a run folder."""
    from experiments import control

    config = control.default_config("ppo", total_steps=60_000, num_envs=8, num_steps=128, num_seeds=2,
                                    updates_per_chunk=20, mesh=runs.MeshConfig(seeds=2, data=4),
                                    run_dir=run_dir)
    result = control.run(config, log=lambda _: None)
    returns = result.metrics["episode_return"]
    return {"first": float(np.nanmean(returns[:, :5])), "last": float(np.nanmean(returns[:, -5:])),
            "devices": jax.device_count()}


def case_processes(run_dir: str, data: str, snapshot: str = "") -> dict:
    """PPO CartPole (8 environments x 128 steps, 10 updates) in `run_dir` on a mesh of `data` devices on
    the data axis, which spans every process of a `jax.distributed` run (see `runs.initialize_distributed`);
    process 0 writes the run folder. With `snapshot`, process 0 copies the run folder there as it stands
    after its first checkpoint (update 5: every process has written its shards), to be resumed elsewhere."""
    import shutil

    from experiments import control

    if snapshot:
        save = runs.save_checkpoint

        def save_then_copy(folder, *args, **kwargs):
            save(folder, *args, **kwargs)
            if runs.is_writer() and not os.path.exists(snapshot):
                shutil.copytree(folder, snapshot, ignore=shutil.ignore_patterns(runs.LOCK_FILE))

        runs.save_checkpoint = save_then_copy
    config = control.default_config("ppo", total_steps=8 * 128 * 10, num_envs=8, num_steps=128, num_seeds=1,
                                    updates_per_chunk=5, mesh=runs.MeshConfig(data=int(data)),
                                    run_dir=run_dir)
    lines = []
    result = control.run(config, log=lines.append)
    final_return = float(np.nanmean(result.metrics["episode_return"][:, -1]))
    return {"process": jax.process_index(), "processes": jax.process_count(),
            "local_devices": jax.local_device_count(), "global_devices": jax.device_count(),
            "writer": runs.is_writer(), "final_return": final_return,
            "resumed_at": next((int(line.rsplit("update ", 1)[1].split("/")[0]) for line in lines
                                if line.startswith("resuming")), 0)}


def case_lm_run(run_dir: str) -> dict:
    """Two RL updates of experiments.lm (GRPO on reverse, tiny warm start) in run folders on one device
    and on 4 data devices (2 prompt groups each): the metrics of every update and the final parameters."""
    from experiments import lm

    out = {}
    params = {}
    for data in (1, 4):
        config = lm.default_config("grpo", num_prompts=8, group_size=4, num_seeds=1, num_updates=2,
                                   corpus_size=256, sft_steps=10, sft_batch_size=16, eval_prompts=4,
                                   final_eval_prompts=8, pass_k=2, mesh=runs.MeshConfig(data=data),
                                   warm_start_dir=os.path.join(run_dir, "warm"))
        result = lm.train(config, os.path.join(run_dir, f"data{data}"), log=lambda _: None)
        params[data] = list(runs.checkpoint_arrays(os.path.join(run_dir, f"data{data}"))[0].values())
        for name in ("reward", "response_length", "sample_entropy", "loss"):
            out[f"{name}_{data}"] = [float(x) for x in result["metrics"][name][0]]
    out["params_rel_err"] = rel_err(params[1], params[4])
    return out


CASES = {"presets": case_presets, "lm_loss": case_lm_loss, "lm_run": case_lm_run, "ppo": case_ppo,
         "ppo_learns": case_ppo_learns, "processes": case_processes}


if __name__ == "__main__":
    case = sys.argv[1]
    args = sys.argv[2:]
    result = CASES[case](*args)
    print(json.dumps({"devices": jax.device_count(), "pid": os.getpid(), **result}), flush=True)
