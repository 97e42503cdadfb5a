"""Evaluate a trained classic-control run folder: greedy and sampled episodes per seed, eval.json, a GIF.

    python -m experiments.evaluate RUN_DIR                      # 10 episodes per seed, greedy and sampled
    python -m experiments.evaluate RUN_DIR --episodes 100 --no-gif

The run folder is one of `experiments.control` (config.json and its checkpoint). Its config is rebuilt
from config.json (`load_config`: part types by their saved names), the trained parameters (and the
observation normaliser's statistics, if the run normalised observations) are read from the checkpoint,
and every seed's policy plays `--episodes` fresh episodes greedily (the mode of its distribution) and
sampled (as in training), all seeds and episodes in one jitted, vmapped program on the raw gymnax
environment (rewards unnormalised, the config's time limit). The results go to RUN_DIR/eval.json; the
first greedy episode of `--render-seed` is drawn frame by frame (Pillow) into RUN_DIR/eval_greedy.gif.

A trained policy in three lines (`load_policy`):

    from experiments.evaluate import load_policy
    params, act = load_policy("runs/control/ppo-CartPole-v1-1234abcd", seed=0)
    action = act(obs, jax.random.PRNGKey(0), greedy=True)       # obs [..., obs_dim]: a pure function

`act` is jittable and vmappable; it applies the run's frozen observation normalisation itself.
"""

from experiments import runs  # noqa: I001  (first: sets XLA's flags before JAX starts)

import argparse
import dataclasses
import json
import os
import sys
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from envs import control as control_envs
from experiments import control
from polygrad import losses, trust_region, validate
from polygrad.control import learners, networks, trpo

EVAL_FILE = "eval.json"
GIF_FILE = "eval_greedy.gif"
# Modules whose dataclasses a saved config may name; on a name clash the first wins (the control config's
# `advantage` is `learners.AdvantageConfig`; a field whose default has the saved type always uses it).
PART_MODULES = (learners, trpo, trust_region, losses)

# --- the config back from config.json -------------------------------------------------------------


def _part_types() -> dict[str, type]:
    types: dict[str, type] = {}
    for module in reversed(PART_MODULES):
        for name in dir(module):
            obj = getattr(module, name)
            if isinstance(obj, type) and dataclasses.is_dataclass(obj):
                types[name] = obj
    return types


def _decode(value: Any, template: Any, types: dict[str, type], path: str) -> Any:
    if isinstance(value, dict) and "type" in value:
        name = value["type"]
        if dataclasses.is_dataclass(template) and type(template).__name__ == name:
            cls = type(template)
        elif name in types:
            cls, template = types[name], None
        else:
            raise validate.ConfigError(f"{path}: unknown part type {name!r} in the saved config")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names - {"type"})
        if unknown:
            raise validate.ConfigError(f"{path}: {name} has no fields {unknown}")
        kwargs = {k: _decode(v, getattr(template, k, None), types, f"{path}.{k}")
                  for k, v in value.items() if k != "type"}
        return cls(**kwargs)
    if isinstance(value, list):
        return tuple(_decode(v, None, types, path) for v in value)
    if isinstance(value, dict):
        return {k: _decode(v, None, types, f"{path}.{k}") for k, v in value.items()}
    return value


