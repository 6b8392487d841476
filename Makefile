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
        kvfabric/transfer kvfabric/bench kvfabric/localray.py kvfabric/hints.py kvfabric/sim \
        kvfabric/connectors/sglang_keys.py kvfabric/metrics.py kvfabric/cli/chain.py \
        kvfabric/cli/render.py

# Shells around an engine, strict-typed too (the engine itself is typed as Any).
TYPED_SHELLS := kvfabric/connectors/vllm.py kvfabric/connectors/vllm_params.py \
        kvfabric/connectors/vllm_worker.py kvfabric/connectors/vllm_events.py

.PHONY: install install-test install-sglang run test lint unit clean proto

# SGLang brings its own CUDA torch, so it gets a second venv: the [sglang] extra (pins)
# plus pytest, then kvfabric itself with --no-deps. Its tests run there, after the main suite.
SGVENV  := .venv-sglang
SGSTAMP := $(SGVENV)/.kvfabric-installed
SGREQS   = $(shell $(PYTHON) -c 'import tomllib; d = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]; print(" ".join(d["sglang"] + [r for r in d["test"] if r.startswith("pytest")]))')

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
	sh scripts/install-prometheus.sh
	@touch $@

install: $(STAMP)
install-test: $(TSTAMP)

$(SGSTAMP): $(SOURCES_OF_INSTALL)
	test -x $(SGVENV)/bin/python || $(PYTHON) -m venv $(SGVENV)
	$(SGVENV)/bin/pip install $(SGREQS)
	$(SGVENV)/bin/pip install --no-deps -e .
	$(SGVENV)/bin/python -c 'import torch, kvfabric.rpc.client; assert torch.__version__.startswith("2.14.1"), torch.__version__'
	@touch $@

install-sglang: $(SGSTAMP)

run: install
	$(VENV)/bin/kvfabric up

lint: install-test
	$(VENV)/bin/ruff check kvfabric tests benchmarks
	$(VENV)/bin/mypy --strict $(CORE) $(TYPED_SHELLS)

test: install-test lint install-sglang
	$(PY) -m pytest -q
	KVFABRIC_REQUIRE_SGLANG=1 $(SGVENV)/bin/python -m pytest -q -p no:warnings tests/sglang

unit: install-test
	$(PY) -m pytest -q tests/unit

clean:
	rm -rf $(VENV) $(SGVENV) build *.egg-info kvfabric/*.so .pytest_cache .mypy_cache .ruff_cache

# Regenerate the checked-in gRPC stubs (a test fails when they are stale).
proto: install-test
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. \
		proto/kvfabric/rpc/v1/kvfabric.proto
