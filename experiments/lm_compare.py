"""Each GRPO-family paper's mechanism, tested on the toy tasks: presets x tasks x seeds, one figure per claim.

    python -m experiments.lm_compare                         # every claim (about 30 min on 2 CPU cores)
    python -m experiments.lm_compare --claims dapo_dynamic_sampling --num-seeds 2

Claims (003 section 5; the papers):

- `dr_grpo_length` (Dr. GRPO, 003 eq. 98-100): GRPO's per-response 1/|o| normalisation weakens the push
  against long wrong answers, so their length grows; Dr. GRPO's constant normaliser does not. grpo (with
  its KL term off, to isolate the aggregation and the std scaling) vs dr_grpo on `scratchpad_sum`.
- `dapo_clip_higher` (DAPO, 003 eq. 101): a larger eps_high keeps the entropy up and pass@k higher on
  `constrained_string`, where many answers are right. dapo with eps_high 0.2 vs 0.28, 4 epochs.
- `dapo_dynamic_sampling` (DAPO, section 5.4.2 (2)): with dynamic sampling every step trains on groups
  that carry signal. Effective prompts per step with and without it on `reverse`.
- `gspo_ratio_variance` (GSPO, 003 eq. 93, 107): the variance of token ratios against the sequence
  (geometric-mean) ratios by response length, after the update epochs, on `scratchpad_sum`.
- `gspo_clip_sweep`: GSPO's clip range 3e-4 was tuned for responses thousands of tokens long; a sweep on
  `reverse`.
- `sapo_tau_neg` (SAPO, 003 eq. 117-118): tau_neg in {0.95, 1.0, 1.05} on `reverse`.

Runs go to `<out>/<claim>/<label>` (resumable `experiments.lm` run folders sharing warm starts in
`<out>/warm`), figures to `<out>/<claim>.png`, and the numbers to `<out>/results.md`.
"""

import dataclasses
import json
import os

import numpy as np
import tyro

from experiments import lm


@dataclasses.dataclass(frozen=True)
class Claim:
    """A mechanism to test: a task, labelled runs (LMConfig overrides) and what to plot."""

    title: str
    task: str
    runs: dict
    curves: tuple[str, ...]
    common: dict = dataclasses.field(default_factory=dict)


CLAIMS = {
    "dr_grpo_length": Claim(
        "Dr. GRPO: length of incorrect answers, scratchpad_sum", "scratchpad_sum",
        {"grpo (kl 0)": dict(algo="grpo", **{"loss.kl_coef": 0.0}), "dr_grpo": dict(algo="dr_grpo")},
        ("length_incorrect", "length_correct", "eval_pass1_sampled", "truncation_rate")),
    "dapo_clip_higher": Claim(
        "DAPO clip-higher: entropy and pass@k, constrained_string", "constrained_string",
        {f"eps_high {e:g}": dict(algo="dapo", **{"loss.gate.eps_high": e}) for e in (0.2, 0.28)},
        ("sample_entropy", "eval_pass1_sampled", "clip_frac_high", "clip_frac_low"),
        dict(num_epochs=4)),
    "dapo_dynamic_sampling": Claim(
        "DAPO dynamic sampling: effective prompts per step, reverse", "reverse",
        {"without": dict(algo="dapo"), "with": dict(algo="dapo", dynamic_sampling=True)},
        ("effective_prompts", "sampling_rounds", "eval_pass1_sampled", "zero_variance_groups")),
    "gspo_ratio_variance": Claim(
        "GSPO: token vs sequence ratio variance by response length, scratchpad_sum", "scratchpad_sum",
        {"grpo (kl 0)": dict(algo="grpo", **{"loss.kl_coef": 0.0}), "gspo": dict(algo="gspo")},
        ("eval_pass1_sampled",), dict(num_epochs=2)),
    "gspo_clip_sweep": Claim(
        "GSPO clip range sweep, reverse", "reverse",
        {f"clip {c:g}": dict(algo="gspo", **{"loss.gate.eps_low": c, "loss.gate.eps_high": c}) for c in (3e-4, 3e-3, 3e-2, 0.2)},
        ("eval_pass1_sampled", "clip_frac_low", "clip_frac_high")),
    "sapo_tau_neg": Claim(
        "SAPO tau_neg, reverse", "reverse",
        {f"tau_neg {t:g}": dict(algo="sapo", **{"loss.gate.tau_neg": t}) for t in (0.95, 1.0, 1.05)},
        ("eval_pass1_sampled", "sample_entropy", "gate_mean")),
}

# Base corpus knobs per task, chosen so that the warm start is imperfect in the way each claim needs.
TASK_KNOBS = {
    "reverse": {"n_min": 3, "n_max": 8},
    "scratchpad_sum": {"k_min": 2, "k_max": 4, "corpus_step_noise": 0.1, "corpus_filler_max": 3},
    "constrained_string": {"n_min": 3, "n_max": 8, "corpus_token_noise": 0.1},
}


# Supervised steps of the warm start where lm.LMConfig's default (800) is not enough: scratchpad_sum needs
# more to learn the running sum.
SFT_STEPS = {"scratchpad_sum": 1500}


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    claims: tuple[str, ...] = tuple(CLAIMS)
    """which claims to run (names of CLAIMS)."""
    num_seeds: int = 3
    num_updates: int = 40
    learning_rate: float = 3e-4
    out: str = "runs/lm_compare"
    """output folder."""

    def __post_init__(self):
        unknown = sorted(set(self.claims) - set(CLAIMS))
        if unknown:
            raise ValueError(f"bad config: unknown claims {unknown}; choose from {sorted(CLAIMS)}")


