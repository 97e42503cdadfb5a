"""Run machinery shared by the training experiments: configs, run folders, chunked jitted training.

An experiment describes one seed's training as a `Program`: `init(key) -> carry` and
`update(carry) -> (carry, metrics)` (pure, jittable; `metrics` a dict of scalars), run `num_updates`
times. `run` vmaps it over seeds and executes it in jitted chunks of updates; between chunks it checks
that nothing diverged, prints progress, appends the metrics to the run folder and checkpoints the whole
carry (parameters, optimiser state, environment state with its normaliser statistics, PRNG keys).
Restarting the same command resumes from the last checkpoint and ends with exactly the same parameters
and metrics as a run that was never interrupted.

A run folder holds:

    config.json       the experiment's config (part types included, never the folder itself); resuming a
                      folder with a different config is refused
    metrics.jsonl     one JSON line per update per seed: {"update", "seed", "env_steps", metric: value}
    checkpoint/<U>/   the orbax checkpoint after U updates (only the latest is kept): `state/` the carry of
                      all seeds, each process of a multi-process run writing its own shards (no gather);
                      `meta/` JSON {updates_done, metric_rows, config_hash}. Written synchronously to a
                      temporary folder renamed when complete, so a kill leaves the previous one or this one.
                      It restores onto whatever mesh and processes resume the run. (A `checkpoint.npz` of
                      an older polygrad resumes too, and is replaced by an orbax checkpoint.)
    learning_curve.png  mean and min-max spread over seeds of the curve metric against env steps
    summary.json      final values per seed, wall time, and whether the run diverged
    lock              held (flock) by the process writing the folder; a second writer is refused

Integrity: a metrics file cut by a kill loses only its unreadable last line, which is rewritten; a
corrupted line elsewhere, missing rows, or an unreadable checkpoint or config is refused with a message
that names the file and says what to do, never silently dropped. NaN metrics that a program declares
legitimate (a return before any episode finished) are written as null; any other non-finite metric or
parameter stops the run (`Diverged`) with the update, the seed and the metric, keeping the last good
checkpoint, unless `stop_on_divergence=False`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from jax.experimental import multihost_utils

import experiments  # noqa: F401, I001  (sets XLA's flags before JAX starts)

DISTRIBUTED_ENV = ("POLYGRAD_COORDINATOR", "POLYGRAD_NUM_PROCESSES", "POLYGRAD_PROCESS_ID")


def initialize_distributed() -> bool:
    """`jax.distributed.initialize` from the environment, before JAX starts its backends: with
    `POLYGRAD_COORDINATOR=host:port`, `POLYGRAD_NUM_PROCESSES` and `POLYGRAD_PROCESS_ID` set, this process
    joins a run of several processes (`jax.devices()` is then every process's devices and a mesh spans
    them); `POLYGRAD_CPU_COLLECTIVES=gloo` selects XLA:CPU's collectives between processes. Called when
    this module is imported (every experiment imports it first). Returns whether it initialised."""
    if not os.environ.get(DISTRIBUTED_ENV[0]) or jax.distributed.is_initialized():
        return False
    missing = [name for name in DISTRIBUTED_ENV if not os.environ.get(name)]
    if missing:
        raise RuntimeError(f"{DISTRIBUTED_ENV[0]} is set but {', '.join(missing)} not")
    if os.environ.get("POLYGRAD_CPU_COLLECTIVES"):
        jax.config.update("jax_cpu_collectives_implementation", os.environ["POLYGRAD_CPU_COLLECTIVES"])
    jax.distributed.initialize(os.environ[DISTRIBUTED_ENV[0]], int(os.environ[DISTRIBUTED_ENV[1]]),
                               int(os.environ[DISTRIBUTED_ENV[2]]))
    return True


initialize_distributed()  # before polygrad's imports create arrays (which starts the backends)

from polygrad import sharding, validate  # noqa: E402

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoint"  # orbax checkpoints, one folder per kept update count
OLD_CHECKPOINT_FILE = "checkpoint.npz"  # the checkpoint of older polygrads: resumed, then replaced
FIGURE_FILE = "learning_curve.png"
SUMMARY_FILE = "summary.json"
LOCK_FILE = "lock"
MAX_SEED = 2**32 - 1  # jax.random.PRNGKey takes 32 bits; larger seeds are refused, never wrapped
# where a run lives, and on which devices, is not part of what it is (results are mesh-invariant, so a
# run folder resumes on another mesh)
NOT_SAVED = ("run_dir", "warm_start_dir", "mesh", "tensorboard")


class Diverged(RuntimeError):
    """A non-finite metric or parameter: the run stopped; its last good checkpoint is kept."""


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as it is (locked, corrupted, or made by another config)."""


