#!/usr/bin/env bash
# Regenerate the Python stubs of proto/*.proto (grpcio-tools, the version pinned in
# pyproject.toml's test extra).
# Usage: scripts/gen-proto.sh [OUTPUT_DIR]   (default: proto/)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-proto}
mkdir -p "$out"
python=${PYTHON:-.venv/bin/python}
"$python" -m grpc_tools.protoc -I proto --python_out="$out" --pyi_out="$out" \
  --grpc_python_out="$out" proto/tes.proto proto/funnel_events.proto
# generated code imports its sibling as a top-level module; make it package-relative
sed -i -E 's/^import (tes|funnel_events)_pb2 as (.*)$/from funnel_hpc.proto import \1_pb2 as \2/' \
  "$out/tes_pb2_grpc.py" "$out/funnel_events_pb2_grpc.py"
