"""Classic control end to end: REINFORCE, A2C, PPO, PPO-KL, TRPO and NPG on gymnax, over seeds.

    python -m experiments.control                          # PPO on CartPole-v1, 4 seeds (the README command)
    python -m experiments.control --algo a2c --env Acrobot-v1 --num-seeds 2 --learning-rate 1e-3
    python -m experiments.control --algo ppo --loss.gate.eps-low 0.1 --learner.num-epochs 10
    python -m experiments.control --algo trpo --learner.step.max-kl 0.02
    python -m experiments.control --algo ppo --help        # every field, nested parts included

An algorithm is a loss preset (`polygrad.losses`), an advantage estimator and a learner
(`polygrad.control.learners`); `ALGORITHMS` gives each one's defaults and per-environment presets, and
every field of every part is a command-line flag. `make_program(config)` composes environment, network,
rollout and learner into one seed's training; the script vmaps it over seeds and runs it in checkpointed
chunks in a run folder (`experiments.runs`): the same command, restarted after a kill, resumes and ends
with identical results.
"""

from experiments import runs  # noqa: I001  (first: sets XLA's flags before JAX starts)

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import struct

from envs import control as control_envs
from polygrad import losses, optim, sharding, validate
from polygrad.control import learners, networks, rollout, trpo
from polygrad.trust_region import TrustRegionConfig

# --- the config ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ControlConfig:
    """One classic-control run. `--algo` picks the defaults of every field (see `ALGORITHMS`)."""

    algo: str = "ppo"
    """reinforce, a2c, ppo, ppo_kl, trpo or npg."""
    env: str = "CartPole-v1"
    """gymnax environment id (see envs.control.ENV_NAMES)."""
    num_seeds: int = 4
    """seeds trained together (vmapped)."""
    seed: int = 0
    """base seed; seed i of the run uses the i-th split of PRNGKey(seed)."""
    total_steps: int = 500_000
    """environment steps per seed (rounded down to whole updates)."""
    num_envs: int = 4
    """parallel environments per seed."""
    num_steps: int = 128
    """rollout length per environment and update."""
    learning_rate: float = 2.5e-4
    """Adam learning rate (of the critic's fit for trpo and npg)."""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0 over the run."""
    max_grad_norm: float = 0.5
    """global gradient-norm clip (0 disables)."""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """widths of the actor's and the critic's MLP."""
    activation: str = "tanh"
    """tanh, relu, gelu or silu."""
    shared_torso: bool = False
    """one MLP torso for actor and critic instead of two."""
    log_std_init: float = 0.0
    """initial log-std of the Gaussian policy (continuous actions)."""
    normalize_observations: bool = False
    """running mean/std observation normalisation."""
    normalize_rewards: bool = False
    """scale rewards by the running std of the discounted return."""
    max_episode_steps: int | None = None
    """override the environment's time limit."""
    rollout_unroll: int = 1
    """lax.scan unroll of the rollout (speed only)."""
    updates_per_chunk: int = 100
    """updates per jitted chunk: progress line, metrics and checkpoint after each chunk."""
    loss: losses.LossConfig = losses.PRESETS["ppo"]
    """the policy loss: its parts (ratio, gate, aggregation, KL, value, entropy) and coefficients."""
    advantage: learners.AdvantageConfig = learners.AdvantageConfig()
    """advantage estimator, discount and GAE lambda."""
    learner: Any = learners.MinibatchEpochs()
    """minibatch epochs (reinforce, a2c, ppo, ppo_kl) or a trust-region step (trpo, npg)."""
    tensorboard: bool = True
    """write TensorBoard event files next to metrics.jsonl (--no-tensorboard: none). Never saved."""
    mesh: runs.MeshConfig = runs.MeshConfig()
    """device mesh: seeds x data devices, the environments of each seed split over data (default: all
    devices on data, or the most of them that divide num_envs). Never saved: a run resumes on any mesh."""
    run_dir: str | None = None
    """run folder; default runs/control/<algo>-<env>-<hash of the config>. Never saved in the config."""

    def __post_init__(self):
        validate.one_of("algo", self.algo, ALGORITHMS)
        validate.one_of("env", self.env, control_envs.ENV_NAMES)
        validate.integer("num_seeds", self.num_seeds, minimum=1)
        validate.integer("seed", self.seed, minimum=0, maximum=runs.MAX_SEED)
        validate.integer("num_envs", self.num_envs, minimum=1)
        validate.integer("num_steps", self.num_steps, minimum=1)
        validate.integer("total_steps", self.total_steps, minimum=self.batch_size)
        validate.positive("learning_rate", self.learning_rate)
        validate.non_negative("max_grad_norm", self.max_grad_norm)
        validate.check(len(self.hidden_sizes) > 0 and all(isinstance(h, int) and h > 0 for h in self.hidden_sizes),
                       f"hidden_sizes must be positive widths, got {self.hidden_sizes}")
        validate.one_of("activation", self.activation, networks.ACTIVATIONS)
        validate.finite("log_std_init", self.log_std_init)
        if self.max_episode_steps is not None:
            validate.integer("max_episode_steps", self.max_episode_steps, minimum=1)
        validate.integer("rollout_unroll", self.rollout_unroll, minimum=1)
        validate.integer("updates_per_chunk", self.updates_per_chunk, minimum=1)
        trust_region = isinstance(self.learner, trpo.TrustRegionLearnerConfig)
        validate.check(trust_region == (self.algo in ("trpo", "npg")),
                       f"algo {self.algo} needs a {'trust-region' if self.algo in ('trpo', 'npg') else 'minibatch'} "
                       "learner")
        minibatches = self.learner.value_minibatches if trust_region else self.learner.num_minibatches
        validate.check(self.batch_size % minibatches == 0,
                       f"{minibatches} minibatches do not divide the batch num_envs * num_steps = {self.batch_size}")
        validate.check(not (trust_region and self.shared_torso),
                       "trust-region methods need separate actor and critic torsos (the value fit would move "
                       "a shared torso, and with it the policy)")

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return self.total_steps // self.batch_size

    @property
    def gradient_steps(self) -> int:
        """Optimiser steps over the whole run (the learning-rate schedule's length)."""
        if isinstance(self.learner, trpo.TrustRegionLearnerConfig):
            per_update = self.learner.value_epochs * self.learner.value_minibatches
        else:
            per_update = self.learner.num_epochs * self.learner.num_minibatches
        return self.num_updates * per_update


