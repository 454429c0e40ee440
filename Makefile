# mailmesh developer commands. `make run` and `make test` create .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv run test gen lint typecheck breaking bench clean

$(BIN)/mailmesh: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/mailmesh

venv: $(BIN)/mailmesh

run: venv
	$(BIN)/mailmesh up --data-dir $${MAILMESH_DATA_DIR:-./data}

test: venv
	$(BIN)/pytest -q

gen: venv
	$(BIN)/mailmesh dev gen

lint: venv
	$(BIN)/ruff check .
	$(BIN)/buf lint

typecheck: venv
	$(BIN)/mypy

breaking: venv
	$(BIN)/buf breaking --against '.git#branch=main'

bench: venv
	$(BIN)/python -m tests.bench.bench_mailbox --messages 100000

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
