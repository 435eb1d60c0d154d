# hf_stack: `make demo` runs the main job, `make test` the test suite; both install what they need first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo-output

.PHONY: install test demo style quality bench clean

install: $(VENV)/.installed

# torch==2.13.0 first: it is the local CPU wheel; pyproject.toml keeps a range GPU users can satisfy.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[all]"
	touch $@

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n 2 -q tests

demo: install
	$(PY) -m hf_stack.demo --output $(DEMO_OUT) $(if $(RECIPE),--recipe $(RECIPE)) $(if $(DATA),--data $(DATA))

style: install
	$(VENV)/bin/ruff format hf_stack tests bench
	$(VENV)/bin/ruff check --fix hf_stack tests bench

quality: install
	$(VENV)/bin/ruff format --check hf_stack tests bench
	$(VENV)/bin/ruff check hf_stack tests bench

bench: install
	$(PY) bench/grow.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
