#!/usr/bin/env bash
# Base for tests: Debian build tools, a virtualenv in .venv with funnel-hpc and its test extras.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
apt_install python3 python3-venv python3-dev git ca-certificates procps
make_venv
# compat: a plain path in a .pth file; the default editable finder costs every Python start
# (so every worker a scheduler starts) about 10 ms
.venv/bin/pip install -q -e '.[test,postgres]' --config-settings editable_mode=compat
# bytecode now, so workers never compile the project's modules (see benchmarks/run)
.venv/bin/python -m compileall -q gateway worker backends proto >/dev/null
