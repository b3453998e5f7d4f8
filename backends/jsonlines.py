"""A helper process speaking JSON lines: the gateway's end (``ChildProcess``) and the
child's (``serve``). Used by the local backend's launcher and Grid Engine's DRMAA helper.

Protocol, one JSON object per line. The child first says hello (``{"ok": true,
"result": ...}``), then answers each request line with ``{"ok": true, "result": ...}``
or ``{"ok": false, "error": "...", ...}``, in order. A line with a ``notice`` key is not
an answer: the child may send one at any time (the launcher's ``{"notice": "exit"}``
when a wrapper ended), and it goes to the gateway's ``on_notice``.

The child is started on first use and again when it died; a child that gives no
answer in ``timeout`` seconds is killed. Cost: one write and one read per call, a
reader thread per child.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

NOTICE = "notice"
# what the reader thread queues when the child's stdout ends
_GONE: dict[str, Any] = {"ok": False, "error": "the helper process stopped", "gone": True}


class ChildGone(OSError):
    """The helper process died or gave no answer in time."""


class ChildProcess:
    """The gateway's end of one helper process: `call(request)` -> its answer (a dict)."""

    def __init__(self, argv: list[str], timeout: float, env: dict[str, str] | None = None,
                 cwd: Path | None = None, stderr_path: Path | None = None,
                 on_notice: Callable[[dict[str, Any]], Any] | None = None):
        self.argv, self.timeout, self.env, self.cwd = argv, timeout, env, cwd
        self.stderr_path = stderr_path  # None: a temporary file
        self.on_notice = on_notice
        self.proc: subprocess.Popen[str] | None = None
        self.hello: Any = None
        self.requests = 0
        self._answers: queue.Queue[dict[str, Any]] = queue.Queue()
        self._stderr: IO[str] | None = None
        self._lock = threading.Lock()

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request, wait for its answer. Raises ChildGone."""
        with self._lock:
            self.requests += 1
            proc = self._running()
            try:
                assert proc.stdin is not None
                proc.stdin.write(json.dumps(request) + "\n")
                proc.stdin.flush()
            except (OSError, ValueError) as exc:
                self._kill()
                raise ChildGone(f"{self._name()} gone: {exc}") from None
            return self._answer()

    def _running(self) -> subprocess.Popen[str]:
        if self.proc is not None and self.proc.poll() is None:
            return self.proc
        if self.cwd is not None:
            self.cwd.mkdir(parents=True, exist_ok=True)
        if self._stderr is not None:
            self._stderr.close()
        # stderr into a file: a chatty child must not block on a full pipe
        self._stderr = (self.stderr_path.open("a+") if self.stderr_path is not None
                        else tempfile.TemporaryFile(mode="w+"))
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True, bufsize=1, env=self.env,
                                     cwd=self.cwd, start_new_session=True)
        self._answers = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self._answers),
                         name=f"{self._name()}-reader", daemon=True).start()
        hello = self._answer()
        if not hello.get("ok"):
            self._kill()
            raise ChildGone(f"{self._name()} failed to start: {hello.get('error')}")
        self.hello = hello.get("result")
        return self.proc

    def _read(self, proc: subprocess.Popen[str], answers: queue.Queue[dict[str, Any]]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                message = {"ok": False, "error": f"unreadable line: {line.strip()[:200]}"}
            if isinstance(message, dict) and NOTICE in message:
                if self.on_notice is not None:
                    self.on_notice(message)
            else:
                answers.put(message if isinstance(message, dict) else {"ok": True,
                                                                        "result": message})
        answers.put(_GONE)

    def _answer(self) -> dict[str, Any]:
        try:
            answer = self._answers.get(timeout=self.timeout)
        except queue.Empty:
            self._kill()
            raise ChildGone(f"{self._name()} gave no answer in {self.timeout:g} s") from None
        if answer is _GONE:
            words = self._stderr_tail()
            self._kill()
            raise ChildGone(f"{self._name()} died: {words}")
        return answer

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        try:
            self._stderr.seek(0)
            return self._stderr.read()[-500:].strip()
        except (OSError, ValueError):
            return ""

    def _name(self) -> str:
        return " ".join(self.argv[1:3]) if len(self.argv) > 2 else self.argv[0]

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def close(self) -> None:
        """Close the child's stdin (it ends by itself); kill it if it does not in 5 s."""
        with self._lock:
            if self.proc is None:
                return
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self._kill()


# ---- the child's end ----

def write_line(stream: IO[str], message: dict[str, Any]) -> None:
    """One message, in ONE write (a signal handler writing a notice cannot split it)."""
    stream.write(json.dumps(message) + "\n")
    stream.flush()


def serve(handle: Callable[[dict[str, Any]], Any], hello: Any = None,
          describe: Callable[[Exception], dict[str, Any]] = lambda exc: {}) -> int:
    """The child's loop: say hello, then answer each request line on stdin with
    handle(request); an exception goes back as the error (plus describe(exc)).
    Returns when stdin closes (the gateway stopped)."""
    out = sys.stdout
    write_line(out, {"ok": True, "result": hello})
    for line in sys.stdin:
        try:
            reply = {"ok": True, "result": handle(json.loads(line))}
        except Exception as exc:  # noqa: BLE001 - the loop's boundary: the caller gets it
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}", **describe(exc)}
        write_line(out, reply)
    return 0
