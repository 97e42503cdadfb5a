"""Where the KL reference sits: fixed at the warm start, synced every k updates, or an EMA of iterates.

    python -m experiments.reference_point               # 3 settings x 3 seeds (a few minutes on 2 CPU cores)
    python -m experiments.reference_point --num-seeds 2 --num-updates 20

GRPO on `reverse` with a strong KL penalty (k3, beta 1 by default), one `experiments.lm` run per setting of
`LMConfig.reference` (`losses.ReferenceConfig`, TRL's `sync_ref_model` / `ref_model_sync_steps` /
`ref_model_mixup_alpha`):

- `fixed`: pi_ref is the warm start throughout (the usual RLHF anchor);
- `sync every 5`: pi_ref <- pi_theta every 5 updates;
- `EMA every 1, alpha 0.2`: pi_ref <- 0.2 pi_theta + 0.8 pi_ref after every update (Gorbatovski et al.
  2024, "Learn Your Reference Model for Real Good Alignment", eq. 5).

The proximal-point reading (note 000): the KL term pulls each update back towards the anchor. A fixed
anchor bounds the drift from the start, so KL to the initial policy should stay smallest; a moving one
bounds only the drift since its last move. Logged: `kl_to_initial` (k3 estimate of KL(pi_theta ||
pi_warm) on the batch), `kl_ref` (the penalised KL, to the current anchor) and the training reward. Runs
go to `<out>/<setting>`, the numbers to `<out>/results.json` / `results.md`, the figure to
`docs/figures/reference.png`.
"""

import dataclasses
import json
import os

import numpy as np
import tyro

from experiments import lm, mismatch
from polygrad import losses

SETTINGS = {
    "fixed": losses.ReferenceConfig("fixed"),
    "sync every 5": losses.ReferenceConfig("sync", every=5),
    "EMA every 1, alpha 0.2": losses.ReferenceConfig("ema", every=1, alpha=0.2),
}

CURVES = (("reward", "training reward"), ("kl_to_initial", "KL(pi_theta || pi_initial), k3"),
          ("kl_ref", "KL(pi_theta || pi_ref), the penalised term"))


@dataclasses.dataclass(frozen=True)
class ReferenceStudyConfig(mismatch.MismatchConfig):
    """The study's size (as the mismatch study's) and where it writes."""

    kl_coef: float = 1.0
    """beta of the k3 KL penalty to pi_ref."""
    out: str = "runs/reference_point"
    """output folder (run folders, results.json, results.md)."""
    figure: str = "docs/figures/reference.png"
    """where the figure goes."""


def setting_config(study: ReferenceStudyConfig, reference: losses.ReferenceConfig) -> lm.LMConfig:
    """The `experiments.lm` config of one setting (the mismatch study's small model, float32 sampler)."""
    return lm.default_config("grpo", num_seeds=study.num_seeds, num_updates=study.num_updates,
                             updates_per_chunk=study.num_updates,
                             warm_start_dir=os.path.join(study.out, "warm"), reference=reference,
                             **{"loss.kl_coef": study.kl_coef}, **mismatch.COMMON)


def main(study: ReferenceStudyConfig) -> dict:
    results, summary = {}, {}
    for label, reference in SETTINGS.items():
        run_dir = os.path.join(study.out, f"beta{study.kl_coef:g}", mismatch.slug(label))
        print(f"--- {label}: {run_dir}")
        out = lm.train(setting_config(study, reference), run_dir)
        m = out["metrics"]
        quarter = max(1, m["reward"].shape[1] // 4)
        results[label] = {"metrics": m}
        summary[label] = {
            "reward_last_quarter": mismatch.spread(np.mean(m["reward"][:, -quarter:], axis=1)),
            "kl_to_initial_final": mismatch.spread(np.mean(m["kl_to_initial"][:, -quarter:], axis=1)),
            "kl_ref_last_quarter": mismatch.spread(np.mean(m["kl_ref"][:, -quarter:], axis=1)),
            "final_pass1_sampled": mismatch.spread(out["final"]["pass1_sampled"]),
        }
    with open(os.path.join(study.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    lines = ["| reference | reward, last quarter | final pass@1 | KL to initial, last quarter | "
             "KL to pi_ref, last quarter |", "| --- | --- | --- | --- | --- |"]
    for label, s in summary.items():
        cells = [f"{s[k]['mean']:{fmt}} [{s[k]['min']:{fmt}}, {s[k]['max']:{fmt}}]" for k, fmt in
                 (("reward_last_quarter", ".3f"), ("final_pass1_sampled", ".3f"),
                  ("kl_to_initial_final", ".4f"), ("kl_ref_last_quarter", ".4f"))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    with open(os.path.join(study.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    title = f"Where the KL reference sits: GRPO on reverse, beta {study.kl_coef:g} (mean, min-max over seeds)"
    mismatch.plot(results, study.figure, CURVES, title, log_panels=())
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main(tyro.cli(ReferenceStudyConfig))
