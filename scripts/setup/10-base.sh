#!/usr/bin/env bash
# Base for tests: Debian build tools, a virtualenv in .venv with funnel-hpc and its test extras.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
apt_install python3 python3-venv python3-dev git ca-certificates procps
make_venv
# strict editable: a link tree under build/ on a plain .pth path (no import hook, so no
# cost at every Python start, i.e. at every worker a scheduler starts); new modules need
# this step again, which scripts/test.sh runs every time
pip_quiet install -e '.[test,postgres]' --config-settings editable_mode=strict
.venv/bin/python -c 'import funnel_hpc.gateway.cli.main'
# bytecode now, so workers never compile the project's modules (see benchmarks/run); it
# lands beside the link tree's entries, which is where Python looks for it
.venv/bin/python -m compileall -q "$(.venv/bin/python -c \
  'import funnel_hpc.core as c, pathlib; print(pathlib.Path(c.__file__).parent.parent)')" >/dev/null
