"""Issue 25 (sandbox, third round), attacked for real: a gzip-bomb, many-entry or huge-ratio
layer fails naming its cap and leaves the image cache clean; an image pulled with a
registry's credentials is served only to owners who may use them (by tag, by digest, or
by a digest under another registry's name), while public images stay shared; a registry
that trickles bytes ends the pull at worker.image_pull_seconds. In process against a fake
registry, through the real worker (bwrap), and through a real server with auth on."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import requests
from werkzeug.security import generate_password_hash

from funnel_hpc.core import config as config_mod
from funnel_hpc.worker.images import ImageError, Limits, ensure_rootfs
from funnel_hpc.worker.images.access import for_owner
from tests.components import need as need_component
from tests.image_helpers import (
    ANONYMOUS,
    AUTHENTICATED,
    CA_FILE,
    PASSWORD,
    USERNAME,
    FakeRegistry,
    digest_of,
    drop_group,
    drop_user,
    gzip_bomb,
    layer,
    local_group,
    local_user,
    registry_answers,
)
from tests.server_helpers import ServerProcess
from tests.waiting import wait_for_state
from tests.worker_helpers import need

BOMB_BYTES = 3 << 30  # expanded; ~3 MB compressed
TERMINAL = ("COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED")
DIGEST_RE = re.compile(r"@(sha256:[0-9a-f]{64})")


@pytest.fixture
def fake():
    registry = FakeRegistry()
    yield registry
    registry.close()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return gzip_bomb(BOMB_BYTES)


@pytest.fixture
def real():
    """The two real registries of scripts/setup/45-registry.sh: alice alone may use the
    credentials of the one that needs them."""
    for host in (ANONYMOUS, AUTHENTICATED):
        if not registry_answers(host) or not CA_FILE.exists():
            need_component(f"the registry {host}", False, "not running or no test CA "
                           "(scripts/setup/45-registry.sh)")
    return {ANONYMOUS: {"ca_file": str(CA_FILE)},
            AUTHENTICATED: {"ca_file": str(CA_FILE), "username": USERNAME, "password": PASSWORD,
                            "users": ["alice"]}}


def cache_files(cache: Path) -> set[str]:
    """Everything in the cache but its lock files (a lock stays, empty, by design)."""
    return {str(path.relative_to(cache)) for path in cache.rglob("*")
            if "locks" not in path.relative_to(cache).parts}


def assert_clean(cache: Path, before: set[str], layer_digest: str) -> None:
    """No new root, reference or temporary file; the hostile layer not kept."""
    new = cache_files(cache) - before
    assert not [name for name in new if name.startswith(("images/", "refs/"))
                and name not in ("images", "refs")], new
    assert not [name for name in new if ".tmp-" in name], new
    assert not (cache / "blobs" / "sha256" / layer_digest[7:]).exists()


# --- caps on unpacking ---------------------------------------------------------------------

def test_a_gzip_bomb_fails_naming_the_cap_and_leaves_the_cache_clean(fake, bomb, tmp_path):
    fake.add_image("t/ok", "1", [layer(("ok", "file", "fine"))])
    ensure_rootfs(f"{fake.host}/t/ok:1", tmp_path, fake.settings)  # the cache as it was
    before = cache_files(tmp_path)
    fake.add_image("t/bomb", "1", [bomb])
    started = time.monotonic()
    with pytest.raises(ImageError) as caught:
        ensure_rootfs(f"{fake.host}/t/bomb:1", tmp_path, fake.settings)
    assert caught.value.reason == "refused"
    assert str(caught.value).startswith(
        f"image {fake.host}/t/bomb:1: layer {digest_of(bomb)} expands past "
        f"worker.image_max_ratio (100 times its compressed size")
    assert_clean(tmp_path, before, digest_of(bomb))
    assert time.monotonic() - started < 60  # refused at the header, not after 3 GB
    with pytest.raises(ImageError) as caught:  # the ratio let through: the total stops it
        ensure_rootfs(f"{fake.host}/t/bomb:1", tmp_path, fake.settings,
                      limits=Limits(max_ratio=10 ** 6, max_bytes=1 << 30))
    assert (f"layer {digest_of(bomb)} expands past worker.image_max_bytes (1073741824 bytes)"
            in str(caught.value))
    assert_clean(tmp_path, before, digest_of(bomb))


def test_many_entries_fail_naming_the_cap(fake, tmp_path):
    entries = [(f"d/f{number}", "file", "") for number in range(300)]
    data = layer(*entries)
    fake.add_image("t/many", "1", [layer(("first", "file", "x")), data])
    before = cache_files(tmp_path)
    with pytest.raises(ImageError) as caught:
        ensure_rootfs(f"{fake.host}/t/many:1", tmp_path, fake.settings,
                      limits=Limits(max_entries=250))
    assert caught.value.reason == "refused"
    assert (f"layer {digest_of(data)} passes worker.image_max_entries (250 entries in the image)"
            in str(caught.value))
    assert_clean(tmp_path, before, digest_of(data))
    root = ensure_rootfs(f"{fake.host}/t/many:1", tmp_path, fake.settings,
                         limits=Limits(max_entries=302))  # both layers: 1 + 300 entries
    assert len(os.listdir(root.rootfs / "d")) == 300


def test_a_huge_ratio_layer_fails_naming_the_cap(fake, tmp_path):
    data = layer(("zeros", "file", bytes(8 << 20)))  # 8 MiB of zeros: ~8 KB compressed
    fake.add_image("t/ratio", "1", [data])
    before = cache_files(tmp_path)
    limits = Limits(max_ratio=100, ratio_min_layer_bytes=16 << 10)
    with pytest.raises(ImageError) as caught:
        ensure_rootfs(f"{fake.host}/t/ratio:1", tmp_path, fake.settings, limits=limits)
    assert caught.value.reason == "refused"
    assert f"layer {digest_of(data)} expands past worker.image_max_ratio (100 " in str(
        caught.value)
    assert_clean(tmp_path, before, digest_of(data))
    # the defaults let a small layer reach 100 x 4 MiB: an ordinary image is not refused
    assert (ensure_rootfs(f"{fake.host}/t/ratio:1", tmp_path, fake.settings).rootfs
            / "zeros").stat().st_size == 8 << 20


def test_a_huge_pax_header_is_refused_before_it_is_read(fake, tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("f")
        info.pax_headers = {"comment": "x" * (2 << 20)}
        tar.addfile(info, io.BytesIO(b""))
    import gzip
    data = gzip.compress(buffer.getvalue())
    fake.add_image("t/pax", "1", [data])
    with pytest.raises(ImageError) as caught:
        ensure_rootfs(f"{fake.host}/t/pax:1", tmp_path, fake.settings)
    assert caught.value.reason == "refused" and "extended header" in str(caught.value)


def test_a_sparse_file_cannot_hide_its_size(fake, tmp_path):
    """A 1-byte PAX sparse file that says it is 50 GiB: its holes would be written out."""
    import gzip
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("sparse")
        info.size = 1
        info.pax_headers = {"GNU.sparse.map": "0,1", "GNU.sparse.size": str(50 << 30),
                            "GNU.sparse.name": "sparse"}
        tar.addfile(info, io.BytesIO(b"x"))
    data = gzip.compress(buffer.getvalue())
    fake.add_image("t/sparse", "1", [data])
    before = cache_files(tmp_path)
    with pytest.raises(ImageError) as caught:
        ensure_rootfs(f"{fake.host}/t/sparse:1", tmp_path, fake.settings)
    assert f"layer {digest_of(data)} expands past worker.image_max_bytes" in str(caught.value)
    assert_clean(tmp_path, before, digest_of(data))


def test_limits_default_to_the_configuration_and_refuse_bad_values():
    worker = config_mod.load(environ={}).worker
    assert Limits.from_worker(worker) == Limits()
    for key, value in (("image_max_bytes", 0), ("image_pull_seconds", -1)):
        with pytest.raises(ValueError, match=f"worker.{key} must be a positive"):
            Limits.from_worker(config_mod.replace(worker, "worker", **{key: value}))  # type: ignore[arg-type]
    # a value of the wrong type is refused as the configuration loads, naming the key
    wrong: tuple[tuple[str, object], ...] = (
        ("image_max_entries", "many"), ("image_max_ratio", 1.5),
        ("image_ratio_min_layer_bytes", True))
    for key, bad in wrong:
        with pytest.raises(ValueError, match=f"worker.{key}: expected an integer"):
            config_mod.replace(worker, "worker", **{key: bad})


# --- the pull deadline -----------------------------------------------------------------

@pytest.mark.parametrize("headers", [False, True], ids=["body", "headers"])
def test_a_trickling_registry_ends_at_the_pull_deadline(fake, tmp_path, headers):
    fake.add_image("t/slow", "1", [layer(("f", "file", os.urandom(4096)))])
    fake.trickle, fake.trickle_headers = 0.5, headers
    started = time.monotonic()
    with pytest.raises(ImageError) as caught:
        ensure_rootfs(f"{fake.host}/t/slow:1", tmp_path, fake.settings, retry_seconds=60,
                      limits=Limits(pull_seconds=3))
    elapsed = time.monotonic() - started
    assert caught.value.reason == "timeout"
    assert str(caught.value) == (f"image {fake.host}/t/slow:1: pull took longer than "
                                 "worker.image_pull_seconds (3 s)")
    assert 2.5 < elapsed < 20, elapsed
    assert not list(tmp_path.rglob(".tmp-*"))


def test_retries_do_not_outlive_the_pull_deadline(fake, tmp_path):
    fake.add_image("t/down", "1", [layer(("f", "file", "x"))])
    fake.fail_next = 10 ** 6  # 503 for ever: retried for retry_seconds, but not past the deadline
    started = time.monotonic()
    with pytest.raises(ImageError) as caught:
        ensure_rootfs(f"{fake.host}/t/down:1", tmp_path, fake.settings, retry_seconds=600,
                      limits=Limits(pull_seconds=2))
    assert caught.value.reason == "timeout" and "worker.image_pull_seconds (2 s)" in str(
        caught.value)
    assert time.monotonic() - started < 20


# --- images belong to whoever may pull them -------------------------------------------

def private(fake: FakeRegistry, **who: list[str]) -> dict:
    """The fake registry wants a token made from robot's password, which `who` may use."""
    fake.bearer = ("robot", "s3cret")
    return {fake.host: {"insecure": True, "username": "robot", "password": "s3cret", **who}}


