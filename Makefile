# Two entry points for a fresh machine: `make run` (studio on its offline defaults) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PINS := torch==2.14.1 torchvision==0.29.1
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: run test lint bench clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) $(PINS)
	$(PIP) -e '.[dev]' $(PINS)
	$(PY) -m pip list 2>/dev/null | grep -E '^torch +2\.14\.1' >/dev/null || (echo "torch pin lost" && exit 1)
	touch $@

run: $(VENV)/.installed
	$(PY) app.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean-venv:
	rm -rf $(VENV)
