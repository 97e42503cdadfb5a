"""The rollout-trainer mismatch wiring of experiments/lm.py: a low-precision sampler, its log-probs in the
loss, corrections and reference points from the command line, and a tiny bf16-sampler run end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs import text_tasks
from experiments import lm, runs
from polygrad import losses, validate
from polygrad.lm import sampling
from polygrad.lm.transformer import TransformerLM, init_params


def _sampler_gap(dtype: str) -> float:
    """Max |log-prob reported by a `dtype` sampler - float32 teacher-forced log-prob| on its own tokens."""
    model = TransformerLM(vocab_size=text_tasks.VOCAB_SIZE, max_len=16, d_model=16, num_layers=1, num_heads=2)
    params = init_params(model, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: 8.0 * x, params)  # sharper logits, as after training
    prompts = jax.random.randint(jax.random.PRNGKey(1), (16, 6), 4, text_tasks.VOCAB_SIZE)
    low = sampling.cast_params(params, dtype)
    assert all(x.dtype == jnp.dtype(dtype) for x in jax.tree.leaves(low))
    out = sampling.sample(model, low, jax.random.PRNGKey(2), prompts, 8, **lm.TOKENS)
    assert out.log_probs.dtype == jnp.float32  # read in float32 from the low-precision logits
    forced = sampling.sequence_log_probs(model, params, prompts, out.tokens)
    return float(jnp.max(jnp.abs((out.log_probs - forced.log_probs) * out.mask)))


def test_a_bf16_sampler_reports_other_log_probs_than_the_fp32_trainer():
    fp32, bf16 = _sampler_gap("float32"), _sampler_gap("bfloat16")
    assert fp32 < 1e-4, fp32  # the same policy, cached decoding vs one forward pass
    assert 1e-3 < bf16 < 1.0, bf16  # a real but small mismatch
    with pytest.raises(validate.ConfigError, match="sampler dtype"):
        sampling.cast_params({"w": jnp.ones(2)}, "int8")


def test_correction_specs():
    assert losses.correction_from_spec("tis") == losses.TruncatedIS()
    assert losses.correction_from_spec("tis:level=sequence,cap_max=3") == losses.TruncatedIS("sequence", 3.0)
    assert losses.correction_from_spec("mis:low=none,high=3") == losses.MaskedIS(low=None, high=3.0)
    assert losses.correction_from_spec("MaskedIS:reweight=false") == losses.MaskedIS(reweight=False)
    assert losses.correction_from_spec("opsm:delta=0.5") == losses.OffPolicySequenceMask(0.5)
    for part in (losses.TruncatedIS("sequence", 3.0, 0.5), losses.MaskedIS(low=None),
                 losses.OffPolicySequenceMask(2)):
        assert losses.correction_from_spec(losses.correction_spec(part)) == part
    assert losses.LossConfig(correction="tis").correction == (losses.TruncatedIS(),)
    for spec, message in [("icepop", "correction must be one of"), ("tis:cap=2", "has no field 'cap'"),
                          ("opsm", "delta"), ("tis:cap_max", "not field=value"),
                          ("mis:low=-1", "lower bound"), ("tis:level=word", "level")]:
        with pytest.raises(validate.ConfigError, match=message):
            losses.LossConfig(correction=(spec,))


def test_the_command_line_reaches_corrections_sampler_and_references():
    config = lm.parse_config(["--algo", "dapo", "--sampler-dtype", "bfloat16", "--loss.correction",
                              "tis:cap_max=2", "opsm:delta=0.5", "--reference.kind", "ema",
                              "--reference.every", "4", "--reference.alpha", "0.3",
                              "--old-policy.every", "2"])
    assert config.loss.correction == (losses.TruncatedIS(cap_max=2.0), losses.OffPolicySequenceMask(0.5))
    assert config.loss.gate == losses.PRESETS["dapo"].gate  # the rest of the preset is kept
    assert config.sampler_dtype == "bfloat16"
    assert config.reference == losses.ReferenceConfig("ema", every=4, alpha=0.3)
    assert config.old_policy == losses.ReferenceConfig("sync", every=2)
    defaults = lm.parse_config([])
    assert defaults.loss.correction == () and defaults.sampler_dtype == "float32"
    assert defaults.reference == losses.ReferenceConfig("fixed")
    assert defaults.old_policy == losses.ReferenceConfig("sync", every=1)
    saved = runs.config_to_dict(config)  # parts are saved with their types, so a resume compares them
    assert saved["loss"]["correction"][0]["type"] == "TruncatedIS" and saved["reference"]["kind"] == "ema"
    for fields, message in [(dict(sampler_dtype="int4"), "sampler_dtype"),
                            (dict(mismatch_band=(2.0, 1.0)), "mismatch_band"),
                            (dict(reference="ema"), "reference must be a ReferenceConfig")]:
        with pytest.raises(validate.ConfigError, match=message):
            lm.LMConfig(**fields)


@pytest.mark.parametrize("argv,message", [(["--loss.correction", "tis:cap=2"], "has no field 'cap'"),
                                          (["--reference.kind", "polyak"], "kind must be one of")])
def test_a_bad_command_line_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lm.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_tiny_bf16_sampler_run_from_the_command_line(tmp_path):
    """Three updates of a tiny model sampled in bfloat16, with a tight MIS band, pi_ref synced to the
    policy every update and pi_old an EMA of the iterates: the mismatch is measured, reaches the loss (at
    the first update, where pi_old is the sampling policy, the loss's mismatch_kl, computed from
    logp_sampler, equals the one measured in the update; later pi_old lags behind) and the correction
    acts on it."""
    run_dir = str(tmp_path / "run")
    lm.main(["--task-knobs", json.dumps({"n_min": 2, "n_max": 3}), "--d-model", "16", "--num-layers", "1",
             "--num-heads", "2", "--corpus-size", "256", "--sft-steps", "60",
             "--sft-learning-rate", "1e-2", "--num-prompts", "4",
             "--group-size", "2", "--num-epochs", "1", "--num-minibatches", "1", "--num-seeds", "1",
             "--num-updates", "3", "--updates-per-chunk", "3", "--eval-prompts", "0", "--final-eval-prompts",
             "2", "--pass-k", "1", "--no-tensorboard", "--sampler-dtype", "bfloat16", "--loss.correction",
             "mis:low=0.999,high=1.001", "--reference.kind", "sync", "--old-policy.kind", "ema",
             "--old-policy.alpha", "0.5", "--learning-rate", "3e-3", "--run-dir", run_dir])
    _, metrics = runs.load_metrics(run_dir)
    assert os.path.exists(os.path.join(run_dir, "eval.json"))
    assert np.all(metrics["sampler_kl_k3"] > 0) and np.all(metrics["sampler_abs_log_ratio"] > 1e-4)
    loss_view, update_view = metrics["mismatch_kl"], metrics["sampler_kl_k1"]
    np.testing.assert_allclose(loss_view[:, 0], update_view[:, 0], rtol=1e-4, atol=1e-7)
    ratio_spread = np.maximum(metrics["ratio_max"] - 1, 1 - metrics["ratio_min"])  # pi_theta / pi_old
    assert ratio_spread[0, 0] < 1e-5 and np.all(ratio_spread[:, 1:] > 1e-3)  # pi_old lags from update 2
    assert np.all(loss_view[:, 1:] != update_view[:, 1:])
    assert np.all(metrics["mismatch_outside_frac"] > 0)  # the correction saw rho != 1
    assert np.all(metrics["correction_weight_mean"] < 1)
    assert np.all(np.abs(metrics["kl_ref"]) < 1e-5)  # pi_ref = the policy at the start of each update
    assert metrics["kl_to_initial"][0, 0] == 0 and metrics["kl_to_initial"][0, -1] > 0
