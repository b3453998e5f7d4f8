"""Hostile task values for the submission-template tests (tests/backends/)."""

from __future__ import annotations

HOSTILE = "x\n#SBATCH --wrap=evil\n$(touch /tmp/pwned) `id` 'q' \"d\"; rm -rf / \r\x00end"
HOSTILE_ARGS = [HOSTILE, "$(touch /tmp/pwned)", "`touch /tmp/pwned`", "'", '"', "; rm -rf /",
                "\n#SBATCH --foo", "a\\b", "${HOME}", "*", "", " spaced  out ", "é ✓"]


def task(name: str, text: str) -> dict:
    return {"id": "abc123", "name": name, "description": text, "tags": {text: text, "k": text},
            "inputs": [{"url": f"file:///{text}", "path": f"/in/{text}"}],
            "outputs": [{"url": f"file:///{text}", "path": f"/out/{text}"}],
            "executors": [{"image": text, "command": [text, "$(reboot)"], "env": {"A": text},
                           "workdir": text, "stdout": text}],
            "resources": {"cpu_cores": 2, "ram_gb": 1.5}}
