"""Run machinery shared by the training experiments: run folders, chunked jitted training, exact resume.

An experiment describes one seed's training as a `Program`: `init(key) -> carry` and
`update(carry) -> (carry, metrics)` (pure, jittable; `metrics` a dict of scalars), run `num_updates`
times. `run` vmaps it over seeds and executes it in jitted chunks of updates; between chunks it prints
progress, appends the metrics to the run folder and checkpoints the whole carry (parameters, optimiser
state, environment state with its normaliser statistics, PRNG keys). Restarting the same command
resumes from the last checkpoint and ends with exactly the same parameters and metrics as a run that
was never interrupted.

A run folder holds:

    config.json       the experiment's config; resuming a folder with a different config is refused
    metrics.jsonl     one JSON line per update per seed: {"update", "seed", "env_steps", metric: value}
    checkpoint.npz    the latest carry of all seeds and the number of updates done (written atomically)
    learning_curve.png  mean and min-max spread over seeds of the curve metric against env steps
    summary.json      final values per seed, wall time and throughput

NaN metrics (e.g. a return before any episode finished) are written as null.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.npz"
FIGURE_FILE = "learning_curve.png"
SUMMARY_FILE = "summary.json"


@dataclasses.dataclass(frozen=True)
class Program:
    """One seed's training: `init(key) -> carry`, `update(carry) -> (carry, {name: scalar})`.

    `steps_per_update` is the number of environment steps (or samples) one update consumes, used as
    the x axis of the learning curve.
    """

    init: Callable[[jax.Array], Any]
    update: Callable[[Any], tuple[Any, dict[str, jax.Array]]]
    num_updates: int
    steps_per_update: int


@dataclasses.dataclass
class RunResult:
    """The final carry (leaves `[num_seeds, ...]`) and the metrics as `{name: [num_seeds, num_updates]}`."""

    carry: Any
    metrics: dict[str, np.ndarray]
    env_steps: np.ndarray


def seed_keys(seed: int, num_seeds: int) -> jax.Array:
    """`[num_seeds, 2]` PRNG keys, one per seed, derived from one integer seed."""
    if num_seeds < 1:
        raise ValueError(f"num_seeds must be >= 1, got {num_seeds}")
    return jax.random.split(jax.random.PRNGKey(seed), num_seeds)


def vmap_seeds(fn: Callable, in_axes: Any = 0) -> Callable:
    """`jax.vmap(fn, in_axes)`, except that a leading seed axis of size 1 is squeezed and `fn` runs
    unbatched: on XLA:CPU a size-1 vmap made PPO about 1.5x slower (batched matmuls of batch 1).
    The results are the same arrays `[num_seeds, ...]` either way."""
    batched = jax.vmap(fn, in_axes=in_axes)
    axes = in_axes if isinstance(in_axes, tuple) else None

    def wrapped(*args):
        mapped = [a for i, a in enumerate(args) if axes is None or axes[i] is not None]
        if jax.tree.leaves(mapped)[0].shape[0] != 1:
            return batched(*args)
        squeezed = [
            jax.tree.map(lambda x: x[0], a) if axes is None or axes[i] is not None else a
            for i, a in enumerate(args)
        ]
        return jax.tree.map(lambda x: x[None], fn(*squeezed))

    return wrapped


@functools.lru_cache(maxsize=8)
def make_chunk(program: Program, chunk_size: int) -> Callable[[Any, int], tuple[Any, dict[str, jax.Array]]]:
    """A jitted function `(carry [S, ...], n) -> (carry, metrics {name: [S, chunk_size]})` that runs
    `n <= chunk_size` updates of every seed; only the first `n` metric columns are filled.

    `n` is a traced argument, so every chunk (including a shorter last one) reuses one compilation.
    """
    carry_shape = jax.eval_shape(program.init, jax.random.PRNGKey(0))
    metric_shape = jax.eval_shape(lambda c: program.update(c)[1], carry_shape)

    def chunk(carry, n):
        buffer = jax.tree.map(lambda m: jnp.zeros((chunk_size, *m.shape), m.dtype), metric_shape)

        def body(i, state):
            carry, buffer = state
            carry, metrics = program.update(carry)
            buffer = jax.tree.map(lambda b, m: b.at[i].set(m), buffer, metrics)
            return carry, buffer

        return jax.lax.fori_loop(0, n, body, (carry, buffer))

    return jax.jit(vmap_seeds(chunk, in_axes=(0, None)), donate_argnums=0)


@functools.lru_cache(maxsize=8)
def _jitted_init(program: Program):
    return jax.jit(vmap_seeds(program.init))


def whole_run(program: Program) -> Callable[[jax.Array], tuple[Any, dict[str, jax.Array]]]:
    """One seed's whole run as a jittable function: `key -> (final carry, {name: [num_updates]})`."""

    def run_one_seed(key):
        def step(carry, _):
            return program.update(carry)

        return jax.lax.scan(step, program.init(key), None, length=program.num_updates)

    return run_one_seed


