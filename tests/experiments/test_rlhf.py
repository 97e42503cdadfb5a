"""experiments/rlhf.py: bad configs fail at once (one line, exit code 2); a small study end to end (reward
model above 0.75 held-out accuracy on noiseless pairs, PPO raises the proxy reward, best-of-n KL in closed
form, every stage cached and reused)."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import rlhf
from polygrad import validate
from polygrad.lm import TransformerLM, init_params

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A small study: noiseless labels, a 1-layer model, a few PPO updates.
# (GRPO and DPO run end to end in notebooks/04_rlhf.ipynb; their losses are tested in tests/polygrad.)
SMALL = dict(d_model=32, num_layers=1, num_heads=2, corpus_size=3000, sft_steps=300, sft_batch_size=64,
             num_pairs=2000, label_temperature=0.01, heldout_pairs=500, rm_epochs=4.0, rm_learning_rate=3e-3,
             rm_data_scales=(), methods=("ppo", "bon"), ppo_kl_coefs=(0.0,), num_updates=12,
             rollout_batch=32, ppo_epochs=2, ppo_minibatches=2, learning_rate=5e-4, bon_prompts=16,
             bon_n_max=16, eval_prompts=32, eval_samples=2, updates_per_chunk=6)


@pytest.mark.parametrize("fields, message", [
    (dict(num_pairs=0), "num_pairs must be >= 1"),
    (dict(label_temperature=0.0), "label_temperature must be > 0"),
    (dict(label_temperature=-1.0), "label_temperature must be > 0"),
    (dict(label_temperature=float("nan")), "label_temperature must be finite"),
    (dict(methods=("ppo", "rlhf")), "methods must be one of"),
    (dict(rollout_batch=30, ppo_minibatches=4), "does not divide"),
    (dict(task_knobs='{"length_min": 9, "length_max": 3}'), "task_knobs"),
    (dict(task_knobs="{w_like: 1}"), "not JSON"),
    (dict(dpo_betas=(0.1, 0.0)), "dpo_betas must be > 0"),
    (dict(ppo_kl_coefs=()), "ppo_kl_coefs is empty"),
    (dict(rm_data_scales=(1e-6,)), "leaves no pairs"),
    (dict(d_model=30, num_heads=4), "not divisible"),
])
def test_bad_configs_are_refused_with_a_clear_message(fields, message):
    with pytest.raises(validate.ConfigError, match=message):
        rlhf.RLHFConfig(**fields)


def test_a_reward_model_of_another_vocabulary_is_refused(tmp_path):
    config = rlhf.RLHFConfig(d_model=16, num_layers=1, num_heads=2)
    wrong = TransformerLM(vocab_size=30, max_len=config.make_model().max_len, d_model=16, num_layers=1,
                          num_heads=2, value_head=True)
    path = str(tmp_path / "rm-wrong.npz")
    rlhf.save_params(path, jax.jit(init_params, static_argnums=0)(wrong, jax.random.PRNGKey(0)), wrong)
    with pytest.raises(validate.ConfigError, match="vocabulary of 30 tokens, the task has 23"):
        rlhf.RLHFConfig(d_model=16, num_layers=1, num_heads=2, reward_model_path=path)
    with pytest.raises(validate.ConfigError, match="does not exist"):
        rlhf.RLHFConfig(reward_model_path=str(tmp_path / "missing.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    with pytest.raises(validate.ConfigError, match="not a saved reward model"):
        rlhf.RLHFConfig(reward_model_path=str(tmp_path / "junk.npz"))


def test_command_line_refuses_a_bad_config_with_one_line_and_exit_code_2():
    env = {**os.environ, "XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=false"}
    out = subprocess.run([sys.executable, "-m", "experiments.rlhf", "--num-pairs", "0"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: num_pairs must be >= 1, got 0"
    assert "Traceback" not in out.stderr and out.stdout == ""


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("rlhf"))
    config = rlhf.RLHFConfig(**SMALL, run_dir=os.path.join(folder, "run"),
                             cache_dir=os.path.join(folder, "cache"))
    lines = []
    summary = rlhf.run(config, log=lines.append)
    return config, summary, lines


@pytest.mark.slow
def test_small_study_end_to_end(small_study):
    config, summary, lines = small_study
    rm = summary["reward_models"][0]
    # noiseless pairs: the reward model ranks held-out pairs (held-out prompts) by the gold order
    assert rm["heldout_accuracy_gold_order"] > 0.75, rm
    assert rm["gold_correlation_sft"] > 0.4, rm
    # PPO against it raises the proxy reward (the first and last thirds of its updates)
    metrics = rlhf.runs.load_metrics(next(
        os.path.join(config.cache_dir, d) for d in os.listdir(config.cache_dir) if d.startswith("ppo-")))[1]
    proxy = metrics["ppo_kl0/proxy"][0]
    third = len(proxy) // 3
    assert proxy[-third:].mean() > proxy[:third].mean() + 0.2, proxy
    assert summary["methods"]["ppo_kl0"]["proxy"] > summary["methods"]["sft"]["proxy"] + 0.2
    assert summary["methods"]["ppo_kl0"]["kl"] > 0.05
    # best-of-n: KL = log n - (n - 1) / n, and n = 1 is the SFT policy itself (proxy mean 0 by normalisation)
    bon = summary["best_of_n"]
    np.testing.assert_allclose(bon["kl"], [math.log(n) - (n - 1) / n for n in bon["n"]], rtol=1e-6)
    assert abs(bon["per_rm"][0]["proxy"][0]) < 1e-5
    assert bon["per_rm"][0]["proxy"][-1] > bon["per_rm"][0]["proxy"][0]
    assert set(summary["methods"]) == {"sft", "ppo_kl0", "bon_n1", "bon_n2", "bon_n4", "bon_n8", "bon_n16"}
    with open(os.path.join(config.run_dir, "summary.json")) as f:
        assert json.load(f)["methods"]["sft"]["kl"] == summary["methods"]["sft"]["kl"]
    assert os.path.exists(os.path.join(config.run_dir, "rlhf_overoptimisation.png"))
    assert any(line.startswith("[sft: 300 steps") for line in lines)


@pytest.mark.slow
def test_rerun_reuses_every_cached_stage(small_study):
    config, summary, _ = small_study
    lines = []
    again = rlhf.run(config, log=lines.append)
    text = "\n".join(lines)
    for stage in ("[sft] cached", "[pool] cached", "[preferences] cached", "pairs] cached"):
        assert stage in text, text
    assert "resuming" in text  # the PPO run folder is complete: nothing is trained again
    assert again["methods"]["ppo_kl0"] == summary["methods"]["ppo_kl0"]
    assert again["reward_models"][0]["heldout_accuracy"] == summary["reward_models"][0]["heldout_accuracy"]
