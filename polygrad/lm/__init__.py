"""Language models for RL at toy scale: a causal transformer, KV-cache sampling, group generation.

- `transformer`: `TransformerLM` (Flax linen) with an optional value head, and `init_params`.
- `sampling`: jitted KV-cache sampling and teacher-forced log-probs, entropies and values.
- `generation`: groups of completions scored by a task, dynamic sampling, token-level GAE, evaluation.
- `supervised`: supervised fine-tuning, reward-model scores and the DPO model loss.
- `shaping`: dynamic-sampling helpers, DAPO's overlong penalty, truncation masks, reward combination.
"""

from polygrad.lm import generation, sampling, shaping, supervised, transformer
from polygrad.lm.transformer import TransformerLM, init_params

__all__ = ["TransformerLM", "generation", "init_params", "sampling", "shaping", "supervised", "transformer"]
