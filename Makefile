# Two targets do everything on a fresh machine: create .venv, install, run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test lint clean system-deps

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

system-deps:
	bash scripts/install-system-deps.sh

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/pneumodet demo --out runs/demo

test: $(STAMP) system-deps lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider

# ruff, and the import-linter contracts in pyproject.toml (the layering: no module imports a higher layer)
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) runs build *.egg-info
