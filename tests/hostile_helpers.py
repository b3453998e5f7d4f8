"""A hostile local user: a real account (useradd) and a loop it runs against the worker."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

# Replace every new funnel-* directory in BASE with a symlink to TARGET (renaming the
# real one away), until STOP exists or 2 minutes passed; print how often it managed.
SWAP_LOOP = r"""
base=$1 target=$2 stop=$3 swapped=0 end=$(( $(date +%s) + 120 ))
for guess in 0 1 2 3 4 5 6 7 8 9; do ln -s "$target" "$base/funnel-task1-$guess" 2>/dev/null; done
while [ ! -e "$stop" ] && [ "$(date +%s)" -lt "$end" ]; do
  for entry in "$base"/funnel-*; do
    if [ -d "$entry" ] && [ ! -L "$entry" ]; then
      if mv "$entry" "$entry.moved" 2>/dev/null && ln -s "$target" "$entry" 2>/dev/null; then
        swapped=$((swapped + 1))
      fi
    fi
  done
done
echo "swapped=$swapped"
"""


def make_user(prefix: str) -> str:
    name = f"fh{prefix}{secrets.token_hex(3)}"
    subprocess.run(["useradd", "-M", "-U", "-s", "/usr/sbin/nologin", name], check=True)
    return name


def remove_user(name: str) -> None:
    subprocess.run(["userdel", name], check=True)


def start_swap_loop(user: str, base: Path, target: Path, stop: Path) -> subprocess.Popen:
    """SWAP_LOOP as `user` (its own uid and group, no others)."""
    return subprocess.Popen(["/bin/sh", "-c", SWAP_LOOP, "swap", str(base), str(target),
                             str(stop)], user=user, group=user, extra_groups=[],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd="/")
