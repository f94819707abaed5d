# wsi-amr: `make demo` installs into .venv and runs the tool on the sample slide; `make test` runs lint,
# types, the import contract and the tests; `make test-fast` the library-level tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
CLI    := $(VENV)/bin/wsi-amr
SAMPLE := sample_data/CMU-1-Small-Region.svs
DEMO_OUT := demo-out

.PHONY: install demo lint test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

$(SAMPLE): | $(VENV)/.installed
	$(PY) sample_data/fetch.py

demo: install $(SAMPLE)
	$(CLI) info $(SAMPLE)
	$(CLI) tissue $(SAMPLE) -o $(DEMO_OUT)
	$(CLI) tile $(SAMPLE) -o $(DEMO_OUT) --mpp 0.5 --size 256 --save-images
	$(CLI) quadtree $(SAMPLE) -o $(DEMO_OUT)
	$(CLI) segment $(SAMPLE) -o $(DEMO_OUT)
	@echo "demo outputs in $(DEMO_OUT)/CMU-1-Small-Region/:"; ls $(DEMO_OUT)/CMU-1-Small-Region

# Lint, types and the import contract (pyproject.toml: [tool.ruff], [tool.mypy], [tool.importlinter]).
lint: install
	$(VENV)/bin/ruff check wsi_amr tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# pytest exits 5 when it collected nothing: that is a failure here, not a pass.
test: lint
	$(PY) -m pytest -q; status=$$?; if [ $$status -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$status

# The library-level tests (no CLI runs, no training), under a minute.
test-fast: install
	$(PY) -m pytest -q -m "not slow"; status=$$?; if [ $$status -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$status

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
