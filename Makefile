# Set-up is part of every target: a fresh clone needs only `make example` or `make test`.
#
# TORCH_SPEC picks the torch that set-up installs when the environment has none. The default is the
# CPU build of 2.13.0 (the release this project is tested on); point it elsewhere for CUDA, e.g.
#   make test TORCH_SPEC="torch==2.13.0" PIP_INDEX_URL=<the index of the CUDA build you want>
# A torch that is already importable in the environment is never replaced.
# VENV picks the virtual environment (created if missing); set VENV to an existing one to reuse it.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lightning_ldm-installed
PYTEST_ARGS ?=

.PHONY: setup test lint example bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null \
		&& echo "set-up: keeping the installed torch $$($(PY) -c 'import torch; print(torch.__version__)')" \
		|| $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,example,bench]"
	@touch $@

setup: $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy lightning_ldm

test: lint
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

example: setup
	$(PY) -m examples.video_blend.train fit --config examples/video_blend/config.yaml $(ARGS)

bench: setup
	$(PY) -m benchmarks.run $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache runs benchmarks/results
