#!/bin/sh
# Regenerates api_pb2.py, api_pb2.pyi and api_pb2_grpc.py from api.proto (needs grpcio-tools,
# in the dev extras). Run from anywhere: make podresources-stubs, or sh optimizer/kube/podresources/generate.sh.
# tests/test_podresources.py checks that the committed modules equal a fresh generation.
set -eu
PYTHON="${PYTHON:-python3}"
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
cd "$root"
"$PYTHON" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
    optimizer/kube/podresources/api.proto