def test_bob_cannot_use_alices_private_image_by_tag_or_digest(fake, tmp_path):
    fake.add_image("lab/secret", "1", [layer(("secret", "file", "alice's"))])
    settings = private(fake, users=["alice"])
    image = f"{fake.host}/lab/secret:1"
    mine = ensure_rootfs(image, tmp_path, settings, owner="alice")
    assert (mine.rootfs / "secret").read_text() == "alice's"
    seen = len(fake.authorizations)
    for reason, attempt in (("auth", image), ("auth", f"{fake.host}/lab/secret@{mine.digest}"),
                            ("unreachable", f"nonexistent.invalid/whatever@{mine.digest}")):
        error = ensure_error(attempt, tmp_path, settings, "bob")
        assert error.reason == reason, error
        if reason == "auth":
            assert "not for this task's owner" in str(error)
    # what bob's requests carried: never the credentials, nor a token made from them
    assert [auth for _, auth in fake.authorizations[seen:] if auth] == []
    # alice again, by tag and by digest: from the cache, no request at all
    before = sum(fake.gets.values())
    assert ensure_rootfs(image, tmp_path, settings, owner="alice").rootfs == mine.rootfs
    assert ensure_rootfs(f"{fake.host}/lab/secret@{mine.digest}", tmp_path, settings,
                         owner="alice").rootfs == mine.rootfs
    assert sum(fake.gets.values()) == before


