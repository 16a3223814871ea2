# Two commands do all set-up on a fresh machine:
#   make demo   - install into .venv, then run the main job
#   make test   - install into .venv, then run the whole test suite (what CI runs)
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | sha1sum | cut -c1-12)
DEMO_OUT ?= outputs/demo
# the tutorials: each notebooks/NN_name.py (Jupytext percent source) is paired with notebooks/NN_name.ipynb
NOTEBOOKS_PY := $(wildcard notebooks/[0-9][0-9]_*.py)

.PHONY: demo test install lint format notebooks clean train-builtin bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python requirements.txt pyproject.toml
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m compileall -q universal  # bytecode cached even where PYTHONDONTWRITEBYTECODE is set
	$(BIN)/universal demo

test: install
	bash scripts/ensure_chromium.sh
	$(BIN)/ruff check universal tests bench app.py $(NOTEBOOKS_PY)
	$(BIN)/python -m pytest -q

# Not part of CI: retrain the built-in weights (about 30 minutes on a 2-core CPU; DEVICE=cuda on a GPU)
train-builtin: install
	PY=$(BIN)/python DEVICE=$${DEVICE:-auto} bash scripts/train_builtin.sh

bench: install
	$(BIN)/python bench/heads.py
	$(BIN)/python bench/metrics.py
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/accuracy.py

lint: install
	$(BIN)/ruff check universal tests bench $(NOTEBOOKS_PY)
	$(BIN)/ruff format --check universal tests bench $(NOTEBOOKS_PY)

format: notebooks
	$(BIN)/ruff format universal tests bench
	$(BIN)/ruff check --fix universal tests bench $(NOTEBOOKS_PY)
	$(BIN)/jupytext --quiet --sync $(NOTEBOOKS_PY)

# After editing a tutorial (its .py, or its .ipynb in Jupyter): sync each pair (the newer file wins), format the
# .py with ruff, sync again, and strip outputs from the .ipynb (tests/test_notebooks.py checks all of this)
notebooks: install
	$(BIN)/jupytext --quiet --sync $(NOTEBOOKS_PY)
	$(BIN)/ruff format --quiet $(NOTEBOOKS_PY)
	$(BIN)/jupytext --quiet --sync $(NOTEBOOKS_PY)
	$(BIN)/jupyter nbconvert --clear-output --inplace --log-level WARN $(NOTEBOOKS_PY:.py=.ipynb)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
