"""py-tes 0.4.2 (the version snakemake-executor-plugin-tes pins) driving a funnel server the
way that plugin does, on the legacy /v1 routes. Run by tests/test_pytes.py with the Python
of a separate virtualenv holding py-tes 0.4.2 and six; prints one JSON report.

Usage: python pytes042_client.py SERVER_URL queued|run [OUTPUT_DIR]
"""

from __future__ import annotations

import json
import sys

import tes

from tests.waiting import wait_for


def snakemake_like_task(script: str, output_dir: str | None) -> tes.Task:
    """What the plugin sends: the job script as content (url None), file:// outputs,
    cpu/ram/disk, one bash-like executor with a workdir."""
    outputs = [tes.Output(path="/tmp/result.txt", url=f"file://{output_dir}/result.txt")] \
        if output_dir else [tes.Output(path="/tmp/result.txt", url="file:///srv/result.txt")]
    return tes.Task(
        name="snakejob.rule_a.1", description="rule a",
        inputs=[tes.Input(path="/tmp/run_snakemake.sh", content=script, url=None)],
        outputs=outputs,
        executors=[tes.Executor(image="busybox", command=["/bin/sh", "/tmp/run_snakemake.sh"],
                                workdir="/tmp")],
        resources=tes.Resources(cpu_cores=1, ram_gb=1, disk_gb=1))


def queued(client: tes.HTTPClient) -> dict:
    task_id = client.create_task(snakemake_like_task("echo hi > /tmp/result.txt\n", None))
    report: dict = {"id": task_id}
    for view in ("MINIMAL", "BASIC", "FULL"):
        task = client.get_task(task_id, view=view)
        report[view] = {"state": task.state, "name": task.name,
                        "content": task.inputs[0].content if task.inputs else None}
    # as the plugin lists (pages holding TES 1.1 fields: test_pytes_legacy.py)
    page = client.list_tasks(view="MINIMAL", page_size=5)
    report["listed"] = [t.id for t in page.tasks]
    client.cancel_task(task_id)
    report["after_cancel"] = client.get_task(task_id, view="MINIMAL").state
    try:
        client.get_service_info()
        report["service_info"] = "ok"
    except Exception as exc:  # noqa: BLE001 - the report says what py-tes 0.4.2 raised
        report["service_info"] = type(exc).__name__
    return report


def run(client: tes.HTTPClient, output_dir: str) -> dict:
    done = client.create_task(snakemake_like_task("echo hello > /tmp/result.txt\n",
                                                  output_dir))
    finished = client.wait(done, timeout=120)
    full = client.get_task(done, view="FULL")
    executor_log = full.logs[0].logs[0]
    report: dict = {"state": finished.state, "exit_code": executor_log.exit_code,
                    "end_time_parsed": executor_log.end_time is not None}
    sleeper = client.create_task(snakemake_like_task("sleep 600\n", output_dir))

    def running() -> tes.Task | None:  # the executor started: its log exists
        task = client.get_task(sleeper, view="FULL")
        return task if task.state == "RUNNING" and task.logs and task.logs[0].logs else None

    report["running_exit_code"] = wait_for(running, 120, "the sleeper to run").logs[0].logs[0] \
        .exit_code
    report["listed_full"] = len(client.list_tasks(view="FULL", page_size=10).tasks)
    client.cancel_task(sleeper)
    report["canceled"] = client.wait(sleeper, timeout=120).state
    return report


def main() -> None:
    client = tes.HTTPClient(sys.argv[1], timeout=10)
    mode = sys.argv[2]
    report = queued(client) if mode == "queued" else run(client, sys.argv[3])
    print(json.dumps(report))


if __name__ == "__main__":
    main()
