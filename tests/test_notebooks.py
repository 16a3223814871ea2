"""The tutorial notebooks: saved without outputs, each with a parameters cell, and each runs top to bottom.

Execution injects ``QUICK = True`` (CI-sized runs) after the cell tagged ``parameters`` and runs the notebook with
nbclient in a kernel of *this* interpreter (a kernelspec written to a temporary folder points at
``sys.executable``), with ``UNIVERSAL_CACHE_DIR`` in a temporary folder. Every notebook ends with a cell of
assertions about what it teaches (e.g. notebook 3: masked training beats naive training on the classes other
datasets leave unlabelled) and prints ``CHECKS PASSED <nn>``; the test fails on any cell error or when that line
is missing.

Each notebook is a Jupytext pair: ``notebooks/NN_name.py`` (percent format, the source that is edited, reviewed and
linted by ruff) and ``notebooks/NN_name.ipynb`` (what students open). ``test_notebook_and_source_agree`` fails when
one was edited without the other (``make notebooks`` re-syncs them).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
EXPECTED = [
    "01_taxonomy_and_partial_labels.ipynb",
    "02_prompts_and_text_embeddings.ipynb",
    "03_masked_backprop.ipynb",
    "04_pseudo_labels.ipynb",
    "05_inference_and_evaluation.ipynb",
]
KERNEL_NAME = "universal-test-python"


def _read(path: Path):
    import nbformat

    return nbformat.read(path, as_version=4)


def _cell_view(nb) -> list[tuple[str, str, list[str]]]:
    """What must agree between a notebook and its Jupytext source: each cell's type, source and tags."""
    return [(c.cell_type, c.source, list(c.metadata.get("tags", []))) for c in nb.cells]


def _disagreements(source, notebook) -> list[str]:
    """How the notebook read from a ``.py`` source and the ``.ipynb`` differ (empty when they agree)."""
    problems = []
    if source.metadata.get("kernelspec") != notebook.metadata.get("kernelspec"):
        problems.append(
            f"kernelspec: {source.metadata.get('kernelspec')} (.py) != {notebook.metadata.get('kernelspec')} (.ipynb)"
        )
    a, b = _cell_view(source), _cell_view(notebook)
    if len(a) != len(b):
        problems.append(f"{len(a)} cells in the .py, {len(b)} in the .ipynb")
    for i, (x, y) in enumerate(zip(a, b)):
        for what, u, v in zip(("type", "source", "tags"), x, y):
            if u != v and what == "source":  # name the first line that differs
                pairs = list(zip([*u.splitlines(), "<end>"], [*v.splitlines(), "<end>"]))
                line = next((k for k, (s, t) in enumerate(pairs) if s != t), None)
                problems.append(
                    f"cell {i} source: {u!r} (.py) != {v!r} (.ipynb)"
                    if line is None  # only line endings differ
                    else f"cell {i} source line {line + 1}: {pairs[line][0]!r} (.py) != {pairs[line][1]!r} (.ipynb)"
                )
            elif u != v:
                problems.append(f"cell {i} {what}: {u!r} (.py) != {v!r} (.ipynb)")
    return problems


