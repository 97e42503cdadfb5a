"""Every walkthrough notebook runs top to bottom (nbclient, kernel python3, from the repository root)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOKS = [
    "notebooks/03_grpo_family.ipynb",
]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS)
def test_notebook_runs(path):
    notebook = nbformat.read(os.path.join(ROOT, path), as_version=4)
    resources = {"metadata": {"path": ROOT}}  # the kernel's working directory
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources=resources)
    client.execute()
