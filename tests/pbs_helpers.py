"""A PBS scheduler double for the PBS backend tests (no PBS server can be installed here).

``FakePbs(root)`` writes executables ``qsub``, ``qstat``, ``qdel`` and ``qselect`` into
``root/bin`` (put first on PATH by the ``fake_pbs`` fixture, so the backend runs them as
real processes through its real runner). They answer from a recorded
``qstat -f -F json`` document (``tests/data/pbs/``, see its README: written by hand in
the shape OpenPBS prints, not captured from a server), which qsub and qdel change as a
server would (a new job queued; a deleted job finished with substate 91). Each call is
appended to ``root/state/calls.jsonl`` with its argv (and, for qsub, the script it was
given, read at the time of the call). ``fail(command, rc, stderr)`` makes a command
answer like a server in trouble until ``clear()``.

With ``execute=True`` the double also runs what it is given, for the end-to-end test: qsub
copies the script (as a server spools it) and starts a detached ``pbs_mom`` (the same
program) that marks the job R, runs its script with ``/bin/bash`` (stdout and stderr into
the script's ``-o``/``-e`` files) and marks it F with its exit status (256 + the signal
when killed); qdel of a running job sends its process group SIGTERM and marks it F,
substate 91, Exit_status 271, as PBS does. What a server does beyond that (scheduling,
nodes, staging, limits) is not imitated.

Job arrays as PBS documents them: ``qsub -J first-last script`` prints ``N[].server`` and
makes the array (state B) and its subjobs ``N[i].server`` (each run by its own pbs_mom
with ``PBS_ARRAY_INDEX``, finished in state X); ``qstat -t`` lists an array's subjobs
with it; qdel of a subjob stops that one, of an array all of them; ``qselect -J`` lists
arrays only (qselect never lists subjobs).

What the fakes check, as the real commands would refuse it: qstat only in the form
``qstat -f -F json -x [-t] ID...``; qselect only with ``-x``, ``-u``, ``-N``, ``-J``; qsub
one readable script path, after ``-J first-last`` (last > first) for an array; qdel one id.
"""

from __future__ import annotations

import fcntl
import json
import sys
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data" / "pbs"
SERVER = "pbs-head"
COMMANDS = ("qsub", "qstat", "qdel", "qselect", "pbs_mom")

