# One command to set up and run the demo, one to set up and run the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test tiny-models clean

setup: $(VENV)/.installed

# torch 2.13.0 first: it is the CPU build on this kind of machine; constraints.txt pins the rest.
# DeepSpeed installs as pure Python (its ops compile on first use), so the ZeRO tests run here too.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,hub,eval,bench,deepspeed]"
	touch $@

demo: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/run_task.sh shapes

test: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/test.sh

tiny-models: setup
	$(VENV)/bin/gpg-vl build-tiny --out assets/tiny

clean:
	rm -rf runs .pytest_cache