def _parameters_index(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected exactly one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


# ---------------------------------------------------------------------------------------------------- cheap
def test_all_tutorials_are_there():
    assert [p.name for p in NOTEBOOKS] == EXPECTED
    readme = (NOTEBOOK_DIR / "README.md").read_text(encoding="utf-8")
    for name in EXPECTED:
        assert name in readme


def test_every_notebook_has_its_jupytext_source():
    sources = sorted(p.name for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
    assert sources == [n.replace(".ipynb", ".py") for n in EXPECTED]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_notebook_and_source_agree(path):
    """The .py (percent format) and the .ipynb hold the same cells; run `make notebooks` after editing either."""
    import jupytext

    source_path = path.with_suffix(".py")
    source = jupytext.read(source_path)
    notebook = _read(path)
    for nb, name in ((notebook, path.name), (source, source_path.name)):
        assert "py:percent" in nb.metadata.get("jupytext", {}).get("formats", ""), f"{name}: not paired"
    problems = _disagreements(source, notebook)
    assert not problems, (
        f"{source_path.name} and {path.name} disagree - edit the .py, then run `make notebooks` "
        "(.venv/bin/jupytext --sync notebooks/*.py):\n" + "\n".join(problems[:10])
    )


def test_the_agreement_check_catches_one_sided_edits():
    """The check above is not vacuous: an edit to either side of a pair (a source line, a tag, a cell) is caught."""
    import jupytext

    path = NOTEBOOKS[0]
    source = jupytext.read(path.with_suffix(".py"))
    assert _disagreements(source, _read(path)) == []

    edited = _read(path)
    edited.cells[-1].source += "\nprint('edited in Jupyter only')"
    assert any("source" in p for p in _disagreements(source, edited))

    untagged = _read(path)
    untagged.cells[_parameters_index(untagged)].metadata["tags"] = []
    assert any("tags" in p for p in _disagreements(source, untagged))

    text = path.with_suffix(".py").read_text(encoding="utf-8") + "\n# %%\nprint('added to the .py only')\n"
    assert any("cells" in p for p in _disagreements(jupytext.reads(text, fmt="py:percent"), _read(path)))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_saved_without_outputs_and_parameterised(path):
    nb = _read(path)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} of {path.name} has saved outputs: strip them"
            assert cell.execution_count is None, f"cell {i} of {path.name} has an execution count"
    params = nb.cells[_parameters_index(nb)]
    assert params.cell_type == "code" and "QUICK = True" in params.source
    assert "_DIR = None" in params.source  # a data/work folder parameter
    assert nb.metadata.get("kernelspec", {}).get("language") == "python"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_notebooks_define_no_library_code(path):
    """Notebooks call the universal API; the only functions they define are small plotting/config helpers."""
    nb = _read(path)
    allowed = {"rgb", "heatmap", "closest_pairs", "config"}
    defined = set()
    for cell in nb.cells:
        if cell.cell_type == "code":
            for line in cell.source.splitlines():
                if line.startswith("def ") or line.startswith("class "):
                    defined.add(line.split()[1].split("(")[0].rstrip(":"))
    assert defined <= allowed, f"{path.name} defines {sorted(defined - allowed)}"
    sources = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "import universal" in sources


# ------------------------------------------------------------------------------------------------- execution
@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernelspec for this interpreter in a temporary JUPYTER_PATH (the notebooks run in this venv)."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "universal tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return root


def _execute(path: Path, jupyter_path: Path, cache: Path, inject: str, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = _read(path)
    i = _parameters_index(nb)
    check = f"import sys as _sys\nassert _sys.prefix == {sys.prefix!r}, _sys.prefix  # the kernel runs in this venv"
    injected = nbformat.v4.new_code_cell(inject + "\n" + check)
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(i + 1, injected)
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    monkeypatch.setenv("UNIVERSAL_CACHE_DIR", str(cache))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    if "OMP_NUM_THREADS" not in os.environ and (os.cpu_count() or 1) <= 2:
        # on a small shared machine one intra-op thread avoids oversubscription stalls (several times faster)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
    client = NotebookClient(
        nb, timeout=600, kernel_name=KERNEL_NAME, resources={"metadata": {"path": str(NOTEBOOK_DIR)}}
    )
    t0 = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as err:  # keep the failing cell's traceback in the report
        pytest.fail(f"{path.name} failed:\n{str(err)[-4000:]}")
    seconds = time.perf_counter() - t0
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text.append(out.get("text", ""))
            elif out.get("output_type") in ("execute_result", "display_data"):
                text.append(str(out.get("data", {}).get("text/plain", "")))
    return nb, "\n".join(text), seconds


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_notebook_runs(path, kernel_env, tmp_path, monkeypatch):
    saved = _read(path)
    inject = "QUICK = True"
    if "WORK_DIR = None" in saved.cells[_parameters_index(saved)].source:
        # synthetic datasets and training runs go to pytest's tmp_path instead of a new temporary folder
        inject += f"\nWORK_DIR = {str(tmp_path / 'work')!r}"
    nb, text, seconds = _execute(path, kernel_env, tmp_path / "cache", inject, monkeypatch)
    number = path.name[:2]
    assert f"CHECKS PASSED {number}" in text, f"{path.name}: the checks cell did not report success"
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert images >= 3, f"{path.name} produced only {images} figures"
    print(f"{path.name}: {seconds:.0f} s")


@pytest.mark.notebook
@pytest.mark.slow
def test_notebook_01_phantom_fallback(kernel_env, tmp_path, monkeypatch):
    """Without ../shared/data the first notebook builds the same lesson from the synthetic phantom."""
    path = NOTEBOOK_DIR / EXPECTED[0]
    inject = f"QUICK = True\nDATA_DIR = {str(tmp_path / 'no-such-folder')!r}"
    _, text, _ = _execute(path, kernel_env, tmp_path / "cache", inject, monkeypatch)
    assert "CHECKS PASSED 01" in text and "'real_data': False" in text