# the one program behind the four commands (its name says which); STATE is filled in
PROGRAM = r'''
import fcntl, json, os, pwd, signal, subprocess, sys
from pathlib import Path

STATE = Path(%(state)r)
SERVER = %(server)r
EXECUTE = %(execute)r
command = os.path.basename(sys.argv[0])
args = sys.argv[1:]


def update(job_id, **attributes):
    """Change a job unless it finished meanwhile (qdel); whether it was changed."""
    with open(STATE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        document = json.loads((STATE / "jobs.json").read_text())
        job = document["Jobs"][job_id]
        if job["job_state"] in ("F", "X"):
            return False
        job.update(attributes)
        (STATE / "jobs.json").write_text(json.dumps(document))
        return True


if command == "pbs_mom":  # runs one job: its script under bash, -o/-e its output files
    job_id, script, out_path, err_path = args[:4]
    env = dict(os.environ)
    if len(args) > 4:  # a subjob: its index, as PBS sets it
        env.update(PBS_ARRAY_INDEX=args[4], PBS_ARRAY_ID=args[5])
    if update(job_id, job_state="R", substate=42, pid=os.getpid()):
        with open(out_path, "w") as out_file, open(err_path, "w") as err_file:
            rc = subprocess.call(["/bin/bash", script], stdin=subprocess.DEVNULL,
                                 stdout=out_file, stderr=err_file, env=env)
        update(job_id, job_state="X" if len(args) > 4 else "F", substate=92,
               Exit_status=rc if rc >= 0 else 256 - rc)  # killed by a signal: 256 + it
    sys.exit(0)


def out(stdout="", stderr="", rc=0):
    sys.stdout.write(stdout)
    sys.stderr.write(stderr)
    sys.exit(rc)


def seq(job_id):
    return job_id.split(".", 1)[0]


with open(STATE / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    record = {"command": command, "argv": [command, *args]}
    if command == "qsub" and args and os.path.isfile(args[-1]):
        record["script"] = Path(args[-1]).read_text()
        record["mode"] = os.stat(args[-1]).st_mode & 0o777
    with open(STATE / "calls.jsonl", "a") as calls:
        calls.write(json.dumps(record) + "\n")
    failures = json.loads((STATE / "fail.json").read_text())
    if command in failures:
        answer = failures[command]
        out(answer["stdout"], answer["stderr"], answer["rc"])
    document = json.loads((STATE / "jobs.json").read_text())
    jobs = document.setdefault("Jobs", {})
    user = pwd.getpwuid(os.geteuid()).pw_name

    def find(job_id):
        for key in jobs:
            if key == job_id or seq(key) == seq(job_id):
                return key
        return None

    def subjobs(array_id):
        return [k for k in jobs if seq(k) != seq(array_id) and
                seq(k).split("[")[0] + "[]" == seq(array_id)]

    def save():
        (STATE / "jobs.json").write_text(json.dumps(document))

    if command == "qsub":
        indices = None
        if len(args) == 3 and args[0] == "-J":  # an array: -J first-last
            first, _, last = args[1].partition("-")
            if not (first.isdigit() and last.isdigit() and int(last) > int(first)):
                out(stderr="qsub: illegal -J value\n", rc=2)
            indices = range(int(first), int(last) + 1)
        elif len(args) != 1:
            out(stderr="usage: qsub [options] script\n", rc=2)
        if "script" not in record:
            out(stderr="usage: qsub [options] script\n", rc=2)
        options = {"-N": "STDIN", "-q": "workq", "-o": os.devnull, "-e": os.devnull}
        for line in record["script"].splitlines()[1:]:
            if not line.startswith("#PBS"):
                break  # qsub stops reading directives at the first command
            words = line.split()
            if words[1] in options:
                options[words[1]] = words[2]
        name, queue = options["-N"], options["-q"]
        number = max([int(seq(k).split("[")[0]) for k in jobs] + [1000]) + 1
        job_id = f"{number}{'[]' if indices else ''}.{SERVER}"
        base = {"Job_Name": name, "Job_Owner": f"{user}@login01", "job_state": "Q",
                "queue": queue, "server": SERVER, "Hold_Types": "n", "substate": 10}
        jobs[job_id] = dict(base)
        runs = [(job_id, [])]
        if indices:
            jobs[job_id].update(job_state="B", array="True",
                                array_indices_submitted=args[1])
            runs = []
            for index in indices:
                sub_id = f"{number}[{index}].{SERVER}"
                jobs[sub_id] = {**base, "array_id": job_id, "array_index": index}
                runs.append((sub_id, [str(index), job_id]))
        save()
        if EXECUTE:
            spooled = STATE / f"{number}.SC"  # qsub copies the script, as PBS does
            spooled.write_text(record["script"])
            for run_id, extra in runs:
                subprocess.Popen([str(Path(sys.argv[0]).parent / "pbs_mom"), run_id, str(spooled),
                                  options["-o"], options["-e"], *extra],
                                 start_new_session=True, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out(job_id + "\n")
    if command == "qstat":
        with_subjobs = args[4:5] == ["-t"]
        ids = args[5:] if with_subjobs else args[4:]
        if args[:4] != ["-f", "-F", "json", "-x"] or not ids:
            out(stderr="usage: qstat -f -F json -x [-t] job_identifier...\n", rc=2)
        shown, missing = {}, []
        for job_id in ids:
            key = find(job_id)
            if key is None:
                missing.append(job_id)
            else:
                shown[key] = jobs[key]
                if with_subjobs:
                    shown.update({k: jobs[k] for k in subjobs(key)})
        head = {k: v for k, v in document.items() if k != "Jobs"}
        text = json.dumps({**head, "Jobs": shown} if shown else head, indent=4)
        out(text + "\n", "".join(f"qstat: Unknown Job Id {j}\n" for j in missing),
            153 if missing else 0)
    if command == "qdel":
        if len(args) != 1:
            out(stderr="usage: qdel job_identifier\n", rc=2)
        key = find(args[0])
        if key is None:
            out(stderr=f"qdel: Unknown Job Id {args[0]}\n", rc=153)
        job = jobs[key]
        if job["job_state"] in ("F", "X", "M"):
            out(stderr=f"qdel: Job has finished {args[0]}\n", rc=35)
        for doomed in [key, *subjobs(key)]:
            job = jobs[doomed]
            if job["job_state"] in ("F", "X"):
                continue
            if job["job_state"] in ("R", "E"):
                job["Exit_status"] = 271
                if "pid" in job:
                    try:
                        os.killpg(job["pid"], signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            job.update(job_state="X" if "array_id" in job else "F", substate=91)
        save()
        out()
    if command == "qselect":
        options = {}
        rest = list(args)
        while rest:
            flag = rest.pop(0)
            if flag == "-x":
                options["x"] = True
            elif flag == "-J":
                options["J"] = True
            elif flag in ("-u", "-N") and rest:
                options[flag] = rest.pop(0)
            else:
                out(stderr=f"qselect: illegal option {flag}\n", rc=2)
        ids = [k for k, job in jobs.items()
               if ("-N" not in options or job["Job_Name"] == options["-N"])
               and ("-u" not in options or job["Job_Owner"].split("@")[0] == options["-u"])
               and (options.get("x") or job["job_state"] not in ("F", "X", "M"))
               and ("array_id" not in job)  # qselect lists arrays, not their subjobs
               and (not options.get("J") or job.get("array") == "True")]
        out("".join(f"{k}\n" for k in ids))
'''


