"""The standalone worker on real tasks, with the bwrap driver over a busybox root fs."""

from __future__ import annotations

import signal
import time

import boto3

from funnel_hpc.core.events import read_event_log
from tests.waiting import wait_for
from tests.worker_helpers import need, processes_with_argv, sh


def test_multi_executor_with_streams_env_and_workdir(harness):
    task = harness.task(
        inputs=[{"path": "/data/in.txt", "content": "line one\nline two\n"}],
        executors=[
            sh("pwd; echo $GREETING; cat; echo oops >&2", env={"GREETING": "hi there"},
               workdir="/data", stdin="/data/in.txt", stdout="/data/out1.txt",
               stderr="/data/err1.txt"),
            sh("wc -l < /data/out1.txt"),
        ],
    )
    run = harness.run(task)
    assert run.exit_code == 0 and run.state == "COMPLETE", run.stderr
    first = run.executor(0)
    assert first["exit_code"] == 0
    assert first["stdout"] == "/data\nhi there\nline one\nline two\n"
    assert first["stderr"] == "oops\n"
    assert run.host("/data/out1.txt").read_text() == first["stdout"]
    assert run.host("/data/err1.txt").read_text() == "oops\n"
    assert run.executor(1)["stdout"].strip() == "4"
    assert "image busybox: docker.io/library/busybox:latest@sha256:" in run.system_logs
    assert run.fold.task_log["start_time"] <= run.fold.task_log["end_time"]
    assert run.fold.task_log["metadata"]["container_driver"] == "bwrap"


def test_executor_error_stops_unless_ignore_error(harness):
    task = harness.task(executors=[sh("echo a; exit 3", ignore_error=True), sh("exit 5"),
                                   sh("echo never")])
    run = harness.run(task)
    assert run.state == "EXECUTOR_ERROR" and run.exit_code == 1
    codes = [e.get("exit_code") for e in run.fold.task_log["logs"]]
    assert codes == [3, 5]  # the third executor never ran


def test_volumes_are_shared_between_executors(harness):
    task = harness.task(volumes=["/vol/shared"],
                        executors=[sh("echo from-one > /vol/shared/x"), sh("cat /vol/shared/x")])
    run = harness.run(task)
    assert run.state == "COMPLETE"
    assert run.executor(1)["stdout"] == "from-one\n"


def test_file_inputs_directories_and_outputs(harness):
    (harness.data / "ref").mkdir()
    (harness.data / "ref" / "a.txt").write_text("A")
    (harness.data / "ref" / "sub").mkdir()
    (harness.data / "ref" / "sub" / "b.txt").write_text("BB")
    (harness.data / "single.txt").write_text("single")
    out = harness.data / "results"
    task = harness.task(
        inputs=[{"path": "/in/ref", "url": f"file://{harness.data / 'ref'}", "type": "DIRECTORY"},
                {"path": "/in/single.txt", "url": str(harness.data / "single.txt")}],
        outputs=[
            {"path": "/out/dir", "url": f"file://{out}/dir", "type": "DIRECTORY"},
            {"path": "/out/many/*.txt", "path_prefix": "/out/many/", "url": f"file://{out}/many"},
            {"path": "/out/one.txt", "url": f"file://{out}/one.txt"},
        ],
        executors=[sh("mkdir -p /out/dir/deep /out/many && cp -r /in/ref/* /out/dir/ && "
                      "echo x > /out/dir/deep/c.txt && echo 1 > /out/many/1.txt && "
                      "echo 22 > /out/many/2.txt && echo skip > /out/many/3.dat && "
                      "cat /in/single.txt > /out/one.txt")],
    )
    run = harness.run(task)
    assert run.state == "COMPLETE", run.system_logs
    assert (out / "dir" / "a.txt").read_text() == "A"
    assert (out / "dir" / "sub" / "b.txt").read_text() == "BB"
    assert (out / "dir" / "deep" / "c.txt").read_text() == "x\n"
    assert sorted(p.name for p in (out / "many").iterdir()) == ["1.txt", "2.txt"]
    assert (out / "one.txt").read_text() == "single"
    logged = {o["path"]: o for o in run.fold.task_log["outputs"]}
    assert logged["/out/many/2.txt"] == {"url": f"file://{out}/many/2.txt",
                                         "path": "/out/many/2.txt", "size_bytes": "3"}
    assert logged["/out/dir/sub/b.txt"]["size_bytes"] == "2"
    assert set(logged) == {"/out/dir/a.txt", "/out/dir/sub/b.txt", "/out/dir/deep/c.txt",
                           "/out/many/1.txt", "/out/many/2.txt", "/out/one.txt"}


