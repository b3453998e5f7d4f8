"""Exit codes as workflow engines read them, through a real worker under every image
driver (bwrap, proot, charliecloud): a command not found is 127, one that cannot be run
126, a signal N 128+N (Docker, apptainer and POSIX shells agree), and the engine's words
stay on the executor's stderr. Plus worker/exit_codes.py on canned engine output."""

from __future__ import annotations

import pytest

from funnel_hpc.worker.exit_codes import shell_exit_code
from tests.image_helpers import ANONYMOUS
from tests.worker.conftest import need

TESTIMAGE = f"{ANONYMOUS}/funnel/testimage:1"
ENGINES = {"bwrap": "bwrap", "proot": "proot", "charliecloud": "ch-run"}

# (command, exit code a shell reports, a word its stderr must hold)
CASES = [
    (["no-such-command"], 127, "no-such-command"),
    (["/no/such/file"], 127, "/no/such/file"),
    (["/etc/os-release"], 126, "/etc/os-release"),  # not executable
    (["/etc"], 126, "/etc"),                        # a directory
    (["sh", "-c", "kill -TERM $$"], 143, ""),
    (["sh", "-c", "kill -KILL $$"], 137, ""),
    (["sh", "-c", "sleep 60 & kill -KILL $!; wait; exit 0"], 0, ""),  # a child's signal
    (["sh", "-c", "ls / >/dev/null; kill -KILL $$"], 137, ""),  # after a child ended
    (["sh", "-c", "echo 'bwrap: something else' >&2; exit 1"], 1, "something else"),
    (["sh", "-c", "exit 3"], 3, ""),
]


@pytest.fixture(params=list(ENGINES))
def driver(request, harness):
    need(ENGINES[request.param])
    return request.param


@pytest.mark.registry
def test_every_driver_reports_exit_codes_as_a_shell(harness, driver):
    executors = [{"image": TESTIMAGE, "command": command, "ignore_error": True}
                 for command, _code, _word in CASES]
    run = harness.run(harness.task(executors=executors),
                      config=harness.config(container_driver=driver))
    assert run.state == "COMPLETE", (run.system_logs, run.stderr)
    got = [(run.executor(i)["exit_code"], run.executor(i)["stderr"]) for i in range(len(CASES))]
    assert [code for code, _stderr in got] == [code for _c, code, _w in CASES], \
        [(CASES[i][0], got[i]) for i in range(len(CASES)) if got[i][0] != CASES[i][1]]
    for (_command, _code, word), (_got, stderr) in zip(CASES, got, strict=True):
        assert word in stderr, got


@pytest.mark.registry
def test_a_missing_command_fails_the_task_with_127(harness):
    run = harness.run(harness.task(executors=[{"image": TESTIMAGE,
                                               "command": ["no-such-command"]}]))
    assert run.state == "EXECUTOR_ERROR" and run.executor(0)["exit_code"] == 127


BWRAP_MISSING = "bwrap: execvp samtools: No such file or directory\n"
CH_RUN_DENIED = ("ch-run[25044]: warning: something\n"
                 "ch-run[25044]: error: can't execve(2): /data/x.sh: Permission denied "
                 "(ch_core.c:410 13)\n")
PROOT_KILLED = ("proot info: pid 7: terminated with signal 9\n"
                "proot info: pid 6: terminated with signal 15\n")
CH_RUN_MISSING = ("ch-run[25032]: error: can't execve(2): samtools: No such file or "
                  "directory (ch_core.c:410 2)\n")


@pytest.mark.parametrize("driver, command, returncode, stderr, expected", [
    ("bwrap", ["samtools"], 1, BWRAP_MISSING, 127),
    ("bwrap", ["/data/x.sh"], 1, "bwrap: execvp /data/x.sh: Permission denied\n", 126),
    ("bwrap", ["/data/x.sh"], 1, "bwrap: execvp /data/x.sh: Exec format error\n", 126),
    ("bwrap", ["/a/x"], 1, "bwrap: execvp /a/x: Not a directory\n", 126),  # as bash
    ("bwrap", ["other"], 1, BWRAP_MISSING, 1),          # not the executor's command
    ("bwrap", ["samtools"], 1, "hello\n" + BWRAP_MISSING, 1),  # the command's own words
    ("bwrap", ["samtools"], 2, BWRAP_MISSING, 2),
    ("charliecloud", ["/data/x.sh"], 1, CH_RUN_DENIED, 126),
    ("charliecloud", ["samtools"], 1, CH_RUN_MISSING, 127),
    ("charliecloud", ["samtools"], 1, BWRAP_MISSING, 1),
    ("proot", ["sh"], 255, PROOT_KILLED, 143),
    ("proot", ["sh"], 255, "no line\n", 255),
    ("proot", ["sh"], 0, "proot info: pid 7: terminated with signal 9\n", 0),
    ("bwrap", ["sh"], -9, "", 137),
    ("docker", ["samtools"], 127, "", 127),  # an engine template's own code
    ("docker", ["samtools"], 1, BWRAP_MISSING, 1),
])
def test_engine_lines_map_to_shell_codes(driver, command, returncode, stderr, expected):
    assert shell_exit_code(driver, command, returncode, stderr) == expected