# --- the algorithms: defaults and per-environment presets, declared once ----------------------------

_PENDULUM = {"num_envs": 16, "num_steps": 128, "normalize_observations": True, "normalize_rewards": True,
             "advantage.gamma": 0.95, "advantage.gae_lambda": 0.95}
_PPO_PENDULUM = {**_PENDULUM, "learning_rate": 1e-3, "loss.entropy_coef": 0.0, "learner.num_epochs": 10,
                 "learner.num_minibatches": 16}
_TRUST_REGION = {"num_envs": 4, "num_steps": 512, "learning_rate": 1e-3, "anneal_lr": False,
                 "advantage.gae_lambda": 0.97, "learner": trpo.TrustRegionLearnerConfig()}
_TRUST_REGION_PENDULUM = {**_PENDULUM, "learner.step.max_kl": 0.02, "learner.value_epochs": 10,
                          "learner.value_minibatches": 8}

ALGORITHMS: dict[str, dict[str, Any]] = {
    "ppo": {"defaults": {}, "envs": {"Pendulum-v1": _PPO_PENDULUM}},
    "ppo_kl": {"defaults": {"loss": losses.PRESETS["ppo_kl"]}, "envs": {"Pendulum-v1": _PPO_PENDULUM}},
    "a2c": {"defaults": {"loss": losses.PRESETS["a2c"], "num_envs": 8, "num_steps": 8, "learning_rate": 7e-4,
                         "advantage.gae_lambda": 1.0, "learner": learners.MinibatchEpochs(1, 1)}, "envs": {}},
    "reinforce": {"defaults": {"loss": losses.PRESETS["reinforce"], "num_envs": 8, "num_steps": 500,
                               "learning_rate": 1e-2, "advantage.estimator": "reward_to_go",
                               "learner": learners.MinibatchEpochs(1, 1)}, "envs": {}},
    "trpo": {"defaults": {**_TRUST_REGION, "loss": losses.PRESETS["trpo"]},
             "envs": {"Pendulum-v1": _TRUST_REGION_PENDULUM}},
    "npg": {"defaults": {**_TRUST_REGION, "loss": losses.PRESETS["trpo"], "learner": trpo.TrustRegionLearnerConfig(
        step=TrustRegionConfig(line_search="none"))}, "envs": {"Pendulum-v1": _TRUST_REGION_PENDULUM}},
}


