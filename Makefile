# Two commands for a fresh machine: `make demo` (main job) and `make test` (whole test suite).
# Set-up is shared, idempotent, and skipped when .venv is already up to date with pyproject.toml.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dsv4lab-installed
# torch is pinned on the command line: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
TORCH ?= torch==2.13.0
EXTRAS ?= lab,test,triton,compile

.PHONY: setup demo test lab report notebooks readme-charts clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH) -e '.[$(EXTRAS)]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/dsv4lab compare

test: setup
	DSV4LAB_HEADLESS=1 $(BIN)/python -m pytest -q tests notebooks --nbmake

lab: setup
	$(BIN)/jupyter lab notebooks/

report: setup
	$(BIN)/dsv4lab report --out report.html

# PNG export needs a Chromium (apt-get install -y chromium); without one the script writes standalone HTML
readme-charts: setup
	$(BIN)/python -m pip install -q kaleido
	$(BIN)/python scripts/readme_charts.py --out docs/img

notebooks: setup
	$(BIN)/jupytext --sync notebooks/*.py

clean-venv:
	rm -rf $(VENV)
