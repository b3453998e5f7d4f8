#!/usr/bin/env bash
# Install everything the tests need (scripts/setup/*.sh, in order) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
for step in scripts/setup/*.sh; do
  echo "== set-up: $step"
  bash "$step"
done
export PATH="$PWD/.venv/bin:$PATH"
# import contracts, ruff and mypy (pyproject.toml); a failure stops before the tests
bash scripts/check.sh
exec .venv/bin/python -m pytest "$@"