def default_config(algo: str = "ppo", env: str = "CartPole-v1", **overrides: Any) -> ControlConfig:
    """The config of `algo` on `env`: the algorithm's defaults, then its env preset, then `overrides`.

    Keys may be dotted paths into the nested parts, e.g. `default_config("ppo", **{"loss.entropy_coef": 0})`.
    """
    validate.one_of("algo", algo, ALGORITHMS)
    entry = ALGORITHMS[algo]
    fields = {"algo": algo, "env": env, **entry["defaults"], **entry["envs"].get(env, {}), **overrides}
    return runs.replace_fields(ControlConfig(), fields)


# --- composition ----------------------------------------------------------------------------------


@struct.dataclass
class TrainCarry:
    """Everything one seed's training carries from update to update (and saves in checkpoints)."""

    learner: learners.LearnerState
    env_state: Any
    obs: jax.Array
    key: jax.Array


def make_env(config: ControlConfig):
    overrides = {} if config.max_episode_steps is None else {"max_steps_in_episode": config.max_episode_steps}
    return control_envs.make_env(
        config.env, config.num_envs, normalize_observations=config.normalize_observations,
        normalize_rewards=config.normalize_rewards, gamma=config.advantage.gamma, **overrides,
    )


def env_data_axes(config: ControlConfig) -> tuple[Any, Any]:
    """`(obs, env_state)` pytrees of 0 (the leaf's leading axis is the environment batch, split over the
    mesh's data axis) or None (shared by the batch: normalisation statistics, replicated), found by
    comparing the shapes of two batch sizes."""
    key = jax.random.PRNGKey(0)
    one = jax.eval_shape(make_env(config).reset, key)
    wider = dataclasses.replace(config, num_envs=config.num_envs + 1,
                                total_steps=config.total_steps + config.num_steps)
    other = jax.eval_shape(make_env(wider).reset, key)
    return jax.tree.map(lambda a, b: 0 if a.shape[:1] != b.shape[:1] else None, one, other)


def make_network(config: ControlConfig, env) -> networks.ActorCritic:
    return networks.ActorCritic(
        action_dim=env.action_dim, discrete=env.discrete, hidden_sizes=tuple(config.hidden_sizes),
        activation=config.activation, shared_torso=config.shared_torso, log_std_init=config.log_std_init,
    )


def make_optimizer(config: ControlConfig):
    """Adam with the config's learning rate, clip and (optional) linear annealing over the run, on the
    parameters raveled into one vector (`optim.flattened`: the same updates, fewer ops per step)."""
    return optim.flattened(optim.make_optimizer(config.learning_rate, config.max_grad_norm or None,
                                                config.gradient_steps if config.anneal_lr else None))


def make_learner(config: ControlConfig, apply_fn) -> learners.Learner:
    """The config's learner, taking its loss and advantage estimator."""
    tx = make_optimizer(config)
    if isinstance(config.learner, trpo.TrustRegionLearnerConfig):
        return trpo.make_trust_region_learner(apply_fn, tx, config.loss, config.advantage, config.learner)
    return learners.make_learner(apply_fn, tx, config.loss, config.advantage, config.learner)