def ensure_error(image: str, cache: Path, settings: dict, owner: str) -> ImageError:
    with pytest.raises(ImageError) as caught:
        ensure_rootfs(image, cache, settings, owner=owner, retry_seconds=1)
    return caught.value


def test_a_registry_bob_runs_cannot_launder_alices_blobs(fake, tmp_path):
    """bob knows alice's manifest and serves it from his own registry, without the blobs:
    the cache must not fill them in for him."""
    fake.add_image("lab/secret", "1", [layer(("secret", "file", "alice's"))])
    settings = private(fake, users=["alice"])
    mine = ensure_rootfs(f"{fake.host}/lab/secret:1", tmp_path, settings, owner="alice")
    raw, media_type = fake.manifests[("lab/secret", mine.digest)]
    bobs = FakeRegistry()
    try:
        bobs.add_manifest("bob/copy", "1", raw, media_type)
        with pytest.raises(ImageError) as caught:
            ensure_rootfs(f"{bobs.host}/bob/copy:1", tmp_path, {**settings, **bobs.settings},
                          owner="bob")
        assert caught.value.reason == "not_found" and "/blobs/" not in str(caught.value)
        assert bobs.blob_gets(), "the blobs were asked of bob's registry"
        # once bob's registry really serves the bytes, bob has proven he has them
        bobs.blobs = dict(fake.blobs)
        theirs = ensure_rootfs(f"{bobs.host}/bob/copy:1", tmp_path,
                               {**settings, **bobs.settings}, owner="bob")
        assert theirs.rootfs == mine.rootfs
    finally:
        bobs.close()


