"""experiments/tensorboard.py: event files written per seed and chunk read back with the right values."""

import json
import math

import numpy as np

from experiments import tensorboard


def test_scalars_are_written_per_seed_and_read_back_with_env_steps_as_step(tmp_path):
    run_dir = str(tmp_path)
    first = {"episode_return": np.array([[1.0, np.nan, 3.0], [10.0, 20.0, 30.0]]),
             "loss": np.array([[0.5, 0.25, -math.inf], [1.0, 2.0, 3.0]], np.float32)}
    assert tensorboard.write_scalars(run_dir, first, 0, 128) == 11  # the NaN is skipped
    second = {"episode_return": np.array([[4.0], [40.0]]), "loss": np.array([[0.125], [4.0]])}
    tensorboard.write_scalars(run_dir, second, 3, 128)  # the next chunk, in the same second

    scalars = tensorboard.read_scalars(run_dir)
    assert sorted(scalars) == [0, 1]
    assert scalars[0]["episode_return"] == [(128, 1.0), (384, 3.0), (512, 4.0)]
    assert scalars[1]["episode_return"] == [(128, 10.0), (256, 20.0), (384, 30.0), (512, 40.0)]
    assert scalars[0]["loss"] == [(128, 0.5), (256, 0.25), (384, -math.inf), (512, 0.125)]
    assert [v for _, v in scalars[1]["loss"]] == [1.0, 2.0, 3.0, 4.0]


def test_a_rewritten_chunk_keeps_the_last_value_and_a_cut_file_is_read_up_to_the_cut(tmp_path):
    run_dir = str(tmp_path)
    tensorboard.write_scalars(run_dir, {"x": np.array([[1.0, 2.0]])}, 0, 10)
    tensorboard.write_scalars(run_dir, {"x": np.array([[5.0]])}, 1, 10)  # update 2 again (a resume)
    assert tensorboard.read_scalars(run_dir)[0]["x"] == [(10, 1.0), (20, 5.0)]
    path = sorted((tmp_path / "tensorboard" / "seed_0").iterdir())[-1]
    path.write_bytes(path.read_bytes()[:-7])  # a writer killed mid-record
    assert tensorboard.read_scalars(run_dir)[0]["x"] == [(10, 1.0), (20, 2.0)]


def test_an_existing_run_folder_is_exported_from_its_metrics_file(tmp_path):
    rows = [{"update": u, "seed": s, "env_steps": u * 64, "episode_return": None if u == 1 else 10.0 * u + s,
             "loss": 0.5 * u} for u in (1, 2, 3) for s in (0, 1)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert tensorboard.export_run(str(tmp_path)) == 2 * 3 + 2 * 2
    assert tensorboard.export_run(str(tmp_path)) == 10  # replaced, not appended
    scalars = tensorboard.read_scalars(str(tmp_path))
    assert scalars[1]["episode_return"] == [(128, 21.0), (192, 31.0)]
    assert scalars[0]["loss"] == [(64, 0.5), (128, 1.0), (192, 1.5)]
