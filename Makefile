# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.kvfabric-installed
TSTAMP := $(VENV)/.kvfabric-test-installed
SOURCES_OF_INSTALL := pyproject.toml setup.py $(wildcard native/*.c native/third_party/*)

# Ray on loopback only, no usage stats, tests bring their own auth settings.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONHASHSEED := random

# Strict-typed pure core (no Ray/gRPC inside).
CORE := kvfabric/types.py kvfabric/errors.py kvfabric/config.py kvfabric/integrity.py \
        kvfabric/hashing kvfabric/tiers kvfabric/node kvfabric/directory kvfabric/cluster.py \
        kvfabric/transfer kvfabric/bench kvfabric/localray.py kvfabric/hints.py

.PHONY: install install-test run test lint unit clean proto

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): $(VENV)/bin/python $(SOURCES_OF_INSTALL)
	$(PIP) install -e .
	@touch $@

# The vLLM CPU build's resolver also pulls CUDA-linked torchvision/torchaudio/torchcodec,
# which break `import transformers` / `import vllm` next to the CPU torch: remove them.
$(TSTAMP): $(STAMP)
	$(PIP) install -e ".[test,nixl,vllm]" "torch==2.13.0"
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	@touch $@

install: $(STAMP)
install-test: $(TSTAMP)

run: install
	$(VENV)/bin/kvfabric up

lint: install-test
	$(VENV)/bin/ruff check kvfabric tests benchmarks
	$(VENV)/bin/mypy --strict $(CORE)

test: install-test lint
	$(PY) -m pytest -q

unit: install-test
	$(PY) -m pytest -q tests/unit

clean:
	rm -rf $(VENV) build *.egg-info kvfabric/*.so .pytest_cache .mypy_cache .ruff_cache

# Regenerate the checked-in gRPC stubs (a test fails when they are stale).
proto: install-test
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. \
		proto/kvfabric/rpc/v1/kvfabric.proto
