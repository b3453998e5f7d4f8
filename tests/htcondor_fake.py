"""The recorded-contract HTCondor schedd of the tests (no HTCondor daemon can run here).

``FakeSchedd`` answers like ``htcondor2.Schedd`` from the job ClassAds in
``tests/backends_cloud/recorded/`` (written by hand from the documented job
attributes, NOT captured from a live schedd; see that README): constraints are
evaluated by the real ClassAd library (classad2), submit descriptions must be
real ``htcondor2.Submit`` objects, actions real ``JobAction`` members; every
call is recorded.

A submit with ``count`` N (a job array) makes ONE cluster of N procs (ProcId 0..N-1), as
the bindings document ``Schedd.submit(description, count)``; ``batch_name`` becomes each
proc's ``JobBatchName``, ``+Attr`` commands their attributes.

``ExecutingSchedd`` adds what a schedd and its execute slots do with the jobs
submitted to it, for the end-to-end tests: it runs each job's executable (the
backend's wrapper script, which execs the funnel worker) as a local process, with its
``arguments`` (``$(Process)`` expanded to the proc's number, as condor_submit does),
at most ``slots`` at once in (ClusterId, ProcId) order, moving the job's ad through Idle
(1), Running (2) and Completed (4, with ExitCode or ExitBySignal) into the
history; ``act(Remove)`` sends the job SIGTERM (SIGKILL 5 s later), marks it
Removed (3) with the reason, and it leaves the queue when its process is gone.
What HTCondor does beyond that (matchmaking, shadows, file transfer, the job
event log) is not imitated.

``serve(schedd)`` publishes a schedd over XML-RPC on 127.0.0.1 so a gateway in
another process can use it through ``tests.htcondor_recorded_bindings``
(config ``backend.htcondor.bindings``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any
from xmlrpc.server import SimpleXMLRPCServer

RECORDED = Path(__file__).resolve().parent / "backends_cloud" / "recorded"
KILL_GRACE_SECONDS = 5.0


class FakeSubmitResult:
    def __init__(self, cluster: int):
        self._cluster = cluster

    def cluster(self) -> int:
        return self._cluster


class FakeSchedd:
    """Answers like htcondor2.Schedd from the ClassAds in recorded/ (see the module docstring)."""

    def __init__(self, fail: Exception | None = None):
        import classad2
        import htcondor2

        self.classad = classad2
        self.htcondor = htcondor2
        self.fail = fail
        self.queue = [classad2.ClassAd(ad) for ad in
                      json.loads((RECORDED / "queue.json").read_text())]
        self.past = [classad2.ClassAd(ad) for ad in
                     json.loads((RECORDED / "history.json").read_text())]
        self.calls: list[tuple[str, dict]] = []
        self.next_cluster = 200

    def _matching(self, ads: list, constraint: str) -> list:
        expression = self.classad.ExprTree(str(constraint))
        return [ad for ad in ads if expression.eval(ad) is True]

    def _project(self, ad: Any, projection: list[str]) -> Any:
        if not projection:
            return ad
        return self.classad.ClassAd({k: ad[k] for k in projection if k in ad})

    def query(self, constraint: str = "True", projection: list[str] | None = None, **_kw):
        self.calls.append(("query", {"constraint": constraint, "projection": projection}))
        if self.fail:
            raise self.fail
        return [self._project(ad, projection or [])
                for ad in self._matching(self.queue, constraint)]

    def history(self, constraint=None, projection=None, match: int = -1, **_kw):
        self.calls.append(("history", {"constraint": constraint, "projection": projection,
                                       "match": match}))
        if self.fail:
            raise self.fail
        ads = self._matching(self.past, constraint or "True")
        ads = ads[:match] if match >= 0 else ads
        return iter([self._project(ad, projection or []) for ad in ads])

    def submit(self, description: Any, count: int = 0, **_kw) -> FakeSubmitResult:
        assert isinstance(description, self.htcondor.Submit)
        self.calls.append(("submit", {"description": dict(description), "count": count}))
        if self.fail:
            raise self.fail
        cluster = self.next_cluster
        self.next_cluster += 1
        attributes: dict[str, Any] = {"JobStatus": 1}
        if "MY.FunnelTaskId" in description:
            attributes["FunnelTaskId"] = self.classad.ExprTree(
                description["MY.FunnelTaskId"]).eval()
        if "batch_name" in description:
            attributes["JobBatchName"] = description["batch_name"]
        for proc in range(max(1, count)):
            self.queue.append(self.classad.ClassAd({"ClusterId": cluster, "ProcId": proc,
                                                    **attributes}))
        return FakeSubmitResult(cluster)

    def act(self, action: Any, job_spec: Any, reason: str | None = None) -> Any:
        assert isinstance(action, self.htcondor.JobAction)
        self.calls.append(("act", {"action": action, "job_spec": job_spec, "reason": reason}))
        if self.fail:
            raise self.fail
        hits = self._matching(self.queue, job_spec)
        for ad in hits:  # condor_rm: Removed, then out of the queue into history
            self._remove(ad, reason or "")
        return self.classad.ClassAd({"TotalSuccess": len(hits), "TotalNotFound": 0,
                                     "TotalJobAds": len(hits)})

    def _remove(self, ad: Any, reason: str) -> None:
        ad["JobStatus"] = 3
        ad["RemoveReason"] = reason
        self.queue.remove(ad)
        self.past.insert(0, ad)

    def named(self, name: str) -> list[dict]:
        return [params for call, params in self.calls if call == name]


class ExecutingSchedd(FakeSchedd):
    """A FakeSchedd whose submitted jobs run here as local processes (module docstring)."""

    def __init__(self, slots: int = 2):
        super().__init__()
        self.slots = slots
        self.lock = threading.RLock()
        self.descriptions: dict[int, dict[str, str]] = {}  # by cluster
        self.procs: dict[tuple[int, int], subprocess.Popen] = {}  # by (cluster, proc)
        self.kill_at: dict[tuple[int, int], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run_slots, daemon=True)
        self._thread.start()

    def query(self, *args: Any, **kwargs: Any):
        with self.lock:
            return super().query(*args, **kwargs)

    def history(self, *args: Any, **kwargs: Any):
        with self.lock:
            return super().history(*args, **kwargs)

    def submit(self, description: Any, count: int = 0, **kwargs: Any) -> FakeSubmitResult:
        with self.lock:
            result = super().submit(description, count, **kwargs)
            self.descriptions[result.cluster()] = dict(description)
            return result

    def act(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return super().act(*args, **kwargs)

    def _remove(self, ad: Any, reason: str) -> None:
        proc = self.procs.get(_job(ad))
        if proc is None or proc.poll() is not None:
            super()._remove(ad, reason)
            return
        ad["JobStatus"] = 3  # Removed, still in the queue until its process is gone
        ad["RemoveReason"] = reason
        os.killpg(proc.pid, signal.SIGTERM)
        self.kill_at[_job(ad)] = time.monotonic() + KILL_GRACE_SECONDS

    def remove_outside(self, job_id: str, reason: str = "removed by an administrator") -> None:
        """condor_rm by someone else: act(Remove) without the gateway ("C" or "C.P")."""
        cluster, _, proc = str(job_id).partition(".")
        spec = f"ClusterId == {int(cluster)}" + (f" && ProcId == {int(proc)}" if proc else "")
        self.act(self.htcondor.JobAction.Remove, spec, reason)

    def _run_slots(self) -> None:
        while not self._stop.wait(0.1):
            with self.lock:
                self._reap()
                self._start_idle()

    def _reap(self) -> None:
        for ad in list(self.queue):
            job = _job(ad)
            proc = self.procs.get(job)
            if proc is None:
                continue
            code = proc.poll()
            if code is None:
                if time.monotonic() > self.kill_at.get(job, float("inf")):
                    os.killpg(proc.pid, signal.SIGKILL)
                continue
            del self.procs[job]
            self.kill_at.pop(job, None)
            if ad["JobStatus"] != 3:
                ad["JobStatus"] = 4
                ad["ExitBySignal"] = code < 0
                if code < 0:
                    ad["ExitSignal"] = -code
                else:
                    ad["ExitCode"] = code
            self.queue.remove(ad)
            self.past.insert(0, ad)

    def _start_idle(self) -> None:
        idle = sorted((ad for ad in self.queue if ad["JobStatus"] == 1
                       and int(ad["ClusterId"]) in self.descriptions), key=_job)
        for ad in idle[:max(0, self.slots - len(self.procs))]:
            job = _job(ad)
            self.procs[job] = self._execute(self.descriptions[job[0]], job[1])
            ad["JobStatus"] = 2

    @staticmethod
    def _execute(description: dict[str, str], proc: int) -> subprocess.Popen:
        """The job's executable in its initialdir with its arguments ($(Process) expanded),
        output/error to the described files, in a minimal environment (HTCondor does not
        pass the submitter's by default)."""
        arguments = description.get("arguments", "").replace("$(Process)", str(proc)).split()
        with open(description["output"], "ab") as out, open(description["error"], "ab") as err:
            return subprocess.Popen([description["executable"], *arguments],
                                    cwd=description["initialdir"],
                                    stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
                                    start_new_session=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self.lock:
            for proc in self.procs.values():
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)


def _job(ad: Any) -> tuple[int, int]:
    """(ClusterId, ProcId) of a job ad."""
    return int(ad["ClusterId"]), int(ad.get("ProcId", 0) or 0)


# ---- the schedd over XML-RPC, for a gateway in another process ----

def plain(ad: Any) -> dict[str, Any]:
    """A ClassAd as a dict of literal values (what XML-RPC can carry)."""
    out = {}
    for key in ad.keys():
        value = ad.eval(key)
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
    return out


class ScheddService:
    """The XML-RPC face of a schedd: ClassAds as dicts, the Submit as its commands."""

    def __init__(self, schedd: FakeSchedd):
        self.schedd = schedd

    def query(self, constraint: str, projection: list[str]) -> list[dict]:
        return [plain(ad) for ad in self.schedd.query(constraint=constraint,
                                                      projection=projection)]

    def history(self, constraint: str, projection: list[str], match: int) -> list[dict]:
        return [plain(ad) for ad in self.schedd.history(constraint=constraint,
                                                        projection=projection, match=match)]

    def submit(self, commands: dict[str, str], count: int) -> int:
        description = self.schedd.htcondor.Submit(commands)
        return self.schedd.submit(description, count=count).cluster()

    def act(self, action: str, job_spec: str, reason: str) -> dict:
        member = self.schedd.htcondor.JobAction[action]
        return plain(self.schedd.act(member, job_spec, reason or None))


def serve(schedd: FakeSchedd) -> tuple[SimpleXMLRPCServer, str]:
    """Serve schedd on 127.0.0.1 (a thread); returns the server and its URL."""
    from socketserver import ThreadingMixIn

    class Server(ThreadingMixIn, SimpleXMLRPCServer):
        daemon_threads = True

    server = Server(("127.0.0.1", 0), allow_none=True, logRequests=False)
    server.register_instance(ScheddService(schedd))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