def train(program: Program, keys: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
    """The whole run of every seed as one jitted call, without the run folder (tests, notebooks).

    Returns the final carry and the metrics `{name: [num_seeds, num_updates]}`.
    """
    return jax.jit(vmap_seeds(whole_run(program)))(keys)


# --- files ---------------------------------------------------------------------------------------


def _atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write via a temporary file in the same folder, fsync, then os.replace: never a half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _to_json_value(x: Any) -> Any:
    x = float(x)
    return None if math.isnan(x) else x


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-compatible dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def prepare_run_dir(run_dir: str, config: dict[str, Any]) -> None:
    """Create `run_dir` and write `config.json`, or check that an existing one equals `config`."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, CONFIG_FILE)
    config = json.loads(json.dumps(config))
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != config:
            keys = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
            diffs = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {config.get(k)!r}" for k in keys)
            raise ValueError(
                f"refusing to resume {run_dir}: its config differs ({diffs}); "
                "use another run folder or delete this one"
            )
        return
    _atomic_write(path, lambda f: json.dump(config, f, indent=2, sort_keys=True), mode="w")


def save_checkpoint(run_dir: str, carry: Any, updates_done: int) -> None:
    """Save every leaf of `carry` and the update count to `checkpoint.npz`, atomically."""
    leaves = [np.asarray(x) for x in jax.tree.leaves(carry)]
    arrays = {f"leaf_{i:05d}": x for i, x in enumerate(leaves)}
    arrays["updates_done"] = np.asarray(updates_done, np.int64)
    _atomic_write(os.path.join(run_dir, CHECKPOINT_FILE), lambda f: np.savez(f, **arrays))


def load_checkpoint(run_dir: str, template: Any) -> tuple[Any, int] | None:
    """The carry saved in `run_dir` (in the structure of `template`) and its update count, or None."""
    path = os.path.join(run_dir, CHECKPOINT_FILE)
    if not os.path.exists(path):
        return None
    template_leaves, treedef = jax.tree.flatten(template)
    with np.load(path) as data:
        leaves = [data[f"leaf_{i:05d}"] for i in range(len(data.files) - 1)]
        updates_done = int(data["updates_done"])
    if len(leaves) != len(template_leaves) or any(
        a.shape != b.shape or a.dtype != b.dtype for a, b in zip(leaves, template_leaves, strict=True)
    ):
        raise ValueError(f"the checkpoint in {run_dir} does not match this program's training state")
    return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in leaves]), updates_done


def _read_metric_lines(run_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill; it is rewritten on resume
                break
    return rows


def _truncate_metrics(run_dir: str, updates_done: int) -> None:
    """Keep only the metric lines of updates already in the checkpoint (a kill may leave more)."""
    rows = [r for r in _read_metric_lines(run_dir) if r["update"] <= updates_done]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    _atomic_write(os.path.join(run_dir, METRICS_FILE), lambda f: f.write(text), mode="w")


def _append_metrics(run_dir: str, metrics: dict[str, np.ndarray], first_update: int, steps: int) -> None:
    """Append `{name: [S, n]}` metrics of updates first_update+1 .. first_update+n, one line per seed."""
    num_seeds, n = next(iter(metrics.values())).shape
    lines = []
    for j in range(n):
        update = first_update + j + 1
        for s in range(num_seeds):
            row = {"update": update, "seed": s, "env_steps": update * steps}
            row.update({k: _to_json_value(v[s, j]) for k, v in metrics.items()})
            lines.append(json.dumps(row) + "\n")
    with open(os.path.join(run_dir, METRICS_FILE), "a") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())


def load_metrics(run_dir: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`(env_steps [U], {name: [S, U]})` from a run folder's metrics.jsonl (null becomes NaN)."""
    rows = _read_metric_lines(run_dir)
    if not rows:
        raise ValueError(f"no metrics in {run_dir}")
    num_seeds = 1 + max(r["seed"] for r in rows)
    num_updates = max(r["update"] for r in rows)
    names = [k for k in rows[0] if k not in ("update", "seed", "env_steps")]
    metrics = {k: np.full((num_seeds, num_updates), np.nan) for k in names}
    env_steps = np.zeros(num_updates)
    for r in rows:
        env_steps[r["update"] - 1] = r["env_steps"]
        for k in names:
            metrics[k][r["seed"], r["update"] - 1] = np.nan if r[k] is None else r[k]
    return env_steps, metrics


# --- figures and summary ------------------------------------------------------------------------


def plot_learning_curves(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    path: str,
    ylabel: str = "mean training episode return",
    title: str = "",
) -> None:
    """One line per label: `{label: (env_steps [U], values [S, U])}`, the mean over seeds with the
    min-max band over seeds shaded. NaN entries (no data yet) are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, (steps, values) in curves.items():
        values = np.atleast_2d(values)
        valid = ~np.all(np.isnan(values), axis=0)
        steps, values = steps[valid], values[:, valid]
        ax.plot(steps, np.nanmean(values, axis=0), label=f"{label} ({values.shape[0]} seeds)")
        ax.fill_between(steps, np.nanmin(values, axis=0), np.nanmax(values, axis=0), alpha=0.25)
    ax.set_xlabel("environment steps (per seed)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _atomic_write(path, lambda f: fig.savefig(f, format=os.path.splitext(path)[1][1:] or "png", dpi=120))
    plt.close(fig)


def final_values(values: np.ndarray, fraction: float = 0.05) -> np.ndarray:
    """Per-seed mean of the last `fraction` of updates (at least one), NaN ignored: `[S, U]` -> `[S]`."""
    window = max(1, int(round(values.shape[1] * fraction)))
    tail = values[:, -window:]
    counts = np.sum(~np.isnan(tail), axis=1)
    return np.where(counts > 0, np.nansum(tail, axis=1) / np.maximum(counts, 1), np.nan)


# --- the run loop -------------------------------------------------------------------------------


def run(
    program: Program,
    config: dict[str, Any],
    run_dir: str,
    *,
    seed: int = 0,
    num_seeds: int = 1,
    updates_per_chunk: int = 50,
    curve_metric: str = "episode_return",
    title: str = "",
    log: Callable[[str], None] = print,
) -> RunResult:
    """Train `num_seeds` seeds of `program` in `run_dir`, resuming from its checkpoint if there is one.

    Args:
      program: one seed's training.
      config: the experiment config as a JSON-compatible dict (compared on resume; include every field
        that changes the result).
      run_dir: the run folder (created if needed).
      seed, num_seeds: the seeds are `seed_keys(seed, num_seeds)`.
      updates_per_chunk: updates per jitted chunk, i.e. between progress lines and checkpoints.
      curve_metric: the metric plotted in the learning curve and summarised in summary.json.
      title: figure title.
      log: where progress lines go.

    Returns:
      `RunResult` with the final carry of all seeds and all metrics read back from the folder.
    """
    if updates_per_chunk < 1:
        raise ValueError(f"updates_per_chunk must be >= 1, got {updates_per_chunk}")
    prepare_run_dir(run_dir, config)
    start = time.perf_counter()
    carry = _jitted_init(program)(seed_keys(seed, num_seeds))
    restored = load_checkpoint(run_dir, carry)
    updates_done = 0
    if restored is not None:
        carry, updates_done = restored
        log(f"resuming {run_dir} at update {updates_done}/{program.num_updates}")
    _truncate_metrics(run_dir, updates_done)
    chunk = make_chunk(program, min(updates_per_chunk, program.num_updates))
    while updates_done < program.num_updates:
        n = min(updates_per_chunk, program.num_updates - updates_done)
        chunk_start = time.perf_counter()
        carry, metrics = chunk(carry, n)
        metrics = {k: np.asarray(v)[:, :n] for k, v in metrics.items()}
        _append_metrics(run_dir, metrics, updates_done, program.steps_per_update)
        updates_done += n
        save_checkpoint(run_dir, carry, updates_done)
        chunk_time = time.perf_counter() - chunk_start  # the first chunk includes compilation
        curve = metrics.get(curve_metric)
        shown = "" if curve is None else f"  {curve_metric} {np.nanmean(final_values(curve, 0.0)):9.2f}"
        log(
            f"update {updates_done:6d}/{program.num_updates}  "
            f"env steps {updates_done * program.steps_per_update:>10,d}{shown}  "
            f"({time.perf_counter() - start:6.1f} s; this chunk "
            f"{n * program.steps_per_update * num_seeds / chunk_time:,.0f} steps/s over {num_seeds} seeds)"
        )
    elapsed = time.perf_counter() - start
    env_steps, all_metrics = load_metrics(run_dir)
    summary: dict[str, Any] = {
        "updates": program.num_updates,
        "env_steps_per_seed": program.num_updates * program.steps_per_update,
        "num_seeds": num_seeds,
        "wall_time_s_this_session": round(elapsed, 2),
    }
    if curve_metric in all_metrics:
        finals = final_values(all_metrics[curve_metric])
        summary[f"final_{curve_metric}_per_seed"] = [_to_json_value(x) for x in finals]
        has_data = bool(np.any(~np.isnan(finals)))
        summary[f"final_{curve_metric}_mean"] = _to_json_value(np.nanmean(finals)) if has_data else None
        plot_learning_curves(
            {title or curve_metric: (env_steps, all_metrics[curve_metric])},
            os.path.join(run_dir, FIGURE_FILE),
            title=title,
        )
    _atomic_write(os.path.join(run_dir, SUMMARY_FILE), lambda f: json.dump(summary, f, indent=2), mode="w")
    log(f"done: {json.dumps(summary)}\nrun folder: {run_dir}")
    return RunResult(carry, all_metrics, env_steps)
