"""Executor exit codes as shells, Docker and apptainer report them, whatever the image driver.

Workflow engines read 127 as "command not found", 126 as "found but cannot be run" and
128+N as "killed by signal N". The image drivers' engines say otherwise: bwrap and ch-run
exit 1 when their execve of the command fails, and proot exits 255 when the process it
traces is killed by a signal. Each says so in one line on the executor's stderr, which is
read here: a failed execve becomes 127 (ENOENT, as a shell's PATH search) or 126 (any
other errno: EACCES, ENOEXEC, ENOTDIR...), proot's last "terminated with signal N" 128+N.
A task that prints such a line itself only changes its own exit code. The docker-style
templates (worker.drivers) report their engine's own codes, already these. proot 5.1
exits with the status of the last traced process that exited normally and names a signal
only when none did: sandbox.proot_argv runs the command under the image's sh, which
exits 128+N (docs/admin.md). The line must fit in worker.log_tail_bytes (10 KiB by default).

Cost: one regular expression over the stderr tail of an executor that exited 1 or 255.
"""

from __future__ import annotations

import re

NOT_FOUND, NOT_EXECUTABLE, SIGNALED = 127, 126, 128
ENOENT = 2
# the engine's line when its execve(2) of the command failed: "bwrap: execvp CMD: REASON";
# ch-run 0.31: "ch-run[PID]: error: can't execve(2): CMD: REASON (FILE:LINE ERRNO)"
_BWRAP_EXEC = re.compile(r"bwrap: execvp (?P<command>.*): (?P<reason>[^:]+)")
_CH_RUN_EXEC = re.compile(r"ch-run\[[0-9]+\]: (?:error: )?can't execve\(2\): "
                          r"(?P<command>.*): (?P<reason>[^:]+) \(\S+ (?P<errno>[0-9]+)\)")
# what every line of an engine's own stderr starts with (ch-run may warn first)
_ENGINE_PREFIX = {"bwrap": "bwrap: ", "charliecloud": "ch-run["}
# proot 5.x, when no traced process exited normally (it then exits 255)
_PROOT_SIGNAL = re.compile(r"proot info: pid [0-9]+: terminated with signal (?P<signal>[0-9]+)")
_ENGINE_FAILED = {"bwrap": 1, "charliecloud": 1}
_REASON_NOT_FOUND = "No such file or directory"  # strerror(ENOENT), glibc and musl
PROOT_KILLED = 255
MAX_LINE = 8192  # an engine's line is short: a longer stderr is the command's own


def shell_exit_code(driver: str, command: list[str], returncode: int, stderr: str) -> int:
    """The exit code to report for an executor whose engine process ended with
    `returncode` (negative: killed by that signal) and whose stderr ends with `stderr`."""
    if returncode < 0:  # the engine itself was killed by a signal
        return SIGNALED - returncode
    if returncode == _ENGINE_FAILED.get(driver) and 0 < len(stderr) <= MAX_LINE:
        found = _exec_failure(driver, stderr)
        if found is not None and command and found[0] == command[0]:
            return found[1]
    if driver == "proot" and returncode == PROOT_KILLED:
        signals = _PROOT_SIGNAL.findall(stderr[-MAX_LINE:])
        if signals and 0 < int(signals[-1]) < 128:
            return SIGNALED + int(signals[-1])
    return returncode


def _exec_failure(driver: str, stderr: str) -> tuple[str, int] | None:
    """(the command the engine failed to start, 127 or 126), when stderr is the engine's
    own lines only, the last one saying its execve failed."""
    lines = stderr.splitlines()
    if not lines or not all(line.startswith(_ENGINE_PREFIX[driver]) for line in lines):
        return None
    if driver == "bwrap":
        match = _BWRAP_EXEC.fullmatch(lines[-1])
        if match is None:
            return None
        not_found = match["reason"] == _REASON_NOT_FOUND
    else:
        match = _CH_RUN_EXEC.fullmatch(lines[-1])
        if match is None:
            return None
        not_found = int(match["errno"]) == ENOENT
    return match["command"], NOT_FOUND if not_found else NOT_EXECUTABLE