def run_config(compare: CompareConfig, claim: Claim, overrides: dict) -> lm.LMConfig:
    overrides = dict(overrides)
    return lm.default_config(overrides.pop("algo"), task=claim.task, task_knobs=json.dumps(TASK_KNOBS[claim.task]),
                             num_seeds=compare.num_seeds, num_updates=compare.num_updates,
                             learning_rate=compare.learning_rate, warm_start_dir=os.path.join(compare.out, "warm"),
                             **({"sft_steps": SFT_STEPS[claim.task]} if claim.task in SFT_STEPS else {}),
                             **claim.common, **overrides)


def _mean_curve(values: np.ndarray) -> np.ndarray:
    return np.nanmean(values, axis=0)


def plot_claim(name: str, claim: Claim, results: dict, path: str) -> None:
    """One row of panels (one per curve metric; seed mean with min-max band); for the GSPO variance claim,
    bars of the token and sequence ratio variances per response-length bucket."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(claim.curves)
    extra = 1 if name == "gspo_ratio_variance" else 0
    columns = len(panels) + extra
    fig, axes = plt.subplots(1, columns, figsize=(4.2 * columns, 3.4), squeeze=False)
    for ax, metric in zip(axes[0], panels, strict=False):
        for label, result in results.items():
            values = np.asarray(result["metrics"][metric])
            steps = np.arange(1, values.shape[1] + 1)
            ax.plot(steps, _mean_curve(values), label=label)
            ax.fill_between(steps, np.nanmin(values, 0), np.nanmax(values, 0), alpha=0.2)
        ax.set_xlabel("update")
        ax.set_title(metric, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if extra:
        ax = axes[0][-1]
        width = 0.2
        for j, (label, result) in enumerate(results.items()):
            m = result["metrics"]
            buckets = range(lm.NUM_LENGTH_BUCKETS)
            token = [np.nanmean(m[f"token_ratio_var_len{b}"]) for b in buckets]
            seq = [np.nanmean(m[f"seq_ratio_var_len{b}"]) for b in buckets]
            x = np.arange(lm.NUM_LENGTH_BUCKETS)
            ax.bar(x + (2 * j - 1.5) * width, token, width, label=f"{label}: token r")
            ax.bar(x + (2 * j - 0.5) * width, seq, width, label=f"{label}: sequence s")
        ax.set_yscale("log")
        ax.set_xticks(np.arange(lm.NUM_LENGTH_BUCKETS))
        ax.set_xticklabels([f"len q{b + 1}" for b in range(lm.NUM_LENGTH_BUCKETS)])
        ax.set_title("ratio variance after the update", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(claim.title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise(name: str, claim: Claim, results: dict) -> list[str]:
    """Markdown table rows: final held-out metrics (mean over seeds) and the claim's curve metrics
    averaged over the last quarter of updates."""
    lines = [f"### {claim.title}", "",
             "| run | start pass@1 | pass@1 sampled | pass@1 greedy | pass@k | entropy | length wrong | "
             + " | ".join(f"{m} (last 25%)" for m in claim.curves) + " |",
             "|---" * (7 + len(claim.curves)) + "|"]
    for label, result in results.items():
        final = {k: float(np.mean(v)) for k, v in result["final"].items()}
        pass_k = next(v for k, v in final.items() if k.startswith("pass") and k[4:].isdigit())
        tail = []
        for metric in claim.curves:
            values = np.asarray(result["metrics"][metric])
            tail.append(float(np.nanmean(values[:, -max(1, values.shape[1] // 4):])))
        lines.append(f"| {label} | {result['warm_start']['pass1_sampled']:.2f} | "
                     f"{final['pass1_sampled']:.3f} | "
                     f"{final['pass1_greedy']:.3f} | {pass_k:.3f} | {final['entropy']:.3f} | "
                     f"{final['length_incorrect']:.1f} | " + " | ".join(f"{v:.3g}" for v in tail) + " |")
    if name == "gspo_ratio_variance":
        lines += ["", "| run | " + " | ".join(f"token var q{b + 1} | seq var q{b + 1}"
                                             for b in range(lm.NUM_LENGTH_BUCKETS)) + " |",
                  "|---" * (1 + 2 * lm.NUM_LENGTH_BUCKETS) + "|"]
        for label, result in results.items():
            m = result["metrics"]
            cells = [f"{np.nanmean(m[f'token_ratio_var_len{b}']):.2e} | "
                     f"{np.nanmean(m[f'seq_ratio_var_len{b}']):.2e}" for b in range(lm.NUM_LENGTH_BUCKETS)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(compare: CompareConfig) -> None:
    os.makedirs(compare.out, exist_ok=True)
    report = ["## GRPO family on toy tasks: numbers", "",
              f"{compare.num_seeds} seeds, {compare.num_updates} updates per run; held-out prompts; "
              "written by `python -m experiments.lm_compare`.", ""]
    for name in compare.claims:
        claim = CLAIMS[name]
        results = {}
        for label, overrides in claim.runs.items():
            config = run_config(compare, claim, overrides)
            run_dir = os.path.join(compare.out, name, label.replace(" ", "_"))
            print(f"== {name}: {label}")
            results[label] = lm.train(config, run_dir)
        path = os.path.join(compare.out, f"{name}.png")
        plot_claim(name, claim, results, path)
        report += summarise(name, claim, results) + [f"![{claim.title}]({name}.png)", ""]
        with open(os.path.join(compare.out, "results.md"), "w") as f:
            f.write("\n".join(report))
        print(f"figure: {path}")


if __name__ == "__main__":
    main(tyro.cli(CompareConfig))
