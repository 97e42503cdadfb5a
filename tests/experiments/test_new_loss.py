"""The README's "Adding a new loss", followed literally on a copy of the repository: one part in
polygrad/losses/parts.py, one preset in polygrad/losses/presets.py, then the command line runs it."""

import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _readme_blocks():
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    section = text[text.index("## Adding a new loss"):text.index("## Results")]
    return dict(re.findall(r"```(?:python|bash)\n# in (\S+)\n(.*?)```", section, re.S)), section


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_readme_example_runs_from_the_command_line(tmp_path):
    blocks, section = _readme_blocks()
    assert set(blocks) == {"polygrad/losses/parts.py", "polygrad/losses/presets.py"}
    copy = tmp_path / "repo"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__"))
    for path, code in blocks.items():
        with open(copy / path, "a") as f:
            f.write("\n\n" + code)
    command = re.search(r"```bash\n(python -m experiments\.lm --algo capped_grpo[^\n]*)\n```", section).group(1)
    tiny = ["--num-seeds", "1", "--num-updates", "2", "--sft-steps", "5", "--corpus-size", "64", "--d-model", "16",
            "--num-layers", "1", "--num-prompts", "4", "--group-size", "2", "--num-minibatches", "1",
            "--eval-prompts", "0", "--final-eval-prompts", "4", "--pass-k", "2", "--run-dir", str(tmp_path / "run")]
    proc = subprocess.run([sys.executable, *command.split()[1:], *tiny], cwd=copy, capture_output=True, text=True,
                          timeout=550, env={**os.environ, "PYTHONPATH": str(copy)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "run" / "config.json") as f:
        config = f.read()
    assert '"CappedClip"' in config and '"delta": 2.0' in config