@functools.lru_cache(maxsize=8)  # the same config reuses its jitted (compiled) chunks
def make_program(config: ControlConfig) -> runs.Program:
    """One seed's training as `init(key) -> TrainCarry` and `update(carry) -> (carry, metrics)`.

    An update collects `num_steps` steps of `num_envs` environments (`polygrad.control.rollout`) and
    applies the learner. Metrics: `episode_return` (mean over the environments of the return of each
    one's latest finished episode, on raw rewards; NaN before any finished), `episodes_finished` in this
    update, and the learner's metrics.
    """
    env = make_env(config)
    network = make_network(config, env)
    learner = make_learner(config, network.apply)

    def init(key):
        param_key, env_key, run_key = jax.random.split(key, 3)
        obs, env_state = env.reset(env_key)
        params = network.init(param_key, obs)
        return TrainCarry(learner.init(params), env_state, obs, run_key)

    def update(carry):
        key, rollout_key, update_key = jax.random.split(carry.key, 3)
        params = carry.learner.params
        traj, env_state, obs, infos = rollout.rollout(
            lambda o: network.apply(params, o, method=networks.ActorCritic.policy),
            lambda o: network.apply(params, o, method=networks.ActorCritic.value),
            env.step, carry.env_state, carry.obs, rollout_key, config.num_steps, config.rollout_unroll,
        )
        traj = sharding.constrain(traj, batch_axis=1)  # [T, B]: each device keeps its environments
        learner_state, metrics = learner.update(carry.learner, traj, update_key)
        metrics = {
            "episode_return": control_envs.recent_episode_return(env_state),
            "episodes_finished": infos["episode_done"].sum().astype("float32"),
            **metrics,
        }
        return TrainCarry(learner_state, env_state, obs, key), metrics

    obs_axes, state_axes = env_data_axes(config)

    def data_axes(carry):
        return TrainCarry(jax.tree.map(lambda _: None, carry.learner), state_axes, obs_axes, None)

    return runs.Program(init, update, config.num_updates, config.batch_size, data_axes=data_axes)


def build_mesh(config: ControlConfig, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh | None:
    """The run's device mesh (`runs.build_mesh` of `config.mesh` over the seeds and environments)."""
    return runs.build_mesh(config.mesh, config.num_seeds, config.num_envs, devices)


def make_train(config: ControlConfig) -> Callable[[jax.Array], tuple[TrainCarry, dict[str, jax.Array]]]:
    """A jittable function of one PRNG key running the whole training of one seed.

    Returns `(final TrainCarry, {metric: [num_updates]})`. Vmap it over seeds:
    `jax.jit(runs.vmap_seeds(make_train(config)))(runs.seed_keys(config.seed, config.num_seeds))`.
    """
    return runs.whole_run(make_program(config))


def run(config: ControlConfig, log: Callable[[str], None] = print) -> runs.RunResult:
    """Train `config` in its run folder (resuming it if it holds a checkpoint of the same config)."""
    run_dir = config.run_dir or runs.default_run_dir("control", f"{config.algo}-{config.env}", config)
    mesh = build_mesh(config)
    log(f"{config.algo} on {config.env}: {config.num_seeds} seeds x {config.num_updates} updates of "
        f"{config.batch_size} steps, run folder {run_dir}"
        + ("" if mesh is None else f", mesh {dict(mesh.shape)}"))
    return runs.run(
        make_program(config), config, run_dir, seed=config.seed, num_seeds=config.num_seeds,
        updates_per_chunk=config.updates_per_chunk, title=f"{config.algo} on {config.env}", log=log,
        mesh=mesh, tensorboard=config.tensorboard,
    )


def parse_config(argv: Sequence[str] | None = None) -> ControlConfig:
    """`--algo` and `--env` choose the defaults of every field; tyro parses the rest (nested parts too)."""
    algo, env = runs.peek_args(argv, algo="ppo", env="CartPole-v1")
    return runs.parse(ControlConfig, default_config(algo, env), argv,
                      description=f"--algo {algo} (choose with --algo: {', '.join(ALGORITHMS)})")


def main(argv: Sequence[str] | None = None) -> None:
    runs.main(lambda: run(parse_config(argv)))


if __name__ == "__main__":
    main()
