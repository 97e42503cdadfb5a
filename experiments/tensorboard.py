"""TensorBoard event files next to a run folder's metrics.jsonl (tensorboardX: no TensorFlow or PyTorch).

    write_scalars(run_dir, {name: [num_seeds, n]}, first_update, steps_per_update)

appends the metrics of updates `first_update + 1 .. first_update + n` to `run_dir/tensorboard/seed_<s>/`,
one event file per seed and call, tag = metric name, step = environment steps per seed (the x axis of
`learning_curve.png`). NaN values (a return before any episode finished) are skipped, as `metrics.jsonl`
writes them as null. `tensorboard --logdir RUN_DIR/tensorboard` shows every seed as a run.

`read_scalars(run_dir)` reads them back (`{seed: {tag: [(step, value)]}}`) with a small TFRecord reader,
so that tests and scripts need neither TensorBoard nor TensorFlow. `python -m experiments.tensorboard
RUN_DIR` writes the event files of an existing run folder from its metrics.jsonl.

Metrics are append-only: a run killed after its events were written but before its checkpoint resumes
and writes those updates again; TensorBoard then shows the later value for a repeated step, and
`read_scalars` keeps the last value written for each (tag, step).
"""

from __future__ import annotations

import glob
import math
import os
import struct
from typing import Any

import numpy as np

TENSORBOARD_DIR = "tensorboard"


def seed_dir(run_dir: str, seed: int) -> str:
    return os.path.join(run_dir, TENSORBOARD_DIR, f"seed_{seed}")


def write_scalars(run_dir: str, metrics: dict[str, Any], first_update: int, steps_per_update: int) -> int:
    """Append `{name: [num_seeds, n]}` metrics of updates first_update+1 .. first_update+n as scalar
    events, one folder per seed, step = update * steps_per_update. NaN is skipped; +-inf is written
    (a divergence shows). Returns the number of scalars written."""
    from tensorboardX import SummaryWriter
    from tensorboardX.proto import summary_pb2

    if not metrics:
        return 0
    arrays = {name: np.asarray(values, np.float64) for name, values in metrics.items()}
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"metrics must all be [num_seeds, n] arrays of one shape, got {sorted(shapes)}")
    num_seeds, n = next(iter(shapes))
    names = list(arrays)
    stacked = np.stack([arrays[name] for name in names], axis=-1)  # [S, n, metrics]
    written = 0
    for s in range(num_seeds):
        # one file per call (tensorboardX names files by the second: a unique suffix avoids overwriting)
        suffix = f".{first_update:09d}.{os.getpid()}"
        writer = SummaryWriter(seed_dir(run_dir, s), flush_secs=3600, filename_suffix=suffix)
        try:
            file_writer = writer._get_file_writer()
            for j in range(n):
                # one event per update holding every metric (as TensorFlow's writers may): fast to write
                values = [summary_pb2.Summary.Value(tag=name, simple_value=float(v))
                          for name, v in zip(names, stacked[s, j], strict=True) if not math.isnan(v)]
                if values:
                    file_writer.add_summary(summary_pb2.Summary(value=values), (first_update + j + 1) *
                                            steps_per_update)
                    written += len(values)
        finally:
            writer.close()
    return written


def _records(path: str):
    """The payloads of a TFRecord file: uint64 length, uint32 crc, payload, uint32 crc (crcs not checked).
    A record cut at the end of the file (a killed writer) is ignored."""
    with open(path, "rb") as f:
        data = f.read()
    offset = 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        start = offset + 12
        if start + length + 4 > len(data):
            return
        yield data[start:start + length]
        offset = start + length + 4


def _write_order(path: str) -> tuple[int, str]:
    """Files in the order they were written: by the creation second in their name, then the update."""
    parts = os.path.basename(path).split(".")
    return (int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else 0, path)


def read_scalars(run_dir: str) -> dict[int, dict[str, list[tuple[int, float]]]]:
    """`{seed: {tag: [(step, value), ...]}}` from the event files of `write_scalars`, sorted by step,
    the last value written kept for a repeated step."""
    from tensorboardX.proto import event_pb2

    out: dict[int, dict[str, list[tuple[int, float]]]] = {}
    for folder in sorted(glob.glob(os.path.join(run_dir, TENSORBOARD_DIR, "seed_*"))):
        seed = int(os.path.basename(folder).split("_", 1)[1])
        values: dict[str, dict[int, float]] = {}
        for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*")), key=_write_order):
            for record in _records(path):
                event = event_pb2.Event.FromString(record)
                for value in event.summary.value:
                    values.setdefault(value.tag, {})[int(event.step)] = float(value.simple_value)
        out[seed] = {tag: sorted(steps.items()) for tag, steps in values.items()}
    return out


def export_run(run_dir: str) -> int:
    """(Re)write the event files of a finished or running run folder from its metrics.jsonl (for runs made
    with `--no-tensorboard`); the folder's tensorboard/ is replaced. Returns the number of scalars."""
    import shutil

    from experiments import runs

    env_steps, metrics = runs.load_metrics(run_dir)
    steps_per_update = int(env_steps[0])
    if not np.array_equal(env_steps, np.arange(1, len(env_steps) + 1) * steps_per_update):
        raise ValueError(f"{run_dir}: env_steps are not a multiple of the update number")
    shutil.rmtree(os.path.join(run_dir, TENSORBOARD_DIR), ignore_errors=True)
    return write_scalars(run_dir, metrics, 0, steps_per_update)


def main(argv: list[str] | None = None) -> None:
    """`python -m experiments.tensorboard RUN_DIR...`: write the event files of existing run folders."""
    import sys

    for run_dir in sys.argv[1:] if argv is None else argv:
        print(f"{run_dir}: {export_run(run_dir)} scalars in {os.path.join(run_dir, TENSORBOARD_DIR)}")


if __name__ == "__main__":
    main()
