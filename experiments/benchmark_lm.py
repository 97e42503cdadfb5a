"""Throughput of the toy language-model pipeline: sampling with and without the KV cache, and RL steps.

    python -m experiments.benchmark_lm                       # reverse, 16 prompts x G 8, d_model 64, 2 layers
    python -m experiments.benchmark_lm --task scratchpad_sum --repeats 5

Prints (and writes to `<out>/benchmark_lm.json`):

- sampled tokens per second, `polygrad.lm.sampling.sample` with the KV cache (one model call per token on a
  `[B, 1]` slice) and without it (the whole prefix recomputed for every token), at the RL batch size;
- RL updates per second at the stated batch (prompts x G x response length), with the time split between
  sampling (generation, scoring, teacher-forced old/reference log-probs) and updating (the epochs of
  minibatch gradient steps).

Every timed function is compiled first; the figures are medians over `repeats` calls (timings on a shared
2-core machine are noisy).
"""

import dataclasses
import json
import os
import time

import jax
import numpy as np
import tyro

from experiments import lm
from polygrad.lm import generation, sampling
from polygrad.lm.transformer import init_params


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    task: str = "reverse"
    num_prompts: int = 16
    group_size: int = 8
    num_epochs: int = 2
    num_minibatches: int = 2
    d_model: int = 64
    num_layers: int = 2
    repeats: int = 5
    out: str = "runs/benchmark_lm"


def _median_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(bench: BenchmarkConfig) -> dict:
    config = lm.LMConfig(task=bench.task, num_prompts=bench.num_prompts, group_size=bench.group_size,
                         num_epochs=bench.num_epochs, num_minibatches=bench.num_minibatches,
                         d_model=bench.d_model, num_layers=bench.num_layers, num_seeds=1, eval_prompts=1)
    task, model = config.make_task(), config.make_model()
    params = init_params(model, jax.random.PRNGKey(0))
    batch = bench.num_prompts * bench.group_size
    length = task.max_response_len
    prompts = task.sample_prompts(jax.random.PRNGKey(1), batch, "train")
    results = {"task": bench.task, "batch": f"{bench.num_prompts} prompts x G {bench.group_size} x "
               f"{length} tokens", "model": f"d_model {bench.d_model}, {bench.num_layers} layers",
               "device": jax.devices()[0].device_kind}

    for use_cache in (True, False):
        fn = jax.jit(
            lambda p, k, c=use_cache: sampling.sample(model, p, k, prompts, length, use_cache=c).tokens)
        seconds = _median_time(lambda fn=fn: fn(params, jax.random.PRNGKey(2)), bench.repeats)
        results[f"tokens_per_s_{'cache' if use_cache else 'no_cache'}"] = batch * length / seconds

    # one RL update, and its two halves, of lm.make_program (eval disabled: eval_prompts = 1)
    program = lm.make_program(config, params)
    carry = program.init(jax.random.PRNGKey(3))
    update = jax.jit(program.update)
    results["update_s"] = _median_time(lambda: update(carry)[0].params, bench.repeats)

    def sampling_half(carry):
        groups, _, _ = generation.collect(config.sampling, task, model, carry.params, carry.key, **lm.TOKENS)
        flat = jax.tree.map(lambda x: x.reshape((batch, *x.shape[2:])), groups)
        old = sampling.sequence_log_probs(model, carry.params, flat.prompts, flat.tokens)
        ref = sampling.sequence_log_probs(model, params, flat.prompts, flat.tokens)
        return old.log_probs + ref.log_probs

    results["sampling_s"] = _median_time(lambda: jax.jit(sampling_half)(carry), bench.repeats)
    results["updating_s"] = max(results["update_s"] - results["sampling_s"], 0.0)
    results["updates_per_s"] = 1.0 / results["update_s"]
    results["sampling_share"] = results["sampling_s"] / results["update_s"]

    print(f"{results['device']}, {results['model']}, batch {results['batch']}")
    print(f"sampled tokens/s: KV cache {results['tokens_per_s_cache']:,.0f}, "
          f"no cache {results['tokens_per_s_no_cache']:,.0f} "
          f"({results['tokens_per_s_cache'] / results['tokens_per_s_no_cache']:.1f}x)")
    print(f"RL: {results['updates_per_s']:.2f} updates/s ({results['update_s'] * 1e3:.0f} ms each: sampling "
          f"{results['sampling_s'] * 1e3:.0f} ms = {100 * results['sampling_share']:.0f}%, updating "
          f"{results['updating_s'] * 1e3:.0f} ms; {bench.num_epochs} epochs x {bench.num_minibatches} "
          "minibatches)")
    os.makedirs(bench.out, exist_ok=True)
    with open(os.path.join(bench.out, "benchmark_lm.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main(tyro.cli(BenchmarkConfig))
