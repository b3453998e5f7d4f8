#!/usr/bin/env bash
# Install everything the tests need (scripts/setup/*.sh, in order) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
for step in scripts/setup/*.sh; do
  echo "== set-up: $step"
  bash "$step"
done
export PATH="$PWD/.venv/bin:$PATH"
echo "== checks: import contracts (pyproject.toml [tool.importlinter])"
lint-imports --no-cache
exec .venv/bin/python -m pytest "$@"
