"""The read-along notebooks in notebooks/ run top to bottom without an error.

Executing a notebook is a smoke test, but not only that: the notebooks assert closed forms and
invariants in their cells (advantages, clip values, k3 >= 0, aggregation, the token count of a
masked image, ...), so a change that breaks what a notebook explains fails here too.

Every notebooks/*.ipynb is picked up, so a new notebook is tested without touching this file. Each
runs in a fresh "python3" kernel whose working directory is notebooks/, as when opened in Jupyter.
The notebooks are stored WITH their outputs, so that their figures show where the repository is
browsed, without running anything; the second test checks that every code cell was run, in order,
and that the figures are there. (The re-execution above happens in memory: it never rewrites the
stored outputs, which come from the real runs the notebooks read when those exist.)
"""

import os
from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300

# The kernel is a child process and inherits this environment. The inline backend draws into the
# cell output without a display, so the notebooks run headless (CI, ssh). An existing setting wins.
HEADLESS_ENV = {"MPLBACKEND": os.environ.get("MPLBACKEND",
                                             "module://matplotlib_inline.backend_inline")}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    for key, value in HEADLESS_ENV.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        # the error already quotes the failing cell and its traceback; keep it, drop nbclient's frames
        pytest.fail(f"{path.name} failed:\n{error}", pytrace=False)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_run_top_to_bottom_with_its_figures(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    counts = [cell.get("execution_count") for cell in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name}: execution counts {counts}; run it top to bottom in a fresh kernel before "
        f"committing (jupyter nbconvert --to notebook --execute --inplace {path.name})")
    errors = [i for i, cell in enumerate(code) for out in cell.get("outputs", [])
              if out.get("output_type") == "error"]
    assert not errors, f"{path.name}: code cells {errors} stored with an error"
    figures = sum("image/png" in out.get("data", {}) for cell in code
                  for out in cell.get("outputs", []))
    assert figures >= 1, f"{path.name}: no figure among its stored outputs"


# --- the numbers a notebook's reading quotes are in its stored outputs --------------------------
# A "**What ... shows**" paragraph reads the stored outputs next to it; every decimal number it
# quotes (0.723, -0.139, 8.7, ...) must be one of the outputs' numbers, rounded to as many places
# as the paragraph writes. Numbers that come from the code or from arithmetic, not from an
# output, are listed here with where they come from.
NOT_FROM_OUTPUTS = {
    ("02_objective.ipynb", "0.90"): "the masked branch's p(right) in q_B, set in the code",
    ("02_objective.ipynb", "2.48"): "log 12, the entropy of the uniform distribution",
    ("03_per_token_kl.ipynb", "12.6"): "gamma (1 - e^x) at k3(x) = 10, papo's cap",
    ("03_per_token_kl.ipynb", "1.23"): "printed in the section-3 figure's token boxes",
    ("03_per_token_kl.ipynb", "1.08"): "printed in the section-3 figure's token boxes",
    ("03_per_token_kl.ipynb", "2.47"): "printed in the section-3 figure's token boxes",
    ("03_per_token_kl.ipynb", "2.81"): "printed in the section-3 figure's token boxes",
    ("03_per_token_kl.ipynb", "6.50"): "printed in the section-3 figure's token boxes",
    ("04_training_curves.ipynb", "0.235"): "read off the clipped-share curves of the figure",
}


def _numbers(text: str) -> list[str]:
    import re
    return re.findall(r"(?<![\w.])-?\d+\.\d+", text)


def _reading_cells(notebook):
    import re
    return [(i, cell.source) for i, cell in enumerate(notebook.cells) if cell.cell_type == "markdown"
            and re.search(r"\*\*What (it|sections? [\d-]+|the stored outputs|happened)", cell.source)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_every_number_a_reading_quotes_is_in_the_stored_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    shown = " ".join(out.get("text", "") + " " + "".join(out.get("data", {}).get("text/markdown", ""))
                     for cell in notebook.cells if cell.cell_type == "code"
                     for out in cell.get("outputs", []))
    printed = [float(n) for n in _numbers(shown)]
    missing = []
    for i, source in _reading_cells(notebook):
        for quoted in _numbers(source):
            places = len(quoted.split(".")[1])
            if (path.name, quoted.lstrip("-")) in NOT_FROM_OUTPUTS:
                continue
            value = abs(float(quoted))
            if not any(abs(abs(round(p, places)) - value) < 10 ** -(places + 3) for p in printed):
                missing.append(f"cell {i}: {quoted}")
    assert not missing, f"{path.name}: numbers quoted in its reading but in none of its outputs: {missing}"


def test_notebook_03_shows_each_favours_record_as_it_is_committed():
    # section 7's tables are experiments/favours.py's records, not numbers typed by hand
    import importlib.util
    import json
    root = NOTEBOOK_DIR.parent
    spec = importlib.util.spec_from_file_location("favours", root / "experiments" / "favours.py")
    favours = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(favours)
    records = sorted((root / "experiments" / "results").glob("*/favours-seed0.json"))
    assert records, "no favours record committed"
    text = "\n".join(cell.source for cell in
                     nbformat.read(NOTEBOOK_DIR / "03_per_token_kl.ipynb", as_version=4).cells
                     if cell.cell_type == "markdown")
    for path in records:
        assert favours.markdown(json.loads(path.read_text())) in text, path