def test_public_images_stay_shared_and_are_pulled_once(fake, tmp_path):
    fake.add_image("lib/pub", "1", [layer(("pub", "file", "everyone's"))])
    image = f"{fake.host}/lib/pub:1"
    first = ensure_rootfs(image, tmp_path, fake.settings, owner="alice")
    gets = sum(fake.gets.values())
    for owner in ("bob", None, "carol"):
        assert ensure_rootfs(image, tmp_path, fake.settings, owner=owner).rootfs == first.rootfs
        assert ensure_rootfs(f"{fake.host}/lib/pub@{first.digest}", tmp_path, fake.settings,
                             owner=owner).rootfs == first.rootfs
    assert sum(fake.gets.values()) == gets  # no request: bob, auth off and carol share it


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make users and groups")
def test_groups_name_who_may_use_credentials(fake, tmp_path):
    lab = local_group("lab")
    alice, bob = local_user("a", (lab,)), local_user("b")
    try:
        fake.add_image("lab/secret", "1", [layer(("secret", "file", "the lab's"))])
        settings = private(fake, groups=[lab])
        assert for_owner(settings, alice).registries[fake.host]["password"] == "s3cret"
        assert "password" not in for_owner(settings, bob).registries[fake.host]
        assert "password" not in for_owner(settings, None).registries[fake.host]
        image = f"{fake.host}/lab/secret:1"
        root = ensure_rootfs(image, tmp_path, settings, owner=alice)
        assert (root.rootfs / "secret").read_text() == "the lab's"
        assert ensure_error(image, tmp_path, settings, bob).reason == "auth"
        assert ensure_error(image, tmp_path, settings, "no-such-user").reason == "auth"
        with pytest.raises(ValueError, match=r"worker.registries\[.*\].groups must be a list"):
            for_owner({fake.host: {"groups": lab}}, alice)
    finally:
        for user in (alice, bob):
            drop_user(user)
        drop_group(lab)


# --- through the real worker and a real server --------------------------------------------

def in_image(image: str, script: str = "true") -> dict:
    return {"image": image, "command": ["sh", "-c", script]}


def test_through_the_worker_a_bomb_and_a_trickle_end_system_error(harness, fake, bomb,
                                                                   tmp_path):
    cache = tmp_path / "cache"
    fake.add_image("t/bomb", "1", [bomb])
    fake.add_image("t/slow", "1", [layer(("f", "file", os.urandom(4096)))])
    config = harness.config(registries=fake.settings, image_cache=str(cache),
                            image_pull_seconds=3, image_retry_seconds=60)
    bombed = harness.run(harness.task(executors=[in_image(f"{fake.host}/t/bomb:1")]), config)
    assert bombed.state == "SYSTEM_ERROR", bombed.stderr
    assert (f"image {fake.host}/t/bomb:1: layer {digest_of(bomb)} expands past "
            "worker.image_max_ratio") in bombed.system_logs
    assert bombed.fold.task_log["logs"] == []
    assert list((cache / "images").iterdir()) == [] and not list(cache.rglob(".tmp-*"))
    assert not (cache / "blobs" / "sha256" / digest_of(bomb)[7:]).exists()
    fake.trickle = 1.0
    started = time.monotonic()
    slow = harness.run(harness.task(executors=[in_image(f"{fake.host}/t/slow:1")]), config)
    assert slow.state == "SYSTEM_ERROR", slow.stderr
    assert (f"image {fake.host}/t/slow:1: pull took longer than worker.image_pull_seconds "
            "(3 s) (timeout)") in slow.system_logs
    assert time.monotonic() - started < 60


