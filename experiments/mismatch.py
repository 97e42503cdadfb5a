"""The rollout-trainer mismatch at toy scale: a bfloat16 sampler, a float32 trainer, and the corrections.

    python -m experiments.mismatch                  # 6 settings x 3 seeds (about 15 min on 2 busy CPU cores)
    python -m experiments.mismatch --num-seeds 2 --num-updates 10

Inference engines sample in low precision while the trainer computes in float32, so the policy that
sampled a batch (pi_sampler) is not the one the loss thinks did (pi_old), even at the same weights (Yao
et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"). Here the sampler is
a bfloat16 copy of the policy (parameters, activations and KV cache; `LMConfig.sampler_dtype`), its
log-probs of the sampled tokens go to the loss as `logp_sampler`, and each setting below is one
`experiments.lm` run (GRPO on `reverse`, a small transformer) that differs only in its config:

- `fp32 sampler`: no mismatch (the reference point);
- `bf16, none`: the mismatch left uncorrected;
- `bf16, TIS`: truncated importance sampling, weight min(pi_old / pi_sampler, 2) per token (Yao et al.);
- `bf16, MIS`: masked IS (IcePop), tokens with pi_old / pi_sampler outside [0.5, 5] dropped;
- `bf16, OPSM`: DeepSeek-V3.2's off-policy sequence mask (arXiv 2512.02556, eq. 9), delta 1e-3;
- `bf16, MIS [0.995, 1.005]`: a band tight enough to act on a bf16 mismatch of this size.

Logged per update (`experiments.lm`): the mismatch on the sampled tokens (k3 estimate of
KL(pi_sampler || pi_theta), mean |log rho|, the fraction outside [0.5, 5]), the fraction of tokens each
correction truncated or dropped, and the training reward. Runs go to `<out>/<setting>` (resumable run
folders sharing one warm start in `<out>/warm`), the numbers to `<out>/results.json` and
`<out>/results.md`, the figure to `docs/figures/mismatch.png` (mean over seeds, min-max band).
"""

import dataclasses
import json
import os
import re

import numpy as np
import tyro

from experiments import lm

SETTINGS = {
    "fp32 sampler": {"sampler_dtype": "float32"},
    "bf16, none": {"sampler_dtype": "bfloat16"},
    "bf16, TIS": {"sampler_dtype": "bfloat16", "loss.correction": ("tis:cap_max=2",)},
    "bf16, MIS": {"sampler_dtype": "bfloat16", "loss.correction": ("mis:low=0.5,high=5",)},
    "bf16, OPSM": {"sampler_dtype": "bfloat16", "loss.correction": ("opsm:delta=0.001",)},
    "bf16, MIS [0.995, 1.005]": {"sampler_dtype": "bfloat16",
                                 "loss.correction": ("mis:low=0.995,high=1.005",)},
}

# A small model and batch, so that the whole study fits in minutes on 2 CPU cores.
COMMON = dict(task="reverse", task_knobs=json.dumps({"n_min": 3, "n_max": 6}), d_model=32, num_layers=1,
              num_heads=2, corpus_size=1000, sft_steps=150, num_prompts=8, group_size=8, num_epochs=2,
              num_minibatches=2, eval_prompts=0, final_eval_prompts=64, pass_k=1, tensorboard=False)

CURVES = (("reward", "training reward"), ("sampler_kl_k3", "KL(sampler || trainer), k3"),
          ("sampler_abs_log_ratio", "mean |log pi_theta / pi_sampler|"),
          ("mismatch_outside_frac", "tokens the correction truncated / dropped"))


@dataclasses.dataclass(frozen=True)
class MismatchConfig:
    """The study's size and where it writes."""

    num_seeds: int = 3
    """seeds per setting (vmapped)."""
    num_updates: int = 30
    """RL updates per seed."""
    out: str = "runs/mismatch"
    """output folder (run folders, results.json, results.md)."""
    figure: str = "docs/figures/mismatch.png"
    """where the figure goes."""