# --- configs and the command line -----------------------------------------------------------------


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-compatible dict: nested dataclasses (loss parts, learners) carry their
    class name under "type", tuples become lists, and the fields of `NOT_SAVED` are left out."""

    def encode(x, top=False):
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            out = {} if top else {"type": type(x).__name__}
            for f in dataclasses.fields(x):
                if not (top and f.name in NOT_SAVED):
                    out[f.name] = encode(getattr(x, f.name))
            return out
        if isinstance(x, tuple | list):
            return [encode(v) for v in x]
        if isinstance(x, dict):
            return {str(k): encode(v) for k, v in x.items()}
        return x

    return json.loads(json.dumps(encode(config, top=True), default=str))


def config_hash(config: Any, fields: Sequence[str] | None = None) -> str:
    """An 8-hex-digit hash of the saved config (or of some of its top-level fields)."""
    data = config_to_dict(config)
    if fields is not None:
        data = {k: data[k] for k in fields}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


def default_run_dir(kind: str, name: str, config: Any) -> str:
    """runs/<kind>/<name>-<config hash>."""
    return os.path.join("runs", kind, f"{name}-{config_hash(config)}")


def replace_fields(config: Any, fields: dict[str, Any]) -> Any:
    """`config` with fields replaced; a key may be a dotted path into nested dataclasses
    (`"loss.gate.eps_low"`), applied after a replacement of the whole part it lies in. Each dataclass is
    rebuilt once, so its checks see the final values. An unknown field is a `ConfigError` naming it."""
    known = {f.name for f in dataclasses.fields(config)}
    changes: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for path, value in fields.items():
        name, _, rest = path.partition(".")
        if name not in known:
            raise validate.ConfigError(f"unknown config field {path!r} ({type(config).__name__} has "
                                       f"{sorted(known)})")
        if rest:
            nested.setdefault(name, {})[rest] = value
        else:
            changes[name] = value
            nested.pop(name, None)
    for name, sub in nested.items():
        part = changes.get(name, getattr(config, name))
        if not dataclasses.is_dataclass(part):
            raise validate.ConfigError(f"config field {name!r} has no fields {sorted(sub)}")
        changes[name] = replace_fields(part, sub)
    return dataclasses.replace(config, **changes)


def peek_args(argv: Sequence[str] | None, **defaults: str) -> tuple[str, ...]:
    """The values of a few `--name VALUE` flags (e.g. `--algo`, `--env`) that choose the other defaults."""
    parser = argparse.ArgumentParser(add_help=False)
    for name, default in defaults.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=default)
    known, _ = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    return tuple(getattr(known, name) for name in defaults)


def parse(config_class: type, default: Any, argv: Sequence[str] | None, description: str = "") -> Any:
    """tyro's command line over `config_class`, starting from `default`. Nested parts become flags
    (`--loss.gate.eps-high 4`) of the part types that `default` holds."""
    with validate.deferred():
        return tyro.cli(config_class, default=default, args=None if argv is None else list(argv),
                        description=description or config_class.__doc__,
                        config=(tyro.conf.AvoidSubcommands,))


def main(run_fn: Callable[[], Any]) -> None:
    """Run an experiment's `run_fn`; a bad config or a refused run folder prints one line and exits 2,
    a divergence prints its message and exits 1, never a traceback."""
    try:
        run_fn()
    except (validate.ConfigError, RunFolderError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except Diverged as error:
        print(f"diverged: {error}", file=sys.stderr)
        raise SystemExit(1) from None


# --- the device mesh ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh of a run: `seeds` x `data` devices (`polygrad.sharding`). Never saved in the
    config nor hashed: results do not depend on it (up to float reassociation), so a run folder
    started on one mesh resumes on another."""

    seeds: int = 1
    """devices along the seeds axis (must divide num_seeds)."""
    data: int = 0
    """devices along the data axis, splitting the batch of each seed (environments, or prompt groups);
    0: all the devices left over by seeds, or the most of them that divide the batch."""

    def __post_init__(self):
        validate.integer("mesh.seeds", self.seeds, minimum=1)
        validate.integer("mesh.data", self.data, minimum=0)


