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

Exercises follow one contract in every notebook (``test_exercises_follow_the_contract`` checks it statically; the
execution tests run with ``RUN_SOLUTIONS = True`` injected and require every check cell to print
``exercise N: correct``). The parameters cell sets ``RUN_SOLUTIONS = False``; per exercise N, in this order (markdown
cells may come between them, no other code cell):

- a code cell tagged ``exercise`` with the line ``answer_N = None  # your answer here``;
- a code cell tagged ``solution``, source-hidden (cell metadata ``jupyter: {source_hidden: true}``; in the ``.py``:
  ``# %% jupyter={"source_hidden": true} tags=["solution"]``), that is one ``if RUN_SOLUTIONS:`` block assigning
  ``answer_N``;
- a code cell tagged ``check`` that is one ``if answer_N is None:`` block printing ``exercise N: not answered yet``,
  with an ``else:`` that checks the answer by ``assert <condition>, <message for the student>`` against values the
  notebook computes (never a typed number) and then prints ``exercise N: correct``.

Exercises are numbered 1, 2, ... in order; a notebook without exercises has none of these cells.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
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


def _source_hidden(cell) -> bool:
    return bool(cell.metadata.get("jupyter", {}).get("source_hidden", False))


def _cell_view(nb) -> list[tuple[str, str, list[str], bool]]:
    """What must agree between a notebook and its Jupytext source: each cell's type, source, tags, source-hidden."""
    return [(c.cell_type, c.source, list(c.metadata.get("tags", [])), _source_hidden(c)) for c in nb.cells]


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
        for what, u, v in zip(("type", "source", "tags", "source_hidden"), x, y):
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


EXERCISE_ROLES = ("exercise", "solution", "check")


def _role(cell) -> str | None:
    roles = [t for t in cell.metadata.get("tags", []) if t in EXERCISE_ROLES]
    return roles[0] if len(roles) == 1 else ("+".join(roles) or None)


def _only_if(source: str, test: str) -> ast.If | None:
    """The cell's single top-level ``if <test>:`` statement, or None when the cell is anything else."""
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return None
    if len(body) == 1 and isinstance(body[0], ast.If) and ast.unparse(body[0].test) == test:
        return body[0]
    return None


def _assigns(node: ast.AST, name: str) -> bool:
    """Whether ``name`` is assigned anywhere inside ``node`` (``=``, ``+=``, annotated, or a tuple target)."""
    for statement in ast.walk(node):
        if isinstance(statement, ast.Assign):
            targets = statement.targets
        elif isinstance(statement, (ast.AugAssign, ast.AnnAssign)):
            targets = [statement.target]
        else:
            continue
        if any(isinstance(n, ast.Name) and n.id == name for t in targets for n in ast.walk(t)):
            return True
    return False


def _unanswered_output(source: str, number: int) -> str:
    """What a check cell prints while ``answer_N`` is still None (its ``if answer_N is None:`` branch only)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source, f"<check cell of exercise {number}>", "exec"), {f"answer_{number}": None})  # noqa: S102
    return out.getvalue()


def _exercise_problems(nb) -> list[str]:
    """How a notebook breaks the exercise contract of the module docstring (empty when it keeps it)."""
    problems = []
    params = nb.cells[_parameters_index(nb)].source
    if not re.search(r"^RUN_SOLUTIONS = False\b", params, re.M):
        problems.append("the parameters cell must set RUN_SOLUTIONS = False")
    code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    numbers, k = [], 0
    while k < len(code):
        i, cell = code[k]
        role = _role(cell)
        if role is None:
            k += 1
            continue
        if role != "exercise":
            problems.append(
                f"cell {i}: a {role!r} cell that does not follow an 'exercise' cell and its solution"
            )
            k += 1
            continue
        found = re.findall(r"^answer_(\d+) = None\b", cell.source, re.M)
        if len(found) != 1:
            problems.append(
                f"cell {i}: an exercise cell needs exactly one line 'answer_N = None  # your answer here'"
            )
            k += 1
            continue
        n = int(found[0])
        numbers.append(n)
        triple = code[k : k + 3]
        roles = [_role(c) for _, c in triple]
        if roles[1:] != ["solution", "check"]:
            problems.append(
                f"exercise {n} (cell {i}): the next code cells must be tagged 'solution', then 'check'"
            )
            k += 1
            continue
        (j, solution), (m, check) = triple[1], triple[2]
        if not _source_hidden(solution):
            problems.append(
                f"exercise {n}: its solution (cell {j}) must be source-hidden (jupyter.source_hidden)"
            )
        block = _only_if(solution.source, "RUN_SOLUTIONS")
        if block is None or not _assigns(block, f"answer_{n}"):
            problems.append(
                f"exercise {n}: its solution (cell {j}) must be one 'if RUN_SOLUTIONS:' block assigning answer_{n}"
            )
        block = _only_if(check.source, f"answer_{n} is None")
        if block is None:
            problems.append(
                f"exercise {n}: its check (cell {m}) must be one 'if answer_{n} is None:' ... 'else:' block"
            )
        else:
            if not any(
                isinstance(a, ast.Assert) and a.msg is not None for e in block.orelse for a in ast.walk(e)
            ):
                problems.append(
                    f"exercise {n}: its check (cell {m}) needs an 'assert condition, message' in 'else:'"
                )
            if f"exercise {n}: correct" not in check.source:
                problems.append(f"exercise {n}: its check (cell {m}) must print 'exercise {n}: correct'")
            try:
                said = _unanswered_output(check.source, n)
            except Exception as err:  # noqa: BLE001 - reported as a contract problem
                said = f"{type(err).__name__}: {err}"
            if f"exercise {n}: not answered yet" not in said:
                problems.append(
                    f"exercise {n}: with answer_{n} = None its check must print "
                    f"'exercise {n}: not answered yet', it printed {said.strip()!r}"
                )
        k += 3
    if numbers != list(range(1, len(numbers) + 1)):
        problems.append(f"exercises must be numbered 1, 2, ... in order, found {numbers}")
    return problems


def _check_cells(nb) -> list[tuple[int, object]]:
    """(exercise number, cell) of every check cell."""
    found = []
    for cell in nb.cells:
        if _role(cell) == "check":
            m = re.search(r"\banswer_(\d+) is None", cell.source)
            found.append((int(m.group(1)) if m else -1, cell))
    return found


def _cell_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def _unsolved(executed) -> list[str]:
    """The check cells of an executed notebook (RUN_SOLUTIONS = True) that did not print 'exercise N: correct'."""
    return [
        f"exercise {n}: its check printed {_cell_text(cell).strip()[-300:]!r}"
        for n, cell in _check_cells(executed)
        if f"exercise {n}: correct" not in _cell_text(cell)
    ]


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
    assert "RUN_SOLUTIONS = False" in params.source  # the exercise contract (module docstring)
    assert nb.metadata.get("kernelspec", {}).get("language") == "python"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_exercises_follow_the_contract(path):
    """exercise -> hidden solution -> check, per exercise (see the module docstring); zero exercises is fine."""
    problems = _exercise_problems(_read(path))
    assert not problems, f"{path.name} breaks the exercise contract:\n" + "\n".join(problems)


def test_the_exercise_contract_check_catches_mistakes():
    """The contract check is not vacuous: each way of breaking the contract is reported."""
    import nbformat

    def notebook(*cells):
        nb = nbformat.v4.new_notebook()
        params = nbformat.v4.new_code_cell("QUICK = True\nDATA_DIR = None\nRUN_SOLUTIONS = False")
        params.metadata["tags"] = ["parameters"]
        nb.cells = [params]
        for tag, source in cells:
            cell = nbformat.v4.new_code_cell(source) if tag != "md" else nbformat.v4.new_markdown_cell(source)
            if tag not in ("md", None):
                cell.metadata["tags"] = [tag]
            if tag == "solution":
                cell.metadata["jupyter"] = {"source_hidden": True}
            nb.cells.append(cell)
        return nb

    exercise = ("exercise", "answer_1 = None  # your answer here")
    solution = ("solution", "if RUN_SOLUTIONS:\n    answer_1 = 2")
    check = (
        "check",
        "if answer_1 is None:\n    print('exercise 1: not answered yet')\n"
        "else:\n    assert answer_1 == 1 + 1, 'add again'\n    print('exercise 1: correct')",
    )
    good = notebook(exercise, ("md", "text between"), solution, check)
    assert _exercise_problems(good) == [] and _exercise_problems(notebook()) == []

    visible = notebook(exercise, solution, check)
    visible.cells[2].metadata.pop("jupyter")
    no_flag = notebook(exercise, solution, check)
    no_flag.cells[0].source = "QUICK = True\nDATA_DIR = None"
    broken = {
        "source-hidden": visible,
        "RUN_SOLUTIONS = False": no_flag,
        "'solution', then 'check'": notebook(exercise, check, solution),
        "does not follow": notebook(solution, check),
        "one 'if RUN_SOLUTIONS:'": notebook(exercise, ("solution", "answer_1 = 2"), check),
        "'assert condition, message'": notebook(
            exercise, solution, ("check", check[1].replace(", 'add again'", ""))
        ),
        "not answered yet": notebook(
            exercise, solution, ("check", check[1].replace("not answered yet", "todo"))
        ),
        "numbered 1, 2": notebook(
            *[
                (t, s.replace("answer_1", "answer_2").replace("exercise 1", "exercise 2"))
                for t, s in (exercise, solution, check)
            ]
        ),
    }
    for expected, nb in broken.items():
        problems = _exercise_problems(nb)
        assert any(expected in p for p in problems), f"{expected!r} not reported: {problems}"

    ran = notebook(exercise, solution, check)
    ran.cells[3].outputs = [nbformat.v4.new_output("stream", text="exercise 1: not answered yet\n")]
    assert _unsolved(ran) and not _unsolved(notebook())
    ran.cells[3].outputs = [nbformat.v4.new_output("stream", text="exercise 1: correct\n")]
    assert _unsolved(ran) == []


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
    inject = (
        "QUICK = True\nRUN_SOLUTIONS = True"  # the solution cells fill in the answers; every check must pass
    )
    if "WORK_DIR = None" in saved.cells[_parameters_index(saved)].source:
        # synthetic datasets and training runs go to pytest's tmp_path instead of a new temporary folder
        inject += f"\nWORK_DIR = {str(tmp_path / 'work')!r}"
    nb, text, seconds = _execute(path, kernel_env, tmp_path / "cache", inject, monkeypatch)
    number = path.name[:2]
    assert f"CHECKS PASSED {number}" in text, f"{path.name}: the checks cell did not report success"
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert images >= 3, f"{path.name} produced only {images} figures"
    checks, correct = len(_check_cells(saved)), len(re.findall(r"^exercise \d+: correct$", text, re.M))
    assert not _unsolved(nb) and correct == checks, (
        f"{path.name}: {correct} of {checks} exercise checks printed 'exercise N: correct' with RUN_SOLUTIONS = True:\n"
        + "\n".join(_unsolved(nb))
    )
    print(f"{path.name}: {seconds:.0f} s, {checks} exercises solved")


@pytest.mark.notebook
@pytest.mark.slow
def test_notebook_01_phantom_fallback(kernel_env, tmp_path, monkeypatch):
    """Without ../shared/data the first notebook builds the same lesson from the synthetic phantom."""
    path = NOTEBOOK_DIR / EXPECTED[0]
    inject = f"QUICK = True\nRUN_SOLUTIONS = True\nDATA_DIR = {str(tmp_path / 'no-such-folder')!r}"
    nb, text, _ = _execute(path, kernel_env, tmp_path / "cache", inject, monkeypatch)
    assert "CHECKS PASSED 01" in text and "'real_data': False" in text
    assert not _unsolved(nb), "\n".join(_unsolved(nb))  # the exercises work on the phantom too
