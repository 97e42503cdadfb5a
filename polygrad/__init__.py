"""polygrad: policy-gradient reinforcement learning as small pure JAX functions.

Modules (import the one you need, e.g. `from polygrad import returns`):

- `returns`: discounted returns, TD errors, n-step and lambda-returns, GAE (time-major `[T, ...]`).
- `importance`: importance ratios, trajectory weights, ordinary / per-decision / self-normalised IS,
  capped weights, effective sample size.
- `distributions`: categorical and diagonal-Gaussian log-probs, entropy, exact KL; sampled KL k1/k2/k3.
- `advantages`: group-relative advantages for `[num_prompts, group_size]` rewards.
- `types`: the `Trajectory` batch shared by rollouts and losses.
- `tabular`: exact analysis of finite MDPs (V, Q, A, occupancy, J, surrogate / distribution-shift
  penalty / performance difference, CPI, exact softmax policy gradient, Fisher matrix, natural
  gradient, episode sampler): the ground truth for the sampled estimators.
- `networks`, `rollout`, `losses`, `updates`: classic-control actor-critic pieces (REINFORCE, A2C, PPO).
- `trust_region`, `trpo`: conjugate gradient, Fisher-vector products, TRPO and natural-gradient steps.
- `grpo`: the GRPO family as parts (ratio, gate, aggregation, KL) and presets.
- `transformer`, `sampling`: a small causal transformer LM and cached autoregressive sampling.

The README lists the whole public API, module by module.
"""

__version__ = "0.1.0"
