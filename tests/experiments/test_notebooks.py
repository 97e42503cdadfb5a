"""Every walkthrough notebook runs top to bottom (nbclient, kernel "python3" = the venv's ipykernel, from the
repository root).

Add a notebook by appending its path to NOTEBOOKS; paths that do not exist yet are left out.
"""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = [
    "notebooks/01_pathologies.ipynb",
    "notebooks/02_classic_control.ipynb",
    "notebooks/03_grpo_family.ipynb",
    "notebooks/04_rlhf.ipynb",
]


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if (ROOT / p).exists()])
def test_notebook_runs(path):
    notebook = nbformat.read(ROOT / path, as_version=4)
    resources = {"metadata": {"path": str(ROOT)}}  # the kernel's working directory
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources=resources).execute()
    # execute() raises CellExecutionError (with the cell and its traceback) if a cell fails.
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code_cells)
    assert not [out for cell in code_cells for out in cell.outputs if out.output_type == "error"]
