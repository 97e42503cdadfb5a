"""polygrad: policy-gradient reinforcement learning as small pure JAX functions.

The tree shows the layers:

- `estimators/`: returns and GAE, importance sampling, distributions, group advantages, statistics.
- `losses/`: one vocabulary of parts (ratio, gate, aggregation, KL, value, entropy) and the presets of
  every method, REINFORCE to PPO and the GRPO family.
- `control/`: actor-critic networks, `lax.scan` rollouts, learners that take a loss, the TRPO/NPG learner.
- `lm/`: a small causal transformer, KV-cache sampling, group generation, scoring and evaluation.
- `trust_region`: conjugate gradient, Fisher-vector products, TRPO and natural-gradient steps.
- `tabular`: exact analysis of finite MDPs, the ground truth of the sampled estimators.
- `optim`: the optimiser and the one gradient-step / minibatch loop every learner uses.
- `validate`: the one validation helper of configs and hyperparameters.

`from polygrad import returns, importance, distributions, advantages, grpo, tabular, trust_region` keeps
working: the estimators are re-exported here and `grpo` re-exports the GRPO-family names of `losses`.
The README lists the whole public API, module by module.
"""

import sys

from polygrad import (
    control,
    estimators,
    grpo,
    lm,
    losses,
    optim,
    tabular,
    trust_region,
    validate,
)
from polygrad.estimators import advantages, distributions, importance, returns, statistics

# Module paths of the first layout keep working (`from polygrad.returns import gae`, `polygrad.sampling`).
for _name in ("advantages", "distributions", "importance", "returns", "statistics"):
    sys.modules[f"polygrad.{_name}"] = getattr(estimators, _name)
for _package, _name in ((control, "networks"), (control, "rollout"), (lm, "sampling"), (lm, "transformer")):
    sys.modules[f"polygrad.{_name}"] = getattr(_package, _name)

__version__ = "0.2.0"

__all__ = ["advantages", "control", "distributions", "estimators", "lm", "grpo", "importance", "losses", "optim", "returns",
           "statistics", "tabular", "trust_region", "validate"]