@pytest.mark.registry
def test_through_the_worker_images_belong_to_whoever_may_pull_them(harness, real, tmp_path):
    cache = tmp_path / "cache"
    config = harness.config(registries=real, image_cache=str(cache), image_retry_seconds=1)
    secret = f"{AUTHENTICATED}/funnel/testimage:1"
    alice = harness.run(harness.task(owner="alice", executors=[
        in_image(secret, "cat /opt/funnel-test/marker")]), config)
    assert alice.state == "COMPLETE", alice.system_logs
    assert alice.executor(0)["stdout"] == "funnel-test marker\n"
    match = DIGEST_RE.search(alice.system_logs)
    assert match, alice.system_logs
    digest = match.group(1)
    for image, reason in ((secret, "auth"),
                          (f"{AUTHENTICATED}/funnel/testimage@{digest}", "auth"),
                          (f"nonexistent.invalid/whatever@{digest}", "unreachable")):
        bob = harness.run(harness.task(owner="bob", executors=[in_image(image)]), config)
        assert bob.state == "SYSTEM_ERROR", (image, bob.system_logs)
        assert f"image {image}: " in bob.system_logs and f"({reason})" in bob.system_logs
        assert bob.fold.task_log["logs"] == []
    by_digest = harness.run(harness.task(owner="alice", executors=[
        in_image(f"{AUTHENTICATED}/funnel/testimage@{digest}")]), config)
    assert by_digest.state == "COMPLETE", by_digest.system_logs
    public = f"{ANONYMOUS}/library/busybox:latest"
    for owner in ("alice", "bob"):
        run = harness.run(harness.task(owner=owner, executors=[in_image(public)]), config)
        assert run.state == "COMPLETE", run.system_logs
    records = [json.loads(path.read_text()) for path in (cache / "refs").rglob("*.json")]
    scopes = {record["reference"]: record["scope"] for record in records}
    assert scopes[public] == "public" and scopes[secret] == f"{AUTHENTICATED}|{USERNAME}"


@pytest.mark.registry
def test_through_a_real_server_bob_cannot_run_alices_private_image(real, databases, tmp_path):
    need("bwrap")
    srv = ServerProcess(tmp_path / "srv", databases.new("sqlite"), reconcile=True, overrides={
        "auth": {"mode": "basic", "users": {"alice": generate_password_hash("alice-pw"),
                                            "bob": generate_password_hash("bob-pw")}},
        "backend": {"name": "local"},
        "reconciler": {"interval_seconds": 0.3},
        "worker": {"container_driver": "bwrap", "registries": real,
                   "image_cache": str(tmp_path / "cache"), "image_retry_seconds": 1}}).start()

    def run(who: tuple[str, str], image: str) -> dict:
        created = requests.post(srv.api + "/tasks", auth=who, timeout=10, json={
            "executors": [in_image(image, "cat /opt/funnel-test/marker")]})
        assert created.status_code == 200, created.text
        return wait_for_state(srv.api, created.json()["id"], TERMINAL, 120, auth=who,
                              detail=lambda: srv.log()[-3000:])

    try:
        secret = f"{AUTHENTICATED}/funnel/testimage:1"
        alices = run(("alice", "alice-pw"), secret)
        assert alices["state"] == "COMPLETE", alices["logs"]
        assert alices["logs"][-1]["logs"][0]["stdout"] == "funnel-test marker\n"
        match = DIGEST_RE.search("\n".join(alices["logs"][-1]["system_logs"]))
        assert match
        for image, reason in ((secret, "auth"),
                              (f"nonexistent.invalid/whatever@{match.group(1)}",
                               "unreachable")):
            bobs = run(("bob", "bob-pw"), image)
            logs = "\n".join(bobs["logs"][-1]["system_logs"])
            assert bobs["state"] == "SYSTEM_ERROR", (image, logs)
            assert f"image {image}: " in logs and f"({reason})" in logs
            assert "marker" not in json.dumps(bobs["logs"][-1].get("logs") or [])
    finally:
        srv.stop()