def test_missing_input_is_system_error_naming_the_url(harness):
    url = f"file://{harness.data}/does-not-exist.txt"
    run = harness.run(harness.task(inputs=[{"path": "/in/x", "url": url}],
                                   executors=[sh("echo never")]))
    assert run.state == "SYSTEM_ERROR" and run.exit_code == 2
    assert url in run.system_logs
    assert run.fold.task_log["logs"] == []  # no executor ran


def test_file_outside_allowed_dirs_is_refused(harness):
    run = harness.run(harness.task(inputs=[{"path": "/in/passwd", "url": "file:///etc/passwd"}],
                                   executors=[sh("cat /in/passwd")]))
    assert run.state == "SYSTEM_ERROR"
    assert "outside the allowed directories" in run.system_logs
    assert not run.host("/in/passwd").exists()


def test_output_symlink_escaping_the_task_is_not_uploaded(harness):
    out = harness.data / "leak.txt"
    run = harness.run(harness.task(
        outputs=[{"path": "/out/secret", "url": f"file://{out}"}],
        executors=[sh("ln -s /etc/hostname /out/secret")]))
    assert run.state == "SYSTEM_ERROR"
    assert "outside the task directory" in run.system_logs
    assert not out.exists()


def test_unknown_url_scheme_is_refused(harness):
    run = harness.run(harness.task(inputs=[{"path": "/in/x", "url": "gopher://h/x"}],
                                   executors=[sh("true")]))
    assert run.state == "SYSTEM_ERROR" and "not allowed" in run.system_logs


def test_missing_container_driver_is_system_error(harness):
    run = harness.run(harness.task(executors=[sh("true")]),
                      config=harness.config(container_driver="apptainer"))
    assert run.state == "SYSTEM_ERROR"
    assert "apptainer" in run.system_logs


def test_an_image_that_cannot_be_had_is_system_error_unless_host_root_is_allowed(harness):
    task = harness.task(executors=[
        {"image": "127.0.0.1:5055/no/such-image:1", "command": ["true"]}])
    run = harness.run(task)
    assert run.state == "SYSTEM_ERROR"
    assert "image 127.0.0.1:5055/no/such-image:1" in run.system_logs
    assert "not_found" in run.system_logs
    assert run.fold.task_log["logs"] == []  # nothing ran, not even over the host
    allowed = harness.run(harness.task(executors=[
        {"image": "127.0.0.1:5055/no/such-image:1", "command": ["cat", "/etc/debian_version"]}]),
        config=harness.config(host_root="allow"))
    assert allowed.state == "COMPLETE", allowed.system_logs
    assert allowed.executor(0)["stdout"].strip()  # the host's Debian version
    assert "HOST ROOT" in allowed.system_logs and "host_root" in allowed.system_logs


def test_proot_driver(harness):
    need("proot")
    run = harness.run(harness.task(inputs=[{"path": "/in/x.txt", "content": "via proot"}],
                                   executors=[sh("cat /in/x.txt")]),
                      config=harness.config(container_driver="proot"))
    assert run.state == "COMPLETE", run.system_logs
    assert run.executor(0)["stdout"] == "via proot"


def test_auto_driver_picks_one_that_runs(harness):
    run = harness.run(harness.task(executors=[sh("echo auto")]),
                      config=harness.config(container_driver="auto"))
    assert run.state == "COMPLETE", run.system_logs
    assert run.fold.task_log["metadata"]["container_driver"] in ("docker", "podman", "bwrap",
                                                                 "proot", "apptainer")


def test_cancel_mid_run_with_sigterm(harness):
    task = harness.task(executors=[sh("echo started; exec sleep 617"), sh("echo never")])
    proc = harness.start(task)
    events = harness.workdir / task["id"] / "events.jsonl"
    wait_for(lambda: processes_with_argv(["sleep", "617"]), 30, "the executor to start",
             interval=0.1)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    fold = read_event_log(events)
    assert fold.state == "CANCELED" and proc.returncode == 3
    assert len(fold.task_log["logs"]) == 1  # the second executor never started
    assert processes_with_argv(["sleep", "617"]) == []  # nothing of the executor is left
    assert "signal SIGTERM" in "\n".join(fold.task_log["system_logs"])


def test_reader_rebuilds_the_run_from_the_file_alone(harness):
    run = harness.run(harness.task(executors=[sh("echo one"), sh("echo two >&2")]))
    again = read_event_log(run.task_dir / "events.jsonl")
    assert again.state == run.state == "COMPLETE"
    assert again.task_log == run.fold.task_log
    # a torn last line (a crash mid-write) is ignored
    with (run.task_dir / "events.jsonl").open("a") as fh:
        fh.write('{"seq": 999, "type": "state", "state": "SYSTEM_')
    assert read_event_log(run.task_dir / "events.jsonl").state == "COMPLETE"