def build_mesh(config: MeshConfig, num_seeds: int, batch: int, devices: Sequence[Any] | None = None
               ) -> jax.sharding.Mesh | None:
    """The `(seeds, data)` mesh of `config` for `num_seeds` seeds of `batch` rows each (environments of
    a control run, prompt groups of an LM run), or None when it is a single device (the program then
    runs exactly as it always did). A shape that does not divide the work is a `ConfigError`."""
    devices = list(jax.devices() if devices is None else devices)
    seeds = config.seeds
    validate.check(num_seeds % seeds == 0, f"mesh.seeds={seeds} does not divide num_seeds={num_seeds}")
    if config.data:
        data = config.data
        validate.check(batch % data == 0, f"mesh.data={data} does not divide the batch of one seed ({batch})")
    else:
        data = max(d for d in range(1, max(len(devices) // seeds, 1) + 1) if batch % d == 0)
    validate.check(seeds * data <= len(devices),
                   f"a mesh of {seeds} x {data} devices needs {seeds * data}; {len(devices)} are available")
    if seeds * data == 1:
        return None
    return sharding.make_mesh(seeds, data, devices)


def mesh_context(mesh: jax.sharding.Mesh | None):
    """`jax.set_mesh(mesh)`, or nothing without a mesh."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


@dataclasses.dataclass(frozen=True)
class Program:
    """One seed's training: `init(key) -> carry`, `update(carry) -> (carry, {name: scalar})`.

    `steps_per_update` is the number of environment steps (or samples) one update consumes, used as
    the x axis of the learning curve. `nan_metrics` names the metrics that may legitimately be NaN (a
    return before any episode finished); any other non-finite metric is a divergence.
    """

    init: Callable[[jax.Array], Any]
    update: Callable[[Any], tuple[Any, dict[str, jax.Array]]]
    num_updates: int
    steps_per_update: int
    nan_metrics: tuple[str, ...] = ()
    data_axes: Callable[[Any], Any] | None = None
    """`carry (shapes of one seed) -> pytree of None | int`: the axis of each leaf split over the mesh's
    `data` axis (the environment batch of the environment state), None for replicated leaves
    (parameters, optimiser state, keys). None: everything replicated over `data`."""


@dataclasses.dataclass
class RunResult:
    """The final carry (leaves `[num_seeds, ...]`) and the metrics as `{name: [num_seeds, num_updates]}`."""

    carry: Any
    metrics: dict[str, np.ndarray]
    env_steps: np.ndarray


def seed_keys(seed: int, num_seeds: int) -> jax.Array:
    """`[num_seeds, 2]` PRNG keys, one per seed, derived from one integer seed in [0, MAX_SEED]."""
    validate.integer("num_seeds", num_seeds, minimum=1)
    validate.integer("seed", seed, minimum=0, maximum=MAX_SEED)
    return jax.random.split(jax.random.PRNGKey(seed), num_seeds)


def vmap_seeds(fn: Callable, in_axes: Any = 0, spmd_axis_name: str | None = None) -> Callable:
    """`jax.vmap(fn, in_axes)`, except that a leading seed axis of size 1 is squeezed and `fn` runs
    unbatched: on XLA:CPU a size-1 vmap made PPO about 1.5x slower (batched matmuls of batch 1).
    The results are the same arrays `[num_seeds, ...]` either way. `spmd_axis_name` names the mesh axis
    the seeds are split over (sharding constraints inside `fn` then keep it)."""
    batched = jax.vmap(fn, in_axes=in_axes, spmd_axis_name=spmd_axis_name)
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


def carry_shardings(program: Program, mesh: jax.sharding.Mesh) -> Any:
    """The `NamedSharding` of every leaf of the carry of all seeds `[S, ...]` on `mesh`: seeds over
    `seeds`, the leaves named by `program.data_axes` split over `data`, the rest replicated."""
    shape = jax.eval_shape(program.init, jax.random.PRNGKey(0))
    axes = program.data_axes(shape) if program.data_axes else jax.tree.map(lambda _: None, shape)
    return sharding.carry_shardings(mesh, axes)


@functools.lru_cache(maxsize=8)
def make_chunk(program: Program, chunk_size: int, mesh: jax.sharding.Mesh | None = None
               ) -> Callable[[Any, int], tuple[Any, dict[str, jax.Array]]]:
    """A jitted function `(carry [S, ...], n) -> (carry, metrics {name: [S, chunk_size]})` that runs
    `n <= chunk_size` updates of every seed; only the first `n` metric columns are filled.

    `n` is a traced argument, so every chunk (including a shorter last one) reuses one compilation.
    With a `mesh` the carry stays sharded as `carry_shardings` says (call it inside `mesh_context`):
    the same program, partitioned by XLA over the devices.
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

    if mesh is None:
        return jax.jit(vmap_seeds(chunk, in_axes=(0, None)), donate_argnums=0)
    shardings = carry_shardings(program, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(vmap_seeds(chunk, in_axes=(0, None), spmd_axis_name=sharding.SEEDS), donate_argnums=0,
                   out_shardings=(shardings, replicated))


@functools.lru_cache(maxsize=8)
def _jitted_init(program: Program):
    return jax.jit(vmap_seeds(program.init))


@functools.lru_cache(maxsize=8)
def _sequential_init(program: Program):
    return jax.jit(lambda keys: jax.lax.map(program.init, keys))


def init_carry(program: Program, keys: jax.Array, mesh: jax.sharding.Mesh | None = None) -> Any:
    """The initial carry of every seed `[S, ...]`. With a mesh, the seeds are initialised one after the
    other (`lax.map`, so no LAPACK call is batched: a batched QR of the orthogonal initialiser deadlocks
    XLA:CPU with several host devices, jax 0.10.2) on one device, outside the sharded program, then
    placed on the mesh."""
    if mesh is None:
        return _jitted_init(program)(keys)
    return place(program, _sequential_init(program)(keys), mesh)


def place(program: Program, carry: Any, mesh: jax.sharding.Mesh | None) -> Any:
    """`carry` (all seeds) laid out on `mesh` as `carry_shardings` says (unchanged without a mesh).
    With several processes every process passes the same whole carry and keeps its own shards."""
    if mesh is None:
        return carry
    if jax.process_count() > 1:
        carry = jax.tree.map(np.asarray, carry)
    return jax.device_put(carry, carry_shardings(program, mesh))


def to_host(tree: Any) -> Any:
    """Every leaf as a whole numpy array on this host (gathered from the other processes if need be)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def is_writer() -> bool:
    """Whether this process writes the run folder: process 0 of a multi-process run (or the only one)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait for every process (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def whole_run(program: Program) -> Callable[[jax.Array], tuple[Any, dict[str, jax.Array]]]:
    """One seed's whole run as a jittable function: `key -> (final carry, {name: [num_updates]})`."""

    def run_one_seed(key):
        def step(carry, _):
            return program.update(carry)

        return jax.lax.scan(step, program.init(key), None, length=program.num_updates)

    return run_one_seed


def train(program: Program, keys: jax.Array, mesh: jax.sharding.Mesh | None = None
          ) -> tuple[Any, dict[str, jax.Array]]:
    """The whole run of every seed as one jitted call, without the run folder (tests, notebooks).

    Returns the final carry and the metrics `{name: [num_seeds, num_updates]}`. With a `mesh`, the carry
    is initialised outside the sharded program and the updates run sharded (`make_chunk`).
    """
    if mesh is None:
        return jax.jit(vmap_seeds(whole_run(program)))(keys)
    with mesh_context(mesh):
        carry = init_carry(program, keys, mesh)
        return make_chunk(program, program.num_updates, mesh)(carry, program.num_updates)


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


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunFolderError(f"{path} ({what}) is corrupted ({error}); restore it or delete the run folder "
                             "to start again") from None


def lock_run_dir(run_dir: str) -> Any:
    """Hold an exclusive lock on the run folder for this process's lifetime (released at exit, even by
    SIGKILL). A second process is refused with a message naming the holder."""
    os.makedirs(run_dir, exist_ok=True)
    handle = open(os.path.join(run_dir, LOCK_FILE), "a+")  # noqa: SIM115  (held open on purpose)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunFolderError(f"{run_dir} is in use by {holder}; wait for it to finish or use another run "
                             "folder") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def prepare_run_dir(run_dir: str, config: dict[str, Any]) -> None:
    """Create `run_dir` and write `config.json`, or check that an existing one equals `config`."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, CONFIG_FILE)
    config = json.loads(json.dumps(config))
    if os.path.exists(path):
        saved = _read_json(path, "the run's config")
        if saved != config:
            keys = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
            diffs = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {config.get(k)!r}" for k in keys)
            raise RunFolderError(
                f"refusing to resume {run_dir}: its config differs ({diffs}); "
                "use another run folder or delete this one"
            )
        return
    _atomic_write(path, lambda f: json.dump(config, f, indent=2, sort_keys=True), mode="w")


def save_tree(path: str, tree: Any, **extra: Any) -> None:
    """Save the leaves of a pytree (and named `extra` arrays) to an npz file, atomically."""
    arrays = {f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}
    arrays.update({k: np.asarray(v) for k, v in extra.items()})
    _atomic_write(path, lambda f: np.savez(f, **arrays))


def load_tree(path: str, template: Any) -> Any:
    """The pytree saved by `save_tree`, in the structure, shapes and dtypes of `template`."""
    template_leaves, treedef = jax.tree.flatten(template)
    try:
        with np.load(path) as data:
            leaves = [data[f"leaf_{i:05d}"] for i in range(len(template_leaves))]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise RunFolderError(f"{path} is unreadable ({type(error).__name__}: {error}); delete it to recompute "
                             "it, or restore it from a copy") from None
    if any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(leaves, template_leaves, strict=True)):
        raise RunFolderError(f"{path} does not match the expected structure (another model or config?)")
    return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in leaves])


def _orbax():
    """orbax.checkpoint, imported when a checkpoint is first saved or read (it takes a while to import,
    and a command line refused at parse time should not wait for it)."""
    import orbax.checkpoint as ocp

    return ocp


def _checkpointer():
    """A synchronous orbax checkpointer of two items: `state` (the carry, every process writing its own
    shards) and `meta` (JSON, written by process 0). It finalises a checkpoint by renaming its temporary
    folder, and starts no thread that outlives a call."""
    ocp = _orbax()
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(state=ocp.PyTreeCheckpointHandler(),
                                                           meta=ocp.JsonCheckpointHandler()))


def _checkpoint_steps(run_dir: str) -> list[tuple[int, str]]:
    """`(updates_done, folder)` of every finalised orbax checkpoint in `run_dir`, oldest first (the
    temporary folders of a save cut by a kill are not finalised and are left out)."""
    folder = os.path.join(run_dir, CHECKPOINT_DIR)
    if not os.path.isdir(folder):
        return []
    return sorted((int(name), os.path.join(folder, name)) for name in os.listdir(folder) if name.isdigit())


def latest_checkpoint(run_dir: str) -> str | None:
    """The path of the checkpoint a resume would read: the latest finalised orbax checkpoint folder
    (`checkpoint/<updates done>`), else an old `checkpoint.npz`, else None."""
    steps = _checkpoint_steps(run_dir)
    if steps:
        return steps[-1][1]
    old = os.path.join(run_dir, OLD_CHECKPOINT_FILE)
    return old if os.path.exists(old) else None


def save_checkpoint(run_dir: str, carry: Any, updates_done: int, config_digest: str = "",
                    metric_rows: int = 0) -> None:
    """Save `carry` (sharded or not), the update count, the hash of the config that produced it and the
    number of metric rows written so far as the orbax checkpoint `checkpoint/<updates_done>`; then only
    this one is kept (and an old `checkpoint.npz` is removed).

    Every process of a multi-process run calls it: each writes its own shards, process 0 the metadata.
    Synchronous: when it returns, the checkpoint is finalised (written to a temporary folder, then
    renamed), so a kill at any moment leaves the previous checkpoint or this one, never half of one."""
    ocp = _orbax()
    folder = os.path.abspath(os.path.join(run_dir, CHECKPOINT_DIR))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{updates_done:09d}")
    meta = {"updates_done": int(updates_done), "metric_rows": int(metric_rows), "config_hash": config_digest}
    with _checkpointer() as checkpointer:
        checkpointer.save(path, args=ocp.args.Composite(state=ocp.args.PyTreeSave(carry),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
    if is_writer():
        for _, older in _checkpoint_steps(run_dir):
            if older != path:
                shutil.rmtree(older, ignore_errors=True)
        for name in os.listdir(folder):  # folders of saves cut by a kill (no save is in flight now)
            if not name.isdigit():
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run_dir, OLD_CHECKPOINT_FILE))


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    carry: Any
    updates_done: int
    metric_rows: int
    config_hash: str
    path: str = ""
    """the orbax checkpoint folder or the old npz file it was read from."""


def _unreadable(path: str, error: BaseException) -> RunFolderError:
    what = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return RunFolderError(f"{path} is unreadable ({type(error).__name__}: {what}); delete it to restart this "
                          "run from scratch, or restore it from a copy")


def _key_name(entry: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def leaf_paths(tree: Any) -> dict[str, Any]:
    """`{"learner.params.Dense_0.kernel": leaf}`: the leaves of a pytree (or of an orbax metadata tree,
    whose dataclass nodes are dicts) by the names along their paths."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {".".join(_key_name(k) for k in path): leaf for path, leaf in flat}


def _target(x: Any) -> jax.ShapeDtypeStruct:
    """What a leaf of the template restores to: its shape, dtype and sharding (one local device for a
    template without sharding)."""
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def load_checkpoint(run_dir: str, template: Any) -> Checkpoint | None:
    """The latest checkpoint saved in `run_dir`, or None if there is none.

    The carry comes back in the structure, shapes and dtypes of `template`, laid out as its leaves are
    (arrays of the current mesh, as `init_carry` makes them: each process reads its own shards, whatever
    mesh or number of processes wrote them), or on one device for a template of shapes
    (`jax.eval_shape`). An old `checkpoint.npz` is read as before. An unreadable checkpoint, or one whose
    arrays do not match `template`, is a `RunFolderError`."""
    path = latest_checkpoint(run_dir)
    if path is None:
        return None
    if path.endswith(".npz"):
        return _load_npz_checkpoint(path, template)
    ocp = _orbax()
    try:
        with _checkpointer() as checkpointer:
            stored = leaf_paths(checkpointer.metadata(path).item_metadata["state"].tree)
            expected = leaf_paths(template)
            if stored.keys() != expected.keys() or any(
                tuple(stored[k].shape) != tuple(x.shape) or np.dtype(stored[k].dtype) != np.dtype(x.dtype)
                for k, x in expected.items()
            ):
                raise RunFolderError(f"the checkpoint in {run_dir} does not match this program's training "
                                     "state")
            target = jax.tree.map(_target, template)
            restore_args = ocp.checkpoint_utils.construct_restore_args(target)
            restored = checkpointer.restore(path, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(target, restore_args=restore_args), meta=ocp.args.JsonRestore()))
        meta = restored.meta
        return Checkpoint(restored.state, int(meta["updates_done"]), int(meta["metric_rows"]),
                          str(meta["config_hash"]), path)
    except RunFolderError:
        raise
    except Exception as error:  # orbax and tensorstore raise many kinds; all mean the same here
        raise _unreadable(path, error) from None


def checkpoint_arrays(run_dir: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The latest checkpoint of `run_dir` without a template, for inspection and tests: `({leaf path:
    whole numpy array}, {"updates_done", "metric_rows", "config_hash"})` (leaf paths as `leaf_paths`
    names them; `leaf_00000`... for an old npz)."""
    path = latest_checkpoint(run_dir)
    if path is None:
        raise RunFolderError(f"{run_dir} holds no checkpoint")
    if path.endswith(".npz"):
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files if k.startswith("leaf_")}
            meta = {"updates_done": int(data["updates_done"]), "config_hash": str(data["config_hash"]),
                    "metric_rows": int(data["metric_rows"])}
        return arrays, meta
    ocp = _orbax()
    try:
        with _checkpointer() as checkpointer:
            tree = checkpointer.metadata(path).item_metadata["state"].tree
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            restored = checkpointer.restore(path, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(restore_args=restore_args), meta=ocp.args.JsonRestore()))
    except Exception as error:  # as in load_checkpoint
        raise _unreadable(path, error) from None
    return {k: np.asarray(v) for k, v in leaf_paths(restored.state).items()}, dict(restored.meta)


def _load_npz_checkpoint(path: str, template: Any) -> Checkpoint:
    """A `checkpoint.npz` of an older polygrad (whole arrays, leaves in flattening order), laid out as the
    leaves of `template` are."""
    template_leaves, treedef = jax.tree.flatten(template)
    try:
        with np.load(path) as data:
            names = sorted(k for k in data.files if k.startswith("leaf_"))
            leaves = [data[k] for k in names]
            updates_done = int(data["updates_done"])
            metric_rows = int(data["metric_rows"]) if "metric_rows" in data.files else -1
            digest = str(data["config_hash"]) if "config_hash" in data.files else ""
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise _unreadable(path, error) from None
    if len(leaves) != len(template_leaves) or any(
        a.shape != b.shape or a.dtype != b.dtype for a, b in zip(leaves, template_leaves, strict=True)
    ):
        raise RunFolderError(f"the checkpoint in {os.path.dirname(path)} does not match this program's "
                             "training state")
    placed = [jax.device_put(x, t.sharding) if isinstance(t, jax.Array) else jnp.asarray(x)
              for x, t in zip(leaves, template_leaves, strict=True)]
    return Checkpoint(jax.tree.unflatten(treedef, placed), updates_done, metric_rows, digest, path)


def _read_metric_lines(run_dir: str, repair: bool = False) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl. A line cut by a kill can only be the last one: with `repair` it is
    dropped (and the file rewritten without it); an unreadable line followed by readable ones is a
    `RunFolderError` (never silent data loss)."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    rows, bad = [], None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "update" not in row or "seed" not in row:
                raise ValueError("not a metrics row")
        except (ValueError, UnicodeDecodeError):
            if bad is None:
                bad = number
            continue
        if bad is not None:
            raise RunFolderError(f"{path} line {bad} is corrupted and readable rows follow it; repair or "
                                 "delete that line by hand (nothing was changed)")
        rows.append(row)
    if bad is not None and repair:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        _atomic_write(path, lambda f: f.write(text), mode="w")
    return rows


def _truncate_metrics(run_dir: str, checkpoint: Checkpoint | None, num_seeds: int) -> int:
    """Make metrics.jsonl hold exactly the rows of the updates in the checkpoint (a kill may leave more,
    or a cut last line); missing rows are a `RunFolderError`. Returns the number of rows kept."""
    rows = _read_metric_lines(run_dir, repair=True)
    updates_done = 0 if checkpoint is None else checkpoint.updates_done
    kept = [r for r in rows if r["update"] <= updates_done]
    expected = updates_done * num_seeds
    if len(kept) != expected:
        path = os.path.join(run_dir, METRICS_FILE)
        raise RunFolderError(f"{path} holds {len(kept)} rows of the {expected} that the checkpoint "
                             f"(update {updates_done}) recorded; restore the file, or delete the run folder "
                             "to start again")
    if len(kept) != len(rows):
        text = "".join(json.dumps(r) + "\n" for r in kept)
        _atomic_write(os.path.join(run_dir, METRICS_FILE), lambda f: f.write(text), mode="w")
    return len(kept)


def _append_metrics(run_dir: str, metrics: dict[str, np.ndarray], first_update: int, steps: int) -> int:
    """Append `{name: [S, n]}` metrics of updates first_update+1 .. first_update+n, one line per seed.
    Returns the number of rows written."""
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
    return len(lines)


def first_divergence(metrics: dict[str, np.ndarray], carry: Any, allowed_nan: Sequence[str] = ()
                     ) -> tuple[int, int, str] | None:
    """`(update index in the chunk, seed, what)` of the first non-finite metric (`{name: [S, n]}`, except
    NaN in `allowed_nan`), or of a non-finite parameter at the end of the chunk; None if all finite."""
    first = None
    for name, values in metrics.items():
        values = np.asarray(values, np.float64)
        bad = ~np.isfinite(values)
        if name in allowed_nan:
            bad &= ~np.isnan(values)
        if bad.any():
            seeds, updates = np.nonzero(bad)
            j = int(updates.min())
            s = int(seeds[updates == j].min())
            if first is None or (j, s) < first[:2]:
                first = (j, s, f"metric {name} = {values[s, j]}")
    if first is not None:
        return first
    for path, leaf in jax.tree_util.tree_leaves_with_path(carry):
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.floating) and not np.all(np.isfinite(leaf)):
            s = int(np.nonzero((~np.isfinite(leaf.reshape(leaf.shape[0], -1))).any(axis=1))[0][0])
            n = next(iter(metrics.values())).shape[1] if metrics else 1
            return (n - 1, s, f"training state {jax.tree_util.keystr(path)} is not finite")
    return None


@jax.jit
def _finite_per_seed(carry: Any) -> Any:
    """Each floating leaf `[S, ...]` of the carry as `[S]`: 0 where that seed's values are all finite, NaN
    where not (what `first_divergence` needs of the state, without gathering it from other processes)."""

    def one(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.zeros(x.shape[:1], jnp.int32)
        finite = jnp.isfinite(x).reshape(x.shape[0], -1).all(axis=1)
        return jnp.where(finite, 0.0, jnp.nan).astype(jnp.float32)

    return jax.tree.map(one, carry)


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
    config: Any,
    run_dir: str,
    *,
    seed: int = 0,
    num_seeds: int = 1,
    updates_per_chunk: int = 50,
    curve_metric: str = "episode_return",
    title: str = "",
    stop_on_divergence: bool = True,
    log: Callable[[str], None] = print,
    mesh: jax.sharding.Mesh | None = None,
    tensorboard: bool = False,
) -> RunResult:
    """Train `num_seeds` seeds of `program` in `run_dir`, resuming from its checkpoint if there is one.

    Args:
      program: one seed's training.
      config: the experiment's dataclass config (saved to config.json and compared on resume; its hash
        is recorded in every checkpoint).
      run_dir: the run folder (created if needed; locked while this process writes it).
      seed, num_seeds: the seeds are `seed_keys(seed, num_seeds)`.
      updates_per_chunk: updates per jitted chunk, i.e. between progress lines and checkpoints.
      curve_metric: the metric plotted in the learning curve and summarised in summary.json.
      title: figure title.
      stop_on_divergence: raise `Diverged` at the first non-finite metric or parameter (keeping the last
        good checkpoint); with False the run goes on and the summary records where it diverged.
      log: where progress lines go.
      mesh: the `(seeds, data)` device mesh (`build_mesh`); None: one device. The checkpoint is restored
        onto the current mesh, so a run resumes on any mesh and any number of processes.

    Returns:
      `RunResult` with the final carry of all seeds and all metrics read back from the folder.
    """
    validate.integer("updates_per_chunk", updates_per_chunk, minimum=1)
    keys = seed_keys(seed, num_seeds)
    config_dict = config_to_dict(config)
    digest = config_hash(config)
    writer, several = is_writer(), jax.process_count() > 1
    if not writer:
        log = lambda _: None  # noqa: E731  (process 0 reports)
    lock = lock_run_dir(run_dir) if writer else None
    stack = contextlib.ExitStack()
    try:
        if writer:
            prepare_run_dir(run_dir, config_dict)
        barrier("run folder prepared")
        start = time.perf_counter()
        stack.enter_context(mesh_context(mesh))  # sharding constraints inside the program see the mesh
        carry = init_carry(program, keys, mesh)
        checkpoint = load_checkpoint(run_dir, carry)
        updates_done = 0
        if checkpoint is not None:
            if checkpoint.config_hash and checkpoint.config_hash != digest:
                raise RunFolderError(
                    f"the checkpoint in {run_dir} was trained with another config (hash {checkpoint.config_hash}, "
                    f"now {digest}); config.json was edited? Restore it or use another run folder")
            carry, updates_done = checkpoint.carry, checkpoint.updates_done  # laid out as `carry` was
            log(f"resuming {run_dir} at update {updates_done}/{program.num_updates}")
        elif os.path.exists(os.path.join(run_dir, METRICS_FILE)) and _read_metric_lines(run_dir):
            raise RunFolderError(f"{run_dir} holds metrics but no checkpoint; delete the run folder to start "
                                 "again")
        rows = _truncate_metrics(run_dir, checkpoint, num_seeds) if writer else updates_done * num_seeds
        if checkpoint is not None and checkpoint.path.endswith(".npz"):  # an older polygrad's: now orbax
            save_checkpoint(run_dir, carry, updates_done, digest, rows)
        diverged = None
        chunk = make_chunk(program, min(updates_per_chunk, program.num_updates), mesh)
        while updates_done < program.num_updates:
            n = min(updates_per_chunk, program.num_updates - updates_done)
            chunk_start = time.perf_counter()
            new_carry, metrics = chunk(carry, n)
            metrics = {k: np.asarray(v)[:, :n] for k, v in metrics.items()}
            checked = to_host(_finite_per_seed(new_carry)) if several else new_carry  # no gather of the state
            bad = first_divergence(metrics, checked, program.nan_metrics)
            if bad is not None and diverged is None:
                j, s, what = bad
                diverged = {"update": updates_done + j + 1, "seed": s, "what": what}
                message = (f"update {updates_done + j + 1}, seed {s}: {what}; the last good checkpoint "
                           f"(update {updates_done}) is kept in {run_dir}")
                if stop_on_divergence:
                    raise Diverged(message)
                log(f"warning: diverged at {message}; going on as asked")
            carry = new_carry
            updates_done += n
            if writer:
                rows += _append_metrics(run_dir, metrics, updates_done - n, program.steps_per_update)
                if tensorboard:  # event files next to metrics.jsonl (experiments.tensorboard)
                    from experiments import tensorboard as tensorboard_events

                    tensorboard_events.write_scalars(run_dir, metrics, updates_done - n, program.steps_per_update)
            else:
                rows += n * num_seeds
            save_checkpoint(run_dir, carry, updates_done, digest, rows)  # every process writes its shards
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
        barrier("run finished")
        env_steps, all_metrics = load_metrics(run_dir)
        if not writer:
            return RunResult(to_host(carry), all_metrics, env_steps)
        summary: dict[str, Any] = {
            "updates": program.num_updates,
            "env_steps_per_seed": program.num_updates * program.steps_per_update,
            "num_seeds": num_seeds,
            "wall_time_s_this_session": round(elapsed, 2),
            "diverged": diverged,
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
        return RunResult(to_host(carry) if several else carry, all_metrics, env_steps)
    finally:
        stack.close()
        if lock is not None:
            lock.close()
