# Two entry points, both idempotent, both creating .venv/ in the repository root:
#   make atlas   set up, then run the main job on the packaged default model
#   make test    set up, then run the whole test suite
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup atlas test clean browser

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[models,dev,ray,web]"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps \
		$$($(PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml','rb'))['tool']['lmatlas']['no-deps']))")
	touch $(STAMP)

atlas: setup
	$(VENV)/bin/lmatlas check
	$(VENV)/bin/lmatlas map

# The explorer's browser tests drive Debian's Chromium through Playwright (never `playwright install`).
browser:
	test -x /usr/bin/chromium || (apt-get update -q && apt-get install -y -q chromium)

test: setup browser
	$(PY) -m pytest

clean:
	rm -rf $(VENV)
