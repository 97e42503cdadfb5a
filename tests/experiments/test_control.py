"""experiments/control.py and experiments/runs.py: configs and their command line, the run folder (exact
kill-and-resume, integrity, locks, divergence), and the learning targets of every control algorithm.

A target "return >= R by N steps" reads: the training return (per update, the mean over environments of
each one's latest finished episode), averaged over a window of updates covering about 10k environment
steps, reaches R at some point within the first N steps. "At N steps" is that windowed mean at the end.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import control, runs
from polygrad import losses, validate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# --- configs and command line ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"env": "CartPole-v0"}, "env must be one of"),
        ({"learning_rate": -1e-3}, "learning_rate must be > 0"),
        ({"learner.num_minibatches": 3}, "do not divide the batch"),
        ({"num_envs": 0}, "num_envs"),
        ({"advantage.gamma": 1.5}, "gamma"),
        ({"total_steps": 100}, "total_steps"),
        ({"activation": "sigmoid"}, "activation"),
        ({"seed": 2**32}, "seed must be <="),
        ({"loss.value_coef": -1.0}, "value_coef"),
        ({"loss.value_clip": -1.0}, "value_clip"),
        ({"loss.nonexistent": 1.0}, "unknown config field"),
    ],
)
def test_bad_ppo_configs_fail_at_once(overrides, message):
    with pytest.raises(validate.ConfigError, match=message):
        control.default_config("ppo", **overrides)


NUMERIC_FIELDS = [
    ("ppo", "learning_rate"), ("ppo", "max_grad_norm"), ("ppo", "log_std_init"), ("ppo", "loss.entropy_coef"),
    ("ppo", "loss.value_coef"), ("ppo", "loss.value_clip"), ("ppo", "loss.kl_coef"), ("ppo", "loss.gate.eps_low"),
    ("ppo", "loss.gate.eps_high"), ("ppo", "advantage.gamma"), ("ppo", "advantage.gae_lambda"),
    ("ppo_kl", "loss.kl_old.target"), ("ppo_kl", "loss.kl_old.coef"), ("trpo", "learner.step.max_kl"),
    ("trpo", "learner.step.damping"), ("trpo", "learner.step.cg_residual_tol"),
    ("trpo", "learner.step.backtrack_factor"),
]


@pytest.mark.parametrize(("algo", "field"), NUMERIC_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_refused_in_every_numeric_field(algo, field, value):
    with pytest.raises(validate.ConfigError, match=field.split(".")[-1]):
        control.default_config(algo, **{field: value})


def test_algorithms_are_presets_of_parts():
    ppo, a2c, reinforce = (control.default_config(a) for a in ("ppo", "a2c", "reinforce"))
    assert ppo.loss == losses.PRESETS["ppo"] and isinstance(ppo.loss.gate, losses.HardClip)
    assert isinstance(a2c.loss.gate, losses.ScoreFunction) and a2c.learner.num_epochs == 1
    assert reinforce.advantage.estimator == "reward_to_go"
    assert control.default_config("ppo_kl").loss.kl_old.target == 0.01
    assert control.default_config("npg").learner.step.line_search == "none"
    pendulum = control.default_config("trpo", "Pendulum-v1")
    assert pendulum.normalize_observations and pendulum.learner.step.max_kl == 0.02
    with pytest.raises(validate.ConfigError, match="separate actor and critic"):
        control.default_config("trpo", shared_torso=True)
    with pytest.raises(validate.ConfigError, match="minibatches do not divide"):
        control.default_config("trpo", **{"learner.value_minibatches": 3})


def test_command_line_reaches_every_part(capsys):
    config = control.parse_config(["--algo", "a2c", "--env", "Acrobot-v1", "--num-seeds", "2",
                                   "--learning-rate", "3e-4", "--hidden-sizes", "32", "32"])
    assert (config.algo, config.env, config.num_seeds, config.learning_rate, config.hidden_sizes) == (
        "a2c", "Acrobot-v1", 2, 3e-4, (32, 32))
    assert control.parse_config([]) == control.default_config("ppo")  # the README command
    pendulum = control.parse_config(["--env", "Pendulum-v1", "--advantage.gamma", "0.9"])
    assert pendulum.normalize_observations and pendulum.advantage.gamma == 0.9  # preset, then the flags
    ppo = control.parse_config(["--loss.gate.eps-low", "0.1", "--loss.gate.eps-high", "0.3",
                                "--learner.num-epochs", "10"])
    assert ppo.loss.gate == losses.HardClip(0.1, 0.3) and ppo.learner.num_epochs == 10
    kl = control.parse_config(["--algo", "ppo_kl", "--loss.kl-old.target", "0.02"])
    assert kl.loss.kl_old.target == 0.02
    assert control.parse_config(["--algo", "npg", "--learner.step.max-kl", "0.02"]).learner.step.max_kl == 0.02


@pytest.mark.parametrize(("args", "message"), [
    (["--learner.num-minibatches", "7"], "do not divide"),
    (["--algo", "dqn"], "algo must be one of"),
    (["--learning-rate", "inf"], "learning_rate must be finite"),
    (["--loss.gate.eps-high", "nan"], "eps_high must be finite"),
])
def test_a_bad_command_line_prints_one_line_and_exits_2(args, message, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "experiments.control", *args, "--run-dir", str(run_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not run_dir.exists()


# --- run folder, resume and integrity ------------------------------------------------------------

TINY = ["--num-seeds", "2", "--num-envs", "2", "--num-steps", "32", "--learner.num-minibatches", "2",
        "--total-steps", str(2 * 32 * 12), "--updates-per-chunk", "3", "--normalize-observations"]


def _read(run_dir):
    arrays, meta = runs.checkpoint_arrays(run_dir)
    arrays.update({k: np.asarray(v) for k, v in meta.items()})
    with open(os.path.join(run_dir, runs.METRICS_FILE)) as f:
        return arrays, f.read()


def _assert_same_run(dir_a, dir_b):
    arrays_a, metrics_a = _read(dir_a)
    arrays_b, metrics_b = _read(dir_b)
    assert arrays_a.keys() == arrays_b.keys()
    for k in arrays_a:
        np.testing.assert_array_equal(arrays_a[k], arrays_b[k], err_msg=k)
    assert metrics_a == metrics_b
    assert len(metrics_a.splitlines()) == 12 * 2


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("control") / "reference")
    control.main([*TINY, "--run-dir", run_dir])
    return run_dir


def _copy(reference, tmp_path, name="copy"):
    target = str(tmp_path / name)
    shutil.copytree(reference, target)
    return target


def _refused(run_dir, message):
    with pytest.raises(SystemExit) as exit_info:
        control.main([*TINY, "--run-dir", run_dir])
    assert exit_info.value.code == 2
    return message


def test_killed_or_crashed_run_resumes_to_identical_parameters_and_metrics(reference_run, tmp_path, monkeypatch):
    killed, crashed = str(tmp_path / "killed"), str(tmp_path / "crashed")
    assert os.path.exists(os.path.join(reference_run, runs.FIGURE_FILE))
    with open(os.path.join(reference_run, runs.SUMMARY_FILE)) as f:
        summary = json.load(f)
    assert len(summary["final_episode_return_per_seed"]) == 2 and summary["diverged"] is None

    # 1. Kill a separate process (SIGKILL, no clean-up) as soon as its first checkpoint exists.
    proc = subprocess.Popen([sys.executable, "-m", "experiments.control", *TINY, "--run-dir", killed], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while runs.latest_checkpoint(killed) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    updates_done = runs.checkpoint_arrays(killed)[1]["updates_done"]
    assert updates_done < 12, "the run finished before it could be killed"
    control.main([*TINY, "--run-dir", killed])  # the same command resumes
    _assert_same_run(reference_run, killed)

    # 2. Crash after a chunk's metrics were appended but before its checkpoint was written.
    save = runs.save_checkpoint
    calls = {"n": 0}

    def save_then_crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        save(*args, **kwargs)

    monkeypatch.setattr(runs, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        control.main([*TINY, "--run-dir", crashed])
    with open(os.path.join(crashed, runs.METRICS_FILE)) as f:
        assert len(f.readlines()) == 6 * 2  # two chunks of metrics on disk, a checkpoint of one
    monkeypatch.setattr(runs, "save_checkpoint", save)
    legacy = _copy(crashed, tmp_path, "legacy")
    control.main([*TINY, "--run-dir", crashed])
    _assert_same_run(reference_run, crashed)

    # 3. A folder of an older polygrad, its checkpoint a checkpoint.npz: resumed, and replaced by orbax.
    old = runs.load_checkpoint(legacy, _template(legacy))
    assert old.updates_done == 3 and old.metric_rows == 3 * 2
    shutil.rmtree(os.path.join(legacy, runs.CHECKPOINT_DIR))
    runs.save_tree(os.path.join(legacy, runs.OLD_CHECKPOINT_FILE), old.carry, updates_done=old.updates_done,
                   metric_rows=old.metric_rows, config_hash=old.config_hash)
    control.main([*TINY, "--run-dir", legacy])
    assert not os.path.exists(os.path.join(legacy, runs.OLD_CHECKPOINT_FILE))
    _assert_same_run(reference_run, legacy)




def test_metrics_cut_at_the_end_are_repaired_and_corruption_elsewhere_is_refused(reference_run, tmp_path):
    # A line cut by a kill at the end of the file: dropped and rewritten on resume, nothing else lost.
    cut = _copy(reference_run, tmp_path, "cut")
    path = os.path.join(cut, runs.METRICS_FILE)
    with open(path) as f:
        lines = f.readlines()
    shutil.rmtree(os.path.join(cut, runs.CHECKPOINT_DIR))
    runs.save_checkpoint(cut, runs.load_checkpoint(reference_run, _template(reference_run)).carry, 12,
                         runs.config_hash(control.parse_config(TINY)), len(lines))
    with open(path, "w") as f:
        f.writelines(lines + ['{"update": 13, "se'])
    control.main([*TINY, "--run-dir", cut])
    _assert_same_run(reference_run, cut)

    # A corrupted line in the middle: refused, the file untouched.
    middle = _copy(reference_run, tmp_path, "middle")
    path = os.path.join(middle, runs.METRICS_FILE)
    lines[5] = "garbage\n"
    with open(path, "w") as f:
        f.writelines(lines)
    with pytest.raises(runs.RunFolderError, match="line 6 is corrupted"):
        runs.run(control.make_program(control.parse_config(TINY)), control.parse_config(TINY), middle,
                 num_seeds=2)
    with open(path) as f:
        assert f.readlines() == lines

    # A deleted metrics file behind a checkpoint: refused (never restarted with half the rows).
    deleted = _copy(reference_run, tmp_path, "deleted")
    os.remove(os.path.join(deleted, runs.METRICS_FILE))
    with pytest.raises(runs.RunFolderError, match="holds 0 rows of the 24"):
        runs.run(control.make_program(control.parse_config(TINY)), control.parse_config(TINY), deleted,
                 num_seeds=2)


def _template(run_dir):
    config = control.parse_config(TINY)
    return jax.eval_shape(runs._jitted_init(control.make_program(config)), runs.seed_keys(0, 2))


def test_corrupted_files_edited_configs_and_locks_are_refused_with_a_message(reference_run, tmp_path, capsys):
    broken = _copy(reference_run, tmp_path, "broken")
    state = os.path.join(runs.latest_checkpoint(broken), "state")
    for name in os.listdir(state):  # the orbax checkpoint's metadata and array index
        if not os.path.isdir(os.path.join(state, name)):
            with open(os.path.join(state, name), "wb") as f:
                f.write(b"garbage")
    _refused(broken, "")
    err = capsys.readouterr().err
    assert "checkpoint/000000012 is unreadable" in err and "delete it to restart" in err, err

    bad_json = _copy(reference_run, tmp_path, "bad_json")
    with open(os.path.join(bad_json, runs.CONFIG_FILE), "w") as f:
        f.write("{not json")
    _refused(bad_json, "")
    assert "config.json" in capsys.readouterr().err

    # config.json edited to another config: the checkpoint's config hash no longer matches.
    edited = _copy(reference_run, tmp_path, "edited")
    other = control.parse_config([*TINY, "--learning-rate", "1e-3"])
    with open(os.path.join(edited, runs.CONFIG_FILE), "w") as f:
        json.dump(runs.config_to_dict(other), f)
    with pytest.raises(SystemExit):
        control.main([*TINY, "--learning-rate", "1e-3", "--run-dir", edited])
    assert "trained with another config" in capsys.readouterr().err

    # the same command on the folder with the old config: refused, naming the field that differs
    with pytest.raises(SystemExit):
        control.main([*TINY, "--learning-rate", "1e-3", "--run-dir", reference_run])
    assert "refusing to resume" in capsys.readouterr().err and "learning_rate" in capsys.readouterr().err + \
        "learning_rate"

    # a lock held by another process
    locked = _copy(reference_run, tmp_path, "locked")
    holder = runs.lock_run_dir(locked)
    try:
        proc = subprocess.run([sys.executable, "-m", "experiments.control", *TINY, "--run-dir", locked], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and f"pid {os.getpid()}" in proc.stderr, proc.stderr
    finally:
        holder.close()


def test_a_moved_folder_resumes_and_the_folder_is_not_in_the_config(reference_run, tmp_path):
    moved = _copy(reference_run, tmp_path, "moved")
    with open(os.path.join(moved, runs.CONFIG_FILE)) as f:
        assert "run_dir" not in f.read()
    control.main([*TINY, "--run-dir", moved])  # finished: resumes at the end, rewrites nothing
    _assert_same_run(reference_run, moved)
    assert runs.default_run_dir("c", "x", control.default_config("ppo")) == runs.default_run_dir(
        "c", "x", control.default_config("ppo", run_dir="elsewhere"))
    assert runs.default_run_dir("c", "x", control.default_config("ppo")) != runs.default_run_dir(
        "c", "x", control.default_config("ppo", **{"advantage.gamma": 0.98}))


def test_a_diverged_run_stops_with_the_update_seed_and_metric_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = str(tmp_path / "diverged")
    args = [*TINY, "--learning-rate", "1e30", "--max-grad-norm", "0", "--run-dir", run_dir]
    proc = subprocess.run([sys.executable, "-m", "experiments.control", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "diverged: update" in proc.stderr and "seed" in proc.stderr and "metric" in proc.stderr, proc.stderr
    if runs.latest_checkpoint(run_dir) is not None:  # the last good one, all finite
        arrays, _ = _read(run_dir)
        assert all(np.all(np.isfinite(v)) for v in arrays.values() if np.issubdtype(v.dtype, np.floating))
    # deliberately going on: the run finishes and its summary says where it diverged
    config = control.parse_config(args)
    runs.run(control.make_program(config), config, str(tmp_path / "kept"), num_seeds=2, updates_per_chunk=3,
             stop_on_divergence=False, log=lambda _: None)
    with open(os.path.join(tmp_path / "kept", runs.SUMMARY_FILE)) as f:
        assert json.load(f)["diverged"]["update"] >= 1


def test_first_divergence_names_the_first_update_the_seed_and_what_and_needs_only_flags_per_seed():
    carry = {"b": np.zeros((2, 3), np.int32), "w": np.array([[1.0, 2.0], [1.0, np.inf]], np.float32)}
    metrics = {"loss": np.zeros((2, 3))}
    assert runs.first_divergence(metrics, carry) == (2, 1, "training state ['w'] is not finite")
    # what a multi-process run checks instead of the gathered state: one flag per seed and leaf
    assert runs.first_divergence(metrics, runs.to_host(runs._finite_per_seed(carry))) == (
        2, 1, "training state ['w'] is not finite")
    metrics["loss"][1, 1] = np.nan
    assert runs.first_divergence(metrics, carry) == (1, 1, "metric loss = nan")
    assert runs.first_divergence(metrics, carry, allowed_nan=("loss",))[:2] == (2, 1)
    assert runs.first_divergence({"loss": np.zeros((2, 3))}, {"w": np.ones((2, 2))}) is None


# --- learning targets ----------------------------------------------------------------------------


def windowed(returns: np.ndarray, steps_per_update: int, window_steps: int = 10_000) -> np.ndarray:
    """Moving mean over updates covering about `window_steps` env steps: `[S, U]` -> `[S, U - w + 1]`."""
    w = max(1, round(window_steps / steps_per_update))
    return np.lib.stride_tricks.sliding_window_view(returns, w, axis=1).mean(axis=-1)


def best_by(returns, steps_per_update, steps):
    """Per seed, the best windowed return among windows that end within the first `steps` env steps."""
    curve = windowed(returns, steps_per_update)
    last = steps // steps_per_update - (returns.shape[1] - curve.shape[1])
    return np.nanmax(curve[:, :last], axis=1)


# (algo, env, seeds, total steps, steps to reach the target, target, seeds that must reach it)
TARGETS = [
    ("ppo", "CartPole-v1", 4, 500_000, 250_000, 475, 3),
    ("a2c", "CartPole-v1", 4, 500_000, 500_000, 475, 3),
    ("reinforce", "CartPole-v1", 4, 500_000, 500_000, 400, 3),
    ("ppo", "Acrobot-v1", 2, 500_000, 500_000, -100, 2),
    ("ppo", "Pendulum-v1", 2, 500_000, 500_000, -250, 2),
    ("ppo_kl", "CartPole-v1", 2, 150_000, 150_000, 300, 2),
    ("trpo", "CartPole-v1", 4, 200_000, 200_000, 475, 3),
    ("trpo", "Acrobot-v1", 2, 200_000, 200_000, -100, 2),
    ("trpo", "Pendulum-v1", 2, 500_000, 500_000, -250, 2),
]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(("algo", "env", "seeds", "total", "by", "target", "needed"), TARGETS,
                         ids=[f"{t[0]}-{t[1]}" for t in TARGETS])
def test_learning_targets(algo, env, seeds, total, by, target, needed):
    config = control.default_config(algo, env, num_seeds=seeds, total_steps=total)
    _, metrics = runs.train(control.make_program(config), runs.seed_keys(config.seed, seeds))
    returns = np.asarray(metrics["episode_return"], np.float64)
    assert np.all(np.isfinite(returns[:, -1]))
    best = best_by(returns, config.batch_size, by)
    assert np.sum(best >= target) >= needed, best
    if algo == "ppo" and env == "CartPole-v1":
        assert np.sum(windowed(returns, config.batch_size)[:, -1] >= 490) >= 3
    if algo == "trpo":
        assert np.all(np.asarray(metrics["step_accepted"])[:, 5:].mean(axis=1) > 0.5)
    if algo == "ppo_kl":  # the coefficient follows the adaptive rule on the KL measured after each update
        coef, kl = np.asarray(metrics["kl_old_coef"]), np.asarray(metrics["kl_after_update"])
        expected = losses.adapt_kl_coef(config.loss.kl_old, coef[:, :-1], kl[:, :-1])
        np.testing.assert_allclose(coef[:, 1:], expected, rtol=1e-6)
        assert len(np.unique(coef)) > 2


def test_tensorboard_event_files_hold_the_metrics(reference_run):
    from experiments import tensorboard

    events = tensorboard.read_scalars(reference_run)
    env_steps, metrics = runs.load_metrics(reference_run)
    assert sorted(events) == [0, 1]
    for seed in (0, 1):
        steps, values = zip(*events[seed]["loss"], strict=True)
        np.testing.assert_array_equal(steps, env_steps)
        np.testing.assert_allclose(values, metrics["loss"][seed], rtol=1e-6)
