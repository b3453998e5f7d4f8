#!/usr/bin/env bash
# Static checks, as CI runs them: import contracts, lint and import order, types.
# Configuration lives in pyproject.toml ([tool.importlinter], [tool.ruff], [tool.mypy]).
# Usage: scripts/check.sh   (needs .venv from scripts/setup/10-base.sh; about 20 s)
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

# mypy resolves funnel_hpc.<folder> through this link tree (pyproject.toml [tool.mypy]
# mypy_path); the folders are those of [tool.setuptools.package-dir].
tree=build/mypy/funnel_hpc
mkdir -p "$tree"
for folder in core gateway backends worker proto; do
  ln -sfn "../../../$folder" "$tree/$folder"
done

status=0
echo "== import contracts (lint-imports)"
lint-imports --no-cache || status=1
echo "== lint and import order (ruff check .)"
ruff check . || status=1
echo "== types (mypy)"
# Report checkout paths (core/x.py), not link-tree paths (build/mypy/funnel_hpc/core/x.py).
mypy | sed "s#^$tree/##" || status=1
exit "$status"
