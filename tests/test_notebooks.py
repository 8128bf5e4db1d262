"""The tutorial notebooks: stored clean, built from their generator, and executed end to end.

Each notebook is run with nbclient on the ``python3`` (ipykernel) kernel with its default small
settings; a cell that raises fails the test. A cell is injected after the ``parameters`` cell
(as papermill does) so that everything the notebook writes lands in the test's temporary folder.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = (
    "01_quickstart.ipynb",
    "02_hessian_spectrum.ipynb",
    "03_loss_landscapes.ipynb",
    "04_which_layers_does_zsharp_select.ipynb",
    "05_compare_checkpoints.ipynb",
    "06_transformer_spectrum_and_zsharp.ipynb",
)
#: Seconds one cell may take, and one whole notebook (kernel start included); the defaults take 15-25 s.
CELL_TIMEOUT = 180
NOTEBOOK_TIMEOUT = 300
#: Modules a notebook may import from sharpscope: the public API only (a notebook is documentation).
PUBLIC_MODULES = {"sharpscope", "sharpscope.plot"}


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK_DIR / name, as_version=4)


def _code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def _python_source(cell: nbformat.NotebookNode) -> str:
    """The cell without IPython magics (``%matplotlib inline``), so that ``ast`` can parse it."""
    return "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))


def test_notebook_folder_holds_exactly_the_listed_notebooks():
    """The committed set of notebooks is the documented one (checked against the list above)."""
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
    """CI guard: no stored outputs or execution counts (checked against the raw nbformat JSON)."""
    nb = _read(name)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, f"{name}: cells {dirty} have outputs or execution counts; clear them before committing"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_structure(name):
    """Title first, then a papermill ``parameters`` cell of plain assignments with OUT_DIR and PROGRESS."""
    nb = _read(name)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), \
        f"{name}: the first cell must be a markdown title"
    params = _code_cells(nb)[0]
    assert "parameters" in params.metadata.get("tags", []), f"{name}: the first code cell must be tagged parameters"
    tree = ast.parse(params.source)
    assert all(isinstance(node, ast.Assign) for node in tree.body), \
        f"{name}: the parameters cell must hold only assignments (papermill overrides them)"
    assigned = {t.id for node in tree.body for t in node.targets if isinstance(t, ast.Name)}
    assert {"OUT_DIR", "PROGRESS"} <= assigned
    assert sum(cell.cell_type == "markdown" for cell in nb.cells) >= 4, f"{name}: explain each step in markdown"
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_uses_only_the_public_api(name):
    """Imports from sharpscope are ``sharpscope``/``sharpscope.plot`` and no private name is reached."""
    for cell in _code_cells(_read(name)):
        source = _python_source(cell)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                if module.split(".")[0] == "sharpscope":
                    assert module in PUBLIC_MODULES, f"{name}: imports private module {module}"
        assert not re.search(r"\b(ss|ssplot|sharpscope)\._", source), f"{name}: uses a private name"


def test_notebooks_match_their_generator():
    """The committed .ipynb files are exactly what notebooks/_build_notebooks.py writes (no hand edits)."""
    spec = importlib.util.spec_from_file_location("_build_notebooks", NOTEBOOK_DIR / "_build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert sorted(module.NOTEBOOKS) == sorted(NOTEBOOKS)
    for name, cells in module.NOTEBOOKS.items():
        expected = nbformat.writes(module.notebook(cells)) + "\n"
        assert (NOTEBOOK_DIR / name).read_text(encoding="utf-8") == expected, \
            f"{name} differs from its generator; run python notebooks/_build_notebooks.py"


def _python3_kernel() -> str:
    """The ``python3`` kernel; registered from ipykernel for this interpreter when no spec is installed."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:  # pragma: no cover - depends on the machine
        from ipykernel.kernelspec import install

        install(user=True, kernel_name="python3", display_name="Python 3 (ipykernel)")
    return "python3"


@pytest.mark.timeout(NOTEBOOK_TIMEOUT)
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, tmp_path):
    """Run the notebook with its default small settings; any cell error fails (nbclient raises)."""
    from nbclient import NotebookClient

    nb = _read(name)
    params_index = nb.cells.index(_code_cells(nb)[0])
    out = tmp_path / "out"
    nb.cells.insert(params_index + 1, nbformat.v4.new_code_cell(f"OUT_DIR = {str(out)!r}"))
    client = NotebookClient(nb, kernel_name=_python3_kernel(), timeout=CELL_TIMEOUT, allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    # Tiny models run fastest on one thread, and parallel test workers must not oversubscribe the cores
    # (on 2 busy cores the default thread count made the five notebooks 2-4x slower); an explicit
    # OMP_NUM_THREADS in the environment wins.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    client.execute(env=env)

    errors = [o for cell in _code_cells(nb) for o in cell.get("outputs", []) if o.output_type == "error"]
    assert not errors
    figures = sorted(p.name for p in out.rglob("*.png"))
    assert figures, f"{name} saved no figure under OUT_DIR"
    shown = sum("image/png" in o.get("data", {}) for cell in _code_cells(nb) for o in cell.get("outputs", []))
    assert shown >= 1, f"{name} displayed no figure inline"
    # Every saved figure also comes as PDF (save_figure's default formats).
    assert all((p.with_suffix(".pdf")).is_file() for p in out.rglob("*.png"))

