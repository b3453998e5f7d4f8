#!/usr/bin/env bash
# Regenerate the Python stubs of proto/tes.proto (grpcio-tools, the version pinned in setup.cfg).
# Usage: scripts/gen-proto.sh [OUTPUT_DIR]   (default: proto/)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-proto}
mkdir -p "$out"
python=${PYTHON:-.venv/bin/python}
"$python" -m grpc_tools.protoc -I proto --python_out="$out" --pyi_out="$out" \
  --grpc_python_out="$out" proto/tes.proto
# generated code imports its sibling as a top-level module; make it package-relative
sed -i 's/^import tes_pb2 as tes__pb2$/from funnel_hpc.proto import tes_pb2 as tes__pb2/' "$out/tes_pb2_grpc.py"
