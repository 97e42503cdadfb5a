"""polygrad: policy-gradient reinforcement learning as small pure JAX functions.

Modules (import the one you need, e.g. `from polygrad import returns`):

- `returns`: discounted returns, TD errors, n-step and lambda-returns, GAE (time-major `[T, ...]`).
- `importance`: importance ratios, trajectory weights, ordinary / per-decision / self-normalised IS,
  capped weights, effective sample size.
- `distributions`: categorical and diagonal-Gaussian log-probs, entropy, exact KL; sampled KL k1/k2/k3.
- `advantages`: group-relative advantages for `[num_prompts, group_size]` rewards.
- `types`: the `Trajectory` batch shared by rollouts and losses.

The README lists the whole public API, module by module.
"""

__version__ = "0.1.0"
