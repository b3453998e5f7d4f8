"""One py-tes 0.4.2 call on the legacy /v1 routes, as snakemake-executor-plugin-tes makes
it; prints one JSON line. Run by tests/test_pytes_legacy.py with the Python of a separate
virtualenv holding py-tes 0.4.2 and six (not this project's), so it imports only py-tes.

Usage: python pytes_legacy_client.py URL AUTH OP [ARG...]
  AUTH: "-" (anonymous: py-tes 0.4.2 then sends Basic None:None), "basic:USER:PASSWORD"
  or "token:TOKEN"; OP: create SCRIPT | get ID VIEW | list VIEW | cancel ID | wait ID SECONDS
A failure is reported, not raised: {"error": "<exception type>", "status": <HTTP status>}.
"""

from __future__ import annotations

import json
import sys

import requests
import tes
from tes.utils import UnmarshalError


def client(url: str, auth: str) -> tes.HTTPClient:
    kind, _, rest = auth.partition(":")
    if kind == "basic":
        user, _, password = rest.partition(":")
        return tes.HTTPClient(url, timeout=30, user=user, password=password)
    if kind == "token":
        return tes.HTTPClient(url, timeout=30, token=rest)
    return tes.HTTPClient(url, timeout=30)


def plugin_task(script: str) -> tes.Task:
    """The shape the plugin sends: the job script as an input's content at
    /tmp/run_snakemake.sh (url None), one executor in /tmp, cpu/ram/disk."""
    return tes.Task(
        name="snakejob.hello.1", description="rule hello",
        inputs=[tes.Input(path="/tmp/run_snakemake.sh", content=script, url=None)],
        outputs=[],
        executors=[tes.Executor(image="busybox", command=["/bin/sh", "/tmp/run_snakemake.sh"],
                                workdir="/tmp")],
        resources=tes.Resources(cpu_cores=1, ram_gb=1, disk_gb=1))


def describe(task: tes.Task) -> dict:
    executor_logs = [log.as_dict() for entry in task.logs or [] for log in entry.logs or []]
    return {"id": task.id, "state": task.state, "name": task.name,
            "content": task.inputs[0].content if task.inputs else None,
            "executor_logs": executor_logs}


def call(api: tes.HTTPClient, op: str, args: list[str]) -> dict:
    if op == "create":
        return {"id": api.create_task(plugin_task(args[0]))}
    if op == "get":
        return describe(api.get_task(args[0], view=args[1]))
    if op == "list":
        return {"tasks": [describe(task) for task in api.list_tasks(view=args[0]).tasks or []]}
    if op == "cancel":
        api.cancel_task(args[0])
        return {}
    if op == "wait":
        return describe(api.wait(args[0], timeout=int(args[1])))
    raise SystemExit(f"unknown operation {op!r}")


def main() -> None:
    url, auth, op, *args = sys.argv[1:]
    try:
        report = call(client(url, auth), op, args)
    except UnmarshalError as error:
        report = {"error": "UnmarshalError", "message": str(error)[-2000:]}
    except requests.HTTPError as error:
        report = {"error": "HTTPError", "status": error.response.status_code}
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
