"""Classic control end to end: REINFORCE, A2C and PPO (clip or adaptive KL penalty) on gymnax, over seeds.

    python -m experiments.control                          # PPO on CartPole-v1, 4 seeds (the README command)
    python -m experiments.control --algo a2c --env Acrobot-v1 --num-seeds 2 --learning-rate 1e-3
    python -m experiments.control --algo ppo --help        # every field of an algorithm's config

Each algorithm is one registry entry: a frozen config dataclass (its fields are the command line,
parsed by tyro) and a builder `(config, apply_fn, num_updates) -> polygrad.updates.Learner`. Per-env
defaults (`presets`) are applied before the command-line fields. `make_train(config)` composes
environment, network, rollout and learner into a jittable function of one PRNG key; the script vmaps
it over seeds and runs it in checkpointed chunks in a run folder (`experiments.runs`): the same
command, restarted after a kill, resumes and ends with identical results.
"""

import os

# Must precede the first JAX import: XLA:CPU's concurrency-optimised scheduler can stall vmapped runs.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import tyro  # noqa: E402
from flax import struct  # noqa: E402

from envs import control as control_envs  # noqa: E402
from experiments import runs  # noqa: E402
from polygrad import networks, rollout, trpo, trust_region, updates  # noqa: E402

# --- configs --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ControlConfig:
    """Fields shared by every classic-control algorithm."""

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
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0 over the run."""
    max_grad_norm: float = 0.5
    """global gradient-norm clip (0 disables)."""
    gamma: float = 0.99
    hidden_sizes: tuple[int, ...] = (64, 64)
    activation: str = "tanh"
    shared_torso: bool = False
    """one MLP torso for actor and critic instead of two."""
    log_std_init: float = 0.0
    """initial log-std of the Gaussian policy (continuous actions)."""
    normalize_observations: bool = False
    normalize_rewards: bool = False
    max_episode_steps: int | None = None
    """override the environment's time limit."""
    rollout_unroll: int = 1
    """lax.scan unroll of the rollout (speed only)."""
    updates_per_chunk: int = 100
    """updates per jitted chunk: progress line, metrics and checkpoint after each chunk."""
    run_dir: str | None = None
    """run folder; default runs/control/<algo>-<env>-<hash of the config>."""

    def __post_init__(self):
        def check(ok: bool, message: str):
            if not ok:
                raise ValueError(f"bad config: {message}")

        check(self.env in control_envs.ENV_NAMES,
              f"unknown env {self.env!r}; choose one of {', '.join(control_envs.ENV_NAMES)}")
        check(self.num_seeds >= 1, f"num_seeds must be >= 1, got {self.num_seeds}")
        check(self.num_envs >= 1, f"num_envs must be >= 1, got {self.num_envs}")
        check(self.num_steps >= 1, f"num_steps must be >= 1, got {self.num_steps}")
        check(self.total_steps >= self.batch_size,
              f"total_steps={self.total_steps} is less than one update "
              f"(num_envs * num_steps = {self.batch_size})")
        check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        check(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        check(0.0 < self.gamma <= 1.0, f"gamma must be in (0, 1], got {self.gamma}")
        check(len(self.hidden_sizes) > 0 and all(h > 0 for h in self.hidden_sizes),
              f"hidden_sizes must be positive widths, got {self.hidden_sizes}")
        check(self.activation in networks.ACTIVATIONS,
              f"unknown activation {self.activation!r}; choose one of {sorted(networks.ACTIVATIONS)}")
        check(self.max_episode_steps is None or self.max_episode_steps >= 1,
              f"max_episode_steps must be >= 1, got {self.max_episode_steps}")
        check(self.rollout_unroll >= 1, f"rollout_unroll must be >= 1, got {self.rollout_unroll}")
        check(self.updates_per_chunk >= 1, f"updates_per_chunk must be >= 1, got {self.updates_per_chunk}")

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return self.total_steps // self.batch_size


@dataclasses.dataclass(frozen=True)
class PPOConfig(ControlConfig):
    """PPO-clip; the defaults are the CleanRL/PureJaxRL CartPole config."""

    gae_lambda: float = 0.95
    num_epochs: int = 4
    num_minibatches: int = 4
    clip_eps: float = 0.2
    value_clip_eps: float | None = 0.2
    """clip the value loss around the old values (None: unclipped)."""
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    normalize_advantages: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.gae_lambda <= 1.0:
            raise ValueError(f"bad config: gae_lambda must be in [0, 1], got {self.gae_lambda}")
        if self.num_epochs < 1 or self.num_minibatches < 1:
            raise ValueError(f"bad config: num_epochs and num_minibatches must be >= 1, got "
                             f"{self.num_epochs}, {self.num_minibatches}")
        if self.batch_size % self.num_minibatches:
            raise ValueError(f"bad config: num_minibatches={self.num_minibatches} does not divide the batch "
                             f"num_envs * num_steps = {self.batch_size}")
        if self.clip_eps <= 0:
            raise ValueError(f"bad config: clip_eps must be > 0, got {self.clip_eps}")


@dataclasses.dataclass(frozen=True)
class PPOKLConfig(PPOConfig):
    """PPO with the adaptive KL penalty instead of clipping (PPO paper, section 4)."""

    kl_target: float = 0.01
    kl_beta_init: float = 1.0
    kl_threshold: float = 1.5
    """adapt beta when the KL leaves [target / threshold, target * threshold]."""
    kl_factor: float = 2.0
    """beta is multiplied or divided by this factor."""

    def __post_init__(self):
        super().__post_init__()
        if self.kl_target <= 0 or self.kl_beta_init < 0 or self.kl_threshold <= 1 or self.kl_factor <= 1:
            raise ValueError(
                "bad config: need kl_target > 0, kl_beta_init >= 0, kl_threshold > 1, kl_factor > 1"
            )


@dataclasses.dataclass(frozen=True)
class A2CConfig(ControlConfig):
    """Synchronous advantage actor-critic: one Adam step per short rollout."""

    num_envs: int = 8
    num_steps: int = 8
    learning_rate: float = 7e-4
    anneal_lr: bool = True
    gae_lambda: float = 1.0
    """GAE lambda of the advantages (ignored when n_step is set)."""
    n_step: int | None = None
    """use n-step returns instead of GAE."""
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    normalize_advantages: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.gae_lambda <= 1.0:
            raise ValueError(f"bad config: gae_lambda must be in [0, 1], got {self.gae_lambda}")
        if self.n_step is not None and self.n_step < 1:
            raise ValueError(f"bad config: n_step must be >= 1, got {self.n_step}")


@dataclasses.dataclass(frozen=True)
class ReinforceConfig(ControlConfig):
    """REINFORCE with reward-to-go on complete episodes, with or without a learned baseline."""

    num_envs: int = 8
    num_steps: int = 500
    learning_rate: float = 1e-2
    anneal_lr: bool = True
    baseline: bool = True
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    normalize_advantages: bool = True


@dataclasses.dataclass(frozen=True)
class NPGConfig(ControlConfig):
    """Natural policy gradient (003 eqs. 71-74): CG on Fisher-vector products, step scaled to the KL radius
    max_kl, no line search; the critic is fitted with Adam (learning_rate) between policy steps."""

    num_envs: int = 4
    num_steps: int = 512
    learning_rate: float = 1e-3
    """Adam learning rate of the value fit."""
    anneal_lr: bool = False
    gae_lambda: float = 0.97
    max_kl: float = 0.01
    """trust-region radius delta on the batch-mean KL(pi_old || pi)."""
    cg_iterations: int = 10
    cg_residual_tol: float = 1e-5
    """CG stops early once the residual norm is at most this."""
    cg_damping: float = 0.1
    value_epochs: int = 5
    value_minibatches: int = 4
    normalize_advantages: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.shared_torso:
            raise ValueError("bad config: trust-region methods need separate actor and critic torsos "
                             "(the value fit would move a shared torso, and with it the policy)")
        if not 0.0 <= self.gae_lambda <= 1.0:
            raise ValueError(f"bad config: gae_lambda must be in [0, 1], got {self.gae_lambda}")
        if self.batch_size % self.value_minibatches:
            raise ValueError(f"bad config: value_minibatches={self.value_minibatches} does not divide the "
                             f"batch num_envs * num_steps = {self.batch_size}")
        self.trust_region_config()  # validates max_kl, cg_iterations, cg_damping and the line search

    def trust_region_config(self) -> trust_region.TrustRegionConfig:
        return trust_region.TrustRegionConfig(
            max_kl=self.max_kl, cg_iterations=self.cg_iterations, cg_residual_tol=self.cg_residual_tol,
            damping=self.cg_damping,
        )


@dataclasses.dataclass(frozen=True)
class TRPOConfig(NPGConfig):
    """TRPO (003 section 4.6.4): the NPG step, then a backtracking line search accepting the first step
    with a non-negative surrogate improvement and mean KL <= max_kl."""

    backtrack_factor: float = 0.8
    max_backtracks: int = 10
    line_search: str = "sequential"
    """sequential (a lax.while_loop, stops at the first accepted step) or parallel (all steps, vmapped)."""

    def trust_region_config(self) -> trust_region.TrustRegionConfig:
        return dataclasses.replace(
            super().trust_region_config(), backtrack_factor=self.backtrack_factor,
            max_backtracks=self.max_backtracks, line_search=self.line_search,
        )


# --- learners (one builder per algorithm) ---------------------------------------------------------


def _optimizer(config: ControlConfig, gradient_steps: int):
    return updates.make_optimizer(
        config.learning_rate, config.max_grad_norm or None, gradient_steps if config.anneal_lr else None
    )


def build_ppo(config: PPOConfig, apply_fn, num_updates: int) -> updates.Learner:
    tx = _optimizer(config, num_updates * config.num_epochs * config.num_minibatches)
    kl = isinstance(config, PPOKLConfig)
    return updates.make_ppo(
        apply_fn, tx, gamma=config.gamma, gae_lambda=config.gae_lambda, num_epochs=config.num_epochs,
        num_minibatches=config.num_minibatches, clip_eps=config.clip_eps,
        value_clip_eps=config.value_clip_eps,
        value_coef=config.value_coef, entropy_coef=config.entropy_coef,
        normalize_advantages=config.normalize_advantages, kl_penalty=kl,
        **({"kl_target": config.kl_target, "kl_beta_init": config.kl_beta_init,
            "kl_threshold": config.kl_threshold, "kl_factor": config.kl_factor} if kl else {}),
    )


def build_a2c(config: A2CConfig, apply_fn, num_updates: int) -> updates.Learner:
    return updates.make_a2c(
        apply_fn, _optimizer(config, num_updates), gamma=config.gamma, gae_lambda=config.gae_lambda,
        n_step=config.n_step, value_coef=config.value_coef, entropy_coef=config.entropy_coef,
        normalize_advantages=config.normalize_advantages,
    )


def build_reinforce(config: ReinforceConfig, apply_fn, num_updates: int) -> updates.Learner:
    return updates.make_reinforce(
        apply_fn, _optimizer(config, num_updates), gamma=config.gamma, baseline=config.baseline,
        value_coef=config.value_coef, entropy_coef=config.entropy_coef,
        normalize_advantages=config.normalize_advantages,
    )


def build_trust_region(config: NPGConfig, apply_fn, num_updates: int) -> updates.Learner:
    return trpo.make_trust_region_learner(
        apply_fn, _optimizer(config, num_updates * config.value_epochs * config.value_minibatches),
        config.trust_region_config(), line_search=isinstance(config, TRPOConfig), gamma=config.gamma,
        gae_lambda=config.gae_lambda, value_epochs=config.value_epochs,
        value_minibatches=config.value_minibatches, normalize_advantages=config.normalize_advantages,
    )


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """A registry entry: config class, learner builder, and per-env default overrides."""

    config_class: type[ControlConfig]
    build: Callable[[Any, Callable, int], updates.Learner]
    presets: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


_CONTINUOUS_PPO = dict(
    num_envs=16, num_steps=128, num_minibatches=16, num_epochs=10, learning_rate=1e-3, gamma=0.95,
    gae_lambda=0.95, entropy_coef=0.0, normalize_observations=True, normalize_rewards=True,
)

# Pendulum: normalised observations and rewards, short horizon (gamma 0.95), a larger KL radius.
_CONTINUOUS_TRUST_REGION = dict(
    num_envs=16, num_steps=128, gamma=0.95, gae_lambda=0.95, normalize_observations=True,
    normalize_rewards=True, max_kl=0.02, value_epochs=10, value_minibatches=8,
)

ALGORITHMS: dict[str, Algorithm] = {
    "ppo": Algorithm(PPOConfig, build_ppo, {"Pendulum-v1": _CONTINUOUS_PPO}),
    "ppo_kl": Algorithm(PPOKLConfig, build_ppo, {"Pendulum-v1": _CONTINUOUS_PPO}),
    "a2c": Algorithm(A2CConfig, build_a2c),
    "reinforce": Algorithm(ReinforceConfig, build_reinforce),
    "trpo": Algorithm(TRPOConfig, build_trust_region, {"Pendulum-v1": _CONTINUOUS_TRUST_REGION}),
    "npg": Algorithm(NPGConfig, build_trust_region, {"Pendulum-v1": _CONTINUOUS_TRUST_REGION}),
}


def algorithm_name(config: ControlConfig) -> str:
    """The registry name of a config's algorithm (its exact class)."""
    for name, algo in ALGORITHMS.items():
        if type(config) is algo.config_class:
            return name
    raise ValueError(f"no registered algorithm uses {type(config).__name__}")


def default_config(algo: str, env: str = "CartPole-v1", **overrides: Any) -> ControlConfig:
    """The config of `algo` on `env`: class defaults, then the env preset, then `overrides`."""
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown algo {algo!r}; choose one of {', '.join(ALGORITHMS)}")
    entry = ALGORITHMS[algo]
    fields = {**entry.presets.get(env, {}), **overrides}
    return entry.config_class(env=env, **fields)


# --- composition ----------------------------------------------------------------------------------


@struct.dataclass
class TrainCarry:
    """Everything one seed's training carries from update to update (and saves in checkpoints)."""

    learner: updates.LearnerState
    env_state: Any
    obs: jax.Array
    key: jax.Array


def make_env(config: ControlConfig):
    overrides = {} if config.max_episode_steps is None else {"max_steps_in_episode": config.max_episode_steps}
    return control_envs.make_env(
        config.env, config.num_envs, normalize_observations=config.normalize_observations,
        normalize_rewards=config.normalize_rewards, gamma=config.gamma, **overrides,
    )


def make_network(config: ControlConfig, env) -> networks.ActorCritic:
    return networks.ActorCritic(
        action_dim=env.action_dim, discrete=env.discrete, hidden_sizes=tuple(config.hidden_sizes),
        activation=config.activation, shared_torso=config.shared_torso, log_std_init=config.log_std_init,
    )


@functools.lru_cache(maxsize=8)  # the same config reuses its jitted (compiled) chunks
def make_program(config: ControlConfig) -> runs.Program:
    """One seed's training as `init(key) -> TrainCarry` and `update(carry) -> (carry, metrics)`.

    An update collects `num_steps` steps of `num_envs` environments (`polygrad.rollout.rollout`) and
    applies the algorithm's learner. Metrics: `episode_return` (mean over the environments of the
    return of each one's latest finished episode, on raw rewards; NaN before any finished),
    `episodes_finished` in this update, and the learner's loss metrics.
    """
    env = make_env(config)
    network = make_network(config, env)
    num_updates = config.num_updates
    learner = ALGORITHMS[algorithm_name(config)].build(config, network.apply, num_updates)

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
        learner_state, metrics = learner.update(carry.learner, traj, update_key)
        metrics = {
            "episode_return": control_envs.recent_episode_return(env_state),
            "episodes_finished": infos["episode_done"].sum().astype("float32"),
            **metrics,
        }
        return TrainCarry(learner_state, env_state, obs, key), metrics

    return runs.Program(init, update, num_updates, config.batch_size)


def make_train(config: ControlConfig) -> Callable[[jax.Array], tuple[TrainCarry, dict[str, jax.Array]]]:
    """A jittable function of one PRNG key running the whole training of one seed.

    Returns `(final TrainCarry, {metric: [num_updates]})`. Vmap it over seeds:
    `jax.jit(runs.vmap_seeds(make_train(config)))(runs.seed_keys(config.seed, config.num_seeds))`.
    """
    return runs.whole_run(make_program(config))


def config_dict(config: ControlConfig) -> dict[str, Any]:
    """The config as saved in config.json: the algorithm name plus every field except `run_dir`."""
    fields = runs.config_to_dict(config)
    fields.pop("run_dir")
    return {"algo": algorithm_name(config), **fields}


def default_run_dir(config: ControlConfig) -> str:
    digest = hashlib.sha256(json.dumps(config_dict(config), sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join("runs", "control", f"{algorithm_name(config)}-{config.env}-{digest}")


def run(config: ControlConfig, log: Callable[[str], None] = print) -> runs.RunResult:
    """Train `config` in its run folder (resuming it if it holds a checkpoint of the same config)."""
    run_dir = config.run_dir or default_run_dir(config)
    algo = algorithm_name(config)
    log(f"{algo} on {config.env}: {config.num_seeds} seeds x {config.num_updates} updates of "
        f"{config.batch_size} steps, run folder {run_dir}")
    return runs.run(
        make_program(config), config_dict(config), run_dir, seed=config.seed, num_seeds=config.num_seeds,
        updates_per_chunk=config.updates_per_chunk, title=f"{algo} on {config.env}", log=log,
    )


def parse_config(argv: Sequence[str] | None = None) -> ControlConfig:
    """`--algo NAME` (default ppo) selects the registry entry, `--env` its preset; tyro parses the rest."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--algo", default="ppo", choices=sorted(ALGORITHMS))
    pre.add_argument("--env", default="CartPole-v1")
    known, rest = pre.parse_known_args(argv)
    default = default_config(known.algo, known.env)
    return tyro.cli(
        ALGORITHMS[known.algo].config_class, args=rest, default=default,
        description=f"--algo {known.algo} (choose with --algo: {', '.join(ALGORITHMS)}). "
        + (ALGORITHMS[known.algo].config_class.__doc__ or ""),
    )


def main(argv: Sequence[str] | None = None) -> None:
    try:
        config = parse_config(argv)
    except ValueError as error:  # a bad config: one clear line, no traceback
        raise SystemExit(str(error)) from None
    run(config)


if __name__ == "__main__":
    main()
