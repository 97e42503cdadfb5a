"""Estimators on arrays: returns and advantages, importance sampling, distributions, statistics.

- `returns`: discounted returns, TD errors, n-step and lambda-returns, GAE (time-major `[T, ...]`, a
  scalar or per-step discount).
- `importance`: importance ratios, trajectory weights, ordinary / per-decision / self-normalised IS,
  capped weights, effective sample size.
- `distributions`: categorical and diagonal-Gaussian log-probs, entropy, exact KL; sampled KL k1/k2/k3;
  the `Categorical` and `DiagGaussian` objects a policy network outputs.
- `advantages`: group-relative advantages for `[num_prompts, group_size]` rewards.
- `statistics`: masked sums, means and variances, whitening, explained variance, pass@k.
"""

from polygrad.estimators import advantages, distributions, importance, returns, statistics

__all__ = ["advantages", "distributions", "importance", "returns", "statistics"]
