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

# test-oldest / test-newest prove both ends of the declared version range, each in a fresh virtual environment:
# the floors pinned in constraints/oldest.txt, and the newest releases pip finds. Both run the test suite only.
OLDEST_VENV ?= .venv-oldest
NEWEST_VENV ?= .venv-newest
KEY_PACKAGES := '^(torch|lightning|einops|numpy|torchmetrics|diffusers|jsonargparse|pytest|hypothesis)=='

.PHONY: setup test lint docs example example-latent bench clean test-oldest test-newest

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null \
		&& echo "set-up: keeping the installed torch $$($(PY) -c 'import torch; print(torch.__version__)')" \
		|| $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,examples,bench,docs]"
	@touch $@

setup: $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy lightning_ldm

test: lint
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

# The HTML documentation in docs/_build/html: the guides (docs/*.md) and the API reference, generated from the
# docstrings into docs/api/ on every build (both folders are git-ignored and rebuilt from scratch, so a renamed or
# removed module leaves nothing stale). Warnings are errors (-W); the build fetches nothing over the network.
docs: setup
	rm -rf docs/_build docs/api
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: open docs/_build/html/index.html"

example: setup
	$(PY) -m examples.video_blend.train fit --config examples/video_blend/config.yaml $(ARGS)

example-latent: setup
	$(PY) -m examples.latent_digits.train --config examples/latent_digits/config.yaml $(ARGS)

bench: setup
	$(PY) -m benchmarks.run $(ARGS)

test-oldest:
	rm -rf $(OLDEST_VENV)
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install --quiet -c constraints/oldest.txt -e ".[test]"
	@$(OLDEST_VENV)/bin/python -m pip freeze | grep -iE $(KEY_PACKAGES)
	$(OLDEST_VENV)/bin/python -m pytest -q -n 2 -p no:cacheprovider $(PYTEST_ARGS)

test-newest:
	rm -rf $(NEWEST_VENV)
	$(PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(NEWEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[test]"
	@$(NEWEST_VENV)/bin/python -m pip freeze | grep -iE $(KEY_PACKAGES)
	$(NEWEST_VENV)/bin/python -m pytest -q -n 2 -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(OLDEST_VENV) $(NEWEST_VENV) .pytest_cache .mypy_cache .ruff_cache runs benchmarks/results \
		docs/_build docs/api
