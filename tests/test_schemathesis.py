"""Property-based fuzzing of the server's own OpenAPI document with schemathesis.

Fixed seed, bounded examples: no 5xx, every response matches the documented schema,
status codes, content types and headers, and undeclared methods get 405 with Allow.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.server_helpers import ServerProcess

CHECKS = ("not_a_server_error,response_schema_conformance,status_code_conformance,"
          "content_type_conformance,response_headers_conformance,unsupported_method")


def schemathesis_argv(url: str) -> list[str]:
    exe = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    return [exe, "run", f"{url}/ga4gh/tes/v1/openapi.json", "--checks", CHECKS,
            "--max-examples", "30", "--seed", "1", "--workers", "2",
            "--request-timeout", "30"]


def test_schemathesis_finds_no_failures(databases, tmp_path):
    server = ServerProcess(tmp_path / "fuzz", databases.new("sqlite")).start()
    try:
        done = subprocess.run(schemathesis_argv(server.url), capture_output=True, text=True,
                              timeout=600)
    finally:
        server.stop()
    tail = done.stdout[-3000:]
    assert done.returncode == 0, tail
    assert "passed" in tail and "failures" not in tail.split("SUMMARY")[-1].lower(), tail
