#!/usr/bin/env bash
# Base for tests: Debian build tools, a virtualenv in .venv with funnel-hpc and its test extras.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
apt_install python3 python3-venv python3-dev git ca-certificates procps
make_venv
.venv/bin/pip install -q -e '.[test,postgres]'