def setting_config(study: MismatchConfig, overrides: dict) -> lm.LMConfig:
    """The `experiments.lm` config of one setting."""
    return lm.default_config("grpo", num_seeds=study.num_seeds, num_updates=study.num_updates,
                             updates_per_chunk=study.num_updates,
                             warm_start_dir=os.path.join(study.out, "warm"), **COMMON, **overrides)


def slug(label: str) -> str:
    """A folder name for a setting's label ("bf16, TIS" -> "bf16_tis")."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def spread(per_seed) -> dict:
    """Mean, min and max over seeds of per-seed numbers."""
    per_seed = np.asarray(per_seed, float)
    return {"mean": float(np.mean(per_seed)), "min": float(np.min(per_seed)), "max": float(np.max(per_seed))}


def summarise(metrics: dict, final: dict) -> dict:
    """Per setting: mean and min / max over seeds of the mismatch (all updates), of the reward over the
    last quarter of updates, and of the final held-out pass@1."""
    quarter = max(1, metrics["reward"].shape[1] // 4)
    return {
        "reward_last_quarter": spread(np.mean(metrics["reward"][:, -quarter:], axis=1)),
        "sampler_kl_k3": spread(np.mean(metrics["sampler_kl_k3"], axis=1)),
        "sampler_abs_log_ratio": spread(np.mean(metrics["sampler_abs_log_ratio"], axis=1)),
        "sampler_outside_band": spread(np.mean(metrics["sampler_outside_band"], axis=1)),
        "correction_outside_frac": spread(np.mean(metrics["mismatch_outside_frac"], axis=1)),
        "correction_weight_mean": spread(np.mean(metrics["correction_weight_mean"], axis=1)),
        "final_pass1_sampled": spread(final["pass1_sampled"]),
    }


def plot(results: dict, path: str, curves=CURVES, title: str = "bf16 sampler, fp32 trainer: GRPO on reverse, "
         "corrections (mean and min-max over seeds)", log_panels: tuple[int, ...] = (1,)) -> None:
    """One panel per `(metric, title)` of `curves`: mean over seeds against updates, min-max band shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
    for ax, (metric, panel) in zip(axes[0], curves, strict=True):
        for label, result in results.items():
            values = np.asarray(result["metrics"][metric])
            steps = np.arange(1, values.shape[1] + 1)
            ax.plot(steps, np.mean(values, 0), label=label)
            ax.fill_between(steps, np.min(values, 0), np.max(values, 0), alpha=0.2)
        ax.set_xlabel("update")
        ax.set_title(panel, fontsize=10)
        ax.grid(alpha=0.3)
    for i in log_panels:
        axes[0][i].set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(summary: dict, path: str) -> None:
    """The numbers as a markdown table (mean [min, max] over seeds)."""
    def cell(s, fmt):
        return f"{s['mean']:{fmt}} [{s['min']:{fmt}}, {s['max']:{fmt}}]"

    lines = ["| setting | reward, last quarter | final pass@1 | KL(sampler, trainer) k3 | mean abs log rho | "
             "outside [0.5, 5] | corrected tokens |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, s in summary.items():
        cells = [cell(s[k], fmt) for k, fmt in (
            ("reward_last_quarter", ".3f"), ("final_pass1_sampled", ".3f"), ("sampler_kl_k3", ".1e"),
            ("sampler_abs_log_ratio", ".1e"), ("sampler_outside_band", ".1e"),
            ("correction_outside_frac", ".1e"))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(study: MismatchConfig) -> dict:
    results, summary = {}, {}
    for label, overrides in SETTINGS.items():
        config = setting_config(study, overrides)
        run_dir = os.path.join(study.out, slug(label))
        print(f"--- {label}: {run_dir}")
        out = lm.train(config, run_dir)
        results[label] = {"metrics": out["metrics"], "final": out["final"]}
        summary[label] = summarise(out["metrics"], out["final"])
    with open(os.path.join(study.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    write_markdown(summary, os.path.join(study.out, "results.md"))
    plot(results, study.figure)
    print(open(os.path.join(study.out, "results.md")).read())
    return summary


if __name__ == "__main__":
    main(tyro.cli(MismatchConfig))
