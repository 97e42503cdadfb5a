"""MLP actor-critic networks (Flax linen) outputting a `Categorical` or `DiagGaussian` policy.

The network maps observations `[..., obs_dim]` to a policy distribution and a state value `[...]`.
The distributions are small pytrees (`flax.struct` dataclasses) whose methods call
`polygrad.distributions`, so a loss can be written as a pure function of parameters:

    dist, value = network.apply(params, obs)
    log_probs = dist.log_prob(actions)

Initialisation follows the PPO implementation details of CleanRL/PureJaxRL (Huang et al., 2022,
"The 37 implementation details of PPO"): orthogonal weights with gain sqrt(2) in hidden layers,
0.01 for the policy output and 1 for the value output, zero biases; the Gaussian head has a
state-independent log-std parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from polygrad.estimators.distributions import Categorical, DiagGaussian, Distribution

ACTIVATIONS = {"tanh": nn.tanh, "relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu}




class MLP(nn.Module):
    """Dense layers with the given widths and activation, orthogonal(sqrt 2) initialisation."""

    hidden_sizes: Sequence[int] = (64, 64)
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        for width in self.hidden_sizes:
            x = act(nn.Dense(width, kernel_init=nn.initializers.orthogonal(np.sqrt(2.0)))(x))
        return x


class ActorCritic(nn.Module):
    """MLP actor and critic with a categorical or diagonal-Gaussian policy head.

    Attributes:
      action_dim: number of discrete actions, or dimension of a continuous action.
      discrete: categorical head (True) or diagonal-Gaussian head with state-independent log-std (False).
      hidden_sizes, activation: the MLP torso(s).
      shared_torso: one torso feeding both heads (True) or separate actor and critic torsos (False).
      log_std_init: initial value of the Gaussian log-std.

    `__call__(obs [..., obs_dim]) -> (Categorical | DiagGaussian, value [...])`; the methods `policy`
    and `value` compute one of the two (with a separate torso they skip the other network).
    """

    action_dim: int
    discrete: bool = True
    hidden_sizes: Sequence[int] = (64, 64)
    activation: str = "tanh"
    shared_torso: bool = False
    log_std_init: float = 0.0

    def setup(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")
        self.actor_torso = MLP(self.hidden_sizes, self.activation)
        self.critic_torso = self.actor_torso if self.shared_torso else MLP(self.hidden_sizes, self.activation)
        self.policy_head = nn.Dense(self.action_dim, kernel_init=nn.initializers.orthogonal(0.01))
        self.value_head = nn.Dense(1, kernel_init=nn.initializers.orthogonal(1.0))
        if not self.discrete:
            self.log_std = self.param(
                "log_std", nn.initializers.constant(self.log_std_init), (self.action_dim,)
            )

    def policy(self, obs: jax.Array) -> Distribution:
        out = self.policy_head(self.actor_torso(obs))
        if self.discrete:
            return Categorical(out)
        return DiagGaussian(out, jnp.broadcast_to(self.log_std, out.shape))

    def value(self, obs: jax.Array) -> jax.Array:
        return self.value_head(self.critic_torso(obs))[..., 0]

    def __call__(self, obs: jax.Array) -> tuple[Distribution, jax.Array]:
        if self.shared_torso:
            hidden = self.actor_torso(obs)
            out = self.policy_head(hidden)
            value = self.value_head(hidden)[..., 0]
            if self.discrete:
                return Categorical(out), value
            return DiagGaussian(out, jnp.broadcast_to(self.log_std, out.shape)), value
        return self.policy(obs), self.value(obs)
