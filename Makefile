# Two entry points, both idempotent, both creating .venv/ in the repository root:
#   make atlas   set up, then run the main job on the packaged default model
#   make test    set up, then check the layers and the style, build the docs, run the whole test suite
#   make docs    build the documentation site into build/site (offline, strict)
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup atlas test clean browser lint docs

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[models,dev,ray,web,docs]"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps \
		$$($(PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml','rb'))['tool']['lmatlas']['no-deps']))")
	touch $(STAMP)

atlas: setup
	$(VENV)/bin/lmatlas check
	$(VENV)/bin/lmatlas map

# The explorer's browser tests drive Debian's Chromium through Playwright (never `playwright install`).
browser:
	test -x /usr/bin/chromium || (apt-get update -q && apt-get install -y -q chromium)

# Layers (import-linter contracts in pyproject.toml), then ruff's checks and formatting.
lint: setup
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check lmatlas tests bench scripts docs
	$(VENV)/bin/ruff format --check lmatlas tests bench scripts docs

docs: setup
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir build/site

# Two test processes, a test file each at a time (module fixtures stay in one process), one torch thread each.
test: setup browser lint docs
	$(PY) -m pytest -n 2 --dist loadfile

clean:
	rm -rf $(VENV)