LOOK_AROUND = """
import json, os, sys
attempts = json.loads(sys.argv[1])
answers = {}
for name, (kind, path) in attempts.items():
    try:
        os.listdir(path) if kind == "list" else open(path, "rb").read()
        answers[name] = "allowed"
    except PermissionError:
        answers[name] = "denied"
print(json.dumps(answers))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a user")
def test_a_local_user_cannot_find_or_read_a_private_image_on_disk(fake, tmp_path):
    """bob with a shell on the node, in a cache every user may reach (as the sandbox user
    must): the public image is his to read, alice's private one cannot be listed or read."""
    import shutil
    import tempfile

    from funnel_hpc.worker.images import resolve
    from funnel_hpc.worker.images.cache import Cache
    shared = Path(tempfile.mkdtemp(prefix="image-cache-", dir="/tmp"))
    shared.chmod(0o755)
    cache = shared / "cache"
    public_registry = FakeRegistry()
    bob = local_user("b")
    try:
        secret_layer = layer(("secret", "file", "alice's"))
        fake.add_image("lab/secret", "1", [secret_layer])
        settings = {**private(fake, users=["alice"]), **public_registry.settings}
        secret = ensure_rootfs(f"{fake.host}/lab/secret:1", cache, settings, owner="alice")
        public_layer = layer(("pub", "file", "everyone's"))
        public_registry.add_image("lib/pub", "1", [public_layer])
        public = ensure_rootfs(f"{public_registry.host}/lib/pub:1", cache, settings,
                               owner="alice")
        record = Cache(cache)._ref_path(resolve(f"{fake.host}/lab/secret:1"))
        blobs = cache / "blobs" / "sha256"
        attempts = {
            "list images": ("list", str(cache / "images")),
            "list refs": ("list", str(record.parent)),
            "read the private record": ("read", str(record)),
            "read the private layer": ("read", str(blobs / digest_of(secret_layer)[7:])),
            "read the public layer": ("read", str(blobs / digest_of(public_layer)[7:])),
            "read the public root": ("read", str(public.rootfs / "pub")),
        }
        proc = subprocess.run(["/usr/bin/python3", "-c", LOOK_AROUND, json.dumps(attempts)],
                              capture_output=True, text=True, timeout=60, cwd="/",
                              user=bob, group=bob, extra_groups=[])
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == {
            "list images": "denied", "list refs": "denied", "read the private record": "denied",
            "read the private layer": "denied", "read the public layer": "allowed",
            "read the public root": "allowed"}
        assert (secret.rootfs / "secret").read_text() == "alice's"  # the worker still reads
    finally:
        public_registry.close()
        drop_user(bob)
        shutil.rmtree(shared)


@pytest.mark.registry
@pytest.mark.parametrize("engine", ["proot", "charliecloud"])
def test_the_other_image_drivers_keep_private_images_private(harness, real, tmp_path, engine):
    """The rule lives in the image cache, below every driver: proot and ch-run as well."""
    need({"proot": "proot", "charliecloud": "ch-run"}[engine])
    # one uid per task, as a shared node has it: proot is refused for owned tasks while
    # executors share one host user
    slots = {"first": 1_700_000_000, "count": 2, "lock_dir": str(tmp_path / "uid-locks")}
    config = harness.config(registries=real, image_cache=str(tmp_path / "cache"),
                            image_retry_seconds=1, container_driver=engine,
                            sandbox_uids=slots)
    secret = f"{AUTHENTICATED}/funnel/testimage:1"
    alice = harness.run(harness.task(owner="alice", executors=[
        in_image(secret, "cat /opt/funnel-test/marker")]), config)
    assert alice.state == "COMPLETE", alice.system_logs
    match = DIGEST_RE.search(alice.system_logs)
    assert match, alice.system_logs
    for image in (secret, f"nonexistent.invalid/whatever@{match.group(1)}"):
        bob = harness.run(harness.task(owner="bob", executors=[in_image(image)]), config)
        assert bob.state == "SYSTEM_ERROR" and f"image {image}: " in bob.system_logs