class FakePbs:
    """The four PBS commands as executables under root/bin, answering from a recorded
    document in root/state (see the module docstring)."""

    def __init__(self, root: Path, document: str = "qstat-jobs.json", owner: str = "funnel",
                 execute: bool = False):
        self.bin = root / "bin"
        self.state = root / "state"
        self.bin.mkdir(parents=True)
        self.state.mkdir(parents=True)
        recorded = json.loads((DATA / document).read_text())
        for job in (recorded.get("Jobs") or {}).values():
            job["Job_Owner"] = f"{owner}@login01"
        (self.state / "jobs.json").write_text(json.dumps(recorded))
        (self.state / "calls.jsonl").write_text("")
        self.clear()
        program = self.bin / "fakepbs.py"
        program.write_text(f"#!{sys.executable}\n"
                           + PROGRAM % {"state": str(self.state), "server": SERVER,
                                        "execute": execute})
        program.chmod(0o755)
        for command in COMMANDS:
            (self.bin / command).symlink_to(program)

    def calls(self, command: str | None = None) -> list[dict[str, Any]]:
        """Every call so far (argv, and for qsub the script and its mode), oldest first."""
        lines = (self.state / "calls.jsonl").read_text().splitlines()
        every = [json.loads(line) for line in lines]
        return [c for c in every if command is None or c["command"] == command]

    def argv(self, command: str) -> list[list[str]]:
        return [call["argv"] for call in self.calls(command)]

    def fail(self, command: str, rc: int, stderr: str, stdout: str = "") -> None:
        failures = json.loads((self.state / "fail.json").read_text())
        failures[command] = {"rc": rc, "stderr": stderr, "stdout": stdout}
        (self.state / "fail.json").write_text(json.dumps(failures))

    def clear(self) -> None:
        (self.state / "fail.json").write_text("{}")

    def jobs(self) -> dict[str, dict[str, Any]]:
        with open(self.state / "lock", "w") as lock:  # the commands rewrite it under the lock
            fcntl.flock(lock, fcntl.LOCK_EX)
            jobs: dict[str, dict[str, Any]] = json.loads(
                (self.state / "jobs.json").read_text()).get("Jobs") or {}
        return jobs

    def set_job(self, job_id: str, **attributes: Any) -> None:
        """Change a job as the server would (e.g. job_state="R")."""
        document = json.loads((self.state / "jobs.json").read_text())
        document["Jobs"][job_id].update(attributes)
        (self.state / "jobs.json").write_text(json.dumps(document))