def test_s3_inputs_and_outputs_on_a_moto_server(harness, moto_s3):
    endpoint, env = moto_s3
    harness.env.update(env)
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket="tes")
    s3.put_object(Bucket="tes", Key="in/a.txt", Body=b"from s3")
    s3.put_object(Bucket="tes", Key="ref/x/1.txt", Body=b"1")
    s3.put_object(Bucket="tes", Key="ref/x/sub/2.txt", Body=b"22")
    config = harness.config()
    config.write_text(config.read_text() + f"storage:\n  s3:\n    endpoint_url: {endpoint}\n")
    run = harness.run(harness.task(
        inputs=[{"path": "/in/a.txt", "url": "s3://tes/in/a.txt"},
                {"path": "/in/ref", "url": "s3://tes/ref/x", "type": "DIRECTORY"}],
        outputs=[{"path": "/out/r.txt", "url": "s3://tes/out/r.txt"},
                 {"path": "/out/d", "url": "s3://tes/out/d", "type": "DIRECTORY"}],
        executors=[sh("mkdir -p /out/d && cat /in/a.txt /in/ref/1.txt /in/ref/sub/2.txt "
                      "> /out/r.txt && echo z > /out/d/z.txt")]), config=config)
    assert run.state == "COMPLETE", run.system_logs
    body = s3.get_object(Bucket="tes", Key="out/r.txt")["Body"].read()
    assert body == b"from s3122"
    assert s3.get_object(Bucket="tes", Key="out/d/z.txt")["Body"].read() == b"z\n"
    missing = harness.run(harness.task(inputs=[{"path": "/in/n", "url": "s3://tes/nope.txt"}],
                                       executors=[sh("true")]), config=config)
    assert missing.state == "SYSTEM_ERROR" and "s3://tes/nope.txt" in missing.system_logs


def test_http_input(harness, http_root):
    root, base = http_root
    (root / "hello.txt").write_text("over http")
    run = harness.run(harness.task(inputs=[{"path": "/in/h.txt", "url": f"{base}/hello.txt"}],
                                   executors=[sh("cat /in/h.txt")]))
    assert run.state == "COMPLETE" and run.executor(0)["stdout"] == "over http"
    missing = harness.run(harness.task(inputs=[{"path": "/in/h", "url": f"{base}/none.txt"}],
                                       executors=[sh("true")]))
    assert missing.state == "SYSTEM_ERROR" and "HTTP 404" in missing.system_logs


def test_ftp_input_and_output(harness, ftp_root):
    root, base = ftp_root
    (root / "in").mkdir()
    (root / "in" / "f.txt").write_text("over ftp")
    run = harness.run(harness.task(inputs=[{"path": "/in/f.txt", "url": f"{base}/in/f.txt"}],
                                   outputs=[{"path": "/out/g.txt", "url": f"{base}/out/g.txt"}],
                                   executors=[sh("tr a-z A-Z < /in/f.txt > /out/g.txt")]))
    assert run.state == "COMPLETE", run.system_logs
    assert (root / "out" / "g.txt").read_text() == "OVER FTP"
    assert "secret" not in run.system_logs


def test_100mb_stdout_keeps_worker_small_and_tail_exact(harness):
    """100 MB through stdout: worker peak RSS < 100 MB, log keeps exactly the last 10 KiB."""
    script = ("i=0; while [ $i -lt 1600 ]; do "
              "head -c 65535 /dev/zero | tr '\\0' 'x'; echo; i=$((i+1)); done; "
              "printf 'THE-END'")
    task = harness.task(executors=[sh(script, stdout="/out/big.txt")])
    proc = harness.start(task)
    peak_kb = 0
    while proc.poll() is None:
        try:
            status = open(f"/proc/{proc.pid}/status").read()
            peak_kb = max(peak_kb, int(status.split("VmHWM:")[1].split()[0]))
        except (OSError, IndexError):
            pass
        time.sleep(0.05)
    proc.communicate()
    fold = read_event_log(harness.workdir / task["id"] / "events.jsonl")
    assert fold.state == "COMPLETE"
    big = harness.workdir / task["id"] / "files" / "out" / "big.txt"
    assert big.stat().st_size == 1600 * 65536 + 7
    tail = fold.task_log["logs"][0]["stdout"]
    assert len(tail.encode()) == 10240
    with big.open("rb") as fh:
        fh.seek(-10240, 2)
        assert fh.read().decode() == tail
    assert tail.endswith("THE-END")
    assert 0 < peak_kb < 100 * 1024, f"worker peak RSS {peak_kb} kB"
