"""Driver and sandbox argv, without running them: engine templates (apptainer's image URIs),
bwrap's read-only image binds, the sandbox user and the traversal ACL."""

from __future__ import annotations

import os
import subprocess

import pytest

from funnel_hpc.core import config as config_mod
from funnel_hpc.worker import sandbox
from funnel_hpc.worker.drivers import DriverError, Drivers, image_uri


def drivers(tmp_path, **worker) -> Drivers:
    return Drivers(config_mod.load(environ={}, overrides={"worker": worker}).for_worker(),
                   tmp_path)


@pytest.mark.parametrize("image, uri", [
    ("busybox", "docker://busybox"),
    ("ghcr.io/org/tool:1.0", "docker://ghcr.io/org/tool:1.0"),
    ("/shared/images/tool.sif", "/shared/images/tool.sif"),
    ("oras://ghcr.io/org/tool:1.0", "oras://ghcr.io/org/tool:1.0"),
    ("docker://alpine", "docker://alpine"),
])
def test_apptainer_gets_docker_uris_local_sif_and_oras_passed_through(
        tmp_path, monkeypatch, image, uri):
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")
    for engine in ("apptainer", "singularity"):
        argv = drivers(tmp_path).invocation(engine, image, ["true"], {}, None, []).argv
        assert argv[:3] == [engine, "exec", "--containall"] and argv[-2:] == [uri, "true"]
    assert image_uri(image) == uri


def test_bwrap_binds_the_image_read_only_and_only_the_task_dirs(tmp_path):
    root = tmp_path / "rootfs"
    for directory in ("bin", "etc", "usr/share", "dev", "proc", "tmp"):
        (root / directory).mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    (root / "etc" / "os-release").write_text("ID=x\n")
    argv = sandbox.bwrap_argv(str(root), [("/w/t/files/usr/share/data", "/usr/share/data"),
                                          ("/w/t/files/out", "/out")],
                              {"PATH": "/bin"}, None, ["sh"], "none")
    pairs = list(zip(argv, argv[1:], argv[2:], strict=False))
    assert ("--ro-bind", str(root / "bin"), "/bin") in pairs
    assert ("--ro-bind", str(root / "etc"), "/etc") in pairs
    assert ("--symlink", "usr/lib", "/lib") in pairs
    # /usr/share/data is not in the image: /usr and /usr/share become tmpfs dirs whose
    # entries are bound one by one (never a mkdir in the shared image)
    assert ("--ro-bind", str(root / "usr"), "/usr") not in pairs
    assert "--dir" in argv and argv[argv.index("--dir") + 1] == "/usr"
    assert ("--bind", "/w/t/files/out", "/out") in pairs
    assert all(not arg.startswith("/w/t") or arg.startswith("/w/t/files/") for arg in argv)
    for source in (str(root / "dev"), str(root / "proc"), str(root / "tmp")):
        assert source not in argv  # the sandbox's own /dev, /proc and tmpfs /tmp
    for flag in ("--unshare-user", "--unshare-pid", "--unshare-net", "--clearenv",
                 "--die-with-parent", "--new-session"):
        assert flag in argv
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    assert argv[-2:] == ["--", "sh"]


def test_the_sandbox_user_is_never_root(tmp_path):
    if os.geteuid() != 0:
        assert sandbox.sandbox_ids("root") is None  # nothing to drop
        return
    with pytest.raises(sandbox.SandboxError, match="never run as root"):
        sandbox.sandbox_ids("root")
    with pytest.raises(sandbox.SandboxError, match="not a user"):
        sandbox.sandbox_ids("no-such-user-here")
    ids = sandbox.sandbox_ids("nobody")
    assert ids is not None and ids[0] == 65534
    with pytest.raises(DriverError, match="worker.network"):
        drivers(tmp_path, network="bridge").invocation(
            "bwrap", "busybox", ["true"], {}, None, [])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_traversal_acl_lets_the_sandbox_user_search_but_not_list(tmp_path):
    private = tmp_path / "private"
    target = private / "task" / "files" / "out"
    target.mkdir(parents=True)
    private.chmod(0o700)
    (private / "task").chmod(0o700)
    (private / "task" / "worker.token").write_text("secret")
    (private / "task" / "worker.token").chmod(0o600)

    def as_nobody(*argv: str) -> int:
        return subprocess.run(argv, user=65534, group=65534, extra_groups=[],
                              capture_output=True).returncode

    assert as_nobody("ls", str(target)) != 0
    sandbox.prepare_host((65534, 65534), str(private / "task" / "files"), [str(target)], [])
    assert as_nobody("ls", str(target)) == 0
    assert as_nobody("touch", str(target / "made")) == 0  # the bound dir is handed over
    assert as_nobody("ls", str(private)) != 0 and as_nobody("ls", str(private / "task")) != 0
    assert as_nobody("cat", str(private / "task" / "worker.token")) != 0
    assert oct(private.stat().st_mode & 0o7777) == "0o710"  # x through the ACL mask only


def test_gpus_turn_on_each_engines_flags_through_config(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")
    engines = drivers(tmp_path, network="none")
    docker = engines.invocation("docker", "cuda", ["nvidia-smi"], {}, None, [], "2").argv
    assert docker[docker.index("--gpus") + 1] == "2"
    assert docker[docker.index("--network") + 1] == "none"
    plain = engines.invocation("docker", "cuda", ["nvidia-smi"], {}, None, []).argv
    assert "--gpus" not in plain
    for engine in ("apptainer", "singularity"):
        argv = engines.invocation(engine, "cuda", ["nvidia-smi"], {}, None, [], "all").argv
        assert "--nv" in argv and argv.index("--nv") < argv.index("docker://cuda")
    podman = engines.invocation("podman", "cuda", ["x"], {}, None, [], "1").argv
    assert podman[podman.index("--device") + 1] == "nvidia.com/gpu=all"
    for bad in ("1; rm -rf /", "-1", "all,2"):
        with pytest.raises(DriverError, match="gpus"):
            engines.invocation("docker", "cuda", ["x"], {}, None, [], bad)


def test_bwrap_gives_gpus_only_from_configured_devices(tmp_path):
    with pytest.raises(DriverError, match="gpu_devices"):
        drivers(tmp_path).invocation("bwrap", "busybox", ["true"], {}, None, [], "1")
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    argv = sandbox.bwrap_argv(str(root), [], {}, None, ["true"], "host", [], ["/dev/nvidia0"])
    assert argv[argv.index("--dev-bind") + 1:argv.index("--dev-bind") + 3] == [
        "/dev/nvidia0", "/dev/nvidia0"]
