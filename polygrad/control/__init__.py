"""Classic control: actor-critic networks, `lax.scan` rollouts, and learners that take a loss.

- `networks`: `ActorCritic` (Flax linen MLPs, a categorical or diagonal-Gaussian head).
- `rollout`: `rollout` of a batch of gymnax-style environments into a time-major `Trajectory`.
- `learners`: advantage estimators and the minibatch-epochs learner (REINFORCE, A2C, PPO, PPO-KL).
- `trpo`: the trust-region learner (TRPO, NPG) with its value fit.
"""

from polygrad.control import learners, networks, rollout, trpo
from polygrad.control.rollout import Trajectory

__all__ = ["Trajectory", "learners", "networks", "rollout", "trpo"]
