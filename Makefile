# Two entry points on a fresh machine (Python 3.11+ with venv):
#   make serve   run the optimizer on a simulated H100-class GPU (no GPU needed), port 8080
#   make test    type-check, check the import contracts (pyproject.toml [tool.importlinter]) and run the test suite
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test podresources-stubs

# The server (.) and the client distribution it depends on (./client), both editable: a change to
# either pyproject.toml reinstalls.
$(BIN)/vlm-gpu-optimizer: pyproject.toml client/pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ./client -e '.[dev]'
	touch $@

serve: $(BIN)/vlm-gpu-optimizer
	$(BIN)/vlm-gpu-optimizer serve --backend simulated

test: $(BIN)/vlm-gpu-optimizer
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

# Regenerate the kubelet pod-resources stubs (optimizer/kube/podresources/api_pb2*.py) from api.proto.
podresources-stubs: $(BIN)/vlm-gpu-optimizer
	PYTHON=$(BIN)/python sh optimizer/kube/podresources/generate.sh