def config_from_dict(saved: dict[str, Any]) -> control.ControlConfig:
    """The `ControlConfig` that `runs.config_to_dict` saved as `saved` (config.json of a control run).

    Nested parts are rebuilt from their "type" names (`PART_MODULES`), lists become tuples, fields that
    `saved` lacks (added to ControlConfig later) keep their defaults; the result is checked to save back
    to exactly `saved`."""
    if not isinstance(saved, dict) or "algo" not in saved or "env" not in saved:
        raise validate.ConfigError("not the config of an experiments.control run (no algo or env)")
    template = control.default_config(saved["algo"], saved["env"])
    known = {f.name for f in dataclasses.fields(control.ControlConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise validate.ConfigError(f"the saved config has fields that ControlConfig lacks: {unknown}")
    types = _part_types()
    fields = {k: _decode(v, getattr(template, k), types, k) for k, v in saved.items()}
    config = dataclasses.replace(template, **fields)  # fields added since the run keep their defaults
    rebuilt = runs.config_to_dict(config)
    if {k: rebuilt.get(k) for k in saved} != json.loads(json.dumps(saved)):
        raise validate.ConfigError("the saved config could not be rebuilt exactly (another version?)")
    return config


def load_config(run_dir: str) -> control.ControlConfig:
    """The config of a control run folder, from its config.json."""
    path = os.path.join(run_dir, runs.CONFIG_FILE)
    if not os.path.exists(path):
        raise runs.RunFolderError(f"{run_dir} is not a run folder: it has no {runs.CONFIG_FILE}")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise runs.RunFolderError(f"{path} is corrupted ({error})") from None
    return dataclasses.replace(config_from_dict(saved), run_dir=run_dir)


# --- the trained policy ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """What evaluation needs from a run folder; `params` and `obs_stats` have a leading seed axis."""

    config: control.ControlConfig
    network: networks.ActorCritic
    params: Any
    obs_stats: control_envs.RunningMeanStd | None
    updates_done: int


def _find_obs_stats(env_state: Any) -> control_envs.RunningMeanStd | None:
    while env_state is not None:
        if isinstance(env_state, control_envs.NormalizeObservationState):
            return env_state.obs_stats
        env_state = getattr(env_state, "env_state", None)
    return None


def load_run(run_dir: str) -> TrainedRun:
    """Config, network, parameters `[S, ...]` and observation statistics of a control run folder.

    The parameters and the environment state are read by their names in the checkpointed carry, so a
    checkpoint whose optimiser state has another layout still loads (in the `checkpoint.npz` of an older
    polygrad they are the first leaves and those just before the observations and keys at its end)."""
    config = load_config(run_dir)
    program = control.make_program(config)
    env = control.make_env(config)
    network = control.make_network(config, env)
    template = jax.eval_shape(runs.vmap_seeds(program.init), runs.seed_keys(config.seed, config.num_seeds))
    path = runs.latest_checkpoint(run_dir)
    if path is None:
        raise runs.RunFolderError(f"{run_dir} has no checkpoint: nothing trained yet")
    if not path.endswith(".npz"):  # orbax: the parameters and the environment state by their names
        arrays, meta = runs.checkpoint_arrays(run_dir)

        def named(tree, prefix):
            wanted = {f"{prefix}.{name}": leaf for name, leaf in runs.leaf_paths(tree).items()}
            if any(k not in arrays or arrays[k].shape != x.shape or arrays[k].dtype != x.dtype
                   for k, x in wanted.items()):
                raise runs.RunFolderError(f"the checkpoint in {run_dir} does not match the network of its "
                                          "config")
            return jax.tree.unflatten(jax.tree.structure(tree), [jnp.asarray(arrays[k]) for k in wanted])

        params = named(template.learner.params, "learner.params")
        env_state = named(template.env_state, "env_state") if config.normalize_observations else None
        return TrainedRun(config, network, params, _find_obs_stats(env_state), meta["updates_done"])
    # a checkpoint.npz of an older polygrad: the leaves in order
    try:
        with np.load(path) as data:
            names = sorted(k for k in data.files if k.startswith("leaf_"))
            leaves = [data[k] for k in names]
            updates_done = int(data["updates_done"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise runs.RunFolderError(f"{path} is unreadable ({type(error).__name__}: {error})") from None

    def take(tree, stored):
        tree_leaves, treedef = jax.tree.flatten(tree)
        if len(stored) != len(tree_leaves) or any(
            a.shape != b.shape or a.dtype != b.dtype for a, b in zip(stored, tree_leaves, strict=True)):
            raise runs.RunFolderError(f"the checkpoint in {run_dir} does not match the network of its config")
        return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in stored])

    n_params = len(jax.tree.leaves(template.learner.params))
    params = take(template.learner.params, leaves[:n_params])
    tail = (template.env_state, template.obs, template.key)
    n_tail = len(jax.tree.leaves(tail))
    env_state = take(tail, leaves[len(leaves) - n_tail:])[0] if config.normalize_observations else None
    return TrainedRun(config, network, params, _find_obs_stats(env_state), updates_done)


def policy_action(network: networks.ActorCritic, params: Any, obs_stats: Any, obs: jax.Array, key: jax.Array,
                  greedy: bool = False) -> jax.Array:
    """One seed's action(s) for `obs [..., obs_dim]`: the mode (greedy) or a sample of its policy, after
    the run's observation normalisation (frozen at the checkpoint) if it had one."""
    obs = jnp.asarray(obs, jnp.float32)
    if obs_stats is not None:  # as envs.control.NormalizeObservation (clip 10, epsilon 1e-8)
        obs = jnp.clip((obs - obs_stats.mean) / jnp.sqrt(obs_stats.var + 1e-8), -10.0, 10.0)
    dist = network.apply(params, obs, method=networks.ActorCritic.policy)
    if isinstance(greedy, bool):
        return dist.mode() if greedy else dist.sample(key)
    return jnp.where(greedy, dist.mode(), dist.sample(key))  # a traced flag: one program for both


def load_policy(run_dir: str, seed: int = 0) -> tuple[Any, Callable[..., jax.Array]]:
    """`(params, act)` of seed `seed` of a control run folder; `act(obs, key, greedy=False)` is pure
    (jittable, vmappable) and returns the action(s) for `obs [..., obs_dim]` (continuous actions are not
    clipped: the environments clip them to their bounds)."""
    run = load_run(run_dir)
    validate.integer("seed", seed, minimum=0, maximum=run.config.num_seeds - 1)
    params = jax.tree.map(lambda x: x[seed], run.params)
    obs_stats = None if run.obs_stats is None else jax.tree.map(lambda x: x[seed], run.obs_stats)

    def act(obs: jax.Array, key: jax.Array, greedy: bool = False) -> jax.Array:
        return policy_action(run.network, params, obs_stats, obs, key, greedy)

    return params, act


# --- evaluation ---------------------------------------------------------------------------------


def make_evaluate(run: TrainedRun, episodes: int, max_steps: int | None = None):
    """A jitted `(params [S], obs_stats [S], keys [S], greedy) -> (returns [S, E], lengths [S, E], states)`
    playing `episodes` episodes per seed to their end (or the time limit), greedily or sampled (`greedy`
    a boolean array: one compilation for both), with `states` the gymnax state before every step
    `[S, T, E]` (for the GIF)."""
    config = run.config
    overrides = {} if config.max_episode_steps is None else {"max_steps_in_episode": config.max_episode_steps}
    env = control_envs.VecEnv(config.env, episodes, **overrides)
    horizon = max_steps or env.max_episode_steps

    def one_seed(params, obs_stats, key, greedy):
        reset_key, key = jax.random.split(key)
        obs, state = env.reset(reset_key)

        def step(carry, step_key):
            obs, state, done, ret, length = carry
            act_key, env_key = jax.random.split(step_key)
            action = policy_action(run.network, params, obs_stats, obs, act_key, greedy)
            next_obs, next_state, reward, terminated, truncated, _ = env.step(env_key, state, action)
            live = ~done
            ret = ret + jnp.where(live, reward, 0.0)
            length = length + live.astype(jnp.int32)
            done = done | terminated | truncated
            return (next_obs, next_state, done, ret, length), state

        init = (obs, state, jnp.zeros(episodes, bool), jnp.zeros(episodes), jnp.zeros(episodes, jnp.int32))
        (_, _, _, ret, length), states = jax.lax.scan(step, init, jax.random.split(key, horizon))
        return ret, length, states

    return jax.jit(jax.vmap(one_seed, in_axes=(0, 0, 0, None)))


def _summary(returns: np.ndarray, lengths: np.ndarray) -> dict[str, Any]:
    per_seed = returns.mean(axis=1)
    return {
        "mean_return": float(returns.mean()),
        "std_return_over_seeds": float(per_seed.std()),
        "mean_return_per_seed": [float(x) for x in per_seed],
        "min_return": float(returns.min()),
        "max_return": float(returns.max()),
        "mean_length": float(lengths.mean()),
        "returns": returns.round(4).tolist(),
    }


def evaluate(run_dir: str, episodes: int = 10, seed: int = 0, gif: bool = True, render_seed: int = 0,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate every seed of the run in `run_dir` greedily and sampled; write eval.json (and the GIF)."""
    validate.integer("episodes", episodes, minimum=1)
    validate.integer("seed", seed, minimum=0, maximum=runs.MAX_SEED)
    run = load_run(run_dir)
    num_seeds = run.config.num_seeds
    validate.integer("render_seed", render_seed, minimum=0, maximum=num_seeds - 1)
    log(f"evaluating {run.config.algo} on {run.config.env} (update {run.updates_done}/"
        f"{run.config.num_updates}): {num_seeds} seeds x {episodes} episodes, greedy and sampled")
    result: dict[str, Any] = {"algo": run.config.algo, "env": run.config.env,
                              "updates_done": run.updates_done,
                              "env_steps_per_seed": run.updates_done * run.config.batch_size,
                              "episodes_per_seed": episodes, "eval_seed": seed}
    states = None
    play = make_evaluate(run, episodes)
    for mode, greedy in (("greedy", True), ("sampled", False)):
        keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), int(greedy)), num_seeds)
        returns, lengths, mode_states = play(run.params, run.obs_stats, keys, jnp.asarray(greedy))
        result[mode] = _summary(np.asarray(returns, np.float64), np.asarray(lengths))
        log(f"{mode:8s} return {result[mode]['mean_return']:9.2f} (per seed "
            f"{', '.join(f'{x:.1f}' for x in result[mode]['mean_return_per_seed'])})")
        if greedy:
            states, length = mode_states, int(lengths[render_seed, 0])
    if gif:
        path = os.path.join(run_dir, GIF_FILE)
        episode = jax.tree.map(lambda x: np.asarray(x[render_seed, :length, 0]), states)  # [S, T, E]
        title = f"{run.config.algo}, seed {render_seed}, greedy"
        frames = render_episode(run.config.env, episode, title=title)
        save_gif(frames, path, _frame_seconds(run.config.env))
        result["gif"] = {"file": GIF_FILE, "seed": render_seed, "episode_length": length,
                         "frames": len(frames)}
        log(f"wrote {path} ({len(frames)} frames)")
    runs._atomic_write(os.path.join(run_dir, EVAL_FILE), lambda f: json.dump(result, f, indent=2), mode="w")
    log(f"wrote {os.path.join(run_dir, EVAL_FILE)}")
    return result


# --- drawing the classic-control environments (Pillow; no gym or pygame) ----------------------------

WIDTH, HEIGHT = 360, 240
SUPERSAMPLE = 3  # frames are drawn at 3x and downscaled: smooth edges
MAX_FRAMES = 250


def _frame_seconds(env_name: str) -> float:
    return {"CartPole-v1": 0.02, "Acrobot-v1": 0.2, "Pendulum-v1": 0.05}.get(env_name, 0.04)


def render_episode(env_name: str, states: Any, title: str = "", max_frames: int = MAX_FRAMES) -> list:
    """PIL images of the gymnax states of one episode (a gymnax `EnvState` with leaves `[T]`), at most
    `max_frames` (every k-th state; the frame duration in `save_gif` is scaled to match)."""
    from PIL import Image, ImageDraw

    columns = {f.name: np.asarray(getattr(states, f.name)) for f in dataclasses.fields(states)}
    length = len(next(iter(columns.values())))
    every = max(1, -(-length // max_frames))
    draw = {"CartPole-v1": _draw_cartpole, "Acrobot-v1": _draw_acrobot, "Pendulum-v1": _draw_pendulum,
            "MountainCar-v0": _draw_mountain_car, "MountainCarContinuous-v0": _draw_mountain_car}[env_name]
    frames = []
    for t in range(0, length, every):
        state = {name: float(column[t]) for name, column in columns.items()}
        big = Image.new("RGB", (WIDTH * SUPERSAMPLE, HEIGHT * SUPERSAMPLE), (255, 255, 255))
        draw(_Canvas(ImageDraw.Draw(big), SUPERSAMPLE), state)
        image = big.resize((WIDTH, HEIGHT), Image.Resampling.LANCZOS)
        text = ImageDraw.Draw(image)
        text.text((6, 4), f"{env_name}  {title}", fill=(40, 40, 40))
        text.text((6, HEIGHT - 16), f"step {t + 1}/{length}", fill=(40, 40, 40))
        if "last_u" in state:
            text.text((WIDTH - 100, HEIGHT - 16), f"torque {state['last_u']:+.2f}", fill=(40, 40, 40))
        frames.append(image)
    for frame in frames:
        frame.info["every"] = every
    return frames


def save_gif(frames: list, path: str, frame_seconds: float) -> None:
    """An animated GIF of PIL images, looping, written atomically."""
    if not frames:
        raise ValueError("no frames to save")
    every = frames[0].info.get("every", 1)
    duration = max(20, int(round(1000 * frame_seconds * every)))
    palette = [f.convert("P", palette=1, colors=64) for f in frames]  # 1: ADAPTIVE

    def write(f):
        palette[0].save(f, format="GIF", save_all=True, append_images=palette[1:], duration=duration, loop=0,
                        optimize=False)

    runs._atomic_write(path, write)


class _Canvas:
    """ImageDraw in the coordinates of the final WIDTH x HEIGHT frame, drawn `k` times larger."""

    def __init__(self, draw, k: int):
        self.draw, self.k = draw, k

    def _points(self, points):
        return [(x * self.k, y * self.k) for x, y in points]

    def line(self, points, fill, width=1):
        self.draw.line(self._points(points), fill=fill, width=int(width * self.k), joint="curve")

    def polygon(self, points, fill):
        self.draw.polygon(self._points(points), fill=fill)

    def rectangle(self, box, fill):
        self.draw.rectangle([v * self.k for v in box], fill=fill)

    def ellipse(self, box, fill):
        self.draw.ellipse([v * self.k for v in box], fill=fill)


def _draw_cartpole(canvas, s):
    x_threshold, pole = 2.4, 1.0  # gymnax CartPole: x_threshold 2.4, pole length 2 * 0.5
    scale = WIDTH / (2 * x_threshold)
    ground = HEIGHT * 0.7
    cx = WIDTH / 2 + s["x"] * scale
    canvas.line([(0, ground), (WIDTH, ground)], fill=(0, 0, 0))
    canvas.rectangle([cx - 25, ground - 15, cx + 25, ground + 15], fill=(60, 60, 60))
    tip = (cx + pole * scale * np.sin(s["theta"]), ground - pole * scale * np.cos(s["theta"]))
    canvas.line([(cx, ground), tip], fill=(202, 152, 101), width=8)
    canvas.ellipse([cx - 4, ground - 4, cx + 4, ground + 4], fill=(129, 132, 203))


def _draw_acrobot(canvas, s):
    scale = HEIGHT / 5.0  # two links of length 1, +- 2.2 around the pivot
    ox, oy = WIDTH / 2, HEIGHT / 2
    a, b = s["joint_angle1"], s["joint_angle2"]
    p1 = (ox + scale * np.sin(a), oy + scale * np.cos(a))
    p2 = (p1[0] + scale * np.sin(a + b), p1[1] + scale * np.cos(a + b))
    canvas.line([(0, oy - scale), (WIDTH, oy - scale)], fill=(0, 0, 0))  # the goal height: 1 above the pivot
    canvas.line([(ox, oy), p1, p2], fill=(0, 204, 204), width=8)
    for p in ((ox, oy), p1):
        canvas.ellipse([p[0] - 5, p[1] - 5, p[0] + 5, p[1] + 5], fill=(204, 204, 0))


def _draw_pendulum(canvas, s):
    scale = HEIGHT / 3.0
    ox, oy = WIDTH / 2, HEIGHT / 2
    tip = (ox - scale * np.sin(s["theta"]), oy - scale * np.cos(s["theta"]))  # theta 0: upright
    canvas.line([(ox, oy), tip], fill=(204, 77, 77), width=10)
    canvas.ellipse([ox - 5, oy - 5, ox + 5, oy + 5], fill=(0, 0, 0))


def _draw_mountain_car(canvas, s):
    low, high, goal = -1.2, 0.6, 0.5

    def point(x):
        y = np.sin(3 * x) * 0.45 + 0.55
        return ((x - low) / (high - low) * WIDTH, HEIGHT - 22 - y * (HEIGHT - 80))

    xs = np.linspace(low, high, 100)
    canvas.line([point(x) for x in xs], fill=(0, 0, 0), width=2)
    gx, gy = point(goal)
    canvas.line([(gx, gy), (gx, gy - 30)], fill=(0, 0, 0))
    canvas.polygon([(gx, gy - 30), (gx + 16, gy - 25), (gx, gy - 20)], fill=(204, 204, 0))
    cx, cy = point(s["position"])
    canvas.ellipse([cx - 9, cy - 18, cx + 9, cy], fill=(60, 60, 60))


# --- command line -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.evaluate",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run folder of experiments.control")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per seed and mode (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="evaluation seed (default 0)")
    parser.add_argument("--gif", action=argparse.BooleanOptionalAction, default=True,
                        help=f"render the first greedy episode to RUN_DIR/{GIF_FILE} (default on)")
    parser.add_argument("--render-seed", type=int, default=0, help="the training seed whose episode is drawn")
    return parser.parse_args(list(sys.argv[1:] if argv is None else argv))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    runs.main(lambda: evaluate(args.run_dir, args.episodes, args.seed, args.gif, args.render_seed))


if __name__ == "__main__":
    main()
