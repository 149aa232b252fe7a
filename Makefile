# Tessera: `make up` runs a trust domain (server, agent, an SVID for you) on the
# embedded defaults, `make demo` the mesh demo, `make test` sets up and runs lint
# plus the whole test suite. None needs the virtualenv activated.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= .tessera
TD     ?= example.org
DEMO_ARGS ?=

.PHONY: up demo test unit integration lint fmt proto bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,dev]'
	# xds-protos carries an older copy of opentelemetry-proto's modules, which the OTLP
	# exporter cannot import: whichever pip installed last wins, so the newer one goes last.
	$(BIN)/pip install --quiet --force-reinstall --no-deps "opentelemetry-proto==$$($(BIN)/python \
		-c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')"
	touch $(STAMP)

up: $(STAMP)
	$(BIN)/tessera up --trust-domain $(TD) --data-dir $(DATA)

demo: $(STAMP)
	$(BIN)/tessera demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# Two workers, a test file each at a time; then the tests that stop a shared service, alone.
test: lint
	$(BIN)/pytest -q -p no:cacheprovider -n 2 --dist loadfile -m "not exclusive"
	$(BIN)/pytest -q -p no:cacheprovider -m exclusive
	@echo "Console screenshots (tests/integration/test_console_browser.py): $(CURDIR)/build/console-screenshots"

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

bench: $(STAMP)
	$(BIN)/python bench/run.py

fmt: $(STAMP)
	$(BIN)/ruff check --fix .

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I workload_api/_proto \
		--python_out=workload_api/_proto --grpclib_python_out=workload_api/_proto workload_api/_proto/workload.proto
	# Our messages share names with the spiffe package's: keep them in a private pool.
	sed -i 's/^DESCRIPTOR = _descriptor_pool\.Default()\./from . import POOL as _POOL\nDESCRIPTOR = _POOL./' workload_api/_proto/workload_pb2.py
	sed -i 's/^import workload_pb2$$/from . import workload_pb2/' workload_api/_proto/workload_grpc.py
	grep -q '^DESCRIPTOR = _POOL\.' workload_api/_proto/workload_pb2.py
	grep -q '^from \. import workload_pb2$$' workload_api/_proto/workload_grpc.py
	$(BIN)/python -m grpc_tools.protoc -I sdk/_proto --python_out=sdk/_proto --pyi_out=sdk/_proto \
		sdk/_proto/mesh_agent.proto

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
