# The README's two commands: `make run` (set up + the default suite) and `make test` (set up + the tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)

.PHONY: setup run deploy lint docs test test-fast clean

setup: $(STAMP)

# One resolve of pyproject.toml under the tested pins of constraints.txt (FedML route (a): plain
# `pip install fedml`, which brings a CUDA torch build that also runs on CPU), by uv: the same packages as pip
# installs, in a fraction of the time (README, "Install").
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install uv==0.13.9
	$(BIN)/uv pip install --python $(BIN)/python -c constraints.txt -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $@

run: setup
	$(BIN)/pfedseq suite recipes/suites/default.yaml

deploy: setup  # the pFedSeq recipe as a FedML cross-silo deployment: server + 20 client processes on 127.0.0.1
	$(BIN)/pfedseq deploy recipes/omniglot_pfedseq.yaml

lint: setup  # CI runs this before the tests: ruff (pyproject.toml) and the generated reference pages up to date
	$(BIN)/ruff check .
	$(BIN)/pfedseq docs --check

docs: setup  # rewrite docs/reference/ from the code's docstrings and help texts
	$(BIN)/pfedseq docs

test: setup  # two workers, each file's tests on one (its module-scoped deployments and runs are built once)
	$(BIN)/python -m pytest -n 2 --dist loadfile

test-fast: setup  # the inner loop: every test not marked slow (CI runs them all)
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
